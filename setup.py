"""Packaging for cl_core.

The Triton kernels live in the top-level folder ``kernels/`` but are installed as
``cl_core.kernels``: a top-level module named ``kernels`` would shadow the PyPI
package of that name that transformers probes for.
"""
from setuptools import setup

setup(
    name="cl_core",
    version="0.1.0",
    description="Fused dynamic-EMA (LCIA/DEMA) kernels and tools for continual LoRA instruction tuning",
    packages=["cl_core", "cl_core.kernels", "cl_core.dema", "cl_core.continual", "cl_core.cli"],
    package_dir={"cl_core": "cl_core", "cl_core.kernels": "kernels"},
    package_data={"cl_core.kernels": ["csrc/*.c", "csrc/*.h"]},
    python_requires=">=3.9",
    # torch is deliberately not pinned to a range that could pull a CUDA build:
    # the Makefile installs torch==2.13.0 first where torch is missing.
    install_requires=[
        "torch>=2.1",
        "transformers>=4.45",
        "peft>=0.13",
        "scikit-learn>=1.3",
        "safetensors",
        "accelerate>=0.34",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # Optional trainers/engines: cl_core works without them; each integration says
        # which extra to install when it is missing.
        "deepspeed": ["deepspeed>=0.15"],
        "lightning": ["lightning>=2.2"],
        "trl": ["trl>=0.12"],
        # tensorboardX: a real report_to backend for the Trainer log tests
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0", "tensorboardX"],
    },
    entry_points={"console_scripts": ["cl-core=cl_core.cli:main"]},
)

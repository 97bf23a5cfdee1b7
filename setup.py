"""Build hook: compiles the native CPU kernels into the package while it is built, so the
first DEMA step after `pip install` does not wait for a compiler (metadata: pyproject.toml).

The libraries land in cl_core/kernels/_prebuilt/, keyed by source, compiler, flags and CPU
(cl_core/kernels/build.py); on another CPU model the key differs and cl_core compiles at
first use instead, saying so. No C compiler: the package is built without them and cl_core
uses its pure-torch CPU path (logged). Editable installs run no build hook: the Makefile
fills the cache with `python -m cl_core.kernels.build` instead.
"""
import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py


class NativeDistribution(Distribution):
    """The wheel carries compiled libraries: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


class BuildWithNativeKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        # Load build.py by path: the package itself imports torch, absent while building.
        spec = importlib.util.spec_from_file_location("cl_core_native_build", Path("cl_core/kernels/build.py"))
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        dest = Path(self.build_lib) / "cl_core" / "kernels" / "_prebuilt"
        for name, path in builder.build_all(dest).items():
            print(f"cl_core: native {name} kernels: {path or 'not built (no working C compiler)'}")


setup(cmdclass={"build_py": BuildWithNativeKernels}, distclass=NativeDistribution)

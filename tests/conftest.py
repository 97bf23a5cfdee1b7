"""Shared pytest set-up: Triton kernels run on the CPU through the interpreter; one
intra-op thread (the tests use tiny tensors, where thread start-up costs more than it
saves, and the 2 CI cores are shared with spawned distributed workers); the `gpu` marker
on every CUDA test; fixtures that count kernel launches and build a tiny model folder."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# No shared base-model cache in tests (each test trains what it measures; test_faults turns it on
# in its own folder): nothing is written under ~/.cache, and no test reads another's base.
os.environ["CL_CORE_BASE_CACHE"] = "off"

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # The CUDA tests are the ones named test_cuda_* (make gpu-check selects them by that
    # name too); one rule here instead of a second decorator beside each skip-if-no-GPU.
    for item in items:
        if getattr(item, "originalname", item.name).startswith("test_cuda_"):
            item.add_marker(pytest.mark.gpu)


def count_launches(monkeypatch, kernel_cls) -> dict:
    """Counts calls of `kernel_cls.run` (one per Triton launch) in the returned {"n": ...}."""
    count = {"n": 0}
    original = kernel_cls.run

    def counting_run(self, *args, **kwargs):
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_cls, "run", counting_run)
    return count


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton kernel launches under the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return count_launches(monkeypatch, InterpretedFunction)


@pytest.fixture
def cuda_launches(monkeypatch):
    """Counts compiled Triton launches (make gpu-check)."""
    from triton.runtime.jit import JITFunction

    return count_launches(monkeypatch, JITFunction)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny Llama with its tokenizer: an ordinary local causal-LM folder."""
    from cl_core.continual import synthetic as S
    from cl_core.continual import tiny_model as T

    path = tmp_path_factory.mktemp("model")
    tok = T.build_tokenizer(T.build_vocab(S.vocabulary_texts() + ["summarize translate the input"]))
    T.build_model(len(tok), hidden_size=32, num_layers=1, num_heads=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path

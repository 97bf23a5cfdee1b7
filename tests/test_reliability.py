"""Reliability (issue 12): damaged files and full or read-only disks give one clear line
that points the right way, and nothing changes before a bad input is refused."""
import pytest
import torch

from cl_core import DEMA
from cl_core.peft_export import atomic_save, load_state_file


# ------------------------------------------------------------------ DEMA state files
@pytest.fixture
def state_bytes(tmp_path):
    params = [torch.nn.Parameter(torch.randn(16, 4)) for _ in range(3)]
    engine = DEMA(params)
    for p in params:
        p.grad = torch.randn_like(p)
    engine.update()
    path = tmp_path / "dema_state.pt"
    atomic_save({"engine": engine.state_dict()}, str(path))
    return path.read_bytes()


def test_truncated_state_file_says_truncated(tmp_path, state_bytes):
    path = tmp_path / "dema_state.pt"
    # Most cut points made torch say "[Errno 22] Invalid argument", others a miniz error.
    for n in (2, 100, len(state_bytes) // 2, len(state_bytes) - 1):
        path.write_bytes(state_bytes[:n])
        with pytest.raises(ValueError, match=rf"dema_state\.pt is truncated \({n} bytes, the end of the archive "
                                             r"is missing.*copy it again.*or delete it"):
            load_state_file(str(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"dema_state\.pt is empty \(0 bytes\)"):
        load_state_file(str(path))
    path.write_bytes(b'{"not": "torch"}')
    with pytest.raises(ValueError, match=r"dema_state\.pt is not a torch.save file \(it starts with b'\{\"no'\)"):
        load_state_file(str(path))
    path.write_bytes(state_bytes)
    assert set(load_state_file(str(path))) == {"engine"}

"""Fixtures of the runner tests."""
import pytest

from cl_core.continual import run as runner


@pytest.fixture
def captured(monkeypatch):
    """The RunConfigs the CLI hands to the runner, validated, without training anything."""
    seen = []

    def fake_run(cfg, out, **kwargs):
        cfg.validate()
        seen.append(cfg)
        return {"config": cfg.to_dict(), "methods": {}, "wall_seconds_this_call": 1.0}

    monkeypatch.setattr(runner, "run", fake_run)
    return seen

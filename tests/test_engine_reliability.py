"""Engine reliability (issues 10-12): missing gradients counted, states checked before
loading, unusable inputs refused up front, no silent slow path, copies and pickles,
sparse gradients, large-tensor accuracy, skipped AMP steps, EMA kept in the param dtype.
"""
from __future__ import annotations

import logging

import pytest
import torch

from cl_core import DEMA, DEMAConfig


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


# ---------------------------------------------------------------- missing gradients (issue 10.3)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_missing_gradients_are_counted_per_tensor_and_warned_once(backend, caplog):
    ps = _params((3,), (4, 2))
    e = DEMA(ps, DEMAConfig(backend=backend))
    with caplog.at_level(logging.WARNING, logger="cl_core.dema.engine"):
        e.update()  # no gradient anywhere
        e.update()
        ps[0].grad = torch.ones(3)
        e.update()  # tensor 1 still without one
    assert e.stats.missing_grads.tolist() == [2, 3]
    assert e.stats.missing_grads.dtype == torch.int64
    assert e.stats.to_dict()["missing_grads"] == [2, 3]
    warned = [r for r in caplog.records if "no gradient on any" in r.getMessage()]
    assert len(warned) == 1  # once per engine, not per update


def test_partial_missing_gradients_do_not_warn(caplog):
    ps = _params((3,), (4,))
    ps[0].grad = torch.ones(3)
    e = DEMA(ps)
    with caplog.at_level(logging.WARNING, logger="cl_core.dema.engine"):
        e.update()
    assert e.stats.missing_grads.tolist() == [0, 1]
    assert not [r for r in caplog.records if "no gradient" in r.getMessage()]


def test_missing_gradients_survive_state_dict_and_old_states_load():
    ps = _params((3,), (2,))
    e = DEMA(ps)
    ps[1].grad = torch.ones(2)
    e.update()
    e.update()
    sd = e.state_dict()
    assert sd["missing_grads"].tolist() == [2, 0]
    e2 = DEMA(ps)
    e2.load_state_dict(sd)
    assert e2.stats.missing_grads.tolist() == [2, 0]
    old = dict(sd)
    del old["missing_grads"]  # a state saved before the counter existed
    e2.load_state_dict(old)
    assert e2.stats.missing_grads.tolist() == [0, 0]


def test_count_missing_is_the_public_hook_for_fused_steps(caplog):
    e = DEMA(_params((3,), (2,), (5,)))
    e.count_missing([2])
    e.count_missing([])
    assert e.stats.missing_grads.tolist() == [0, 0, 1]
    with caplog.at_level(logging.WARNING, logger="cl_core.dema.engine"):
        e.count_missing([0, 1, 2])
    assert [r for r in caplog.records if "no gradient on any" in r.getMessage()]
    for bad in ([3], [-1], [True], [1.0]):
        with pytest.raises(ValueError, match="count_missing"):
            e.count_missing(bad)
    assert e.stats.missing_grads.tolist() == [1, 1, 2]

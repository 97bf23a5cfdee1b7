"""DEMAOptimizer whatever the user changes between steps (issue 27): each step equals the
inner optimizer's own step() followed by DEMA.update(), or refuses before anything moved.

Steps that ran fused differ from torch's separate ops by a few ulps (tests/fused/test_fused.py's
tolerances: rtol 1e-5 / atol 1e-6 on parameters, state and EMA; α rtol 2e-3 / atol 1e-5)."""
import warnings

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _pair(make_opt, model_edit=None):
    """(wrapped model, DEMAOptimizer) and (plain model, inner optimizer alone, reference DEMA)."""
    m1, m2 = _model(), _model()
    if model_edit is not None:
        model_edit(m1), model_edit(m2)
    wrapped = DEMAOptimizer(make_opt(m1), DEMAConfig())
    inner = make_opt(m2)
    ref = DEMA([p for g in inner.param_groups for p in g["params"] if p.requires_grad], DEMAConfig())
    return (m1, wrapped), (m2, inner, ref)


def _run(pair, steps, before_step=None, grad_edit=None):
    (m1, wrapped), (m2, inner, ref) = pair
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    for t in range(steps):
        if before_step is not None:
            before_step(t, m1, wrapped), before_step(t, m2, inner)
        for m, o in ((m1, wrapped), (m2, inner)):
            o.zero_grad()
            m(x * (1 + t)).pow(2).mean().backward()
            if grad_edit is not None:
                grad_edit(t, m)
        wrapped.step()
        inner.step()
        ref.update()
    return m1, wrapped, m2, inner, ref


def _close(a, b):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=1e-5, atol=1e-6)


def _same_state(o1, o2):
    for p1, p2 in zip([p for g in o1.param_groups for p in g["params"]],
                      [p for g in o2.param_groups for p in g["params"]]):
        s1, s2 = o1.state.get(p1, {}), o2.state.get(p2, {})
        assert s1.keys() == s2.keys()
        for k in s1:
            _close(s1[k], s2[k])


def _check(m1, wrapped, m2, inner, ref):
    for a, b in zip(m1.parameters(), m2.parameters()):
        _close(a, b)
    _same_state(wrapped, inner)
    for a, b in zip(wrapped.engine.ema_tensors(), ref.ema_tensors()):
        _close(a, b)
    torch.testing.assert_close(wrapped.engine.stats.alpha, ref.stats.alpha, atol=1e-5, rtol=2e-3)


# amsgrad from step 0: torch itself cannot turn it on once Adam's state exists (KeyError)
@pytest.mark.parametrize("option,value,at", [("maximize", True, 2), ("amsgrad", True, 0)])
def test_option_set_after_wrapping_is_honoured(option, value, at):
    """Case 2: torch reads every option at every step; the fused step did at construction."""
    pair = _pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))

    def turn_on(t, m, o):
        if t == at:
            for g in o.param_groups:
                g[option] = value

    out = _run(pair, 6, before_step=turn_on)
    _check(*out)
    assert pair[0][1]._fused.generic_steps == 6 - at


def test_tensor_unfrozen_after_wrapping_is_trained(caplog):
    """Case 1: a tensor unfrozen after wrapping is trained by the inner optimizer, and the
    step says (once) and counts that it is not averaged."""
    pair = _pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05), lambda m: m[2].weight.requires_grad_(False))

    def unfreeze(t, m, o):
        if t == 2:
            m[2].weight.requires_grad_(True)

    with caplog.at_level("WARNING"):
        m1, wrapped, m2, inner, ref = _run(pair, 5, before_step=unfreeze)
    _check(m1, wrapped, m2, inner, ref)
    assert wrapped.unaveraged_steps == 3
    assert sum("requires_grad=False when the optimizer was wrapped" in r.message for r in caplog.records) == 1


def test_same_tensor_twice_matches_torch():
    """Case 4: SGD([p, p]) steps p twice in torch; the fused step sends it to the generic path."""
    p, q = (torch.nn.Parameter(torch.linspace(-1, 1, 7)) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, inner = DEMAOptimizer(torch.optim.SGD([p, p], lr=0.1)), torch.optim.SGD([q, q], lr=0.1)
    for _ in range(3):
        for t, o in ((p, wrapped), (q, inner)):
            o.zero_grad()
            t.pow(2).sum().backward()
            o.step()
    assert torch.equal(p, q)
    assert wrapped._fused.generic_steps == 3


def test_same_tensor_swapped_in_place_into_a_group_is_noticed():
    """Case 4 after wrapping: a list element replaced in place (same list, same length) makes a
    tensor appear twice; the next step must notice it and take the generic path as torch does."""
    p, r, q, s = (torch.nn.Parameter(torch.linspace(-1, 1, 7) + k) for k in (0, 1, 0, 1))
    wrapped, inner = DEMAOptimizer(torch.optim.SGD([p, r], lr=0.1)), torch.optim.SGD([q, s], lr=0.1)
    for step in range(4):
        if step == 2:  # in place: the list object and its length stay the same
            wrapped.param_groups[0]["params"][1] = p
            inner.param_groups[0]["params"][1] = q
        for ts, o in (((p, r), wrapped), ((q, s), inner)):
            o.zero_grad()
            sum(t.pow(2).sum() for t in ts).backward()
            o.step()
    assert torch.equal(p, q) and torch.equal(r, s)
    assert wrapped._fused.generic_steps == 2


def test_non_contiguous_gradient_is_read():
    """Case 5: a non-contiguous gradient (a hook's transpose) is averaged from a contiguous
    copy; the step takes the generic path and matches torch + the reference engine."""
    def transposed(t, m):
        for p in m.parameters():
            if p.dim() == 2:
                p.grad = p.grad.t().contiguous().t()
                assert not p.grad.is_contiguous()

    out = _run(_pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05)), 4, grad_edit=transposed)
    _check(*out)


def test_failed_load_state_dict_changes_nothing():
    """Case 8: the DEMA part matches, torch refuses the inner part: nothing changed."""
    (m1, wrapped), _ = _pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    (m3, other), _ = _pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    x = torch.randn(6, 4)
    for m, o, k in ((m1, wrapped, 1), (m3, other, 3)):
        for _ in range(k):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    sd = other.state_dict()
    sd["param_groups"] = sd["param_groups"] + [dict(sd["param_groups"][0], params=[])]
    ema = [t.clone() for t in wrapped.engine.ema_tensors()]
    state = wrapped.engine.state_dict()
    with pytest.raises(ValueError):
        wrapped.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ema, wrapped.engine.ema_tensors()))
    assert wrapped.engine.num_updates == state["num_updates"] == 1
    assert torch.equal(wrapped.engine.stats.alpha, state["alpha"])


def _triton_pair(make_opt, shapes=((3, 5), (7,))):
    """The Triton one-pass step (interpreter, CPU tensors) and the same optimizer on the
    generic path (inner step, then the Triton two-pass engine)."""
    from tests.helpers import make_params

    out = []
    for fused in (True, False):
        params = make_params(list(shapes))
        out.append((params, DEMAOptimizer(make_opt(params), DEMAConfig(backend="triton", formula="paper"),
                                          fused=fused)))
    return out


def _triton_steps(pair, steps, edit_grads=None):
    for params, opt in pair:
        gen = torch.Generator().manual_seed(1)
        for t in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if edit_grads is not None:
                edit_grads(t, params)
            opt.step()
    (p1, o1), (p2, o2) = pair
    for a, b in zip(p1, p2):
        _close(a, b)
    for a, b in zip(o1.engine.ema_tensors(), o2.engine.ema_tensors()):
        _close(a, b)
    torch.testing.assert_close(o1.engine.stats.alpha, o2.engine.stats.alpha, atol=1e-5, rtol=2e-3)
    torch.testing.assert_close(o1.engine._gather("d"), o2.engine._gather("d"), atol=1e-6, rtol=2e-3)
    return o1


def test_triton_adamw_eps_zero_masked_lanes_count_nothing():
    """Case 7: eps=0 on tensors whose size is not a multiple of the tile: the lanes past
    the end computed 0/0 and every step counted as non-finite (the EMA never moved)."""
    o = _triton_steps(_triton_pair(lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=0.0)), 4)
    assert int(o.engine.stats.nonfinite_skips.sum()) == 0


def test_triton_non_contiguous_gradient_then_fused_steps():
    """Cases 5 and 6: a non-contiguous gradient at step 2 sends that step to the generic
    path, whose Triton engine reads a contiguous copy (it raised after the inner step had
    moved the parameters); the fused steps after it start from the folded d."""
    def transpose_at_2(t, params):
        if t == 2:
            params[0].grad = params[0].grad.t().contiguous().t()

    o = _triton_steps(_triton_pair(lambda ps: torch.optim.AdamW(ps, lr=1e-2)), 5, transpose_at_2)
    assert o._fused.generic_steps == 1


def test_triton_sparse_gradient_then_fused_steps():
    """Case 6: a sparse gradient (SGD takes it) makes one generic step; the fused steps
    after it read the canonical d (they read d before the backend folded its partials)."""
    def sparse_at_1(t, params):
        if t == 1:
            params[1].grad = params[1].grad.to_sparse()

    o = _triton_steps(_triton_pair(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.0)), 5, sparse_at_1)
    assert o._fused.generic_steps == 1

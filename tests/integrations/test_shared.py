"""What the trainer integrations share (cl_core.integrations: attach, selection, log_window,
extras): the HF and the
Lightning callbacks log the same numbers for the same run, take one default, ask the engine
which optimizers have a one-pass step; each integration whose optional package is missing
raises an ImportError naming the pip extra (a real missing import, in a fresh interpreter)."""
import os
import subprocess
import sys

import pytest
import torch

from cl_core import DEMA, DEMAConfig
from cl_core.dema.onepass.step import optimizer_kind
from cl_core.integrations import attach
from cl_core.integrations.log_window import LogWindow
from cl_core.integrations.selection import select_dema_parameters, select_parameters
from tests.dist_scripts.common import TokenDataset, sequential_trainer_cls, tiny_peft_llama, training_args
from tests.helpers import ROOT

STEPS, LOG_EVERY, BATCH, LR = 6, 2, 4, 5e-2


def _lora(model):
    return [p for _, p in select_dema_parameters(model)]


def _hf_run(tmp_path):
    from cl_core.integrations.hf import DEMACallback

    model = tiny_peft_llama()
    opt = torch.optim.AdamW(_lora(model), lr=LR, weight_decay=0.0)
    cb = DEMACallback()
    args = training_args(tmp_path / "hf", max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                         max_grad_norm=0.0, logging_strategy="steps", logging_steps=LOG_EVERY)
    trainer = sequential_trainer_cls()(model=model, args=args, train_dataset=TokenDataset(), callbacks=[cb],
                                       optimizers=(opt, None))
    trainer.train()
    lines = [{k: v for k, v in h.items() if k.startswith("dema/")} for h in trainer.state.log_history if "loss" in h]
    return cb, [h["step"] for h in trainer.state.log_history if "loss" in h], lines


def _lightning_run(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from cl_core.integrations.lightning import DEMACallback

    class Collect(pl.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        name, version = "collect", 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            dema = {k: v for k, v in metrics.items() if k.startswith("dema/")}
            if dema:
                self.rows.append((step, dema))

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_peft_llama()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(_lora(self.model), lr=LR, weight_decay=0.0)

    logger = Collect()
    cb = DEMACallback()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=logger, log_every_n_steps=LOG_EVERY,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb], default_root_dir=str(tmp_path / "pl"))
    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=BATCH, shuffle=False)
    trainer.fit(Lit(), loader)
    return cb, [s for s, _ in logger.rows], [row for _, row in logger.rows]


def test_both_callbacks_log_the_same_numbers_for_the_same_run(tmp_path):
    """The same tiny PEFT Llama, data, order and AdamW under the transformers Trainer and under
    Lightning: both callbacks run the one-pass step and log, every 2 steps, the same keys and
    the same numbers (α over the updates since the last line; counters). The two trainers
    reduce the loss in another order (a sum over the batch's tokens divided by their count,
    against a mean), so α agrees to float rounding; the counts agree exactly."""
    hf_cb, hf_steps, hf_lines = _hf_run(tmp_path)
    pl_cb, pl_steps, pl_lines = _lightning_run(tmp_path)
    assert hf_cb.fused and pl_cb.fused
    assert hf_steps == pl_steps == [2, 4, 6]
    assert [sorted(a) for a in hf_lines] == [sorted(b) for b in pl_lines]
    assert set(hf_lines[0]) >= {"dema/alpha_mean", "dema/fallback_share", "dema/fallback_start", "dema/fallback_raw_ge1",
                                "dema/fallback_raw_le0", "dema/fallback_raw_nan", "dema/jump_share", "dema/skipped_share",
                                "dema/out_of_regime", "dema/missing_grads", "dema/nonfinite_skips",
                                "dema/skipped_steps", "dema/updates"}
    for a, b in zip(hf_lines, pl_lines):
        assert a["dema/alpha_mean"] == pytest.approx(b["dema/alpha_mean"], rel=1e-5)
        for key in a:
            if key.startswith("dema/alpha_q"):  # quantiles: a histogram bin (±1.8 %) of α equal to rounding
                assert a[key] == pytest.approx(b[key], rel=0.04), key
            elif key != "dema/alpha_mean":
                assert a[key] == b[key], key
    assert [line["dema/updates"] for line in hf_lines] == [2, 4, 6]
    # the run is not degenerate: α moved off the fallback somewhere, so the shares test something
    assert any(line["dema/fallback_share"] < 1 for line in hf_lines)


def test_one_default_and_one_set_of_one_pass_optimizers():
    pytest.importorskip("lightning.pytorch")
    from cl_core.integrations.hf import DEMACallback as HFCallback
    from cl_core.integrations.lightning import DEMACallback as PLCallback

    assert HFCallback().eval_with_ema == PLCallback().eval_with_ema == attach.EVAL_WITH_EMA_DEFAULT
    for cls in (HFCallback, PLCallback):
        with pytest.raises(ValueError, match=r"params='all'.*'lora'.*'trainable'.*callable"):
            cls(params="all")
        with pytest.raises(ValueError, match="fused='yes'"):
            cls(fused="yes")

    # which optimizer types have a one-pass step is the engine's answer, subclasses included
    p = torch.nn.Parameter(torch.zeros(3))
    named = [("p", p)]

    class MyAdamW(torch.optim.AdamW):
        pass

    for opt in (torch.optim.AdamW([p]), torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1),
                torch.optim.RMSprop([p]), MyAdamW([p])):
        reason = attach.why_not_fusable(opt, named)
        assert (reason is None) == (optimizer_kind(opt) is not None), type(opt).__name__
        if reason is not None:
            assert type(opt).__name__ in reason
    q = torch.nn.Parameter(torch.zeros(2))
    assert "not averaged" in attach.why_not_fusable(torch.optim.AdamW([p, q]), named)
    r = torch.nn.Parameter(torch.zeros(1))
    assert "not updated by the optimizer (e.g. 'r')" in attach.why_not_fusable(torch.optim.AdamW([p]), named + [("r", r)])
    assert attach.why_not_fusable(torch.optim.AdamW([p]), named, fused_arg=False) == "fused=False"


def test_fallback_share_counts_exactly_the_updates_at_the_fallback():
    """No gradient signal (zero gradients: the formula has nothing to divide) puts every tensor
    at the fallback: share 1. A trained step leaves it: the share is the exact count of α equal
    to the configured fallback (as float32), not of α near it."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    engine = DEMA(params, DEMAConfig())
    window = LogWindow()
    assert not window
    for p in params:
        p.grad = torch.zeros_like(p)
    engine.update()
    window.add(engine)
    line = window.metrics(engine)
    assert line["dema/fallback_share"] == 1.0 and line["dema/alpha_mean"] == pytest.approx(engine.config.fallback)
    assert line["dema/updates"] == 1 and not window                      # a fresh window after each line
    seen = []
    for step in range(4):
        with torch.no_grad():
            for k, p in enumerate(params):
                p.add_(0.1 * (k + 1) * torch.randn_like(p))
                p.grad = torch.randn_like(p)
        engine.update()
        window.add(engine)
        seen.append(engine.stats.alpha.clone())
    line = window.metrics(engine)
    alphas = torch.stack(seen)
    fallback = torch.tensor(engine.config.fallback, dtype=torch.float32)
    assert line["dema/fallback_share"] == float((alphas == fallback).float().mean())
    assert line["dema/alpha_mean"] == pytest.approx(float(alphas.mean()), rel=1e-6)
    assert line["dema/fallback_share"] < 1 and line["dema/updates"] == 5


def test_first_step_check_and_selection_errors_name_what_to_fix():
    engine = DEMA([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match=r"X: at the first optimizer step no averaged tensor has a gradient "
                                           r"\(1 tensors, e\.g\. 'w'\).*; see here"):
        attach.check_first_step_gradients(engine, ["w"], False, who="X", hint="; see here")
    attach.check_first_step_gradients(engine, ["w"], True)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"params='trainable'.*Linear has no trainable parameters"):
        select_parameters(frozen, "trainable")
    with pytest.raises(ValueError, match=r"params='lora'.*Linear has no trainable parameters"):
        select_parameters(frozen, "lora")
    lin = torch.nn.Linear(2, 2)
    assert [n for n, _ in select_parameters(lin, lambda m: [m.weight])] == ["weight"]
    with pytest.raises(TypeError, match="callable must return parameters"):
        select_parameters(lin, lambda m: ["weight"])


# --------------------------------------------------------------------------- missing extras


_BLOCK = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None      # `import name` now raises ImportError, as when it is not installed
{code}
"""


def _run_without(blocked, code):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _BLOCK.format(blocked=list(blocked), code=code)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)


MISSING = [
    ("hf module", ["transformers"], "import cl_core.integrations.hf", "hf"),
    ("DEMACallback", ["transformers"], "from cl_core import DEMACallback", "hf"),
    ("lightning", ["lightning", "lightning.pytorch"], "import cl_core.integrations.lightning", "lightning"),
    ("deepspeed", ["deepspeed"], "import cl_core.integrations.deepspeed", "deepspeed"),
    ("peft export", ["peft"], "import cl_core.integrations.peft", "hf"),
    ("save_ema_adapter", ["peft"], "from cl_core import save_ema_adapter", "hf"),
]


@pytest.mark.parametrize("what,blocked,code,extra", MISSING, ids=[m[0] for m in MISSING])
def test_missing_optional_package_names_the_extra(what, blocked, code, extra):
    out = _run_without(blocked, code)
    assert out.returncode != 0, out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f'pip install ".[{extra}]"' in last, out.stderr[-2000:]


def test_core_and_the_engine_need_none_of_the_optional_packages():
    """With every optional package missing: `import cl_core`, the shared core, the FSDP helpers
    and a DEMA update work, and the Lightning callback imports without peft (Lightning's extra
    does not bring it); exporting an adapter from it then names the extra. An installed
    package whose own dependency is missing is reported as that, not as itself missing."""
    out = _run_without(["transformers", "peft", "deepspeed", "lightning", "lightning.pytorch", "accelerate", "trl"], """
import torch, cl_core, cl_core.integrations.fsdp
import cl_core.integrations.attach, cl_core.integrations.selection, cl_core.integrations.log_window
import cl_core.integrations.state_files, cl_core.integrations.extras
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
e = cl_core.DEMA([p]); e.update(); assert e.num_updates == 1
print("ok")
""")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    pytest.importorskip("lightning.pytorch")
    out = _run_without(["peft"], """
from cl_core.integrations.lightning import DEMACallback
cb = DEMACallback()
try:
    from cl_core.integrations.peft import save_ema_adapter
except ImportError as exc:
    print("refused:", exc)
""")
    assert out.returncode == 0 and "refused:" in out.stdout and 'pip install ".[hf]"' in out.stdout, \
        out.stderr[-2000:]
    # Lightning installed, but a package it imports is not (lightning_utilities): the error
    # names that package, never "install lightning"
    out = _run_without(["lightning_utilities"], "import cl_core.integrations.lightning")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "lightning_utilities" in last and '.[lightning]' not in last, \
        out.stderr[-2000:]


def test_a_dema_stuck_at_the_fallback_is_warned_once_over_the_run(caplog):
    """Every α at the fallback (real updates: scale 2 on tiny steps puts the formula's α far
    above 1): one warning, once the run holds enough updates (judged over the run, not per
    log window), naming the cause and what to try; dema/out_of_regime says so from that line
    on. Dynamic α (a tiny scale) and the fixed formula are not warned."""
    import logging

    from cl_core import DEMA, DEMAConfig

    def run(config, lines):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(4)]
        engine, window = DEMA(params, config), LogWindow()
        outs = []
        for _ in range(lines):
            for _ in range(5):                      # 5 steps x 4 tensors = 20 tensor-updates a line
                for p in params:
                    p.grad = torch.randn_like(p) * 1e-3
                    with torch.no_grad():
                        p.add_(p.grad, alpha=-1e-3)
                engine.update()
                window.add(engine)
            outs.append(window.metrics(engine))
        return outs

    with caplog.at_level(logging.WARNING, logger="cl_core.dema.regime"):
        stuck = run(DEMAConfig(), 5)
        assert [o["dema/fallback_share"] for o in stuck] == [1.0] * 5
        assert stuck[0]["dema/fallback_start"] == 0.2 and stuck[1]["dema/fallback_raw_ge1"] == 1.0
        # 64 tensor-updates and 8 updates are first reached at the 4th line (20 updates, 80)
        assert [o["dema/out_of_regime"] for o in stuck] == [0.0, 0.0, 0.0, 1.0, 1.0]
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "≥ 1" in warned[0] and "formula='paper'" in warned[0]
        caplog.clear()
        dynamic = run(DEMAConfig(scale=1e-9), 5)
        assert dynamic[-1]["dema/fallback_share"] < 0.5 and dynamic[-1]["dema/out_of_regime"] == 0.0
        assert run(DEMAConfig(formula="fixed"), 5)[-1]["dema/out_of_regime"] == 0.0
        assert caplog.records == []

"""The paper's baselines (replay, ewc, lwf, olora; cl_core.continual.baselines): each loss term
and statistic against a reference written out by hand on a tiny model, replay's mixture and
buffer, and each method end to end through `cl-core run`, resumed after a stop with the
results of an uninterrupted run."""
import json
import math
import random

import pytest
import torch

from cl_core.cli import main
from cl_core.continual.baselines import ewc, lwf, olora, replay
from cl_core.continual.config import REPLAY_SAMPLING, RunConfig
from tests.helpers import stop_after_first_task


class _Regression(torch.nn.Module):
    """loss = mean over rows of (x·W − y)²: its gradient is known in closed form."""

    def __init__(self, d=3, seed=0):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x, y):
        class Out:
            pass
        out = Out()
        out.loss = ((x @ self.W - y) ** 2).mean()
        return out


def _data(n=5, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, d, generator=g), torch.randn(1, generator=g)) for _ in range(n)]


def test_ewc_fisher_is_the_mean_of_per_sample_squared_gradients_computed_by_hand():
    model, data = _Regression(), _data()
    fisher = ewc.fisher_diagonal(model, ({"x": x, "y": y} for x, y in data), {"W": model.W})
    W = model.W.detach()
    by_hand = torch.zeros(3)
    for x, y in data:        # one sample: d/dW (x·W − y)² = 2 (x·W − y) x
        by_hand += (2 * (x[0] @ W - y[0]) * x[0]) ** 2
    torch.testing.assert_close(fisher["W"], by_hand / len(data), rtol=1e-6, atol=0)


def test_ewc_penalty_is_lambda_sum_fisher_times_squared_distance():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in params.items()}
    anchors = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    expected = 0.0
    for k in params:
        for p, f, a in zip(params[k].flatten().tolist(), fisher[k].flatten().tolist(), anchors[k].flatten().tolist()):
            expected += f * (p - a) ** 2
    got = ewc.penalty(params, fisher, anchors, 7.5)
    assert math.isclose(float(got), 7.5 * expected, rel_tol=1e-6)


def test_ewc_accumulates_online_and_its_state_round_trips(tmp_path):
    cfg = RunConfig(methods=("ewc",), ewc_decay=0.5, ewc_samples=3)
    model = _Regression()
    data = _data(6)
    encode = lambda recs: {"x": recs[0][0], "y": recs[0][1]}   # noqa: E731 - one record a batch
    hook = ewc.Hook(cfg, seed=0)
    hook.begin_task(model, 0)
    assert hook.loss(model, None, None) is None          # task 1: nothing to protect
    hook.end_task(model, 0, data, encode)
    first = hook.fisher["W"].clone()
    with torch.no_grad():
        model.W.add_(1.0)
    hook.begin_task(model, 1)
    hook.end_task(model, 1, data, encode)
    # the draw of task 2 is its own (seeded per task): recompute it the same way, by hand
    order = torch.randperm(6, generator=torch.Generator().manual_seed(
        __import__("cl_core.continual.training", fromlist=["x"]).seed_for(0, "ewc", 1)))[:3].tolist()
    W = model.W.detach()
    new = sum((2 * (data[i][0][0] @ W - data[i][1][0]) * data[i][0][0]) ** 2 for i in order) / 3
    torch.testing.assert_close(hook.fisher["W"], 0.5 * first + new, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hook.anchors["W"], W)
    # the penalty moves with the weights, zero at the anchors
    assert hook.loss(model, None, None).item() == 0.0
    with torch.no_grad():
        model.W.add_(0.1)
    assert hook.loss(model, None, None).item() > 0
    hook.save(tmp_path)
    back = ewc.Hook(cfg, seed=0)
    back.load(tmp_path)
    assert torch.equal(back.fisher["W"], hook.fisher["W"]) and torch.equal(back.anchors["W"], hook.anchors["W"])
    with pytest.raises(FileNotFoundError, match="ewc: cannot resume"):
        ewc.Hook(cfg, 0).load(tmp_path / "missing")


def test_lwf_distillation_is_the_temperature_scaled_kl_on_answer_tokens_written_out():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    T = 2.0
    terms = []
    for b in range(2):
        for t in range(4):            # logits at t predict the token at t + 1
            if labels[b, t + 1] == -100:
                continue
            po = [math.exp(v / T) for v in old[b, t].tolist()]
            pn = [math.exp(v / T) for v in new[b, t].tolist()]
            po = [v / sum(po) for v in po]
            pn = [v / sum(pn) for v in pn]
            terms.append(sum(a * math.log(a / c) for a, c in zip(po, pn)))
    expected = T * T * sum(terms) / len(terms)
    assert math.isclose(float(lwf.distillation(new, old, labels, T)), expected, rel_tol=1e-5)
    assert float(lwf.distillation(old, old, labels, T)) == pytest.approx(0.0, abs=1e-7)


def _tiny_lora(seed=0, adapters=("group_0",)):
    from peft import LoraConfig, get_peft_model

    from cl_core.continual import tiny_model

    torch.manual_seed(seed)
    base = tiny_model.build_model(40, hidden_size=16, num_layers=1, num_heads=2, max_positions=32, seed=seed)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name=adapters[0])
    for a in adapters[1:]:
        model.add_adapter(a, cfg)
    model.set_adapter(adapters[-1])
    return model


def test_lwf_teacher_is_the_model_before_the_task_and_the_student_keeps_its_gradient():
    model = _tiny_lora()
    hook = lwf.Hook(RunConfig(methods=("lwf",)), 0)
    ids = torch.arange(1, 9).reshape(1, 8)
    inputs = {"input_ids": ids, "labels": torch.tensor([[-100] * 4 + [5, 6, 7, 8]])}
    hook.begin_task(model, 0)
    assert hook.loss(model, inputs, model(**inputs)) is None      # task 1: no earlier model
    hook.begin_task(model, 1)
    before = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        for p in hook.params.values():
            p.add_(0.3)
    out = model(**inputs)
    torch.testing.assert_close(hook.teacher_logits(inputs), before)
    loss = hook.loss(model, inputs, out)
    expected = lwf.distillation(out.logits, before, inputs["labels"], 2.0)
    torch.testing.assert_close(loss, expected)
    (out.loss + loss).backward()        # the trained tensors were not touched in place
    assert all(p.grad is not None for p in hook.params.values())


def test_olora_orthogonality_and_l2_against_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    new = {"l1": torch.randn(2, 5, generator=g), "l2": torch.randn(2, 5, generator=g)}
    olds = [{k: torch.randn(2, 5, generator=g) for k in new} for _ in range(2)]
    expected = 0.0
    for old in olds:
        for k in new:           # ‖A_newᵀ A_old‖² with A as d×r: Σ_ij (Σ_d old[i,d]·new[j,d])²
            for i in range(2):
                for j in range(2):
                    expected += sum(old[k][i, d].item() * new[k][j, d].item() for d in range(5)) ** 2
    assert math.isclose(float(olora.orthogonality(new, olds)), expected, rel_tol=1e-5)
    ps = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    assert math.isclose(float(olora.l2(ps)), sum(math.sqrt(sum(v * v for v in p.flatten().tolist())) for p in ps),
                        rel_tol=1e-6)


def test_olora_trains_the_new_set_alone_and_the_model_is_the_sum_of_every_set():
    model = _tiny_lora(adapters=("group_0", "group_1"))
    hook = olora.Hook(RunConfig(methods=("olora",), olora_lambda2=0.1), 0)
    hook.begin_task(model, 1)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".group_1." in n for n in trained)
    assert sorted(model.base_model.active_adapters) == ["group_0", "group_1"]
    # one LoRA layer by hand: base(x) + Σ_sets s·B·A·x
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 16)
    by_hand = layer.base_layer(x)
    for a in ("group_0", "group_1"):
        by_hand = by_hand + layer.scaling[a] * (x @ layer.lora_A[a].weight.T @ layer.lora_B[a].weight.T)
    torch.testing.assert_close(layer(x), by_hand)
    expected = 0.5 * olora.orthogonality(olora.lora_a(model, "group_1"), [olora.lora_a(model, "group_0")]) \
        + 0.1 * olora.l2([p for n, p in model.named_parameters() if p.requires_grad])
    torch.testing.assert_close(hook.loss(model, None, None), expected)


def test_replay_batches_hold_the_set_ratio_and_are_deterministic():
    task, buffer = [("t", i) for i in range(10)], [("b", i) for i in range(7)]
    mixed = replay.mix(task, buffer, steps=5, batch_size=8, ratio=0.25, rng=random.Random(3))
    assert len(mixed) == 40
    for s in range(5):
        assert sum(r[0] == "b" for r in mixed[8 * s: 8 * s + 8]) == 2
    assert mixed == replay.mix(task, buffer, steps=5, batch_size=8, ratio=0.25, rng=random.Random(3))
    assert mixed != replay.mix(task, buffer, steps=5, batch_size=8, ratio=0.25, rng=random.Random(4))
    # passes through the task: 30 task records, each of the 10 read 3 times
    from collections import Counter

    assert Counter(r[1] for r in mixed if r[0] == "t") == {i: 3 for i in range(10)}


@pytest.mark.parametrize("sampling", REPLAY_SAMPLING)
def test_replay_buffer_is_bounded_seeded_and_round_trips_with_images(tmp_path, sampling):
    from PIL import Image

    assert REPLAY_SAMPLING == replay.SAMPLING
    cfg = RunConfig(methods=("replay",), replay_size=6, replay_sampling=sampling)
    hooks = [replay.Hook(cfg, 0), replay.Hook(cfg, 0)]
    picture = Image.new("RGB", (4, 4), (10, 200, 30))
    for h in hooks:
        for j in range(3):
            h.add(j, [(f"q{j}-{i}", f"a{j}-{i}", picture if i == 0 else f"img/{j}-{i}.png") for i in range(10)])
    a, b = hooks
    assert len(a.buffer) == 6 and a.buffer == b.buffer
    if sampling == "per-task":
        assert [t for t, _ in a.buffer] == [0, 0, 1, 1, 2, 2]
    else:
        assert a.seen == 30 and replay.Hook(RunConfig(replay_size=6, replay_sampling=sampling), 1) is not None
    from cl_core.continual.synthetic import Scene, SceneObject

    scene = Scene((SceneObject("red", "star", "small", (1, 2, 3, 4), "stop"),))
    if sampling == "per-task":   # N of each task instead of a share of the total
        n = replay.Hook(RunConfig(methods=("replay",), replay_per_task=3), 0)
        for j in range(3):
            n.add(j, [(f"q{j}-{i}", "a", None) for i in range(10)])
        assert [t for t, _ in n.buffer] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    a.buffer[0] = (0, ("q", "a", picture))
    a.buffer[1] = (0, ("q", "a", scene))       # the bundled multimodal tasks' images
    a.save(tmp_path)
    back = replay.Hook(cfg, 0)
    back.load(tmp_path)
    assert [(t, r[:2]) for t, r in back.buffer] == [(t, r[:2]) for t, r in a.buffer]
    assert back.buffer[0][1][2].getpixel((1, 1)) == (10, 200, 30)
    assert back.buffer[1][1][2] == scene
    assert [r[2] for _, r in back.buffer[1:]] == [r[2] for _, r in a.buffer[1:]]
    assert back.seen == a.seen


SMALL = ["--bundled-tasks", "textvqa", "imagenet", "--stage1-steps", "0", "--steps", "2", "--batch-size", "4",
         "--n-train", "12", "--n-test", "4", "--max-length", "96", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("method,state_file,extra", [
    ("ewc", "ewc.safetensors", []), ("lwf", None, []), ("replay", "replay.json", []), ("olora", None, []),
    ("replay", "replay.json", ["--multimodal"]),     # the tiny LLaVA: the buffer keeps the records' pictures
], ids=["ewc", "lwf", "replay", "olora", "replay-llava"])
def test_each_baseline_runs_end_to_end_and_resumes_as_an_uninterrupted_run(tmp_path, method, state_file, extra):
    from cl_core.continual.run import run

    out = tmp_path / "run"
    assert main(["run", *SMALL, *extra, "--methods", method, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    seed = results["methods"][method]["seeds"]["0"]
    final = out / "chains" / method / "seed0" / "task1"
    if state_file is not None:
        assert (final / state_file).is_file()
    if extra:
        records = json.loads((final / state_file).read_text())["records"]
        assert records and all(r["image"]["scene"].startswith("scene :") for r in records)
    if method == "olora":     # a set per task, both kept
        assert seed["groups"] == [0, 1] and seed["reused"] == [False, False]
        assert sorted(p.name for p in final.glob("group_*")) == ["group_0", "group_1"]
    else:
        assert seed["groups"] == [0, 0]
    assert f"| {method} |" in (out / "report.md").read_text()
    cfg = RunConfig.from_dict(json.loads((out / "config.json").read_text()))

    other = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, other, quiet=True, threads=1, on_task_end=stop_after_first_task)
    resumed = run(cfg, other, quiet=True, threads=1)["methods"][method]["seeds"]["0"]
    assert resumed["loss"] == seed["loss"] and resumed["matrix"] == seed["matrix"]


def test_baseline_flags_reach_the_config_and_bad_ones_are_refused(tmp_path, captured):
    assert main(["run", "--methods", "ewc", "replay", "--ewc-lambda", "10", "--replay-ratio", "0.5",
                 "--replay-sampling", "reservoir", "--bundled-tasks", "all", "--out", str(tmp_path / "a")]) == 0
    cfg = captured[-1]
    assert (cfg.ewc_lambda, cfg.replay_ratio, cfg.replay_sampling) == (10.0, 0.5, "reservoir")
    with pytest.raises(ValueError, match=r"--replay-ratio gives no buffer record in a batch of 4 \(round"):
        RunConfig(methods=("replay",), replay_ratio=0.1, batch_size=4).validate({"replay_ratio": "--replay-ratio"})
    with pytest.raises(ValueError, match="--replay-per-task keeps N records of each task, which --replay-sampling"):
        RunConfig(methods=("replay",), replay_per_task=5, replay_sampling="reservoir").validate(
            {"replay_per_task": "--replay-per-task", "replay_sampling": "--replay-sampling"})
    with pytest.raises(ValueError, match="method olora with --train-projector"):
        RunConfig(methods=("olora",), train_projector=True).validate({"train_projector": "--train-projector"})
    for bad, words in ((["--methods", "lora", "--ewc-lambda", "3"], "method ewc does not run"),
                       (["--methods", "replay", "--replay-ratio", "1"], "--replay-ratio must be between 0 and 1"),
                       (["--methods", "lwf", "--lwf-temperature", "0"], "--lwf-temperature must be a positive"),
                       (["--methods", "ewc+dema"], "ewc does not combine with an EMA")):
        with pytest.raises(ValueError, match=words):
            RunConfig(**{"methods": tuple(bad[1].split())}, **_kw(bad[2:])).validate(
                {"ewc_lambda": "--ewc-lambda", "replay_ratio": "--replay-ratio",
                 "lwf_temperature": "--lwf-temperature"})


def _kw(rest):
    names = {"--ewc-lambda": ("ewc_lambda", float), "--replay-ratio": ("replay_ratio", float),
             "--lwf-temperature": ("lwf_temperature", float)}
    return {names[f][0]: names[f][1](v) for f, v in zip(rest[::2], rest[1::2])}


def test_compare_paper_runs_the_papers_rows_and_refuses_a_method_list(tmp_path, captured, caplog):
    from cl_core.continual.methods import PAPER_ROWS

    assert main(["run", "--compare", "paper", "--bundled-tasks", "all", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert captured[-1].methods == PAPER_ROWS == ("lora", "moelora", "lwf", "ewc", "replay", "olora", "lcia")
    assert main(["run", "--compare", "paper", "--methods", "lora", "--out", str(tmp_path / "q")]) == 2
    assert "--compare paper runs the paper's rows" in caplog.text


def test_the_report_lays_the_papers_rows_out_as_its_table_1_in_its_order():
    from cl_core.continual.report.markdown import _paper_table_lines

    def metrics(k):
        return {"avg_acc": 10.0 + k, "forgetting": 2.0 * k, "new_acc": 50.0 - k}
    names = ("lcia", "ewc", "lora", "dema")      # the run's order; dema is no row of the paper's
    results = {"config": {"seeds": [0]},
               "methods": {m: {"metrics": metrics(k), "metrics_std": metrics(0)} for k, m in enumerate(names)}}
    lines = _paper_table_lines(results)
    assert "missing here: moelora, lwf, replay, olora" in lines[3]
    assert lines[5:] == ["| method | Avg.ACC | Forgetting | New.ACC |", "|---|---|---|---|",
                         "| lora | 12.00 | 4.00 | 48.00 |", "| ewc | 11.00 | 2.00 | 49.00 |",
                         "| lcia | 10.00 | 0.00 | 50.00 |"]
    assert _paper_table_lines({"config": {"seeds": [0]}, "methods": {"lora": results["methods"]["lora"]}}) == []


def test_zero3_is_refused_for_the_baselines_and_kept_for_the_others():
    from cl_core.continual.launch import Launch

    zero3 = Launch(world_size=2, deepspeed={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="ewc, olora under DeepSpeed ZeRO stage 3.*use ZeRO stage 0, 1 or 2"):
        zero3.check_run(RunConfig(methods=("lora", "ewc", "olora")))
    zero3.check_run(RunConfig(methods=("lora", "dema")))
    Launch(world_size=2, deepspeed={"zero_optimization": {"stage": 2}}).check_run(RunConfig(methods=("ewc",)))

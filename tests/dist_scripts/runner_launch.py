"""Launched by tests/runner/test_launch.py as
`DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 runner_launch.py OUT SPEC.json`.

The continual runner (`cl-core run`) under a launcher, 2 gloo ranks on CPU, several runs in
one launch (each launch costs seconds of start-up):
  ddp      a run of the reference's config (OUT/ref/config.json, written by the test's
           single-process run) interrupted after its first task on every rank, then
           resumed by the same `cl-core run` command line (the CLI, in these processes);
  shard    the evaluation's batches shared out over the ranks (Launch.map_batches) give
           exactly the answers of one process generating them all;
  ds0      `cl-core run ... --deepspeed zero0.json` (fp32);
  ds0b     `cl-core run --methods lcia ... --deepspeed zero0_bf16.json` (the official set-up);
  ds3      `cl-core run ... --deepspeed zero3.json` (fp32, every tensor partitioned), interrupted
           after its first task and resumed as ddp is; how many parameters were partitioned when
           the runner gathered them back whole after each training is recorded.
  mm       `cl-core run --multimodal ...` (the tiny LLaVA on the bundled tasks drawn as pictures), DDP.
  qw       the same with `--model-family qwen2-vl` (a tiny Qwen2-VL), DDP.
  qwds     the same with `--model-family qwen2.5-vl --deepspeed zero0.json`.
Each rank writes OUT/rank{r}.json with what it saw.
"""
import json
import os
import sys

import torch

torch.set_num_threads(1)


def interrupted_run(out, folder, deepspeed=None):
    from cl_core.continual.launch import Launch
    from cl_core.continual.run import RunConfig, run

    cfg = RunConfig.from_dict(json.loads((folder / "ref" / "config.json").read_text()))
    launch = None if deepspeed is None else Launch.from_env(deepspeed, cfg=cfg)

    def stop(method, seed, task):
        if task == 0:
            raise KeyboardInterrupt   # on every rank at the same point, as Ctrl-C under torchrun

    try:
        run(cfg, out, quiet=True, threads=1, on_task_end=stop, launch=launch)
    except KeyboardInterrupt:
        pass
    import torch.distributed as dist

    dist.barrier()    # rank 0 saved the state before the interruption; the others read it after
    return json.loads((out / "state.json").read_text())


def shard_check(folder):
    """Sharded vs. whole generation on the stage-1 base of the ddp run."""
    from cl_core.continual import synthetic
    from cl_core.continual.evaluation import generate
    from cl_core.continual.launch import Launch
    from cl_core.continual.training import load_base, tiny_tokenizer

    tok = tiny_tokenizer()
    model = load_base(folder / "ddp" / "base" / "seed0", tok)
    prompts = [s.prompt for s in synthetic.stage1_samples(23, seed=5)]   # 23: batches of 5, the last short
    launch = Launch.from_env()
    sharded = launch.map_batches(lambda a, b: generate(model, tok, prompts[a:b], max_new_tokens=4, batch_size=5),
                                 len(prompts), 5)
    whole = generate(model, tok, prompts, max_new_tokens=4, batch_size=5)
    order = launch.map_batches(lambda a, b: [(i, launch.rank) for i in range(a, b)], len(prompts), 5)
    return {"equal": sharded == whole, "n": len(sharded), "order": order}


def record_gathers(seen):
    """Wrap the runner's ZeRO-3 gather (the real one runs) to record, per training, how many
    parameters were partitioned and how many of them this rank held only a part of."""
    from cl_core.continual import launch

    real = launch.gather_whole

    def gather_whole(model):
        params = [p for p in model.parameters() if hasattr(p, "ds_id")]
        seen.append({"partitioned": len(params), "total": sum(1 for _ in model.parameters()),
                     "lora_partial": sum(1 for n, p in model.named_parameters()
                                         if "lora_" in n and hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel)})
        return real(model)

    launch.gather_whole = gather_whole


def main(folder, spec):
    import torch.distributed as dist
    from pathlib import Path

    from cl_core.cli import main as cli

    folder = Path(folder)
    seen = {}
    if "ddp" in spec:
        seen["after_interrupt"] = interrupted_run(folder / "ddp", folder)
        seen["ddp_exit"] = cli(spec["ddp"] + ["--out", str(folder / "ddp")])
        seen["shard"] = shard_check(folder)
    for name in ("ds0", "ds0b", "ds3", "mm", "qw", "qwds"):
        if name in spec:
            if name == "ds3":
                seen["ds3_gathers"] = []
                record_gathers(seen["ds3_gathers"])
                flags = spec[name]
                seen["ds3_after_interrupt"] = interrupted_run(folder / name, folder,
                                                              flags[flags.index("--deepspeed") + 1])
            seen[f"{name}_exit"] = cli(spec[name] + ["--out", str(folder / name)])
            # accelerate sets this for a DeepSpeed Trainer and leaves it; the runner puts it back
            seen[f"{name}_env_after"] = os.environ.get("ACCELERATE_USE_DEEPSPEED")
            # ZeRO-3: transformers' global DeepSpeed config, which makes from_pretrained load
            # partitioned, must not outlive the runner's trainings
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            seen[f"{name}_zero3_after"] = is_deepspeed_zero3_enabled()
    rank = dist.get_rank()
    seen["world"] = dist.get_world_size()
    (folder / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))

"""The continual runner on many processes: ``cl-core run`` started by ``torchrun`` /
``python -m torch.distributed.run`` or ``accelerate launch`` (DDP over gloo on CPU), with or
without a DeepSpeed config (``--deepspeed FILE``, ZeRO stage 0, 1, 2 or 3).

    launch = Launch.from_env(deepspeed="zero0.json", flags=FLAGS)   # checks, then joins the group
    launch.check_run(cfg, flags)          # --batch-size divides over the processes, ...
    launch.trainer_kwargs(batch_size)     # per-device batch, DeepSpeed config, bf16
    preds = launch.map_batches(fn, n, batch_size)   # evaluation shared out, gathered in order
    launch.on_main(fn)                    # rank 0 alone; its ValueError raised on every rank

How the runner uses it (docs/distributed.md, "The continual runner on many processes"): every rank runs the
same chains in lock step; each Trainer run is one data-parallel training (the global batch is
``--batch-size``, each process trains ``batch / world`` of it); rank 0 alone writes the run
folder (config, state, adapters, α, results, report, plots), every rank reads it (resume);
the stage-1 base is trained by all ranks together (one DDP training, so identical on every
rank), written by rank 0, and read after a barrier. Evaluation splits the test prompts into
the batches one process would generate, gives batch k to rank k mod world and gathers the
answers in order, so every batch, and hence every answer, is the one a single process gives.

A Launch of one process (no launcher) does nothing of this: every method returns at once.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

# DeepSpeed stages the runner runs. At 0/1/2 the parameters stay whole on every rank; ZeRO-3
# partitions the parameters themselves, and release() gathers them back whole after every
# training, so evaluation, saving the adapters and the next task's warm start read them as in
# one process at every stage (the next Trainer's DeepSpeed partitions them again).
DEEPSPEED_STAGES = (0, 1, 2, 3)
# The DeepSpeed config keys the runner sets itself through TrainingArguments ("auto" there).
_AUTO_KEYS = {
    "train_batch_size": "the global batch (--batch-size)",
    "train_micro_batch_size_per_gpu": "the per-process batch (--batch-size / processes)",
    "gradient_accumulation_steps": "1 (the runner does not accumulate)",
    "gradient_clipping": "the method's clipping (--max-grad-norm, or the recipe's)",
}


def _flag(flags: Optional[dict], name: str) -> str:
    return (flags or {}).get(name, name)


@dataclass
class Launch:
    """Where this process stands in the launch: its rank among ``world_size`` processes, and
    the DeepSpeed config (parsed) when the run trains under DeepSpeed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    deepspeed: Optional[dict] = None        # the parsed --deepspeed JSON
    deepspeed_file: Optional[str] = None
    find_unused: bool = False               # DDP looks for parameters a step leaves without a gradient
    cuda: bool = False                      # each process trains on GPU LOCAL_RANK (RunConfig.on_cuda()): nccl
    # ACCELERATE_USE_DEEPSPEED as the launcher set it (accelerate sets it in the process when a
    # Trainer runs DeepSpeed, and never removes it: release() puts it back)
    accelerate_deepspeed_env: Optional[str] = field(default=None, repr=False)
    _joined: bool = field(default=False, repr=False)   # this object initialised the process group

    # ------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls, deepspeed: Optional[str] = None, flags: Optional[dict] = None, cfg=None) -> "Launch":
        """The launch this process was started in (RANK / WORLD_SIZE / LOCAL_RANK, as torchrun
        and accelerate launch set them; none: one process). ``deepspeed``: a DeepSpeed JSON
        file; it, and ``cfg`` (a RunConfig: check_run), are checked here (ValueError, one line
        naming the flag) before anything happens. With more than one process the process group
        (gloo) is then joined, so the runner can synchronise before the first Trainer exists;
        accelerate and DeepSpeed use that group."""
        env = os.environ
        launched = "RANK" in env and "WORLD_SIZE" in env
        flag = _flag(flags, "deepspeed")
        ds = None
        if deepspeed is not None:
            ds = read_deepspeed_config(deepspeed, flag)
            if not launched:
                raise ValueError(f"{flag} {deepspeed}: DeepSpeed runs under a launcher that starts the processes; "
                                 "start the run with: torchrun --nproc_per_node N -m cl_core run ... "
                                 "(or accelerate launch -m cl_core run ...)")
        elif str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() in ("1", "true", "yes"):
            raise ValueError(f"accelerate launch with DeepSpeed: give the DeepSpeed config to the run as {flag} FILE "
                             "instead (the runner checks it and sets the batch and the clipping of each method)")
        try:
            rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ValueError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} / LOCAL_RANK="
                             f"{env.get('LOCAL_RANK')!r} are not whole numbers; start the run with torchrun or "
                             "accelerate launch") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: not a valid launch")
        launch = cls(rank=rank, world_size=world, local_rank=local, deepspeed=ds,
                     deepspeed_file=None if deepspeed is None else str(deepspeed),
                     accelerate_deepspeed_env=env.get("ACCELERATE_USE_DEEPSPEED"),
                     cuda=cfg is not None and cfg.on_cuda())
        if cfg is not None:
            launch.check_run(cfg, flags)
        launch._join()
        return launch

    def _join(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if self.cuda:
            import torch

            # one GPU per process, as the Trainer (accelerate) picks it: LOCAL_RANK
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            # On the CPU (TrainingArguments(use_cpu=True)) gloo; on GPUs nccl.
            dist.init_process_group(backend="nccl" if self.cuda else "gloo")
            self._joined = True
        if self.is_main:
            log.info("%d processes%s", self.world_size,
                     f", DeepSpeed ZeRO stage {self.zero_stage}" if self.deepspeed is not None else "")

    def close(self, barrier: bool = True) -> None:
        """Leave the process group this Launch joined (after a last barrier; none when this
        rank stops on an error, as the others may be inside another collective): left to the
        interpreter's exit, gloo's threads were seen to abort the process."""
        if self._joined:
            import torch.distributed as dist

            if dist.is_initialized():
                if barrier:
                    dist.barrier()
                dist.destroy_process_group()
            self._joined = False

    # ------------------------------------------------------------ what it is
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def zero_stage(self) -> Optional[int]:
        if self.deepspeed is None:
            return None
        return int((self.deepspeed.get("zero_optimization") or {}).get("stage", 0))

    @property
    def bf16(self) -> bool:
        """DeepSpeed trains bf16 weights (its config says ``"bf16": {"enabled": true}``; "auto"
        follows the runner, which trains fp32)."""
        return self.deepspeed is not None and _enabled(self.deepspeed.get("bf16")) is True

    def describe(self, methods=()) -> dict:
        """The launch, for results.json (with the DEMA precision of each of ``methods``)."""
        out = {"processes": self.world_size, "per_process_batch": "batch / processes"}
        if self.deepspeed is not None:
            out["deepspeed"] = {"file": self.deepspeed_file, "zero_stage": self.zero_stage,
                                "bf16": self.bf16, "dema_precision": {m: self.dema_precision(m) for m in methods}}
        return out

    # ------------------------------------------------------------ checks
    def check_run(self, cfg, flags: Optional[dict] = None) -> None:
        """Refuse settings that cannot be split over the processes (ValueError, one line)."""
        n = self.world_size
        if cfg.batch_size % n:
            raise ValueError(f"{_flag(flags, 'batch_size')} {cfg.batch_size} does not divide over the {n} processes of "
                             f"this launch (each process trains batch / {n} examples per step); give a multiple of {n}")
        if cfg.model is None and cfg.stage1_batch_size % n:  # the bundled tiny model's stage 1
            raise ValueError(f"the bundled model's stage 1 trains batches of {cfg.stage1_batch_size}, which do not "
                             f"divide over the {n} processes of this launch; start a number of processes that "
                             f"divides {cfg.stage1_batch_size}")
        if self.zero_stage == 3:
            # their loss terms read the LoRA tensors whole, which ZeRO-3 holds in fragments on each rank
            from cl_core.continual.methods import method

            hooked = [m for m in cfg.methods if method(m).hooks is not None]
            if hooked:
                raise ValueError(f"{', '.join(hooked)} under DeepSpeed ZeRO stage 3: their loss terms and statistics "
                                 "read the LoRA tensors whole, which ZeRO-3 partitions; use ZeRO stage 0, 1 or 2 for "
                                 "them (LoRA's optimizer state is small)")

    def dema_precision(self, method: str) -> str:
        """DEMACallback(precision=...) of ``method`` under this launch (the method table's rule,
        cl_core.continual.methods.dema_precision)."""
        from cl_core.continual.methods import dema_precision

        return dema_precision(method, self.zero_stage, self.bf16)

    # ------------------------------------------------------------ training
    def trainer_kwargs(self, batch_size: int) -> dict:
        """TrainingArguments for one training of the global batch ``batch_size``."""
        kw = {"per_device_train_batch_size": batch_size // self.world_size}
        if self.distributed:
            # LoRA: every trainable tensor gets a gradient, so DDP need not search for unused ones
            kw["ddp_find_unused_parameters"] = self.find_unused
        if self.deepspeed is not None:
            import copy

            kw["deepspeed"] = copy.deepcopy(self.deepspeed)   # transformers fills in "auto" in place
            kw["bf16"] = self.bf16
        return kw

    def for_whole_model(self) -> "Launch":
        """This launch for training every tensor of a model (stage 1), where some may get no
        gradient (a LLaVA vision tower's last layer feeds nothing): DDP then looks for them."""
        import dataclasses

        return dataclasses.replace(self, find_unused=True, _joined=False)

    def release(self, trainer) -> None:
        """After a training under DeepSpeed: at ZeRO-3 gather the partitioned parameters back
        into whole ones (gather_whole); destroy the engine, which removes the gradient hooks
        (ZeRO-3: the module hooks) it put on the model (the next task's engine adds its own),
        and restore ACCELERATE_USE_DEEPSPEED, which accelerate left set: a later Trainer of this
        process without a DeepSpeed config would otherwise run DeepSpeed anyway."""
        if self.deepspeed is not None:
            model = trainer.model
            whole = gather_whole(model) if self.zero_stage == 3 else None
            trainer.accelerator.free_memory()
            if whole is not None:
                _replace_parameters(model, whole)
                # transformers keeps the ZeRO-3 config in a global while the TrainingArguments
                # live: from_pretrained (the next chain's base, a resume) would load partitioned
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            if self.accelerate_deepspeed_env is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = self.accelerate_deepspeed_env

    # ------------------------------------------------------------ synchronisation
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (the Trainer's training loss is each rank's own
        share of the batch; their mean is the loss of the whole batch, as one process reports)."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def on_main(self, fn: Callable, *args):
        """``fn(*args)`` on rank 0 only (writes, checks that remove files); every rank returns
        its result, or raises its error: the same ValueError on every rank (bad input stops all
        processes with the one line), a RuntimeError naming rank 0's error elsewhere."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the other ranks, then re-raised
                error = exc
        if not self.distributed:
            if error is not None:
                raise error
            return result
        import torch.distributed as dist

        box = [None if error is None else (type(error).__name__, str(error)), result]
        dist.broadcast_object_list(box, src=0)
        if self.is_main and error is not None:
            raise error
        if box[0] is not None:
            kind, text = box[0]
            if kind == "ValueError":
                raise ValueError(text)
            raise RuntimeError(f"rank 0 failed ({kind}: {text})")
        return box[1]

    def map_batches(self, fn: Callable, n: int, batch_size: int) -> list:
        """``fn(start, end)`` returns the list of results of items ``start..end-1``; the list
        of all ``n``. Split into the batches of ``batch_size`` one process would make, batch k
        on rank k mod world, gathered in order: every item is computed in the batch a single
        process computes it in."""
        if not self.distributed:
            return list(fn(0, n)) if n else []
        import torch.distributed as dist

        spans = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
        mine = {k: list(fn(a, b)) for k, (a, b) in enumerate(spans) if k % self.world_size == self.rank}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        out = []
        for k in range(len(spans)):
            out += gathered[k % self.world_size][k]
        return out


def gather_whole(model) -> dict:
    """ZeRO-3: every parameter of ``model`` gathered whole (on every rank: each takes part in
    the all-gather), as fresh ``nn.Parameter`` objects without DeepSpeed's partition state,
    keyed by the id of the partitioned parameter (tied weights stay one tensor). Parameters
    that are not partitioned are left out."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {}
    with GatheredParameters(params):    # modifier_rank None: read only, partitioned again on exit
        return {id(p): torch.nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad) for p in params}


def _replace_parameters(model, whole: dict) -> None:
    """Put the whole parameters of gather_whole in place of the partitioned ones in every
    module that holds them (the modules' own references: PEFT's layers, a tied head)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in whole:
                module._parameters[name] = whole[id(p)]


def _enabled(section):
    """The ``enabled`` value of a DeepSpeed precision section (True, False or "auto")."""
    if section is None:
        return False
    if isinstance(section, dict):
        return section.get("enabled", False)
    return section


def read_deepspeed_config(path, flag: str = "--deepspeed") -> dict:
    """The DeepSpeed JSON at ``path``, checked for what the runner can run (ValueError, one
    line naming ``flag`` and the file): DeepSpeed installed, a JSON object, ZeRO stage 0/1/2/3,
    the batch sizes, accumulation and clipping "auto" (the runner sets them), no
    optimizer or scheduler section (the runner's AdamW with its cosine schedule, which the
    DEMA callback reads inside DeepSpeed's step), no fp16 (the runner trains on the CPU)."""
    import importlib.util

    where = f"{flag} {path}"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: no such file (give a DeepSpeed JSON config, e.g. zero0.json)")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ValueError(f"{where} is not valid JSON ({detail})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"{where}: DeepSpeed is not installed; install it with: pip install \".[deepspeed]\" (in the cl_core checkout)")
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ValueError(f"{where}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in DEEPSPEED_STAGES:
        raise ValueError(f"{where}: ZeRO stage {stage!r} is not supported by the runner; use stage "
                         f"{', '.join(map(str, DEEPSPEED_STAGES))}")
    offload = zero.get("offload_param") or {}
    if isinstance(offload, dict) and offload.get("device", "none") not in (None, "none"):
        # the DEMA callback refuses it (cl_core.integrations.deepspeed); refused here before any task runs
        raise ValueError(f"{where}: ZeRO-3 parameter offload (offload_param) is not supported by DEMA under "
                         "DeepSpeed; drop offload_param (offload_optimizer to the CPU works)")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{where}: drop the {section!r} section: the runner trains with the Trainer's AdamW and "
                             "its cosine schedule (--lr), which DEMA reads inside DeepSpeed's step")
    if _enabled(ds.get("fp16")) not in (False, "auto"):
        raise ValueError(f"{where}: fp16 is not supported (the runner trains on the CPU); use bf16 or fp32")
    if _enabled(ds.get("bf16")) not in (True, False, "auto"):
        raise ValueError(f"{where}: bf16.enabled must be true, false or \"auto\", got {ds['bf16']!r}")
    for key, what in _AUTO_KEYS.items():
        if key in ds and ds[key] != "auto":
            raise ValueError(f"{where}: {key} must be \"auto\" (the runner sets {what}), got {ds[key]!r}")
    return ds

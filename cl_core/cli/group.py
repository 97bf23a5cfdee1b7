"""Sub-command `cl-core group assign|route`: instruction grouping on task files.

    cl-core group assign --codebook cb.json --data task.json [--threshold T | --set-threshold T]
                         [--name TASK] [--kind auto|vqa|grounding|classification] [--skip-bad] [--json]
        decides re-train (existing group) or expand (new group) for the task, updates the
        codebook (created when missing; written atomically) and prints the decision.
    cl-core group route --codebook cb.json --data test.json [--threshold T] [--kind ...]
                        [--skip-bad] [--json]
        routes every test instruction to a group and prints a summary (per-instruction groups
        with --json), plus the official whole-file decision.

The threshold is the codebook's: a new codebook is created with --threshold (or
--set-threshold; default 0.9), and later calls use the saved one. On an existing codebook
--threshold applies to that one call and is not saved; --set-threshold changes the saved
threshold (then used by every later call).

Bad input (missing file, corrupt codebook, malformed records) ends with one line and exit 2,
with the codebook unchanged. When the codebook cannot be written, assign prints the
decision, then the error (exit 2): the decision was not recorded.
"""
from __future__ import annotations

import json
import sys


def add_parser(sub):
    group = sub.add_parser(
        "group",
        help="instruction grouping: re-train or expand (assign), route test instructions (route)",
        description="LCIA instruction grouping with a codebook of LoRA sets (groups) -> instruction templates.",
    )
    actions = group.add_subparsers(dest="group_command", metavar="ACTION")
    actions.required = True

    def common(p, threshold_help):
        p.add_argument("--codebook", required=True, help="codebook JSON file")
        p.add_argument("--data", required=True, help="task file: LLaVA/CoIN JSON, or instruction/input/output JSON(L)")
        p.add_argument("--threshold", type=float, default=None, metavar="T", help=threshold_help)
        p.add_argument(
            "--kind",
            default="auto",
            choices=["auto", "vqa", "grounding", "classification"],
            help="how to extract the instruction (auto: from the folder name, as the official script)",
        )
        p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")

    p = actions.add_parser(
        "assign", help="decide re-train or expand for a training task and update the codebook",
        description="Read a training task file, extract its instruction templates and compare them with every "
                    "group of the codebook. When the most similar group reaches the threshold the task re-trains "
                    "that group's LoRA set (with DEMA); otherwise it opens a new group (a fresh LoRA set, DEMA "
                    "off). The codebook is created when missing and updated atomically; the decision is printed.",
    )
    common(p, "similarity a group must reach for the task to re-train it, for this call only; the codebook "
              "keeps its saved one (a new codebook is created with it; default 0.9). Official values: 0.9 for "
              "Original, 0.3 for Diverse/10Type instructions")
    p.add_argument(
        "--set-threshold",
        type=float,
        default=None,
        metavar="T",
        help="change the codebook's saved threshold to T (used by this and every later call)",
    )
    p.add_argument("--name", default=None, help="task name kept in the codebook (default: the folder or file name)")
    p.set_defaults(func=_assign)

    p = actions.add_parser(
        "route", help="route every test instruction to a group",
        description="Send every instruction of a test file to the group (LoRA set) whose templates it is most "
                    "similar to, or to the most recent group when no similarity reaches the threshold; print how "
                    "many instructions each group gets, and the official whole-file decision (the file's "
                    "instructions as one set). The codebook is only read.",
    )
    common(p, "similarity an instruction needs to go to its most similar group (below it: the most recent "
              "group), for this call only (default: the codebook's saved threshold)")
    p.set_defaults(func=_route)
    return group


def _load(args, create: bool):
    """(grouper, records, skipped, threshold for this call): everything checked, nothing written."""
    from pathlib import Path

    from cl_core.integrations.extras import require

    require("grouping", f"cl-core group {args.group_command}" if hasattr(args, "group_command") else "cl-core group")
    from cl_core.grouping import InstructionGrouper, check_threshold
    from cl_core.task_files import read_task_file

    once = None if args.threshold is None else check_threshold(args.threshold, "--threshold")
    new = getattr(args, "set_threshold", None)
    if new is not None:
        if once is not None:
            raise ValueError("give --threshold (this call only) or --set-threshold (saved), not both")
        new = check_threshold(new, "--set-threshold")
    path = Path(args.codebook)
    if path.exists() or not create:
        grouper = InstructionGrouper.load(path)
        if new is not None:
            grouper.threshold = new
    else:  # a new codebook is created with the threshold given
        grouper = InstructionGrouper(next((t for t in (new, once) if t is not None), 0.9))
    records, skipped = read_task_file(args.data, skip_bad=args.skip_bad, kind=args.kind)
    return grouper, records, len(skipped), once


def _task_name(path: str) -> str:
    from pathlib import Path

    p = Path(path).resolve()
    return p.parent.name if p.stem in ("train", "test", "val") else p.stem


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _assign(args) -> int:
    import logging

    from cl_core.task_files import templates

    grouper, records, skipped, once = _load(args, create=True)
    name = args.name or _task_name(args.data)
    cur = templates(records)
    before = [len(g) for g in grouper.groups]
    decision = grouper.assign(cur, name=name, threshold=once)
    try:
        grouper.save(args.codebook)
        error = None
    except OSError as exc:  # a full disk, a read-only folder, ...: the decision is shown, not recorded
        error = exc
    if args.json:
        _emit(
            {
                "task": name,
                "records": len(records),
                "skipped": skipped,
                "templates": cur,
                **decision.to_dict(),
                "dema": decision.reused,
                "codebook": str(args.codebook),
                "codebook_threshold": grouper.threshold,
                "codebook_saved": error is None,
                "groups": grouper.num_groups,
            }
        )
    else:
        _print_decision(name, records, skipped, cur, before, decision, grouper, once)
        if error is None:
            print(f"codebook {args.codebook}: {grouper.num_groups} group(s)")
    if error is not None:
        from cl_core.atomic_io import describe_os_error

        logging.getLogger("cl_core").error(
            "codebook %s could not be written, so the decision above was not recorded: %s",
            args.codebook, describe_os_error(error),
        )
        return 2
    return 0


def _print_decision(name, records, skipped, cur, before, decision, grouper, once) -> None:
    print(f"task {name}: {len(records)} records, {len(cur)} instruction template(s)" + (f", {skipped} malformed skipped" if skipped else ""))
    sims = decision.similarities
    if sims:
        best = sims.index(max(sims))  # ties: lowest group id, as the decision
        print(f"{'group':>5}  {'templates':>9}  {'similarity':>10}")
        for g, (n, s) in enumerate(zip(before, sims)):
            print(f"{g:>5}  {n:>9}  {s:>10.4f}{'  <- best' if g == best else ''}")
    threshold = f"threshold {decision.threshold}"
    if once is not None and once != grouper.threshold:
        threshold += f" for this call; the codebook keeps {grouper.threshold}"
    if decision.reused:
        print(
            f"decision: re-train group {decision.group} (similarity {sims[decision.group]:.4f} >= "
            f"{threshold}), DEMA on; {len(decision.new_templates)} new template(s) added"
        )
    else:
        why = f"best similarity {max(sims):.4f} < {threshold}" if sims else "first task"
        print(f"decision: new group {decision.group} ({why}), fresh LoRA, DEMA off")


def _route(args) -> int:
    from collections import Counter

    grouper, records, skipped, once = _load(args, create=False)
    instructions = [r.instruction for r in records]
    groups = grouper.route(instructions, threshold=once)
    whole = grouper.route_set(instructions, threshold=once)
    counts = Counter(groups)
    if args.json:
        _emit(
            {
                "records": len(records),
                "skipped": skipped,
                "threshold": whole.threshold,
                "codebook_threshold": grouper.threshold,
                "indices": [r.index for r in records],
                "groups": groups,
                "counts": {str(g): counts.get(g, 0) for g in range(grouper.num_groups)},
                "file_decision": whole.to_dict(),
            }
        )
        return 0
    print(f"{len(records)} test instructions" + (f", {skipped} malformed skipped" if skipped else "") + f", threshold {whole.threshold}"
          + (f" (this call; the codebook keeps {grouper.threshold})" if whole.threshold != grouper.threshold else ""))
    print(f"{'group':>5}  {'instances':>9}  {'share':>6}  {'file sim':>8}")
    for g in range(grouper.num_groups):
        n = counts.get(g, 0)
        print(f"{g:>5}  {n:>9}  {n / len(groups):>6.1%}  {whole.similarities[g]:>8.4f}")
    rule = "most similar" if whole.reused else "below threshold: most recent group"
    print(f"whole file (official rule): group {whole.group} ({rule})")
    return 0

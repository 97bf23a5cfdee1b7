"""Sub-command `cl-core group assign|route`: instruction grouping on task files.

    cl-core group assign --codebook cb.json --data task.json [--threshold 0.9] [--name TASK]
                         [--kind auto|vqa|grounding|classification] [--skip-bad] [--json]
        decides re-train (existing group) or expand (new group) for the task, updates the
        codebook (created when missing; written atomically) and prints the decision.
    cl-core group route --codebook cb.json --data test.json [--threshold T] [--kind ...]
                        [--skip-bad] [--json]
        routes every test instruction to a group and prints a summary (per-instruction groups
        with --json), plus the official whole-file decision.

Bad input (missing file, corrupt codebook, malformed records) ends with one line and exit 2.
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

    def common(p):
        p.add_argument("--codebook", required=True, help="codebook JSON file")
        p.add_argument("--data", required=True, help="task file: LLaVA/CoIN JSON, or instruction/input/output JSON(L)")
        p.add_argument(
            "--threshold",
            type=float,
            default=None,
            help="similarity threshold (default: the codebook's, 0.9 for a new codebook; "
            "the official values are 0.9 for Original and 0.3 for Diverse/10Type instructions)",
        )
        p.add_argument(
            "--kind",
            default="auto",
            choices=["auto", "vqa", "grounding", "classification"],
            help="how to extract the instruction (auto: from the folder name, as the official script)",
        )
        p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")

    p = actions.add_parser("assign", help="decide re-train or expand for a training task and update the codebook")
    common(p)
    p.add_argument("--name", default=None, help="task name kept in the codebook (default: the folder or file name)")
    p.set_defaults(func=_assign)

    p = actions.add_parser("route", help="route every test instruction to a group")
    common(p)
    p.set_defaults(func=_route)
    return group


def _load(args, create: bool):
    from pathlib import Path

    from cl_core.grouping import InstructionGrouper
    from cl_core.task_files import read_task_file

    path = Path(args.codebook)
    if path.exists() or not create:
        grouper = InstructionGrouper.load(path)
        if args.threshold is not None:
            grouper.threshold = args.threshold
    else:
        grouper = InstructionGrouper(0.9 if args.threshold is None else args.threshold)
    records, skipped = read_task_file(args.data, skip_bad=args.skip_bad, kind=args.kind)
    return grouper, records, len(skipped)


def _task_name(path: str) -> str:
    from pathlib import Path

    p = Path(path).resolve()
    return p.parent.name if p.stem in ("train", "test", "val") else p.stem


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _assign(args) -> int:
    from cl_core.task_files import templates

    grouper, records, skipped = _load(args, create=True)
    name = args.name or _task_name(args.data)
    cur = templates(records)
    before = [len(g) for g in grouper.groups]
    decision = grouper.assign(cur, name=name)
    grouper.save(args.codebook)
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
                "groups": grouper.num_groups,
            }
        )
        return 0
    print(f"task {name}: {len(records)} records, {len(cur)} instruction template(s)" + (f", {skipped} malformed skipped" if skipped else ""))
    sims = decision.similarities
    if sims:
        best = sims.index(max(sims))  # ties: lowest group id, as the decision
        print(f"{'group':>5}  {'templates':>9}  {'similarity':>10}")
        for g, (n, s) in enumerate(zip(before, sims)):
            print(f"{g:>5}  {n:>9}  {s:>10.4f}{'  <- best' if g == best else ''}")
    if decision.reused:
        print(
            f"decision: re-train group {decision.group} (similarity {sims[decision.group]:.4f} >= "
            f"threshold {grouper.threshold}), DEMA on; {len(decision.new_templates)} new template(s) added"
        )
    else:
        why = (
            f"best similarity {max(sims):.4f} < threshold {grouper.threshold}"
            if sims
            else "first task"
        )
        print(f"decision: new group {decision.group} ({why}), fresh LoRA, DEMA off")
    print(f"codebook {args.codebook}: {grouper.num_groups} group(s)")
    return 0


def _route(args) -> int:
    from collections import Counter

    grouper, records, skipped = _load(args, create=False)
    instructions = [r.instruction for r in records]
    groups = grouper.route(instructions)
    whole = grouper.route_set(instructions)
    counts = Counter(groups)
    if args.json:
        _emit(
            {
                "records": len(records),
                "skipped": skipped,
                "threshold": grouper.threshold,
                "indices": [r.index for r in records],
                "groups": groups,
                "counts": {str(g): counts.get(g, 0) for g in range(grouper.num_groups)},
                "file_decision": whole.to_dict(),
            }
        )
        return 0
    print(f"{len(records)} test instructions" + (f", {skipped} malformed skipped" if skipped else "") + f", threshold {grouper.threshold}")
    print(f"{'group':>5}  {'instances':>9}  {'share':>6}  {'file sim':>8}")
    for g in range(grouper.num_groups):
        n = counts.get(g, 0)
        print(f"{g:>5}  {n:>9}  {n / len(groups):>6.1%}  {whole.similarities[g]:>8.4f}")
    rule = "most similar" if whole.reused else "below threshold: most recent group"
    print(f"whole file (official rule): group {whole.group} ({rule})")
    return 0

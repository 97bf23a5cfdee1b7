"""The `cl-core` command line: `demo`, `run` and `group assign|route`.

Each sub-command lives in its own module, which provides ``add_parser(subparsers)``;
heavy imports (torch, transformers) happen inside the command, so `--help` is quick.
"""
from __future__ import annotations

import argparse
import logging
import sys

from cl_core import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-core",
        description=(
            "cl_core: dynamic-EMA (LCIA) continual LoRA instruction tuning. "
            "`demo` runs the bundled comparison of lora / ema / dema / dema+group; "
            "`run` tunes a model on your own task files; `group` decides re-train or "
            "expand from instruction templates and routes test instructions."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cl_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from cl_core.cli import group, run  # small modules, no heavy imports

    run.add_parser(sub)
    group.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback, non-zero exit.
        logging.getLogger("cl_core").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

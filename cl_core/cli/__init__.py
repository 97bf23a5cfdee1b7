"""The `cl-core` command line: `demo`, `run` and `group assign|route`.

Each sub-command lives in its own module, which provides ``add_parser(subparsers)``;
heavy imports (torch, transformers) happen inside the command, so `--help` is quick.

A problem with the user's input (ValueError, a missing file) or with their disk (any
OSError: full, read-only, permission denied) ends the command with one line on stderr and
exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys

from cl_core import __version__
from cl_core.atomic_io import DISK_HINTS, describe_os_error

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, except where there is nothing to show (a
    switch that is off, an option without a default) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"

    def _split_lines(self, text, width):
        # argparse's own, without breaking at hyphens: a flag or path (runs/demo-quick,
        # --dema-tasks) stays one word whatever the column the help starts in
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors (a bad type, an unknown option) print one short usage line and the
    error, not the whole usage of a sub-command with thirty options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [OPTIONS]   (all options: {self.prog} --help)\n"
                     f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from cl_core.cli import group, run  # small modules, no heavy imports

    parser = ArgumentParser(
        prog="cl-core",
        description=(
            "cl_core: dynamic-EMA (LCIA) continual LoRA instruction tuning. "
            f"`demo` compares {len(run.DEMO_METHODS)} methods ({', '.join(run.DEMO_METHODS)}) and the "
            "untuned base on the bundled synthetic benchmark; "
            "`run` tunes a model on your own task files; `group` decides re-train or "
            "expand from instruction templates and routes test instructions."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cl_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run.add_parser(sub)
    group.add_parser(sub)
    # `cl-core run -v` as well as `cl-core -v run` (SUPPRESS: the sub-command's flag, when not
    # given, leaves the top-level one's value alone)
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from cl_core.integrations.extras import MissingExtra

    try:
        return int(args.func(args) or 0)
    except MissingExtra as exc:
        # A package of an extra is missing: checked before any work, said in one line.
        logging.getLogger("cl_core").error("%s", exc)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback, non-zero exit.
        logging.getLogger("cl_core").error("%s", exc)
        return 2
    except OSError as exc:  # the disk: full, read-only, no permission, ...
        logging.getLogger("cl_core").error("%s", describe_os_error(exc))
        return 2
    except Exception as exc:
        # Rust writers (safetensors for adapters, tokenizers) report the disk as their own
        # exception type with "(os error N)" in the text; those get the same one line.
        code = _rust_os_error(exc)
        if code is None:
            raise
        logging.getLogger("cl_core").error("%s", describe_os_error(OSError(code, f"{exc}")))
        return 2


def _rust_os_error(exc: Exception):
    """The errno of a Rust I/O error ("... (os error 28)") about the disk, else None."""
    import re

    m = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(m.group(1)) if m else None
    return code if code in DISK_HINTS else None


if __name__ == "__main__":
    sys.exit(main())

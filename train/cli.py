"""`python -m train COMMAND ...`: every command-line entry point of ResLens.

Each module named in ``COMMAND_MODULES`` exports ``COMMANDS = {name: (add_arguments, run)}`` for its commands:
``add_arguments(parser)`` declares the flags and ``run(args) -> int`` does the work and returns the
exit status. Errors meant for users (``core.errors.UserError``) are printed as one sentence.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

# module -> the commands it provides, in the order `--help` lists them
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "train.commands": ("run", "resume", "list", "export", "eval", "delete"),
    "train.data_report": ("data",),
    "train.explain_cmd": ("explain",),
    "train.compare_cmd": ("compare",),
    "train.lr_find": ("lr-find",),
    "train.ood_cmd": ("ood-thresholds",),
    "train.export_model": ("export-model",),
    "train.cache_cmd": ("cache",),
}


def _load(module: str) -> dict[str, tuple[Callable, Callable]]:
    return importlib.import_module(module).COMMANDS


def first_sentence(doc: str | None) -> str | None:
    """A docstring's first sentence on one line (what `--help` shows next to a command)."""
    if not doc:
        return None
    text = " ".join(doc.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or only those of ``command``'s module when it names one: a command imports only
    what it needs (`list`, `compare` and `delete` start in a second, without torch)."""
    parser = argparse.ArgumentParser(prog="python -m train", description="ResLens training and explanation.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = {m: names for m, names in COMMAND_MODULES.items() if command in names} or COMMAND_MODULES
    for module, names in chosen.items():
        try:
            commands = _load(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            add_arguments, run = commands[name]
            p = sub.add_parser(name, help=first_sentence(run.__doc__))
            add_arguments(p)
            p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import UserError
    from train.signals import Terminated, raise_on_stop

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None  # `-h run` is the top-level help
    args = build_parser(command).parse_args(argv)
    try:
        with raise_on_stop():  # SIGTERM/SIGHUP end a command cleanly (the trainer has its own stop handling)
            status = int(args._run(args) or 0)
            sys.stdout.flush()  # a closed pipe (`| head`) shows here, not at exit
            return status
    except BrokenPipeError:  # `... | head` stopped reading: not an error worth a traceback
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written (-o, --plot, --csv, inputs)
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}.", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"stopped by {exc}; nothing was left half-written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _discard_stdout() -> None:
    """The reader of our output went away (`| head`): send what is left to /dev/null, so Python's flush at exit
    does not print a traceback (the recipe of the ``signal`` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

"""`python -m train COMMAND ...`: every command-line entry point of ResLens.

Each module named in ``COMMAND_MODULES`` exports ``COMMANDS = {name: (add_arguments, run)}`` for its commands:
``add_arguments(parser)`` declares the flags and ``run(args) -> int`` does the work and returns the
exit status. Errors meant for users (``core.errors.UserError``) are printed as one sentence. A command imports
only its own module; ``--help`` reads the literal ``COMMANDS`` table and docstrings from the sources.
"""
from __future__ import annotations

import argparse
import ast
import errno
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable

# the modules with commands, in the order `--help` lists them (each module's commands: its COMMANDS table)
COMMAND_MODULES = ("train.commands", "train.data_report", "train.explain_cmd", "train.compare_cmd", "train.lr_find",
                   "train.ood_cmd", "train.export_model", "train.cache_cmd")


def _load(module: str) -> dict[str, tuple[Callable, Callable]]:
    return importlib.import_module(module).COMMANDS


def summaries(module: str) -> dict[str, str | None]:
    """A module's commands and their help, read from its source without importing it (torch takes seconds):
    its ``COMMANDS = {"name": (add_arguments, run), ...}`` and the first sentence of each ``run``'s docstring."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return {}
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    docs = {node.name: ast.get_docstring(node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets))
    return {key.value: first_sentence(docs.get(value.elts[1].id)) for key, value in zip(table.keys, table.values)}


SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)\. ")  # a full stop, not the one of "e.g. "


def first_sentence(doc: str | None) -> str | None:
    """A docstring's first sentence on one line (what `--help` shows next to a command)."""
    if not doc:
        return None
    text = " ".join(doc.split())
    end = SENTENCE_END.search(text)
    return text if end is None else text[: end.start() + 1]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``minimum`` or more (anything else is a usage error naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    return parse


def folder(text: str) -> str:
    """An argparse type: a path that is not empty (an empty one would quietly mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return text


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command``'s module, which alone is imported (`list` starts in a fraction of a second,
    without torch); for anything else (``--help``, a typo) every command, named from the sources."""
    parser = argparse.ArgumentParser(prog="python -m train", description="ResLens training and explanation.")
    sub = parser.add_subparsers(dest="command", required=True)
    listed = {module: summaries(module) for module in COMMAND_MODULES}
    owner = next((module for module, names in listed.items() if command in names), None)
    for module, names in listed.items():  # every command is named (a usage error lists them all)...
        if module != owner:
            for name, summary in names.items():
                sub.add_parser(name, help=summary)
            continue
        for name, (add_arguments, run) in _load(owner).items():  # ...and only its own module is imported
            p = sub.add_parser(name, help=first_sentence(run.__doc__))
            add_arguments(p)
            p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import UserError
    from train.signals import Terminated, raise_on_stop

    argv = sys.argv[1:] if argv is None else argv
    if sys.stdout is None:  # started with stdout closed (`>&-`): what is printed goes nowhere, the work is done
        sys.stdout = open(os.devnull, "w")
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a class name gets it escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename is None:  # the output (-o or stdout)
            try:
                sys.stdout.flush()
            except OSError:  # stdout is the full disk: what is left would fail again at exit
                _discard_stdout()
            print(f"error: the disk is full ({exc.strerror}); free some space and run it again.", file=sys.stderr)
            return 2
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


def say(text: str) -> None:
    """Print a line of a command that goes on working after it: a reader gone away (`| head -1`) ends the
    printing, not the work (what is left goes to /dev/null)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _discard_stdout()


def _discard_stdout() -> None:
    """The reader of our output went away (`| head`): send what is left to /dev/null, so Python's flush at exit
    does not print a traceback (the recipe of the ``signal`` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

"""``python -m helpers ...`` run in the test's own process, for tests about what a command says and writes.

A new interpreter costs 1.5 s before the command starts (torch's import) and up to 5 s before a stage
plans (diffusers' and transformers'); in-process, those imports are paid once per test session. What
stays a real process: what is about processes (exit codes under signals, Ctrl-C, a stage's children,
torchrun, peak RSS of a fresh process, two writers).

:func:`run` answers like ``subprocess.run(..., capture_output=True, text=True)``: the exit status
``main`` returns (2 for a user error, 0 for ``--help``, 1 with the traceback on stderr for anything
unexpected), and everything the command wrote to stdout and stderr: its libraries' log lines and its
child processes' output (``generate``'s stages, torchrun's workers) included, in the order written.
The process is left as it was: the environment, the SIGINT handler, torch's thread count, and the C
allocator's settings (the stage commands hand large blocks back to the system, which slows the rest of
a test session down).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import tempfile
import traceback

#: the loggers whose handlers write to a stream chosen when they were made (not sys.stderr at the time)
_LOGGERS = ("", "diffusers", "transformers", "accelerate", "huggingface_hub", "torch")


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m helpers *args`` in this process, with ``env`` added to the environment meanwhile."""
    import huggingface_hub.constants
    import torch

    import helpers.memory
    from helpers import cli

    argv = [str(a) for a in args]
    with contextlib.ExitStack() as undo:
        out, out_file = undo.enter_context(_into_file(1))
        err, err_file = undo.enter_context(_into_file(2))
        for key, value in (env or {}).items():
            undo.enter_context(_env(key, str(value)))
        if env and "HF_HUB_CACHE" in env:  # read by huggingface_hub once, at its import
            undo.enter_context(_attr(huggingface_hub.constants, "HF_HUB_CACHE", str(env["HF_HUB_CACHE"])))
        undo.enter_context(_attr(helpers.memory, "return_large_blocks", lambda *a, **k: False))
        undo.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
        undo.callback(torch.set_num_threads, torch.get_num_threads())
        for handler in _stream_handlers():
            undo.callback(handler.setStream, handler.setStream(err))
        undo.enter_context(contextlib.redirect_stdout(out))
        undo.enter_context(contextlib.redirect_stderr(err))
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's --help and --version
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:  # what the interpreter would print before exiting with 1
            traceback.print_exc(file=err)
            code = 1
        return subprocess.CompletedProcess(argv, code, _read(out_file), _read(err_file))


@contextlib.contextmanager
def _into_file(fd: int):
    """File descriptor ``fd`` (1 or 2) into a temporary file meanwhile, and a text stream writing
    straight to it: what this process prints and what the command's child processes print (they
    inherit the descriptor) land in one file, in the order written."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with tempfile.TemporaryFile() as file:
        saved = os.dup(fd)
        os.dup2(file.fileno(), fd)
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
        try:
            yield stream, file
        finally:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)


def _read(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")


def _stream_handlers() -> list[logging.StreamHandler]:
    found = []
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and handler not in found:
                found.append(handler)
    return found


@contextlib.contextmanager
def _env(key: str, value: str):
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextlib.contextmanager
def _attr(owner, name: str, value):
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)

"""Stopping a command: Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP, all alike.

``timeout``, systemd, Slurm and Kubernetes stop a process with SIGTERM; a closed terminal or SSH
session sends SIGHUP; a person presses Ctrl-C (SIGINT). Each is raised where the command is as a
:class:`Stopped` (a ``KeyboardInterrupt``, so that every cleanup written for Ctrl-C runs: partial
files removed, children stopped and waited for), and the command ends with the shell's status for
that signal (130, 143, 129) after one line that says so.
"""

from __future__ import annotations

import contextlib
import signal
import time

#: the signals that stop a command cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: a second stop signal this soon after the first is the same stop (a terminal signals every process of
#: the command, and a parent passes it on to its child); later, it stops again (cleanup that hangs)
SAME_STOP_S = 2.0


class Stopped(KeyboardInterrupt):
    """A stop signal (``signum``), raised where the command was."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signum_of(err: BaseException) -> int:
    """The signal behind a ``KeyboardInterrupt`` (a plain one is Ctrl-C's)."""
    return getattr(err, "signum", signal.SIGINT)


def exit_status(signum: int) -> int:
    """The status a shell gives a command ended by ``signum``: 130 for SIGINT, 143 SIGTERM, 129 SIGHUP."""
    return 128 + int(signum)


def stopped_by(code: int) -> int | None:
    """The stop signal a child's exit status says it ended by (its own clean exit, or the signal's
    default action), or None."""
    for signum in STOP_SIGNALS:
        if code in (exit_status(signum), -signum):
            return signum
    return None


def said(signum: int) -> str:
    """The one line a stopped command ends with."""
    return {signal.SIGINT: "interrupted", signal.SIGTERM: "stopped (SIGTERM)",
            signal.SIGHUP: "stopped (SIGHUP: the terminal or session closed)"}.get(signum, "stopped")


class StopSignals:
    """Raise :class:`Stopped` where the command is on SIGINT, SIGTERM or SIGHUP; another within
    :data:`SAME_STOP_S` is the same stop and is ignored, so it cannot cut the cleanup short.
    :meth:`held` keeps a stop for later where raising would abort the process instead: torch's import
    runs Python callbacks from C++ (pybind11), and an exception raised in one of them ends the process
    by SIGABRT with a C++ message."""

    def __init__(self) -> None:
        self.times: list[float] = []  # when each stop arrived
        self.signum: int | None = None  # the first one's signal
        self._holding = False
        self._pending = False
        for signum in STOP_SIGNALS:
            try:
                signal.signal(signum, self._handler)
            except ValueError:  # not the main thread (main() called from a thread): leave the defaults
                pass

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.times and now - self.times[-1] < SAME_STOP_S:
            return
        self.times.append(now)
        if self.signum is None:
            self.signum = signum
        if self._holding:
            self._pending = True
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def held(self):
        """A stop during the block is raised when the block ends (or right away if it fails)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._pending:
                self._pending = False
                raise Stopped(self.signum or signal.SIGINT)

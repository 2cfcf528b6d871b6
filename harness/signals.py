"""Stop signals noted without a lock: a flag and a wakeup pipe, never a handler's wait.

A Python signal handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock (inside ``threading.Event.wait``) or inside a handler already
running. A handler that takes a lock (``Event.set()``) can then wait forever for
itself, and one that raises can leave a lock held. So the handler here only stores an
int, and the kernel-level half of Python's signal machinery (``signal.set_wakeup_fd``)
writes the signal number to a pipe that the main thread ``select``s on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Install once in the main thread; then `wait()` or poll `received`."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None  # the first stop signal, set by the handler
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self.signals:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # One store, no lock, no raise: safe however signals nest or interleave.
        if self.received is None:
            self.received = signum

    @property
    def stopped(self) -> bool:
        return self.received is not None

    def wait(self, timeout: float | None) -> bool:
        """Sleep until a stop signal or `timeout` seconds; True once one has arrived."""
        if self.received is None:
            with contextlib.suppress(InterruptedError):
                select.select([self._read], [], [], timeout)
            self._drain()
        return self.received is not None

    def _drain(self) -> None:
        # The pipe carries the signal numbers: the C-level handler may have written
        # one (in any thread) before the Python-level one has run in this thread.
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self._read, 512):
                for signum in data:
                    if self.received is None and signum in self.signals:
                        self.received = signum

    def ignore(self) -> None:
        """From now on ignore the stop signals (clean-up must not be interrupted)."""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)

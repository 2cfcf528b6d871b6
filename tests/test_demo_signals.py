"""The demo's stop signals: a storm of them never hangs or crashes the waiting process.

The demo once hung on Ctrl-C: its handler called threading.Event.set() while the main
thread waited on the same Event, and a nested handler blocked on the lock its outer
frame held. The same storm against that pattern exits 1 ("release unlocked lock") or
hangs; against StopSignals it always exits 0.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STORM = textwrap.dedent(
    """
    import os, signal, sys, threading
    from harness.signals import StopSignals

    stop = StopSignals()
    def storm():
        for i in range(20000):
            os.kill(os.getpid(), (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)[i % 3])
    thread = threading.Thread(target=storm)
    thread.start()
    while not stop.wait(0.25):
        pass
    thread.join()
    stop.ignore()
    stop.close()
    print("stopped", signal.Signals(stop.received).name)
    """
)


def test_a_signal_storm_stops_the_waiter_cleanly() -> None:
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", STORM], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("stopped SIG"), result.stdout


def test_wait_times_out_without_a_signal() -> None:
    code = (
        "from harness.signals import StopSignals\n"
        "s = StopSignals()\n"
        "print(s.wait(0.05), s.received)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.stdout.split() == ["False", "None"], result.stderr

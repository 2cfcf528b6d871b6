"""CI runs the atheris target briefly; `make fuzz` runs it for minutes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_fuzz_target_runs_clean(tmp_path: Path) -> None:
    seconds = os.environ.get("BBR_FUZZ_SECONDS", "10")
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_body.py"),
            f"-max_total_time={seconds}",
            str(tmp_path),
            str(HERE / "corpus"),
        ],
        capture_output=True,
        text=True,
        timeout=int(seconds) + 120,
        env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr

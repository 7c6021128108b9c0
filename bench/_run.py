"""What the experiment scripts in bench/ share: the tether command and a logged, single-threaded subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TETHER = [sys.executable, "-m", "tether.cli"]


def sh(args: list[str], log: Path) -> None:
    """Run ``args`` with one thread per process (several runs share the cores), appending the command line and
    its output to ``log``; a failing command raises."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)

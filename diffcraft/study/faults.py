"""Fault points for the recovery tests: the hardest moments to lose a driver or a worker, hit on
purpose rather than by a timed kill. `DIFFCRAFT_FAULT=POINT` (or `POINT:FILE`, once: the file
marks that it happened) makes the driver hold at POINT until it is killed (`driver_*`), or the
worker exit there (`worker_*`). Unset in normal runs, where a point costs one environment read."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAULT_ENV = "DIFFCRAFT_FAULT"


def fault_point(name: str) -> None:
    """Hold or exit here if DIFFCRAFT_FAULT names this point (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "")
    point, _, marker = spec.partition(":")
    if point != name:
        return
    if marker:
        if Path(marker).exists():
            return
        Path(marker).touch()
    print(f"diffcraft fault: {name}", file=sys.stderr, flush=True)
    if name.startswith("worker_"):
        os._exit(1)
    while True:
        time.sleep(3600)

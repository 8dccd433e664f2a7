"""When each phase of a trial happened, for `benchmarks/study_overhead.py --profile`: every process
of a study (Tune's driver, a trial's process, its Ray Train workers) appends one JSON line per mark
to the file that DIFFCRAFT_TIMELINE names; unset (always, outside the benchmark), a mark does nothing.
"""
from __future__ import annotations

import json
import os
import time

ENV = "DIFFCRAFT_TIMELINE"


def mark(event: str, trial: str, at: float | None = None, **fields) -> None:
    """Note that `event` happened in `trial` now (or `at`): one appended line, processes share the file."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time() if at is None else at, "pid": os.getpid(), "event": event, "trial": trial,
                       **fields})
    with open(path, "a") as handle:
        handle.write(line + "\n")


def mark_process_start(event: str, trial: str) -> None:
    """Note when this process was created, before its imports, as `event`."""
    if os.environ.get(ENV):
        import psutil

        mark(event, trial, at=psutil.Process().create_time())


def mark_memory(event: str, trial: str) -> None:
    """Note `event` with this process's memory: resident (rss) and its own pages (uss), in bytes."""
    if os.environ.get(ENV):
        import psutil

        info = psutil.Process().memory_full_info()
        mark(event, trial, rss=info.rss, uss=info.uss)

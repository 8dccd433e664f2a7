"""`diffcraft quickstart`: the whole flow on synthetic data, sized for minutes on a 2-core CPU."""
from __future__ import annotations

import time
from pathlib import Path

from diffcraft.data.prepare import PrepareConfig, prepare
from diffcraft.data.synthetic import write_dataset


def quickstart(workdir: Path, seconds_per_stem: float = 24.0) -> Path:
    """Synthesise a small dataset, prepare its feature cache; return the cache folder."""
    started = time.time()
    workdir = Path(workdir).resolve()
    source = workdir / "synthetic"
    if not (source / "audio_stems").is_dir():
        write_dataset(source, n_songs=4, stems_per_song=2, seconds=seconds_per_stem, seed=0)
        print(f"[quickstart] synthetic violin stems written to {source}")
    summary = prepare(source, workdir / "cache", PrepareConfig())
    print("[quickstart] " + "\n".join(summary.lines()))
    print(f"[quickstart] done in {time.time() - started:.0f} s; feature cache at {workdir / 'cache'}")
    return workdir / "cache"

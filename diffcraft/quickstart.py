"""`diffcraft quickstart`: the whole flow on synthetic data, sized for minutes on a 2-core CPU."""
from __future__ import annotations

import time
from pathlib import Path

from diffcraft.data.prepare import PrepareConfig, prepare
from diffcraft.data.synthetic import write_dataset
from diffcraft.train.config import load_run_config
from diffcraft.train.loop import train


def quickstart(workdir: Path, seconds_per_stem: float = 24.0, epochs: int = 8) -> Path:
    """Synthesise a small dataset, prepare its feature cache, train a small BiMamba decoder;
    return the run folder."""
    started = time.time()
    workdir = Path(workdir).resolve()
    source, cache = workdir / "synthetic", workdir / "cache"
    if not (source / "audio_stems").is_dir():
        write_dataset(source, n_songs=4, stems_per_song=2, seconds=seconds_per_stem, seed=0)
        print(f"[quickstart] synthetic violin stems written to {source}")
    summary = prepare(source, cache, PrepareConfig())
    print("[quickstart] " + "\n".join(summary.lines()))
    cfg = load_run_config(overrides=[
        "name=decoder-bimamba", f"out_dir={workdir / 'runs'}", f"data.cache={cache}",
        "data.batch_size=8", "data.clips_per_epoch=32", "model.decoder.core=bimamba",
        "model.decoder.width=128", "model.decoder.reverb_seconds=0.5", f"train.epochs={epochs}",
        "train.lr=1e-3"])
    result = train(cfg)
    print(f"[quickstart] {result.describe()}")
    print(f"[quickstart] done in {time.time() - started:.0f} s")
    return result.run_dir

"""`diffcraft quickstart`: the whole flow on synthetic data, sized for minutes on a 2-core CPU:
synthetic violin stems -> feature cache -> the quickstart study (studies/quickstart.yaml) on a
local Ray, logged to MLflow in a local SQLite file -> the study report -> promotion of the best
trial to the MLflow registry -> timbre transfer of a synthetic phrase from `models:/...@champion`."""
from __future__ import annotations

import time
from pathlib import Path

from diffcraft.audio.io import write_wav
from diffcraft.data.prepare import PrepareConfig, prepare
from diffcraft.data.synthetic import render_phrase, write_dataset
from diffcraft.errors import DataError
from diffcraft.model_uri import default_tracking_uri, resolve_checkpoint
from diffcraft.study.promote import promote
from diffcraft.study.report import write_report
from diffcraft.study.runner import run_study
from diffcraft.study.status import status_lines
from diffcraft.study.studyfile import load_study
from diffcraft.train.checkpoint import model_from_checkpoint
from diffcraft.transfer import transfer_files

QUICKSTART_STUDY = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"


def quickstart(workdir: Path, seconds_per_stem: float = 24.0) -> Path:
    """Run the flow in `workdir`; a second call reuses the data and resumes or reports the study."""
    started = time.time()
    workdir = Path(workdir).resolve()
    source, cache = workdir / "synthetic", workdir / "cache"
    if not QUICKSTART_STUDY.is_file():
        raise DataError(f"{QUICKSTART_STUDY}: the quickstart study file is missing (run from a source checkout)")
    if not (source / "audio_stems").is_dir():
        write_dataset(source, n_songs=4, stems_per_song=2, seconds=seconds_per_stem, seed=0)
        print(f"[quickstart] synthetic violin stems written to {source}")
    summary = prepare(source, cache, PrepareConfig())
    print("[quickstart] " + "\n".join(summary.lines()))
    study = load_study(QUICKSTART_STUDY, [f"run.data.cache={cache}", f"storage={workdir / 'studies'}"])
    run_study(study)
    print("[quickstart] " + "\n".join(status_lines(study)))
    report = write_report(study)
    print(f"[quickstart] report: {report}")
    promoted = promote(study)
    uri = f"models:/{promoted.name}@{promoted.alias}"
    print(f"[quickstart] promoted trial {promoted.trial} ({promoted.metric} {promoted.value:.4f}) as {uri} "
          f"(version {promoted.version})")
    phrase = write_wav(workdir / "transfer" / "phrase.wav", render_phrase(seed=12345, seconds=8.0, sample_rate=16000).audio)
    tracking = default_tracking_uri(study.mlflow.tracking_uri)
    model, _ = model_from_checkpoint(resolve_checkpoint(uri, tracking))
    done, _ = transfer_files([phrase], model, phrase.parent, "crepe", pitch_shift=-12.0, crepe_model="tiny", plot=True)
    print(f"[quickstart] transferred a synthetic phrase an octave down with {uri}: {done[0]}")
    print(f"[quickstart] done in {time.time() - started:.0f} s. Open the runs in the MLflow UI with:\n"
          f"    mlflow ui --backend-store-uri {tracking} --port 5000\n"
          f"and browse http://127.0.0.1:5000 (experiment '{study.name}', model '{promoted.name}').")
    return study.location.local_path()

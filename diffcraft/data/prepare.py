"""Turn a source (MDB-stem-synth, a folder of audio) into a feature cache of 4 s clips.

Per file: load at 16 kHz, label F0 (the dataset's annotation, else CREPE), cut silences longer
than 100 ms, cut 4 s clips, compute loudness on each clip. Files fan out as Ray tasks; the driver
sends each task the file's bytes (so workers on other nodes need no shared filesystem) and writes
each finished file into the cache, then the manifest, atomically. A rerun recomputes only the files
whose content or parameters changed; an interrupted run loses only the files in flight. The cache
may be a folder or an object-store URI (`--out s3://bucket/caches/violin`); its format lives in
`diffcraft.data.cache`.
"""
from __future__ import annotations

import hashlib
import posixpath
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcraft import CLIP_FRAMES, CLIP_SAMPLES, HOP_LENGTH, SAMPLE_RATE
from diffcraft.audio.crepe import CREPE_MODELS, crepe_pitch
from diffcraft.audio.features import a_weighted_loudness
from diffcraft.audio.io import load_audio
from diffcraft.data.splits import SPLITS, assign_splits, split_warnings
from diffcraft.data.sources import SourceFile, annotation_on_frames, discover, read_mdb_annotation
from diffcraft.data.cache import (MANIFEST_VERSION, read_manifest, remove_leftovers, sha256_of, write_arrays,
                                  write_manifest)
from diffcraft.errors import AudioError, ConfigError, DataError
from diffcraft.storage import Location, is_remote


SPLIT_FIELDS = ("validation_fraction", "test_fraction", "split_seed", "split_file")


@dataclass
class PrepareConfig:
    silence_db: float = -60.0  # frames with A-weighted loudness below this are silent
    min_silence_ms: float = 100.0  # silent runs at least this long are cut out (the paper's 100 ms)
    crepe_model: str = "full"  # CREPE capacity for files without annotations: full | tiny
    crepe_batch_size: int = 512  # CREPE frames per forward pass
    validation_fraction: float = 0.2  # share of songs that pick the best epoch
    test_fraction: float = 0.2  # share of songs held out for the numbers a report cites
    split_seed: int = 0  # which songs the fractions pick (the same seed, the same split)
    split_file: str = ""  # YAML/JSON `train:/validation:/test:` song lists, instead of the fractions

    def validate(self, where: str = "") -> None:
        if self.crepe_model not in CREPE_MODELS:
            raise ConfigError(f"crepe_model: {self.crepe_model!r} is not one of {list(CREPE_MODELS)}")
        for name in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: {getattr(self, name)} is not in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"validation_fraction + test_fraction: {self.validation_fraction} + "
                              f"{self.test_fraction} leaves no song to train on")
        if self.min_silence_ms <= 0:
            raise ConfigError(f"min_silence_ms: {self.min_silence_ms} must be positive")

    def params(self) -> dict:
        """Everything that changes the cached arrays (the split does not)."""
        out = asdict(self)
        for name in SPLIT_FIELDS:
            out.pop(name)
        out.update(sample_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, clip_samples=CLIP_SAMPLES,
                   version=MANIFEST_VERSION)
        return out


@dataclass
class PrepareSummary:
    cache: str
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    n_clips: dict[str, int] = field(default_factory=dict)  # per split
    warnings: list[str] = field(default_factory=list)  # about the splits
    seconds: float = 0.0
    elapsed: float = 0.0

    def lines(self) -> list[str]:
        out = [f"feature cache {self.cache}: {len(self.computed)} files computed, "
               f"{len(self.reused)} unchanged, {len(self.skipped)} skipped, {len(self.removed)} removed; "
               + " + ".join(f"{self.n_clips.get(split, 0)} {split}" for split in SPLITS)
               + f" clips ({self.seconds / 60:.1f} min) in {self.elapsed:.1f} s"]
        out += [f"  skipped {path}: {reason}" for path, reason in sorted(self.skipped.items())]
        out += [f"  warning: {warning}" for warning in self.warnings]
        return out




def keep_mask(loudness_db: np.ndarray, silence_db: float, min_silence_frames: int) -> np.ndarray:
    """True for frames to keep: all but runs of >= `min_silence_frames` silent frames."""
    silent = np.concatenate([[False], loudness_db < silence_db, [False]])
    edges = np.flatnonzero(np.diff(silent.astype(np.int8)))
    keep = np.ones(len(loudness_db), dtype=bool)
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start >= min_silence_frames:
            keep[start:stop] = False
    return keep


def process_file(source: SourceFile, cfg: PrepareConfig, audio_bytes: bytes,
                 annotation_bytes: bytes | None) -> dict[str, np.ndarray]:
    """One file to clip arrays: audio [n, 64000], f0_hz/voicing/loudness_db [n, 400]."""
    torch.set_num_threads(1)
    audio = load_audio(source.path, data=audio_bytes)
    frames = len(audio) // HOP_LENGTH
    audio = audio[: frames * HOP_LENGTH]
    if source.annotation is not None:
        f0, voicing = annotation_on_frames(*read_mdb_annotation(source.annotation, annotation_bytes), frames)
    else:
        f0, voicing = crepe_pitch(audio, cfg.crepe_model, cfg.crepe_batch_size, progress=False)
    loudness = a_weighted_loudness(torch.from_numpy(audio)).numpy()
    keep = keep_mask(loudness, cfg.silence_db, int(round(cfg.min_silence_ms / 10)))
    blocks = audio.reshape(frames, HOP_LENGTH)[keep]
    n_clips = len(blocks) // CLIP_FRAMES
    if n_clips == 0:
        raise AudioError(source.path, f"has {len(blocks) / 100:.2f} s of sound after removing silences, "
                                      f"shorter than one {CLIP_SAMPLES / SAMPLE_RATE:.0f} s clip")
    used = n_clips * CLIP_FRAMES
    clips = blocks[:used].reshape(n_clips, CLIP_SAMPLES)
    return {
        "audio": clips,
        "f0_hz": f0[keep][:used].reshape(n_clips, CLIP_FRAMES),
        "voicing": voicing[keep][:used].reshape(n_clips, CLIP_FRAMES),
        "loudness_db": a_weighted_loudness(torch.from_numpy(clips)).numpy(),
    }


def _process_or_reason(source, cfg, audio_bytes, annotation_bytes):
    """Ray task body: arrays, or the AudioError's problem as a string (a bad file is data). A
    remote source's task reads its own file from the store (no bytes through the driver)."""
    try:
        if source.remote:
            audio_bytes = Location(source.path).read_bytes()
            annotation_bytes = Location(source.annotation).read_bytes() if source.annotation else None
            if audio_bytes is None:
                raise AudioError(source.path, "is gone from the store")
        return process_file(source, cfg, audio_bytes, annotation_bytes)
    except AudioError as err:
        return err.problem


@dataclass
class CacheUpdate:
    """One `prepare` run's changes to a cache: the manifest's entries kept, the files skipped and
    the summary, with the manifest written after every finished file."""
    cache: Location
    source: str
    cfg: PrepareConfig
    entries: dict = field(default_factory=dict)  # source file -> its manifest entry
    skipped: dict = field(default_factory=dict)  # source file -> {"reason", "sha256"}
    summary: PrepareSummary = field(init=False)

    def __post_init__(self):
        self.summary = PrepareSummary(self.cache.uri)

    @classmethod
    def start(cls, cache: Location, source: str, cfg: PrepareConfig, files: list[SourceFile]) -> "CacheUpdate":
        """What the cache holds of `files` with these parameters; entries of vanished files removed."""
        manifest = read_manifest(cache) or {}
        same = manifest.get("params") == cfg.params()
        current = {f.key for f in files}
        update = cls(cache, source, cfg, manifest.get("files", {}) if same else {},
                     {rel: item for rel, item in (manifest.get("skipped", {}) if same else {}).items() if rel in current})
        for rel in sorted(set(update.entries) - current):
            (cache / "files" / update.entries.pop(rel)["dir"]).delete()
            update.summary.removed.append(rel)
        return update

    def todo(self, files: list[SourceFile]) -> list[tuple[str, SourceFile, str]]:
        """(key, file, content hash) of every file to compute; unchanged ones are counted reused,
        known bad ones listed again, ones whose annotation is missing skipped."""
        todo = []
        for rel, src in {f.key: f for f in files}.items():
            if src.annotation is not None and not (Location(src.annotation).exists() if src.remote
                                                   else Path(src.annotation).is_file()):
                self.skipped[rel] = {"reason": f"annotation {posixpath.basename(str(src.annotation))} is missing",
                                     "sha256": None}
                self.entries.pop(rel, None)
                continue
            digest = (hashlib.sha256(src.stamp.encode()).hexdigest() if src.remote
                      else sha256_of(src.path, src.annotation))
            entry = self.entries.get(rel)
            if entry and entry["sha256"] == digest and (self.cache / "files" / entry["dir"]).exists():
                self.summary.reused.append(rel)
            elif self.skipped.get(rel, {}).get("sha256") != digest:  # known bad and unchanged: not recomputed
                todo.append((rel, src, digest))
        return todo

    def record(self, rel: str, src: SourceFile, digest: str, result) -> None:
        """Keep one task's result: its arrays written into the cache, or the reason it was skipped."""
        if isinstance(result, str):
            self.skipped[rel] = {"reason": result, "sha256": digest}
            old = self.entries.pop(rel, None)
            if old:
                (self.cache / "files" / old["dir"]).delete()
        else:
            name = f"{src.name.split('.')[0][:60]}-{digest[:10]}"
            arrays = write_arrays(self.cache, name, result)
            old = self.entries.get(rel)
            if old and old["dir"] != name:
                (self.cache / "files" / old["dir"]).delete()
            self.entries[rel] = {"sha256": digest, "song": src.song, "dir": name, "arrays": arrays,
                                 "n_clips": int(result["audio"].shape[0])}
            self.skipped.pop(rel, None)
            self.summary.computed.append(rel)
        self.save_manifest()

    def save_manifest(self) -> None:
        """The manifest of what is kept now, with the split of its songs (the commit)."""
        cfg, entries = self.cfg, self.entries
        songs = sorted({e["song"] for e in entries.values()})
        splits = assign_splits(songs, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed, cfg.split_file)
        clips_per_song: dict[str, int] = {}
        for entry in entries.values():
            entry["split"] = splits[entry["song"]]
            clips_per_song[entry["song"]] = clips_per_song.get(entry["song"], 0) + entry["n_clips"]
        write_manifest(self.cache, {
            "version": MANIFEST_VERSION, "source": str(self.source), "params": cfg.params(),
            "splits": {**{name: getattr(cfg, name) for name in SPLIT_FIELDS},
                       **{split: sorted(s for s in songs if splits[s] == split) for split in SPLITS}},
            "split_warnings": split_warnings(splits, clips_per_song), "files": entries, "skipped": self.skipped})

    def finish(self, started: float) -> PrepareSummary:
        """The summary, from the manifest as written; DataError when no file was usable."""
        summary = self.summary
        summary.skipped = {rel: item["reason"] for rel, item in self.skipped.items()}
        final = read_manifest(self.cache)
        for entry in final["files"].values():
            summary.n_clips[entry["split"]] = summary.n_clips.get(entry["split"], 0) + entry["n_clips"]
        summary.warnings = final.get("split_warnings", [])
        summary.seconds = sum(summary.n_clips.values()) * CLIP_SAMPLES / SAMPLE_RATE
        summary.elapsed = time.time() - started
        if not final["files"]:
            raise DataError(f"{self.source}: no usable file; " +
                            "; ".join(f"{k}: {v}" for k, v in summary.skipped.items()))
        return summary


def compute(update: CacheUpdate, todo: list, address: str | None, num_cpus: int | None, progress: bool) -> None:
    """One Ray task per file (at most two per CPU in flight), each result kept as it arrives."""
    from diffcraft.raytools import forwarded_env, ray_session

    with ray_session(address, num_cpus) as ray:
        # the store's endpoint and keys reach the tasks even on a Ray started before they were set
        task = ray.remote(num_cpus=1, max_retries=1)(_process_or_reason).options(
            runtime_env={"env_vars": forwarded_env()})
        max_in_flight = max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
        pending, queue = {}, list(todo)
        bar = tqdm(total=len(todo), desc="prepare", unit="file", disable=not progress)
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                rel, src, digest = queue.pop(0)
                if src.remote:
                    ref = task.remote(src, update.cfg, None, None)
                else:
                    ann = src.annotation.read_bytes() if src.annotation else None
                    ref = task.remote(src, update.cfg, src.path.read_bytes(), ann)
                pending[ref] = (rel, src, digest)
            done, _ = ray.wait(list(pending), num_returns=1)
            update.record(*pending.pop(done[0]), ray.get(done[0]))
            bar.update(1)
            bar.set_postfix(skipped=len(update.skipped))
        bar.close()


def prepare(source: str | Path, cache: str | Path, cfg: PrepareConfig | None = None,
            address: str | None = None, num_cpus: int | None = None, stems=None, instruments=None,
            metadata_dir=None, progress: bool = True) -> PrepareSummary:
    """Build or update the feature cache at `cache` from `source`; see the module docstring."""
    started = time.time()
    cfg = cfg or PrepareConfig()
    cfg.validate()
    source, cache = str(source), Location.of(str(cache))
    if not is_remote(source):
        source = str(Path(source).resolve())
    files = discover(source, stems, instruments, metadata_dir)
    if cfg.split_file:  # refused before anything is computed
        assign_splits(sorted({f.song for f in files}), 0, 0, split_file=cfg.split_file)
    remove_leftovers(cache)
    update = CacheUpdate.start(cache, source, cfg, files)
    todo = update.todo(files)
    if todo:
        compute(update, todo, address, num_cpus, progress)
    update.save_manifest()
    return update.finish(started)

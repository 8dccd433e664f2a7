"""Where audio and its pitch labels come from: MDB-stem-synth, or any folder of audio files.

A source is a list of SourceFile: the audio, the song it belongs to (train/validation are split
by song, never by stem, since stems of one song are parts of one piece), and an annotation file
when the dataset ships ground-truth F0 (otherwise CREPE labels it).
"""
from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.errors import AudioError, DataError

STEM_PATTERN = re.compile(r"^(?P<song>.+)_STEM_(?P<stem>\d+)\.RESYN$")
AUDIO_SUFFIXES = {"." + fmt.lower() for fmt in sf.available_formats()} | {".aif", ".oga", ".opus"}


@dataclass(frozen=True)
class SourceFile:
    path: Path | str  # the audio file: a local path, or a URI that Ray workers read themselves
    song: str  # split group
    annotation: Path | str | None = None  # MDB csv with exact F0, or None for CREPE labels
    key: str = ""  # the path relative to the source root: the file's name in the manifest
    stamp: str = ""  # a remote file's identity (sizes and modification times), hashed without reading it

    @property
    def remote(self) -> bool:
        return isinstance(self.path, str)

    @property
    def name(self) -> str:
        return posixpath.basename(str(self.path))


def is_mdb_stem_synth(root: Path) -> bool:
    return (Path(root) / "audio_stems").is_dir() and (Path(root) / "annotation_stems").is_dir()


def _instrument_map(metadata_dir: Path) -> dict[str, str]:
    """Track id (<Artist>_<Song>_STEM_<NN>) -> instrument, from MedleyDB *_METADATA.yaml files."""
    mapping = {}
    for meta_path in sorted(Path(metadata_dir).glob("*_METADATA.yaml")):
        song = meta_path.name[: -len("_METADATA.yaml")]
        try:
            meta = yaml.safe_load(meta_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{meta_path}: not valid YAML: {err}") from None
        for stem_key, stem in (meta.get("stems") or {}).items():
            number = int(str(stem_key).lstrip("Ss"))
            mapping[f"{song}_STEM_{number:02d}"] = str((stem or {}).get("instrument", ""))
    return mapping


def _wanted_tracks(stems, instruments, meta_dir: Path) -> set[str] | None:
    """Track ids selected by stem id and/or instrument (None: every track)."""
    wanted = None
    if instruments:
        if not meta_dir.is_dir():
            raise DataError(f"{meta_dir}: selecting by instrument needs MedleyDB metadata files here")
        names = {i.lower() for i in instruments}
        wanted = {track for track, inst in _instrument_map(meta_dir).items() if inst.lower() in names}
    if stems:
        wanted = set(stems) if wanted is None else wanted & set(stems)
    return wanted


def _mdb_stems(audio_names, wanted: set[str] | None) -> list[tuple[str, str, str]]:
    """(audio file name, track id, song) of the wanted `*.RESYN.wav` stems among `audio_names`."""
    found = []
    for name in sorted(audio_names):
        match = STEM_PATTERN.match(name[: -len(".wav")]) if name.endswith(".RESYN.wav") else None
        if match is None:
            continue
        track = f"{match['song']}_STEM_{match['stem']}"
        if wanted is None or track in wanted:
            found.append((name, track, match["song"]))
    return found


def mdb_stem_synth(root: str | Path, stems: list[str] | None = None,
                   instruments: list[str] | None = None,
                   metadata_dir: str | Path | None = None) -> list[SourceFile]:
    """Files of an MDB-stem-synth tree, optionally only the named stems or instruments.

    `stems` are track ids such as `MusicDelta_Pachelbel_STEM_01`; `instruments` (e.g. violin)
    need MedleyDB metadata files in `metadata_dir` (default: root/metadata).
    """
    root = Path(root)
    if not is_mdb_stem_synth(root):
        raise DataError(f"{root}: not an MDB-stem-synth tree (needs audio_stems/ and annotation_stems/)")
    wanted = _wanted_tracks(stems, instruments, Path(metadata_dir) if metadata_dir else root / "metadata")
    files = [SourceFile(root / "audio_stems" / name, song, root / "annotation_stems" / f"{track}.RESYN.csv",
                        key=f"audio_stems/{name}")
             for name, track, song in _mdb_stems([p.name for p in (root / "audio_stems").glob("*.RESYN.wav")], wanted)]
    if not files:
        raise DataError(f"{root}: no stems matched (stems={stems}, instruments={instruments})")
    return files


def remote_source(uri: str, stems=None, instruments=None, metadata_dir=None) -> list[SourceFile]:
    """The same two layouts in an object store, found by listing it: the files stay there and each
    Ray task reads its own (MedleyDB metadata for `instruments` comes from a local folder)."""
    from diffcraft.storage import Location

    root = Location.of(uri)
    listing = root.list_info()
    stamp = lambda *keys: "|".join(f"{k}:{listing[k][0]}:{listing[k][1]}" for k in keys if k in listing)  # noqa: E731
    audio_names = [k.split("/", 1)[1] for k in listing if k.startswith("audio_stems/") and k.count("/") == 1]
    if audio_names and any(k.startswith("annotation_stems/") for k in listing):
        if instruments and not metadata_dir:
            raise DataError(f"{uri}: selecting by instrument in an object store needs --metadata FOLDER (local)")
        wanted = _wanted_tracks(stems, instruments, Path(metadata_dir or "."))
        files = []
        for name, track, song in _mdb_stems(audio_names, wanted):
            key, ann = f"audio_stems/{name}", f"annotation_stems/{track}.RESYN.csv"
            files.append(SourceFile(str(root / key), song, str(root / ann), key=key, stamp=stamp(key, ann)))
        if not files:
            raise DataError(f"{uri}: no stems matched (stems={stems}, instruments={instruments})")
        return files
    if stems or instruments:
        raise DataError(f"{uri}: stems and instruments can only be selected in an MDB-stem-synth tree")
    files = [SourceFile(str(root / key), posixpath.splitext(key)[0], key=key, stamp=stamp(key))
             for key in sorted(listing) if posixpath.splitext(key)[1].lower() in AUDIO_SUFFIXES]
    if not files:
        raise DataError(f"{uri}: no audio files found ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return files


def audio_folder(root: str | Path) -> list[SourceFile]:
    """Every audio file under `root` (recursively); each file is its own song."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    files = [SourceFile(p, p.relative_to(root).with_suffix("").as_posix(), key=p.relative_to(root).as_posix())
             for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    if not files:
        raise DataError(f"{root}: no audio files found ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return files


def discover(root: str | Path, stems=None, instruments=None, metadata_dir=None) -> list[SourceFile]:
    """MDB-stem-synth when the tree has its layout, else a folder of audio files; `root` may be a
    folder or an object-store URI."""
    from diffcraft.storage import is_remote

    if is_remote(str(root)):
        return remote_source(str(root), stems, instruments, metadata_dir)
    root = Path(root)
    if is_mdb_stem_synth(root):
        return mdb_stem_synth(root, stems, instruments, metadata_dir)
    if stems or instruments:
        raise DataError(f"{root}: stems and instruments can only be selected in an MDB-stem-synth tree")
    return audio_folder(root)


def read_mdb_annotation(path: Path, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(time_s [n], f0_hz [n]) from a header-less `time,f0` csv; f0 = 0 means unvoiced."""
    try:
        source = io.BytesIO(data) if data is not None else path
        table = np.loadtxt(source, delimiter=",", ndmin=2, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise AudioError(path, f"annotation is not a time,f0 csv ({err})") from None
    if table.shape[0] < 2 or table.shape[1] != 2:
        raise AudioError(path, f"annotation needs at least 2 rows of time,f0; got shape {table.shape}")
    return table[:, 0], table[:, 1]


def annotation_on_frames(time_s: np.ndarray, f0_hz: np.ndarray, n_frames: int,
                         hop_s: float = HOP_LENGTH / SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """Resample an annotation onto our frames (frame i at i * 10 ms).

    Voicing is the linearly interpolated voiced flag (a confidence in [0, 1]); F0 on voiced frames
    is interpolated in log-frequency between voiced annotation points; unvoiced frames get 0.
    """
    frame_t = np.arange(n_frames) * hop_s
    voiced = f0_hz > 0
    voicing = np.interp(frame_t, time_s, voiced.astype(np.float64), left=0.0, right=0.0)
    f0 = np.zeros(n_frames)
    if voiced.any():
        log_f0 = np.interp(frame_t, time_s[voiced], np.log2(f0_hz[voiced]))
        f0 = np.where(voicing >= 0.5, 2.0 ** log_f0, 0.0)
    return f0.astype(np.float32), voicing.astype(np.float32)

"""The feature-cache format, in one place: layout, manifest, atomic writes, hashes, and staging
onto a node's own disk.

```
CACHE/manifest.json                        what is in the cache (written last: the commit)
CACHE/files/<file>-<hash>/<array>.npy      float32 arrays of one source file's clips
```

`manifest.json` holds the parameters the arrays were computed with, and per source file its
content hash, song, split, clip count and each array's size and SHA-256. CACHE is a `Location`:
a folder, a shared mount or an object-store URI. Training reads a local copy: a remote cache is
staged onto the node's disk once per manifest (several trials on one node wait for one copy,
every file is verified against the manifest) and memory-mapped from there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from diffcraft.errors import DataError
from diffcraft.storage import Location, node_scratch

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
ARRAYS = ("audio", "f0_hz", "voicing", "loudness_db")


def sha256_of(*paths: Path | None) -> str:
    """One content hash over files (streamed; None stands for an absent file)."""
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\x00")
    return digest.hexdigest()


def read_manifest(cache: Location) -> dict | None:
    """The manifest, or None when there is no cache at `cache`."""
    text = (cache / MANIFEST).read_text()
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{cache / MANIFEST}: corrupt manifest ({err}); delete the cache to rebuild") from None


def require_manifest(cache: Location) -> dict:
    manifest = read_manifest(cache)
    if manifest is None:
        raise DataError(f"{cache}: no feature cache here (build one with `diffcraft data prepare`)")
    return manifest


def write_manifest(cache: Location, manifest: dict) -> None:
    (cache / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _array_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def write_arrays(cache: Location, name: str, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Write one file's arrays into files/<name>/ as a whole or not at all (a local folder is
    filled beside its target and renamed; objects only count once the manifest names them).
    Returns each array's size and SHA-256 for the manifest."""
    blobs = {key: _array_bytes(arrays[key]) for key in ARRAYS}
    record = {key: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for key, b in blobs.items()}
    folder = cache / "files" / name
    local = folder.local_path()
    if local is None:
        for key, blob in blobs.items():
            (folder / f"{key}.npy").write_bytes(blob)
        return record
    tmp = local.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, blob in blobs.items():
        (tmp / f"{key}.npy").write_bytes(blob)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return record


def remove_leftovers(cache: Location) -> None:
    """Half-written folders of an interrupted run (local caches; in a store they are unnamed)."""
    local = cache.local_path()
    if local is not None and (local / "files").is_dir():
        for stale in (local / "files").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _verify(folder: Path, entry: dict, where: str) -> None:
    for key, expected in entry.get("arrays", {}).items():
        path = folder / f"{key}.npy"
        if not path.is_file() or path.stat().st_size != expected["bytes"] \
                or hashlib.sha256(path.read_bytes()).hexdigest() != expected["sha256"]:
            raise DataError(f"{where}/files/{entry['dir']}/{key}.npy: the copy does not match the manifest "
                            "(changed while staging, or corrupt in the store)")


def local_cache(location: str) -> Path:
    """A local folder holding the cache at `location`: the folder itself for a local cache,
    else a verified copy on this node's disk, made once per manifest and shared by every
    process on the node (they wait on a file lock while one copies)."""
    cache = Location.of(location)
    manifest_text = (cache / MANIFEST).read_text()
    if manifest_text is None:
        raise DataError(f"{cache}: no feature cache here (build one with `diffcraft data prepare`)")
    if not cache.remote:
        return Path(cache.uri)
    key = hashlib.sha256(manifest_text.encode()).hexdigest()[:20]
    root = node_scratch("caches")
    target = root / key
    if (target / MANIFEST).is_file():
        return target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MANIFEST).is_file():  # another process staged it while we waited
            return target
        tmp = root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = json.loads(manifest_text)
        for entry in manifest["files"].values():
            (cache / "files" / entry["dir"]).download(tmp / "files" / entry["dir"])
            _verify(tmp / "files" / entry["dir"], entry, cache.uri)
        (tmp / MANIFEST).write_text(manifest_text)  # last: its presence marks a whole copy
        os.replace(tmp, target)
    return target

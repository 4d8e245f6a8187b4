"""The image store: a folder's images decoded once, at the run's side, into memory-mapped files.

Photos come in every size and shape and in any number; decoding them whole at every run, and
holding them in memory, costs minutes and gigabytes. The store decodes each file once (JPEGs at
a reduced scale, turned upright by their EXIF orientation) into fixed-size rows of files on
disk, which every run then maps: the pages are the system's file cache, shared by every process
on the machine (torchrun's included) and given back under pressure, so a run's own (anonymous)
memory does not grow with the number of images.

A store is a folder, ``<data>/.selfsup/<split>-<side>/`` (or, where the data folder cannot be
written, the same under ``$XDG_CACHE_HOME/selfsup/stores/``), holding:

- ``centre.u8``: (N, 3, S, S) each image's centred square of its shorter side, resized to S:
  what evaluation, ``embed`` and ``predict`` see;
- ``frames.u8`` and ``shapes.i16`` (photos of many shapes only): (N, 3, F, F) each whole image,
  its shorter side S (its longer at most F), at the top-left of the frame, and (N, 2) its
  height and width there: what pretraining crops;
- ``state.u8``: (N,) 0 not decoded yet, 1 decoded, 2 unreadable (``bad.txt`` says why); once
  every file is done, the decoded rows are moved up over the unreadable ones, and ``kept.npy``
  says which file each row is;
- ``index.json``: the key (a digest of every file's path, size and modification time, the sides
  and the layout's version), the count, how many files are done, and the rows.

Preparation is resumable (a chunk at a time, the count written after the rows), rebuilt when
any file changes, and reused by the next run of the same folder and side; the first process to
take the store's lock builds it while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.errors import DataError
from selfsup.files import atomic_write_text, folder_lock

VERSION = 1  # of the layout; a store of another version is rebuilt
# (path, side, frame) -> an object with ``array`` (3, side, side) uint8 or None when the file
# cannot be read, ``why`` it cannot, and with a frame: ``frame`` (3, frame, frame) and ``shape``
Decode = Callable[[Path, int, int], Any]
CHUNK = 256  # files decoded between two writes of the count


@dataclass
class Stored:
    """A store's rows, mapped: the centre crops, the framed images (or None) with their
    shapes, the indices of the files that decoded, and what the others were."""

    centre: torch.Tensor  # (K, 3, S, S) uint8
    frames: torch.Tensor | None  # (K, 3, F, F) uint8
    shapes: torch.Tensor | None  # (K, 2) int64
    kept: list[int]
    bad: list[str]
    folder: Path
    built: bool  # decoded now (False: reused as it was)


def _key(paths: list[Path], root: Path, side: int, frame: int) -> str:
    """A digest of what the store holds: every file's path (under ``root``), size and
    modification time, and the sides."""
    h = hashlib.sha256(f"{VERSION} {side} {frame}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(os.fsencode(os.path.relpath(p, root)))  # any name the system allows
        h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def location(root: Path, split: str, side: int) -> Path:
    """Where the store of ``root``'s ``split`` at ``side`` px lives: beside the data, or in the
    user's cache when the data folder cannot be written."""
    beside = root / ".selfsup"
    name = f"{split}-{side}"
    if _writable(beside):
        return beside / name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache / "selfsup" / "stores" / f"{root.name}-{digest}" / name


def _maps(folder: Path, n: int, side: int, frame: int, mode: str
          ) -> tuple[np.memmap, np.memmap | None, np.memmap | None, np.memmap]:
    """The store's four arrays, mapped with ``mode`` (``w+`` creates them)."""
    def m(name: str, dtype: type, shape: tuple[int, ...]) -> np.memmap:
        return np.memmap(folder / name, dtype=dtype, mode=mode, shape=shape)  # type: ignore[call-overload, no-any-return]

    centre = m("centre.u8", np.uint8, (n, 3, side, side))
    frames = m("frames.u8", np.uint8, (n, 3, frame, frame)) if frame else None
    shapes = m("shapes.i16", np.int16, (n, 2)) if frame else None
    return centre, frames, shapes, m("state.u8", np.uint8, (n,))


def _read_index(folder: Path) -> dict[str, object]:
    try:
        return dict(json.loads((folder / "index.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _build(paths: list[Path], folder: Path, side: int, frame: int, key: str, start: int,
           decode: Decode, show: bool) -> None:
    """Decode ``paths[start:]`` into the store, a chunk at a time, on all cores."""
    from PIL import Image

    n = len(paths)
    centre, frames, shapes, state = _maps(folder, n, side, frame, "r+" if start else "w+")
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=start, unit="img", file=sys.stderr, mininterval=1.0,
                   desc=f"preparing {folder.name}", dynamic_ncols=True)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        # Pillow warns of large images as it opens them; the pixel limit decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for lo in range(start, n, CHUNK):
            hi = min(n, lo + CHUNK)
            reasons = []
            decoded = pool.map(lambda p: decode(p, side, frame), paths[lo:hi])
            for i, d in zip(range(lo, hi), decoded, strict=True):
                if d.array is None:
                    state[i] = 2
                    reasons.append(f"{paths[i]} ({d.why})")
                    continue
                centre[i] = d.array
                if frames is not None and shapes is not None:
                    frames[i] = d.frame
                    shapes[i] = d.shape
                state[i] = 1
            for a in (centre, frames, shapes, state):
                if a is not None:
                    a.flush()
            if reasons:
                with open(folder / "bad.txt", "a", encoding="utf-8",
                          errors="surrogateescape") as f:
                    f.write("".join(r.replace("\n", " ") + "\n" for r in reasons))
            atomic_write_text(json.dumps(dict(key=key, count=n, side=side, frame=frame,
                                              done=hi)), folder / "index.json")
            if bar is not None:
                bar.update(hi - lo)
    if bar is not None:
        bar.close()
    _compact(folder, n, side, frame, key)


def _compact(folder: Path, n: int, side: int, frame: int, key: str) -> None:
    """Move the decoded rows up over the unreadable ones, a chunk at a time (each row moves
    up or stays, and a chunk is read before it is written), so that every run maps the rows
    themselves; ``kept.npy`` says which file each row is. Marked in the index first: a store
    left half-compacted is rebuilt."""
    centre, frames, shapes, state = _maps(folder, n, side, frame, "r+")
    kept = np.flatnonzero(np.asarray(state) == 1)
    index = dict(key=key, count=n, side=side, frame=frame, done=n, rows=len(kept))
    if len(kept) < n:
        atomic_write_text(json.dumps({**index, "done": 0}), folder / "index.json")
        for a in (centre, frames, shapes):
            if a is None:
                continue
            for lo in range(0, len(kept), CHUNK):
                hi = min(len(kept), lo + CHUNK)
                a[lo:hi] = a[kept[lo:hi]]
            a.flush()
    np.save(folder / "kept.npy", kept)
    atomic_write_text(json.dumps(index), folder / "index.json")


def open_store(paths: list[Path], root: Path, split: str, side: int, frame: int,
               decode: Decode, show: bool = True) -> Stored:
    """The store of ``paths`` (the files of ``root``'s ``split``, in order) at ``side`` px
    (and frames of ``frame`` px; 0: none), each file read by ``decode``: reused when its key
    matches and it is complete, resumed when it matches and is not, built anew otherwise.

    Raises:
        DataError: the store cannot be written.
    """
    folder = location(root, split, side)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder):
            key = _key(paths, root, side, frame)
            index = _read_index(folder)
            done = int(index.get("done", 0)) if index.get("key") == key else 0  # type: ignore[call-overload]
            built = done < len(paths)
            if built:
                if not done:
                    (folder / "bad.txt").unlink(missing_ok=True)
                if show:
                    what = "resuming" if done else "decoding"
                    print(f"image store {folder}: {what} {len(paths) - done} of {len(paths)} "
                          f"images at {side} px{f' (frames of {frame} px)' if frame else ''}, "
                          f"once; later runs reuse it", flush=True)
                _build(paths, folder, side, frame, key, done, decode, show)
    except OSError as e:
        raise DataError(f"cannot write the image store at {folder}: "
                        f"{e.strerror or e}") from None
    rows = int(_read_index(folder)["rows"])  # type: ignore[call-overload]
    bad_file = folder / "bad.txt"
    bad = bad_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines() \
        if bad_file.exists() else []
    if not rows:  # not one file decoded: nothing to map
        return Stored(torch.empty((0, 3, side, side), dtype=torch.uint8), None, None, [], bad,
                      folder, built)
    centre, frames, shapes, _ = _maps(folder, rows, side, frame, "c")
    return Stored(torch.from_numpy(centre), None if frames is None else torch.from_numpy(frames),
                  None if shapes is None else torch.from_numpy(np.asarray(shapes, np.int64)),
                  np.load(folder / "kept.npy").tolist(), bad, folder, built)

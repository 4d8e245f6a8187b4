"""Folders of photo-sized images for the benchmarks of issue 30, and a memory watch.

    python benchmarks/photos.py make --source /work/data/cifar10-jpg --out /work/data/photos23k \
        --train 2000 --test 300
    python benchmarks/photos.py make --source /work/data/cifar10-jpg --out /work/data/photos100k \
        --flat 100000
    python benchmarks/photos.py watch -- selfsup run --dataset folder --data-dir ...
    python benchmarks/photos.py frames /work/data/photos23k/.selfsup/train-32

``make`` turns each CIFAR-10 image (the JPEG copy, 32 px) into a photo: its centre cut to one of
the shapes 4:3, 3:4, 16:9, 1:1 and 3:2, scaled up to 480-1024 px on the long side; JPEG, with
one in twenty PNG, one in ten grey, one in ten stored turned a quarter with an EXIF orientation
tag (as phones store them). Labels are CIFAR-10's (``--train``/``--test`` per class, in
``train/<class>/`` and ``test/<class>/``), or none (``--flat N``: N images in sub-folders of
1,000, the CIFAR images reused in turn).

``watch`` runs a command and samples its memory every 0.2 s (the process and its children, from
/proc): peak anonymous memory (RssAnon: what the process itself holds) and peak resident memory
(RssAnon + RssFile + RssShmem: mapped files included), and the wall time; with
``WATCH_TRACE=FILE``, every sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

SHAPES = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2))  # width : height


def photo(src: Path, dest: Path, k: int) -> int:
    """Write photo number ``k`` made from ``src``; returns its size in bytes."""
    from PIL import Image

    rng = np.random.default_rng(k)
    w, h = SHAPES[k % len(SHAPES)]
    long_side = int(rng.integers(480, 1025))
    im = Image.open(src).convert("RGB")  # 32 x 32
    cw, ch = (32, round(32 * h / w)) if w >= h else (round(32 * w / h), 32)
    im = im.crop(((32 - cw) // 2, (32 - ch) // 2, (32 - cw) // 2 + cw, (32 - ch) // 2 + ch))
    size = (long_side, round(long_side * h / w)) if w >= h else (round(long_side * w / h),
                                                                  long_side)
    im = im.resize(size, Image.Resampling.BICUBIC)
    if k % 10 == 3:
        im = im.convert("L")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if k % 20 == 7:
        dest = dest.with_suffix(".png")
        im.save(dest)
    elif k % 10 == 5:  # stored turned, with the tag that turns it upright
        turned = 6 if k % 20 == 5 else 8
        exif = Image.Exif()
        exif[0x0112] = turned
        im = im.transpose(Image.Transpose.ROTATE_90 if turned == 6 else Image.Transpose.ROTATE_270)
        im.save(dest, quality=90, exif=exif.tobytes())
    else:
        im.save(dest, quality=90)
    return dest.stat().st_size


def _job(args: tuple[str, str, int]) -> int:
    return photo(Path(args[0]), Path(args[1]), args[2])


def make(source: Path, out: Path, train: int, test: int, flat: int) -> None:
    jobs: list[tuple[str, str, int]] = []
    classes = sorted(d.name for d in (source / "train").iterdir() if d.is_dir())
    if flat:
        pool_files = sorted((source / "train").glob("*/*.jpg")) + \
            sorted((source / "test").glob("*/*.jpg"))
        for k in range(flat):
            src = pool_files[k % len(pool_files)]
            jobs.append((str(src), str(out / f"{k // 1000:04d}" / f"{k:07d}.jpg"), k))
    else:
        k = 0
        for split, n in (("train", train), ("test", test)):
            for c in classes:
                for src in sorted((source / split / c).glob("*.jpg"))[:n]:
                    jobs.append((str(src), str(out / split / c / f"{src.stem}.jpg"), k))
                    k += 1
    t0 = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_job, jobs, chunksize=64)
    print(f"{len(jobs)} photos, {sum(sizes) / 1e6:.0f} MB, in {time.perf_counter() - t0:.0f} s "
          f"at {out}")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


def watch(command: list[str]) -> None:
    """Run ``command``; print its peaks; write every sample (seconds, anonymous and resident
    bytes) to ``$WATCH_TRACE`` when set."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    anon = total = 0
    trace = open(os.environ["WATCH_TRACE"], "w") if os.environ.get("WATCH_TRACE") else None
    while proc.poll() is None:
        now = [_status(p) for p in (proc.pid, *_children(proc.pid))]
        a, t = sum(s.get("RssAnon", 0) for s in now), sum(sum(s.values()) for s in now)
        anon, total = max(anon, a), max(total, t)
        if trace is not None:
            trace.write(f"{time.perf_counter() - t0:.1f} {a} {t}\n")
        time.sleep(0.2)
    if trace is not None:
        trace.close()
    print(f"watch: exit {proc.returncode}, {time.perf_counter() - t0:.1f} s, peak anonymous "
          f"{anon / 2**30:.2f} GiB, peak resident {total / 2**30:.2f} GiB", flush=True)
    sys.exit(proc.returncode)


def frames(store: Path, batch: int, view: int, rounds: int = 40) -> None:
    """Time a step's reading of ``batch`` random images from an image store (frames and shapes,
    as pretraining gathers them), and the augmentation of two views of them at ``view`` px
    from frames of the store's side, of the image side (a square set) and in between."""
    import json

    import torch

    from selfsup.augment import AugmentParams, augment

    index = json.loads((store / "index.json").read_text())
    n, f, s = index["rows"], index["frame"], index["side"]
    fr = torch.from_numpy(np.memmap(store / "frames.u8", np.uint8, "c", shape=(n, 3, f, f)))
    sh = torch.from_numpy(np.memmap(store / "shapes.i16", np.int16, "c", shape=(n, 2))
                          .astype(np.int64))
    g = torch.Generator().manual_seed(0)

    def mean_ms(fn: object) -> float:
        ts = []
        for _ in range(rounds):
            idx = torch.randperm(n, generator=g)[:batch]
            t0 = time.perf_counter()
            fn(idx)  # type: ignore[operator]
            ts.append(time.perf_counter() - t0)
        return 1000 * sum(ts[rounds // 4:]) / len(ts[rounds // 4:])

    print(f"{torch.get_num_threads()} threads; store {store}: {n} images, side {s}, frames {f}")
    print(f"read {batch} frames and shapes: {mean_ms(lambda i: (fr[i], sh[i])):.1f} ms")
    p = AugmentParams(out_size=view, scale=(0.2, 1.0))
    for side in sorted({s, (s + f) // 2, f}):
        x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
        shapes = sh.clamp(max=side) if side > s else None
        ms = mean_ms(lambda i, x=x, shapes=shapes: augment(
            x[i], p, g, views=2, shape=None if shapes is None else shapes[i]))
        print(f"augment 2 views of {batch} at {view} px from {side} px frames: {ms:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--source", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--train", type=int, default=2000, help="per class")
    m.add_argument("--test", type=int, default=300, help="per class")
    m.add_argument("--flat", type=int, default=0, help="this many unlabeled photos instead")
    w = sub.add_parser("watch")
    w.add_argument("command", nargs=argparse.REMAINDER)
    f = sub.add_parser("frames")
    f.add_argument("store", type=Path)
    f.add_argument("--batch", type=int, default=512)
    f.add_argument("--view", type=int, default=20)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.source, a.out, a.train, a.test, a.flat)
    elif a.cmd == "frames":
        frames(a.store, a.batch, a.view)
    else:
        watch([c for c in a.command if c != "--"] if a.command[:1] == ["--"] else a.command)


if __name__ == "__main__":
    main()

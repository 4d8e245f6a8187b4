"""What the tests share: small data sets written in the real on-disk formats, the digits run's
options, runs of torchrun, a real Ctrl-C in the middle of a step, the README's commands. Test
modules import from here (never from each other); ``conftest.py`` holds the fixtures."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from selfsup.methods import METHODS

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _batch_bytes(rng: np.random.Generator, n: int, name: str) -> bytes:
    labels = [int(i % 10) for i in range(n)]
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    # Make classes learnable: each class brightens one band of rows.
    imgs = data.reshape(n, 3, 32, 32)
    for i, c in enumerate(labels):
        imgs[i, :, 3 * c:3 * c + 3, :] = 255
    d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(d, protocol=2)


def cifar_files(n_per_batch: int = 20, seed: int = 0) -> dict[str, bytes]:
    """The files of the CIFAR-10 python release, in its format, with random small batches."""
    rng = np.random.default_rng(seed)
    files = {f"data_batch_{i}": _batch_bytes(rng, n_per_batch, f"training batch {i} of 5")
             for i in range(1, 6)}
    files["test_batch"] = _batch_bytes(rng, n_per_batch, "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": n_per_batch,
         b"num_vis": 3072}, protocol=2)
    return files


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_gz(files: dict[str, bytes], folder: str) -> bytes:
    """A .tar.gz of ``files`` under ``folder/``, as the releases are packed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _digests(monkeypatch: pytest.MonkeyPatch, module: object, table: str,
             files: dict[str, bytes]) -> None:
    """Set ``module.<table>`` (a release's published MD5s) to the digests of those ``files``
    it lists: the generated files pass the readers' checks."""
    current = getattr(module, table)
    monkeypatch.setattr(module, table, {**current, **{n: md5(c) for n, c in files.items()
                                                      if n in current}})


def release_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: object, table: str,
                   folder: str, files: dict[str, bytes]) -> Path:
    """A data folder holding ``files`` extracted in ``folder/``, the MD5 table set to match."""
    (tmp_path / "data" / folder).mkdir(parents=True)
    for name, content in files.items():
        (tmp_path / "data" / folder / name).write_bytes(content)
    _digests(monkeypatch, module, table, files)
    return tmp_path / "data"


def release_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: object, table: str,
                    archive: str, folder: str, files: dict[str, bytes]) -> Path:
    """A data folder holding only ``archive``, a .tar.gz of ``files`` under ``folder/``; the
    MD5 table set to match the archive and the files it lists."""
    blob = tar_gz(files, folder)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / archive).write_bytes(blob)
    _digests(monkeypatch, module, table, {**files, archive: blob})
    return tmp_path / "data"


def cifar100_files(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, bytes]:
    """The files of the CIFAR-100 python release (``train``, ``test``, ``meta``) in its format:
    pickled dicts with the release's keys, 100 fine classes in 20 coarse ones (fine // 5)."""
    rng = np.random.default_rng(seed)

    def split(n: int, name: str) -> bytes:
        fine = [int(i % 100) for i in range(n)]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        imgs = data.reshape(n, 3, 32, 32)
        for i, c in enumerate(fine):  # learnable: coarse class c // 5 brightens a band of rows
            imgs[i, :, c // 5, :] = 255
        return pickle.dumps({b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                             b"batch_label": name.encode(), b"fine_labels": fine,
                             b"coarse_labels": [c // 5 for c in fine], b"data": data},
                            protocol=2)

    meta = {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}
    return {"train": split(n_train, "training batch 1 of 1"),
            "test": split(n_test, "testing batch 1 of 1"),
            "meta": pickle.dumps(meta, protocol=2)}


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]


def stl10_images(n: int, seed: int) -> np.ndarray:
    """(n, 3, 96, 96) uint8 images, image i of class i % 10 with a white row band (learnable)
    and a marker: pixel (row 1, column 2) of the red channel is 200, (row 2, column 1) is 0."""
    rng = np.random.default_rng(seed)
    x = rng.integers(30, 180, size=(n, 3, 96, 96), dtype=np.uint8)
    for i in range(n):
        c = i % 10
        x[i, :, 8 * c:8 * c + 8, :] = 255
    x[:, 0, 1, 2], x[:, 0, 2, 1] = 200, 0
    return x


def stl10_bin(x: np.ndarray) -> bytes:
    """Images (N, 3, H, W) as the release stores them: each channel in column-major order."""
    return np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes()


def stl10_files(n_train: int = 40, n_test: int = 20, n_unlabeled: int = 30) -> dict[str, bytes]:
    """The files of the STL-10 binary release, in its format, with a few images each."""
    folds = [" ".join(str((f + 4 * k) % n_train) for k in range(4)) for f in range(10)]
    return {
        "train_X.bin": stl10_bin(stl10_images(n_train, 0)),
        "train_y.bin": bytes(i % 10 + 1 for i in range(n_train)),  # 1-based, as released
        "test_X.bin": stl10_bin(stl10_images(n_test, 1)),
        "test_y.bin": bytes(i % 10 + 1 for i in range(n_test)),
        "unlabeled_X.bin": stl10_bin(stl10_images(n_unlabeled, 2)),
        "class_names.txt": ("\n".join(STL10_CLASSES) + "\n").encode(),
        "fold_indices.txt": (" \n".join(folds) + " \n").encode(),
    }


def write_images(folder: Path, n: int, size: int = 12, seed: int = 0, suffix: str = ".png",
                 color: int | None = None) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        if color is not None:
            arr[..., color % 3] = 255
        Image.fromarray(arr).save(folder / f"{i:03d}{suffix}")


def write_photo(path: Path, pixels: np.ndarray, gray: bool = False, turned: int = 0) -> None:
    """Save (H, W, 3) uint8 ``pixels`` as the file ``path`` (its suffix picks the format), as a
    camera would: ``gray`` as one channel; ``turned`` 6 or 8: stored turned a quarter (clockwise
    or not) with that EXIF orientation, so that only a reader that applies the tag sees the
    picture upright."""
    from PIL import Image

    im = Image.fromarray(pixels)
    if gray:
        im = im.convert("L")
    exif = Image.Exif()
    if turned:
        # orientation 6: the stored picture must turn 90 degrees clockwise to stand upright
        im = im.transpose(Image.Transpose.ROTATE_90 if turned == 6 else Image.Transpose.ROTATE_270)
        exif[0x0112] = turned
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, exif=exif.tobytes()) if turned else im.save(path)


PHOTO_SHAPES = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2))  # width : height


def photo_pixels(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 3) uint8: a picture of class ``label``: the upper half bright in one
    of ten colours, noise elsewhere (a picture with an up and a down, so that a sideways one
    reads differently)."""
    x = rng.integers(0, 120, size=(height, width, 3), dtype=np.uint8)
    colour = np.array([200, 130 + (label * 41) % 120, 250 - (label * 53) % 110])  # all bright
    x[: height // 2] = colour.astype(np.uint8)
    return x


def photo_folder(root: Path, per_class: int = 6, classes: int = 3, long_side: int = 120,
                 seed: int = 0, test_per_class: int = 2) -> Path:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` of photos in every shape of
    ``PHOTO_SHAPES``, JPEG and PNG, some grey, some stored turned with an EXIF orientation."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            for i in range(n):
                w, h = PHOTO_SHAPES[k % len(PHOTO_SHAPES)]
                scale = long_side / max(w, h)
                suffix = (".jpg", ".png", ".jpeg")[k % 3]
                write_photo(root / split / f"c{c}" / f"{i:04d}{suffix}",
                            photo_pixels(c, round(w * scale), round(h * scale), rng),
                            gray=k % 7 == 3, turned=(0, 6, 0, 8)[k % 4] if suffix != ".png" else 0)
                k += 1
    return root


def find_browser() -> str | None:
    """A headless-capable Chromium (``SELFSUP_BROWSER`` first), or None."""
    for name in (os.environ.get("SELFSUP_BROWSER", ""), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def dump_dom(browser: str, page: Path, profile: Path) -> str:
    """The DOM of ``page`` after it loaded and ran its scripts, as headless Chromium sees it."""
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        "--disable-background-networking", "--no-first-run",
                        "--virtual-time-budget=5000", f"--user-data-dir={profile}",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


# A small digits run: the arguments and a finished run (pretrained, evaluated, plotted).
DIGITS_ARGS = ["--dataset", "digits", "--width", "8", "--proj-hidden", "32", "--proj-dim", "16",
               "--batch-size", "128", "--no-progress", "--knn-every", "0", "--threads", "2"]


def finished_digits_run(out: Path) -> Path:
    """``out/r``: a finished one-epoch digits run."""
    from selfsup.cli import main

    assert main(["run", *DIGITS_ARGS, "--epochs", "1", "--tsne-points", "50", "--out-dir",
                 str(out), "--name", "r"]) == 0
    return out / "r"


def file_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (not through links) and its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mnt`` (a real full or read-only disk); skips the test
    where it cannot be mounted (not root)."""
    mnt.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


SRC_ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))


def torchrun(*args):
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def interrupt_at(monkeypatch, call, method="simclr"):
    """Send a real SIGINT to this process during the loss of the given step."""
    cls = METHODS[method]
    real = cls.loss
    calls = {"n": 0}

    def loss_then_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "loss", loss_then_ctrl_c)
    return real


README = Path(__file__).parent.parent / "README.md"


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    blocks, lang, cur = [], "", None
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                lang, cur = line[3:].strip(), []
            else:
                blocks.append((lang, cur))
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def shell_lines() -> list[str]:
    """Each command of the README's shell blocks (comments dropped, continuations joined); in
    an unlabelled block (example output) only the lines typed after a `$ ` prompt."""
    lines = []
    for lang, block in fenced_blocks(README.read_text()):
        if lang not in ("", "sh", "bash"):
            continue
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            if lang == "" and not line.startswith("$ "):
                continue
            line = re.split(r"(?:^|\s)#", line.removeprefix("$ "))[0].strip()
            if line:
                lines.append(" ".join(line.split()))
    return lines


def readme_variants(line: str) -> list[str]:
    """The line with its placeholders filled; one line per alternative of `[a | b]`."""
    line = line.replace("[options]", "")
    m = re.search(r"\[([^\]]*\|[^\]]*)\]", line)
    if m:
        alts = ["", *(a.strip() for a in m.group(1).split("|"))]
        return [v for a in alts for v in readme_variants(line[:m.start()] + a + line[m.end():])]
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # optional parts: given
    return [" ".join({"RUN": "runs/NAME", "DIR": "my_photos", "N": "3"}.get(w, w)
                     for w in line.split())]

"""Shared fixtures: small data sets generated in the real on-disk formats."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

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


@pytest.fixture
def cifar_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-10-batches-py/, with the MD5 table set to match."""
    from selfsup import data

    return release_folder(tmp_path, monkeypatch, data, "CIFAR10_MD5", data.CIFAR10_DIR,
                          cifar_files())


@pytest.fixture
def cifar_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-10-python.tar.gz, with its MD5 in the table."""
    from selfsup import data

    return release_archive(tmp_path, monkeypatch, data, "CIFAR10_MD5", data.CIFAR10_ARCHIVE,
                           data.CIFAR10_DIR, cifar_files())


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


@pytest.fixture
def cifar100_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-100-python/, with the MD5 table set to match."""
    from selfsup import data

    return release_folder(tmp_path, monkeypatch, data, "CIFAR100_MD5", data.CIFAR100_DIR,
                          cifar100_files())


@pytest.fixture
def cifar100_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-100-python.tar.gz, its MD5 in the table."""
    from selfsup import data

    return release_archive(tmp_path, monkeypatch, data, "CIFAR100_MD5", data.CIFAR100_ARCHIVE,
                           data.CIFAR100_DIR, cifar100_files())


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


@pytest.fixture
def stl10_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated stl10_binary/, with the MD5 table set to match."""
    from selfsup import stl10

    return release_folder(tmp_path, monkeypatch, stl10, "STL10_MD5", stl10.STL10_DIR,
                          stl10_files())


@pytest.fixture
def stl10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding only a generated stl10_binary.tar.gz; every digest matches."""
    from selfsup import stl10

    return release_archive(tmp_path, monkeypatch, stl10, "STL10_MD5", stl10.STL10_ARCHIVE,
                           stl10.STL10_DIR, stl10_files())


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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/<class>/ and test/<class>/ with 3 classes of small PNG and JPEG images."""
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog", "emu"]):
        write_images(root / "train" / name, 8, seed=c, color=c)
        write_images(root / "test" / name, 3, seed=10 + c, suffix=".jpg", color=c)
    return root


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as the project reads them (a real, tiny, labelled data set)."""
    from selfsup.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def digits_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's demo, `selfsup run --dataset digits`, run once as a real command."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo")
    p = subprocess.run([sys.executable, "-m", "selfsup", "run", "--dataset", "digits",
                        "--out-dir", str(out), "--name", "d", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return out / "d"


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


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished digits run with a linear classifier on 10 % of the labels, shared by the
    modules that read it (tests that change a run change a copy: ``run_copy``)."""
    from selfsup.cli import main

    run = finished_digits_run(tmp_path_factory.mktemp("runs"))
    assert main(["finetune", str(run), "--freeze", "--label-fraction", "0.1", "--epochs", "1",
                 "--no-progress"]) == 0
    return run


@pytest.fixture
def run_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the requesting module's ``run`` fixture, to change or damage."""
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


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

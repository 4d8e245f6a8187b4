"""Shared fixtures: small data sets generated in the real on-disk formats."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
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


@pytest.fixture
def cifar_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-10-batches-py/, with the MD5 table set to match."""
    from selfsup import data

    files = cifar_files()
    folder = tmp_path / "data" / data.CIFAR10_DIR
    folder.mkdir(parents=True)
    table = dict(data.CIFAR10_MD5)
    for name, content in files.items():
        (folder / name).write_bytes(content)
        table[name] = md5(content)
    monkeypatch.setattr(data, "CIFAR10_MD5", table)
    return tmp_path / "data"


@pytest.fixture
def cifar_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a generated cifar-10-python.tar.gz, with its MD5 in the table."""
    from selfsup import data

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in cifar_files().items():
            info = tarfile.TarInfo(f"{data.CIFAR10_DIR}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    root = tmp_path / "data"
    root.mkdir()
    (root / data.CIFAR10_ARCHIVE).write_bytes(buf.getvalue())
    table = dict(data.CIFAR10_MD5)
    table[data.CIFAR10_ARCHIVE] = md5(buf.getvalue())
    monkeypatch.setattr(data, "CIFAR10_MD5", table)
    return root


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

"""Shared fixtures: small data sets generated in the real on-disk formats (``tests.helpers``
writes them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    cifar100_files,
    cifar_files,
    finished_digits_run,
    release_archive,
    release_folder,
    stl10_files,
    write_images,
)

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image stores of folders the tests cannot write go to a cache of the tests' own, never
    the user's (``selfsup.store.location``); subprocesses inherit it."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


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
    import sys

    out = tmp_path_factory.mktemp("demo")
    p = subprocess.run([sys.executable, "-m", "selfsup", "run", "--dataset", "digits",
                        "--out-dir", str(out), "--name", "d", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return out / "d"


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

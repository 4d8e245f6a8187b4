"""STL-10 from its binary release (``stl10_binary.tar.gz`` or the extracted ``stl10_binary/``).

The release (Coates, Lee & Ng, AISTATS 2011) holds 96x96 colour images of 10 classes: 5,000
labelled training images (500 per class), 8,000 test images and 100,000 unlabeled images made
for unsupervised pretraining. Its files:

- ``*_X.bin``: uint8 images one after the other, each 3 x 96 x 96 in column-major order (all of
  the red channel column by column, then green, then blue);
- ``*_y.bin``: one uint8 label per image, 1..10;
- ``class_names.txt``: the 10 class names, one per line, in label order;
- ``fold_indices.txt``: 10 lines of space-separated 0-based indices into the training images,
  1,000 per line: the predefined folds of the release's protocol (train on one fold, test on the
  whole test set).

Memory: the labelled images (13,000, 360 MB as uint8) are read into memory; the unlabeled file
(2.76 GB) is memory-mapped, so the operating system pages it in as pretraining draws batches
and can drop it again under pressure. With ``--image-size`` the images are resized once into
memory (100,000 images of 48 px: 0.7 GB; of 32 px: 0.3 GB).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch

from selfsup.data import ImageData, check_md5, fetch_archive, resize_images
from selfsup.errors import DataError

STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_ARCHIVE = "stl10_binary.tar.gz"
STL10_DIR = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
# Published MD5 digests of the archive and of its image and label files (the two text files
# have none; their contents are checked instead).
STL10_MD5: dict[str, str] = {
    STL10_ARCHIVE: "91f7769df0f17e558f3565bffb0c7dfb",
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
    "unlabeled_X.bin": "5242ba1fed5e4be9e1e742405eb56ca4",
}
CLASS_NAMES = "class_names.txt"
FOLDS = "fold_indices.txt"
FILES = (*(n for n in STL10_MD5 if n != STL10_ARCHIVE), CLASS_NAMES, FOLDS)
N_FOLDS = 10


def _images(path: Path, in_memory: bool) -> torch.Tensor:
    """(N, 3, 96, 96) uint8 images of an ``*_X.bin`` file: read whole, or memory-mapped.

    Raises:
        DataError: the file's size is not a whole number of images.
    """
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"{path}: {size} bytes is not a whole number of 3x{SIDE}x{SIDE} images "
                        f"({IMAGE_BYTES} bytes each): the file is damaged or truncated")
    n = size // IMAGE_BYTES
    if in_memory:
        flat = np.fromfile(path, dtype=np.uint8)
    else:  # copy-on-write: pages come from the file; nothing is ever written back
        flat = np.memmap(path, dtype=np.uint8, mode="c", shape=(size,))
    x = flat.reshape(n, 3, SIDE, SIDE).transpose(0, 1, 3, 2)  # column-major -> (N, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(x) if in_memory else x)


def _labels(path: Path, n_images: int, n_classes: int) -> torch.Tensor:
    """(N,) int64 labels 0..n_classes-1 from a ``*_y.bin`` file of 1-based uint8 labels.

    Raises:
        DataError: a count that differs from the images' or a label outside 1..n_classes.
    """
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(y) != n_images:
        raise DataError(f"{path}: {len(y)} labels for {n_images} images")
    if len(y) and (y.min() < 1 or y.max() > n_classes):
        raise DataError(f"{path}: labels must be 1..{n_classes} (the classes of {CLASS_NAMES}), "
                        f"found {y.min()}..{y.max()}")
    return torch.from_numpy(y - 1)


def _class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file of class names") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def _fold(path: Path, fold: int, n_train: int) -> torch.Tensor:
    """The 0-based training indices of predefined ``fold``.

    Raises:
        DataError: fewer than ``N_FOLDS`` lines, a non-integer, an index outside the training
            images, or a repeated one.
    """
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    if len(lines) != N_FOLDS:
        raise DataError(f"{path}: {len(lines)} folds, expected {N_FOLDS} lines of indices")
    try:
        idx = np.array([int(t) for t in lines[fold].split()], dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: line {fold + 1} is not a list of integers") from None
    if not len(idx) or idx.min() < 0 or idx.max() >= n_train or len(np.unique(idx)) != len(idx):
        raise DataError(f"{path}: fold {fold} must list distinct indices in 0..{n_train - 1}")
    return torch.from_numpy(idx)


def _extract(archive: Path, folder: Path) -> None:
    """Write the release's files from ``archive`` into ``folder``: into a temporary folder of
    this process first, renamed when complete, so an interrupted extraction leaves nothing
    half-written and several processes (torchrun) extracting at once do not collide. Only the
    known file names are written, never a path the archive names."""
    tmp = folder.with_name(f"{folder.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot extract {archive} into {folder.parent} ({e.strerror}); extract "
                        f"it yourself (tar xzf {archive} -C DIR) and point --data-dir at DIR"
                        ) from None
    print(f"extracting {archive} to {folder} ...", flush=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in FILES:
                    src = tar.extractfile(member)
                    if src is not None:
                        with src, open(tmp / base, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
        missing = [n for n in FILES if not (tmp / n).is_file()]
        if missing:
            raise DataError(f"{archive} lacks {', '.join(missing)}")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # else another process finished first: theirs is used
                raise
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{archive} cannot be read as a tar.gz archive: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _missing_message(root: Path, why: str) -> str:
    return (
        f"STL-10 not found in {root.resolve()} ({why}).\n"
        f"  missing: {root / STL10_ARCHIVE} (or the extracted folder {root / STL10_DIR}/)\n"
        f"  get it from {STL10_URL} (2.6 GB, MD5 {STL10_MD5[STL10_ARCHIVE]}) and put it there,\n"
        f"  or point --data-dir (or $SELFSUP_DATA) at the folder that holds it."
    )


def load_stl10(data_dir: str | Path, download: bool = True, image_size: int = 0,
               unlabeled: bool = True, fold: int = -1) -> ImageData:
    """STL-10 from ``data_dir``: the extracted ``stl10_binary/``, else the archive (extracted
    there once), else a download.

    Every image and label file used is checked against its published MD5 first.

    Args:
        image_size: resize the 96x96 images to this side (0: keep them; the unlabeled ones stay
            memory-mapped).
        unlabeled: the 100,000 unlabeled images join the pretraining set (``unlabeled_x``);
            their file is neither needed nor read without it.
        fold: 0-9: the probe, kNN and fine-tuning learn from this predefined fold of 1,000
            training images (``train_x``), and the other 4,000 are pretraining images only;
            -1: all 5,000.

    Returns:
        ``train_x``/``train_y`` the labelled training images (or the fold), ``test_x``/
        ``test_y`` the 8,000 test images, ``unlabeled_x`` the pretraining-only images.

    Raises:
        DataError: missing and not downloadable, a wrong digest (names the file and both
            digests), a damaged file, or a fold out of range.
    """
    if not -1 <= fold < N_FOLDS:
        raise DataError(f"the STL-10 fold must be -1 (all training images) or 0..{N_FOLDS - 1}, "
                        f"got {fold}")
    root = Path(data_dir)
    folder = root / STL10_DIR
    if not folder.is_dir():
        archive = fetch_archive(root, STL10_ARCHIVE, STL10_URL, STL10_MD5[STL10_ARCHIVE],
                                download, lambda why: _missing_message(root, why))
        _extract(archive, folder)
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", CLASS_NAMES,
              *(["unlabeled_X.bin"] if unlabeled else []), *([FOLDS] if fold >= 0 else [])]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. Put the archive "
                        f"{STL10_ARCHIVE} from {STL10_URL} in {root} (and remove the folder).")
    for n in needed:
        if n in STL10_MD5:
            check_md5(folder / n, STL10_MD5[n])
    classes = _class_names(folder / CLASS_NAMES)
    x = _images(folder / "train_X.bin", in_memory=True)
    y = _labels(folder / "train_y.bin", len(x), len(classes))
    tx = _images(folder / "test_X.bin", in_memory=True)
    ty = _labels(folder / "test_y.bin", len(tx), len(classes))
    extra: list[torch.Tensor] = []
    if fold >= 0:
        keep = _fold(folder / FOLDS, fold, len(x))
        rest = torch.ones(len(x), dtype=torch.bool)
        rest[keep] = False
        if rest.any():
            extra.append(x[rest])  # the other folds' images: pretraining only
        x, y = x[keep], y[keep]
    if unlabeled:
        extra.append(_images(folder / "unlabeled_X.bin", in_memory=False))
    if image_size and image_size != SIDE:
        count = len(x) + len(tx) + sum(len(e) for e in extra)
        print(f"resizing {count} STL-10 images to {image_size}x{image_size} px ...", flush=True)
        x, tx = resize_images(x, image_size), resize_images(tx, image_size)
        extra = [resize_images(e, image_size) for e in extra]
    return ImageData(x, y, tx, ty, classes, "stl10", tuple(extra))

"""Data sets, decoded once into uint8 tensors held in memory.

Readers:
- CIFAR-10 python release (``cifar-10-python.tar.gz`` or the extracted ``cifar-10-batches-py/``),
  every file checked against its published MD5, pickles read by a restricted unpickler;
- image folders: ``train/<class>/*`` + ``test/<class>/*`` (labels from folder names), or a flat
  folder of unlabeled images (pretraining and embeddings only);
- scikit-learn's bundled 8x8 digits, a tiny real data set for demos and tests.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
# Published MD5 digests of the archive and of each extracted file.
CIFAR10_MD5: dict[str, str] = {
    CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageData:
    """A data set in memory.

    Attributes:
        train_x: (N, 3, H, W) uint8 images used for pretraining (and the probe's training set).
        train_y: (N,) int64 labels, or None for unlabeled data.
        test_x: (M, 3, H, W) uint8 test images, or None.
        test_y: (M,) int64 labels, or None.
        classes: class names, indexed by label.
        name: short name of the data set.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    name: str

    @property
    def labeled(self) -> bool:
        return self.train_y is not None and self.test_x is not None and self.test_y is not None

    def to(self, device: torch.device) -> ImageData:
        """The same data with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ImageData(move(self.train_x), move(self.train_y), move(self.test_x),  # type: ignore[arg-type]
                         move(self.test_y), self.classes, self.name)


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 digest of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    """Raise DataError naming the file and both digests when they differ."""
    actual = md5_of(path)
    if actual != expected:
        raise DataError(
            f"{path} is damaged or incomplete: MD5 {actual}, expected {expected}. "
            f"Delete it and download it again."
        )


# --- CIFAR-10 pickles -----------------------------------------------------------------------

# The only globals a CIFAR batch pickle refers to: numpy arrays (numpy 1 and 2 module names) and
# the codec Python 3 uses for bytes in protocol 2.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the CIFAR allow-list."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that admits only what CIFAR batch files contain; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise RefusedGlobal(f"refused global {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def safe_unpickle(data: bytes, source: str) -> Any:
    """Load a CIFAR-style pickle from bytes without running code.

    Raises:
        DataError: the pickle refers to anything but plain data and numpy arrays, or is damaged.
    """
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(f"{source}: refused to load, not a plain CIFAR batch ({e})") from None
    except Exception as e:  # truncated or garbage bytes raise many kinds of errors
        why = f"{type(e).__name__}: {e}"
        raise DataError(f"{source}: damaged or truncated pickle ({why})") from None


def _cifar_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(data, source)
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{source}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels")
    return x, y


def _cifar_from_files(read: dict[str, bytes], where: str) -> ImageData:
    xs, ys = zip(*(_cifar_batch(read[n], f"{where}/{n}") for n in CIFAR10_TRAIN), strict=True)
    tx, ty = _cifar_batch(read[CIFAR10_TEST], f"{where}/{CIFAR10_TEST}")
    meta = safe_unpickle(read[CIFAR10_META], f"{where}/{CIFAR10_META}")
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except Exception:
        raise DataError(f"{where}/{CIFAR10_META}: no label_names") from None
    return ImageData(
        torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
        torch.from_numpy(tx), torch.from_numpy(ty), classes, "cifar10",
    )


def _download(url: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def load_cifar10(data_dir: str | Path, download: bool = True) -> ImageData:
    """CIFAR-10 from ``data_dir``: the extracted batches, else the archive, else a download.

    Every file is checked against its published MD5 (``CIFAR10_MD5``) before it is read.

    Raises:
        DataError: missing and not downloadable (says which file, where to put it and where to
            get it), wrong MD5 (names the file, expected and actual digest), or unsafe pickle.
    """
    root = Path(data_dir)
    folder = root / CIFAR10_DIR
    names = (*CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META)
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. "
                            f"Put the archive {CIFAR10_ARCHIVE} from {CIFAR10_URL} in {root}.")
        for n in names:
            check_md5(folder / n, CIFAR10_MD5[n])
        return _cifar_from_files({n: (folder / n).read_bytes() for n in names}, str(folder))

    archive = root / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(_missing_cifar_message(root, "download is off"))
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {CIFAR10_URL} to {archive} ...", flush=True)
        try:
            _download(CIFAR10_URL, archive)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(_missing_cifar_message(root, f"download failed: {e}")) from None
    check_md5(archive, CIFAR10_MD5[CIFAR10_ARCHIVE])
    read: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names:
                    f = tar.extractfile(member)
                    if f is not None:
                        read[base] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} cannot be read as a tar.gz archive: {e}") from None
    missing = [n for n in names if n not in read]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}")
    return _cifar_from_files(read, str(archive))


def _missing_cifar_message(root: Path, why: str) -> str:
    return (
        f"CIFAR-10 not found in {root.resolve()} ({why}).\n"
        f"  missing: {root / CIFAR10_ARCHIVE} (or the extracted folder {root / CIFAR10_DIR}/)\n"
        f"  get it from {CIFAR10_URL} (MD5 {CIFAR10_MD5[CIFAR10_ARCHIVE]}) and put it there,\n"
        f"  or point --data-dir (or $SELFSUP_DATA) at the folder that holds it.\n"
        f"  For a demo without downloads: selfsup run --dataset digits"
    )


# --- image folders --------------------------------------------------------------------------


def image_files(folder: Path, bad_images: str = "skip") -> list[Path]:
    """The image files under ``folder`` (by suffix), sorted; other files are skipped with a
    counted warning, or refused when ``bad_images`` is ``fail`` (hidden files are ignored).

    Raises:
        DataError: ``fail`` and a file that is not an image.
    """
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        _bad(bad_images, f"{len(others)} file(s) in {folder} are not images (by their suffix)",
             others)
    return images


def _bad(policy: str, what: str, examples: list[str]) -> None:
    """Skip with a counted warning, or fail: the ``bad_images`` policy."""
    shown = ", ".join(examples[:3]) + (", ..." if len(examples) > 3 else "")
    if policy == "fail":
        raise DataError(f"{what}: {shown} (use --bad-images skip to skip such files)")
    warnings.warn(f"skipped {what}: {shown}", stacklevel=3)


def _decode(path: Path, size: int) -> np.ndarray | None:
    """(3, size, size) uint8, or None when the file is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            im = f.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _first_size(paths: Iterable[Path]) -> int:
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                return int(im.size[0])
        except OSError:
            continue
    return 0


def decode_images(paths: list[Path], image_size: int = 0, bad_images: str = "skip"
                  ) -> tuple[torch.Tensor, list[int]]:
    """Decode image files into one (N, 3, S, S) uint8 tensor, on all cores.

    Args:
        paths: image files.
        image_size: side S; 0 = the width of the first readable image. Images of another size
            are resized (bilinear), and a note says how many.

    Returns:
        The images and the indices into ``paths`` that decoded (unreadable files are skipped
        with a counted warning, or refused when ``bad_images`` is ``fail``).

    Raises:
        DataError: no readable image, or ``fail`` and an unreadable one.
    """
    from PIL import Image

    size = image_size or _first_size(paths)
    if size == 0:
        raise DataError(f"none of the {len(paths)} files could be read as an image")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda p: _decode(p, size), paths))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    bad = [str(paths[i]) for i, a in enumerate(arrays) if a is None]
    if bad and kept:
        _bad(bad_images, f"{len(bad)} unreadable image file(s)", bad)
    if not kept:
        raise DataError(f"none of the {len(paths)} files could be read as an image")

    def other_size(p: Path) -> bool:
        with Image.open(p) as im:
            return im.size != (size, size)

    if not image_size:
        resized = sum(other_size(paths[i]) for i in kept)
        if resized:
            print(f"note: {resized} image(s) not {size}x{size} were resized to it", flush=True)
    return torch.from_numpy(np.stack([arrays[i] for i in kept])), kept  # type: ignore[misc]


def _labeled_split(folder: Path, classes: list[str] | None, size: int, bad_images: str
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    names = classes if classes is not None else [d.name for d in class_dirs]
    unknown = [d.name for d in class_dirs if d.name not in names]
    if unknown:
        raise DataError(f"{folder} has classes not in the training set: {', '.join(unknown)}")
    paths: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        files = image_files(d, bad_images)
        paths += files
        labels += [names.index(d.name)] * len(files)
    if not paths:
        raise DataError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    x, kept = decode_images(paths, size, bad_images)
    return x, torch.tensor([labels[i] for i in kept], dtype=torch.int64), names


def load_image_folder(root: str | Path, image_size: int = 0, bad_images: str = "skip"
                      ) -> ImageData:
    """Images from a folder: ``train/<class>/*`` and ``test/<class>/*``, or a flat folder.

    A folder with ``train/`` and ``test/`` subfolders of class folders gives a labeled data set
    (labels from folder names, sorted). Any other folder gives an unlabeled data set of every
    image under it (pretraining and embeddings only). Files that are not images, or not
    readable, are skipped with a counted warning (``bad_images="skip"``) or refused (``fail``).

    Raises:
        DataError: the folder is missing, or holds no readable image, or a bad file and
            ``fail``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    train, test = root / "train", root / "test"
    if train.is_dir() and test.is_dir() and any(d.is_dir() for d in train.iterdir()):
        size = image_size or _first_size(p for p in sorted(train.rglob("*"))
                                         if p.suffix.lower() in IMAGE_SUFFIXES)
        x, y, classes = _labeled_split(train, None, size, bad_images)
        tx, ty, _ = _labeled_split(test, classes, x.shape[-1], bad_images)
        return ImageData(x, y, tx, ty, classes, root.name)
    paths = image_files(root, bad_images)
    if not paths:
        raise DataError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    x, _ = decode_images(paths, image_size, bad_images)
    return ImageData(x, None, None, None, [], root.name)


# --- digits ---------------------------------------------------------------------------------


def load_digits(size: int = 16, test_frac: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), upsampled to ``size``.

    The split is stratified and fixed (seed 0): 1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(np.arange(len(y)), test_size=test_frac, random_state=0,
                              stratify=d.target)
    tr_i, te_i = torch.from_numpy(tr), torch.from_numpy(te)
    return ImageData(x[tr_i], y[tr_i], x[te_i], y[te_i], [str(i) for i in range(10)], "digits")


def load_dataset(name: str, data_dir: str | Path, image_size: int = 0,
                 download: bool = True, bad_images: str = "skip") -> ImageData:
    """Load a data set by name: ``cifar10``, ``digits`` or ``folder`` (image folder at data_dir)."""
    if name == "cifar10":
        return load_cifar10(data_dir, download=download)
    if name == "digits":
        return load_digits()
    if name == "folder":
        return load_image_folder(data_dir, image_size, bad_images)
    raise DataError(f"unknown dataset {name!r}; valid: cifar10, digits, folder")


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), in [0, 1] units."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        b = x[i:i + chunk].double().div_(255)
        s += b.sum(dim=(0, 2, 3))
        s2 += b.pow(2).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()

"""Data sets, decoded once into uint8 tensors held in memory.

Readers:
- CIFAR-10 and CIFAR-100 python releases (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  or their extracted folders), every file checked against its published MD5, pickles read by a
  restricted unpickler;
- STL-10's binary release: in ``selfsup.stl10``, which builds on this module
  (``selfsup.datasets.load_dataset`` picks the reader by name);
- image folders: ``train/<class>/*`` + ``test/<class>/*`` (labels from folder names), or a flat
  folder of unlabeled images (pretraining and embeddings only);
- scikit-learn's bundled 8x8 digits, a tiny real data set for demos and tests.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_DIR = "cifar-100-python"
CIFAR100_MD5: dict[str, str] = {
    CIFAR100_ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic",
                  ".heif")


@dataclass
class ImageData:
    """A data set in memory (or memory-mapped).

    Attributes:
        train_x: (N, 3, H, W) uint8 labelled training images: the probe's, kNN's and
            fine-tuning's training set, and the first part of the pretraining set.
        train_y: (N,) int64 labels, or None for unlabeled data.
        test_x: (M, 3, H, W) uint8 test images, or None.
        test_y: (M,) int64 labels, or None.
        classes: class names, indexed by label.
        name: short name of the data set.
        unlabeled_x: further (K, 3, H, W) uint8 images for pretraining only, after ``train_x``
            (STL-10's unlabeled split, which may be a memory-mapped file).
        files: image folders: the absolute path of each row of ``train_x`` (``"train"``) and
            ``test_x`` (``"test"``); empty for data sets that are not files of images.
        frames: photos of many shapes: the rows of ``train_x`` with their own aspect ratios,
            which pretraining crops (``train_x`` holds their centre crops); None when every
            image is square.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    name: str
    unlabeled_x: tuple[torch.Tensor, ...] = ()
    files: dict[str, list[str]] = field(default_factory=dict)
    frames: Framed | None = None

    @property
    def labeled(self) -> bool:
        return self.train_y is not None and self.test_x is not None and self.test_y is not None

    @property
    def pretrain_size(self) -> int:
        """Images pretraining sees per epoch: the training images and the unlabeled ones."""
        return len(self.train_x) + sum(len(u) for u in self.unlabeled_x)

    def pretrain_images(self) -> Images:
        """The pretraining set: ``train_x`` itself (or its ``frames``), or it and the unlabeled
        images as one indexable stack (nothing is copied)."""
        if self.frames is not None:
            return self.frames
        return ImageStack((self.train_x, *self.unlabeled_x)) if self.unlabeled_x else self.train_x

    def to(self, device: torch.device) -> ImageData:
        """The same data with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        train_x = self.train_x.to(device)
        frames = None if self.frames is None else self.frames.to(device)
        return ImageData(train_x, move(self.train_y), move(self.test_x),  # type: ignore[arg-type]
                         move(self.test_y), self.classes, self.name,
                         tuple(u.to(device) for u in self.unlabeled_x), self.files, frames)


class ImageStack:
    """Several (N_i, 3, H, W) uint8 image tensors indexed as one, without copying them.

    Indexing with a tensor (or a slice) of positions gathers those images, in that order, into
    one new contiguous tensor; the parts may be memory-mapped and non-contiguous.
    """

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        if not parts or any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError("an ImageStack needs parts of one image shape")
        self.parts = tuple(parts)
        self.offsets = torch.tensor([0, *np.cumsum([len(p) for p in parts]).tolist()])
        self.device = parts[0].device
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.parts[0].shape[1:]))

    def to(self, device: torch.device | str) -> ImageStack:
        return ImageStack([p.to(device) for p in self.parts])

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        if idx.device.type != "cpu" and all(p.device == idx.device for p in self.parts):
            return self.gather(idx)
        idx = idx.to("cpu", torch.int64)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"image index out of range for {len(self)} images")
        out = torch.empty((len(idx), *self.parts[0].shape[1:]), dtype=self.dtype,
                          device=self.device)  # (B, 3, H, W)
        part = torch.bucketize(idx, self.offsets[1:], right=True)  # which part holds each
        for k, p in enumerate(self.parts):
            where = (part == k).nonzero().squeeze(1)
            if len(where):
                rows = idx[where] - self.offsets[k]
                out[where.to(self.device)] = p[rows.to(p.device)].to(self.device)
        return out

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at ``idx`` without reading anything back to the host (on a GPU, indexing
        by the CPU's way would make every step wait): each part gathers at every index, its
        rows clamped into it, and keeps the images that are its own. Indices are not checked
        (the run's own permutation); an out-of-range one gives some image of the stack."""
        idx = idx.long()
        offsets = self.offsets.to(idx.device)
        part = torch.bucketize(idx, offsets[1:-1], right=True)  # (B,) which part holds each
        out = None
        for k, p in enumerate(self.parts):
            rows = (idx - offsets[k]).clamp_(0, len(p) - 1)
            images = p[rows.to(p.device)].to(self.device)
            out = images if out is None else torch.where(
                (part == k).to(self.device).view(-1, 1, 1, 1), images, out)
        assert out is not None  # an ImageStack has at least one part
        return out


class Framed:
    """Images of many shapes, for pretraining: image k lies at the top-left of an (F, F) frame
    (``frames[k]``, uint8, edge-padded), ``shapes[k]`` (height, width) px of it, its shorter side
    at most the image side S. The crops are drawn on each image's own shape (``augment``'s
    ``shape``), so the photos keep their aspect ratio. ``centre`` holds the same images as
    evaluation sees them: (N, 3, S, S), the shorter side resized to S and centre-cropped.

    It stands for images of side S: ``shape`` is (N, 3, S, S); indexing gives the frames, on
    ``device``. Frames too large for a GPU's memory (``DEVICE_SHARE`` of it) stay in the host's
    (the store's mapping) and each batch is copied over as it is drawn.
    """

    DEVICE_SHARE = 0.5

    def __init__(self, frames: torch.Tensor, shapes: torch.Tensor, centre: torch.Tensor,
                 device: torch.device | None = None) -> None:
        if not len(frames) == len(shapes) == len(centre):
            raise ValueError("frames, shapes and centre crops of different lengths")
        self.frames, self.shapes, self.centre = frames, shapes, centre
        self.device, self.dtype = device or frames.device, frames.dtype

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.centre.shape[1:]))

    def to(self, device: torch.device | str) -> Framed:
        device = torch.device(device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            if self.frames.numel() > self.DEVICE_SHARE * total:  # they stay on the host
                return Framed(self.frames, self.shapes.to(device), self.centre, device)
        return Framed(self.frames.to(device), self.shapes.to(device), self.centre.to(device))

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.frames.device)
        return self.frames[idx].to(self.device, non_blocking=True)


Images = torch.Tensor | ImageStack | Framed  # what pretraining indexes


def shapes_of(x: Images, idx: torch.Tensor | slice) -> torch.Tensor | None:
    """The (B, 2) shapes of the images at ``idx`` when ``x`` holds framed images of many
    shapes (``Framed``); None when each image fills its row."""
    if not isinstance(x, Framed):
        return None
    return x.shapes[idx.to(x.shapes.device) if isinstance(idx, torch.Tensor) else idx]


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


def _cifar_batch(data: bytes, source: str, label_key: bytes = b"labels"
                 ) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(data, source)
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{source}: not a CIFAR batch ({type(e).__name__}: {e})") from None
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{source}: {len(x)} images but {y.size} labels")
    return x, y


@dataclass(frozen=True)
class CifarRelease:
    """Where one CIFAR python release lives and how its pickles are laid out."""

    name: str  # the data set's short name
    title: str  # as messages say it
    url: str
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    md5_table: str  # the name of this module's table of published digests (tests replace it)

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)

    def digests(self) -> dict[str, str]:
        table: dict[str, str] = globals()[self.md5_table]
        return table


CIFAR10 = CifarRelease("cifar10", "CIFAR-10", CIFAR10_URL, CIFAR10_ARCHIVE, CIFAR10_DIR,
                       CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META, "CIFAR10_MD5")
CIFAR100 = CifarRelease("cifar100", "CIFAR-100", CIFAR100_URL, CIFAR100_ARCHIVE, CIFAR100_DIR,
                        ("train",), "test", "meta", "CIFAR100_MD5")
CIFAR100_LABELS = ("fine", "coarse")  # 100 classes, or the 20 superclasses


def _cifar_from_files(release: CifarRelease, read: dict[str, bytes], where: str,
                      labels: str = "fine") -> ImageData:
    """The release's images and labels from the bytes of its files.

    CIFAR-10's batches hold ``labels`` and the meta file ``label_names``; CIFAR-100's hold
    ``fine_labels`` and ``coarse_labels``, its meta file ``fine_label_names`` and
    ``coarse_label_names``.
    """
    label_key, names_key = ((b"labels", b"label_names") if release is CIFAR10 else
                            (f"{labels}_labels".encode(), f"{labels}_label_names".encode()))
    xs, ys = zip(*(_cifar_batch(read[n], f"{where}/{n}", label_key) for n in release.train),
                 strict=True)
    tx, ty = _cifar_batch(read[release.test], f"{where}/{release.test}", label_key)
    meta = safe_unpickle(read[release.meta], f"{where}/{release.meta}")
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    except Exception:
        raise DataError(f"{where}/{release.meta}: no {names_key.decode()}") from None
    y = np.concatenate(ys)
    for split, lab in (("training", y), ("test", ty)):
        if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"{where}: {split} labels outside 0..{len(classes) - 1}, the "
                            f"{len(classes)} classes of {release.meta}")
    return ImageData(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(y),
                     torch.from_numpy(tx), torch.from_numpy(ty), classes, release.name)


def _download(url: str, dest: Path) -> None:
    """``url`` into ``dest``, through a partial file of this process's own: processes that
    download at once (torchrun) each write their own and rename it into place whole."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_archive(root: Path, archive: str, url: str, digest: str, download: bool,
                  missing: Callable[[str], str]) -> Path:
    """``root/archive``, downloaded from ``url`` when absent (and allowed), checked against its
    published MD5.

    Raises:
        DataError: absent and not downloadable (``missing(why)`` is the message), or damaged.
    """
    path = root / archive
    if not path.is_file():
        if not download:
            raise DataError(missing("download is off"))
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} to {path} ...", flush=True)
        try:
            _download(url, path)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(missing(f"download failed: {e}")) from None
    check_md5(path, digest)
    return path


def load_cifar(release: CifarRelease, data_dir: str | Path, download: bool = True,
               labels: str = "fine", image_size: int = 0) -> ImageData:
    """A CIFAR python release from ``data_dir``: the extracted files, else the archive, else a
    download.

    Every file is checked against its published MD5 (``release.digests()``) before it is read.

    Args:
        labels: CIFAR-100's ``fine`` (100 classes) or ``coarse`` (20 superclasses) labels.
        image_size: resize the 32x32 images to this side (0: keep them).

    Raises:
        DataError: missing and not downloadable (says which file, where to put it and where to
            get it), wrong MD5 (names the file, expected and actual digest), or unsafe pickle.
    """
    if labels not in CIFAR100_LABELS:
        raise DataError(f"CIFAR-100 labels must be one of {', '.join(CIFAR100_LABELS)}, "
                        f"got {labels!r}")
    root = Path(data_dir)
    folder = root / release.folder
    digests = release.digests()
    if folder.is_dir():
        missing = [n for n in release.files if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. "
                            f"Put the archive {release.archive} from {release.url} in {root}.")
        for n in release.files:
            check_md5(folder / n, digests[n])
        data = _cifar_from_files(release, {n: (folder / n).read_bytes() for n in release.files},
                                 str(folder), labels)
        return resize_data(data, image_size)

    archive = fetch_archive(root, release.archive, release.url, digests[release.archive],
                            download, lambda why: _missing_cifar_message(release, root, why))
    read: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in release.files:
                    f = tar.extractfile(member)
                    if f is not None:
                        read[base] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} cannot be read as a tar.gz archive: {e}") from None
    missing = [n for n in release.files if n not in read]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}")
    return resize_data(_cifar_from_files(release, read, str(archive), labels), image_size)


def load_cifar10(data_dir: str | Path, download: bool = True, image_size: int = 0) -> ImageData:
    """CIFAR-10 (50,000 training and 10,000 test images of 32x32, 10 classes); see
    ``load_cifar``."""
    return load_cifar(CIFAR10, data_dir, download, image_size=image_size)


def load_cifar100(data_dir: str | Path, download: bool = True, labels: str = "fine",
                  image_size: int = 0) -> ImageData:
    """CIFAR-100 (50,000 training and 10,000 test images of 32x32; 100 fine classes or 20
    coarse superclasses); see ``load_cifar``."""
    return load_cifar(CIFAR100, data_dir, download, labels, image_size)


def _missing_cifar_message(release: CifarRelease, root: Path, why: str) -> str:
    return (
        f"{release.title} not found in {root.resolve()} ({why}).\n"
        f"  missing: {root / release.archive} (or the extracted folder {root / release.folder}/)\n"
        f"  get it from {release.url} (MD5 {release.digests()[release.archive]}) and put it "
        f"there,\n"
        f"  or point --data-dir (or $SELFSUP_DATA) at the folder that holds it.\n"
        f"  For a demo without downloads: selfsup run --dataset digits"
    )


def resize_images(x: torch.Tensor, size: int, chunk_pixels: int = 1 << 24) -> torch.Tensor:
    """(N, 3, H, W) uint8 images resized to (N, 3, size, size), antialiased bilinear (as Pillow
    resizes folder images), a chunk at a time so that a memory-mapped set is never held whole
    as floats."""
    n, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    step = max(1, chunk_pixels // (3 * h * w))
    for i in range(0, n, step):
        b = x[i:i + step].float()  # (b, 3, H, W)
        b = torch.nn.functional.interpolate(b, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[i:i + step] = b.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_data(data: ImageData, size: int) -> ImageData:
    """Every image of ``data`` at ``size`` px (0: unchanged)."""
    if not size or data.train_x.shape[-1] == size:
        return data
    return ImageData(resize_images(data.train_x, size), data.train_y,
                     None if data.test_x is None else resize_images(data.test_x, size),
                     data.test_y, data.classes, data.name,
                     tuple(resize_images(u, size) for u in data.unlabeled_x), data.files)


# --- image folders ---------------------------------------------------------------------------

# The most pixels selfsup decodes from one image file (8192 x 8192). A larger image, or a small
# file that declares one (a decompression bomb), is a bad image: its pixels are never decoded.
MAX_IMAGE_PIXELS = 8192 * 8192


def _walk(folder: Path, within: Path | None = None) -> tuple[list[Path], list[str]]:
    """Every non-hidden regular file under ``folder`` (following links, each folder once),
    sorted, and what could not be read: sub-folders without permission, and entries that are
    not regular files (pipes, sockets, devices, broken links), which would block or never end.

    A link to ``folder`` itself or a folder above it (a loop), or into another part of
    ``within`` (another class folder of the same split), is not followed and is named: its
    images would be counted again, under this folder's class."""
    files: list[Path] = []
    unreadable: list[str] = []
    seen: set[tuple[int, int]] = set()
    root = folder.resolve()
    fence = within.resolve() if within is not None else root

    def leads_elsewhere(path: str) -> str | None:
        target = Path(path).resolve()
        if root.is_relative_to(target):
            return "a link to a folder above it: a loop"
        if target.is_relative_to(fence) and not target.is_relative_to(root):
            return "a link into another class folder"
        return None

    def visit(d: Path) -> None:
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:  # a link loop, or a folder reached twice
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            unreadable.append(f"{d} ({err.strerror or err})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                why = leads_elsewhere(entry.path) if entry.is_symlink() else None
                if why:
                    unreadable.append(f"{entry.path} ({why}; not followed)")
                else:
                    visit(Path(entry.path))
            elif is_file:
                files.append(Path(entry.path))
            else:
                unreadable.append(f"{entry.path} (not a regular file)")

    visit(folder)
    return sorted(files), unreadable


def image_files(folder: Path, bad_images: str = "skip", within: Path | None = None
                ) -> list[Path]:
    """The image files under ``folder`` (by suffix), sorted; other files and sub-folders that
    cannot be read are skipped with a counted warning, or refused when ``bad_images`` is
    ``fail`` (hidden files and folders are ignored).

    Raises:
        DataError: ``folder`` itself cannot be read, or ``fail`` and a file that is not an image
            or a sub-folder that cannot be read.
    """
    _check_readable(folder)
    files, unreadable = _walk(folder, within)
    if unreadable:
        _bad(bad_images, f"{len(unreadable)} entries under {folder} that cannot be read",
             unreadable)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        _bad(bad_images, f"{len(others)} file(s) in {folder} are not images (by their suffix)",
             others)
    return images


def _listing_error(folder: Path) -> OSError | None:
    """Why ``folder`` cannot be listed (missing, a file, no permission), or None."""
    try:
        with os.scandir(folder):
            return None
    except OSError as e:
        return e


def _check_readable(folder: Path) -> None:
    """DataError, not a traceback, for a folder that is missing or cannot be listed."""
    e = _listing_error(folder)
    if isinstance(e, FileNotFoundError):
        raise DataError(f"image folder {folder} does not exist")
    if isinstance(e, NotADirectoryError):
        raise DataError(f"{folder} is a file, not a folder of images")
    if e is not None:
        raise DataError(f"image folder {folder} cannot be read ({e.strerror or e}); check its "
                        f"permissions")


def _bad(policy: str, what: str, examples: list[str]) -> None:
    """Skip with a counted warning, or fail: the ``bad_images`` policy."""
    shown = ", ".join(examples[:3]) + (", ..." if len(examples) > 3 else "")
    if policy == "fail":
        raise DataError(f"{what}: {shown} (use --bad-images skip to skip such files)")
    warnings.warn(f"skipped {what}: {shown}", stacklevel=3)


def _scale_to_uint8(a: np.ndarray, high: float) -> np.ndarray:
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / high)), 0, 255).astype(np.uint8)


def _full_scale(a: np.ndarray, mode: str) -> float:
    """The value that stands for white in a high-depth grey image: 65535 for 16-bit modes; for
    32-bit integers and floats, the smallest usual scale that holds the data (1 for floats in
    [0, 1], then 255, then 65535, else the largest value)."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(np.max(a)) if a.size else 0.0
    for scale in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if top <= scale:
            return scale
    return top


def to_rgb8(im: Any) -> Any:
    """Any image Pillow opens, as 8-bit RGB with the values the file means.

    Pillow's own RGB conversion clips 16-bit and 32-bit grey and floats to 255 (a 16-bit PNG
    comes out white): those are rescaled from their full scale (``_full_scale``). Premultiplied
    grey+alpha goes through plain grey+alpha. Transparency is dropped, keeping the colour under
    it; palette images with transparency go through RGBA, as their format asks.
    """
    from PIL import Image

    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(im)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        grey = _scale_to_uint8(a, _full_scale(a, mode) or 1.0)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "La":
        im = im.convert("LA")
    elif mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


@dataclass
class _Decoded:
    """One file's outcome: its (3, S, S) centre crop, its (3, F, F) frame and the image's shape
    in it (when asked for), and the file's own size; or why it failed."""

    array: np.ndarray | None
    size: tuple[int, int] = (0, 0)
    why: str = ""
    frame: np.ndarray | None = None
    shape: tuple[int, int] = (0, 0)


@functools.cache
def _heif_opener() -> bool:
    """Teach Pillow HEIC/HEIF (phones' photos) through pillow-heif, once; False without it."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _open_checked(path: Path) -> Any:
    """Open an image (header only) and refuse one with more than ``MAX_IMAGE_PIXELS``."""
    from PIL import Image

    if path.suffix.lower() in (".heic", ".heif") and not _heif_opener():
        raise ValueError("a HEIC/HEIF photo: pip install pillow-heif to read it")

    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"declares more pixels than the {MAX_IMAGE_PIXELS:,}-pixel limit "
                         f"(a decompression bomb?)") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise ValueError(f"{w}x{h} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
    if w < 1 or h < 1:
        im.close()
        raise ValueError(f"{w}x{h} pixels")
    return im


def centre_crop(im: Any, size: int) -> np.ndarray:
    """(3, size, size) uint8: the centred square of the image's shorter side, resized to
    ``size`` (bilinear, antialiased): evaluation's view of a photo, whose aspect is kept (no
    squashing). A square image is only resized."""
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = None if w == h else (left, top, left + side, top + side)
        im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def framed(im: Any, size: int, frame: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(3, frame, frame) uint8 and (height, width): the whole image, its shorter side resized to
    ``size`` (its longer to at most ``frame``), at the top-left of the frame; the rest repeats
    its last row and column, so that sampling at its edges never blends in black."""
    from PIL import Image

    w, h = im.size
    scale = min(size / min(w, h), frame / max(w, h))
    nw, nh = max(1, min(frame, round(w * scale))), max(1, min(frame, round(h * scale)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    return np.pad(a, ((0, 0), (0, frame - nh), (0, frame - nw)), mode="edge"), (nh, nw)


def _decode(path: Path, size: int, frame: int = 0) -> _Decoded:
    """Decode one file: its centre crop at ``size`` px (``centre_crop``) and, when ``frame``,
    the whole image in a frame of that side (``framed``). Any failure is this file's problem:
    the reason is kept for the bad-image warning, never raised (the parsers see untrusted
    bytes)."""
    from PIL import ImageOps

    try:
        with _open_checked(path) as f:
            own = f.size
            if f.format == "JPEG":
                f.draft("RGB", (size, size))  # decode big JPEGs at a reduced scale
            # Turn upright by the EXIF orientation (only files that carry EXIF: a copy costs).
            upright = ImageOps.exif_transpose(f) if "exif" in f.info or f.format == "TIFF" else f
            im = to_rgb8(upright or f)
            out = _Decoded(centre_crop(im, size), own)
            if frame:
                out.frame, out.shape = framed(im, size, frame)
            return out
    except Exception as e:  # noqa: BLE001 - every decoder error means "unreadable file"
        return _Decoded(None, why=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                        if str(e) else type(e).__name__)


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(n: int, size: int) -> None:
    """Refuse to decode ``n`` images of ``size`` px when they cannot fit in this machine's
    memory (the whole set is held as uint8), before decoding any."""
    need = 2 * n * 3 * size * size  # decoded one by one, then stacked: two copies at the peak
    total = physical_memory()
    if total is not None and need > 0.8 * total:
        raise DataError(f"{n} images of {size}x{size} px need {need / 2**30:.1f} GiB as uint8 "
                        f"while they load (decoded, then stacked), more than this machine's "
                        f"{total / 2**30:.1f} GiB of memory can hold; choose a smaller "
                        f"--image-size")


AUTO_SIDE_SAMPLE = 64  # images whose shorter sides choose the side when none is given


DECODE_CHUNK = 1024  # files decoded at a time where images stream (embed, predict)


def decoded_chunks(paths: list[Path], size: int, bad_images: str = "skip"
                   ) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Image files decoded ``DECODE_CHUNK`` at a time, on all cores: each chunk's (n, 3, S, S)
    uint8 centre crops (``centre_crop``: upright, the shorter side's centred square) and the
    indices into ``paths`` that decoded. Memory holds one chunk, whatever the number of files.

    Files over ``MAX_IMAGE_PIXELS`` (or declaring it) are bad images and are never decoded;
    unreadable files are counted in one warning at the end, or refused at the first chunk that
    holds one when ``bad_images`` is ``fail``.

    Raises:
        DataError: no readable image, or ``fail`` and an unreadable one.
    """
    from PIL import Image

    bad: list[str] = []
    kept_any = False
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        # Pillow warns of large images as it opens them; the limit above decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for lo in range(0, len(paths), DECODE_CHUNK):
            decoded = list(pool.map(lambda p: _decode(p, size), paths[lo:lo + DECODE_CHUNK]))
            kept = [lo + i for i, d in enumerate(decoded) if d.array is not None]
            bad += [f"{paths[lo + i]} ({d.why})" for i, d in enumerate(decoded) if d.array is None]
            if bad and bad_images == "fail":
                _bad("fail", f"{len(bad)} unreadable image file(s)", bad)
            if kept:
                kept_any = True
                yield torch.from_numpy(np.stack([decoded[i - lo].array for i in kept])), kept  # type: ignore[misc]
    if not kept_any:
        raise DataError(f"none of the {len(paths)} files could be read as an image: "
                        f"{', '.join(bad[:3])}")
    if bad:
        _bad(bad_images, f"{len(bad)} unreadable image file(s)", bad)


def decode_images(paths: list[Path], image_size: int = 0, bad_images: str = "skip"
                  ) -> tuple[torch.Tensor, list[int]]:
    """Decode image files into one (N, 3, S, S) uint8 tensor of their centre crops
    (``decoded_chunks``).

    Args:
        paths: image files.
        image_size: side S; 0 = the median shorter side of the first images.

    Returns:
        The images and the indices into ``paths`` that decoded (unreadable files are skipped
        with a counted warning, or refused when ``bad_images`` is ``fail``).

    Raises:
        DataError: no readable image, or ``fail`` and an unreadable one.
    """
    size = image_size or _sample(paths)[0]
    if size == 0:
        why = [f"{p} ({_decode(p, 1).why})" for p in paths[:3]]
        raise DataError(f"none of the {len(paths)} files could be read as an image: "
                        f"{', '.join(why)}{', ...' if len(paths) > 3 else ''}")
    _check_memory(len(paths), size)
    chunks = list(decoded_chunks(paths, size, bad_images))
    return torch.cat([x for x, _ in chunks]), [i for _, kept in chunks for i in kept]


def _class_dirs(folder: Path, bad_images: str) -> list[Path]:
    """The class folders of a split. Entries that are not folders (files outside any class
    folder) and entries that cannot be read follow the bad-image policy: named, never silent."""
    _check_readable(folder)
    dirs: list[Path] = []
    loose: list[Path] = []
    unreadable: list[str] = []
    for d in sorted(folder.iterdir()):
        if d.name.startswith("."):
            continue
        try:
            (dirs if d.is_dir() else loose).append(d)
        except OSError as e:
            unreadable.append(f"{d} ({e.strerror})")
    if loose:
        _bad(bad_images, f"{len(loose)} file(s) directly in {folder}, outside any class folder",
             [str(p) for p in loose])
    if unreadable:
        _bad(bad_images, f"{len(unreadable)} entries of {folder} that cannot be read",
             unreadable)
    return dirs


def _labeled_split(folder: Path, classes: list[str] | None, bad_images: str,
                   left_out: Collection[str] = ()
                   ) -> tuple[list[Path], list[int], list[str], set[str]]:
    """One split of ``<class>/*`` folders: its image files, their labels, the classes, and
    the class folders left out.

    For the training split (``classes`` None) the classes are its class folders that hold
    images: an empty or unreadable one is named in a warning and left out (returned in the
    set). In the test split, the images of classes left out of training are left out too.
    """
    found: dict[str, list[Path]] = {}
    unreadable: dict[str, str] = {}  # class name -> the folder and why it cannot be listed
    for d in _class_dirs(folder, bad_images):
        err = _listing_error(d)
        if err is None:
            found[d.name] = image_files(d, bad_images, within=folder)
        else:
            unreadable[d.name] = f"{d} ({err.strerror or err})"
    if unreadable:
        _bad(bad_images, f"{len(unreadable)} class folder(s) that cannot be read, left out",
             list(unreadable.values()))
    empty = [name for name, files in found.items() if not files]
    if empty:
        what = ("left out as classes" if classes is None
                else "so those classes have no test images")
        warnings.warn(f"{len(empty)} class folder(s) of {folder} hold no images, {what}: "
                      f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}",
                      stacklevel=3)
    dropped = {n for n in found if found[n] and n in left_out}
    if dropped:
        warnings.warn(f"{folder}: the images of {', '.join(sorted(dropped))} are left out, as "
                      f"that class was left out of training", stacklevel=3)
    names = classes if classes is not None else [n for n in found if found[n]]
    unknown = [n for n in found if found[n] and n not in names and n not in left_out]
    if unknown:
        raise DataError(f"{folder} has classes not in the training set: {', '.join(unknown)}")
    paths: list[Path] = []
    labels: list[int] = []
    for name, files in found.items():
        if files and name in names:
            paths += files
            labels += [names.index(name)] * len(files)
    if not paths:
        raise DataError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, names, set(empty) | set(unreadable)


def _has_class_folders(split: Path) -> bool:
    try:
        return split.is_dir() and any(d.is_dir() and not d.name.startswith(".")
                                      for d in split.iterdir())
    except OSError:
        return True  # an unreadable split: reading it as labeled gives the clear error


PHOTO_SIDE = 64  # the side of photos (images over AUTO_OWN_MOST) when nothing else chooses one
AUTO_OWN_MOST = 64  # folders whose median shorter side is at most this keep their own side
SideRule = Callable[[int, int], tuple[int, str]]  # (median side, images) -> (side, why)


def _first_process() -> bool:
    """Not one of torchrun's other processes (which read the same folder: one says so)."""
    return os.environ.get("RANK", "0") == "0"


def _sample(paths: Sequence[Path]) -> tuple[int, bool, bool]:
    """The median shorter side of the first ``AUTO_SIDE_SAMPLE`` images that open within the
    pixel limit (0: none does; one odd image, a 10000x1 strip first in the folder, does not set
    the side of every other), whether all of them are square, and whether all are of one size."""
    sizes: list[tuple[int, int]] = []
    for p in paths:
        try:
            with _open_checked(p) as im:
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 - a bad file: try the next
            continue
        if len(sizes) == AUTO_SIDE_SAMPLE:
            break
    if not sizes:
        return 0, True, True
    return (int(np.median([min(s) for s in sizes])), all(w == h for w, h in sizes),
            len(set(sizes)) == 1)


def _side(paths: list[Path], image_size: int, side_for: SideRule | None) -> tuple[int, int]:
    """The side S the images are read at and the frame side F of pretraining's whole images
    (0: none; a folder of square images is its centre crops). Given ``image_size``, that;
    else the images' own median shorter side when it is at most ``AUTO_OWN_MOST``; else
    photos: ``side_for``'s choice (the workflow's, from the machine and the budget), or
    ``PHOTO_SIDE``. Printed, with why."""
    median, square, one_size = _sample(paths)
    if median == 0:
        failed = [f"{p} ({_decode(p, 1).why})" for p in paths[:3]]
        raise DataError(f"none of the {len(paths)} files could be read as an image: "
                        f"{', '.join(failed)}{', ...' if len(paths) > 3 else ''}")
    if image_size:
        side, why = image_size, "--image-size"
    elif median <= AUTO_OWN_MOST:
        side, why = median, "their own"
    elif side_for is not None:
        side, why = side_for(median, len(paths))
    else:
        side, why = min(median, PHOTO_SIDE), "the default for photos"
    frame = 0 if square else 2 * side
    if not (square and one_size and median == side) and _first_process():
        kept = "shapes kept: crops drawn on each image's own shape, evaluation on the centred " \
               "square of its shorter side" if frame else "images of other sizes resized to it"
        print(f"images: median shorter side {median} px, read at {side} px ({why}); {kept}",
              flush=True)
    return side, frame


def _stored(paths: list[Path], root: Path, split: str, side: int, frame: int, bad_images: str
            ) -> tuple[torch.Tensor, Framed | None, list[int]]:
    """A split's images through the image store (``selfsup.store``): the centre crops, the
    framed whole images (or None), and the indices of the files that decoded."""
    from selfsup.store import open_store

    st = open_store(paths, root, split, side, frame, _decode, show=_first_process())
    if not st.kept:
        raise DataError(f"none of the {len(paths)} files could be read as an image: "
                        f"{', '.join(st.bad[:3])}")
    if st.bad:
        _bad(bad_images, f"{len(st.bad)} unreadable image file(s)"
             f"{'' if st.built else ' (found when the image store was built)'}", st.bad)
    frames = None if st.frames is None or st.shapes is None else \
        Framed(st.frames, st.shapes, st.centre)
    return st.centre, frames, st.kept


def load_image_folder(root: str | Path, image_size: int = 0, bad_images: str = "skip",
                      side_for: SideRule | None = None) -> ImageData:
    """Images from a folder: ``train/<class>/*`` and ``test/<class>/*``, or a flat folder.

    A folder with ``train/`` and ``test/`` subfolders of class folders gives a labeled data set
    (labels from folder names, sorted). Any other folder gives an unlabeled data set of every
    image under it (pretraining and embeddings only); when it holds only one of ``train/`` and
    ``test/`` with class folders, a warning says so. Files that are not images, not readable,
    or over the pixel limit, and sub-folders that cannot be read, are skipped with a counted
    warning (``bad_images="skip"``) or refused (``fail``); an empty class folder is named in a
    warning.

    Images are decoded once into the image store beside the data (``selfsup.store``) and
    mapped from there, at the side ``_side`` chooses: evaluation sees each image's centred
    square; photos of other shapes keep them for pretraining (``ImageData.frames``).

    Raises:
        DataError: the folder is missing or cannot be read, holds no readable image, or a bad
            file and ``fail``.
    """
    root = Path(root)
    _check_readable(root)
    train, test = root / "train", root / "test"
    labeled = [_has_class_folders(train), _has_class_folders(test)]
    if all(labeled):
        paths, labels, classes, left_out = _labeled_split(train, None, bad_images)
        test_paths, test_labels, _, _ = _labeled_split(test, classes, bad_images, left_out)
        side, frame = _side(paths, image_size, side_for)
        x, frames, kept = _stored(paths, root, "train", side, frame, bad_images)
        tx, _, test_kept = _stored(test_paths, root, "test", side, 0, bad_images)
        return ImageData(x, torch.tensor([labels[i] for i in kept]), tx,
                         torch.tensor([test_labels[i] for i in test_kept]), classes, root.name,
                         files={"train": [os.path.abspath(paths[i]) for i in kept],
                                "test": [os.path.abspath(test_paths[i]) for i in test_kept]},
                         frames=frames)
    if any(labeled):
        has, lacks = ("train", "test") if labeled[0] else ("test", "train")
        warnings.warn(f"{root} has {has}/ with class folders but no {lacks}/<class>/ folders: "
                      f"every image under it is read as one unlabeled set (no probe, no kNN). "
                      f"Add {lacks}/<class>/ folders to measure with labels.", stacklevel=2)
    paths = image_files(root, bad_images)
    if not paths:
        raise DataError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    side, frame = _side(paths, image_size, side_for)
    x, frames, kept = _stored(paths, root, "all", side, frame, bad_images)
    return ImageData(x, None, None, None, [], root.name,
                     files={"train": [os.path.abspath(paths[i]) for i in kept]}, frames=frames)


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


def channel_stats(x: torch.Tensor, chunk_pixels: int = 1 << 24
                  ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), in [0, 1] units, a chunk of
    about ``chunk_pixels`` values at a time (bounded memory at any image size)."""
    chunk = max(1, chunk_pixels // (3 * x.shape[2] * x.shape[3]))
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

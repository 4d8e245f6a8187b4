"""The data sets by name: ``load_dataset`` picks the reader (``selfsup.data`` for CIFAR, image
folders and digits; ``selfsup.stl10`` for STL-10). A new data set is a reader module and a line
here."""

from __future__ import annotations

from pathlib import Path

from selfsup.data import ImageData, load_cifar10, load_cifar100, load_digits, load_image_folder
from selfsup.errors import DataError
from selfsup.stl10 import load_stl10

DATASETS = ("cifar10", "cifar100", "stl10", "digits", "folder")


def load_dataset(name: str, data_dir: str | Path, image_size: int = 0,
                 download: bool = True, bad_images: str = "skip", *,
                 cifar100_labels: str = "fine", stl10_unlabeled: bool = True,
                 stl10_fold: int = -1) -> ImageData:
    """Load a data set by name (``DATASETS``): ``cifar10``, ``cifar100``, ``stl10``, ``digits``
    or ``folder`` (image folder at data_dir).

    Args:
        image_size: resize the images to this side (0: their own size; folders: the first's).
        cifar100_labels: ``fine`` (100 classes) or ``coarse`` (20).
        stl10_unlabeled: STL-10's 100,000 unlabeled images join the pretraining set.
        stl10_fold: STL-10's predefined fold of 1,000 labelled training images (0-9) that the
            probe, kNN and fine-tuning learn from; -1: all 5,000.

    Raises:
        DataError: anything wrong with the data, a file or folder that cannot be read or
            created (permissions, a file where a folder should be) included.
    """
    if name != "digits" and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; it must be the folder that holds "
                        f"(or will hold) the {name} data")
    try:
        if name == "cifar10":
            return load_cifar10(data_dir, download, image_size)
        if name == "cifar100":
            return load_cifar100(data_dir, download, cifar100_labels, image_size)
        if name == "stl10":
            return load_stl10(data_dir, download, image_size, stl10_unlabeled, stl10_fold)
        if name == "digits":
            return load_digits(image_size or 16)
        if name == "folder":
            return load_image_folder(data_dir, image_size, bad_images)
    except OSError as e:
        where = e.filename or data_dir
        raise DataError(f"cannot read the {name} data at {where}: "
                        f"{e.strerror or type(e).__name__}") from None
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")

"""The data sets by name: ``load_dataset`` picks the reader (``selfsup.data`` for CIFAR, image
folders and digits; ``selfsup.stl10`` for STL-10).

A data set is a function from a ``DataRequest`` (and its own settings) to ``ImageData``,
registered with ``@register_dataset(name, settings=..., defaults=...)`` in a module of this
package (every module here is imported; ``builtin`` holds selfsup's own) or of your own
(``SELFSUP_PLUGINS``, see ``selfsup.plugins``): one file, no other change.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfsup.config import PLUGINS, Config, Plugin, declare
from selfsup.data import ImageData, SideRule
from selfsup.errors import DataError


@dataclass(frozen=True)
class DataRequest:
    """What every data set is asked for."""

    data_dir: Path
    image_size: int = 0  # resize to this side (0: their own size; folders: the median)
    download: bool = True  # fetch the data when absent
    bad_images: str = "skip"  # image folders: skip unreadable files (counted), or fail
    pretraining: bool = True  # the images only pretraining uses (STL-10's unlabeled) too
    # photos (images larger than data.AUTO_OWN_MOST) with no image_size: (median side, images)
    # -> (side, why); the workflow's rule from the machine and the budget (sizing.photo_side)
    side_for: SideRule | None = None


Loader = Callable[[DataRequest, Any], ImageData]
DATASETS: dict[str, Loader] = {}
_NEEDS_FOLDER: dict[str, bool] = {}


def register_dataset(name: str, settings: type | None = None,
                     defaults: dict[str, Any] | None = None, folder: bool = True
                     ) -> Callable[[Loader], Loader]:
    """Decorator: make ``load(request, settings) -> ImageData`` the data set ``name``
    (``--dataset name``).

    Args:
        settings: a dataclass of ``config.setting`` fields, its own options; ``load`` gets
            them (None when it has none).
        defaults: values of the run's other fields that suit it better than the general ones
            (presets and options still win).
        folder: it reads ``--data-dir`` (which must then be a folder).
    """

    def deco(load: Loader) -> Loader:
        DATASETS[name] = load
        _NEEDS_FOLDER[name] = folder
        declare(Plugin("dataset", name, settings, dict(defaults or {})))
        return load

    return deco


def load_dataset(name: str, data_dir: str | Path, image_size: int = 0, download: bool = True,
                 bad_images: str = "skip", *, pretraining: bool = True,
                 side_for: SideRule | None = None, **settings: Any) -> ImageData:
    """Load a data set by name (``DATASETS``) with its own ``settings`` by name (their
    defaults where not given; e.g. ``cifar100_labels="coarse"``, ``stl10_fold=2``).

    Raises:
        DataError: anything wrong with the data, a file or folder that cannot be read or
            created (permissions, a file where a folder should be) included.
        TypeError: a setting the data set does not have.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if _NEEDS_FOLDER[name] and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; it must be the folder that holds "
                        f"(or will hold) the {name} data")
    own = PLUGINS["dataset"][name].settings
    chosen = own(**settings) if own is not None else None
    if own is None and settings:
        raise TypeError(f"dataset {name} has no settings; got {', '.join(settings)}")
    request = DataRequest(Path(data_dir), image_size, download, bad_images, pretraining,
                          side_for)
    try:
        return DATASETS[name](request, chosen)
    except OSError as e:
        where = e.filename or data_dir
        raise DataError(f"cannot read the {name} data at {where}: "
                        f"{e.strerror or type(e).__name__}") from None


def load_for(cfg: Config, pretraining: bool = False, side_for: SideRule | None = None
             ) -> ImageData:
    """The data set a config names, with its settings; the images only pretraining uses
    (STL-10's unlabeled) only when ``pretraining``; photos at ``side_for``'s side when the
    config names none."""
    own = PLUGINS["dataset"][cfg.dataset].settings
    settings = {} if own is None else dataclasses.asdict(cfg.of(own))
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.download,
                        cfg.bad_images, pretraining=pretraining, side_for=side_for, **settings)


# Each module registers its data sets when imported: selfsup's own first, then any other.
for _name in ("builtin", *sorted({m.name for m in pkgutil.iter_modules(__path__)} - {"builtin"})):
    importlib.import_module(f"selfsup.datasets.{_name}")

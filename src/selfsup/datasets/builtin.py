"""selfsup's own data sets: CIFAR-10, CIFAR-100, STL-10, the digits and image folders."""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.config import Range, setting
from selfsup.data import ImageData, load_cifar10, load_cifar100, load_digits, load_image_folder
from selfsup.datasets import DataRequest, register_dataset
from selfsup.stl10 import load_stl10


@register_dataset("cifar10")
def cifar10(req: DataRequest, settings: None) -> ImageData:
    return load_cifar10(req.data_dir, req.download, req.image_size)


@dataclass(frozen=True)
class Cifar100Settings:
    cifar100_labels: str = setting("fine", "fine (100 classes) or coarse (20 "
                                           "superclasses)", choices=("fine", "coarse"))


@register_dataset("cifar100", settings=Cifar100Settings)
def cifar100(req: DataRequest, settings: Cifar100Settings) -> ImageData:
    return load_cifar100(req.data_dir, req.download, settings.cifar100_labels, req.image_size)


@dataclass(frozen=True)
class STL10Settings:
    stl10_unlabeled: bool = setting(True, "pretrain on the 100,000 unlabeled images too")
    stl10_fold: int = setting(-1, "probe/kNN/fine-tune on predefined fold 0-9 (1,000 "
                                  "images); -1 = all 5,000", Range(-1, 9))


@register_dataset("stl10", settings=STL10Settings)
def stl10(req: DataRequest, settings: STL10Settings) -> ImageData:
    return load_stl10(req.data_dir, req.download, req.image_size,
                      settings.stl10_unlabeled and req.pretraining, settings.stl10_fold)


# 1,437 tiny 16x16 digits: smaller batches for more steps; no flips (a mirrored 2 is no 2).
# MoCo's queue: fewer keys than images, so that no image meets an old key of itself.
@register_dataset("digits", folder=False, defaults=dict(
    batch_size=256, epochs=40, flip_p=0.0, crop_scale_min=0.3, queue_size=1024))
def digits(req: DataRequest, settings: None) -> ImageData:
    return load_digits(req.image_size or 16)


@register_dataset("folder")
def folder(req: DataRequest, settings: None) -> ImageData:
    return load_image_folder(req.data_dir, req.image_size, req.bad_images, req.side_for)

"""Using a trained encoder from Python: ``load_encoder`` and embedding a folder of images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.augment import normalize, to_float
from selfsup.errors import DataError, SelfsupError
from selfsup.models import in_batches

FLOAT_MAX = 1.0 + 1e-3  # float input above this is taken for 0-255 and refused


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] as floats in [0, 1]; float images checked to be in [0, 1].

    Raises:
        ValueError: float images with values above 1 (0-255 floats would give wrong outputs
            without a word): divide them by 255, or pass them as uint8.
    """
    if images.dtype == torch.uint8:
        return to_float(images)
    top = float(images.max()) if images.numel() else 0.0
    if top > FLOAT_MAX:
        raise ValueError(f"float images must be in [0, 1], got values up to {top:g}: divide "
                         f"them by 255, or pass them as uint8 in [0, 255]")
    return images


def folder_chunks(folder: str | Path, size: int, bad_images: str = "skip"
                  ) -> Iterator[tuple[torch.Tensor, list[Path]]]:
    """Every image under ``folder``, in sorted path order, a chunk at a time (memory holds
    one, whatever the number of files): each chunk's images as evaluation sees them (upright by
    their EXIF orientation, the centred square of the shorter side at ``size`` px) and their
    paths. Unreadable files are skipped with a counted warning, or refused under
    ``bad_images="fail"``.

    Raises:
        DataError: no folder, one that cannot be read, no image in it, or a bad file under
            ``fail``.
    """
    from selfsup.data import IMAGE_SUFFIXES, decoded_chunks, image_files

    root = Path(folder)
    paths = image_files(root, bad_images)
    if not paths:
        raise DataError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    for x, kept in decoded_chunks(paths, size, bad_images):
        yield x, [paths[i] for i in kept]


class FeatureExtractor(nn.Module):
    """A trained encoder with its input normalisation: images in, features h out.

    Call it on a batch of images (B, 3, H, W), uint8 in [0, 255] or float in [0, 1]; it returns
    (B, feature_dim) features. Built by ``load_encoder`` in eval mode with gradients off; call
    ``.train()`` and ``.requires_grad_(True)`` to fine-tune it inside your own model.
    """

    def __init__(self, encoder: nn.Module, mean: list[float], std: list[float],
                 image_size: int, feature_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.image_size = image_size  # side of the images it was trained on
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of (B, 3, H, W) images: uint8 in [0, 255], or float in [0, 1].

        Raises:
            ValueError: float images with values above 1 (0-255 floats would give wrong
                features without a word): divide them by 255, or pass them as uint8.
        """
        return self.encoder(normalize(unit_float(images), self.mean, self.std))  # type: ignore[arg-type]

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Features (N, feature_dim) of images (N, 3, H, W), batch by batch, in eval mode."""
        dev = next(self.encoder.parameters()).device
        out = in_batches(lambda b: self(b).float(), images, batch_size, dev, self)
        return out.numpy() if out is not None else np.zeros((0, self.feature_dim), np.float32)

    def embed_folder(self, folder: str | Path, batch_size: int = 256, bad_images: str = "skip"
                     ) -> tuple[np.ndarray, list[Path]]:
        """Features of every image under ``folder`` (``folder_chunks``: upright, the centred
        square of the shorter side at the training side), in sorted path order, and those
        paths. Files that cannot be read (or exceed the pixel limit) are
        skipped with a counted warning, or refused when ``bad_images`` is ``fail``.

        Raises:
            DataError: no folder, one that cannot be read, no image in it, or a bad file under
                ``fail``.
        """
        feats: list[np.ndarray] = []
        paths: list[Path] = []
        for x, kept in folder_chunks(folder, self.image_size, bad_images):
            feats.append(self.embed(x, batch_size))
            paths += kept
        return np.concatenate(feats), paths


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Load a trained encoder (a run's ``encoder.pt``, the run folder, or a ``.safetensors`` file
    written by ``selfsup export``) for use in Python.

    Loading runs no code from the file (``weights_only``).

    Raises:
        CheckpointError: missing, damaged, or not a selfsup encoder.
    """
    from selfsup.checkpoint import ENCODER, load_encoder_file, pretrained_encoder

    path = Path(path)
    if path.is_dir():
        path = path / ENCODER
    saved = _from_safetensors(path) if path.suffix == ".safetensors" else load_encoder_file(path)
    size = int(saved.get("image_size", 32))
    fx = FeatureExtractor(pretrained_encoder(saved), saved["mean"], saved["std"], size,
                          int(saved["feature_dim"]))
    return fx.to(device).eval().requires_grad_(False)


def _from_safetensors(path: Path) -> dict[str, Any]:
    """The fields of an ``encoder.pt`` from an exported ``.safetensors`` file, checked as
    ``load_encoder_file`` checks them.

    Raises:
        CheckpointError: not a file selfsup exported, or weights that do not fit its config.
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from selfsup.checkpoint import check_input_fields, check_state_dict, expected_state
    from selfsup.config import config_from_dict
    from selfsup.errors import CheckpointError, ConfigError
    from selfsup.export import read_metadata

    try:
        meta = read_metadata(path)
        tensors = load_file(str(path))
        cfg = config_from_dict(json.loads(meta["config"]))
    except (SelfsupError, SafetensorError, OSError, KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: not an encoder exported by selfsup ({e})") from None
    mean, std = tensors.pop("normalize.mean", None), tensors.pop("normalize.std", None)
    shapes, feature_dim = expected_state(cfg)
    check_state_dict(tensors, shapes, str(path))
    if mean is None or std is None or mean.shape != (3,) or std.shape != (3,):
        raise CheckpointError(f"{path}: no input normalisation (normalize.mean/std)")
    side = meta.get("image_size", "32")
    saved = dict(state_dict=tensors, config=cfg.to_dict(), feature_dim=feature_dim,
                 mean=mean.tolist(), std=std.tolist(),
                 image_size=int(side) if side.isdigit() else side)
    check_input_fields(saved, str(path))
    return saved


class ImageClassifier(nn.Module):
    """A classifier trained by ``selfsup finetune`` (any mode): images in, class logits out.

    Call it on (B, 3, H, W) images, uint8 in [0, 255] or float in [0, 1], at the side it was
    trained on; ``classes`` names the logits' columns. Built by ``load_classifier`` in eval mode.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float],
                 classes: list[str], image_size: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.classes, self.image_size = list(classes), image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(unit_float(images), self.mean, self.std))  # type: ignore[arg-type, no-any-return]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class indices (N,) and class probabilities (N, C), in eval mode."""
        dev = next(self.model.parameters()).device
        out = in_batches(lambda b: torch.softmax(self(b).float(), 1), images, batch_size, dev,
                         self)
        probs = out.numpy() if out is not None else np.zeros((0, len(self.classes)), np.float32)
        return probs.argmax(1), probs

    def predict_folder(self, folder: str | Path, batch_size: int = 256,
                       bad_images: str = "skip") -> tuple[list[Path], np.ndarray, np.ndarray]:
        """Every image under ``folder`` (sorted, as ``folder_chunks`` reads them): their paths,
        predicted class indices and probabilities. Unreadable files are skipped with a
        counted warning (or refused under ``bad_images="fail"``).

        Raises:
            DataError: no folder, one that cannot be read, or no image in it.
        """
        chunks = [(kept, *self.predict(x, batch_size))
                  for x, kept in folder_chunks(folder, self.image_size, bad_images)]
        return ([p for kept, _, _ in chunks for p in kept],
                np.concatenate([labels for _, labels, _ in chunks]),
                np.concatenate([probs for _, _, probs in chunks]))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """Load a classifier written by ``selfsup finetune`` (``RUN/classifier_<mode>_<fraction>
    .pt``); loading runs no code from the file.

    Raises:
        CheckpointError: missing, damaged, or not a selfsup classifier.
    """
    from selfsup.checkpoint import (
        check_input_fields,
        check_state_dict,
        config_of,
        load_checkpoint,
    )
    from selfsup.errors import CheckpointError
    from selfsup.finetune import Classifier
    from selfsup.models import build_encoder, init_encoder

    path = Path(path)
    saved = load_checkpoint(path)
    classes = saved.get("classes")
    try:
        cfg = config_of(saved)
        if not isinstance(classes, list) or not classes or len(classes) > 1_000_000:
            raise KeyError("classes")
        check_input_fields(saved, str(path))
        with torch.device("meta"):  # the file's weights checked before anything is allocated
            shapes = Classifier(build_encoder(cfg.model, cfg.width, cfg.options), len(classes),
                                feature_norm=True).state_dict()
        check_state_dict(saved.get("state_dict"), dict(shapes), str(path))
        model = Classifier(init_encoder(cfg), len(classes), feature_norm=True)
        model.load_state_dict(saved["state_dict"])
        mean, std = [float(v) for v in saved["mean"]], [float(v) for v in saved["std"]]
    except (KeyError, TypeError, ValueError, RuntimeError, SelfsupError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a classifier written by selfsup finetune "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    fx = ImageClassifier(model, mean, std, [str(c) for c in classes],
                         int(saved.get("image_size", 32)))
    return fx.to(device).eval().requires_grad_(False)

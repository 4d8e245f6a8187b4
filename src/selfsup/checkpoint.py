"""Checkpoint and encoder files: written atomically, read safely (no code runs), checked field
by field against the network their config describes before anything is built from them.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.config import MIN_SIDE, RANGES, Config, config_from_dict, diff_keys, is_number
from selfsup.errors import CheckpointError, ConfigError
from selfsup.files import save_torch
from selfsup.models import Encoder, build_encoder, init_encoder

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"


# Lines of the loader's messages that give advice rather than the reason (never passed on).
_LOADER_ADVICE = ("weights_only", "weights only", "documentation", "file an issue", "trusted")


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint or encoder file safely (``weights_only=True``: no code runs).

    Args:
        mmap: map the file instead of reading it (for a quick look at a large file's config).

    Raises:
        CheckpointError: missing, damaged, holding objects other than tensors and plain data
            (refused: nothing in it runs), or not a selfsup file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():  # the loader's warnings about odd files ask for reports
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if isinstance(e, pickle.UnpicklingError) and any("GLOBAL" in ln for ln in lines):
            # The loader refused an object that is not a tensor or plain data. Its message
            # suggests loading the file unsafely; a file of unknown origin must never be, so
            # that advice is not passed on.
            raise CheckpointError(f"{path} was refused: it holds objects other than tensors "
                                  f"and plain data, which a selfsup file never does (nothing "
                                  f"in it was run)") from None
        detail = [ln for ln in lines if not any(w in ln.lower() for w in _LOADER_ADVICE)]
        why = detail[0][:200] if detail else "not a file selfsup can read"
        raise CheckpointError(f"{path} cannot be loaded: damaged or not a selfsup file "
                              f"({type(e).__name__}: {why})") from None
    if not isinstance(obj, dict) or "config" not in obj:
        raise CheckpointError(f"{path} is not a selfsup checkpoint")
    return obj


def checkpoint_config(saved: dict[str, Any], path: str | Path) -> Config:
    """The validated config inside a checkpoint or encoder file.

    Raises:
        CheckpointError: no config, or one selfsup does not accept (names the problem).
    """
    raw = saved.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is damaged: its config is not a mapping")
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path} is damaged: its config is invalid ({e})") from None


def config_of(saved: dict[str, Any]) -> Config:
    """The config inside a saved file already checked (a checkpoint, an encoder, a classifier):
    every place that reads one back reads it here."""
    return config_from_dict(saved["config"])


def check_resume(old: Config, new: Config, where: str | Path) -> None:
    """A resume continues the same run: only epochs/steps and run-time settings may change.

    Raises:
        CheckpointError: ``new`` changes what is trained (names the settings).
    """
    changed = diff_keys(old, new)
    if changed:
        raise CheckpointError(f"cannot resume {where} with changed {', '.join(changed)}; only "
                              f"epochs/steps and run-time settings may change")


def expected_state(cfg: Config) -> tuple[dict[str, torch.Tensor], int]:
    """Parameters and buffers of the config's encoder (shapes and dtypes only), and its feature
    width, made on the meta device: nothing is allocated, however large the config says the
    network is."""
    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.width, cfg.options)
    return dict(encoder.state_dict()), int(encoder.feature_dim)


def check_state_dict(state: Any, expected: dict[str, torch.Tensor], what: str,
                      part: str = "encoder") -> None:
    """The weights of ``part`` a file holds against the network's: names, shapes, kinds of
    number, and finite values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{what}: the {part} weights are not a mapping of names to tensors")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if state[k].shape != expected[k].shape
                   or state[k].is_floating_point() != expected[k].is_floating_point()
                   or state[k].is_complex())
    if missing or extra or wrong:
        parts = [f"{name} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", extra),
                                    ("wrong shape or type", wrong)) if keys]
        raise CheckpointError(f"{what}: the {part} weights do not fit the configured model "
                              f"({'; '.join(parts)})")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not
                 bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{what}: non-finite weights (NaN or Inf) in the {part}: "
                              f"{', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}")


def _check_stats(saved: dict[str, Any], key: str, what: str, positive: bool) -> None:
    v = saved.get(key)
    ok = (isinstance(v, list | tuple) and len(v) == 3
          and all(is_number(x) and math.isfinite(x)
                  and (x > 0 if positive else True) for x in v))
    if not ok:
        raise CheckpointError(f"{what}: '{key}' must be 3 finite numbers (one per colour "
                              f"channel{', each > 0' if positive else ''}), got {v!r:.80}")


def load_encoder_file(path: str | Path) -> dict[str, Any]:
    """An ``encoder.pt``, with every field checked against its config before any network is
    built: the weights' names and shapes, the feature width, the input normalisation and the
    image side.

    Raises:
        CheckpointError: missing, damaged, or a field that does not fit (names it).
    """
    saved = load_checkpoint(path)
    what = str(path)
    cfg = checkpoint_config(saved, path)
    shapes, feature_dim = expected_state(cfg)
    check_state_dict(saved.get("state_dict"), shapes, what)
    if saved.get("feature_dim") != feature_dim or isinstance(saved.get("feature_dim"), bool):
        raise CheckpointError(f"{what}: feature_dim {saved.get('feature_dim')!r:.40} does not "
                              f"match the model's {feature_dim}")
    check_input_fields(saved, what)
    return saved


# The image sides a saved network may declare: those a config's --image-size admits.
IMAGE_SIDE = (MIN_SIDE, int(RANGES["image_size"].hi))


def check_input_fields(saved: dict[str, Any], what: str) -> None:
    """The fields every saved network carries for its input (an encoder, a classifier, an
    export read back): the channel ``mean`` and ``std`` (3 finite numbers, std > 0) and the
    ``image_side`` (an integer in ``IMAGE_SIDE``).

    Raises:
        CheckpointError: names the field and what it must be.
    """
    _check_stats(saved, "mean", what, positive=False)
    _check_stats(saved, "std", what, positive=True)
    size = saved.get("image_size", 32)
    lo, hi = IMAGE_SIDE
    if not isinstance(size, int) or isinstance(size, bool) or not lo <= size <= hi:
        raise CheckpointError(f"{what}: image_size must be an integer in [{lo}, {hi}], got "
                              f"{size!r:.40}")


def save_encoder(path: str | Path, encoder: Encoder, cfg: Config, mean: list[float],
                 std: list[float], image_size: int) -> None:
    """``encoder.pt``: weights, config, feature width, the input normalisation and the side of
    the images it was trained on."""
    from selfsup import __version__

    save_torch(dict(state_dict=encoder.state_dict(), config=cfg.to_dict(),
                    feature_dim=encoder.feature_dim, mean=mean, std=std, image_size=image_size,
                    version=__version__), path)


def pretrained_encoder(saved: dict[str, Any], initial: bool = False) -> Encoder:
    """The encoder of an ``encoder.pt`` (as ``load_encoder_file`` checked it), in eval mode; with
    ``initial``, the same architecture at the initial weights pretraining started from (the
    untrained baseline)."""
    encoder = init_encoder(config_of(saved))
    if not initial:
        try:
            encoder.load_state_dict(saved["state_dict"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the encoder weights do not fit the configured model "
                                  f"({str(e).splitlines()[0]})") from None
    return encoder.eval()


def global_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and the GPUs' global random states, in types that load with
    ``weights_only=True``. selfsup draws from its own seeded generators; these are saved so that
    code added around it (or a library) that draws from the global ones resumes exactly too."""
    import random

    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = dict(
        python=[list(t) if isinstance(t, tuple) else t for t in random.getstate()],
        numpy=dict(keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``global_rng_state`` saved."""
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""A trained encoder as a file that runs outside selfsup: ONNX, TorchScript or safetensors.

Every format carries the input normalisation (the training set's channel mean and std) and
says, in its metadata, the feature width, the image side it was trained on, the model and the
run it came from.

- ``onnx``: a graph for onnxruntime (and any ONNX runtime): input ``images`` (batch, 3, H, W),
  uint8 in [0, 255] (``--input uint8``, the default) or float32 in [0, 1] (``--input float``), a
  dynamic batch dimension; output ``features`` (batch, feature_dim). Needs the ``onnx`` package
  (``pip install 'selfsup[onnx]'``).
- ``torchscript``: a module for ``torch.jit.load`` in any PyTorch program (or libtorch in C++):
  takes uint8 in [0, 255] or float in [0, 1], any batch size; metadata in the ``selfsup.json``
  extra file.
- ``safetensors``: the encoder's weights and the normalisation (``normalize.mean``,
  ``normalize.std``) with the config in the file's metadata; ``selfsup.load_encoder`` reads it
  back, and any safetensors reader reads the tensors.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.errors import ConfigError, SelfsupError

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
INPUTS = ("uint8", "float")
OPSET = 17


class _Normalized(nn.Module):
    """Images of one dtype in, features out: the graph ONNX records (its input has one dtype)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, encoder: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 uint8: bool) -> None:
        super().__init__()
        self.encoder, self.uint8 = encoder, uint8
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.uint8:
            x = x / 255.0
        return self.encoder((x - self.mean) / self.std)  # type: ignore[no-any-return]


class _AnyDtype(nn.Module):
    """uint8 in [0, 255] or float in [0, 1], decided at run time (TorchScript keeps the
    branch), into ``inner``, the traced ``_Normalized`` network for float input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        else:
            x = images.float()
        out: torch.Tensor = self.inner(x)
        return out


def _metadata(saved: dict[str, Any], run: Path, input_kind: str) -> dict[str, str]:
    from selfsup import __version__

    cfg = saved["config"]
    return {
        "producer": f"selfsup {__version__}",
        "run": run.name,
        "model": str(cfg["model"]),
        "width": str(cfg["width"]),
        "method": str(cfg["method"]),
        "feature_dim": str(int(saved["feature_dim"])),
        "image_size": str(int(saved.get("image_size", 32))),
        "input": input_kind,
        "mean": json.dumps([float(v) for v in saved["mean"]]),
        "std": json.dumps([float(v) for v in saved["std"]]),
        "config": json.dumps(cfg, sort_keys=True),
    }


def export_encoder(run: str | Path, fmt: str, out: str | Path | None = None,
                   input_kind: str = "uint8") -> Path:
    """Write the run's trained encoder in ``fmt``; returns the file written.

    Args:
        run: a run folder (or its ``encoder.pt``).
        fmt: one of ``FORMATS``.
        out: the file to write (default ``RUN/encoder.onnx``, ``.torchscript.pt`` or
            ``.safetensors``); written whole or not at all, never over the run's own files.
        input_kind: ONNX only: the input's dtype, ``uint8`` ([0, 255]) or ``float`` ([0, 1]).

    Raises:
        ConfigError: an unknown format or input, or a missing optional package (says which).
        CheckpointError: no usable ``encoder.pt``.
    """
    from selfsup.checkpoint import ENCODER, load_encoder_file, pretrained_encoder
    from selfsup.files import save_bytes

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if input_kind not in INPUTS:
        raise ConfigError(f"--input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
    path = Path(run)
    run_dir = path if path.is_dir() else path.parent
    target = check_export_path(Path(out) if out else run_dir / f"encoder{SUFFIX[fmt]}", fmt)
    saved = load_encoder_file(path / ENCODER if path.is_dir() else path)
    encoder = pretrained_encoder(saved).float().eval().requires_grad_(False)
    mean = torch.tensor(saved["mean"], dtype=torch.float32)
    std = torch.tensor(saved["std"], dtype=torch.float32)
    size = int(saved.get("image_size", 32))
    meta = _metadata(saved, run_dir, input_kind if fmt == "onnx" else "uint8 or float")
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    # Serialised in memory, then written atomically: a full or read-only disk is a message
    # and leaves no temporary file (the serialisers' own file writers can abort the process).
    if fmt == "safetensors":
        blob = _safetensors(encoder, mean, std, meta)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # tracing notes; the shapes are the trained ones
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Normalized(encoder, mean, std, uint8=False),
                                     example.float() / 255, check_trace=False)
            module = torch.jit.script(_AnyDtype(traced))
        buf = io.BytesIO()
        torch.jit.save(module, buf, _extra_files={"selfsup.json": json.dumps(meta)})
        blob = buf.getvalue()
    else:
        blob = _onnx(_Normalized(encoder, mean, std, input_kind == "uint8"),
                     example if input_kind == "uint8" else example.float() / 255, meta)
    save_bytes(blob, target)
    return target


def check_export_path(target: Path, fmt: str) -> Path:
    """Where an export may go (``files.check_output``): a name ending in the format's suffix,
    never over a file that is not an earlier export, inside a run folder only as
    ``*.onnx``, ``*.torchscript.pt`` or ``*.safetensors``.

    Raises:
        SelfsupError: says which rule and what to do.
    """
    from selfsup.files import check_output

    suffix = ".pt" if fmt == "torchscript" else SUFFIX[fmt]
    if not target.name.endswith(suffix) or target.name == suffix:
        raise SelfsupError(f"--out must name a {suffix} file for --format {fmt}, got "
                           f"{str(target)!r:.200}")

    def exported(p: Path) -> bool:
        try:
            return read_metadata(p).get("producer", "").startswith("selfsup")
        except SelfsupError:
            return False

    return check_output(target, "--out", exported, f"*{SUFFIX[fmt]} exports",
                        lambda name: name.endswith(SUFFIX[fmt]))


def _safetensors(encoder: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    tensors.update({"normalize.mean": mean, "normalize.std": std})
    return save(tensors, metadata=meta)


def _onnx(module: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    try:
        import onnx
    except ImportError:
        raise ConfigError("--format onnx needs the onnx package: pip install 'selfsup[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    with warnings.catch_warnings():  # the exporter's notes on tracing; the test runs the file
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(module, (example,), buf,  # type: ignore[arg-type]
                          input_names=["images"], output_names=["features"],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(model.SerializeToString())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an exported file carries (any of the three formats).

    Raises:
        SelfsupError: not a file selfsup exported.
    """
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            import onnx

            return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return dict(f.metadata() or {})
        files = {"selfsup.json": ""}
        torch.jit.load(str(path), _extra_files=files)
        return dict(json.loads(files["selfsup.json"]))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise SelfsupError(f"{path}: not an encoder selfsup exported ({e})") from None

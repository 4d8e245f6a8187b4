"""selfsup export: every registered encoder, every format, checked by running the file
(onnxruntime; TorchScript in a fresh process) on real images against PyTorch's features."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from selfsup import export, load_encoder
from selfsup.checkpoint import save_encoder
from selfsup.cli import main
from selfsup.config import make_config
from selfsup.errors import CheckpointError
from selfsup.evaluate import embed
from selfsup.models import ENCODERS, SmallCNN, init_encoder
from tests.helpers import PHOTO_SHAPES, write_photo


def _run_with(tmp_path, model, digits, **options):
    """A run folder holding an encoder.pt of ``model`` (with ``options``, e.g. feature_mult)
    whose batch norms have seen data."""
    cfg = make_config(None, {"model": model, "width": 4, "dataset": "digits", **options})
    enc = init_encoder(cfg)
    enc.train()
    with torch.no_grad():  # running statistics away from their initial 0 / 1
        enc(digits.train_x[:64].float() / 255)
    run = tmp_path / model
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_encoder(run / "encoder.pt", enc.eval(), cfg, [0.3, 0.4, 0.5], [0.2, 0.25, 0.3], 16)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    """Every encoder exported in every format, with PyTorch's features of 7 real images."""
    root = tmp_path_factory.mktemp("export")
    x = digits.test_x[:7]  # (7, 3, 16, 16) uint8: real handwritten digits
    out = {}
    for model in ENCODERS:
        run = _run_with(root, model, digits)
        ref = load_encoder(run).embed(x)
        files = {fmt: export.export_encoder(run, fmt) for fmt in export.FORMATS}
        files["onnx_float"] = export.export_encoder(run, "onnx", run / "f.onnx", "float")
        out[model] = (run, ref, files)
    return x, out


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_like_pytorch(exported):
    import onnxruntime as ort

    x, runs = exported
    for model, (_, ref, files) in runs.items():
        for key, feed in (("onnx", x.numpy()), ("onnx_float", x.numpy().astype(np.float32) / 255)):
            sess = ort.InferenceSession(str(files[key]), providers=["CPUExecutionProvider"])
            (inp,) = sess.get_inputs()
            assert inp.shape[0] == "batch" and inp.name == "images"
            got = sess.run(None, {"images": feed})[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"{model} {key}")
            one = sess.run(None, {"images": feed[:1]})[0]  # another batch size
            np.testing.assert_allclose(one, ref[:1], rtol=1e-4, atol=1e-4)
        meta = export.read_metadata(files["onnx"])
        assert meta["feature_dim"] == str(ref.shape[1]) and meta["model"] == model
        assert meta["input"] == "uint8" and meta["image_size"] == "16"


@pytest.mark.slow
def test_torchscript_runs_in_a_fresh_process(exported, tmp_path):
    x, runs = exported
    np.save(tmp_path / "x.npy", x.numpy())
    paths = {m: str(files["torchscript"]) for m, (_, _, files) in runs.items()}
    script = (
        "import json, sys, numpy as np, torch\n"
        "paths = json.loads(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "for name, p in paths.items():\n"
        "    m = torch.jit.load(p).eval()\n"
        "    with torch.no_grad():\n"
        "        np.save(f'{sys.argv[3]}/{name}-u8.npy', m(x).numpy())\n"
        "        np.save(f'{sys.argv[3]}/{name}-f.npy', m(x[:3].float() / 255).numpy())\n")
    subprocess.run([sys.executable, "-c", script, json.dumps(paths), str(tmp_path / "x.npy"),
                    str(tmp_path)], check=True, cwd=tmp_path)  # no selfsup import in there
    for model, (_, ref, files) in runs.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{model}-u8.npy"), ref, rtol=1e-4,
                                   atol=1e-4, err_msg=model)
        np.testing.assert_allclose(np.load(tmp_path / f"{model}-f.npy"), ref[:3], rtol=1e-4,
                                   atol=1e-4, err_msg=model)
        assert export.read_metadata(files["torchscript"])["feature_dim"] == str(ref.shape[1])


def test_safetensors_loads_back_to_the_same_features(exported):
    from safetensors import safe_open

    x, runs = exported
    for model, (_, ref, files) in runs.items():
        back = load_encoder(files["safetensors"])
        np.testing.assert_array_equal(back.embed(x), ref)
        with safe_open(str(files["safetensors"]), "pt") as f:
            assert "normalize.mean" in f.keys()  # noqa: SIM118 - a safetensors handle
            assert f.metadata()["feature_dim"] == str(ref.shape[1]), model


def test_damaged_safetensors_is_refused(exported, tmp_path):
    _, runs = exported
    good = runs["fast_cnn"][2]["safetensors"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not an encoder exported by selfsup"):
        load_encoder(bad)


def test_export_command(digits, tmp_path, capsys):
    run = _run_with(tmp_path, "fast_cnn", digits)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "e.onnx")]) == 0
    out = capsys.readouterr().out
    assert "e.onnx" in out and "features per image of 16x16 px" in out
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", str(run), "--format", "tflite"])
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_export_never_overwrites_the_run_s_files(digits, tmp_path):
    from selfsup.errors import SelfsupError

    run = _run_with(tmp_path, "fast_cnn", digits)
    before = (run / "encoder.pt").read_bytes()
    with pytest.raises(SelfsupError, match="not an earlier output of this command"):
        export.export_encoder(run, "torchscript", run / "encoder.pt")
    assert (run / "encoder.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["onnx-example", "python-example"])
def test_readme_python_examples_run_as_written(digits, tmp_path, marker):
    """The README's Python blocks, run as a user would: in a folder holding runs/NAME and
    my_photos/, in a fresh process."""
    import re
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "runs").mkdir()
    run = _run_with(tmp_path / "runs", "fast_cnn", digits)
    (run.parent / "NAME").symlink_to(run)
    export.export_encoder(run, "onnx")
    photos = tmp_path / "my_photos"
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(PHOTO_SHAPES):  # photos: of every shape, some stored turned
        pixels = np.asarray(Image.fromarray(digits.test_x[i].permute(1, 2, 0).numpy()).resize(
            (w * 12, h * 12)))
        pixels = np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        write_photo(photos / f"{i}{'.png' if i == 3 else '.jpg'}", pixels,
                    turned=(6, 0, 8, 0, 6)[i])
    script = block + "\nimport numpy as np\nnp.save('features.npy', np.asarray(feats if " \
                     "'feats' in dir() else features))\n"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    width = int(export.read_metadata(run / "encoder.onnx")["feature_dim"])
    got = np.load(tmp_path / "features.npy")
    assert got.shape == (len(PHOTO_SHAPES), width)
    # The example sees the photos as selfsup does: upright, aspect kept (a squashed or a
    # sideways photo gives other features).
    want, _ = load_encoder(run).embed_folder(photos)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99, cos


def test_float_images_above_one_are_refused(digits, tmp_path):
    fx = load_encoder(_run_with(tmp_path, "fast_cnn", digits))
    x = digits.test_x[:4]
    np.testing.assert_allclose(fx(x.float() / 255).detach().numpy(),
                               fx(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got values up to"):
        fx(x.float())  # 0-255 floats: wrong features, said, not silent


def test_a_widened_encoder_loads_back_at_its_width(tmp_path, digits):
    """feature_mult and pool are read back from the run's config: the loaded encoder has the
    mean and maximum of 16 w channels as features and computes what was saved."""
    run = _run_with(tmp_path, "fast_cnn", digits, feature_mult=16, pool="avgmax")
    saved = torch.load(run / "encoder.pt", weights_only=False)
    enc = SmallCNN(4, pool_first=True, feature_mult=16, pool="avgmax")  # apart from the config
    enc.load_state_dict(saved["state_dict"])
    x = digits.test_x[:3]  # uint8
    got = load_encoder(run).embed(x)
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, embed(enc.eval(), x, [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]),
                               rtol=1e-5, atol=1e-5)

"""Nothing lost, nothing executed: kills, full disks, NaNs, mismatched resumes, bad input, fuzz."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup import checkpoint, data, files, train
from selfsup.cli import main
from selfsup.config import config_from_dict, field_names, field_types, parse_duration
from selfsup.errors import CheckpointError, ConfigError, DataError, SelfsupError
from selfsup.methods import simclr
from tests.helpers import small_tmpfs, write_images

CHILD_ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
DIGITS = ["--dataset", "digits", "--width", "8", "--proj-hidden", "32", "--proj-dim", "16",
          "--batch-size", "128", "--no-progress", "--knn-every", "0", "--threads", "2"]


def _pretrain_cmd(out, name, *extra):
    return [sys.executable, "-m", "selfsup", "pretrain", *DIGITS, "--out-dir", str(out),
            "--name", name, *extra]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --- exact resume after SIGKILL ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method,delay", [("simclr", 0.0), ("moco", 0.7), ("byol", 0.35)])
def test_sigkill_at_random_moment_then_resume_is_bit_identical(tmp_path, method, delay):
    extra = ["--epochs", "10", "--checkpoint-every", "4", "--method", method]
    full = subprocess.run(_pretrain_cmd(tmp_path, "full", *extra), env=CHILD_ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    child = subprocess.Popen(_pretrain_cmd(tmp_path, "cut", *extra), env=CHILD_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ckpt.exists() and child.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut" / "encoder.pt").exists()
    ck = checkpoint.load_checkpoint(ckpt)  # never torn
    total = 10 * (1437 // 128)
    assert 0 < ck["step"] < total and ck["step"] % 4 == 0  # --checkpoint-every 4 alone
    resumed = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--resume",
                              str(tmp_path / "cut"), "--no-progress"], env=CHILD_ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {ckpt} at step {ck['step']}/{total}" in resumed.stdout
    a, b = _weights(tmp_path / "full" / "encoder.pt"), _weights(tmp_path / "cut" / "encoder.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, batch-norm buffers too
    np.testing.assert_array_equal(np.load(tmp_path / "full" / "loss.npy"),
                                  np.load(tmp_path / "cut" / "loss.npy"))
    # The method's whole state too: target networks, the queue and its pointer.
    a, b = (checkpoint.load_checkpoint(tmp_path / r / "checkpoint.pt") for r in ("full", "cut"))
    for part in ("head", "predictor", "target_encoder", "target_head", "queue"):
        assert (part in a) == (part in b)
        if part in a:
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_checkpoint_holds_every_random_state(digits, tmp_path):
    import random

    cfg = config_from_dict(dict(dataset="digits", width=8, epochs=1, batch_size=256,
                                proj_hidden=32, proj_dim=16, progress=False, knn_every=0))
    train.pretrain(cfg, digits, tmp_path / "r")
    ck = checkpoint.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert {"encoder", "head", "optimizer", "gen_state", "step", "losses", "config",
            "rng"} <= set(ck)
    assert {"python", "numpy", "torch"} <= set(ck["rng"])
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    checkpoint.set_global_rng_state(ck["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


# --- atomic writes -------------------------------------------------------------------------

_WRITER = """
import sys, torch
from selfsup.files import save_torch
i = 0
while True:
    i += 1
    save_torch({"i": i, "x": torch.full((300_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_writer_killed_midway_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "ck.pt"
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=CHILD_ENV,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()  # at least one complete file exists
        time.sleep(float(rng.uniform(0, 0.3)))
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        obj = torch.load(target, weights_only=True)  # loads: never torn
        assert torch.equal(obj["x"], torch.full((300_000,), float(obj["i"])))
        seen.add(obj["i"])
    assert len(seen) > 1  # the kills landed at different moments


def _fail_after(monkeypatch, calls_ok, exc):
    """Make the (calls_ok + 1)-th torch.save write a few bytes, then fail with ``exc``."""
    real = torch.save
    count = {"n": 0}

    def save(obj, f, *a, **k):
        count["n"] += 1
        if count["n"] > calls_ok:
            f.write(b"partial")
            raise exc
        return real(obj, f, *a, **k)

    monkeypatch.setattr(files.torch, "save", save)


def test_disk_full_keeps_previous_checkpoint_and_says_so(digits, tmp_path, monkeypatch):
    cfg = config_from_dict(dict(dataset="digits", width=8, epochs=3, batch_size=256,
                                proj_hidden=32, proj_dim=16, progress=False, knn_every=0,
                                checkpoint_every=1437 // 256))  # each epoch's end
    _fail_after(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SelfsupError, match="no space left on the device.*previous file is "
                                           "unchanged"):
        train.pretrain(cfg, digits, tmp_path / "r")
    monkeypatch.undo()
    ck = checkpoint.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ck["step"] == 1437 // 256  # the first epoch's checkpoint, intact
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.jsonl"]  # no litter


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        files.save_torch({"x": torch.zeros(1000)}, mnt / "ck.pt")
        with pytest.raises(SelfsupError, match="no space left.*previous file is unchanged"):
            files.save_torch({"x": torch.zeros(1_000_000)}, mnt / "ck.pt")
        assert torch.load(mnt / "ck.pt", weights_only=True)["x"].shape == (1000,)
        assert os.listdir(mnt) == ["ck.pt"]


# --- NaN guard -----------------------------------------------------------------------------


def test_nan_stops_names_step_keeps_last_good_checkpoint(digits, tmp_path, monkeypatch,
                                                          capsys):
    real = simclr.nt_xent
    calls = {"n": 0}

    def nan_at_15(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 15 else out

    monkeypatch.setattr(simclr, "nt_xent", nan_at_15)
    run = tmp_path / "runs" / "nan"
    code = main(["pretrain", "--dataset", "digits", "--width", "8", "--proj-hidden", "32",
                 "--proj-dim", "16", "--batch-size", "128", "--epochs", "3", "--no-progress",
                 "--knn-every", "0", "--checkpoint-every", "11", "--out-dir",
                 str(tmp_path / "runs"), "--name", "nan"])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 15" in err and "lower lr" in err and "fp32" in err
    assert "Traceback" not in err
    ck = checkpoint.load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 11  # end of epoch 1: the last good one
    assert all(torch.isfinite(v).all() for v in ck["encoder"].values() if v.is_floating_point())
    assert not (run / "encoder.pt").exists()


# --- resume mismatches, checkpoints of another model ---------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", *DIGITS, "--epochs", "1", "--out-dir", str(out), "--name",
                 "r"]) == 0
    return out / "r"


@pytest.mark.parametrize("option,value,key", [
    ("--model", "resnet18", "model"), ("--dataset", "cifar10", "dataset"),
    ("--proj-dim", "8", "proj_dim"), ("--temperature", "0.3", "temperature"),
])
def test_resume_refuses_a_different_run(short_run, capsys, option, value, key):
    assert main(["pretrain", "--resume", str(short_run), option, value]) == 2
    err = capsys.readouterr().err
    assert f"changed {key}" in err and "Traceback" not in err


def test_resume_with_more_epochs_is_allowed(short_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert checkpoint.load_checkpoint(run / "checkpoint.pt")["step"] == 2 * (1437 // 128)


def test_encoder_of_another_model_is_a_clear_error(short_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    saved = torch.load(run / "encoder.pt", weights_only=True)
    saved["config"]["model"] = "resnet18"
    torch.save(saved, run / "encoder.pt")
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "do not fit the configured model" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="do not fit"):
        __import__("selfsup").load_encoder(run)


def test_resume_without_checkpoint_or_of_nothing(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "no such folder" in err


# --- bad input -----------------------------------------------------------------------------


def _folder_with_junk(root):
    write_images(root, 4)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


def test_bad_images_skip_counts_them(tmp_path):
    root = _folder_with_junk(tmp_path / "imgs")
    with pytest.warns(UserWarning) as rec:
        d = data.load_image_folder(root)
    assert len(d.train_x) == 4
    msgs = " ".join(str(w.message) for w in rec)
    assert "1 file(s)" in msgs and "notes.txt" in msgs
    assert "1 unreadable image file(s)" in msgs and "broken.png" in msgs
    assert ".hidden" not in msgs


def test_bad_images_fail_refuses_them(tmp_path, capsys):
    root = _folder_with_junk(tmp_path / "imgs")
    with pytest.raises(DataError, match="not images.*notes.txt.*--bad-images skip"):
        data.load_image_folder(root, bad_images="fail")
    (root / "notes.txt").unlink()
    with pytest.raises(DataError, match="unreadable.*broken.png"):
        data.load_image_folder(root, bad_images="fail")
    assert main(["pretrain", "--dataset", "folder", "--data-dir", str(root), "--bad-images",
                 "fail", "--out-dir", str(tmp_path / "runs"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err


@pytest.mark.parametrize("make", ["missing", "empty", "only_junk"])
def test_unusable_folders(tmp_path, make):
    root = tmp_path / "imgs"
    if make != "missing":
        root.mkdir()
    if make == "only_junk":
        (root / "a.png").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError):
            data.load_image_folder(root)


@pytest.mark.parametrize("option,value,expect", [
    ("--batch-size", "1", "--batch-size must be an integer in [2, 65536], got 1"),
    ("--temperature", "0", "--temperature must be a number in [0.001, 100], got 0"),
    ("--temperature", "-1", "--temperature must be a number in [0.001, 100]"),
    ("--optimizer", "adam", "lars"),
    ("--bad-images", "maybe", "fail"),
])
def test_invalid_configs_are_clear_errors(tmp_path, capsys, option, value, expect):
    code = None
    try:
        code = main(["pretrain", "--dataset", "digits", option, value, "--out-dir",
                     str(tmp_path)])
    except SystemExit as e:  # argparse rejects values outside a choice list itself
        code = e.code
    assert code == 2
    assert expect in capsys.readouterr().err


# --- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_unpickler_loads_or_raises_data_error(blob):
    try:
        data.safe_unpickle(blob, "fuzz")
    except DataError:
        pass


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x80\x02}q\x00(", b"\x80\x02cnumpy\n"]))
def test_fuzz_cifar_batch_loads_or_raises_data_error(blob, prefix):
    try:
        x, y = data._cifar_batch(prefix + blob, "fuzz")
    except DataError:
        return
    assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)


@FUZZ
@given(blob=st.binary(min_size=0, max_size=300))
def test_fuzz_cifar_folder_with_a_random_batch_file(cifar_dir, monkeypatch, blob):
    target = cifar_dir / data.CIFAR10_DIR / "data_batch_3"
    original = target.read_bytes()
    try:
        target.write_bytes(blob)
        monkeypatch.setitem(data.CIFAR10_MD5, "data_batch_3", data.md5_of(target))
        with pytest.raises(DataError):
            data.load_cifar10(cifar_dir, download=False)
    finally:
        target.write_bytes(original)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_image_files_decode_or_skip(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("fuzz")
    write_images(root, 2)
    (root / "z.png").write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = data.load_image_folder(root)
    assert len(d.train_x) in (2, 3) and d.train_x.dtype == torch.uint8


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_checkpoint_loader_refuses_garbage(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("ck") / "c.pt"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(path)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.integers(), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(field_names() + ("bogus",)), _VALUES, max_size=6))
def test_fuzz_config_parser_gives_config_or_config_error(values):
    try:
        cfg = config_from_dict(values)
    except ConfigError:
        return
    types = field_types()
    for k, v in cfg.to_dict().items():  # whatever it accepted is well-typed
        assert isinstance(v, types[k]), (k, v)
    assert cfg.batch_size >= 2 and cfg.options["temperature"] > 0


@FUZZ
@given(st.text(max_size=10))
def test_fuzz_duration_parser(text):
    try:
        s = parse_duration(text)
    except ConfigError:
        return
    assert s > 0 and s == s


def test_metrics_json_written_atomically_is_valid(tmp_path):
    files.save_json({"a": 1}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

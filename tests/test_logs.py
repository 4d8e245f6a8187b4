"""metrics.jsonl and TensorBoard logs: one entry per step, flushed, right across a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfsup import config, logs
from selfsup.cli import main
from selfsup.errors import ConfigError

TINY = ["--dataset", "digits", "--width", "4", "--proj-hidden", "16", "--proj-dim", "8",
        "--batch-size", "128", "--view-size", "8", "--no-progress", "--tsne-points", "0"]


def _entries(run):
    return [json.loads(line) for line in (run / logs.JSONL).read_text().splitlines()]


def _check_log(run, total, checks):
    """Every step 1..total logged once, in order; the monitor's checks at ``checks``."""
    entries = _entries(run)
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, total + 1))
    assert [e["step"] for e in entries if "rankme" in e] == checks
    for e in entries:
        if "loss" in e:
            assert e["images_per_s"] > 0 and 0 <= e["views_share"] <= 1 and e["lr"] >= 0
            assert 0 <= e["read_share"] <= e["views_share"]
            assert e["epoch"] == pytest.approx(e["step"] / 11)
        else:
            assert 0 <= e["knn"] <= 1 and e["rankme"] >= 1


@pytest.mark.slow
def test_jsonl_has_every_step_and_every_check(tmp_path):
    run = tmp_path / "runs" / "j"
    assert main(["pretrain", *TINY, "--epochs", "2", "--out-dir", str(tmp_path / "runs"),
                 "--name", "j"]) == 0
    _check_log(run, 22, [0, 11, 22])
    # A resume that extends the run appends, without repeating a step.
    assert main(["pretrain", "--resume", str(run), "--epochs", "3"]) == 0
    _check_log(run, 33, [0, 11, 22, 33])


@pytest.mark.slow
def test_jsonl_after_sigkill_and_resume(tmp_path):
    """Killed mid-run (no chance to clean up): the resumed log drops what came after the last
    checkpoint and writes it again, so no step is missing or twice."""
    out = tmp_path / "runs"
    run = out / "k"
    cmd = [sys.executable, "-m", "selfsup", "pretrain", *TINY, "--epochs", "6",
           "--checkpoint-every", "4", "--out-dir", str(out), "--name", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = run / logs.JSONL
        if path.is_file() and sum(1 for line in path.read_text().splitlines()
                                  if '"loss"' in line) >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = [e["step"] for e in _entries(run) if "loss" in e]
    assert 30 <= len(logged) < 66, "the run ended before it was killed: nothing tested"
    assert main(["pretrain", "--resume", str(run)]) == 0
    _check_log(run, 66, [0, 11, 22, 33, 44, 55, 66])


@pytest.mark.slow
def test_tensorboard_events_read_back_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tb"
    assert main(["pretrain", *TINY, "--epochs", "1", "--log", "tensorboard", "--out-dir",
                 str(tmp_path / "runs"), "--name", "tb"]) == 0
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    acc = EventAccumulator(str(run / logs.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"pretrain/loss", "pretrain/lr", "pretrain/images_per_s", "pretrain/views_share",
            "pretrain/knn", "pretrain/rankme", "pretrain/alignment",
            "pretrain/uniformity"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("pretrain/loss")] == list(range(1, 23))
    assert [e.step for e in acc.Scalars("pretrain/rankme")] == [0, 11, 22]
    losses = [e["loss"] for e in _entries(run) if "loss" in e]
    assert [e.value for e in acc.Scalars("pretrain/loss")] == pytest.approx(losses, rel=1e-6)
    assert "augmentations" in tags["images"]


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'selfsup\[tensorboard\]'"):
        logs.check_tensorboard()
    assert config.CHOICES["log"] == logs.LOG_CHOICES

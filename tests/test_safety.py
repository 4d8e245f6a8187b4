"""What a user's data and a shared page are safe from: script in the report, reads and writes
through links, outputs written over files they did not make, two writers in one run folder,
interrupted work that cannot go on, tracebacks and blow-ups where a message belongs, and
foreign or bad values taken at their word.

Grouped by class of defect, in the order of the README's reliability section.
"""

import base64
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup import checkpoint, compare, data, files, logs
from selfsup.cli import main
from selfsup.errors import CheckpointError, SelfsupError
from selfsup.report import FIGURES, build_report
from tests.helpers import (
    DIGITS_ARGS,
    dump_dom,
    file_tree,
    find_browser,
    small_tmpfs,
    write_images,
)

CHILD_ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
DIGITS = DIGITS_ARGS
MARK = "data-pwned"
PAYLOAD = (f"<script>document.body.setAttribute('{MARK}','script')</script>"
           f"<img src=x onerror=\"document.body.setAttribute('{MARK}','img')\">")


@pytest.fixture
def run(finished_run):
    """A finished digits run (pretrained, evaluated, plotted, reported) with a classifier."""
    return finished_run


def _leaves(obj, path=()):
    """Every leaf of a JSON value, as a path of keys and indices."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _no_markup(page: str) -> None:
    assert "<script>document.body" not in page and "<img src=x" not in page


# --- 1. nothing from metrics.json runs in a page ------------------------------------------


def test_markup_in_any_field_of_metrics_json_never_reaches_the_page(run_copy):
    """Each leaf of metrics.json in turn holds markup: the report is either refused with a
    message (a number that is not one) or written with the markup as text."""
    m = json.loads((run_copy / "metrics.json").read_text())
    m["resumes"] = [dict(date="d", from_step=1, to_step=2, changed={"epochs": [1, 2]})]
    m["collapse_warning"] = "w"
    rendered = refused = 0
    for path in list(_leaves(m)):
        changed = json.loads(json.dumps(m))
        _set(changed, path, PAYLOAD)
        (run_copy / "metrics.json").write_text(json.dumps(changed))
        try:
            page = build_report(run_copy)
        except SelfsupError as e:
            assert "is damaged" in str(e) or "holds values" in str(e), (path, e)
            refused += 1
            continue
        _no_markup(page)
        rendered += 1
    assert rendered > 50 and refused > 10  # both kinds of field were tried


@pytest.mark.slow
def test_markup_in_a_compare_row_never_reaches_the_page(run, tmp_path):
    row = compare.method_row(run, 0.1, 1)
    bad = dict(row, **dict.fromkeys(("steps", "epochs", "images_per_s", "method", "linear",
                                     "knn", "linear_untrained", "few_labels_mean"), PAYLOAD))
    page = compare.write_page(tmp_path, [bad], dict(data=PAYLOAD, options=PAYLOAD, fraction=0.1,
                                                    subsets=1, machine=PAYLOAD)).read_text()
    _no_markup(page)


@pytest.mark.slow
def test_no_script_runs_in_a_real_browser(run_copy, tmp_path):
    """Every text field of metrics.json holds markup, and a copy of the page has markup
    pasted in unescaped (the page's policy must stop it too): Chromium runs none of it, and the
    page's own check script still runs."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (make test installs it from the Debian packages where "
                    "it can; set SELFSUP_BROWSER to use another)")
    m = json.loads((run_copy / "metrics.json").read_text())
    m["collapse_warning"] = "w"
    for path in list(_leaves(m)):
        leaf = m
        for key in path:
            leaf = leaf[key]
        if isinstance(leaf, str):
            _set(m, path, PAYLOAD)
    (run_copy / "metrics.json").write_text(json.dumps(m))
    assert main(["report", str(run_copy)]) == 0
    page = (run_copy / "report.html").read_text()
    pasted = tmp_path / "pasted.html"
    pasted.write_text(page.replace("</body>", PAYLOAD + "</body>"))
    row = compare.method_row(run_copy, 0.1, 1)
    (tmp_path / "cmp").mkdir()
    cmp = compare.write_page(tmp_path / "cmp", [dict(row, steps=PAYLOAD, budget=None)],
                             dict(data=PAYLOAD, options="o", fraction=0.1, subsets=1,
                                  machine="m"))
    for target in (run_copy / "report.html", pasted, cmp):
        dom = dump_dom(browser, target, tmp_path / "profile")
        assert MARK not in dom.split("<body", 1)[1].split(">", 1)[0], target
    dom = dump_dom(browser, run_copy / "report.html", tmp_path / "profile")
    assert "data-images-shown=" in dom and 'data-errors="0"' in dom


# --- 2. nothing read or written through a link that leaves the run folder --------------------


def test_report_embeds_only_the_figures_the_run_drew(run_copy, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n-----BEGIN PRIVATE KEY----- secret")
    (run_copy / "zz.png").symlink_to(secret)
    (run_copy / "mine.png").write_bytes(secret.read_bytes())  # not a figure selfsup draws
    (run_copy / "pca.png").unlink()
    (run_copy / "pca.png").symlink_to(secret)  # a drawn figure replaced by a link
    assert main(["report", str(run_copy)]) == 0
    page = (run_copy / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in page
    assert "pca.png is not shown (a link that leads out of the run folder)" in page
    drawn = [f for f, _ in FIGURES if (run_copy / f).is_file() and f != "pca.png"]
    assert len(drawn) >= 4 and page.count("data:image/png;base64,") == len(drawn)


def test_tensorboard_and_log_never_written_through_links(run_copy, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_copy / "tensorboard").symlink_to(elsewhere)
    assert main(["pretrain", "--resume", str(run_copy), "--epochs", "2", "--log",
                 "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "leads out of" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []
    (run_copy / "tensorboard").unlink()
    outside = tmp_path / "notes.txt"
    outside.write_text("mine")
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(outside)
    assert main(["pretrain", "--resume", str(run_copy), "--epochs", "2"]) == 2
    assert "metrics.jsonl is a link that leads out of" in capsys.readouterr().err
    assert outside.read_text() == "mine"


# --- 3. no output written over a file it did not make; one writer per run folder ----------


def test_exports_and_embeddings_never_replace_other_files(run, tmp_path, capsys):
    other = tmp_path / "Z"
    shutil.copytree(run, other)
    images = tmp_path / "imgs"
    write_images(images, 3, size=16)
    before = file_tree(run), file_tree(other)
    attempts = [
        *(["export", str(run), "--format", "safetensors", "--out", str(run / n)]
          for n in ("config.json", "metrics.json", "train_emb.npy")),
        ["export", str(run), "--format", "safetensors", "--out", str(run / "tensorboard")],
        ["export", str(run), "--format", "torchscript", "--out", str(other / "encoder.pt")],
        ["embed", str(run), "--images", str(images), "--out", str(other / "train_emb.npy")],
        ["embed", str(run), "--images", str(images), "--out", str(other / "test_lbl.npy")],
        ["embed", str(run), "--images", str(images), "--out", str(tmp_path / "x" / "f.npy")],
        ["predict", str(run / "classifier_linear_0.1.pt"), "--images", str(images), "--out",
         str(other / "metrics.csv")],
    ]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f.npy").write_bytes(b"someone's array")
    (run / "tensorboard").mkdir()
    try:
        for argv in attempts:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "--out" in err and "Traceback" not in err, err
    finally:
        (run / "tensorboard").rmdir()
    assert (file_tree(run), file_tree(other)) == before
    assert (tmp_path / "x" / "f.npy").read_bytes() == b"someone's array"
    # An earlier output of the same command may be written again.
    target = tmp_path / "e.safetensors"
    for _ in range(2):
        assert main(["export", str(run), "--format", "safetensors", "--out", str(target)]) == 0
    for _ in range(2):
        assert main(["embed", str(run), "--images", str(images), "--out",
                     str(tmp_path / "f.npy")]) == 0


def test_output_names_too_long_are_refused_before_the_work(run, tmp_path, capsys):
    images = tmp_path / ("p" * 245)
    write_images(images, 2, size=16)
    out = tmp_path / "o"
    out.mkdir()
    assert main(["embed", str(run), "--images", str(images), "--out", str(out / "f.npy")]) == 0
    for argv in (["embed", str(run), "--images", str(images)],
                 ["predict", str(run / "classifier_linear_0.1.pt"), "--images", str(images)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "file systems allow at most 255" in err and "Traceback" not in err


def test_export_to_a_read_only_folder_is_a_message_and_leaves_nothing(run, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the full-disk test covers this path")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["export", str(run), "--format", "torchscript", "--out",
                     str(ro / "e.pt")]) == 2
        assert "cannot write" in capsys.readouterr().err and os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_export_on_a_full_or_read_only_disk_is_a_message_and_leaves_nothing(run, tmp_path, capsys):
    for read_only, why in ((False, "no space left"), (True, "Read-only file system")):
        with small_tmpfs(tmp_path / f"small{read_only}", "64k", read_only) as mnt:
            for fmt, name in (("torchscript", "e.pt"), ("onnx", "e.onnx"),
                              ("safetensors", "e.safetensors")):
                assert main(["export", str(run), "--format", fmt, "--out",
                             str(mnt / name)]) == 2
                err = capsys.readouterr().err
                assert why in err and "Traceback" not in err
                assert os.listdir(mnt) == []
            if read_only:
                assert main(["pretrain", *DIGITS, "--out-dir", str(mnt), "--name", "r"]) == 2
                err = capsys.readouterr().err
                assert "cannot lock" in err and "read-only" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_run_folder_being_written_is_refused_to_a_second_writer(run_copy, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from selfsup.files import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(run_copy)], env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = file_tree(run_copy)
        write_images(tmp_path / "imgs", 2, size=16)
        for argv in (["pretrain", "--resume", str(run_copy), "--epochs", "2"],
                     ["evaluate", str(run_copy)], ["report", str(run_copy)],
                     ["finetune", str(run_copy), "--freeze"],
                     ["predict", str(run_copy / "classifier_linear_0.1.pt"), "--images",
                      str(tmp_path / "imgs")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"being written by another selfsup process (pid {holder.pid})" in err
        assert file_tree(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(run_copy)]) == 0  # a killed holder's lock is gone with it


@pytest.mark.slow
def test_two_runs_of_one_name_started_together_one_is_refused(tmp_path):
    argv = [sys.executable, "-m", "selfsup", "pretrain", *DIGITS, "--epochs", "2",
            "--out-dir", str(tmp_path), "--name", "race"]
    procs = [subprocess.Popen(argv, env=CHILD_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "another selfsup process" in err or "already holds a run" in err \
        or "not empty" in err
    cfg = json.loads((tmp_path / "race" / "config.json").read_text())
    assert checkpoint.checkpoint_config(checkpoint.load_checkpoint(
        tmp_path / "race" / "encoder.pt"), "e").to_dict() == cfg


# --- 4. interrupted work goes on ---------------------------------------------------------


def _leftovers(folder: Path) -> None:
    """What a run killed with SIGKILL before its first checkpoint leaves."""
    from selfsup.config import make_config

    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    (folder / ".checkpoint.pt.abc.tmp").write_bytes(b"torn")
    (folder / files.LOCK).write_text("12345")
    (folder / "config.json").write_text(json.dumps(make_config(None, {
        "dataset": "digits", "name": folder.name}).to_dict()))


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    _leftovers(tmp_path / "k4")
    assert main(["pretrain", "--resume", str(tmp_path / "k4")]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and "--name k4" in err
    assert main(["pretrain", *DIGITS, "--epochs", "1", "--out-dir", str(tmp_path),
                 "--name", "k4"]) == 0
    assert "starting it again" in capsys.readouterr().out
    assert (tmp_path / "k4" / "encoder.pt").is_file()
    assert not list((tmp_path / "k4").glob("*.tmp"))
    lines = (tmp_path / "k4" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 12))
    # Someone's own folder with a config.json is still never taken for leftovers.
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.json").write_text('{"my": "settings"}')
    assert main(["pretrain", *DIGITS, "--out-dir", str(tmp_path), "--name", "mine"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_compare_killed_as_a_method_started_runs_again(tmp_path, capsys):
    folder = tmp_path / "cmp"
    _leftovers(folder / "simclr")
    argv = ["compare", "--methods", "simclr", *DIGITS, "--epochs", "1", "--tsne-points", "0",
            "--out-dir", str(tmp_path), "--name", "cmp"]
    assert main(argv) == 0
    assert (folder / "compare.html").is_file() and (folder / "simclr" / "encoder.pt").is_file()
    # Anything else in a method's folder is named, not "cannot resume" forever.
    (folder / "simclr" / "encoder.pt").unlink()
    (folder / "simclr" / "checkpoint.pt").unlink()
    assert main(argv) == 2
    assert f"{folder / 'simclr'} exists and is not empty" in capsys.readouterr().err


def test_a_budget_that_buys_more_steps_than_a_run_may_take_is_refused(run_copy, capsys):
    ck = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ck["seconds_per_step"] = 1e-4  # a fast-stepping run
    files.save_torch(ck, run_copy / "checkpoint.pt")
    before = (run_copy / "checkpoint.pt").read_bytes()
    assert main(["pretrain", "--resume", str(run_copy), "--budget", "720h"]) == 2
    err = capsys.readouterr().err
    assert "--budget 720h at this run's 0.1 ms per step buys 25," in err
    assert "steps, more than the 1,000,000,000 a run may take" in err
    assert (run_copy / "checkpoint.pt").read_bytes() == before


class _FullDisk:
    """A log file that takes ``room`` writes, then fails as a full disk does."""

    def __init__(self, real, room: int) -> None:
        self.real, self.room = real, room

    def write(self, text: str) -> int:
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self.real.write(text))

    def flush(self) -> None:
        self.real.flush()

    def close(self) -> None:
        self.real.close()


@pytest.mark.slow
def test_a_full_disk_mid_run_is_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                        capsys):
    real_open = open
    monkeypatch.setattr(logs, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), 15),
                        raising=False)
    assert main(["pretrain", *DIGITS, "--epochs", "3", "--checkpoint-every", "11",
                 "--out-dir", str(tmp_path), "--name", "full"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "--resume" in err
    assert "Traceback" not in err
    ck = checkpoint.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ck["step"] == 11  # the end of epoch 1, whole
    monkeypatch.undo()
    assert main(["pretrain", "--resume", str(tmp_path / "full")]) == 0


@pytest.mark.slow
def test_a_full_disk_on_a_real_small_filesystem_keeps_the_checkpoint(tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        assert main(["pretrain", *DIGITS, "--epochs", "1", "--out-dir", str(mnt),
                     "--name", "r"]) == 0
        good = (mnt / "r" / "checkpoint.pt").read_bytes()
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 16384))
        assert main(["pretrain", "--resume", str(mnt / "r"), "--epochs", "40"]) == 2
        err = capsys.readouterr().err
        assert "no space left" in err and "Traceback" not in err
        assert (mnt / "r" / "checkpoint.pt").read_bytes() == good


# --- 5. a message, never a traceback, a hang or a blow-up ----------------------------------


def test_deeply_nested_json_is_a_message(run_copy, capsys):
    for name in ("metrics.json", "config.json"):
        saved = (run_copy / name).read_bytes()
        (run_copy / name).write_text("[" * 200_000 + "]" * 200_000)
        assert main(["report", str(run_copy)]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and "Recursion" not in err
        (run_copy / name).write_bytes(saved)


@pytest.mark.slow
def test_a_metrics_json_that_is_a_fifo_does_not_hang(run_copy):
    (run_copy / "metrics.json").unlink()
    os.mkfifo(run_copy / "metrics.json")
    p = subprocess.run([sys.executable, "-m", "selfsup", "plot", str(run_copy)], env=CHILD_ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr[-500:]


@pytest.mark.parametrize("where,value,named", [
    (("pretrain", "train_seconds"), "1.5", "pretrain.train_seconds"),
    (("knn", "k"), "<b>200</b>", "knn.k"),
    (("time_s", "load_data"), None, "time_s.load_data"),
    (("quality_history",), [dict(step=0, rankme="high")], "quality_history[0].rankme"),
    (("finetune", "linear_0.1", "steps"), "many", "finetune.linear_0.1.steps")])
def test_strings_where_numbers_belong_in_metrics_json(run_copy, capsys, where, value, named):
    m = json.loads((run_copy / "metrics.json").read_text())
    _set(m, where, value)
    (run_copy / "metrics.json").write_text(json.dumps(m))
    before = file_tree(run_copy)
    assert main(["pretrain", "--resume", str(run_copy), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{named} is not a number" in err and "Traceback" not in err
    assert file_tree(run_copy) == before  # refused before training


def test_strings_in_a_checkpoint_history_are_a_message(run_copy, capsys):
    ck = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ck["quality_history"] = [dict(step="x", epoch=0.0, rankme="high", alignment=0.1,
                                  uniformity=0.1, feature_dim=64.0)]
    files.save_torch(ck, run_copy / "checkpoint.pt")
    assert main(["pretrain", "--resume", str(run_copy), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "quality_history is not a list of records of numbers" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["shape", "object", "rows"])
def test_damaged_embeddings_are_a_message(run_copy, capsys, damage):
    path = run_copy / "train_emb.npy"
    good = np.load(path)
    if damage == "shape":
        np.save(path, good.reshape(-1))
    elif damage == "object":
        np.save(path, np.array([{"a": 1}] * len(good), dtype=object), allow_pickle=True)
    else:
        np.save(path, good[:-3])
    with pytest.raises(SelfsupError, match="train_emb.npy"):
        compare.few_label_probe(run_copy, 0.1, 1)
    assert main(["label-efficiency", str(run_copy), "--fractions", "0.1", "--epochs", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train_emb.npy" in err and "Traceback" not in err


def _edit_classifier(run: Path, tmp_path: Path, **change) -> Path:
    saved = torch.load(run / "classifier_linear_0.1.pt", weights_only=True)
    saved.update(change)
    path = tmp_path / "classifier_linear_0.1.pt"
    files.save_torch(saved, path)
    return path


@pytest.mark.parametrize("change,expect", [
    (dict(image_size="x"), "image_size must be an integer in [8, 4096]"),
    (dict(image_size=float("inf")), "image_size must be an integer"),
    (dict(image_size=-5), "image_size must be an integer"),
    (dict(mean=[0.5]), "'mean' must be 3 finite numbers"),
    (dict(std=[0.0, 0.0, 0.0]), "'std' must be 3 finite numbers"),
])
def test_classifier_fields_are_checked_at_load(run, tmp_path, capsys, change, expect):
    images = tmp_path / "imgs"
    write_images(images, 2, size=16)
    path = _edit_classifier(run, tmp_path, **change)
    assert main(["predict", str(path), "--images", str(images)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.slow
def test_a_small_classifier_claiming_a_huge_network_allocates_nothing(run, tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the child's peak memory from /proc (Linux)")
    saved = torch.load(run / "classifier_linear_0.1.pt", weights_only=True)
    saved["config"] = dict(saved["config"], model="resnet50", width=1024)
    files.save_torch(saved, tmp_path / "classifier_linear_0.1.pt")
    # The child's own peak (VmHWM), not getrusage's ru_maxrss: on Linux that carries the
    # parent's peak across exec, so it read 14 GB once the test process had been that large.
    code = ("import sys\nfrom selfsup import load_classifier\n"
            "from selfsup.errors import CheckpointError\n"
            "try:\n    load_classifier(sys.argv[1])\nexcept CheckpointError as e:\n"
            "    print('refused:', e)\n"
            "print(next(int(line.split()[1]) for line in open('/proc/self/status')\n"
            "           if line.startswith('VmHWM:')) // 1024)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "classifier_linear_0.1.pt")],
                       env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    out = p.stdout.splitlines()
    assert out[0].startswith("refused:") and "do not fit" in out[0], p.stdout + p.stderr
    assert int(out[-1]) < 1500  # MB at the peak: the 5 GB network was never built


def test_safetensors_fields_are_checked_at_load(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from selfsup import load_encoder

    path = tmp_path / "e.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(path)]) == 0
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    for change, expect in ((dict(image_size="-3"), "image_size"),
                           (dict(image_size="100000"), "image_size"),
                           ({"normalize.std": torch.zeros(3)}, "'std'")):
        t = dict(tensors, **{k: v for k, v in change.items() if isinstance(v, torch.Tensor)})
        mt = dict(meta, **{k: v for k, v in change.items() if isinstance(v, str)})
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=mt)
        with pytest.raises(CheckpointError, match=re.escape(expect)):
            load_encoder(tmp_path / "bad.safetensors")


def test_sizes_are_checked_against_memory_before_any_work(tmp_path, capsys):
    assert main(["pretrain", *DIGITS, "--view-size", "4096", "--batch-size", "64",
                 "--out-dir", str(tmp_path), "--name", "big"]) == 2
    err = capsys.readouterr().err
    assert "--view-size 4096 at --batch-size 64" in err and "GiB of activations" in err
    assert not (tmp_path / "big").exists()


def test_one_odd_image_does_not_set_the_side_of_every_other(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    write_images(folder, 4, size=24)
    Image.new("RGB", (10000, 1)).save(folder / "+strip.png")  # sorted first
    x, kept = data.decode_images(data.image_files(folder), 0)
    assert x.shape[1:] == (3, 24, 24) and len(kept) == 5


# --- 6. foreign or bad values are refused ---------------------------------------------------


def test_another_runs_checkpoint_or_encoder_is_refused(run_copy, tmp_path, capsys):
    assert main(["pretrain", *DIGITS, "--width", "4", "--epochs", "1", "--out-dir",
                 str(tmp_path), "--name", "w4"]) == 0
    for name, argv in (("checkpoint.pt", ["pretrain", "--resume", str(run_copy), "--epochs",
                                          "2"]),
                       ("encoder.pt", ["evaluate", str(run_copy)])):
        saved = (run_copy / name).read_bytes()
        shutil.copy(tmp_path / "w4" / name, run_copy / name)
        before = file_tree(run_copy)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{name} does not belong to {run_copy}" in err and "width" in err
        assert file_tree(run_copy) == before
        (run_copy / name).write_bytes(saved)


def test_image_sizes_are_applied_or_refused(tmp_path, capsys):
    from selfsup.datasets import load_dataset

    assert load_dataset("digits", tmp_path, 32).train_x.shape[-1] == 32
    assert main(["pretrain", *DIGITS, "--image-size", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--image-size must be 0 (the images' own side) or an integer in [8, 4096], got 1" \
        in capsys.readouterr().err


def test_messages_name_the_real_problem(run, tmp_path, capsys):
    images = tmp_path / "imgs"
    write_images(images, 2, size=16)
    assert main(["predict", str(run), "--images", str(images)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a classifier" in err and "classifier_linear_0.1.pt" in err
    (tmp_path / "afile").write_text("x")
    assert main(["pretrain", "--dataset", "cifar10", "--data-dir", str(tmp_path / "afile"),
                 "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "is a file; it must be the folder" in err and "File exists" not in err


def test_a_link_loop_in_a_class_folder_adds_no_other_class(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            write_images(root / split / cls, n, size=12, seed=ord(cls))
    (root / "train" / "a" / "loop").symlink_to(root / "train")
    (root / "train" / "a" / "sister").symlink_to(root / "train" / "b")
    with pytest.warns(UserWarning) as caught:
        d = data.load_image_folder(root)
    assert np.bincount(d.train_y.numpy()).tolist() == [4, 4]
    said = " ".join(str(w.message) for w in caught)
    assert "a link to a folder above it" in said and "into another class folder" in said

"""End to end through the command, on CIFAR-format files generated in the real layout."""

import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

from selfsup import data, report
from selfsup.cli import main

OUTPUTS = ("encoder.pt", "checkpoint.pt", "train_emb.npy", "test_emb.npy", "train_lbl.npy",
           "test_lbl.npy", "loss.npy", "config.json", "metrics.json", "loss.png", "confusion.png",
           "pca.png", "tsne.png", "augmentations.png")
SMALL = ["--epochs", "2", "--batch-size", "32", "--width", "4", "--proj-hidden", "16",
         "--proj-dim", "8", "--tsne-points", "40", "--no-progress", "--view-size", "16"]


def _run(tmp_path, data_dir, *extra, name="e2e"):
    return main(["run", "--dataset", "cifar10", "--data-dir", str(data_dir), "--out-dir",
                 str(tmp_path / "runs"), "--name", name, *SMALL, *extra])


@pytest.mark.slow
def test_run_end_to_end_writes_everything(cifar_dir, tmp_path, capsys):
    assert _run(tmp_path, cifar_dir) == 0
    run = tmp_path / "runs" / "e2e"
    for f in OUTPUTS:
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    for key in ("linear_probe", "knn"):
        assert 0 <= m[key]["trained"] <= 1 and 0 <= m[key]["untrained"] <= 1
    for stage in ("load_data", "pretrain", "embed", "linear_probe", "knn", "plots", "total"):
        assert m["time_s"][stage] >= 0, stage
    assert m["pretrain"]["steps"] == 2 * (100 // 32) and m["pretrain"]["images_per_s"] > 0
    assert m["machine"]["cpu_capability"] and m["machine"]["threads"] >= 1
    emb, lbl = np.load(run / "train_emb.npy"), np.load(run / "train_lbl.npy")
    assert emb.shape == (100, 32) and lbl.shape == (100,)
    assert np.load(run / "test_emb.npy").shape == (20, 32)
    assert len(np.load(run / "loss.npy")) == m["pretrain"]["steps"]
    out = capsys.readouterr().out
    assert "linear probe" in out and "untrained" in out and '"batch_size": 32' in out
    # The parts again, on the finished run.
    assert main(["evaluate", str(run)]) == 0
    assert main(["plot", str(run)]) == 0
    # A second run under the same name is refused; resume with more epochs is allowed.
    assert _run(tmp_path, cifar_dir) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--epochs", "3"]) == 0
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["pretrain"]["steps"] == 3 * (100 // 32)
    assert main(["pretrain", "--resume", str(run), "--width", "8"]) == 2
    assert "changed width" in capsys.readouterr().err


@pytest.mark.slow
def test_run_from_archive(cifar_archive, tmp_path):
    assert _run(tmp_path, cifar_archive, "--model", "resnet18") == 0
    assert (tmp_path / "runs" / "e2e" / "tsne.png").is_file()


@pytest.mark.parametrize("damage,expect", [
    ("md5", "is damaged or incomplete: MD5"),
    ("truncate", "is damaged or incomplete: MD5"),
    ("pickle", "refused"),
])
def test_bad_cifar_files_give_clear_errors(cifar_dir, tmp_path, capsys, monkeypatch, damage,
                                           expect):
    import pickle

    target = cifar_dir / data.CIFAR10_DIR / "data_batch_2"
    if damage == "md5":
        target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:
        class Evil:
            def __reduce__(self):
                return (exec, ("open('pwned', 'w').write('x')",))

        target.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
        monkeypatch.setattr(data, "CIFAR10_MD5", {**data.CIFAR10_MD5,
                                                   "data_batch_2": data.md5_of(target)})
    monkeypatch.chdir(tmp_path)
    assert _run(tmp_path, cifar_dir) == 2
    err = capsys.readouterr().err
    assert expect in err and "data_batch_2" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_missing_cifar_offline(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    assert _run(tmp_path, tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "get it from" in err and "Traceback" not in err


@pytest.mark.slow
def test_console_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "selfsup", "run", "--dataset", "cifar10",
                        "--data-dir", str(tmp_path), "--no-download", "--out-dir",
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "CIFAR-10 not found" in p.stderr and "Traceback" not in p.stderr


def test_bad_config_lists_valid_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--optimizer", "adam"])
    assert e.value.code == 2
    assert "choose from" in capsys.readouterr().err
    assert main(["run", "--batch-size", "1"]) == 2
    assert "--batch-size must be an integer in [2, 65536], got 1" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for cmd in ("run", "pretrain", "evaluate", "plot"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: selfsup " + cmd in capsys.readouterr().out


def test_help_gives_each_method_s_own_default_of_a_shared_setting(capsys):
    """A setting several plugins declare shows the default run's value and each plugin's own
    where it differs: `--temperature` is 0.5 for SimCLR and 0.2 for MoCo v2."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(NT-Xent; MoCo's InfoNCE) (default 0.5; moco: 0.2)" in text
    assert "besides the 2 global ones (default 0; dino: 8)" in text
    assert "moving-average momentum (moco: constant; byol: rises from it to 1) (default 0.99)" \
        in text  # the same default for both: shown once


@pytest.mark.slow
def test_unlabeled_folder_run(tmp_path, capsys):
    from tests.helpers import write_images

    write_images(tmp_path / "flat", 40, size=16)
    rc = main(["run", "--dataset", "folder", "--data-dir", str(tmp_path / "flat"), "--out-dir",
               str(tmp_path / "runs"), "--name", "u", *SMALL])
    assert rc == 0
    run = tmp_path / "runs" / "u"
    assert np.load(run / "train_emb.npy").shape == (40, 32)
    assert (run / "pca.png").is_file() and not (run / "confusion.png").exists()
    # Without labels: the label-free signals (step 0 and each epoch), printed and reported,
    # and the nearest-neighbour grid among the training images.
    m = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in m["quality_history"]] == [0, 1, 2]
    assert m["knn_history"] == [] and (run / "retrieval.png").is_file()
    from pathlib import Path as P  # row i of train_emb.npy is file i, a path that resolves
    listing = json.loads((run / "train_files.json").read_text())
    assert listing["rows"] == 40 and all(P(f).is_absolute() and P(f).is_file()
                                         for f in listing["files"])
    out = capsys.readouterr().out
    assert "RankMe (of 32 dims)" in out and "alignment" in out and "uniformity" in out
    page = (run / "report.html").read_text()
    assert "Label-free signals (no labels used)" in page and "effective rank" in page
    _check_captions(page, m, drawn={"loss.png", "retrieval.png", "tsne.png", "pca.png",
                                    "augmentations.png"})
    caption = report.captions(m)
    assert "kNN" not in caption["loss.png"] and "label-free" in caption["loss.png"]
    assert "training embeddings" in caption["tsne.png"] and "not coloured" in caption["tsne.png"]
    assert "unframed" in caption["retrieval.png"] and "training images (each left out" in \
        caption["retrieval.png"]


def _check_captions(page, m, drawn):
    """Every figure the report shows is one that was drawn, under the caption that describes
    it for this run's metrics; every figure drawn is shown."""
    import html as html_mod

    shown = {f for f, heading in report.FIGURES
             if f'<h2>{html_mod.escape(heading)}</h2><figure>' in page}
    assert shown == drawn, (shown, drawn)
    for f in drawn:
        assert html_mod.escape(report.captions(m)[f]) in page, f


@pytest.mark.slow
def test_labelled_run_captions_match_its_figures(cifar_dir, tmp_path):
    assert _run(tmp_path, cifar_dir) == 0
    run = tmp_path / "runs" / "e2e"
    m = json.loads((run / "metrics.json").read_text())
    page = (run / "report.html").read_text()
    _check_captions(page, m, drawn={"loss.png", "confusion.png", "retrieval.png", "tsne.png",
                                    "pca.png", "augmentations.png"})
    caption = report.captions(m)
    assert "kNN accuracy" in caption["loss.png"] and "label-free" in caption["loss.png"]
    assert "test embeddings" in caption["tsne.png"] and "coloured by class" in caption["tsne.png"]
    assert "green frame" in caption["retrieval.png"]
    assert len(m["knn_history"]) == len(m["quality_history"]) == 3


@pytest.mark.slow
def test_digits_demo_command(digits_demo):
    m = json.loads((digits_demo / "metrics.json").read_text())
    # Its duration is recorded, not asserted (timings belong to BENCHMARKS.md): the whole is at
    # least the sum of its recorded parts, each of which is a duration.
    t = m["time_s"]
    parts = ("load_data", "pretrain", "embed", "linear_probe", "knn", "plots")
    assert m["linear_probe"]["trained"] > 0.5 and all(t[k] >= 0 for k in parts)
    assert t["total"] >= sum(t[k] for k in parts)
    for f in OUTPUTS:
        assert (digits_demo / f).is_file(), f


@pytest.mark.slow
def test_messages_for_a_pretrained_only_run_warnings_and_interrupts(cifar_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """Issue 20: the report of a run not evaluated yet says so and names the command; a
    warning prints as one plain line; Ctrl-C during evaluation says what is kept."""
    from selfsup import evaluate
    from tests.helpers import write_images

    assert main(["pretrain", "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--out-dir",
                 str(tmp_path / "runs"), "--name", "p", *SMALL]) == 0
    run = tmp_path / "runs" / "p"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "not evaluated yet" in page and f"selfsup evaluate {run}" in page
    assert "No labels" not in page and "?" not in page.split("<h2>Configuration")[0]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_run", interrupted)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 130
    assert "interrupted during evaluation" in capsys.readouterr().err
    monkeypatch.undo()

    write_images(tmp_path / "flat", 20, size=16)
    (tmp_path / "flat" / "notes.png").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--dataset", "folder",
                        "--data-dir", str(tmp_path / "flat"), "--out-dir", str(tmp_path / "runs"),
                        "--name", "w", *SMALL], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning: skipped 1 unreadable" in r.stderr and ".py:" not in r.stderr


def test_every_selfsup_command_in_the_readme_parses():
    """Issue 20: the README's shell blocks name only commands and options that exist (they are
    run by tests/test_readme.py, its Python blocks by tests/test_export.py)."""
    import re
    import shlex

    from selfsup.cli import build_parser
    from tests.helpers import readme_variants, shell_lines

    commands = []
    for line in shell_lines():  # placeholders filled, each [a | b] alternative on its own
        for variant in readme_variants(line):
            m = re.search(r"(?:^|-m )selfsup (\w.*)$", variant)
            if m:
                commands.append(m.group(1))
    assert len(commands) >= 12, commands
    parser = build_parser()
    for c in commands:
        words = shlex.split(c)
        parser.parse_args(words)  # an unknown command or option exits: the test fails

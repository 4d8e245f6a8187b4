"""selfsup compare: each method a normal run folder, resumable, one page that says which to pick."""

import json

import pytest

from selfsup.cli import main
from selfsup.compare import recommend, run_state

TINY = ["--dataset", "digits", "--width", "4", "--proj-hidden", "16", "--proj-dim", "8",
        "--batch-size", "256", "--epochs", "1", "--view-size", "8", "--no-progress",
        "--tsne-points", "0", "--knn-every", "1", "--threads", "2"]


def _row(method, val, test=None, few_val=None):
    """A compare row: the linear probe on held-out training images (``val``) and on the test
    set (``test``; by default the same), and the few-label probe on held-out images."""
    return dict(method=method, linear_validation=val, linear=val if test is None else test,
                few_labels_validation=few_val)


def test_recommendation_names_the_best_ties_and_few_label_leader():
    text = recommend([_row("simclr", 0.70, few_val=0.50), _row("moco", 0.695, few_val=0.55),
                      _row("byol", 0.60, few_val=0.40)])
    assert text.startswith("Pick simclr: the highest linear probe on held-out training images "
                           "(70.0%)")
    assert "moco is within 1 point" in text and "byol" not in text.split("leads")[0][-60:]
    assert "With few labels moco leads on held-out training images (55.0% against 50.0%)" \
        in text
    assert "No labels" in recommend([_row("simclr", None), _row("moco", None)])


def test_the_pick_follows_the_validation_split_not_the_test_set():
    """Test and validation disagree: the pick follows validation; the test figures choose
    nothing, and without a validation figure there is no pick at all."""
    rows = [_row("simclr", val=0.70, test=0.80, few_val=0.50),
            _row("byol", val=0.78, test=0.75, few_val=0.45)]
    assert recommend(rows).startswith("Pick byol")
    rows[1]["linear_validation"] = None
    text = recommend(rows)
    assert text.startswith("No pick: byol has no validation accuracy") and "Pick" not in text


@pytest.mark.slow
def test_compare_runs_each_method_writes_one_page_and_resumes(tmp_path, capsys):
    args = ["compare", "--methods", "simclr,moco,dino", *TINY, "--out-dir", str(tmp_path),
            "--name", "c", "--queue-size", "512", "--prototypes", "32", "--local-crops", "2"]
    assert main(args) == 0
    folder = tmp_path / "c"
    for m in ("simclr", "moco", "dino"):  # dino: multi-crop views, the teacher evaluated
        assert (folder / m / "encoder.pt").is_file() and (folder / m / "report.html").is_file()
        assert json.loads((folder / m / "metrics.json").read_text())["config"]["method"] == m
    data = json.loads((folder / "compare.json").read_text())
    assert [r["method"] for r in data["methods"]] == ["simclr", "moco", "dino"]
    for r in data["methods"]:  # the same options, the method's own settings
        assert r["steps"] == 1437 // 256 and len(r["few_labels"]) == 3
        assert 0 < r["linear"] <= 1 and 0 < r["few_labels_untrained"] <= 1
    assert data["methods"][1]["settings"]["queue_size"] == 512
    assert data["recommendation"].startswith("Pick ")
    for r in data["methods"]:  # the figures the pick used: held-out training images
        assert 0 < r["linear_validation"] <= 1 and 0 < r["few_labels_validation"] <= 1
    page = (folder / "compare.html").read_text()
    assert "MoCo v2" in page and "SimCLR" in page and "DINO" in page and "Which to pick" in page
    assert (folder / "compare.png").is_file()
    capsys.readouterr()

    # Again: nothing is trained; a run without its encoder (stopped) is resumed, then compared.
    (folder / "moco" / "encoder.pt").unlink()
    assert run_state(folder / "moco") == "resume" and run_state(folder / "simclr") == "done"
    before = (folder / "simclr" / "encoder.pt").stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "simclr" in out and ": done" in out and ": resume" in out
    assert (folder / "simclr" / "encoder.pt").stat().st_mtime_ns == before
    assert (folder / "moco" / "encoder.pt").is_file()


@pytest.mark.parametrize("extra,expect", [
    (["--methods", "simclr,swav"], "--methods must name distinct methods among simclr"),
    (["--methods", "moco,moco"], "--methods must name distinct methods"),
    (["--method", "moco"], "compare takes --methods"),
    (["--fraction", "0"], "--fraction must be a number in (0, 1]"),
    (["--methods", "moco", "--queue-size", "1000"], "--queue-size (1000) must be a multiple"),
])
def test_compare_refuses_bad_options_before_any_run(tmp_path, capsys, extra, expect):
    assert main(["compare", *TINY, "--out-dir", str(tmp_path), "--name", "c", *extra]) == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

"""After pretraining: fine-tuning, label efficiency, retrieval, kNN monitor, report, embed."""

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import selfsup
from selfsup.checkpoint import pretrained_encoder
from selfsup.cli import build_parser, main
from selfsup.config import config_from_dict, make_config
from selfsup.data import load_digits
from selfsup.errors import ConfigError
from selfsup.finetune import FinetuneSettings, stratified_subset, train_classifier
from selfsup.models import init_encoder
from selfsup.train import pretrain
from tests.helpers import dump_dom, find_browser

TINY = ["--dataset", "digits", "--epochs", "3", "--width", "8", "--proj-hidden", "32",
        "--proj-dim", "16", "--tsne-points", "100", "--no-progress", "--batch-size", "128"]
FAST = FinetuneSettings(epochs=1, min_steps=15, batch_size=64)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One finished `selfsup run` on the digits demo, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", *TINY, "--out-dir", str(out), "--name", "d"]) == 0
    return out / "d"


def _copy(run, tmp_path):
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def test_stratified_subset_is_balanced_fixed_and_nested():
    y = np.repeat(np.arange(4), [100, 50, 20, 3])
    a = stratified_subset(y, 0.1, seed=0)
    assert np.bincount(y[a]).tolist() == [10, 5, 2, 1]  # at least one per class
    assert np.array_equal(a, stratified_subset(y, 0.1, seed=0))
    assert not np.array_equal(a, stratified_subset(y, 0.1, seed=1))
    assert set(a) <= set(stratified_subset(y, 0.5, seed=0))
    assert len(stratified_subset(y, 1.0, seed=0)) == len(y)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"--label-fraction must be a number in \(0, 1\]"):
            stratified_subset(y, bad, seed=0)


@pytest.mark.slow
def test_modes_train_what_they_should(digits_run):
    from selfsup.checkpoint import load_checkpoint

    data = load_digits()
    saved = load_checkpoint(digits_run / "encoder.pt")
    accs = {}
    for mode in ("linear", "finetune", "scratch"):
        enc = pretrained_encoder(saved, initial=mode == "scratch")
        start = {k: v.clone() for k, v in enc.state_dict().items()}
        model, r = train_classifier(enc, mode, data, saved["mean"], saved["std"], 1.0, FAST,
                                    torch.device("cpu"))
        after = model.encoder.state_dict()
        same = all(torch.equal(after[k], start[k]) for k in start)
        assert same == (mode == "linear"), mode  # frozen means frozen, BN statistics included
        assert r.steps == 23 and r.labels == len(data.train_x)  # ceil(1437 / 64)
        accs[mode] = r.accuracy
    # Digits are easy: every mode beats chance (10 %) by far after 23 steps.
    assert min(accs.values()) > 0.5, accs


def test_finetune_lowers_encoder_lr():
    from selfsup.finetune import Classifier, _param_groups

    model = Classifier(init_encoder(make_config(None, dict(width=8))), 10, False)
    groups = _param_groups(model, "finetune", 0.1, FinetuneSettings(encoder_lr_mult=0.1))
    enc_ids = {id(p) for p in model.encoder.parameters()}
    for g in groups:
        in_encoder = all(id(p) in enc_ids for p in g["params"])
        assert g["lr"] == pytest.approx(0.01 if in_encoder else 0.1)
    linear = _param_groups(model, "linear", 0.1, FinetuneSettings())
    assert all(id(p) not in enc_ids for g in linear for p in g["params"])


def test_run_writes_retrieval_knn_history_and_report(digits_run):
    for f in ("retrieval.png", "report.html", "loss.png"):
        assert (digits_run / f).is_file(), f
    m = json.loads((digits_run / "metrics.json").read_text())
    hist = m["knn_history"]
    spe = 1437 // 128
    assert [h["step"] for h in hist] == [0, spe, 2 * spe, 3 * spe]
    assert all(0 <= h["accuracy"] <= 1 for h in hist)
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]  # pretraining helps on the digits
    assert 0 < m["time_s"]["knn_monitor"] < m["time_s"]["pretrain"]  # inside pretraining


@pytest.mark.slow
def test_knn_monitor_does_not_change_training(tmp_path):
    data = load_digits()
    runs = {}
    for every in (0, 1):
        cfg = make_config(None, dict(dataset="digits", width=8, epochs=2, batch_size=256,
                                     proj_hidden=32, proj_dim=16, progress=False,
                                     knn_every=every))
        runs[every] = pretrain(cfg, data, tmp_path / str(every))
    assert runs[0].losses == runs[1].losses
    assert len(runs[0].knn_history) == 0 and len(runs[1].knn_history) == 3
    a, b = runs[0].encoder.state_dict(), runs[1].encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The history survives a resume: the checkpoint holds it.
    cfg3 = make_config(None, dict(dataset="digits", width=8, epochs=3, batch_size=256,
                                  proj_hidden=32, proj_dim=16, progress=False, knn_every=1))
    resumed = pretrain(cfg3, data, tmp_path / "1", resume=True)
    assert [h["step"] for h in resumed.knn_history] == [0, 5, 10, 15]


@pytest.mark.slow
def test_finetune_command_all_modes(digits_run, tmp_path, capsys):
    run = _copy(digits_run, tmp_path)
    common = ["--epochs", "1", "--min-steps", "10", "--batch-size", "64"]
    assert main(["finetune", str(run), "--label-fraction", "0.1", *common]) == 0
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--freeze", *common]) == 0
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--from-scratch", *common]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    m = json.loads((run / "metrics.json").read_text())
    n = len(stratified_subset(load_digits().train_y.numpy(), 0.1, seed=0))
    assert 140 <= n <= 148  # ~10 % of 1,437, rounded per class
    for tag in ("finetune_0.1", "linear_0.1", "scratch_0.1"):
        r = m["finetune"][tag]
        assert r["labels"] == n and r["steps"] == 10 and 0 <= r["accuracy"] <= 1, tag
        assert (run / f"classifier_{tag}.pt").is_file()
    # Another seed: its own classifier and result, the first kept; the report is rewritten.
    assert main(["finetune", str(run), "--label-fraction", "0.1", *common, "--seed", "3"]) == 0
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["finetune"]["finetune_0.1"] == m["finetune"]["finetune_0.1"]
    assert m2["finetune"]["finetune_0.1_seed3"]["settings"]["seed"] == 3
    assert (run / "classifier_finetune_0.1_seed3.pt").is_file()
    assert "finetune_0.1_seed3" in (run / "report.html").read_text()
    assert main(["finetune", str(run), "--label-fraction", "2"]) == 2
    assert "--label-fraction must be a number in (0, 1], got 2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_label_efficiency_table_plot_and_report(digits_run, tmp_path):
    run = _copy(digits_run, tmp_path)
    assert main(["label-efficiency", str(run), "--fractions", "0.05,1", "--epochs", "1",
                 "--min-steps", "10", "--batch-size", "64"]) == 0
    le = json.loads((run / "metrics.json").read_text())["label_efficiency"]
    assert le["fraction"] == [0.05, 1.0] and le["labels"][1] == 1437
    for key in ("probe", "probe_untrained", "finetune", "scratch"):
        assert len(le[key]) == 2 and all(0 <= a <= 1 for a in le[key]), key
    assert (run / "label_efficiency.png").is_file()
    page = (run / "report.html").read_text()
    assert "Label efficiency" in page and f"{100 * le['probe'][1]:.1f}%" in page
    # Each way against scratch on its own, never the better of two test accuracies.
    assert "probe vs scratch" in page and "fine-tuned vs scratch" in page
    assert "best" not in page.lower()
    for i in range(2):
        for key in ("probe", "finetune"):
            assert f"{100 * (le[key][i] - le['scratch'][i]):+.1f}</td>" in page


def test_finetuning_follows_the_runs_flip_setting(digits_run, tmp_path, monkeypatch):
    """Digits are never flipped in pretraining (a mirrored 2 is no 2): nor in fine-tuning."""
    from selfsup import finetune

    seen = []
    real = finetune.augment

    def spy(x, p, g=None):
        seen.append(p.flip_p)
        return real(x, p, g)

    monkeypatch.setattr(finetune, "augment", spy)
    run = _copy(digits_run, tmp_path)
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--epochs", "1",
                 "--min-steps", "2", "--batch-size", "64"]) == 0
    assert seen and set(seen) == {0.0}
    m = json.loads((run / "metrics.json").read_text())
    assert m["finetune"]["finetune_0.1"]["settings"]["flip_p"] == 0.0


def test_label_subsets_are_stratified_and_say_so():
    y = np.repeat([0, 1], [900, 100])
    idx = stratified_subset(y, 0.1, seed=0)
    assert np.bincount(y[idx]).tolist() == [90, 10]  # the classes' proportions, kept
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "class-balanced" not in readme and "stratified subset" in readme
    assert "class-balanced" not in build_parser().format_help()
    for sub in ("finetune", "label-efficiency"):
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
            build_parser().parse_args([sub, "--help"])
        assert "balanced" not in out.getvalue()


def test_linear_probe_with_one_label_per_class_uses_strongest_penalty():
    from selfsup.evaluate import PROBE_WEIGHT_DECAYS, linear_probe

    rng = np.random.default_rng(0)
    y = np.arange(5)
    x = rng.normal(size=(5, 8)).astype(np.float32) + np.eye(5, 8, dtype=np.float32) * 5
    r = linear_probe(x, y, x, y)
    assert r.weight_decay == max(PROBE_WEIGHT_DECAYS) and r.val_accuracy == {}
    assert r.accuracy == 1.0


def test_load_encoder_matches_saved_embeddings(digits_run, tmp_path):
    fx = selfsup.load_encoder(digits_run / "encoder.pt")
    assert not fx.training and not any(p.requires_grad for p in fx.parameters())
    data = load_digits()
    feats = fx.embed(data.test_x)
    np.testing.assert_allclose(feats, np.load(digits_run / "test_emb.npy"), rtol=1e-4, atol=1e-5)
    # float input in [0, 1] gives the same as uint8
    one = fx(data.test_x[:4].float() / 255)
    np.testing.assert_allclose(one.numpy(), feats[:4], rtol=1e-4, atol=1e-5)
    assert selfsup.load_encoder(digits_run).feature_dim == feats.shape[1]  # the folder works too


def test_embed_command_writes_npy_and_file_list(digits_run, tmp_path, capsys):
    from PIL import Image

    data = load_digits()
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):  # saved at 32 px: the command resizes to the training size (16)
        img = data.test_x[i].permute(1, 2, 0).numpy()
        Image.fromarray(img).resize((32, 32)).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "feats.npy"
    assert main(["embed", str(digits_run), "--images", str(folder), "--out", str(out)]) == 0
    feats = np.load(out)
    names = json.loads((tmp_path / "feats.files.json").read_text())["files"]
    assert feats.shape == (5, np.load(digits_run / "test_emb.npy").shape[1]) and len(names) == 5
    assert all(Path(n).is_absolute() and Path(n).is_file() for n in names)  # resolve anywhere
    assert main(["embed", str(digits_run), "--images", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_is_self_contained(digits_run):
    from selfsup.report import build_report

    page = build_report(digits_run)
    pngs = sorted(p.name for p in digits_run.glob("*.png"))
    assert page.count('src="data:image/png;base64,') == len(pngs) >= 6
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere
    m = json.loads((digits_run / "metrics.json").read_text())
    assert f"{100 * m['linear_probe']['trained']:.1f}%" in page
    assert f"{100 * m['linear_probe']['untrained']:.1f}%" in page


@pytest.mark.slow
def test_report_opens_in_headless_browser(digits_run, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (make test installs it from the Debian packages where "
                    "it can; set SELFSUP_BROWSER to use another)")
    page = digits_run / "report.html"
    dom = dump_dom(browser, page, tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    n = len(list(digits_run.glob("*.png")))
    assert f'data-images-shown="{n}/{n}"' in body.group(0), body.group(0)
    assert 'data-errors="0"' in body.group(0)
    # And the check itself can fail: a broken image is counted as not shown.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    dom = dump_dom(browser, broken, tmp_path / "profile")
    assert f'data-images-shown="{n - 1}/{n}"' in dom


def test_pretrained_encoder_initial_is_the_untrained_baseline(digits_run):
    from selfsup.checkpoint import load_checkpoint

    saved = load_checkpoint(digits_run / "encoder.pt")
    init = pretrained_encoder(saved, initial=True).state_dict()
    trained = pretrained_encoder(saved).state_dict()
    cfg = config_from_dict(saved["config"])
    ref = init_encoder(cfg).state_dict()
    assert all(torch.equal(init[k], ref[k]) for k in ref)
    assert not all(torch.equal(trained[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_vit_pretrains_and_serves_finetune_and_load_encoder(tmp_path):
    """The ViT does what every encoder does (methods: ``test_methods``): pretraining, then
    load_encoder on images of another size than its views, and fine-tuning."""
    assert main(["pretrain", "--dataset", "digits", "--epochs", "1", "--model", "vit_micro",
                 "--width", "8", "--view-size", "12", "--proj-hidden", "32", "--proj-dim", "16",
                 "--no-progress", "--knn-every", "0", "--out-dir", str(tmp_path),
                 "--name", "v"]) == 0
    run = tmp_path / "v"
    fx = selfsup.load_encoder(run)
    data = load_digits()
    feats = fx.embed(data.test_x)  # 16 px images: 4x4 tokens, where training saw 3x3
    assert feats.shape == (len(data.test_x), 32) and np.isfinite(feats).all()
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--epochs", "1",
                 "--min-steps", "5", "--batch-size", "64"]) == 0
    r = json.loads((run / "metrics.json").read_text())["finetune"]["finetune_0.1"]
    assert r["steps"] == 5 and 0 <= r["accuracy"] <= 1


@pytest.mark.slow
def test_new_user_trip_ups_in_the_commands(digits_run, tmp_path, capsys, monkeypatch):
    """Issue 20, first group: --no-progress for the label commands, help texts as printed, a
    run given by its bare name, and evaluate/plot rewriting the report they change."""

    # Help: the seed alone defaults to the run's; percent signs print as one.
    for cmd in ("finetune", "label-efficiency"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert text.count("the run's") == 1 and "--no-progress" in text and "%%" not in text
    assert "1%, 10% and 100%" in text
    # --no-progress: no progress bar, whatever the run was made with.
    run = _copy(digits_run, tmp_path / "runs")
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--epochs", "1",
                 "--min-steps", "3", "--no-progress"]) == 0
    assert "it/s" not in capsys.readouterr().err
    # A bare run name finds runs/NAME; an unknown one says where runs are.
    monkeypatch.chdir(tmp_path)
    (run / "report.html").unlink()
    assert main(["evaluate", run.name]) == 0
    assert (run / "report.html").is_file()  # evaluate rewrote the report it changed
    before = os.path.getmtime(run / "report.html")
    assert main(["plot", run.name]) == 0 and os.path.getmtime(run / "report.html") >= before
    assert main(["evaluate", "no-such-run"]) == 2
    assert "nor runs/no-such-run" in capsys.readouterr().err


def test_small_runs_say_so_and_a_clipped_batch_is_recorded(digits_run, tmp_path, capsys):
    """Issue 20: a batch clipped to the data is what config.json and the report say; runs
    too small for their figures carry caveats, in metrics.json, the summary and the report."""
    m = json.loads((digits_run / "metrics.json").read_text())
    assert any("pretraining steps" in c for c in m["caveats"])  # the demo run is short
    assert any("only 360 test images" in c for c in m["caveats"])
    assert "Read with care" in (digits_run / "report.html").read_text()
    out = tmp_path / "runs"
    assert main(["pretrain", "--dataset", "digits", "--batch-size", "2048", "--epochs", "1",
                 "--width", "4", "--no-progress", "--knn-every", "0", "--out-dir", str(out),
                 "--name", "big"]) == 0
    assert "using 1437" in capsys.readouterr().out
    assert json.loads((out / "big" / "config.json").read_text())["batch_size"] == 1437


def test_a_saved_classifier_loads_and_predicts_a_folder(digits_run, tmp_path, capsys):
    """Issue 20: a classifier finetune wrote is loaded and run (Python and `selfsup predict`),
    with the accuracy finetune recorded."""
    import csv

    from PIL import Image

    from selfsup import load_classifier

    run = _copy(digits_run, tmp_path)
    assert main(["finetune", str(run), "--label-fraction", "0.1", "--freeze", "--epochs", "1",
                 "--min-steps", "10", "--no-progress"]) == 0
    recorded = json.loads((run / "metrics.json").read_text())["finetune"]["linear_0.1"]
    clf = load_classifier(run / "classifier_linear_0.1.pt")
    data = load_digits()
    labels, probs = clf.predict(data.test_x)
    assert probs.shape == (360, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert float((labels == data.test_y.numpy()).mean()) == pytest.approx(recorded["accuracy"])
    assert clf.classes == [str(i) for i in range(10)]
    folder = tmp_path / "digits_png"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(data.test_x[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    assert main(["predict", str(run / "classifier_linear_0.1.pt"), "--images",
                 str(folder)]) == 0
    rows = list(csv.DictReader((run / "predictions_digits_png.csv").open()))
    assert len(rows) == 6 and set(rows[0]) >= {"file", "class", "probability", "0", "9"}
    assert all(Path(r["file"]).is_file() for r in rows)
    assert [r["class"] for r in rows] == [clf.classes[k] for k in labels[:6]]
    assert main(["predict", str(run / "nope.pt"), "--images", str(folder)]) == 2
    assert "finetune writes" in capsys.readouterr().err

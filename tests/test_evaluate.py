import numpy as np
import pytest
import torch

from selfsup.evaluate import confusion_matrix, embed, knn_predict, linear_probe
from selfsup.models import build_encoder


def test_knn_hand_example():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, q, 2, k=2, t=0.1).tolist() == [0, 1]
    # With k = all five, class 1 has more voters but class 0's are far closer to query 0.
    assert knn_predict(bank, labels, q, 2, k=5, t=0.05).tolist() == [0, 1]
    # A large temperature makes votes nearly equal: the majority class wins.
    assert knn_predict(bank, labels, q, 2, k=5, t=100.0).tolist() == [1, 1]


def test_knn_is_cosine_not_euclidean():
    bank = torch.tensor([[10.0, 0.0], [0.1, 0.1]])
    labels = torch.tensor([0, 1])
    q = torch.tensor([[1.0, 0.05]])  # Euclidean-nearest is row 1; cosine-nearest is row 0
    assert knn_predict(bank, labels, q, 2, k=1).tolist() == [0]


def _blobs(n, d=8, classes=3, sep=3.0, seed=0):
    centers = np.random.default_rng(0).normal(size=(classes, d)) * sep  # shared by all calls
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_probe_learns_separable_classes():
    x, y = _blobs(600)
    xt, yt = _blobs(200, seed=1)
    r = linear_probe(x, y, xt, yt)
    assert r.accuracy > 0.95
    assert set(r.val_accuracy) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}


def test_probe_choice_ignores_test_labels():
    x, y = _blobs(400, sep=0.7)
    xt, yt = _blobs(200, sep=0.7, seed=1)
    a = linear_probe(x, y, xt, yt)
    b = linear_probe(x, y, xt, np.random.default_rng(5).permutation(yt))
    assert a.weight_decay == b.weight_decay and a.val_accuracy == b.val_accuracy
    assert np.array_equal(a.predictions, b.predictions)


def test_probe_chance_on_noise():
    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    y, yt = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    assert linear_probe(x.astype(np.float32), y, xt.astype(np.float32), yt).accuracy < 0.35


def test_embed_frozen_eval_mode_no_grad():
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", 4).train()
    bn = next(m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    f = embed(enc, x, [0.5] * 3, [0.25] * 3, batch_size=3)
    assert f.shape == (10, 32) and f.dtype == np.float32
    assert torch.equal(bn.running_mean, before)  # eval mode: statistics untouched
    assert enc.training  # mode restored
    # Batch composition does not matter in eval mode.
    np.testing.assert_allclose(f, embed(enc, x, [0.5] * 3, [0.25] * 3, batch_size=10), rtol=1e-5,
                               atol=1e-6)
    assert all(p.grad is None for p in enc.parameters())


def test_confusion_matrix():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("frac", [0.1, 0.3])
def test_probe_val_split_is_part_of_train(frac):
    from selfsup.evaluate import _stratified_split

    y = np.repeat(np.arange(5), 20)
    fit, val = _stratified_split(y, frac, 0)
    assert len(set(fit) & set(val)) == 0 and len(fit) + len(val) == 100
    assert np.bincount(y[val]).tolist() == [round(20 * frac)] * 5


def test_probe_folds_hold_out_every_image_once_spread_over_classes():
    from selfsup.evaluate import _stratified_folds

    y = np.repeat(np.arange(4), [10, 11, 12, 25])
    folds = _stratified_folds(y, 5, 0)
    held = np.concatenate([v for _, v in folds])
    assert sorted(held.tolist()) == list(range(len(y)))  # each image held out exactly once
    for fit, val in folds:
        assert len(set(fit) & set(val)) == 0 and len(fit) + len(val) == len(y)
        counts = np.bincount(y[val], minlength=4)
        assert counts[0] == 2 and 2 <= counts[1] <= 3 and counts[3] == 5
    assert not np.array_equal(folds[0][1], _stratified_folds(y, 5, 1)[0][1])  # seed matters


def test_small_probe_training_sets_are_cross_validated(monkeypatch):
    import selfsup.evaluate as ev

    calls = []
    real = ev._fit_logreg

    def counting(x, *a, **k):
        calls.append(len(x))
        return real(x, *a, **k)

    monkeypatch.setattr(ev, "_fit_logreg", counting)
    x, y = _blobs(300)
    xt, yt = _blobs(50, seed=1)
    grid = len(ev.PROBE_WEIGHT_DECAYS)
    ev.linear_probe(x, y, xt, yt)  # 300 < PROBE_CV_BELOW: k-fold
    assert len(calls) == ev.PROBE_CV_FOLDS * grid + 1 and calls[-1] == 300
    assert set(calls[:-1]) == {240}  # each fold fits on 4/5 of the images
    calls.clear()
    monkeypatch.setattr(ev, "PROBE_CV_BELOW", 100)
    ev.linear_probe(x, y, xt, yt)  # one held-out tenth
    assert len(calls) == grid + 1 and 268 <= calls[0] <= 272  # 9/10 of each class, rounded


def test_logreg_gradient_matches_autograd():
    from selfsup.evaluate import logreg_loss_and_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.01 * w.pow(2).sum()
    ref.backward()
    loss, gw, gb = logreg_loss_and_grad(x, torch.nn.functional.one_hot(y, 4).double(),
                                        w.detach(), b.detach(), 0.01)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)


def test_validation_split_is_stratified_disjoint_and_seeded():
    from selfsup.evaluate import validation_split

    y = np.repeat(np.arange(10), 5000)
    fit, val = validation_split(y, 0.1, seed=0)
    assert len(fit) == 45000 and len(val) == 5000
    assert np.bincount(y[val]).tolist() == [500] * 10
    assert not set(fit) & set(val) and len(set(fit) | set(val)) == 50000
    again, other = validation_split(y, 0.1, seed=0)[1], validation_split(y, 0.1, seed=1)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)

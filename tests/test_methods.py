"""The methods behind one interface: what each step changes, what never gets a gradient, what a
checkpoint holds, and that a new method is one class and one registration."""

import copy

import pytest
import torch
import torch.nn.functional as F

from selfsup import checkpoint, train
from selfsup.config import make_config
from selfsup.errors import ConfigError
from selfsup.losses import byol_loss, info_nce, nt_xent, nt_xent_views
from selfsup.methods import (
    METHODS,
    build_method,
    cosine_momentum,
)


def _cfg(method, **kw):
    base = dict(dataset="digits", method=method, model="small_cnn", width=4, proj_hidden=16,
                proj_dim=8, batch_size=8, queue_size=24, seed=0, view_size=8, progress=False)
    return make_config(None, {**base, **kw})


def _method(name, **kw):
    cfg = _cfg(name, **kw)
    return build_method(cfg, torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, 0.1, None,
                        cfg.batch_size)


def _views(seed=0, b=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * b, 3, 8, 8, generator=g)  # rows k and k + b: two views of image k


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_every_method_steps_on_every_encoder_and_changes_its_online_networks():
    from selfsup.models import ENCODERS

    for name in METHODS:
        for model in ENCODERS:
            m = _method(name, model=model)
            m.train()
            before = _state(m.encoder)
            x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
            loss = m.step(x, 0.1, torch.Generator().manual_seed(0), 0.0)
            assert torch.isfinite(loss) and loss.ndim == 0, (name, model)
            after = m.encoder.state_dict()
            assert any(not torch.equal(before[k], after[k]) for k in before), (name, model)


def test_simclr_multi_crop_views_and_its_loss_over_every_pair_of_an_image_s_views():
    """``--local-crops L``: the two global views and L local ones of every image at the local
    side, the monitor's pair the global views; the loss is NT-Xent over every pair of an image's
    2 + L views, and with no local crops the plain NT-Xent of the pair, as before."""
    import math

    torch.manual_seed(0)
    m = _method("simclr", local_crops=2, local_size=8, view_size=16, temperature=0.3)
    m.train()
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    glob, loc = m.views(x, torch.Generator().manual_seed(0))
    assert glob.shape == (16, 3, 16, 16) and loc.shape == (16, 3, 8, 8)
    assert m.local_aug.scale == (0.05, m.aug.scale[0]) and m.local_aug.out_size == 8
    assert METHODS["simclr"].view_sizes(m.cfg, 16) == [(16, 2), (8, 2)]
    a, b = m.pair_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([a, b]), glob)
    with torch.no_grad():
        z = m.online([glob, loc])  # (4 x 8, proj_dim): each view's 8 rows in turn
        assert float(m.loss([glob, loc], 0.0)) == pytest.approx(
            float(nt_xent_views(z, 4, 0.3)), rel=1e-6)
    assert METHODS["simclr"].chance_loss(m.cfg, 8) == (math.log(1 + 4 * 7),
                                                      "log(1+4(N-1)): chance level")
    before = _state(m.encoder)
    assert torch.isfinite(m.update([glob, loc], 0.1))
    assert any(not torch.equal(before[k], v) for k, v in m.encoder.state_dict().items())

    plain = _method("simclr", temperature=0.3)
    plain.train()
    v = plain.views(x, torch.Generator().manual_seed(0))
    assert len(v) == 1 and v[0].shape == (16, 3, 8, 8)
    with torch.no_grad():
        z = plain.online(v[0])
        want = float(nt_xent(z[:8], z[8:], 0.3))
        assert float(plain.loss(v, 0.0)) == pytest.approx(want, rel=1e-6)
        assert float(plain.loss(v[0], 0.0)) == pytest.approx(want, rel=1e-6)  # a bare batch
    assert METHODS["simclr"].chance_loss(plain.cfg, 8) == (math.log(15), "log(2N-1): chance level")


def test_simclr_decoupled_uses_the_decoupled_loss_and_its_chance_level():
    """``--decoupled``: SimCLR's loss is DCL over the pair (and over multi-crop's views), its
    chance level log(V(N-1)); off, the plain NT-Xent as before."""
    import math

    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    for local in (0, 2):
        m = _method("simclr", decoupled=True, temperature=0.3, local_crops=local, local_size=8,
                    view_size=16)
        m.train()
        v = m.views(x, torch.Generator().manual_seed(0))
        views = 2 + local
        with torch.no_grad():
            z = m.online(v if local else v[0])
            want = float(nt_xent_views(z, views, 0.3, decoupled=True))
            assert float(m.loss(v, 0.0)) == pytest.approx(want, rel=1e-6)
            assert abs(want - float(nt_xent_views(z, views, 0.3))) > 1e-3
        assert METHODS["simclr"].chance_loss(m.cfg, 8) == (
            math.log(views * 7), f"log({views}(N-1)): chance level (DCL)")
        before = _state(m.encoder)
        assert torch.isfinite(m.update(v, 0.1))
        assert any(not torch.equal(before[k], w) for k, w in m.encoder.state_dict().items())


def test_registry_names_what_is_evaluated_and_refuses_unknown_methods():
    assert {"simclr", "moco", "byol"} <= set(METHODS)
    assert "query encoder" in METHODS["moco"].evaluated
    assert "online encoder" in METHODS["byol"].evaluated
    with pytest.raises(ConfigError, match="unknown method 'swav'; valid methods: simclr"):
        make_config(None, {"method": "swav"})


def test_method_defaults_sit_between_preset_and_options():
    assert make_config("gpu", {}).options["temperature"] == 0.5  # SimCLR's, from the preset
    assert make_config("gpu", {"method": "moco"}).options["temperature"] == 0.2  # MoCo v2's own
    assert make_config("gpu", {"method": "moco", "temperature": 0.1}).options["temperature"] == 0.1
    assert make_config("gpu", {"method": "byol"}).options["temperature"] == 0.5  # BYOL has none


def test_moco_queue_must_be_a_multiple_of_the_batch():
    with pytest.raises(ConfigError, match=r"--queue-size \(1000\) must be a multiple of "
                                          r"--batch-size \(256\).*e\.g\. 1024"):
        make_config(None, {"method": "moco", "batch_size": 256, "queue_size": 1000})
    make_config(None, {"method": "simclr", "batch_size": 256, "queue_size": 1000})  # unused


# --- MoCo -----------------------------------------------------------------------------------------


def test_moco_key_encoder_gets_no_gradient_and_follows_by_moving_average():
    m = _method("moco", target_momentum=0.9)
    m.train()
    assert not any(p.requires_grad for p in m.target.parameters())
    target_before, online_before = _state(m.target), _state(m.online)
    assert all(torch.equal(target_before[k], online_before[k]) for k in target_before
               if k in online_before)  # the key encoder starts as a copy of the query encoder
    v = _views()
    m.update(v, 0.5)
    online_after, target_after = m.online.state_dict(), m.target.state_dict()
    assert all(p.grad is None for p in m.target.parameters())
    params = {k for k, _ in m.target.named_parameters()}
    for k in params:  # theta_k <- m theta_k + (1 - m) theta_q, with the updated query weights
        want = 0.9 * target_before[k] + 0.1 * online_after[k]
        torch.testing.assert_close(target_after[k], want, rtol=0, atol=1e-6)
    assert any(not torch.equal(online_after[k], online_before[k]) for k in params)


def test_moco_loss_is_infonce_against_the_queue_and_the_queue_takes_the_keys():
    m = _method("moco")
    m.train()
    v = _views()
    ref = copy.deepcopy(m)  # the same networks, to compute what the step should see
    queue_before = m.queue.keys.clone()
    loss = m.update(v, 0.0)  # lr 0: the loss of the initial networks
    q = ref.online(v[:8])
    with torch.no_grad():
        k = ref.target(v[8:])
    assert float(loss) == pytest.approx(float(info_nce(q, k, queue_before, 0.2).detach()),
                                        rel=1e-5)
    # The 8 keys of the second views went into the first 8 rows; the rest is unchanged.
    torch.testing.assert_close(m.queue.keys[:8], F.normalize(k, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(m.queue.keys[8:], queue_before[8:]) and int(m.queue.ptr) == 8
    for _ in range(2):  # 24 keys = 3 batches: the pointer wraps to the start
        m.update(v, 0.0)
    assert int(m.queue.ptr) == 0


def test_moco_symmetric_loss_averages_both_directions_and_enqueues_both_views_keys():
    m = _method("moco", symmetric=True, queue_size=32)
    m.train()
    v = _views()
    ref = copy.deepcopy(m)
    loss = m.update(v, 0.0)
    q = ref.online(v)
    with torch.no_grad():
        k = ref.target(torch.cat((v[8:], v[:8])))
    queue = ref.queue.keys
    one_way = (info_nce(q[:8], k[:8], queue, 0.2) + info_nce(q[8:], k[8:], queue, 0.2)) / 2
    assert float(loss) == pytest.approx(float(one_way.detach()), rel=1e-5)
    # 16 keys a step: the second views' (rows 0-7), then the first views' (rows 8-15)
    torch.testing.assert_close(m.queue.keys[:16], F.normalize(k, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(m.queue.keys[16:], queue[16:]) and int(m.queue.ptr) == 16
    m.update(v, 0.0)
    assert int(m.queue.ptr) == 0  # 32 keys = 2 steps: the pointer wraps to the start
    with pytest.raises(ConfigError, match="twice --batch-size"):
        _cfg("moco", symmetric=True, queue_size=24)  # 24 keys: a multiple of 8, not of 16


def test_moco_paper_head_is_linear_relu_linear_as_wide_as_the_features():
    for paper in (False, True):
        m = _method("moco", paper_head=paper)
        for head in (m.online.head, m.target.head):
            has_bn = any(isinstance(x, torch.nn.BatchNorm1d) for x in head.modules())
            widths = [x.weight.shape for x in head.modules() if isinstance(x, torch.nn.Linear)]
            assert has_bn is not paper
            f = m.encoder.feature_dim
            assert widths == ([(f, f), (8, f)] if paper else [(16, f), (8, 16)])
        m.train()
        assert torch.isfinite(m.update(_views(), 0.1))


def test_moco_queue_is_rounded_to_a_clipped_batch(capsys):
    cfg = _cfg("moco", batch_size=8, queue_size=24)
    m = build_method(cfg, torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, 0.1, None, 5)
    assert m.queue.keys.shape == (20, 8) and "queue of 20 keys" in capsys.readouterr().out


# --- BYOL -----------------------------------------------------------------------------------------


def test_byol_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    values = [cosine_momentum(0.9, i / 10) for i in range(11)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_byol_step_loss_predictor_and_target_average():
    m = _method("byol", target_momentum=0.9)
    m.train()
    assert m.online.predictor is not None and any(
        isinstance(x, torch.nn.BatchNorm1d) for x in m.online.predictor.modules())
    assert any(isinstance(x, torch.nn.BatchNorm1d) for x in m.online.head.modules())
    v = _views()
    ref = copy.deepcopy(m)
    target_before = _state(m.target)
    progress = 0.25
    loss = m.update(v, 0.5, progress)
    p = ref.online(v)
    with torch.no_grad():
        z = ref.target(v)
    want = byol_loss(p[:8], z[8:]) + byol_loss(p[8:], z[:8])
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    tau = cosine_momentum(0.9, progress)
    online_after = m.online.state_dict()
    for k, _ in m.target.named_parameters():
        torch.testing.assert_close(m.target.state_dict()[k],
                                   tau * target_before[k] + (1 - tau) * online_after[k],
                                   rtol=0, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in m.target.parameters())


# --- the run: saved encoder, checkpoint, report -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_saved_encoder_is_the_online_one_and_the_checkpoint_holds_the_target(digits, tmp_path,
                                                                             method):
    cfg = make_config(None, dict(dataset="digits", method=method, width=4, proj_hidden=16,
                                 proj_dim=8, batch_size=128, epochs=2, view_size=8,
                                 progress=False, queue_size=512, knn_every=0))
    r = train.pretrain(cfg, digits, tmp_path / "r")
    saved = checkpoint.load_checkpoint(tmp_path / "r" / "encoder.pt")
    ck = checkpoint.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert saved["config"]["method"] == method
    for k, v in saved["state_dict"].items():
        assert torch.equal(v, ck["encoder"][k]) and torch.equal(v, r.encoder.state_dict()[k])
    # the target network is another one (a moving average), kept in the checkpoint
    assert any(not torch.equal(ck["encoder"][k], ck["target_encoder"][k])
               for k in ck["encoder"] if ck["encoder"][k].is_floating_point())
    assert ("queue" in ck) == (method == "moco")


def test_compiled_training_pass_steps_as_the_eager_one_and_keeps_the_checkpoint_names(
        monkeypatch):
    """``--compile MODE``: the online networks' training pass goes through torch.compile in
    that mode (traced and differentiated by it: the step's loss and weights equal the eager
    step's at fp32 rounding), while what a checkpoint holds keeps its names and the encoder
    that evaluation calls stays the plain module. The code generation itself is PyTorch's and
    costs about a minute on two cores: here the traced graphs run on its eager backend."""
    real, modes, graphs = torch.compile, [], []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):  # the graphs the training pass was traced into
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def traced(model, mode=None, **kw):
        modes.append(mode)
        return real(model, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", traced)
    eager, compiled = _method("simclr"), _method("simclr", compile="reduce-overhead")
    assert modes == ["reduce-overhead"]
    assert type(compiled.net).__name__ == "OptimizedModule" and compiled.net is not eager.net
    assert compiled.encoder is compiled.online.encoder and type(compiled.encoder) is type(
        eager.encoder)
    for m in (eager, compiled):
        m.train()
    v = _views()
    losses = [float(m.update(v.clone(), 0.1)) for m in (eager, compiled)]
    assert graphs, "the step did not go through the compiled network"
    assert abs(losses[1] - losses[0]) < 1e-4 * abs(losses[0])
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys()
    for name in ("encoder", "head"):
        assert a[name].keys() == b[name].keys()
        for k, t in a[name].items():
            assert torch.allclose(t.float(), b[name][k].float(), atol=1e-5), (name, k)

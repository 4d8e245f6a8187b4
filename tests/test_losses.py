import math

import pytest
import torch

from selfsup.losses import nt_xent, nt_xent_views


def naive_nt_xent(z1, z2, tau):
    """SimCLR eq. (1), written as loops over anchors and candidates."""
    z = torch.cat((z1, z2)).double()
    n2 = z.shape[0]
    n = n2 // 2
    sim = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        den = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / den)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 4, 1.0)])
def test_matches_naive_loop(n, d, tau):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(naive_nt_xent(z1, z2, tau), rel=1e-5)


@pytest.mark.parametrize("n", [2, 7, 64])
def test_identical_projections_give_log_2n_minus_1(n):
    z = torch.ones(n, 4)
    assert float(nt_xent(z, z, 0.3)) == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_symmetric_in_views():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert float(nt_xent(z1, z2, 0.2)) == pytest.approx(float(nt_xent(z2, z1, 0.2)), rel=1e-6)


def test_scale_invariant_and_lower_for_aligned_views():
    z1 = torch.randn(16, 8)
    noise = torch.randn(16, 8)
    close = nt_xent(z1, z1 + 0.05 * noise, 0.5)
    far = nt_xent(z1, noise, 0.5)
    assert close < far
    assert float(nt_xent(3 * z1, noise, 0.5)) == pytest.approx(float(far), rel=1e-5)


def test_falls_under_gradient_steps():
    torch.manual_seed(0)
    z1 = torch.randn(16, 8, requires_grad=True)
    z2 = torch.randn(16, 8, requires_grad=True)
    opt = torch.optim.SGD([z1, z2], lr=0.5)
    first = None
    for _ in range(20):
        loss = nt_xent(z1, z2, 0.5)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.3


def test_bf16_inputs_give_float32_loss():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    out = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.5)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(nt_xent(z1, z2, 0.5)), rel=2e-2)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_is_fp32_under_bf16_autocast(tau):
    from selfsup.losses import nt_xent_logits

    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(64, 32, generator=g).requires_grad_() for _ in range(2))
    ref = nt_xent(z1, z2, tau)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = nt_xent_logits(z1, z2, tau)
        loss = nt_xent(z1, z2, tau)
        assert torch.mm(z1, z2.T).dtype == torch.bfloat16  # autocast is on around the loss
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (z1, z2))
    assert abs(loss.item() - ref.item()) <= 1e-6
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # bf16 inputs (what the projection head gives under autocast): float32 loss and logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent(z1.bfloat16(), z2.bfloat16(), tau)
    assert out.dtype == torch.float32


def test_every_loss_computes_in_fp32():
    import inspect

    from selfsup import losses

    public = [f for name, f in inspect.getmembers(losses, inspect.isfunction)
              if f.__module__ == losses.__name__ and not name.startswith("_")
              and name != "fp32_loss"]
    assert public and all(hasattr(f, "__wrapped__") for f in public), public


# --- InfoNCE with a queue (MoCo) ---------------------------------------------------------------


def naive_info_nce(q, k, queue, tau):
    """MoCo eq. (1): -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)), per query."""
    unit = lambda v: v.double() / v.double().norm()  # noqa: E731
    total = 0.0
    for i in range(q.shape[0]):
        qi = unit(q[i])
        pos = math.exp(float(qi @ unit(k[i])) / tau)
        neg = sum(math.exp(float(qi @ unit(queue[j])) / tau) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("n,big_k,d,tau", [(1, 1, 3, 0.2), (4, 12, 8, 0.2), (8, 32, 5, 0.07)])
def test_info_nce_matches_naive_loop(n, big_k, d, tau):
    from selfsup.losses import info_nce

    g = torch.Generator().manual_seed(n + big_k)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queue = torch.randn(big_k, d, generator=g)
    assert float(info_nce(q, k, queue, tau)) == pytest.approx(
        naive_info_nce(q, k, queue, tau), rel=1e-5)


def test_info_nce_analytic_values_and_gradient_path():
    from selfsup.losses import info_nce

    # Query, key and K queued keys all identical: each of the 1 + K logits equal, log(1 + K).
    z = torch.ones(3, 4)
    assert float(info_nce(z, z, torch.ones(9, 4), 0.2)) == pytest.approx(math.log(10), rel=1e-6)
    # Lower when the key is the query's and the queue is far; scale does not matter.
    q = torch.randn(6, 8)
    queue = torch.randn(20, 8)
    near, far = info_nce(q, q + 0.01, queue, 0.2), info_nce(q, torch.randn(6, 8), queue, 0.2)
    assert near < far
    assert float(info_nce(5 * q, q + 0.01, 0.1 * queue, 0.2)) == pytest.approx(float(near),
                                                                               rel=1e-5)
    # Gradients reach the queries only when the keys carry none (as MoCo computes them).
    q = torch.randn(6, 8, requires_grad=True)
    info_nce(q, torch.randn(6, 8), queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


# --- BYOL's regression loss --------------------------------------------------------------------


def naive_byol(p, z):
    """BYOL eq. (2): || p/|p| - z/|z| ||^2, averaged over the batch."""
    total = 0.0
    for i in range(p.shape[0]):
        a, b = p[i].double() / p[i].double().norm(), z[i].double() / z[i].double().norm()
        total += float(((a - b) ** 2).sum())
    return total / p.shape[0]


@pytest.mark.parametrize("n,d", [(1, 2), (5, 8), (16, 3)])
def test_byol_loss_matches_naive_loop(n, d):
    from selfsup.losses import byol_loss

    g = torch.Generator().manual_seed(n)
    p, z = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert float(byol_loss(p, z)) == pytest.approx(naive_byol(p, z), rel=1e-5)


def test_byol_loss_bounds_scale_and_descent():
    from selfsup.losses import byol_loss

    p = torch.randn(8, 4)
    assert float(byol_loss(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(p, -p)) == pytest.approx(4.0, rel=1e-6)
    z = torch.randn(8, 4)
    assert float(byol_loss(2 * p, 0.5 * z)) == pytest.approx(float(byol_loss(p, z)), rel=1e-5)
    p = p.clone().requires_grad_()
    opt = torch.optim.SGD([p], lr=0.5)
    first = float(byol_loss(p, z).detach())
    for _ in range(20):
        opt.zero_grad()
        byol_loss(p, z).backward()
        opt.step()
    assert float(byol_loss(p, z)) < first / 2


def naive_nt_xent_views(z, views, tau, decoupled=False):
    """NT-Xent over V views (multi-crop), written as loops: for each anchor and each other view
    of its image, -log of the positive's exp over itself plus every other image's views; with
    ``decoupled`` (DCL, Yeh et al. 2022, eq. 6) over the other images' views alone."""
    z = z.double()
    n = z.shape[0] // views
    sim = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    total, pairs = 0.0, 0
    for i in range(views * n):
        for p in range(views * n):
            if p == i or p % n != i % n:
                continue
            neg = sum(math.exp(sim(z[i], z[j]) / tau) for j in range(views * n) if j % n != i % n)
            pos = math.exp(sim(z[i], z[p]) / tau)
            total += -math.log(pos / (neg if decoupled else pos + neg))
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n,views,d,tau", [(3, 3, 4, 0.5), (5, 4, 8, 0.2), (2, 6, 3, 1.0)])
def test_views_loss_matches_naive_loop(n, views, d, tau):
    z = torch.randn(views * n, d, generator=torch.Generator().manual_seed(views))
    assert float(nt_xent_views(z, views, tau)) == pytest.approx(
        naive_nt_xent_views(z, views, tau), rel=1e-5)


@pytest.mark.parametrize("n,views,d,tau", [(4, 2, 5, 0.2), (3, 3, 4, 0.5), (2, 5, 3, 1.0)])
def test_decoupled_loss_matches_naive_loop(n, views, d, tau):
    """DCL: the positive out of the denominator, for the pair and for multi-crop; it is not
    NT-Xent (which it would equal if the flag were ignored)."""
    z = torch.randn(views * n, d, generator=torch.Generator().manual_seed(views + 10))
    got = float(nt_xent_views(z, views, tau, decoupled=True))
    assert got == pytest.approx(naive_nt_xent_views(z, views, tau, decoupled=True), rel=1e-5)
    assert got < float(nt_xent_views(z, views, tau)) - 1e-3


def test_views_loss_of_two_views_is_nt_xent():
    z1, z2 = torch.randn(9, 6), torch.randn(9, 6)
    assert float(nt_xent_views(torch.cat((z1, z2)), 2, 0.2)) == pytest.approx(
        float(nt_xent(z1, z2, 0.2)), rel=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_views_loss_rank_slices_match_the_global_loss(decoupled):
    """Each of 2 'processes' passes its own images' rows (every view of them); the gather puts
    them among the other's: the mean of the two losses is the loss of the whole batch."""
    torch.manual_seed(0)
    views, n = 3, 4
    z = torch.randn(views, 2 * n, 5)  # (V, N, D) over both processes
    full = nt_xent_views(z.reshape(-1, 5), views, 0.3, decoupled=decoupled)
    whole = torch.nn.functional.normalize(z, dim=2)

    def gather_for(r):
        calls = iter(range(views))

        def gather(t):
            w = whole[next(calls)]
            return torch.cat((w[:n * r], t, w[n * r + n:]))

        return gather

    parts = [nt_xent_views(z[:, n * r:n * r + n].reshape(-1, 5), views, 0.3, gather_for(r), r,
                           decoupled) for r in range(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full)

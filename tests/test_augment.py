import colorsys
import math

import numpy as np
import pytest
import torch

from selfsup.augment import (
    AugmentParams,
    apply_jitters,
    augment,
    color_jitter,
    crop_boxes,
    gaussian_blur,
    grayscale,
    jitter_orders,
    normalize,
    random_grayscale,
    shift_hue,
    two_views,
)

OFF = AugmentParams(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                    gray_p=0.0, blur_p=0.0)


def _images(b=16, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def test_shapes_and_range():
    x = _images(6, 32)
    p = AugmentParams(out_size=16, blur_p=0.5)
    v1, v2 = two_views(x, p, torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (6, 3, 16, 16)
    assert v1.dtype == torch.float32 and v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)


def test_all_off_is_identity():
    x = _images()
    v = augment(x, OFF)
    torch.testing.assert_close(v, x.float() / 255, atol=1e-5, rtol=0)


def test_flip_p1_mirrors():
    x = _images()
    p = AugmentParams(**{**OFF.__dict__, "flip_p": 1.0})
    torch.testing.assert_close(augment(x, p), x.float().flip(-1) / 255, atol=1e-5, rtol=0)


def test_each_image_gets_its_own_parameters():
    x = _images(1).expand(32, -1, -1, -1).contiguous()  # 32 copies of one image
    v = augment(x, AugmentParams(out_size=8), torch.Generator().manual_seed(0))
    flat = v.flatten(1)
    distinct = {tuple(r) for r in (flat * 1000).round().int().tolist()}
    assert len(distinct) == 32


def test_gray_p1_and_p0():
    x = _images().float() / 255
    g = random_grayscale(x, 1.0)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    torch.testing.assert_close(g[:, :1], grayscale(x))
    assert torch.equal(random_grayscale(x, 0.0), x)


def test_jitter_p0_unchanged_p1_changes_every_image():
    x = _images().float() / 255
    assert torch.equal(color_jitter(x, AugmentParams(jitter_p=0.0)), x)
    y = color_jitter(x, AugmentParams(jitter_p=1.0), torch.Generator().manual_seed(0))
    assert ((y - x).abs().flatten(1).amax(1) > 1e-3).all()
    assert y.min() >= 0 and y.max() <= 1


def test_hue_only_keeps_gray_images_gray():
    x = _images().float().mean(1, keepdim=True).expand(-1, 3, -1, -1) / 255
    p = AugmentParams(jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0.5)
    torch.testing.assert_close(color_jitter(x, p), x, atol=1e-5, rtol=0)


def test_shift_hue_matches_hsv_round_trip():
    """Against Python's own RGB<->HSV conversion, pixel by pixel: grey pixels and ties for the
    largest channel included."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 4, 4, generator=g)
    x[:4] = x[:4].mean(1, keepdim=True)  # grey
    x[4:8, 0] = x[4:8, 1] = 0.9  # red and green tie for the maximum
    x[8:12, 1] = x[8:12, 2] = 0.7  # green and blue tie
    shift = torch.rand(32, generator=g) * 2 - 1  # turns, both directions
    y = shift_hue(x, shift)
    for i in range(32):
        for r in range(4):
            for c in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                want = colorsys.hsv_to_rgb((h + shift[i].item()) % 1.0, s, v)
                torch.testing.assert_close(y[i, :, r, c], torch.tensor(want), atol=2e-6, rtol=0)


def test_hue_full_turn_is_identity_and_half_turn_changes_colour():
    x = _images().float() / 255
    base = dict(jitter_p=1.0, brightness=0, contrast=0, saturation=0)
    p = AugmentParams(**base, hue=1e-9)
    torch.testing.assert_close(color_jitter(x, p), x, atol=1e-4, rtol=0)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    # Hue shift drawn from [-0.5, 0.5]: a pure red pixel moves off pure red unless the draw is ~0.
    out = color_jitter(red.expand(64, -1, -1, -1), AugmentParams(**base, hue=0.5),
                       torch.Generator().manual_seed(0))
    assert (out[:, 1:].amax(dim=(1, 2, 3)) > 0.1).float().mean() > 0.8


def test_blur_smooths_and_p0_is_identity():
    x = _images(4, 16).float() / 255
    assert torch.equal(gaussian_blur(x, AugmentParams(blur_p=0.0)), x)
    y = gaussian_blur(x, AugmentParams(blur_p=1.0, blur_sigma=(1.5, 2.0)))
    assert y.shape == x.shape
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert tv(y) < 0.6 * tv(x)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_crop_scale_small_zooms_in():
    x = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :16] = 255  # top half white
    p = AugmentParams(**{**OFF.__dict__, "out_size": 32, "scale": (0.05, 0.05)})
    v = augment(x, p, torch.Generator().manual_seed(0))
    # A crop of 5 % of the area mostly falls inside one half: nearly uniform views.
    frac_uniform = ((v.std(dim=(1, 2, 3)) < 0.2).float().mean())
    assert frac_uniform > 0.6  # about 3/4: a 7-px box straddles row 16 from 6 of 26 tops


def test_same_seed_same_views():
    x = _images()
    p = AugmentParams(out_size=8)
    a = two_views(x, p, torch.Generator().manual_seed(3))
    b = two_views(x, p, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_normalize():
    x = torch.ones(2, 3, 4, 4) * 0.5
    y = normalize(x, torch.tensor([0.5, 0.25, 0.0]), torch.tensor([1.0, 0.25, 0.5]))
    assert torch.allclose(y[:, 0], torch.zeros(1)) and torch.allclose(y[:, 1], torch.ones(1))
    assert torch.allclose(y[:, 2], torch.ones(1))


# --- the paper's sampling: crop boxes and jitter order ----------------------------------------


def _reference_box(height, width, scale, ratio, rng):
    """RandomResizedCrop.get_params as torchvision documents it, for one image."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size,scale", [((32, 32), (0.08, 1.0)), ((32, 32), (0.2, 1.0)),
                                        ((24, 40), (0.08, 1.0)), ((16, 16), (0.5, 1.0))])
def test_crop_boxes_follow_the_reference_distribution(size, scale):
    import random

    height, width = size
    ratio = (3 / 4, 4 / 3)
    n = 20000
    top, left, h, w = (t.numpy() for t in crop_boxes(n, height, width, scale, ratio,
                                                     torch.Generator().manual_seed(0),
                                                     torch.device("cpu")))
    rng = random.Random(0)
    ref = np.array([_reference_box(height, width, scale, ratio, rng) for _ in range(n)])
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    aspect, ref_aspect = w / h, ref[:, 3] / ref[:, 2]
    assert abs(area.mean() - ref_area.mean()) < 0.01
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.02, q
        assert abs(np.quantile(aspect, q) - np.quantile(ref_aspect, q)) < 0.05, q
    # Offsets uniform over the positions where the box fits.
    room = height - h
    rel = top[room > 0] / room[room > 0]
    assert abs(rel.mean() - 0.5) < 0.02


def test_crop_flip_samples_exactly_the_drawn_box():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    p = AugmentParams(**{**OFF.__dict__, "out_size": 16, "scale": (0.25, 0.25),
                         "ratio": (1.0, 1.0)})  # every box is 16 x 16
    top, left, h, w = crop_boxes(64, 32, 32, p.scale, p.ratio, torch.Generator().manual_seed(3),
                                 torch.device("cpu"))
    v = augment(x, p, torch.Generator().manual_seed(3))
    assert (h == 16).all() and (w == 16).all()
    for i in range(64):
        crop = x[i, :, top[i]:top[i] + 16, left[i]:left[i] + 16].float() / 255
        torch.testing.assert_close(v[i], crop, atol=1e-5, rtol=0)


def test_jitter_orders_are_uniform_over_the_24_permutations():
    orders = jitter_orders(48000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders[:100].tolist())
    codes = (orders @ torch.tensor([64, 16, 4, 1])).tolist()
    counts = np.array(list(__import__("collections").Counter(codes).values()))
    assert len(counts) == 24
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 60  # 23 degrees of freedom: p < 1e-4 above 55


def _reference_jitter(img, factors, order):
    """One image, the four jitters applied one by one in ``order`` (torchvision's formulas)."""
    from selfsup.augment import grayscale, shift_hue

    y = img[None]
    for k in order:
        f = float(factors[k])
        if k == 0:
            y = (y * f).clamp(0, 1)
        elif k == 1:
            m = grayscale(y).mean()
            y = ((y - m) * f + m).clamp(0, 1)
        elif k == 2:
            gray = grayscale(y)
            y = ((y - gray) * f + gray).clamp(0, 1)
        else:
            y = shift_hue(y, torch.tensor([f])).clamp(0, 1)
    return y[0]


@pytest.mark.parametrize("grouped", [True, False])  # the CPU's way, the GPU's way
def test_jitters_are_applied_in_each_images_order(grouped):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(96, 3, 8, 8, generator=g)
    factors = torch.stack([torch.rand(96, generator=g) * 1.6 + 0.2 for _ in range(3)]
                          + [torch.rand(96, generator=g) * 0.4 - 0.2], dim=1)
    orders = jitter_orders(96, g, torch.device("cpu"))
    out = apply_jitters(x, factors, orders, grouped=grouped)
    for i in range(96):
        torch.testing.assert_close(out[i], _reference_jitter(x[i], factors[i],
                                                             orders[i].tolist()),
                                   atol=1e-5, rtol=0)
    # The order matters: the same factors in another order give other images.
    other = apply_jitters(x, factors, orders.flip(1))
    assert (other - out).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5


@pytest.mark.parametrize("skip", [(), (3,), (0, 2)])
def test_whole_batch_jitters_equal_grouped_ones(skip):
    """The GPU's way (every image through every jitter, kept where it is its own) gives the
    CPU's images, with images left out by ``active`` unchanged, in place or not."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 8, 8, generator=g)
    factors = torch.stack([torch.rand(64, generator=g) * 1.6 + 0.2 for _ in range(3)]
                          + [torch.rand(64, generator=g) * 0.4 - 0.2], dim=1)
    orders = jitter_orders(64, g, torch.device("cpu"))
    active = torch.rand(64, generator=g) < 0.7
    grouped = apply_jitters(x, factors, orders, skip, active, grouped=True)
    whole = apply_jitters(x, factors, orders, skip, active, grouped=False)
    torch.testing.assert_close(whole, grouped, atol=1e-6, rtol=0)
    assert torch.equal(whole[~active], x[~active]) and not torch.equal(whole, x)
    y = x.clone()
    assert apply_jitters(y, factors, orders, skip, active, inplace=True, grouped=False) is y
    torch.testing.assert_close(y, grouped, atol=1e-6, rtol=0)


def test_color_jitter_uses_the_drawn_factors_and_orders():
    p = AugmentParams(**{**OFF.__dict__, "out_size": 8, "jitter_p": 1.0, "brightness": 0.4,
                         "contrast": 0.4, "saturation": 0.4, "hue": 0.1})
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = color_jitter(x, p, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(40, generator=g)  # the apply draws
    factors = torch.stack([torch.rand(40, generator=g) * 0.8 + 0.6 for _ in range(3)]
                          + [torch.rand(40, generator=g) * 0.2 - 0.1], dim=1)
    orders = jitter_orders(40, g, torch.device("cpu"))
    torch.testing.assert_close(out, apply_jitters(x, factors, orders), atol=1e-5, rtol=0)


def test_two_views_from_one_sampling_call_equal_a_batch_of_both_copies():
    """Each image read once for both views gives the views of the batch cat(x, x)."""
    x = _images(24, 32, seed=4)
    for p in (AugmentParams(out_size=16, scale=(0.2, 1.0)), AugmentParams(out_size=20, blur_p=0.5)):
        both = augment(x, p, torch.Generator().manual_seed(9), views=2)
        plain = augment(torch.cat((x, x)), p, torch.Generator().manual_seed(9))
        torch.testing.assert_close(both, plain, atol=1e-6, rtol=0)
        v1, v2 = two_views(x, p, torch.Generator().manual_seed(9))
        assert torch.equal(torch.cat((v1, v2)), both)


def test_normalize_into_the_models_memory_format():
    from selfsup.augment import normalize_into

    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    y = normalize_into(x, mean, std, torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, normalize(x, mean, std), atol=1e-6, rtol=1e-6)

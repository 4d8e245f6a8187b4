import colorsys

import torch

from selfsup.augment import (
    AugmentParams,
    augment,
    color_jitter,
    gaussian_blur,
    grayscale,
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
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :16] = 255  # top half white
    p = AugmentParams(**{**OFF.__dict__, "out_size": 32, "scale": (0.05, 0.05)})
    v = augment(x, p, torch.Generator().manual_seed(0))
    # A crop of 5 % of the area mostly falls inside one half: nearly uniform views.
    frac_uniform = ((v.std(dim=(1, 2, 3)) < 0.2).float().mean())
    assert frac_uniform > 0.5


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

"""SimCLR augmentations on whole batches, with per-image random parameters (no loop over images).

Views are made from uint8 images (B, 3, H, W) on whatever device they live on:
random resized crop + horizontal flip (one ``affine_grid``/``grid_sample`` call; boxes drawn as
the paper's code draws them), colour jitter (brightness, contrast, saturation, hue, in a random
order per image, applied with probability ``jitter_p``),
random grayscale, optional Gaussian blur, then normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as used for grayscale conversion.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; defaults follow the SimCLR paper's CIFAR-10 setting."""

    out_size: int = 32  # side of the output views (px)
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # hue shift range, in turns (0.5 = half the colour wheel)
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in px

    @classmethod
    def from_config(cls, cfg: object, image_size: int) -> AugmentParams:
        s = float(cfg.jitter_strength)  # type: ignore[attr-defined]
        return cls(
            out_size=int(cfg.view_size) or image_size,  # type: ignore[attr-defined]
            scale=(cfg.crop_scale_min, cfg.crop_scale_max),  # type: ignore[attr-defined]
            flip_p=cfg.flip_p, jitter_p=cfg.jitter_p,  # type: ignore[attr-defined]
            brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
            gray_p=cfg.gray_p, blur_p=cfg.blur_p,  # type: ignore[attr-defined]
        )


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device: torch.device
             ) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


CROP_TRIES = 10  # draws per image before falling back to a central crop, as the paper's code


def crop_boxes(b: int, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float], g: torch.Generator | None, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crop boxes in pixels, drawn for a whole batch as torchvision's
    ``RandomResizedCrop`` draws them for one image (not the SimCLR code's TensorFlow sampler,
    which tries 100 times, falls back to the whole image and crops harder on average).

    Per image, up to ``CROP_TRIES`` times: an area fraction uniform in ``scale`` and an aspect
    ratio log-uniform in ``ratio`` give a width and height (rounded to pixels); the first try that
    fits inside the image is taken, at an offset uniform over the positions where it fits. When
    no try fits, the box is the whole image cropped to the nearest allowed ratio, centred.

    Returns:
        top, left, height, width: (B,) int64 each.
    """
    area = height * width * _uniform(b * CROP_TRIES, scale[0], scale[1], g, device)
    log_r = _uniform(b * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), g, device)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r)).view(b, CROP_TRIES)  # (B, tries)
    h = torch.round(torch.sqrt(area / r)).view(b, CROP_TRIES)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, tries)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    ok = fits.any(dim=1)  # (B,)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback: a central crop of the whole image at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(ok, w, float(fw)).long()
    h = torch.where(ok, h, float(fh)).long()
    u_top = torch.rand(b, generator=g, device=device)
    u_left = torch.rand(b, generator=g, device=device)
    top = torch.where(ok, (u_top * (height - h + 1)).long().clamp(max=height - h),
                      (height - h) // 2)
    left = torch.where(ok, (u_left * (width - w + 1)).long().clamp(max=width - w),
                       (width - w) // 2)
    return top, left, h, w


def crop_boxes_within(height: torch.Tensor, width: torch.Tensor, scale: tuple[float, float],
                      ratio: tuple[float, float], g: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``crop_boxes`` for images of many shapes: image k is ``height[k]`` x ``width[k]`` (int64
    tensors on the generator's device), and its box is drawn on that shape by the same rule."""
    b, dev = len(height), height.device
    hh = height.view(b, 1).double()
    ww = width.view(b, 1).double()
    area = (hh * ww).float() * _uniform(b * CROP_TRIES, scale[0], scale[1], g, dev).view(b, -1)
    log_r = _uniform(b * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), g, dev)
    r = torch.exp(log_r).view(b, CROP_TRIES)
    w = torch.round(torch.sqrt(area * r))  # (B, tries)
    h = torch.round(torch.sqrt(area / r))
    fits = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    first = fits.float().argmax(dim=1, keepdim=True)
    ok = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback per image: the whole image cropped to the nearest allowed ratio, centred.
    hh, ww = hh.squeeze(1), ww.squeeze(1)
    in_ratio = ww / hh
    fw = torch.where(in_ratio > max(ratio), torch.round(hh * max(ratio)), ww)
    fh = torch.where(in_ratio < min(ratio), torch.round(ww / min(ratio)), hh)
    w = torch.where(ok, w.double(), fw).long()
    h = torch.where(ok, h.double(), fh).long()
    u_top = torch.rand(b, generator=g, device=dev)
    u_left = torch.rand(b, generator=g, device=dev)
    top = torch.where(ok, torch.minimum((u_top * (height - h + 1)).long(), height - h),
                      (height - h) // 2)
    left = torch.where(ok, torch.minimum((u_left * (width - w + 1)).long(), width - w),
                       (width - w) // 2)
    return top, left, h, w


def crop_flip(x: torch.Tensor, p: AugmentParams, g: torch.Generator | None = None,
              views: int = 1, shape: torch.Tensor | None = None) -> torch.Tensor:
    """Random resized crop and horizontal flip, each view with its own box (``crop_boxes``).

    The box is resampled bilinearly to ``out_size`` (one ``affine_grid``/``grid_sample`` call).
    With ``views`` > 1 every image gives that many views from one sampling call: the grids of
    an image's views are stacked along the output's height, so each image is read (and was
    converted to float) once, not once per view. The boxes and flips are drawn as for a batch
    of ``views * B`` images whose row ``v * B + k`` is image k, and each output pixel is the
    same function of its image and grid point, so the views equal those of that batch.

    Args:
        x: (B, C, H, W) float images.
        shape: (B, 2) the height and width of each image inside its frame, for images of many
            shapes held at the top-left of frames of one size (``selfsup.data.Framed``): the
            boxes are drawn on each image's own shape, so its aspect ratio is kept. None: every
            image fills its frame.
    Returns:
        (views * B, C, out_size, out_size), rows v * B + k from image k.
    """
    b, dev = x.shape[0], x.device
    n, c, s = views * b, x.shape[1], p.out_size
    height, width = x.shape[-2:]
    if shape is None:
        top, left, h, w = crop_boxes(n, height, width, p.scale, p.ratio, g, dev)
    else:
        own = shape.to(dev, torch.int64).repeat(views, 1)  # (n, 2): row v * B + k is image k's
        top, left, h, w = crop_boxes_within(own[:, 0], own[:, 1], p.scale, p.ratio, g)
    flip = torch.where(_bernoulli(n, p.flip_p, g, dev), -1.0, 1.0)
    # The box in normalised coordinates [-1, 1] (align_corners=False): half-size and centre.
    sx, sy = w.to(x.dtype) / width, h.to(x.dtype) / height
    cx = (2 * left.to(x.dtype) + w.to(x.dtype)) / width - 1
    cy = (2 * top.to(x.dtype) + h.to(x.dtype)) / height - 1
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)  # (n, 2, 3) affine maps
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)  # (n, S, S, 2)
    if views > 1:  # (B, views * S, S, 2): image k's views one above the other
        grid = grid.view(views, b, s, s, 2).transpose(0, 1).reshape(b, views * s, s, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)  # (B, C, views * S, S)
    if views > 1:
        out = out.view(b, c, views, s, s).permute(2, 0, 1, 3, 4).reshape(n, c, s, s)
    return out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images by ``shift`` turns, keeping HSV saturation and value.

    The same as converting to HSV, adding ``shift`` to the hue (mod 1) and converting back, in
    fewer passes over the pixels: value (max) and chroma (max - min) carry over, and each channel
    comes from the rotated hue h as v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    with n = 5, 3, 1 for red, green, blue.

    Args:
        x: (B, 3, H, W) in [0, 1]; shift: (B,) turns (one full turn = 1).
    Returns:
        (B, 3, H, W)
    """
    r, g_, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    inv = 1.0 / chroma.clamp_min(1e-8)
    # Hue in sixths of a turn, [-1, 5); grey pixels (chroma 0) get any hue: they stay grey.
    h6 = torch.where(maxc == r, (g_ - b) * inv,
                     torch.where(maxc == g_, 2.0 + (b - r) * inv, 4.0 + (r - g_) * inv))
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h6.unsqueeze(1) + (6.0 * shift).view(-1, 1, 1, 1) + n, 6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


# The four colour jitters, by index in a jitter order.
JITTERS = ("brightness", "contrast", "saturation", "hue")


def _jitter(k: int, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Jitter ``k`` of ``JITTERS`` with per-image factors ``f`` (n,) on images y (n, 3, H, W),
    in place (``y`` is a fresh copy). Each linear jitter is a blend y * f + a * (1 - f) with
    the image's mean grey (contrast), its luma (saturation) or 0 (brightness), as one fused
    pass and an in-place clamp."""
    if k == 3:
        return shift_hue(y, f).clamp_(0, 1)
    f = f.view(-1, 1, 1, 1)
    if k == 0:
        return y.mul_(f).clamp_(0, 1)
    # contrast: blend with the mean grey level of the image as it is at this point
    a = grayscale(y).mean(dim=(2, 3), keepdim=True) if k == 1 else grayscale(y)
    return torch.addcmul(a * (1 - f), y, f).clamp_(0, 1)


# apply_jitters' way when not told: None = grouped on the CPU, whole-batch elsewhere.
GROUPED_JITTERS: bool | None = None


def apply_jitters(x: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor,
                  skip: tuple[int, ...] = (), active: torch.Tensor | None = None,
                  inplace: bool = False, grouped: bool | None = None) -> torch.Tensor:
    """Apply the four jitters to each image in its own order.

    Grouped (the CPU's way): position by position in the order, the images whose jitter at that
    position is k are jittered together: 16 groups of about a quarter of the batch, the work of
    one pass of each jitter over the batch. Finding a group's images reads their count back
    from the device, so on a GPU (``grouped`` None: grouped on the CPU only) every position
    instead jitters the whole batch with each jitter and keeps it where that jitter is the
    image's: four times the arithmetic, which a GPU does in less time than 16 waits for the
    host. Both give the same images.

    Args:
        x: (B, 3, H, W) images in [0, 1].
        factors: (B, 4) factor of each jitter (``JITTERS`` order) for each image.
        orders: (B, 4) a permutation of 0..3 per image: the order its jitters are applied in.
        skip: jitters that are the identity here (strength 0), left out.
        active: (B,) bool, the images to jitter (None: all); the others pass unchanged.
        inplace: write into ``x`` instead of a copy.
        grouped: jitter each image only with its own jitter (None: on the CPU).
    Returns:
        (B, 3, H, W) in [0, 1].
    """
    out = x if inplace else x.clone()
    if grouped is None:
        grouped = GROUPED_JITTERS if GROUPED_JITTERS is not None else x.device.type == "cpu"
    for position in range(4):
        for k in range(4):
            if k in skip:
                continue
            mask = orders[:, position] == k
            if active is not None:
                mask &= active
            if not grouped:  # no read-back: every image jittered, kept where it is its jitter
                jittered = _jitter(k, out.clone() if k == 0 else out, factors[:, k])
                out = torch.where(mask.view(-1, 1, 1, 1), jittered, out)
                continue
            idx = torch.nonzero(mask).squeeze(1)  # (n,) images whose jitter here is k
            if len(idx):
                out.index_copy_(0, idx, _jitter(k, out.index_select(0, idx), factors[idx, k]))
    if inplace and out is not x:
        x.copy_(out)
        return x
    return out


def color_jitter(x: torch.Tensor, p: AugmentParams, g: torch.Generator | None = None,
                 inplace: bool = False) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, each image with its own factors and its
    own random order of the four (as the SimCLR code and torchvision's ``ColorJitter`` do).

    Each image is jittered with probability ``p.jitter_p``; others pass unchanged. Factors are
    uniform in [max(0, 1 - s), 1 + s] for brightness, contrast and saturation of strength s, and
    the hue shift uniform in [-hue, hue] turns.

    Args:
        x: (B, 3, H, W) float images in [0, 1].
    Returns:
        (B, 3, H, W) in [0, 1].
    """
    b, dev = x.shape[0], x.device
    apply = _bernoulli(b, p.jitter_p, g, dev)  # (B,)
    # Draw every factor and order for every image, so the random stream does not depend on
    # which images are jittered.
    strengths = (p.brightness, p.contrast, p.saturation)
    factors = torch.stack([_uniform(b, max(0.0, 1 - s), 1 + s, g, dev) for s in strengths]
                          + [_uniform(b, -p.hue, p.hue, g, dev)], dim=1)  # (B, 4)
    orders = jitter_orders(b, g, dev)  # (B, 4)
    skip = tuple(k for k, s in enumerate((*strengths, p.hue)) if s == 0)
    return apply_jitters(x, factors, orders, skip, active=apply, inplace=inplace)


def jitter_orders(b: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 4) a uniformly random permutation of the four jitters per image."""
    return torch.rand(b, 4, generator=g, device=device).argsort(dim=1)


def random_grayscale(x: torch.Tensor, prob: float, g: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Replace each image by its luma (on all 3 channels) with probability ``prob``."""
    b = x.shape[0]
    apply = _bernoulli(b, prob, g, x.device).view(b, 1, 1, 1)
    return torch.where(apply, grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: AugmentParams, g: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur, per-image sigma, applied with probability ``p.blur_p``.

    Kernel size is about 10% of the image side (odd), as in the paper.
    """
    b, c, hgt, wid = x.shape
    dev = x.device
    apply = _bernoulli(b, p.blur_p, g, dev).view(b, 1, 1, 1)
    sigma = _uniform(b, p.blur_sigma[0], p.blur_sigma[1], g, dev)  # (B,)
    k = max(3, int(0.1 * hgt) // 2 * 2 + 1)
    r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2  # (k,)
    kern = torch.exp(-(r.view(1, k) ** 2) / (2 * sigma.view(b, 1) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # (B, k)
    kern = kern.repeat_interleave(c, dim=0)  # (B*C, k): one kernel per channel per image
    y = x.reshape(1, b * c, hgt, wid)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
    return torch.where(apply, y.view(b, c, hgt, wid), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; ``mean``/``std`` are (3,) in [0, 1] units."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def augment(x: torch.Tensor, p: AugmentParams, g: torch.Generator | None = None,
            views: int = 1, shape: torch.Tensor | None = None) -> torch.Tensor:
    """``views`` random views of every image, before normalisation.

    Args:
        x: (B, 3, H, W) uint8 images.
        p: augmentation settings.
        g: random generator on ``x``'s device (None = torch's global one).
        views: views per image, each with its own random parameters.
        shape: (B, 2) each image's own height and width inside its frame (``crop_flip``).
    Returns:
        (views * B, 3, out_size, out_size) float in [0, 1]; rows v * B + k from image k.
    """
    v = crop_flip(to_float(x), p, g, views, shape)  # bilinear: stays in [0, 1]
    if p.jitter_p > 0:
        v = color_jitter(v, p, g, inplace=True)
    if p.gray_p > 0:
        v = random_grayscale(v, p.gray_p, g)
    if p.blur_p > 0:
        v = gaussian_blur(v, p, g)
    return v.clamp_(0, 1)


def two_views(x: torch.Tensor, p: AugmentParams, g: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of every image (x_i, x_j in the paper), before normalisation."""
    both = augment(x, p, g, views=2)  # (2B, 3, S, S): one pass, independent params
    return both[: len(x)], both[len(x):]


def normalize_into(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``normalize`` in one fused pass, written straight into ``memory_format`` (the model's)."""
    scale = (1.0 / std).view(1, -1, 1, 1).to(x.dtype)
    shift = (-mean / std).view(1, -1, 1, 1).to(x.dtype)
    out = torch.empty_like(x, memory_format=memory_format)
    return torch.addcmul(shift, x, scale, out=out)

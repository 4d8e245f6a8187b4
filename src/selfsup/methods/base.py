"""The interface every method implements, the registry, and what methods share (the online
networks, moving-average targets). See ``selfsup.methods`` for the interface in words."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from selfsup import dist
from selfsup.augment import AugmentParams, augment, normalize_into
from selfsup.config import Config, Plugin, declare
from selfsup.models import Encoder, ProjectionHead, init_encoder, nhwc_safe_on_cpu
from selfsup.optim import build_optimizer

M = TypeVar("M", bound=nn.Module)
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available by name (``--method name``), its settings
    (``Settings``) options of every config (``--queue-size``, ...)."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.title = cls.__dict__.get("title") or name
        METHODS[name] = cls
        declare(Plugin("method", name, cls.Settings, dict(cls.defaults), cls.check_config,
                       {k: dict(v) for k, v in cls.preset_defaults.items()}))
        return cls

    return deco


def build_method(cfg: Config, device: torch.device, image_size: int, mean: list[float],
                 std: list[float], peak_lr: float, amp_dtype: torch.dtype | None, batch: int
                 ) -> Method:
    """The configured method, its networks on ``device`` at their initial weights."""
    return METHODS[cfg.method](cfg, device, image_size, mean, std, peak_lr, amp_dtype, batch)


def init_head(cfg: Config, feature_dim: int, layers: int = 2) -> ProjectionHead:
    """The projection head g, ``proj_hidden`` and ``proj_dim`` wide (drawn from the global
    random stream: ``Method.__init__`` seeds it before it asks for the head)."""
    return ProjectionHead(feature_dim, cfg.proj_hidden, cfg.proj_dim, layers)


def use_channels_last(encoder: nn.Module, requested: bool, device: torch.device,
                      verbose: bool = True) -> bool:
    """NHWC when ``requested``, unless this encoder hits a known CPU kernel fault in NHWC."""
    if requested and device.type == "cpu" and not nhwc_safe_on_cpu(encoder):
        if verbose:
            print("note: channels_last off: this encoder has a strided 1x1 convolution with "
                  "fewer than 16 input channels, which the CPU kernels mishandle in NHWC",
                  flush=True)
        return False
    return requested


def prepare(model: M, device: torch.device, channels_last: bool) -> M:
    """Move a model to the device, in NHWC memory format when ``channels_last``."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


class Online(nn.Module):
    """The trained networks as one module (what DDP wraps): f, g and, for methods that have
    one, a predictor q. ``forward``: views (B, 3, S, S) -> q(g(f(v))) or g(f(v))."""

    def __init__(self, encoder: Encoder, head: nn.Module, predictor: nn.Module | None = None
                 ) -> None:
        super().__init__()
        self.encoder, self.head, self.predictor = encoder, head, predictor

    def forward(self, v: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``v``: (B, 3, S, S), or a list of such batches of several sides (multi-crop): the
        encoder sees each apart and the head their features concatenated, in one call (so that
        DDP's backward finds each parameter used once)."""
        h = (self.encoder(v) if isinstance(v, torch.Tensor)
             else torch.cat([self.encoder(x) for x in v]))  # (B, feature_dim)
        z = self.head(h)  # (B, proj_dim)
        return z if self.predictor is None else self.predictor(z)  # type: ignore[no-any-return]


class Method:
    """Base class: the online networks, their optimiser, the views and the update.

    Subclasses declare their own hyper-parameters in ``Settings`` (a dataclass of
    ``config.setting`` fields; read as ``self.settings``), set ``defaults`` (values of the
    run's other fields the method's paper uses, applied over the preset and under the user's
    options) and ``preset_defaults`` (those values scaled to a preset's machine), build their
    extra networks in ``build`` and compute the loss in ``loss``; ``after_step`` runs after
    every optimiser step (moving averages, queues).
    In several processes (torchrun) the online networks are wrapped in DistributedDataParallel and
    every batch norm, extra networks' included, is global (``sync_bn``).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # as the paper writes it, for reports
    Settings: ClassVar[type | None] = None  # the method's own settings (a dataclass)
    defaults: ClassVar[dict[str, Any]] = {}
    # values over ``defaults`` under a named preset: the paper's setting scaled to that
    # preset's machine (say why, with the measurement, where it is set)
    preset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    evaluated: ClassVar[str] = "the encoder f"  # which network is saved and evaluated
    target_copies: ClassVar[int] = 0  # copies of f and g kept besides the online ones
    loss_name: ClassVar[str] = "loss"  # the loss as its paper names it, for figures
    head_layers: ClassVar[int] = 2  # linear layers of the projection head g

    @classmethod
    def chance_loss(cls, cfg: Config, batch: int) -> tuple[float, str] | None:
        """The loss of an encoder that tells no image from another, and how to read it (for
        the loss figure's reference line); None where the loss has no such level."""
        return None

    @classmethod
    def loss_title(cls, cfg: Config) -> str:
        """The loss a run of ``cfg`` trains with, for figures (``loss_name`` unless a setting
        changes it)."""
        return cls.loss_name

    # True when neither ``loss`` nor ``after_step`` reads ``progress``: a budgeted run can then
    # keep the first steps it timed (they do not depend on the total it fixes from them).
    progress_free: ClassVar[bool] = False

    def __init__(self, cfg: Config, device: torch.device, image_size: int, mean: list[float],
                 std: list[float], peak_lr: float, amp_dtype: torch.dtype | None, batch: int
                 ) -> None:
        self.cfg, self.device, self.peak_lr, self.amp_dtype = cfg, device, peak_lr, amp_dtype
        self.settings: Any = None if self.Settings is None else cfg.of(self.Settings)
        self.batch = batch  # the global batch
        encoder = init_encoder(cfg)
        self.nhwc = use_channels_last(encoder, cfg.channels_last, device, verbose=dist.is_main())
        predictor = self.predictor(cfg)
        torch.manual_seed(cfg.seed + 1)  # the head's weights seeded apart from the encoder's
        head = self.make_head(cfg, encoder.feature_dim)
        online = Online(prepare(encoder, device, self.nhwc), head.to(device),
                        None if predictor is None else predictor.to(device))
        nets = nn.ModuleDict(dict(online=online, **self.build(online)))
        if dist.world_size() > 1 and cfg.sync_bn:
            nets = dist.convert_batchnorm(nets, device)  # type: ignore[assignment]
        self._adopt(nets)
        self.aug = AugmentParams.from_config(cfg, image_size)
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.mem = torch.channels_last if self.nhwc else torch.contiguous_format

    # --- what a method defines ---

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for settings this method cannot run with (nothing by default)."""

    def make_head(self, cfg: Config, feature_dim: int) -> nn.Module:
        """The head g on the encoder's features, at its initial weights (the random stream is
        seeded for it): by default the shared ``ProjectionHead`` of ``head_layers`` layers,
        ``proj_hidden`` and ``proj_dim`` wide."""
        return init_head(cfg, feature_dim, self.head_layers)

    def predictor(self, cfg: Config) -> nn.Module | None:
        """The online network's predictor after the head, if the method has one."""
        return None

    def build(self, online: Online) -> dict[str, nn.Module]:
        """The method's other networks and buffers, by the names the checkpoint uses."""
        return {}

    def loss(self, v: Any, progress: float) -> torch.Tensor:
        """The loss of a step's views (what ``views`` made: by default (2B, 3, S, S), rows k and
        k+B of image k); called under autocast."""
        raise NotImplementedError

    @classmethod
    def view_sizes(cls, cfg: Config, side: int) -> list[tuple[int, int]]:
        """The views a step makes of each image, as (side, how many): by default two of the
        training side. The memory check counts their activations."""
        return [(side, 2)]

    def after_step(self, progress: float) -> None:
        """Called after every optimiser step, with the fraction of training done before it."""

    # --- the interface the loop calls ---

    def _adopt(self, nets: nn.ModuleDict) -> None:
        self.nets = nets
        self.online: Online = nets["online"]  # type: ignore[assignment]
        self.encoder: Encoder = self.online.encoder  # type: ignore[assignment]
        self.head = self.online.head
        self.opt = build_optimizer([self.online], self.cfg, self.peak_lr)
        self.net: nn.Module = self.online
        if dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = next(self.online.parameters()).device
            self.net = DistributedDataParallel(self.online, device_ids=[dev] if dev.type == "cuda"
                                               else None)
        if self.cfg.compile != "off":  # the training pass; state dicts keep their names
            self.net = torch.compile(self.net, mode=self.cfg.compile)  # type: ignore[assignment]

    def networks(self) -> dict[str, nn.Module]:
        """Every network and buffer a checkpoint holds, by name (``encoder`` and ``head`` first,
        the names SimCLR checkpoints always had)."""
        named: dict[str, nn.Module] = dict(encoder=self.encoder, head=self.head)
        if self.online.predictor is not None:
            named["predictor"] = self.online.predictor
        named.update((k, m) for k, m in self.nets.items() if k != "online")
        return named

    def views(self, x: torch.Tensor, gen: torch.Generator, shape: torch.Tensor | None = None
              ) -> Any:
        """A step's views of a uint8 batch (B, 3, H, W), normalised, on the device; whatever
        ``loss`` takes (the loop passes them on unopened). By default (2B, 3, S, S): two views
        of each image, rows k and k+B pairing up. A multi-crop method returns, e.g., a list of
        batches of several sizes, and says so in ``view_sizes`` and ``pair_views``.

        ``shape`` (B, 2): for photos of many shapes, each image's own height and width at the
        top-left of its frame (``selfsup.data.Framed``); pass it to ``augment``, whose crops are
        then drawn on each image's own shape. None: every image fills its (B, 3, H, W) row."""
        v = augment(x, self.aug, gen, views=2, shape=shape)  # (2B, 3, S, S) in [0, 1]
        return normalize_into(v, self.mean, self.std, self.mem)

    def pair_views(self, x: torch.Tensor, gen: torch.Generator,
                   shape: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of each image, both (B, 3, S, S) and normalised: what the label-free
        monitor compares and the augmentation grid shows. By default the halves of ``views``."""
        v = self.views(x, gen, shape)
        return v[:len(x)], v[len(x):]

    def update(self, v: Any, lr: float, progress: float = 0.0) -> torch.Tensor:
        """One optimiser step on ready views (``views``'s); returns the detached loss.

        Args:
            progress: the fraction of training done before this step (momentum schedules).
        """
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss = self.loss(v, progress)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.after_step(progress)
        return loss.detach()

    def step(self, x: torch.Tensor, lr: float, gen: torch.Generator, progress: float = 0.0,
             shape: torch.Tensor | None = None) -> torch.Tensor:
        """Make the views of a uint8 batch (B, 3, H, W) (of images of ``shape``, as ``views``)
        and take one step; returns the detached loss."""
        return self.update(self.views(x, gen, shape), lr, progress)

    def train(self, mode: bool = True) -> None:
        self.nets.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return dict({k: m.state_dict() for k, m in self.networks().items()},
                    optimizer=self.opt.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.networks().items():
            m.load_state_dict(state[k])
        self.opt.load_state_dict(state["optimizer"])


def local_side(global_side: int, local_size: int) -> int:
    """The local views' side: ``local_size``, or 96/224 of the global side (DINO's and SwAV's
    ratio) to a multiple of 8 (at least 8)."""
    return local_size or max(8, 8 * round(global_side * 96 / 224 / 8))


class MultiCrop(Method):
    """A method that trains on multi-crop views (SwAV, Caron et al. 2020): the two global views
    of every image and ``local_crops`` small local ones, crops of ``local_scale_min`` up to
    ``crop_scale_min`` of the image at the side ``local_side`` gives. Its ``Settings`` declare
    ``local_crops``, ``local_size`` and ``local_scale_min``. ``views`` returns a list: [the
    global views (2B, 3, S, S)], then the local ones (L B, 3, s, s) when there are any; rows
    v B + k are image k's in each. The label-free monitor compares the global views."""

    @classmethod
    def view_sizes(cls, cfg: Config, side: int) -> list[tuple[int, int]]:
        s: Any = cfg.of(cls.Settings)  # type: ignore[arg-type]
        return [(side, 2)] + ([(local_side(side, s.local_size), s.local_crops)]
                              if s.local_crops else [])

    @functools.cached_property
    def local_aug(self) -> AugmentParams:
        """The local views' augmentation: the run's, smaller crops at the local side."""
        s = self.settings
        return dataclasses.replace(
            self.aug, out_size=local_side(self.aug.out_size, s.local_size),
            scale=(min(s.local_scale_min, self.aug.scale[0]), self.aug.scale[0]))

    def views(self, x: torch.Tensor, gen: torch.Generator, shape: torch.Tensor | None = None
              ) -> list[torch.Tensor]:
        out = [super().views(x, gen, shape)]
        if self.settings.local_crops:
            small = augment(x, self.local_aug, gen, views=self.settings.local_crops, shape=shape)
            out.append(normalize_into(small, self.mean, self.std, self.mem))
        return out

    def pair_views(self, x: torch.Tensor, gen: torch.Generator,
                   shape: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = super().views(x, gen, shape)  # the global views alone
        return v[:len(x)], v[len(x):]


LOCAL_CROPS_HELP = "multi-crop: small local views per image besides the 2 global ones"
LOCAL_SIZE_HELP = ("multi-crop: side of the local views in px; 0 = 96/224 of the global views' "
                   "side, to a multiple of 8")
LOCAL_SCALE_HELP = ("multi-crop: smallest local crop, as a fraction of the image (the largest "
                    "is --crop-scale-min)")


class MomentumMethod(Method):
    """A method with a target copy of f and g that follows the online one as an exponential
    moving average, theta_t <- m theta_t + (1 - m) theta_o, after every step, and gets no
    gradient. Batch-norm statistics are the target's own (from its forward passes), as in the
    papers' code. ``momentum(progress)`` gives m; constant ``target_momentum`` by default."""

    target_copies = 1

    def build(self, online: Online) -> dict[str, nn.Module]:
        target = copy.deepcopy(Online(online.encoder, online.head))
        target.requires_grad_(False)
        return dict(target=target)

    @property
    def target(self) -> Online:
        return self.nets["target"]  # type: ignore[return-value]

    def momentum(self, progress: float) -> float:
        return float(self.settings.target_momentum)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = self.momentum(progress)
        pairs = [(t, o) for part in ("encoder", "head")
                 for t, o in zip(getattr(self.target, part).parameters(),
                                 getattr(self.online, part).parameters(), strict=True)]
        targets, onlines = zip(*pairs, strict=True)
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, onlines, alpha=1 - m)

    def networks(self) -> dict[str, nn.Module]:
        named = super().networks()
        target = named.pop("target")
        named.update(target_encoder=target.encoder, target_head=target.head)  # type: ignore
        return named


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: m = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from base at k = 0 to 1 at
    the last step K (``progress`` = k / K)."""
    return 1 - (1 - base) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2


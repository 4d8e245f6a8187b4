"""selfsup's losses against lightly's implementations of the same losses, on the same inputs.

Run in a separate environment that has lightly (``make peer-losses`` builds one in
``.peer-venv``: the pinned CPU torch and lightly without its dependencies; lightly's loss
package imports ``torchvision.ops`` for one loss that is not compared here, so when torchvision
is absent a stand-in module without it is put in its place). selfsup's own code comes from
``src``. Each pair is compared on random float64 inputs of several shapes, loss and gradient
(selfsup's losses compute in float32, so they agree to float32's rounding); two controls, a
loss with a setting changed by a few per cent, must come out different. The script prints
one line per comparison and exits 1 if a loss differs by more than ``TOLERANCE`` relative or a
control does not.

    PYTHONPATH=src .peer-venv/bin/python benchmarks/peer_losses.py
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F


class _Absent:
    """What the stand-in torchvision hands out for any name: a class nothing here calls."""


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``torchvision`` and its submodules as empty modules whose every attribute
    is ``_Absent``: lightly's packages import torchvision at the top for models and one loss
    that are not compared here."""

    def find_spec(self, name: str, path: object, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda attr: _Absent  # type: ignore[method-assign]
        module.__version__ = "0.0"  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _StandIn())

import lightly  # noqa: E402
from lightly.loss import (  # noqa: E402
    BarlowTwinsLoss,
    DCLLoss,
    DINOLoss,
    NegativeCosineSimilarity,
    NTXentLoss,
    VICRegLoss,
)

from selfsup.losses import byol_loss, info_nce, nt_xent, nt_xent_views  # noqa: E402
from selfsup.methods.barlow import barlow_loss  # noqa: E402
from selfsup.methods.dino import dino_loss  # noqa: E402
from selfsup.methods.vicreg import vicreg_loss  # noqa: E402

TOLERANCE = 1e-5  # selfsup's losses compute in float32 (``fp32_loss``); lightly's here in float64
SHAPES = [(8, 16), (64, 32), (5, 9), (32, 256)]  # (N, D): N < D and N > D both


def compare(name: str, ours: Callable[..., torch.Tensor], theirs: Callable[..., torch.Tensor],
            *inputs: torch.Tensor) -> float:
    """The largest relative difference of the two losses and of their gradients."""
    a = [x.clone().requires_grad_(True) for x in inputs]
    b = [x.clone().requires_grad_(True) for x in inputs]
    la, lb = ours(*a), theirs(*b)
    la.backward()
    lb.backward()
    worst = abs(la.item() - lb.item()) / max(abs(lb.item()), 1e-12)
    for x, y in zip(a, b, strict=True):
        if x.grad is not None or y.grad is not None:
            assert x.grad is not None and y.grad is not None, name
            worst = max(worst, ((x.grad - y.grad).norm() / y.grad.norm().clamp_min(1e-30)).item())
    return worst


def main() -> int:
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    results: dict[str, float] = {}
    controls: list[float] = []  # Barlow's lambda 0.005 for 0.0051, NT-Xent's tau 0.21 for 0.2

    def record(name: str, worst: float) -> None:
        results[name] = max(results.get(name, 0.0), worst)

    def check(n: int, d: int) -> None:
        za, zb = rand(n, d), rand(n, d)
        record("NT-Xent (SimCLR) vs NTXentLoss",
               compare("nt_xent", lambda x, y: nt_xent(x, y, 0.2),
                       NTXentLoss(temperature=0.2), za, zb))
        record("DCL (SimCLR --decoupled) vs DCLLoss",
               compare("dcl", lambda x, y: nt_xent_views(torch.cat((x, y)), 2, 0.2,
                                                         decoupled=True),
                       DCLLoss(temperature=0.2), za, zb))
        queue = F.normalize(rand(4 * n, d), dim=1)
        theirs = NTXentLoss(temperature=0.2, memory_bank_size=(4 * n, d))
        theirs.memory_bank.bank = queue.clone()  # (K, D); lightly reads it transposed
        record("InfoNCE with a queue (MoCo) vs NTXentLoss(memory_bank_size)",
               compare("info_nce", lambda q, k: info_nce(q, k.detach(), queue, 0.2),
                       lambda q, k: theirs(q, k.detach()), za, zb))
        # BYOL's 2 - 2 cos against lightly's -cos: the same up to 2 + 2 x (theirs)
        neg_cos = NegativeCosineSimilarity()
        record("BYOL vs 2 + 2 NegativeCosineSimilarity",
               compare("byol", byol_loss, lambda p, z: 2 + 2 * neg_cos(p, z), za, zb))
        record("VICReg vs VICRegLoss",
               compare("vicreg", vicreg_loss, VICRegLoss(), za, zb))
        record("Barlow Twins vs BarlowTwinsLoss (lambda 0.0051)",
               compare("barlow", lambda x, y: barlow_loss(x, y, 0.0051),
                       BarlowTwinsLoss(lambda_param=0.0051), za, zb))
        controls.append(compare("control", lambda x, y: barlow_loss(x, y, 0.005),
                                BarlowTwinsLoss(lambda_param=0.0051), za, zb))
        controls.append(compare("control", lambda x, y: nt_xent(x, y, 0.21),
                                NTXentLoss(temperature=0.2), za, zb))
        views, k = 6, d  # 2 global + 4 local views of n images, K = d prototypes
        student, teacher = rand(views * n, k), rand(2 * n, k)
        centre = 0.1 * rand(k)
        peer = DINOLoss(output_dim=k, teacher_temp=0.04, student_temp=0.1)
        peer.center.data = centre.view(1, 1, k).clone()

        def lightly_dino(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return peer(list(t.detach().chunk(2)), list(s.chunk(views)), teacher_temp=0.04)

        record("DINO vs DINOLoss (2 global + 4 local views)",
               compare("dino", lambda s, t: dino_loss(s, t.detach(), centre, 0.1, 0.04),
                       lightly_dino, student, teacher))

    for n, d in SHAPES:
        check(n, d)
    print(f"lightly {lightly.__version__}, torch {torch.__version__}, shapes (N, D) {SHAPES}")
    failed = False
    for name, worst in results.items():
        ok = worst <= TOLERANCE
        failed |= not ok
        print(f"{'same' if ok else 'DIFFERENT'}  {name}: largest relative difference "
              f"{worst:.1e} (loss and gradients)")
    caught = min(controls) > TOLERANCE
    failed |= not caught
    print(f"{'caught' if caught else 'MISSED'}  controls (Barlow lambda 0.005 against 0.0051, "
          f"NT-Xent tau 0.21 against 0.2): smallest relative difference {min(controls):.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

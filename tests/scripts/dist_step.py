"""Two optimisation steps of each given method on fixed views, in one process or under
torchrun.

    python dist_step.py OUT METHOD[:global|local[:sync|nosync]] ...
    torchrun --standalone --nproc_per_node 2 dist_step.py OUT METHOD ...

The global batch is always the same 16 images; each of W processes takes its 16 / W. For each
case in turn, every rank writes the global losses and its state (every network and buffer of the
method) to OUT.<case>.rank<r> (``:`` in the case's name becoming ``-``). ``simclr_mc`` is SimCLR
with 3 local views (multi-crop). ``local`` replaces the gathering across processes by none:
SimCLR's NT-Xent then sees each process's own batch only,
MoCo's queue only each process's own keys; ``nosync`` keeps batch-norm statistics per process.
"""

import sys

import torch

from selfsup import dist, losses
from selfsup.config import config_from_dict
from selfsup.methods import build_method, simclr

out, cases = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
# float64 networks: sums taken in another order differ by float noise, which the sharp softmax
# of DINO and the trust ratios of LARS magnify to 1e-3 in float32; a real difference (a batch
# statistic or a loss over one process's rows) stays 1e-2 or more. The losses are float32.
torch.set_default_dtype(torch.float64)
device = dist.setup(torch.device("cpu"))
w, r = dist.world_size(), dist.rank()
n = 16 // w  # this process's share of the batch
real_nt_xent, real_gather = simclr.nt_xent, dist.gather_with_grad
for case in cases:
    parts = case.split(":")
    name, gather, bn = (parts + ["global", "sync"][len(parts) - 1:])[:3]
    cfg = config_from_dict(dict(method="simclr" if name == "simclr_mc" else name,
                                model="small_cnn", width=8, proj_hidden=32,
                                proj_dim=16, batch_size=16, queue_size=32, seed=0,
                                sync_bn=bn == "sync", target_momentum=0.9, prototypes=64,
                                local_crops=3, teacher_momentum=0.9))
    if gather == "local" and name == "simclr":  # the known bug: NT-Xent over the own batch only
        simclr.nt_xent = lambda z1, z2, t, *a: losses.nt_xent(z1, z2, t)  # type: ignore
    elif gather == "local":  # MoCo's queue fed this process's keys only
        dist.gather_with_grad = lambda x: x  # type: ignore[assignment]
    method = build_method(cfg, device, 16, [0.5] * 3, [0.25] * 3, 0.5, None, 16)
    g = torch.Generator().manual_seed(123)
    v1, v2 = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
    mine = torch.cat((v1[r * n:(r + 1) * n], v2[r * n:(r + 1) * n]))
    if name in ("dino", "simclr_mc"):  # multi-crop: the global views and 3 local views of 8 px,
        # view-major rows
        local = torch.randn(3, 16, 3, 8, 8, generator=g)
        mine = [mine, torch.cat([v[r * n:(r + 1) * n] for v in local])]  # type: ignore
    method.train()
    loss = dist.all_mean(float(method.update(mine, 0.5, 0.0)))
    loss2 = dist.all_mean(float(method.update(mine, 0.5, 0.5)))  # a second step sees the first's
    state = {f"{part}.{k}": v for part, m in method.networks().items()
             for k, v in m.state_dict().items()}
    torch.save(dict(loss=[loss, loss2], state=state, world=w),
               f"{out}.{case.replace(':', '-')}.rank{r}")
    simclr.nt_xent, dist.gather_with_grad = real_nt_xent, real_gather
dist.cleanup()
dist.exit_process(0)  # as the command does: skip the teardown that can abort

"""One SimCLR optimisation step on fixed views, in one process or under torchrun.

    python dist_step.py OUT [global|local] [sync|nosync]
    torchrun --standalone --nproc_per_node 2 dist_step.py OUT ...

The global batch is always the same 16 images; each of W processes takes its 16 / W. Rank 0
writes the global loss and the updated weights to OUT. ``local`` replaces the gathering of
projections by none: each process computes NT-Xent over its own batch only.
"""

import sys

import torch

from selfsup import dist, losses, train
from selfsup.config import config_from_dict

out, gather, bn = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
cfg = config_from_dict(dict(model="small_cnn", width=8, proj_hidden=32, proj_dim=16,
                            batch_size=16, seed=0, sync_bn=bn == "sync"))
device = dist.setup(torch.device("cpu"))
if gather == "local":  # the known bug: NT-Xent over each process's own batch only
    train.nt_xent = lambda z1, z2, t, *a: losses.nt_xent(z1, z2, t)  # type: ignore[assignment]
method = train.SimCLR(cfg, device, 16, [0.5] * 3, [0.25] * 3, 0.5, None)
g = torch.Generator().manual_seed(123)
v1, v2 = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
w, r = dist.world_size(), dist.rank()
n = 16 // w
mine = torch.cat((v1[r * n:(r + 1) * n], v2[r * n:(r + 1) * n]))
method.train()
loss = dist.all_mean(float(method.update(mine, 0.5)))
loss2 = dist.all_mean(float(method.update(mine, 0.5)))  # a second step sees the first's effect
if dist.is_main():
    torch.save(dict(loss=[loss, loss2], state=method.pair.state_dict(), world=w), out)
dist.cleanup()
dist.exit_process(0)  # as the command does: skip the teardown that can abort

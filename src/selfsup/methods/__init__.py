"""Self-supervised methods by name, behind one small interface that the training loop calls.

A method owns its networks, its optimiser and whatever state it carries between steps (a queue of
keys, a moving-average target). The loop owns the data order, the learning-rate schedule, the
time budget, checkpoints and the kNN monitor, and knows no method by name. What it calls:

* ``step(x, lr, gen, progress)``: augment a uint8 batch, take one optimiser step, return the
  detached loss (``views`` + ``update``, which benchmarks also call apart);
* ``encoder``: the network that is saved and evaluated;
* ``networks()`` and ``state_dict()`` / ``load_state_dict()``: everything a checkpoint holds;
* ``train(mode)``.

A method is a subclass of ``Method`` that declares its hyper-parameters in ``Settings``, builds
its extra networks in ``build`` and computes its loss in ``loss``; moving-average targets come
from ``MomentumMethod``, multi-crop views (two global views and small local ones) from
``MultiCrop``. Register it with ``@register_method("name")`` in a module of this
package (every module here is imported) or of your own (``SELFSUP_PLUGINS``, see
``selfsup.plugins``): one file, no other change.
"""

from __future__ import annotations

import importlib
import pkgutil

from selfsup.methods.base import (
    METHODS,
    Method,
    MomentumMethod,
    MultiCrop,
    Online,
    build_method,
    cosine_momentum,
    init_head,
    prepare,
    register_method,
    use_channels_last,
)

# Each module registers its methods when imported: these first (the order of the method table
# and of settings several methods declare), then any other module of the package.
_FIRST = ("simclr", "moco", "byol")

for _name in (*_FIRST, *sorted({m.name for m in pkgutil.iter_modules(__path__)} - {*_FIRST,
                                                                                  "base"})):
    importlib.import_module(f"selfsup.methods.{_name}")

__all__ = ["METHODS", "Method", "MomentumMethod", "MultiCrop", "Online", "build_method",
           "cosine_momentum", "init_head", "prepare", "register_method", "use_channels_last"]

"""What a run shows and how it stops: the progress bar (or lines, off a terminal) and the
first Ctrl-C or SIGTERM turned into "finish this step, save, stop"."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from selfsup.errors import Interrupted


class Progress:
    """A tqdm bar on a terminal; a line every ``every`` steps elsewhere (logs stay readable)."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled, self.every, self.total = enabled, every, total
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, loss: float, lr: float, ips: float, views: float,
               read: float = 0.0) -> None:
        """``views``: the share of step time spent making the views (reading the images, then
        the augmentation): near 1, the CPU's augmentation is the bottleneck; near 0, the model
        is. ``read``: of it, reading the images (the step's wait for data)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}",
                                 views=f"{views:.0%}", data=f"{read:.0%}")
        elif step % self.every == 0 or step == self.total:
            left = (self.total - step) * (time.perf_counter() - self.t0) / max(1, step - self.s0)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  {ips:.0f} img/s  "
                  f"views {views:.0%} of step time (data {read:.0%})  {left / 60:.1f} min left",
                  file=sys.stderr,
                  flush=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnSignal:
    """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one: stop at once.

    Stopping between steps keeps the checkpoint consistent (a step cut in half would leave
    batch-norm statistics or half the weights updated). SIGTERM is what ``timeout``, job
    schedulers and container runtimes send before they kill a job.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        self.announce = announce
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step and saving ({name} again to abort)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

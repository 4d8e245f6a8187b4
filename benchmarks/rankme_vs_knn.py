"""How far RankMe, a label-free signal, ranks representations as kNN accuracy does.

Across runs: RankMe of each finished run's saved training embeddings (``train_emb.npy``, a fixed
seeded subset of ``--rows`` rows, the same rows for every run) against its kNN and linear-probe
test accuracy from ``metrics.json``; Spearman's rank correlation over the runs, for RankMe and for
RankMe divided by the feature width. Within a run: for runs whose ``metrics.json`` holds both
monitors' histories (``quality_history``, ``knn_history``), the rank correlation of RankMe with
the monitor's kNN accuracy over the checks.

    python benchmarks/rankme_vs_knn.py runs/a runs/b ... [--rows 2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from selfsup.quality import rankme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--rows", type=int, default=2048)
    args = ap.parse_args()
    rows = []
    print(f"{'run':34}{'model':>18}{'dim':>5}{'epochs':>7}{'kNN':>7}{'linear':>8}{'RankMe':>8}"
          f"{'/dim':>6}{'untrained':>10}")
    for run in map(Path, args.runs):
        m = json.loads((run / "metrics.json").read_text())
        emb = np.load(run / "train_emb.npy")
        pick = np.random.default_rng(0).permutation(len(emb))[:args.rows]
        r = rankme(emb[pick])
        r0 = rankme(np.load(run / "untrained_train_emb.npy")[pick])
        cfg = m["config"]
        knn, lin = m["knn"]["trained"], m["linear_probe"]["trained"]
        rows.append((r, r / emb.shape[1], knn, lin))
        model = f"{cfg['method']} {cfg['model']} w{cfg['width']}"
        print(f"{run.name[:33]:34}{model:>18}{emb.shape[1]:>5}{m['pretrain']['epochs']:>7.1f}"
              f"{100 * knn:>6.1f}%{100 * lin:>7.1f}%{r:>8.1f}{r / emb.shape[1]:>6.2f}{r0:>10.1f}")
        qh, kh = m.get("quality_history") or [], m.get("knn_history") or []
        if len(qh) >= 3 and len(qh) == len(kh):
            rho = spearmanr([q["rankme"] for q in qh], [k["accuracy"] for k in kh])[0]
            print(f"  within the run, over its {len(qh)} checks: Spearman(RankMe, kNN) = "
                  f"{rho:+.2f}")
    if len(rows) >= 3:
        a = np.asarray(rows)
        for name, col in (("RankMe", 0), ("RankMe / dim", 1)):
            print(f"across {len(rows)} runs: Spearman({name}, kNN) = "
                  f"{spearmanr(a[:, col], a[:, 2])[0]:+.2f}, Spearman({name}, linear) = "
                  f"{spearmanr(a[:, col], a[:, 3])[0]:+.2f}")


if __name__ == "__main__":
    main()

"""What STL-10 takes at its real size: load time, peak memory, pretraining speed.

The real release cannot be downloaded here, so this writes files of the release's exact sizes
and layout (5,000 training, 8,000 test and 100,000 unlabeled 96x96 images of random pixels,
labels, class names and folds) into a folder, points the STL-10 reader's digest table at them
(the one thing that differs from a real copy), and runs ``selfsup pretrain`` on them in a child
process per setting, reporting its peak resident memory (the child's own ``VmHWM`` from
``/proc/self/status``: on Linux ``resource``'s ``ru_maxrss`` carries a large parent's peak across
``exec``; it is read only where there is no ``/proc``) and the speed it printed.

    python benchmarks/stl10_scale.py --dir /tmp/stl10-synth [--steps 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIDE = 96
SPLITS = {"train": 5000, "test": 8000, "unlabeled": 100_000}


def write_release(folder: Path) -> dict[str, str]:
    """The release's files of random content at their real sizes; returns their MD5s."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    digests: dict[str, str] = {}
    for split, n in SPLITS.items():
        path = folder / f"{split}_X.bin"
        h = hashlib.md5()
        with open(path, "wb") as f:
            for i in range(0, n, 5000):
                block = rng.integers(0, 256, size=(min(5000, n - i), 3 * SIDE * SIDE),
                                     dtype=np.uint8).tobytes()
                f.write(block)
                h.update(block)
        digests[path.name] = h.hexdigest()
        if split != "unlabeled":
            labels = bytes(int(i % 10) + 1 for i in range(n))
            (folder / f"{split}_y.bin").write_bytes(labels)
            digests[f"{split}_y.bin"] = hashlib.md5(labels).hexdigest()
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    perm = rng.permutation(SPLITS["train"])
    (folder / "fold_indices.txt").write_text(
        "".join(" ".join(map(str, perm[k * 1000:(k + 1) * 1000])) + " \n" for k in range(10)))
    return digests


CHILD = """
import json, resource, sys, time
from selfsup import stl10
stl10.STL10_MD5.update(json.loads(sys.argv[1]))
from selfsup.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
try:  # the child's own peak: ru_maxrss carries the parent's across exec on Linux
    peak = next(int(ln.split()[1]) for ln in open("/proc/self/status")
                if ln.startswith("VmHWM:")) / 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"RESULT rc={rc} wall_s={time.perf_counter() - t0:.1f} peak_rss_mb={peak:.0f}", flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where to write the release-sized files")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    root = Path(args.dir)
    folder = root / "stl10_binary"
    table = folder / "digests.json"
    if not table.is_file():
        t0 = time.perf_counter()
        table.write_text(json.dumps(write_release(folder)))
        print(f"wrote the release-sized files in {time.perf_counter() - t0:.0f} s", flush=True)
    digests = table.read_text()
    settings = [("96 px, with unlabeled", []), ("32 px, with unlabeled", ["--image-size", "32"]),
                ("96 px, labelled only", ["--no-stl10-unlabeled"])]
    for label, extra in settings:
        out = root / "runs"
        name = f"s{abs(hash(label)) % 10**6}-{int(time.time())}"
        cmd = [sys.executable, "-c", CHILD, digests, "pretrain", "--dataset", "stl10",
               "--data-dir", str(root), "--out-dir", str(out), "--name", name, "--steps",
               str(args.steps), "--width", "32", "--knn-every", "0", "--no-progress", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines()
                 if ln.startswith(("data:", "pretraining:", "RESULT", "resizing"))]
        print(f"== {label}: {' '.join(extra) or '(defaults)'}\n  " + "\n  ".join(lines), flush=True)
        if r.returncode:
            print(r.stderr[-2000:], flush=True)
    print(f"this process: peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

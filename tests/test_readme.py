"""The README's shell blocks, run as written (issue 20).

Every command line of every shell block runs, in README order, in one folder that holds what
the README assumes a user has: `cifar10-jpg/` (labelled image folders), `my_photos/`, and the
CIFAR-10 release where `--data-dir` points by default. Runs then write `runs/NAME`, the name
the README gives them. Placeholders take values (RUN is runs/NAME, DIR is my_photos, N is 3,
`[options]` is none, and each of `[--freeze | --from-scratch]` runs). Commands that train get
options appended that make them take seconds (options given later win); nothing else is
changed. The few lines that cannot run here are listed in NOT_RUN with the reason (they are
still parse-checked by tests/test_cli.py). The Python blocks run in tests/test_export.py.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.helpers import readme_variants, shell_lines, torchrun, write_images

NOT_RUN = {  # a line's beginning -> why it does not run here
    "make run": "installs, then the digits demo: the demo runs as `selfsup run --dataset "
                "digits` in the digits_demo fixture",
    "make test": "this test suite",
    "pip install": "an install from the package registry (the extras are in the dev install)",
    "tensorboard --logdir": "a server that runs until stopped (tests/test_logs.py reads the "
                            "events it shows)",
    "torchrun --standalone --nproc_per_node 8": "8 processes of the gpu preset on the real "
                                                "CIFAR-10 release: needs 8 GPUs and the data",
    "torchrun --nnodes": "several machines",
    "srun": "a SLURM cluster",
}

# Options appended to the commands that train, so that each takes seconds.
TINY_PRETRAIN = ["--steps", "2", "--batch-size", "32", "--width", "8", "--view-size", "12",
                 "--knn-every", "0", "--knn-k", "5", "--tsne-points", "30",
                 "--eval-batch-size", "64", "--no-progress"]
TINY = {"run": TINY_PRETRAIN, "pretrain": TINY_PRETRAIN, "compare": TINY_PRETRAIN,
        "finetune": ["--epochs", "1", "--min-steps", "2", "--no-progress"],
        "label-efficiency": ["--epochs", "1", "--min-steps", "2", "--no-progress"]}


def _selfsup_args(words: list[str], named: set[str]) -> list[str]:
    """A selfsup command's arguments with the tiny options and, for a new run, its name."""
    if "--resume" in words:  # the run's own settings; only its length changes
        return [*words, "--no-progress"]
    args = words + TINY.get(words[0], [])
    if words[0] in ("run", "pretrain", "compare") and "--resume" not in words:
        name = "NAME" if "NAME" not in named else f"run{len(named)}"
        named.add(name)
        args += ["--name", name]
    return args


def test_the_readme_lists_what_it_does_not_run():
    lines = shell_lines()
    for prefix in NOT_RUN:
        assert any(line.startswith(prefix) for line in lines), f"stale NOT_RUN entry {prefix!r}"
    assert sum(not any(s.startswith(p) for p in NOT_RUN) for s in lines) >= 15


@pytest.mark.slow
def test_readme_shell_blocks_run_as_written(cifar_dir, tmp_path, monkeypatch, capsys):
    from selfsup.cli import main

    work = tmp_path / "user"
    for c, name in enumerate(["cat", "dog", "emu"]):
        write_images(work / "cifar10-jpg" / "train" / name, 12, size=16, seed=c, color=c)
        write_images(work / "cifar10-jpg" / "test" / name, 4, size=16, seed=10 + c,
                     suffix=".jpg", color=c)
    write_images(work / "my_photos", 5, size=20, seed=99, suffix=".jpg")
    monkeypatch.chdir(work)
    monkeypatch.setenv("SELFSUP_DATA", str(cifar_dir))
    named: set[str] = set()
    ran = []
    for line in shell_lines():
        if any(line.startswith(p) for p in NOT_RUN):
            continue
        for cmd in readme_variants(line):
            words = shlex.split(cmd)
            if words[0] == "selfsup":
                code = main(_selfsup_args(words[1:], named))
                out = capsys.readouterr()
                assert code == 0, f"{cmd}\n{out.out[-2000:]}\n{out.err[-2000:]}"
            elif words[0] == "torchrun":
                m = words.index("-m")
                args = _selfsup_args(words[m + 2:], named)
                p = subprocess.run([*torchrun(), *words[1:m], "-m", "selfsup", *args],
                                   capture_output=True, text=True, timeout=300)
                assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
            elif words[:2] == ["tail", "-f"]:  # follows forever: read the same file once
                p = subprocess.run(["tail", "-n", "2", *words[2:]], capture_output=True,
                                   text=True, check=True)
                assert '"step"' in p.stdout
            else:
                pytest.fail(f"a README shell line this test does not know how to run: {cmd}")
            ran.append(cmd)
    assert len(ran) >= 15
    run = work / "runs" / "NAME"
    # What the lines' comments promise.
    for f in ("report.html", "encoder.onnx", "encoder.torchscript.pt", "encoder.safetensors",
              "classifier_linear_0.1.pt", "metrics.jsonl"):
        assert (run / f).is_file(), f
    for f in ("predictions_my_photos.csv", "embeddings_my_photos.npy",
              "embeddings_my_photos.files.json"):
        assert (run / f).is_file(), f
    assert list((work / "runs").glob("*/tensorboard/events.out.tfevents.*"))
    assert list((work / "runs").glob("*/compare.html"))

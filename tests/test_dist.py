"""Several processes: global NT-Xent, global batch norm, sharding, torchrun end to end."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import dist
from selfsup.losses import nt_xent
from tests.helpers import SRC_ENV, torchrun

SCRIPTS = Path(__file__).parent / "scripts"

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one process: the helpers are the identity ---------------------------------------------


def test_one_process_helpers_are_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert dist.gather_with_grad(x) is x and dist.all_sum_with_grad(x) is x
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.gather_objects(3) == [3]
    assert dist.all_mean(2.5) == 2.5 and dist.any_true(False) is False


def test_global_batchnorm_is_batchnorm_in_one_process_and_keeps_state():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 5),
                        nn.BatchNorm1d(5))
    with torch.no_grad():
        ref[1].weight.uniform_()
        ref[1].running_mean.uniform_()
    conv = dist.convert_batchnorm(ref, torch.device("cpu"))
    assert sum(isinstance(m, dist.GlobalBatchNorm) for m in conv.modules()) == 2
    a, b = ref.state_dict(), conv.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(conv(x), ref(x))


def test_nt_xent_rank_slices_match_the_global_loss():
    """What each of 2 processes computes (its anchors against all rows) averages to the loss of
    the whole batch: checked in one process with a gather that returns every 'process's rows."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    full = nt_xent(z1, z2, 0.3)

    def gather_for(r):
        wholes = iter([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])  # called for z1, then z2

        def gather(t):
            w = next(wholes)
            return torch.cat((w[:4 * r], t, w[4 * r + 4:]))  # this process's rows in place

        return gather

    parts = [nt_xent(z1[4 * r:4 * r + 4], z2[4 * r:4 * r + 4], 0.3, gather_for(r), r)
             for r in range(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full)
    # A process that ignores the others' rows computes another loss.
    local = nt_xent(z1[:4], z2[:4], 0.3)
    assert abs(float(local.detach()) - float(parts[0].detach())) > 1e-3


# --- two real processes --------------------------------------------------------------------


METHODS = ["simclr", "moco", "byol", "vicreg", "barlow", "dino", "simclr_mc"]  # _mc: multi-crop
# the known bugs, two processes only: a loss or a queue over each process's own rows, per-process
# batch norm
BROKEN = ["simclr:local", "simclr:global:nosync", "moco:local"]


def _steps(out, procs, cases):
    """Every case's results of tests/scripts/dist_step.py, every rank's, from one launch."""
    cmd = [sys.executable] if procs == 1 else torchrun() + ["--standalone",
                                                            f"--nproc_per_node={procs}"]
    p = subprocess.run(cmd + [str(SCRIPTS / "dist_step.py"), str(out), *cases], env=SRC_ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return {c: [torch.load(f"{out}.{c.replace(':', '-')}.rank{r}", weights_only=True)
                for r in range(procs)] for c in cases}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Two steps of each method in one process and in two (one launch each), and of the
    broken variants in two."""
    tmp = tmp_path_factory.mktemp("dist")
    return {1: _steps(tmp / "one", 1, METHODS), 2: _steps(tmp / "two", 2, METHODS + BROKEN)}


def _max_diff(a, b, prefix=""):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a
               if k.startswith(prefix))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process_with_the_double_batch(steps, method):
    [one], two = steps[1][method], steps[2][method]
    assert two[0]["world"] == 2 and one["world"] == 1
    # Same loss at both steps and the same state: weights, BN statistics, target networks and
    # MoCo's queue (float tolerance: sums in another order).
    assert one["loss"] == pytest.approx(two[0]["loss"], rel=5e-6, abs=1e-5)  # VICReg's ~23
    assert one["state"].keys() == two[0]["state"].keys()
    # weights up to ~4 after two LARS steps (VICReg, Barlow Twins): the difference relative
    assert max(((one["state"][k].float() - two[0]["state"][k].float()).abs()
                / (1 + one["state"][k].float().abs())).max().item() for k in one["state"]) < 1e-4
    # Every process holds the same state, bit for bit: moving averages and queue included.
    assert all(torch.equal(two[0]["state"][k], two[1]["state"][k]) for k in one["state"])
    if method in ("moco", "byol"):
        assert any(k.startswith("target_encoder.") for k in one["state"])
    if method == "dino":  # the centre: the mean of the teacher's outputs over the global batch
        assert one["state"]["centre.value"].abs().sum() > 0


@pytest.mark.slow
def test_two_process_equivalence_can_fail(steps):
    """NT-Xent over each process's own batch, per-process batch norm, or a MoCo queue fed only
    this process's keys give another loss and other weights or queue."""
    [one], [local, _] = steps[1]["simclr"], steps[2]["simclr:local"]
    assert abs(local["loss"][0] - one["loss"][0]) > 0.1
    assert _max_diff(one["state"], local["state"]) > 1e-2
    per_process_bn = steps[2]["simclr:global:nosync"][0]
    assert _max_diff(one["state"], per_process_bn["state"]) > 1e-2
    [moco], moco_local = steps[1]["moco"], steps[2]["moco:local"][0]
    assert _max_diff(moco["state"], moco_local["state"], "queue.keys") > 1e-2


def _outputs(run):
    return sorted(p.name for p in run.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_readme_torchrun_command_runs_the_whole_job_once(tmp_path, digits_demo):
    """The README's torchrun line, shortened to 3 epochs (a step of two processes is checked
    against one process's, for every method, above): one run folder with the outputs of the
    one-process demo, the global batch's steps, and one report, from rank 0."""
    cmd = torchrun() + ["--standalone", "--nproc_per_node", "2", "-m", "selfsup", "run",
                        "--dataset", "digits", "--epochs", "3", "--tsne-points", "200"]
    p = subprocess.run(cmd, cwd=tmp_path, env=SRC_ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # one run folder: rank 0's name held for both processes
    run = runs[0]
    assert _outputs(run) == _outputs(digits_demo)
    two = json.loads((run / "metrics.json").read_text())
    one = json.loads((digits_demo / "metrics.json").read_text())
    assert two["machine"]["world_size"] == 2 and one["machine"]["world_size"] == 1
    assert two["pretrain"]["steps"] == 3 * (1437 // 256)  # the global batch's steps
    assert 0.5 < two["linear_probe"]["trained"] <= 1
    assert p.stdout.count("linear probe") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_machine(tmp_path):
    port = _free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "selfsup-test", "-m",
              "selfsup", "run", "--dataset", "digits", "--epochs", "3", "--out-dir",
              str(tmp_path / "runs"), "--name", "mn", "--no-progress", "--tsne-points", "200",
              "--threads", "1"]  # two "machines" on one machine's 2 cores: 1 thread each
    nodes = [subprocess.Popen(torchrun() + common, env=SRC_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    m = json.loads((tmp_path / "runs" / "mn" / "metrics.json").read_text())
    assert m["machine"]["world_size"] == 2 and m["pretrain"]["steps"] == 3 * (1437 // 256)
    # Resuming with another number of processes is refused, with the reason.
    p = subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--resume",
                        str(tmp_path / "runs" / "mn"), "--epochs", "4"], env=SRC_ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "written by 2" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_dying_process_stops_the_others(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(
        "import os, time, torch\n"
        "from selfsup import dist\n"
        "dist.setup(torch.device('cpu'), timeout_s=30)\n"
        "if dist.rank() == 1:\n"
        "    time.sleep(1); os._exit(3)\n"
        "dist.barrier()\n"  # rank 0 waits for a peer that is gone
        "time.sleep(600)\n")
    t0 = time.time()
    p = subprocess.run(torchrun() + ["--standalone", "--nproc_per_node", "2", str(script)],
                       env=SRC_ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert "exitcode  : 3" in p.stderr or "exitcode: 3" in p.stderr, p.stderr[-2000:]


def test_command_in_a_launched_process_ends_it_itself(monkeypatch, tmp_path):
    """Under torchrun the command leaves through dist.exit_process with its status (skipping the
    interpreter teardown that can abort); called with arguments, as from Python, it returns."""
    from selfsup import cli

    ended = []
    monkeypatch.setattr(dist, "exit_process", lambda code: ended.append(code))
    monkeypatch.setattr(sys, "argv", ["selfsup", "report", str(tmp_path / "none")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main() == 2 and ended == [2]
    assert cli.main(["report", str(tmp_path / "none")]) == 2 and ended == [2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main() == 2 and ended == [2]

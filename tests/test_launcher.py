"""`rlgen train --nproc N`: the command again under torchrun, with rlgen's error contract kept (one error
line, the failing rank's exit status, no launcher traceback), and a 2-process run that trains like one
process on the same global batch."""
from __future__ import annotations

import json
import sys

import pytest

from cli_helpers import rlgen, rlgen_ok
from rlgen.cli import launch

# what torchrun prints on stderr when both ranks exit with status 2 (torch 2.x), after the ranks' own lines
TORCHRUN_FAILURE = """rlgen: error: boom
rlgen: error: boom
E1202 14:19:35.499000 26490 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 26499) of binary: /usr/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
m2.py FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 26500)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 26499)
============================================================
"""


def test_each_rank_runs_the_command_without_nproc():
    args = ["train", "sft", "--nproc", "2", "--steps", "3", "--nproc=4", "--out", "runs/x"]
    assert launch.without_nproc(args) == ["train", "sft", "--steps", "3", "--out", "runs/x"]
    command = launch.torchrun_command(2, args, port=29555)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29555",
                       "-m", "rlgen", "train", "sft", "--steps", "3", "--out", "runs/x"]


@pytest.mark.parametrize("debug", [False, True])
def test_torchrun_report_becomes_one_line_and_the_root_cause_status(debug):
    shown = []
    errors = launch._ErrorFilter(shown.append, debug)
    for line in TORCHRUN_FAILURE.splitlines(keepends=True):
        errors.line(line)
    assert errors.exit_code == 2  # the root cause's, not the other failure's 3
    if debug:
        assert "".join(shown) == TORCHRUN_FAILURE.replace("rlgen: error: boom\n", "", 1)
    else:
        assert shown == ["rlgen: error: boom\n"]


def test_a_failing_rank_exits_with_its_own_status(tmp_path, capfd, monkeypatch):
    script = tmp_path / "fail.py"
    # rank 0 fails; rank 1 would run on, and is stopped by torchrun (its -15 is not the run's status)
    script.write_text("import os, sys, time\nif os.environ['RANK'] != '0':\n    time.sleep(120)\n"
                      "print('rank 0')\nsys.stderr.write('rlgen: error: boom\\n')\nsys.exit(2)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(launch.free_port()), str(script)]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torchrun's banner about setting it is not shown
    code = launch.run_torchrun(command)
    out, err = capfd.readouterr()
    assert code == 2
    assert out == "rank 0\n"
    assert err == "rlgen: error: boom\n"


def test_nproc_for_an_algorithm_without_multi_process_training_is_one_line(tmp_path, monkeypatch):
    # every built-in trainer runs multi-process; a plugin's trainer need not (supports_distributed = False)
    from rlgen.algorithms.diffusion.reward_backprop import RewardBackpropTrainer

    monkeypatch.setattr(RewardBackpropTrainer, "supports_distributed", False)
    code, out, err = rlgen("train", "reward-backprop", "--steps", "2", "--nproc", "2", "--out", tmp_path / "run")
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and "--nproc 2" in err and "reward-backprop" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_nproc_is_one_line(tmp_path, value):
    code, _, err = rlgen("train", "sft", "--nproc", value, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--nproc" in err, err


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train = ["train", "sft", "--model", "tiny-arith", "--task", "arithmetic", "--steps", "2", "--set", "run.threads=1",
             "--set", "algorithm.batch_size=8", "--set", "data.eval_samples=0", "--json"]
    single = json.loads(rlgen_ok(*train, "--out", tmp_path / "one").out)
    result = rlgen_ok(*train, "--nproc", "2", "--out", tmp_path / "two")
    lines = result.out.splitlines()
    assert len(lines) == 1, result.out  # rank 0 alone prints the summary
    multi = json.loads(lines[0])
    assert (tmp_path / "two" / "final").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for key in ("loss", "grad_norm", "tokens"):
        assert multi["last_step"][key] == pytest.approx(single["last_step"][key], rel=1e-4), key

"""Progress for logs: when stderr is not a terminal, whole plain lines (a first one at once, then one per
interval with rate, ETA and the headline metrics, and the last), never folded at 80 columns."""
from __future__ import annotations

import io

from cli_helpers import rlgen_ok

from rlgen.cli.report import Reporter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_at_a_steady_interval(monkeypatch):
    monkeypatch.delenv("RLGEN_PROGRESS_INTERVAL", raising=False)
    stream, clock = io.StringIO(), Clock()
    reporter = Reporter(stream=stream, clock=clock)
    with reporter.progress(total=10, description="training (runs/x)") as advance:
        assert stream.getvalue() == "training (runs/x): 0/10\n"  # at once, before the first step
        for step in range(1, 11):
            clock.now += 4.0  # 4 s per step: a line every 3 steps (10 s interval), and the last
            advance({"reward": 0.123456, "loss": 2.5, "ignored": "text"})
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["training (runs/x): 0/10", "training (runs/x): 3/10",
                                                         "training (runs/x): 6/10", "training (runs/x): 9/10",
                                                         "training (runs/x): 10/10"]
    assert lines[1] == "training (runs/x): 3/10  4 s/it  elapsed 0m12s  ETA 0m28s  reward=0.1235  loss=2.5"
    assert "ETA" not in lines[-1] and "elapsed 0m40s" in lines[-1]


def test_a_resumed_count_and_long_lines_are_kept_whole(monkeypatch):
    monkeypatch.setenv("RLGEN_PROGRESS_INTERVAL", "0")
    stream, clock = io.StringIO(), Clock()
    reporter = Reporter(stream=stream, clock=clock)
    reporter.log("x" * 300)
    with reporter.progress(total=5, description="d" * 120, completed=3) as advance:
        clock.now += 2.0
        advance(None)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "x" * 300 and lines[1] == "d" * 120 + ": 3/5"
    assert lines[2].startswith("d" * 120 + ": 4/5  2 s/it")  # the rate counts this run's steps only


def test_a_training_run_into_a_log_file_prints_plain_progress(tmp_path):
    err = rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", 2, "--set", "algorithm.batch_size=4",
                   "--set", "data.eval_samples=0", "--out", tmp_path / "run").err
    progress = [line for line in err.splitlines() if line.startswith(f"training ({tmp_path / 'run'}): ")]
    assert progress[0].endswith(": 0/2") and progress[-1].split("  ")[0].endswith(": 2/2"), err
    assert "\u2501" not in err  # no bar drawing in a log


def test_a_slow_set_up_says_what_is_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("RLGEN_LOADING_NOTICE_S", "0")  # every set-up counts as slow
    err = rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", 1, "--set", "algorithm.batch_size=4",
                   "--set", "data.eval_samples=0", "--out", tmp_path / "run").err
    assert err.splitlines()[0] == "loading tiny-arith and the data (set-up still running) ..."
    monkeypatch.setenv("RLGEN_LOADING_NOTICE_S", "60")  # a fast one does not
    err = rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", 1, "--set", "algorithm.batch_size=4",
                   "--set", "data.eval_samples=0", "--out", tmp_path / "fast").err
    assert "loading" not in err

"""Run directories keep runs safe: the OUT/.lock lock, refusing directories that are not rlgen runs,
starting over a run that failed before its first checkpoint, skipping damaged checkpoints on resume, and
stopping (or skipping) a step whose loss or gradient norm is not finite before it reaches the weights.

Trainings run in this process through `rlgen.cli.app.main` on a random tiny Llama (conftest) and the
built-in tiny-digits pipelines, a few steps each.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen
from rlgen.errors import RlgenError
from rlgen.training.run_dir import RunDir, checkpoint_problem
from rlgen.training.trainer import Trainer

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
         for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]]


# In-process training runs: one intra-op thread avoids oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ok(*args) -> str:
    code, _, err = rlgen(*args)
    assert code == 0, f"rlgen {' '.join(map(str, args))} -> {code}\n{err}"
    return err


def one_line_error(*args) -> str:
    code, _, err = rlgen(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"rlgen {' '.join(map(str, args))} -> {code}\n{err}"
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), err
    return lines[0]


def sft(model: Path, out: Path, *extra) -> list:
    """A few SFT steps on the arithmetic task: no sampling, so a step takes milliseconds."""
    return ["train", "sft", "--model", model, "--task", "arithmetic", "--out", out, "--steps", 3, "--seed", 1,
            "--set", "algorithm.batch_size=4", "--set", "run.eval_every=0", "--set", "run.threads=1",
            "--set", "optim.lr=1e-2", *extra, "--quiet"]


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path, file: str = "model.safetensors") -> dict:
    return load_file(str(directory / file))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 8. the lock ---

HOLD_LOCK = """
import sys, time
from rlgen.training.run_dir import RunDir
RunDir(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_locked_run_directory_is_refused_and_a_stale_lock_taken_over(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (run / ".lock").read_text().strip() == str(holder.pid)
        line = one_line_error(*sft(tiny_model_dir, run))
        assert f"run directory {run} is in use by PID {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock; its file (and PID) stayed behind: a stale lock.
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    ok(*sft(tiny_model_dir, run))
    assert steps_of(run) == [1, 2, 3] and (run / "final" / "model.safetensors").is_file()
    assert not (run / ".lock").exists()  # released (and removed) when the run ends


@pytest.mark.slow
def test_resume_takes_the_lock_too(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    ok(*sft(tiny_model_dir, run, "--save-every", 1))
    before = (run / "metrics.jsonl").read_text()
    lock = RunDir(run)
    lock.lock()  # held through another open file: flock conflicts even within one process
    try:
        line = one_line_error("train", "sft", "--resume", run, "--quiet")
    finally:
        lock.unlock()
    assert f"run directory {run} is in use by PID {os.getpid()}" in line
    assert (run / "metrics.jsonl").read_text() == before


def test_two_runs_racing_for_one_directory(tiny_model_dir, tmp_path):
    """Both pass the early check; the second to create the directory fails under the lock."""
    run = tmp_path / "run"
    first = RunDir(run)
    run.mkdir()
    first.lock()
    try:
        with pytest.raises(RlgenError, match="in use by PID"):
            RunDir(run).create({}, fresh=True)
    finally:
        first.unlock()
    assert not (run / "config.toml").exists()


# --- 9. directories that are not rlgen runs ---

def test_a_directory_with_final_that_is_not_a_run_is_never_touched(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"precious")
    line = one_line_error(*sft(tiny_model_dir, out))
    assert f"--out {out} exists and is not an rlgen run directory" in line
    assert (out / "final" / "model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["final"]


@pytest.mark.slow
def test_a_directory_of_other_files_is_refused_and_an_empty_one_used(tiny_model_dir, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "is not an rlgen run directory" in one_line_error(*sft(tiny_model_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(*sft(tiny_model_dir, empty))
    assert steps_of(empty) == [1, 2, 3]


def test_a_finished_run_is_not_overwritten(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    ok(*sft(tiny_model_dir, run))
    final = weights(run / "final")
    assert "already holds a run" in one_line_error(*sft(tiny_model_dir, run, "--seed", 2))
    assert same_weights(final, weights(run / "final"))


# --- 10. runs that failed before their first checkpoint ---

@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-step SFT run with checkpoints step-1 and step-2."""
    run = tmp_path_factory.mktemp("checkpointed") / "run"
    ok(*sft(tiny_model_dir, run, "--save-every", 1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    return run


def test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again(tiny_model_dir, checkpointed, tmp_path):
    reference, run = checkpointed, tmp_path / "run"
    # What a run killed in step 3 before any checkpoint leaves (save_every = 0), with a cut last line.
    (run / "checkpoints" / ".step-2.tmp").mkdir(parents=True)
    shutil.copy(reference / "config.toml", run / "config.toml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    ok(*sft(tiny_model_dir, run))
    assert steps_of(run) == [1, 2, 3]
    assert same_weights(weights(reference / "final"), weights(run / "final"))
    assert not (run / "checkpoints" / ".step-2.tmp").exists()


def test_a_failed_run_with_foreign_files_is_not_started_over(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("[run]\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "data.jsonl").write_text("{}\n")
    assert "data.jsonl" in one_line_error(*sft(tiny_model_dir, run))
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_over_without_duplicate_steps(checkpointed, tmp_path):
    reference, run = checkpointed, tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "config.toml", run / "config.toml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')  # killed in step 3
    err = ok("train", "sft", "--resume", run)
    assert f"no checkpoint in {run}: starting from step 0" in " ".join(err.split())  # rich wraps lines
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(rows) == without_timing(expected)
    assert same_weights(weights(reference / "final"), weights(run / "final"))


# --- 11. damaged checkpoints ---

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated-weights": (lambda c: truncate(c / "model" / "model.safetensors"), "model.safetensors"),
    "garbage-weights-header": (lambda c: (c / "model" / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "no-weights": (lambda c: (c / "model" / "model.safetensors").unlink(), "no .safetensors weights"),
    "no-model-config": (lambda c: (c / "model" / "config.json").unlink(), "model/ holds no config.json"),
    "bad-trainer-state": (lambda c: (c / "trainer_state.json").write_text('{"step": 2, '), "trainer_state.json"),
    "no-trainer-state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "wrong-step": (lambda c: (c / "trainer_state.json").write_text('{"step": 7}'), "does not record step 2"),
    "no-optimizer-tensors": (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "truncated-optimizer": (lambda c: truncate(c / "optimizer.safetensors"), "optimizer.safetensors"),
    "no-rng": (lambda c: (c / "rng.json").unlink(), "rng.json is missing"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoints_are_recognised(checkpointed, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    damage, reason = DAMAGE[kind]
    newest = run / "checkpoints" / "step-2"
    assert checkpoint_problem(newest, 2) is None
    damage(newest)
    assert reason in checkpoint_problem(newest, 2)
    warnings = []
    assert RunDir(run).latest_checkpoint(warn=warnings.append) == run / "checkpoints" / "step-1"
    assert len(warnings) == 1 and str(newest) in warnings[0] and reason in warnings[0]


def test_resume_skips_a_damaged_newest_checkpoint(checkpointed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    shutil.rmtree(run / "final")
    truncate(run / "checkpoints" / "step-2" / "model" / "model.safetensors")
    err = ok("train", "sft", "--resume", run, "--quiet")
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("rlgen: warning: skipping damaged checkpoint "), err
    assert str(run / "checkpoints" / "step-2") in warnings[0]
    assert steps_of(run) == [1, 2, 3]  # truncated to step 1, then steps 2 and 3 once more
    assert same_weights(weights(checkpointed / "final"), weights(run / "final"))  # as if never interrupted


@pytest.mark.parametrize("damaged_file, content, problem", [
    ("trainer_state.json", "nonsense", ""),             # caught by the soundness check before any set-up
    pytest.param("optimizer.json", '{"x": 1}', "does not restore",  # parses, but the state does not restore
                 marks=pytest.mark.slow),  # sets up the whole trainer first (~4 s)
])
def test_resume_with_every_checkpoint_damaged_is_one_line(checkpointed, tmp_path, damaged_file, content, problem):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    for step in (1, 2):
        (run / "checkpoints" / f"step-{step}" / damaged_file).write_text(content)
    code, _, err = rlgen("train", "sft", "--resume", run, "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("rlgen: error: no usable checkpoint in "), err
    assert problem in lines[-1] and len(lines) == 3, err  # two warnings, one error
    assert (run / "checkpoints" / "step-1" / damaged_file).read_text() == content  # nothing deleted


# --- 12. non-finite steps ---

def poison_step(patch: pytest.MonkeyPatch, step: int) -> None:
    """Make every training forward pass of `step` produce NaN (through the input embeddings of an LM, the
    input of a diffusion denoiser), whatever the trainer's loss: it must stop before the update."""
    original = Trainer.setup

    def setup(self):
        original(self)
        denoiser = getattr(self.model, "denoiser", None)
        if denoiser is not None:
            def poison_inputs(module, args, kwargs):
                if torch.is_grad_enabled() and self.step == step:
                    args = tuple(a * math.nan if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
                    kwargs = {k: v * math.nan if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
                    return args, kwargs
                return None

            denoiser.register_forward_pre_hook(poison_inputs, with_kwargs=True)
        else:
            def poison_embeddings(module, args, output):
                return output * math.nan if torch.is_grad_enabled() and self.step == step else None

            self.model.get_input_embeddings().register_forward_hook(poison_embeddings)

    patch.setattr(Trainer, "setup", setup)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


TRAINERS = {  # (args after `train`, the trained model's weights file under final/ or a checkpoint's model/)
    "sft": (lambda m, d: ["sft", "--model", m, "--task", "arithmetic", "--set", "algorithm.batch_size=4"], "model.safetensors"),
    "grpo": (lambda m, d: ["grpo", "--model", m, "--task", "arithmetic", "--reward", "length",
                           "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                           "--set", "rollout.max_new_tokens=4"], "model.safetensors"),
    "dpo": (lambda m, d: ["dpo", "--model", m, "--data", d, "--set", "algorithm.batch_size=4"], "model.safetensors"),
    "kto": (lambda m, d: ["kto", "--model", m, "--data", d, "--set", "algorithm.batch_size=4"], "model.safetensors"),
    "rm": (lambda m, d: ["rm", "--model", m, "--data", d, "--set", "algorithm.batch_size=4"], "model.safetensors"),
    "online-dpo": (lambda m, d: ["online-dpo", "--model", m, "--task", "arithmetic", "--reward", "length",
                                 "--set", "rollout.prompts_per_step=2", "--set", "rollout.max_new_tokens=4"],
                   "model.safetensors"),
    "diffusion-sft": (lambda m, d: ["diffusion-sft", "--model", "tiny-digits", "--set", "algorithm.batch_size=4",
                                    "--set", "data.eval_samples=0"], "unet/diffusion_pytorch_model.safetensors"),
    "flow-grpo": (lambda m, d: ["flow-grpo", "--model", "tiny-digits-flow", "--reward", "brightness",
                                "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                                "--set", "sampling.num_steps=2", "--set", "data.eval_samples=0"],
                  "unet/diffusion_pytorch_model.safetensors"),
}


def trainer_args(name: str, model: Path, data: Path, out: Path, steps: int, *extra) -> list:
    make, _ = TRAINERS[name]
    return ["train", *make(model, data), "--out", out, "--steps", steps, "--save-every", 1, "--seed", 1,
            "--set", "run.eval_every=0", "--set", "run.threads=1", *extra, "--quiet"]


# one short training run per trainer (~2 s each): the fast tier keeps SFT and GRPO
@pytest.mark.parametrize("name", [name if name in ("sft", "grpo") else pytest.param(name, marks=pytest.mark.slow)
                                  for name in sorted(TRAINERS)])
def test_a_nan_step_stops_the_run_before_the_update(name, tiny_model_dir, pairs_file, tmp_path):
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        poison_step(patch, 2)
        line = one_line_error(*trainer_args(name, tiny_model_dir, pairs_file, run, 3))
    assert "step 2: " in line and "nan" in line, line
    assert "step-1 is intact" in line
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    checkpoint = run / "checkpoints" / "step-1"
    assert checkpoint_problem(checkpoint, 1) is None
    saved = weights(checkpoint / "model", TRAINERS[name][1])
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert steps_of(run) == [1]


@pytest.mark.slow
def test_skip_nonfinite_steps_skips_the_update_and_counts_it(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        poison_step(patch, 2)
        ok(*sft(tiny_model_dir, run, "--steps", 2, "--save-every", 1, "--set", "optim.skip_nonfinite_steps=true"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_skipped"], r["grad_norm"]) for r in rows][1] == (2, 1, None)
    assert rows[0]["nonfinite_skipped"] == 0 and rows[0]["grad_norm"] > 0
    # Step 2 changed nothing: the final weights are step 1's.
    assert same_weights(weights(run / "checkpoints" / "step-1" / "model"), weights(run / "final"))


@pytest.mark.slow
def test_an_update_that_makes_weights_non_finite_stops_the_run(tiny_model_dir, tmp_path):
    """adam_eps = 0 with an all-zero gradient divides 0 by 0 in AdamW: finite gradients, NaN weights."""
    run = tmp_path / "run"
    original = Trainer.optimizer_step

    def zero_gradients(self):
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "optimizer_step", zero_gradients)
        line = one_line_error(*sft(tiny_model_dir, run, "--set", "optim.adam_eps=0"))
    assert "step 1: the optimizer update made weights non-finite" in line
    assert not (run / "final").exists()


# --- 11b. checkpoints whose files parse but whose state does not restore ---

def _drop_one_optimizer_tensor(c: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(c / "optimizer.safetensors"))
    tensors.pop(sorted(k for k in tensors if k.endswith("exp_avg"))[0])
    save_file(tensors, str(c / "optimizer.safetensors"))


def _edit_json(c: Path, name: str, edit) -> None:
    state = json.loads((c / name).read_text())
    edit(state)
    (c / name).write_text(json.dumps(state))


def _shrink_one_optimizer_tensor(c: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(c / "optimizer.safetensors"))
    key = sorted(k for k in tensors if k.endswith("exp_avg"))[0]
    tensors[key] = tensors[key].flatten()[:1].clone()
    save_file(tensors, str(c / "optimizer.safetensors"))


UNRESTORABLE = {
    "scheduler-not-a-dict": lambda c: _edit_json(c, "trainer_state.json", lambda s: s.update(scheduler="x")),
    "sampler-missing": lambda c: _edit_json(c, "trainer_state.json", lambda s: s.pop("sampler")),
    "optimizer-skeleton": lambda c: (c / "optimizer.json").write_text('{"x": 1}'),
    "optimizer-tensor-dropped": _drop_one_optimizer_tensor,
    "optimizer-tensor-shape": _shrink_one_optimizer_tensor,
    "rng-not-a-tensor": lambda c: (c / "rng.json").write_text('{"__dict__": [["torch", 1], ["generator", 2], ["python", 3]]}'),
}


@pytest.mark.slow  # each kind trains and resumes (~4 s); the fast tier resumes past a damaged checkpoint above
@pytest.mark.parametrize("kind", sorted(UNRESTORABLE))
def test_resume_skips_a_newest_checkpoint_whose_state_does_not_restore(checkpointed, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    shutil.rmtree(run / "final")
    UNRESTORABLE[kind](run / "checkpoints" / "step-2")
    err = ok("train", "sft", "--resume", run, "--quiet")
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("rlgen: warning: skipping damaged checkpoint "), err
    assert str(run / "checkpoints" / "step-2") in warnings[0] and "does not restore" in warnings[0]
    assert steps_of(run) == [1, 2, 3]
    # nothing of the damaged checkpoint was kept: the run goes on exactly as if never interrupted
    assert same_weights(weights(checkpointed / "final"), weights(run / "final"))

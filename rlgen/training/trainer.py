"""What every trainer shares: model and optimiser setup, the step loop, metrics, checkpoints, resume."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from rlgen import kernels
from rlgen.data.records import read_records
from rlgen.errors import RlgenError
from rlgen.evaluation.metrics import correctness_rewards, evaluate_model
from rlgen.models.backbone import LoadedModel, ReferencePolicy, backbone_named
from rlgen.models.causal_lm import load_model, load_policy, load_tokenizer, resolve_model_path, save_hf
from rlgen.models.safe_load import load_peft_adapter
from rlgen.plugins import registry
from rlgen.training.config import DataConfig, OptimConfig, RunConfig  # noqa: F401 - re-exported (their home before)
from rlgen.training.run_dir import RunDir
from rlgen.training.state import load_state, restore_rng, rng_state, save_state


def load_records(data: DataConfig, split: str, required=("prompt",)) -> list[dict]:
    if data.path:
        return read_records(data.path, required=required)
    if not data.task:
        raise RlgenError("no data: give --task NAME or --data FILE")
    records = registry("task").get(data.task).split(split)
    if not records:
        raise RlgenError(f"task '{data.task}' has an empty '{split}' split")
    return records


def make_adamw(params: list, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA floats: one kernel
    per step instead of a dozen multi-tensor passes), else the multi-tensor (foreach) implementation."""
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Trainer:
    """Subclasses implement `train_step(step) -> metrics`; this class does the rest."""

    def __init__(self, config, run_dir: RunDir, reporter, resume: bool = False):
        self.config = config
        self.run = run_dir
        self.reporter = reporter
        self.resume = resume
        self.step = 0
        self.nonfinite_skipped = 0  # updates skipped in the current step (optim.skip_nonfinite_steps)

    # --- setup ---
    def setup(self) -> None:
        """Set up, and on resume restore the newest sound checkpoint. A checkpoint whose files parse but whose
        state does not restore (hand-edited, wrong content) is skipped with a warning, and the whole set-up
        runs again for the one before it, so that nothing half-restored is kept."""
        damaged: dict[Path, str] = {}
        while True:
            checkpoint = self._setup(damaged)
            if checkpoint is None:
                return
            try:
                self._restore(checkpoint)
                return
            except RESTORE_ERRORS as exc:
                problem = f"its state does not restore: {_describe(exc)}"
            _warn(f"skipping damaged checkpoint {checkpoint} ({problem})")
            damaged[checkpoint] = problem
            self.step = 0

    def _setup(self, damaged: dict[Path, str]) -> Path | None:
        cfg = self.config
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        try:
            kernels.use(cfg.run.kernels)
        except RuntimeError as exc:
            raise RlgenError(f"run.kernels = '{cfg.run.kernels}': {exc}") from None
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.prepare_data()  # bad data or rewards fail here, before the (slow) model load
        checkpoint = self.run.latest_checkpoint(warn=_warn, skip=damaged) if self.resume else None
        if self.resume and checkpoint is None:
            self.reporter.log(f"no checkpoint in {self.run.root}: starting from step 0")
        self.model, self.tokenizer, self.base_path = self._load_model(checkpoint)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = make_adamw(params, o)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o.lr_scheduler, o.warmup_steps, cfg.run.steps))
        self.prepare()
        return checkpoint

    def _load_model(self, checkpoint: Path | None):
        cfg = self.config.model
        if checkpoint is None:
            return load_policy(cfg)
        base_path = resolve_model_path(cfg.path)
        tokenizer = load_tokenizer(base_path)
        if cfg.lora_r > 0:
            model = load_peft_adapter(load_model(base_path, cfg.dtype), checkpoint / "model", is_trainable=True)
        else:
            model = load_model(checkpoint / "model", cfg.dtype)
        return model, tokenizer, base_path

    def prepare_data(self) -> None:
        """Algorithm-specific setup that needs no model: data, rewards, registry look-ups."""

    def prepare(self) -> None:
        """Algorithm-specific setup that needs the model: rollout engine, reference model."""

    backbone_name = "causal-lm"  # the backbone (rlgen.models.backbone) whose models this trainer trains

    def reference_policy(self) -> ReferencePolicy:
        """The frozen reference for KL penalties and DPO-family losses, built by the model's backbone (the
        LoRA base with the adapter off, or a frozen copy of the base), the same way for every trainer."""
        handle = LoadedModel(self.model, self.tokenizer, Path(self.base_path))
        return backbone_named(self.backbone_name).reference_policy(handle, self.config.model)

    # --- checkpoints ---
    def extra_state(self) -> dict:
        return {}

    def restore_extra_state(self, state: dict) -> None:
        pass

    def extra_tensors(self) -> dict:
        """Tensors to keep in checkpoints (e.g. cached reference log-probs), saved as safetensors."""
        return {}

    def restore_extra_tensors(self, tensors: dict) -> None:
        pass

    def save_model(self, out_dir: Path, final: bool) -> None:
        """The model in its upstream format: final/ merges LoRA when configured; checkpoints keep the adapter."""
        save_hf(self.model, self.tokenizer, out_dir, merge_lora=final and self.config.model.lora_merge_on_save)

    def save_checkpoint(self) -> Path:
        tmp = self.run.begin_checkpoint(self.step)
        self.save_model(tmp / "model", final=False)
        save_state(self.optimizer.state_dict(), tmp, "optimizer")
        save_state(rng_state(self.generator), tmp, "rng")
        tensors = self.extra_tensors()
        if tensors:
            save_state(tensors, tmp, "extra")
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), **self.extra_state()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        return self.run.commit_checkpoint(tmp, self.step, self.config.run.keep_checkpoints)

    def _restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.step = state["step"]
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        _check_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(load_state(checkpoint, "rng"), self.generator)
        self.restore_extra_state(state)
        if (checkpoint / "extra.json").is_file():
            self.restore_extra_tensors(load_state(checkpoint, "extra"))
        self.reporter.log(f"resumed from {checkpoint} (step {self.step})")

    # --- the loop ---
    def train_step(self) -> dict:
        raise NotImplementedError

    def optimizer_step(self) -> float:
        """Clip and apply the update; every trainer goes through here. An update whose gradient norm is NaN/inf
        is never applied: the run stops, or with optim.skip_nonfinite_steps the update is skipped."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.optim.max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if not self.config.optim.skip_nonfinite_steps:
                raise RlgenError(f"step {self.step}: the gradient norm is {norm} (a non-finite loss or gradient); the update "
                                 f"was not applied and training stopped{self._resume_hint()} (optim.skip_nonfinite_steps "
                                 "= true skips such updates instead)")
            self.nonfinite_skipped += 1
            self.scheduler.step()  # the schedule follows step numbers, skipped or not
            return norm
        self.optimizer.step()
        # Finite gradients can still make weights non-finite (an overflowing lr, adam_eps = 0 on a zero
        # gradient); the inf-norm (max |w|) cannot overflow, so it is finite exactly when every weight is.
        if params and not math.isfinite(float(torch.nn.utils.get_total_norm(params, norm_type=float("inf")))):
            raise RlgenError(f"step {self.step}: the optimizer update made weights non-finite (check optim.lr and "
                             f"optim.adam_eps); training stopped{self._resume_hint()}")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _resume_hint(self) -> str:
        """Where the run can go on from: its last checkpoint, which a failed step never touches."""
        try:
            done = self.run.latest_checkpoint()
        except RlgenError:  # every checkpoint damaged: nothing to point at
            done = None
        return f" ({done.name} is intact: rlgen train --resume {self.run.root})" if done is not None else ""

    def _check_loss(self, metrics: dict) -> None:
        loss = metrics.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.item()
        if isinstance(loss, float) and not math.isfinite(loss) and not self.config.optim.skip_nonfinite_steps:
            raise RlgenError(f"step {self.step}: the loss is {loss}; training stopped{self._resume_hint()}")

    def fit(self) -> dict:
        """Train, holding the run directory's lock throughout: a resumed run from the start, a new one from
        its creation (after the set-up, so that bad input leaves no directory behind)."""
        try:
            return self._fit()
        finally:
            self.run.unlock()

    def _fit(self) -> dict:
        if self.resume:
            self.run.lock()
        else:
            self.run.check_fresh()  # early, before the model loads; create() checks again under the lock
        self.setup()
        self.run.create(self.config, fresh=not self.resume)
        if self.resume:  # the metric lines after the checkpoint (all of them without one) are written again
            self.run.truncate_metrics(self.step)
        cfg = self.config.run
        last: dict = {}
        if cfg.eval_every and self.step == 0:  # the starting point of the held-out curve
            self._log_metrics({"step": 0, **{k: _plain(v) for k, v in self.evaluate().items()}})
        with self.reporter.progress(total=cfg.steps, completed=self.step, description=f"training ({self.run.root})") as advance:
            while self.step < cfg.steps:
                self.step += 1
                self.nonfinite_skipped = 0
                started = time.perf_counter()
                metrics = self.train_step()
                self._check_loss(metrics)
                if self.config.optim.skip_nonfinite_steps:
                    metrics["nonfinite_skipped"] = self.nonfinite_skipped
                metrics["step_time"] = time.perf_counter() - started
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    metrics.update(self.evaluate())
                last = {"step": self.step, **{k: _plain(v) for k, v in metrics.items()}}
                self._log_metrics(last)
                advance(last)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        self.save_model(self.run.final, final=True)
        return last

    def _log_metrics(self, row: dict) -> None:
        """Write a metrics row and hand it to the callbacks (rlgen.events.Events.metrics); a reporter without
        a metrics event (an older or hand-made one) only logs and shows progress."""
        self.run.log_metrics(row)
        emit = getattr(self.reporter, "metrics", None)
        if emit is not None:
            emit(row["step"], row)

    eval_records: list[dict] | None = None
    eval_max_new_tokens: int = 16

    def eval_task_rewards(self) -> tuple[str, ...]:
        """The correctness rewards of the held-out evaluation: the task's own, or exact-match for a file."""
        data = self.config.data
        return registry("task").get(data.task).default_rewards if data.task and not data.path else ("exact-match",)

    def evaluate(self) -> dict:
        """Greedy accuracy on the held-out records, judged by the task's correctness reward."""
        if not self.eval_records:
            return {}
        result = evaluate_model(self.engine, self.eval_records, correctness_rewards(self.eval_task_rewards()), self.eval_max_new_tokens)
        self.model.train()
        return {"eval/accuracy": result["metrics"]["accuracy"]}


# What restoring a checkpoint whose files parse but hold the wrong content raises (a missing key, a value of
# the wrong type or shape); SafetensorError too, for a tensor file whose data does not load.
RESTORE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SafetensorError)


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:160] + "..."


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's moments must match their parameters: a wrong shape would only fail at the first step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != param.shape):
                    raise ValueError(f"optimizer state '{name}' does not match its parameter's shape")


def _warn(message: str) -> None:
    """A warning: one stderr line, shown even with --quiet."""
    sys.stderr.write(f"rlgen: warning: {message}\n")
    sys.stderr.flush()


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value

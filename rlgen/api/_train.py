"""`rlgen.train`: resolve the config, build the algorithm's trainer, run it, and return what it made."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlgen.api._config import algorithm_entry, load_config
from rlgen.events import as_events


@dataclass
class Run:
    """A finished training run: its directory, final model, last step and metrics rows (metrics.jsonl)."""

    algorithm: str
    out: Path
    final_model: Path
    last_step: int
    last_metrics: dict = field(default_factory=dict)  # the last step's row ({} when nothing was left to train)
    metrics: list[dict] = field(default_factory=list)
    config: object = None
    rank: int = 0  # this process's rank under torchrun: rank 0 alone reports the run

    def summary(self) -> dict:
        """What `rlgen train --json` prints (its `last_step` is the last metrics row, as it always was)."""
        return {"algorithm": self.algorithm, "out": str(self.out), "final_model": str(self.final_model),
                "last_step": self.last_metrics}


def build_trainer(algo: str, config=None, *, sets: list[str] | None = None, resume: str | Path | None = None,
                  callbacks=None, model_defaults: bool = True, **overrides):
    """The algorithm's trainer on the resolved config, not yet set up or run: for scripts that step it
    themselves (`trainer.setup()`, then `trainer.step += 1; trainer.train_step()`), as the benchmarks do."""
    from rlgen.training.run_dir import RunDir  # imports torch: `rlgen.train` must not load it before it is called

    algorithm = algorithm_entry(algo)
    typed = load_config(algorithm, config, sets=sets, resume=resume, model_defaults=model_defaults, **overrides)
    return algorithm.trainer_cls(typed, RunDir(typed.run.out), as_events(callbacks), resume=bool(resume))


def train(algo: str, config=None, *, sets: list[str] | None = None, resume: str | Path | None = None,
          callbacks=None, model_defaults: bool = True, **overrides) -> Run:
    """Train with `algo` (sft, grpo, dpo, ... see `rlgen plugins`); config precedence as in `load_config`.
    Callbacks (rlgen.events) see the log lines, the progress and every step's metrics row."""
    events = as_events(callbacks)
    trainer = build_trainer(algo, config, sets=sets, resume=resume, callbacks=events, model_defaults=model_defaults,
                            **overrides)
    last = trainer.fit()
    run_dir = trainer.run
    rows = []
    if run_dir.metrics_path.is_file():
        rows = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines() if line.strip()]
    run = Run(algorithm=algo, out=run_dir.root, final_model=run_dir.final, last_step=trainer.step, last_metrics=last,
              metrics=rows, config=trainer.config, rank=trainer.dist.rank)
    if trainer.dist.is_main:  # under torchrun, rank 0 alone reports the run (`--json`: one summary)
        events.result(run.summary())
    return run

"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, final model, resume."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from rlgen.config import dumps_toml, to_dict
from rlgen.errors import RlgenError

CHECKPOINT = re.compile(r"^step-(\d+)$")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.final = self.root / "final"

    def check_fresh(self) -> None:
        if (self.root / "config.toml").exists() or self.checkpoints.exists() or self.metrics_path.exists():
            raise RlgenError(f"run directory {self.root} already holds a run (use --resume {self.root}, or another --out)")

    def create(self, config) -> None:
        """Called once the run has been set up without errors, so bad input leaves no directory behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.root / ".config.toml.tmp"
        tmp.write_text(dumps_toml(to_dict(config)))
        os.replace(tmp, self.root / "config.toml")

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        steps = []
        for child in self.checkpoints.iterdir():
            match = CHECKPOINT.match(child.name)
            if match and (child / "trainer_state.json").is_file():
                steps.append((int(match.group(1)), child))
        return max(steps)[1] if steps else None

    def begin_checkpoint(self, step: int) -> Path:
        tmp = self.checkpoints / f".step-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int, keep: int = 0) -> Path:
        target = self.checkpoints / f"step-{step}"
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)  # atomic: a checkpoint directory is complete or absent
        if keep > 0:
            done = sorted(
                (int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := CHECKPOINT.match(p.name))
            )
            for _, old in done[:-keep]:
                shutil.rmtree(old)
        return target

    def truncate_metrics(self, step: int) -> None:
        """After a resume from step N, drop metric lines of steps > N written before the kill."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log_metrics(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()

"""Experiment trackers (`run.report_to`): TensorBoard, Weights & Biases (offline), MLflow (a local file
store), Trackio (local), and plugins' through the `register_trackers` hook (the "tracker" registry).

A tracker is a small class: constructed with its own directory inside the run directory
(`OUT/tracking/NAME/`) and, when its constructor takes them, `config=` (the resolved config as a dict),
`run_name=` and `start_step=` (the step a resumed run continues after); then `log(step, metrics)` (numeric
values), `log_table(step, name, rows)` (a list of flat dicts of text and numbers) and `close()`.
`packages` names what it imports (checked by `require` before the model loads, one line naming the pip
extra when missing); nothing is imported until the tracker is asked for. Rank 0 alone opens trackers.
Every built-in tracker writes only under its directory and never reaches the network.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl

TRACKING_DIR = "tracking"  # OUT/tracking/NAME/: every tracker's files


class Tracker:
    """The base of a tracker (a plugin's may subclass it). `packages`: the modules it imports;
    `extra`: the pip extra of rlgen that installs them ("" = a package of its own: `pip install NAME`)."""

    packages: tuple[str, ...] = ()
    extra: str = ""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """A table (e.g. sample completions); trackers without tables may ignore it."""

    def close(self, failed: bool = False) -> None:
        pass


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Environment variables set for the duration, then restored exactly."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


class TensorBoardTracker(Tracker):
    """TensorBoard event files in OUT/tracking/tensorboard (scalars; tables and the config as text)."""

    packages = ("tensorboard",)
    extra = "tensorboard"

    def __init__(self, directory: Path, config: dict | None = None, start_step: int = 0):
        super().__init__(directory)
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events after its checkpoint (as metrics.jsonl's lines)
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=start_step + 1 if start_step else None)
        if config is not None and not start_step:
            from rlgen.data.records import json_text

            self.writer.add_text("config", "```\n" + json_text(config, indent=1) + "\n```", 0)

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, step, name, rows):
        columns = _columns(rows)

        def cell(value):
            return str(value).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self, failed=False):
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases offline run in OUT/tracking/wandb (no network; `wandb sync` uploads it later).

    wandb's cache, config and data directories point inside it while the run is open."""

    packages = ("wandb",)
    extra = "wandb"

    def __init__(self, directory: Path, config: dict | None = None, run_name: str = "", start_step: int = 0):
        super().__init__(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        where = str(self.directory.resolve())
        self._env = environ(WANDB_MODE="offline", WANDB_DIR=where, WANDB_CACHE_DIR=f"{where}/cache",
                            WANDB_CONFIG_DIR=f"{where}/config", WANDB_DATA_DIR=f"{where}/data",
                            WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true")
        saved = dict(os.environ)
        self._env.__enter__()
        self._saved = saved  # wandb adds variables of its own (its service): all removed again at close
        try:
            import wandb

            with contextlib.redirect_stdout(sys.stderr):
                self.run = wandb.init(mode="offline", dir=where, project="rlgen", name=run_name or None, config=config,
                                      settings=wandb.Settings(silent=True, console="off", disable_git=True,
                                                              x_disable_stats=True))
        except BaseException:
            self._restore()
            raise
        self.wandb = wandb

    def _restore(self) -> None:
        self._env.__exit__(None, None, None)
        for key in [k for k in os.environ if k.startswith("WANDB_") and k not in self._saved]:
            del os.environ[key]

    def log(self, step, metrics):
        self.run.log(dict(metrics), step=step)

    def log_table(self, step, name, rows):
        columns = _columns(rows)
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def close(self, failed=False):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                self.run.finish(exit_code=1 if failed else 0)
        finally:
            self._restore()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's limit on a parameter value
    return out


class MlflowTracker(Tracker):
    """An MLflow run in a local file store, OUT/tracking/mlflow (metrics, config as parameters, tables).

    `mlflow ui --backend-store-uri OUT/tracking/mlflow` shows it; tables are JSON-lines artifacts. Telemetry off."""

    packages = ("mlflow",)
    extra = "mlflow"
    _ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}

    def __init__(self, directory: Path, config: dict | None = None, run_name: str = ""):
        super().__init__(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        with environ(**self._ENV):
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient

            self.Metric = Metric
            self.client = MlflowClient(tracking_uri=self.directory.resolve().as_uri())
            experiment = self.client.get_experiment_by_name("rlgen")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("rlgen")
            self.run_id = self.client.create_run(experiment_id, run_name=run_name or None).info.run_id
            if config:
                params = [Param(k, v) for k, v in _flat(config).items()]
                for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                    self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step, metrics):
        import time

        now = int(time.time() * 1000)
        values = [self.Metric(key, float(v), now, step) for key, v in metrics.items()]
        with environ(**self._ENV):
            for start in range(0, len(values), 1000):
                self.client.log_batch(self.run_id, metrics=values[start:start + 1000])

    def log_table(self, step, name, rows):
        from rlgen.data.records import json_text

        with environ(**self._ENV):
            self.client.log_text(self.run_id, "".join(json_text(row, ensure_ascii=False) + "\n" for row in rows),
                                 f"{name}/step-{step:07d}.jsonl")

    def close(self, failed=False):
        with environ(**self._ENV):
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class TrackioTracker(Tracker):
    """A local Trackio project in OUT/tracking/trackio (no Space, no server).

    `TRACKIO_DIR=OUT/tracking/trackio trackio show` shows it; Trackio's storage paths point there while the run is open."""

    packages = ("trackio",)
    extra = "trackio"
    _PATHS = ("TRACKIO_DIR", "MEDIA_DIR", "ARTIFACTS_DIR")

    def __init__(self, directory: Path, config: dict | None = None, run_name: str = ""):
        super().__init__(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        where = self.directory.resolve()
        self._env = environ(TRACKIO_DIR=str(where))
        self._env.__enter__()
        try:
            import trackio
            import trackio.utils

            # trackio reads its directory once, at import, into module constants: point them here
            moved = {"TRACKIO_DIR": where, "MEDIA_DIR": where / "media", "ARTIFACTS_DIR": where / "artifacts"}
            self._patched: list[tuple[Any, str, Any]] = []
            for module in [m for name, m in list(sys.modules.items()) if name == "trackio" or name.startswith("trackio.")]:
                for attr, value in moved.items():
                    if isinstance(getattr(module, attr, None), Path):
                        self._patched.append((module, attr, getattr(module, attr)))
                        setattr(module, attr, value)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its dashboard hints
                self.run = trackio.init(project="rlgen", name=run_name or None, config=config, embed=False,
                                        auto_log_gpu=False, auto_log_cpu=False)
        except BaseException:
            self._restore()
            raise
        self.trackio = trackio

    def _restore(self) -> None:
        for module, attr, value in reversed(getattr(self, "_patched", [])):
            setattr(module, attr, value)
        self._env.__exit__(None, None, None)

    def log(self, step, metrics):
        self.run.log(dict(metrics), step=step)

    def log_table(self, step, name, rows):
        columns = _columns(rows)
        self.run.log({name: self.trackio.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                     step=step)

    def close(self, failed=False):
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                self.run.finish()
        finally:
            self._restore()


BUILTIN_TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
                    "trackio": TrackioTracker}


@hookimpl
def register_trackers(register):
    for name, cls in BUILTIN_TRACKERS.items():
        register(name, cls)


# --- what the trainer uses ---

def require(name: str, tracker: Any) -> None:
    """Import what a tracker needs; missing, one line naming the tracker and what installs it."""
    for package in getattr(tracker, "packages", ()):
        try:
            importlib.import_module(package)
        except ImportError:
            extra = getattr(tracker, "extra", "")
            install = f'pip install "rlgen[{extra}]"' if extra else f"pip install {package}"
            raise RlgenError(f"run.report_to: tracker '{name}' needs the {package} package, which is not installed "
                             f"({install})") from None


def open_tracker(name: str, tracker: Any, root: Path, *, config: dict, run_name: str, start_step: int):
    """An open tracker: its class (or factory) called with its directory and the keywords it takes."""
    offered = {"config": config, "run_name": run_name, "start_step": start_step}
    try:
        parameters = inspect.signature(tracker).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {key: value for key, value in offered.items() if takes_any or key in parameters}
    return tracker(Path(root) / TRACKING_DIR / name, **kwargs)


def numeric_metrics(row: dict) -> dict[str, float]:
    """The values of a metrics row a tracker logs: its numbers (not `step`, booleans, None or text)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def prompt_as_text(prompt: Any) -> str:
    """A prompt for a tracker's table: a string as it is; a message list as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in prompt)
    return str(prompt)

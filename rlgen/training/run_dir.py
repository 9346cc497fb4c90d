"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, final model, resume, and the lock
that keeps two trainings from writing into one directory."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from rlgen.config import dumps_toml, to_dict
from rlgen.data.records import dumps, json_text
from rlgen.errors import RlgenError
from rlgen.merging.safetensors_io import read_header

try:
    import fcntl
except ImportError:  # not POSIX (Windows): run directories are not locked there
    fcntl = None

CHECKPOINT = re.compile(r"^step-(\d+)$")
LOCK = ".lock"
# Everything rlgen itself writes at the top of a run directory, leftovers of a kill included. A run that
# failed before its first checkpoint is started over only when it holds nothing else.
RUN_ENTRIES = {"config.toml", ".config.toml.tmp", "checkpoints", "metrics.jsonl", "metrics.tmp", LOCK,
               "final", ".final.tmp", ".final.old", "completions.jsonl", "completions.tmp", "tracking"}


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"
        self.completions_path = self.root / "completions.jsonl"
        self.final = self.root / "final"
        self._lock_fd: int | None = None

    # --- the lock ---
    def lock(self) -> None:
        """Hold OUT/.lock (flock) until unlock() or the process's end. The kernel drops a flock when its
        holder dies, so a lock file left by a killed run is stale and simply taken over."""
        if fcntl is None or self._lock_fd is not None:
            return
        path = self.root / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as exc:
                raise RlgenError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_pid(fd)
                os.close(fd)
                raise RlgenError(f"run directory {self.root} is in use by {holder} (wait for it to finish, or use another --out)") from None
            except OSError as exc:
                os.close(fd)
                raise RlgenError(f"cannot lock {path}: {exc.strerror or exc}") from None
            # A holder that released the lock may have removed the file between our open and our flock:
            # then we hold a lock on a name nobody sees, so try again with the file now at that path.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        path = self.root / LOCK
        try:
            if os.path.samestat(os.fstat(self._lock_fd), os.stat(path)):
                path.unlink()  # removed while still locked, so no one can take a lock on the old file
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def _check_not_locked(self) -> None:
        """Fail early (before the model loads) when another process holds the lock; lock() decides for sure."""
        path = self.root / LOCK
        if fcntl is None or self._lock_fd is not None or not path.is_file():
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            raise RlgenError(f"run directory {self.root} is in use by {holder} (wait for it to finish, or use another --out)") from None
        except OSError:
            pass
        finally:
            os.close(fd)

    # --- a new run ---
    def is_run(self) -> bool:
        """Whether the directory was made by `rlgen train` (its resolved config and checkpoints folder)."""
        return (self.root / "config.toml").is_file() and self.checkpoints.is_dir()

    def check_fresh(self) -> None:
        """`--out` must be new, empty, or a run of rlgen that failed before its first checkpoint (started over).
        Nothing else is ever written into or deleted: a finished run, one with checkpoints, a directory of
        other files (even one with a `final/`)."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RlgenError(f"--out {self.root} exists and is not a directory")
        self._check_not_locked()
        entries = {child.name for child in self.root.iterdir()} - {LOCK}
        if entries <= {"checkpoints", ".config.toml.tmp"} and not self._checkpoint_dirs():
            return  # empty, or a run killed while create() was writing its config
        if not self.is_run():
            raise RlgenError(f"--out {self.root} exists and is not an rlgen run directory (refusing to write into it: "
                             "give a new or empty directory)")
        if self.final.exists() or (self.root / ".final.old").exists() or self._checkpoint_dirs():
            raise RlgenError(f"run directory {self.root} already holds a run (use --resume {self.root}, or another --out)")
        foreign = sorted(entries - RUN_ENTRIES)
        if foreign:
            raise RlgenError(f"run directory {self.root} holds files rlgen did not write ({', '.join(foreign[:3])}): "
                             "refusing to start it over (give another --out)")

    def create(self, config, fresh: bool = True) -> None:
        """Called once the run has been set up without errors, so bad input leaves no directory behind.
        A fresh run takes the lock here and checks the directory again under it (another run may have
        started meanwhile), then clears what a run that failed before its first checkpoint left."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.lock()
            try:
                self.check_fresh()
            except RlgenError:
                self.unlock()
                raise
            self._clear_leftovers()
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.root / ".config.toml.tmp"
        tmp.write_text(dumps_toml(to_dict(config)))
        os.replace(tmp, self.root / "config.toml")

    def _clear_leftovers(self) -> None:
        for name in ("metrics.jsonl", "metrics.tmp", ".config.toml.tmp", "completions.jsonl", "completions.tmp"):
            (self.root / name).unlink(missing_ok=True)
        if (self.root / "tracking").is_dir():  # the trackers' files of the run started over
            shutil.rmtree(self.root / "tracking")
        if (self.root / ".final.tmp").is_dir():
            shutil.rmtree(self.root / ".final.tmp")
        if self.checkpoints.is_dir():
            for child in self.checkpoints.iterdir():
                if child.name.startswith(".step-") and child.name.endswith(".tmp"):
                    shutil.rmtree(child)

    # --- checkpoints ---
    def _checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """(step, path) of the step-N directories, newest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), child) for child in self.checkpoints.iterdir() if (m := CHECKPOINT.match(child.name))]
        return sorted(found, reverse=True)

    def latest_checkpoint(self, warn: Callable[[str], None] | None = None,
                          skip: dict[Path, str] | None = None) -> Path | None:
        """The newest checkpoint that passes a cheap soundness check; damaged newer ones are skipped with a
        warning. `skip` maps checkpoints already found damaged (their state did not restore; warned about
        then) to their problem. None when there is no checkpoint at all; an error when every one is damaged."""
        candidates = self._checkpoint_dirs()
        damaged = []
        skip = skip or {}
        for step, path in candidates:
            if path in skip:
                damaged.append(f"{path.name}: {skip[path]}")
                continue
            problem = checkpoint_problem(path, step)
            if problem is None:
                return path
            damaged.append(f"{path.name}: {problem}")
            if warn is not None:
                warn(f"skipping damaged checkpoint {path} ({problem})")
        if damaged:
            raise RlgenError(f"no usable checkpoint in {self.checkpoints} ({'; '.join(damaged[:3])}); move the step-N "
                             "folders away to start the run over from step 0")
        return None

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

    # --- metrics ---
    def truncate_metrics(self, step: int) -> None:
        """On resume from step N, drop metric lines (and completion rows) of steps > N written before the kill;
        resuming from step 0 (no checkpoint yet) starts the files over, since the run is repeated from its start."""
        self._truncate(self.metrics_path, step)
        self._truncate(self.completions_path, step)

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        if not path.exists():
            return
        kept = []
        if step > 0:
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    break  # a line cut by the kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def log_metrics(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as handle:
            handle.write(json_text(clean) + "\n")  # standard JSON: nested NaN / inf (and numpy floats) too
            handle.flush()

    def log_completions(self, rows: list[dict]) -> None:
        """Append rows (each with its `step`) to completions.jsonl, one standard-JSON object per line."""
        with self.completions_path.open("a", encoding="utf-8") as handle:
            handle.write("".join(dumps(row) + "\n" for row in rows))
            handle.flush()


def _holder_pid(fd: int) -> str:
    """'PID N' from a lock file (its holder writes its PID right after locking), or a vaguer phrase."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "another process"


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path.name} is not readable JSON") from None


def checkpoint_problem(path: Path, step: int) -> str | None:
    """What is wrong with checkpoint `path` of `step`, or None. Cheap: JSON files parsed, safetensors
    headers and sizes checked, no tensor read (a checkpoint is renamed into place complete, so damage
    means a disk fault or someone's hand)."""
    try:
        state = _json_file(path / "trainer_state.json")
        if not isinstance(state, dict) or state.get("step") != step:
            return f"trainer_state.json does not record step {step}"
        for name in ("optimizer", "rng", "extra"):
            skeleton = path / f"{name}.json"
            if name == "extra" and not skeleton.exists():
                continue
            if '"__tensor__"' in json.dumps(_json_file(skeleton)) and not (path / f"{name}.safetensors").is_file():
                return f"{name}.safetensors is missing"
        shards = path / "shards" / "shards.json"
        if shards.is_file():  # a sharded checkpoint: every file its index names is there (and not truncated)
            index = _json_file(shards)
            files = {piece[0] for info in index["tensors"].values() for piece in info["pieces"]}
            for name in sorted(files):
                if Path(name).name != name or not (shards.parent / name).is_file():
                    return f"shards/shards.json names a missing shard {name}"
                read_header(shards.parent / name)
            return None
        model = path / "model"
        configs = [model / f for f in ("config.json", "adapter_config.json", "model_index.json") if (model / f).is_file()]
        if not configs:
            return "model/ holds no config.json, adapter_config.json or model_index.json"
        for config in configs:
            _json_file(config)
        weights = sorted(path.rglob("*.safetensors"))
        if not any(model in w.parents for w in weights):
            return "model/ holds no .safetensors weights"
        for index in model.rglob("*.safetensors.index.json"):
            shards = _json_file(index).get("weight_map", {}).values()
            missing = sorted({s for s in shards if not (index.parent / s).is_file()})
            if missing:
                return f"{index.relative_to(path)} names a missing shard {missing[0]}"
        for file in weights:
            read_header(file)  # bounds of every tensor against the file size: catches truncation
    except ValueError as exc:
        return str(exc)
    except (AttributeError, TypeError, KeyError, IndexError):
        return "a JSON file of unexpected shape"
    except RlgenError as exc:
        return str(exc).replace(str(path) + "/", "")
    return None

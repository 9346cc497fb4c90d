"""`rlgen train --nproc N`: the same command again under torchrun, N processes on this machine.

The launcher is a subprocess (`python -m torch.distributed.run ... -m rlgen train ARGS`) whose output is
passed through, with the error contract kept: each rank's identical `rlgen: error:` line is shown once,
torchrun's own log lines and its failure report (a traceback of the launcher) are dropped unless --debug,
and the exit status is the failing rank's own (2 for a bad input), not torchrun's 1.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

# torchrun's log lines: glog style, e.g. "E1202 14:19:35.499000 26490 torch/distributed/..."
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
_EXIT_CODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


class Invocation:
    """The command line rlgen's `main` runs (without --debug) and whether --debug was given: what `rlgen
    train --nproc N` runs again in each process."""

    args: list[str] = []
    debug = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_nproc(args: list[str]) -> list[str]:
    """The command line without its --nproc option (`--nproc N` or `--nproc=N`): what each rank runs."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, args: list[str], port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N --master_port PORT -m rlgen ARGS` (ARGS without
    --nproc; a free port when none is given)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port or free_port()), "-m", "rlgen", *without_nproc(args)]


class _ErrorFilter:
    """Passes the ranks' stderr through; keeps one copy of each error line and, unless `debug`, drops
    torchrun's log lines and everything it prints once it reports a failed rank (noting the rank's exit
    status from the report's root cause)."""

    def __init__(self, write, debug: bool):
        self.write = write
        self.debug = debug
        self.errors_seen: set[str] = set()
        self.in_report = False
        self.root_cause = False
        self.exit_code: int | None = None

    def line(self, text: str) -> None:
        if self.in_report or _TORCHRUN_LOG.match(text):
            self._note_exit_code(text)
            self.in_report = self.in_report or "failed (exitcode" in text
            if self.debug:
                self.write(text)
            return
        if text.startswith(("rlgen: error:", "rlgen: internal error:", "rlgen: interrupted")):
            if text in self.errors_seen:
                return
            self.errors_seen.add(text)
        self.write(text)

    def _note_exit_code(self, text: str) -> None:
        self.root_cause = self.root_cause or text.startswith("Root Cause")
        match = _EXIT_CODE.search(text)
        if match and (self.exit_code is None or self.root_cause):
            self.exit_code = int(match.group(1))
            self.root_cause = False  # the first exit status after "Root Cause" is the one


def _pump(stream, write) -> None:
    for raw in iter(stream.readline, b""):
        write(raw.decode("utf-8", errors="replace"))
    stream.close()


def _writer(target):
    def write(text: str) -> None:
        target.write(text)
        target.flush()

    return write


def run_torchrun(command: list[str], debug: bool = False) -> int:
    """Run the torchrun command with its output passed through (see the module's doc); its exit status:
    that of the first failed rank (128 + N for a rank killed by signal N), else torchrun's."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # the ranks' logs arrive as they are written
    # torchrun's own default for several processes, set here so that it does not print a banner about it
    env.setdefault("OMP_NUM_THREADS", "1")
    if debug:
        env["RLGEN_DEBUG"] = "1"
    errors = _ErrorFilter(_writer(sys.stderr), debug)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, _writer(sys.stdout)), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, errors.line), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its ranks
        proc.wait()
        code = 130
    for pump in pumps:
        pump.join()
    if code != 0 and errors.exit_code not in (None, 0):
        code = errors.exit_code if errors.exit_code > 0 else 128 - errors.exit_code
    return code

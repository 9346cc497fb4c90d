#!/usr/bin/env python
"""Time and size per-token log-probs + entropies: rlgen's kernels vs torch eager vs TRL (and Liger-Kernel on CUDA).

Two cases, each at every vocabulary size V of `--sizes` (default 32000 and 151936), N tokens
(default 8192), fp32 on CPU:

* token:  logits [N/S, S, V] (randn * 2; S = `--seq-len` tokens per sequence, default 1024) and
  int64 targets. Every implementation returns (logprobs, entropy); the backward pass is the gradient
  of logprobs.sum() w.r.t. the logits, taken with torch.autograd.grad on the logits leaf (nothing
  accumulates into .grad). The entropy is a metric without gradient, as in GRPO trainers.
    rlgen               rlgen.kernels.token_logprobs(logits, targets, inplace_backward=True), as
                        rlgen's trainers call it: the gradient overwrites the logits (the logits
                        are refilled with the same values between runs, outside the timed region).
    rlgen (no inplace)  the same with inplace_backward=False (the gradient is a new tensor).
    torch eager         logp = log_softmax(logits); logprobs = logp.gather(targets); under no_grad:
                        p = logp.exp(); entropy = -(p.mul_(logp)).sum(-1)  (one [N, V] temporary).
    trl                 logprobs = trl's selective_log_softmax(logits, targets); under no_grad:
                        entropy = trl's entropy_from_logits(logits). (Only when trl is installed.)
* linear: hidden [N, H] and weight [V, H] (H = `--h`, default 1024; fp32, both require grad; scaled
  so the logits have std 2). Backward = gradients of logprobs.sum() w.r.t. hidden and weight.
    rlgen               rlgen.kernels.linear_token_logprobs(hidden, weight, targets) (never builds
                        the [N, V] logits).
    torch eager         logits = hidden @ weight.T, then the torch eager code above.

On CUDA (`--device cuda` / `cuda:N`; default cpu) every tensor lives on the GPU, rlgen dispatches to its
CUDA kernels, each timed region ends with torch.cuda.synchronize(), and the peak extra memory is
torch.cuda.max_memory_allocated above the allocated memory at the start of the memory run (reset there),
instead of RSS. When `liger_kernel` is importable (its kernels are Triton, so on CUDA only), two more rows:
    liger (token)       logprobs = -LigerCrossEntropyLoss(reduction="none")(logits, targets): log-probs
                        only, Liger computes no entropy (its time is the lower bound of what a trainer
                        needs; its results are checked against torch eager's log-probs and gradients).
    liger (linear)      logprobs = -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden,
                        targets), the same without the [N, V] logits.
The read-bandwidth probe then sums a buffer in GPU memory with torch.sum (rlgen._native.read_sum is CPU code).

Why [N/S, S, V] and not [N, V]: TRL's selective_log_softmax loops in Python over the first
dimension (its trainers pass [batch, completion_length, V]); with a flat [N, V] it would loop over
N single rows. `--seq-len 0` gives the flat [N, V] shape to every implementation.

Each (case, V, implementation) runs in a fresh worker process, so that peak memories do not mix.
Workers are forked from a multiprocessing "forkserver" that has only imported torch, rlgen.kernels and
TRL (so a worker starts in well under a second, where importing TRL takes several). The worker sets
torch.set_num_threads(--threads) (default: all cores; rlgen's kernels use torch's thread count), runs
with MALLOC_MMAP_THRESHOLD_=65536 (glibc then returns every freed block of 64 KiB or more to the OS
at once, so freed memory cannot hide in the heap and show up in no peak), and:
  1. allocates the inputs and runs one untimed forward + backward (warm-up);
  2. memory: resets the peak RSS (writes 5 to /proc/self/clear_refs), reads VmRSS as the baseline,
     runs forward + backward, reads VmHWM while the outputs (logprobs, entropy, gradients) are still
     alive; peak extra memory = VmHWM - baseline;
  3. timing: `--repeats` times, a forward alone (under torch.no_grad) then a forward + backward,
     each timed with time.perf_counter; the tables show medians.
The worker also returns a fingerprint of its results (sums of logprobs and entropies, norms of the
gradient's first rows) that the driver compares with torch eager's, so a wrong result cannot pass
as a fast one.

Memory read bandwidth is measured at the start and end of the same run, in a worker like the others:
the median time of summing a >= 1 GiB fp32 buffer with rlgen._native.read_sum (vectorised, OpenMP,
same thread count) and with torch.sum. The "measured read bandwidth" is the largest of these medians
(the conservative choice: it makes the kernel's share smallest). A forward's effective bandwidth is
N * V * 4 bytes of logits / forward time (GB = 1e9 bytes; memory in MiB = 2^20 bytes). On a shared
machine the bandwidth swings with the neighbours' load (2x on the 2-core VM this was written on), so
each token worker also times read_sum over its own logits right before every forward ("adjacent
read": the same bytes under the same load) and reports the forward's share of that too. The
bandwidth worker also times writing fresh memory (page faults included), for context: it is what
every new [N, V] tensor costs, and what the eager paths pay several times per call.

    python bench/logprob.py --quick                  # N=256, H=256, 1 repeat: a smoke test (under a minute)
    python bench/logprob.py --only token --json token.json
    python bench/logprob.py --only linear --sizes 151936 --n 4096

Before each worker the driver checks MemAvailable (/proc/meminfo) against a rough estimate of what
the worker needs and skips it, with a note, when it would not fit. Runs take long on 2 cores (the
eager linear case at V=151936 does three 2.5 TFLOP matmuls per forward + backward); progress goes to
stderr, the results (markdown) to stdout.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
GB = 1e9
MIB = 2**20
TOKEN_IMPLS = ("rlgen", "rlgen (no inplace)", "torch eager", "trl", "liger")
LINEAR_IMPLS = ("rlgen", "torch eager", "liger")
TARGETS = {  # from the issue
    "token_vs_eager": 3.0,  # fwd+bwd speed-up over torch eager, at least
    "token_vs_trl": 1.5,  # fwd+bwd speed-up over TRL, at least
    "token_mem_pct": 10.0,  # peak extra memory, % of torch eager's, at most
    "token_bw_pct": 50.0,  # forward's effective GB/s, % of the measured read bandwidth, at least
    "linear_mem_pct": 15.0,  # peak extra memory, % of the eager path's, at most (at V=151936)
    "linear_time_ratio": 1.2,  # fwd+bwd time / eager path's, at most (at V=151936)
    "linear_vocab": 151936,
}


# --------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def proc_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Fields of a /proc 'Name:   123 kB' file, in bytes."""
    out = {}
    with open(path) as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in names:
                out[key] = int(rest.split()[0]) * 1024
    return out


def mem_available() -> int:
    return proc_fields("/proc/meminfo", ("MemAvailable",))["MemAvailable"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


# --------------------------------------------------------------------------- the implementations (worker side)

def eager_logprobs(logits, targets):
    """torch eager: log_softmax + gather (with grad); entropy from log_softmax's output under no_grad."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        p = logp.exp()
        entropy = -(p.mul_(logp)).sum(-1)
    return logprobs, entropy


def trl_logprobs(logits, targets):
    """TRL's functions, as its GRPO trainer uses them (entropy under no_grad)."""
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logprobs = selective_log_softmax(logits, targets)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logprobs, entropy


def liger_logprobs(logits, targets):
    """Liger-Kernel's cross-entropy per token, negated: log-probs only (Liger has no entropy); zero entropy
    stands in for it, and the result check leaves entropy out."""
    import torch
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return -loss.view(targets.shape), torch.zeros(targets.shape, device=logits.device)


def liger_linear_logprobs(hidden, weight, targets):
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets)
    return -loss, torch.zeros(targets.shape, device=hidden.device)


def rlgen_logprobs(inplace: bool):
    from rlgen import kernels

    def run(logits, targets):
        return kernels.token_logprobs(logits, targets, inplace_backward=inplace)

    return run


def token_impl(name: str):
    """(function(logits, targets) -> (logprobs, entropy), whether backward overwrites the logits)."""
    if name == "rlgen":
        return rlgen_logprobs(True), True
    if name == "rlgen (no inplace)":
        return rlgen_logprobs(False), False
    if name == "torch eager":
        return eager_logprobs, False
    if name == "trl":
        return trl_logprobs, False
    if name == "liger":
        return liger_logprobs, False
    raise ValueError(name)


def linear_impl(name: str):
    """function(hidden, weight, targets) -> (logprobs, entropy)."""
    if name == "rlgen":
        from rlgen import kernels

        return lambda hidden, weight, targets: kernels.linear_token_logprobs(hidden, weight, targets)
    if name == "torch eager":
        return lambda hidden, weight, targets: eager_logprobs(hidden @ weight.t(), targets)
    if name == "liger":
        return liger_linear_logprobs
    raise ValueError(name)


# --------------------------------------------------------------------------- worker: one measurement

def rss_now() -> int:
    return proc_fields("/proc/self/status", ("VmRSS",))["VmRSS"]


def rss_peak() -> int:
    return proc_fields("/proc/self/status", ("VmHWM",))["VmHWM"]


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


class PeakProbe:
    """The memory run's peak above its start: RSS (VmHWM, reset) on the CPU, allocated memory on CUDA."""

    def __init__(self, device):
        import torch

        self.device = device
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            reset_peak_rss()
            self.baseline = rss_now()

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return rss_peak()


def measure(fwd, fwd_bwd, refill, fingerprint, repeats: int, warmup: int, label: str, device, read=None) -> dict:
    """Warm-up, then the memory run (peak memory of one forward + backward), then the timed repeats.

    fwd() / fwd_bwd() return their result tensors; refill() restores inputs a backward may have
    overwritten (outside every timed region); fingerprint(result) summarises a fwd_bwd result;
    read(), when given, reads the same bytes as the forward (timed right before each forward)."""
    for _ in range(warmup):
        out = fwd_bwd()
        del out
        refill()
    probe = PeakProbe(device)
    baseline = probe.baseline
    out, mem_run_s = timed(fwd_bwd, device)
    peak = probe.peak()  # the outputs are still alive here, so they count
    check = fingerprint(out)
    del out
    refill()
    log(f"  {label}: peak extra {(peak - baseline) / MIB:.0f} MiB, forward+backward {mem_run_s:.3f} s (memory run)")
    fwd_s, fwd_bwd_s, read_s = [], [], []
    for r in range(repeats):
        if read is not None:
            read_s.append(timed(read, device)[1])
        out, t_fwd = timed(fwd, device)
        del out
        out, t_all = timed(fwd_bwd, device)
        del out
        refill()
        fwd_s.append(t_fwd)
        fwd_bwd_s.append(t_all)
        probe = f" (reading the logits alone: {read_s[-1]:.3f} s)" if read_s else ""
        log(f"  {label}: repeat {r + 1}/{repeats}: forward {t_fwd:.3f} s{probe}, forward+backward {t_all:.3f} s")
    return {
        "memory": "cuda allocated" if device.type == "cuda" else "rss",
        "baseline_rss": baseline,
        "peak_rss": peak,
        "extra_bytes": peak - baseline,
        "mem_run_s": mem_run_s,
        "fwd_s": fwd_s,
        "fwd_bwd_s": fwd_bwd_s,
        "read_s": read_s,
        "check": check,
    }


def rows_fingerprint(logprobs, entropy, grads, with_entropy: bool = True) -> dict:
    """Float64 sums of logprobs and entropies and the norm of each gradient's first 16 rows."""
    import torch

    logprobs, entropy = logprobs.detach(), entropy.detach()
    out = {"logprob_sum": float(logprobs.double().sum())}
    if with_entropy:
        out["entropy_sum"] = float(entropy.double().sum())
    for k, g in enumerate(grads):
        rows = g.detach().reshape(-1, g.shape[-1])[:16]
        out[f"grad{k}_norm"] = float(torch.linalg.vector_norm(rows.double()))
    return out


def token_worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    n, v, seq = spec["n"], spec["v"], spec["seq_len"]
    shape = (n // seq, seq, v) if seq else (n, v)
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    logits = torch.empty(shape, device=device).requires_grad_()

    def fill():
        gen.manual_seed(spec["seed"])
        with torch.no_grad():
            logits.normal_(0.0, 2.0, generator=gen)

    fill()
    targets = torch.randint(0, v, shape[:-1], generator=torch.Generator(device=device).manual_seed(spec["seed"] + 1),
                            device=device)
    fn, overwrites = token_impl(spec["impl"])

    def fwd():
        with torch.no_grad():
            return fn(logits, targets)

    def fwd_bwd():
        logprobs, entropy = fn(logits, targets)
        (grad,) = torch.autograd.grad(logprobs.sum(), logits)
        return logprobs, entropy, grad

    def refill():
        if overwrites:
            fill()

    def fingerprint(out):
        return rows_fingerprint(out[0], out[1], out[2:], with_entropy=spec["impl"] != "liger")

    label = f"token V={v} {spec['impl']}"
    return measure(fwd, fwd_bwd, refill, fingerprint, spec["repeats"], spec["warmup"], label, device,
                   read=read_probe(logits.detach().view(-1)))


def linear_worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    n, v, h = spec["n"], spec["v"], spec["h"]
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    scale = 2.0 / h**0.5  # hidden ~ N(0, 1), weight ~ N(0, 4/H): logits ~ N(0, 4)
    hidden = torch.empty(n, h, device=device).normal_(0.0, 1.0, generator=gen).requires_grad_()
    weight = torch.empty(v, h, device=device).normal_(0.0, scale, generator=gen).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=torch.Generator(device=device).manual_seed(spec["seed"] + 1),
                            device=device)
    fn = linear_impl(spec["impl"])

    def fwd():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    def fwd_bwd():
        logprobs, entropy = fn(hidden, weight, targets)
        grad_h, grad_w = torch.autograd.grad(logprobs.sum(), (hidden, weight))
        return logprobs, entropy, grad_h, grad_w

    def fingerprint(out):
        return rows_fingerprint(out[0], out[1], out[2:], with_entropy=spec["impl"] != "liger")

    label = f"linear V={v} {spec['impl']}"
    return measure(fwd, fwd_bwd, lambda: None, fingerprint, spec["repeats"], spec["warmup"], label, device)


def read_probe(flat):
    """A function that reads every element of the 1-D fp32 tensor `flat` once: rlgen._native.read_sum
    (torch.sum when the extension is missing or the tensor is on a GPU), on torch's thread count."""
    import torch

    if flat.device.type != "cpu":
        return lambda: float(flat.sum())
    try:
        from rlgen.api import native as _native
    except ImportError:
        return lambda: float(flat.sum())
    return lambda: _native.read_sum(flat, torch.get_num_threads())


def bandwidth_worker(spec: dict) -> dict:
    """Median GB/s of summing a >= 1 GiB fp32 buffer, with rlgen._native.read_sum and with torch.sum (on a
    GPU: torch.sum of a buffer in its memory); and, for context, the rate of writing fresh memory (page
    faults included)."""
    import torch

    device = torch.device(spec["device"])
    elements = int(spec["gib"] * 2**30) // 4
    nbytes = elements * 4
    first_touch = []
    for _ in range(3):
        fresh, seconds = timed(lambda: torch.empty(elements, device=device).fill_(1.0), device)
        first_touch.append(seconds)
        del fresh
    buf = torch.ones(elements, device=device)  # touches every page before timing
    probes = {"torch.sum": lambda: float(buf.sum())}
    try:
        from rlgen.api import native as _native  # noqa: F401

        if device.type == "cpu":
            probes["rlgen._native.read_sum"] = read_probe(buf)
    except ImportError as exc:
        log(f"  bandwidth: rlgen._native not importable ({exc}); torch.sum only")
    out = {"bytes": nbytes, "first_touch_write": {"times_s": first_touch, "gb_s": nbytes / median(first_touch) / GB}}
    for name, probe in probes.items():
        probe()  # warm-up
        times = [timed(probe, device)[1] for _ in range(spec["repeats"])]
        out[name] = {"times_s": times, "gb_s": nbytes / median(times) / GB}
        log(f"  bandwidth {name}: {out[name]['gb_s']:.1f} GB/s (median of {len(times)})")
    log(f"  writing fresh memory (first touch, page faults included): {out['first_touch_write']['gb_s']:.1f} GB/s")
    return out


def worker_main(spec: dict, conn) -> None:
    """The body of a worker process: one measurement, its result sent back through `conn`."""
    import torch

    torch.set_num_threads(spec["threads"])
    from rlgen import kernels

    kernels.use("auto")
    before = loadavg()
    kind = spec["kind"]
    if kind == "bandwidth":
        result = bandwidth_worker(spec)
    else:
        device = torch.device(spec["device"])
        if kernels.backend_name(device) != f"native-{device.type}":
            log(f"warning: rlgen's {device.type} backend is {kernels.describe(device)!r}, not the native kernels")
        result = token_worker(spec) if kind == "token" else linear_worker(spec)
    result["threads"] = torch.get_num_threads()
    result["loadavg_before"], result["loadavg_after"] = before, loadavg()
    conn.send(result)
    conn.close()


# --------------------------------------------------------------------------- driver

_context = None


def worker_context():
    """A multiprocessing 'forkserver' context whose server has imported torch, rlgen's kernels and TRL.

    Every worker is a new process forked from that server (no state from earlier workers, and no
    thread pool: the server only imports), so it starts in a fraction of a second instead of the
    seconds that importing torch and TRL take, and every worker runs the same rlgen code even if the
    package is rebuilt during the run. The server is started with MALLOC_ENV in its environment, so
    glibc's malloc in every worker runs with it."""
    global _context
    if _context is None:
        import multiprocessing

        os.environ.update(MALLOC_ENV)  # inherited by the forkserver (started on first use), not by this process
        _context = multiprocessing.get_context("forkserver")
        preload = ["torch", "rlgen.kernels", "rlgen._native"]  # one version of rlgen for the whole run
        if importlib.util.find_spec("trl") is not None:
            preload.append("trl.trainer.utils")
        if importlib.util.find_spec("liger_kernel") is not None:
            preload.append("liger_kernel.transformers")
        _context.set_forkserver_preload(preload)
    return _context


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh worker process; {"error": ...} when it fails."""
    ctx = worker_context()
    receive, send = ctx.Pipe(duplex=False)
    started = time.perf_counter()
    proc = ctx.Process(target=worker_main, args=(spec, send), daemon=True)
    proc.start()
    send.close()  # the worker holds the other copy: recv() raises EOFError if it dies
    try:
        result = receive.recv()
    except EOFError:
        result = None
    proc.join()
    wall = time.perf_counter() - started
    if result is None or proc.exitcode != 0:
        why = f"worker exited with status {proc.exitcode}"
        if proc.exitcode == -9:
            why += " (SIGKILL: most likely the out-of-memory killer)"
        return {"error": why, "wall_s": wall}
    result["wall_s"] = wall
    return result


def estimate_bytes(case: str, impl: str, n: int, v: int, h: int) -> int:
    """Rough upper bound of a worker's resident memory (inputs + peak extra + interpreter), for the skip check."""
    logits = n * v * 4
    if case == "token":
        extra = {"rlgen": 0.05, "rlgen (no inplace)": 1.1, "torch eager": 3.1, "trl": 3.1, "liger": 1.1}[impl] * logits
        inputs = logits
    else:
        inputs = (n + v) * h * 4
        extra = inputs + (3.1 * logits if impl == "torch eager" else 64 * MIB)
        if impl == "liger":  # its chunked logits
            extra += logits // 4
    return int(inputs + extra + 600 * MIB)


def plan(args, have_trl: bool, have_liger: bool) -> list[dict]:
    specs = []
    common = {"n": args.n, "h": args.h, "threads": args.threads, "seed": args.seed, "warmup": args.warmup,
              "device": args.device}
    cases = ["token", "linear"] if args.only == "both" else [args.only]
    for case in cases:
        for v in args.sizes:
            impls = TOKEN_IMPLS if case == "token" else LINEAR_IMPLS
            for impl in impls:
                if (impl == "trl" and not have_trl) or (impl == "liger" and not have_liger):
                    continue
                repeats = args.repeats or (3 if case == "token" or v <= 65536 else 2)
                if args.quick and not args.repeats:
                    repeats = 1
                specs.append(dict(common, kind=case, v=v, impl=impl, repeats=repeats,
                                  seq_len=args.seq_len if case == "token" else 0))
    return specs


def memory_free(device: str) -> int:
    """Bytes a worker can still allocate: MemAvailable, or the GPU's free memory."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    return mem_available()


def run_all(args, specs: list[dict]) -> tuple[list[dict], list[dict]]:
    bw_spec = {"kind": "bandwidth", "threads": args.threads, "gib": args.bandwidth_gib, "repeats": 9, "device": args.device}
    log(f"[bandwidth 1/2] summing {args.bandwidth_gib} GiB ...")
    bandwidth = [run_worker(bw_spec)]
    results = []
    for k, spec in enumerate(specs, 1):
        need = estimate_bytes(spec["kind"], spec["impl"], spec["n"], spec["v"], spec["h"])
        avail = memory_free(args.device)
        head = f"[{k}/{len(specs)}] {spec['kind']} N={spec['n']} V={spec['v']} {spec['impl']}"
        if need > avail:
            note = (f"skipped: needs about {need / 2**30:.1f} GiB, {args.device} has {avail / 2**30:.1f} GiB free "
                    "(try a smaller --n)")
            log(f"{head}: {note}")
            results.append(dict(spec, error=note, skipped=True))
            continue
        log(f"{head}: {spec['repeats']} repeats (load average {loadavg()}) ...")
        out = run_worker(spec)
        if "error" in out:
            log(f"{head}: {out['error']}")
        results.append(dict(spec, **out))
    log("[bandwidth 2/2] summing again ...")
    bandwidth.append(run_worker(bw_spec))
    return results, bandwidth


# --------------------------------------------------------------------------- summary

def summarize(results: list[dict], bandwidth_gb_s: float | None) -> list[dict]:
    """One row per (case, V, implementation) with medians and the ratios to its peers."""
    rows = []
    for r in results:
        row = {k: r.get(k) for k in ("kind", "v", "n", "h", "impl", "repeats", "error", "wall_s")}
        if "error" not in r:
            row["fwd_s"] = median(r["fwd_s"])
            row["fwd_bwd_s"] = median(r["fwd_bwd_s"])
            row["extra_mib"] = r["extra_bytes"] / MIB
            row["check"] = r["check"]
            row["load"] = [r["loadavg_before"][0], r["loadavg_after"][0]] if r.get("loadavg_before") else None
            if r["kind"] == "token":
                row["fwd_gb_s"] = r["n"] * r["v"] * 4 / row["fwd_s"] / GB
                if bandwidth_gb_s:
                    row["fwd_bw_pct"] = 100 * row["fwd_gb_s"] / bandwidth_gb_s
                if r.get("read_s"):  # reading the same logits just before each forward: same bytes, same moment
                    row["adjacent_read_gb_s"] = r["n"] * r["v"] * 4 / median(r["read_s"]) / GB
                    row["fwd_adjacent_pct"] = median([100 * a / b for a, b in zip(r["read_s"], r["fwd_s"])])
        rows.append(row)
    for row in rows:
        peers = {p["impl"]: p for p in rows if p["kind"] == row["kind"] and p["v"] == row["v"] and "fwd_s" in p}
        if "fwd_s" not in row:
            continue
        for name, key in (("torch eager", "eager"), ("trl", "trl")):
            peer = peers.get(name)
            if peer:
                row[f"speedup_vs_{key}"] = peer["fwd_bwd_s"] / row["fwd_bwd_s"]
                row[f"fwd_speedup_vs_{key}"] = peer["fwd_s"] / row["fwd_s"]
        eager = peers.get("torch eager")
        if eager and eager["extra_mib"] > 0:
            row["mem_pct_of_eager"] = 100 * row["extra_mib"] / eager["extra_mib"]
        row["check_vs_eager"] = compare_checks(row["check"], eager["check"]) if eager else None
    return rows


def compare_checks(mine: dict, ref: dict) -> float:
    """Largest relative difference between two result fingerprints, over the values both have."""
    worst = 0.0
    for key, value in ref.items():
        if key not in mine:
            continue
        worst = max(worst, abs(mine[key] - value) / max(abs(value), 1e-12))
    return worst


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(rows: list[dict]) -> list[str]:
    head = ("| case | V | implementation | fwd s | fwd+bwd s | peak extra MiB | speed-up vs eager | speed-up vs TRL "
            "| memory % of eager | fwd GB/s | fwd % of read BW | fwd % of adjacent read | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kind']} | {r['v']} | {r['impl']} | {r['error']} |" + " |" * (head.count("|") - 5))
            continue
        lines.append(
            f"| {r['kind']} | {r['v']} | {r['impl']} | {fmt(r['fwd_s'], '.3f')} | {fmt(r['fwd_bwd_s'], '.3f')} "
            f"| {fmt(r['extra_mib'], ',.1f' if r['extra_mib'] < 100 else ',.0f')} | {fmt(r.get('speedup_vs_eager'), '.2f', 'x')} "
            f"| {fmt(r.get('speedup_vs_trl'), '.2f', 'x')} | {fmt(r.get('mem_pct_of_eager'), '.1f', '%')} "
            f"| {fmt(r.get('fwd_gb_s'), '.1f')} | {fmt(r.get('fwd_bw_pct'), '.0f', '%')} "
            f"| {fmt(r.get('fwd_adjacent_pct'), '.0f', '%')} | {'-' if not r.get('load') else '%.1f-%.1f' % tuple(r['load'])} |")
    return lines


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def check_targets(rows: list[dict]) -> list[dict]:
    """Each of the issue's targets with the measured value (rlgen = inplace_backward=True, as the trainers call it)."""
    out = []

    def find(kind, v, impl):
        return next((r for r in rows if r["kind"] == kind and r["v"] == v and r["impl"] == impl and "fwd_s" in r), None)

    def add(text, value, ok, shown):
        out.append({"target": text, "value": value, "pass": ok, "shown": shown})

    for v in sorted({r["v"] for r in rows if r["kind"] == "token"}):
        me = find("token", v, "rlgen")
        if me is None:
            add(f"token_logprobs at V={v}", None, None, "not measured")
            continue
        x = me.get("speedup_vs_eager")
        add(f"token_logprobs fwd+bwd >= {TARGETS['token_vs_eager']:g}x faster than torch eager (V={v})", x,
            None if x is None else x >= TARGETS["token_vs_eager"], fmt(x, ".2f", "x"))
        x = me.get("speedup_vs_trl")
        add(f"token_logprobs fwd+bwd >= {TARGETS['token_vs_trl']:g}x faster than TRL (V={v})", x,
            None if x is None else x >= TARGETS["token_vs_trl"], fmt(x, ".2f", "x"))
        x = me.get("mem_pct_of_eager")
        add(f"token_logprobs peak extra memory <= {TARGETS['token_mem_pct']:g}% of torch eager's (V={v})", x,
            None if x is None else x <= TARGETS["token_mem_pct"],
            fmt(x, ".2f", "%") + f" ({me['extra_mib']:,.1f} MiB)")
        x = me.get("fwd_bw_pct")
        adjacent = me.get("fwd_adjacent_pct")
        context = "" if adjacent is None else (f"; {adjacent:.0f}% of reading the same logits just before each forward "
                                               f"({me['adjacent_read_gb_s']:.1f} GB/s)")
        add(f"token_logprobs forward >= {TARGETS['token_bw_pct']:g}% of measured read bandwidth (V={v})", x,
            None if x is None else x >= TARGETS["token_bw_pct"],
            fmt(x, ".0f", "%") + f" ({me['fwd_gb_s']:.1f} GB/s{context})")
    for v in sorted({r["v"] for r in rows if r["kind"] == "linear"}):
        stated = v == TARGETS["linear_vocab"]
        tag = f"V={v}" if stated else f"V={v}, for reference: the target is stated at V={TARGETS['linear_vocab']}"
        me, eager = find("linear", v, "rlgen"), find("linear", v, "torch eager")
        if me is None or eager is None:
            add(f"linear_token_logprobs vs the eager path ({tag})", None, None, "not measured (see the table)")
            continue
        x = me.get("mem_pct_of_eager")
        ok = x <= TARGETS["linear_mem_pct"] if x is not None else None
        add(f"linear_token_logprobs peak extra memory <= {TARGETS['linear_mem_pct']:g}% of the eager path's ({tag})",
            x, ok if stated else None, fmt(x, ".1f", "%"))
        x = me["fwd_bwd_s"] / eager["fwd_bwd_s"]
        ok = x <= TARGETS["linear_time_ratio"]
        add(f"linear_token_logprobs fwd+bwd time <= {TARGETS['linear_time_ratio']:g}x the eager path's ({tag})",
            x, ok if stated else None, f"{x:.2f}x")
    return out


def provenance() -> dict:
    """Which rlgen code ran: the git commit, whether the kernel sources differ from it, the extension file."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}

    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    out["commit"] = git("rev-parse", "--short", "HEAD") or None
    if out["commit"]:
        changed = git("status", "--porcelain", "--", "rlgen/kernels", "native", "CMakeLists.txt")
        out["kernel_sources_modified"] = bool(changed)
    try:
        from rlgen.api import native as _native

        path = _native.__file__
        out["native_file"] = path
        out["native_built"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    except ImportError:
        pass
    return out


def machine_info(args, have_trl: bool) -> dict:
    import torch

    from rlgen import kernels

    torch.set_num_threads(args.threads)
    info = {
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None,
        "rlgen_backend": kernels.describe(torch.device(args.device)),
        "trl": importlib.metadata.version("trl") if have_trl else None,
        "liger_kernel": importlib.metadata.version("liger-kernel") if args.have_liger else None,
        "mem_total_gib": proc_fields("/proc/meminfo", ("MemTotal",))["MemTotal"] / 2**30,
        "mem_available_gib": mem_available() / 2**30,
        "transparent_hugepages": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "worker_env": MALLOC_ENV,
        "rlgen_source": provenance(),
    }
    try:
        info["rlgen"] = importlib.metadata.version("rlgen")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


def best_bandwidth(bandwidth: list[dict]) -> tuple[float | None, dict]:
    """The largest median read GB/s over probes and passes, and each read probe's medians."""
    per_probe: dict[str, list[float]] = {}
    for pass_ in bandwidth:
        for name, value in pass_.items():
            if name != "first_touch_write" and isinstance(value, dict) and "gb_s" in value:
                per_probe.setdefault(name, []).append(value["gb_s"])
    best = max((g for gs in per_probe.values() for g in gs), default=None)
    return best, per_probe


def report(result: dict) -> None:
    m, c = result["machine"], result["config"]
    where = f"CUDA: {m['gpu']}" if m["gpu"] else "CPU"
    print(f"# bench/logprob.py: per-token log-probs + entropy, forward + backward (fp32, {where})\n")
    print(f"- machine: {m['cpu']}, {m['cpus']} CPUs, torch threads: {m['threads']} for every implementation; "
          f"{m['mem_total_gib']:.1f} GiB RAM ({m['mem_available_gib']:.1f} GiB available at start); "
          f"transparent hugepages: {m['transparent_hugepages']}")
    print(f"- versions: python {m['python']}, torch {m['torch']}, trl {m['trl'] or 'not installed'}, "
          f"liger-kernel {m['liger_kernel'] or 'not used'}, rlgen {m.get('rlgen', '?')}, rlgen kernel backend: "
          f"{m['rlgen_backend']}")
    src = m["rlgen_source"]
    if src.get("commit"):
        dirty = " + uncommitted kernel changes" if src.get("kernel_sources_modified") else ""
        print(f"- rlgen source: git {src['commit']}{dirty}; extension built {src.get('native_built', '?')}")
    print(f"- load average before / after: {m['loadavg_before']} / {m['loadavg_after']}; wall time {m['wall_s']:.0f} s")
    probes = ", ".join(f"{name} {' / '.join(f'{g:.1f}' for g in gs)} GB/s" for name, gs in result["bandwidth_probes"].items())
    print(f"- read bandwidth ({c['bandwidth_gib']:g} GiB buffer, median of 9, start / end of the run): {probes}; "
          f"measured read bandwidth = the largest = {fmt(result['bandwidth_gb_s'], '.1f')} GB/s. For context, writing "
          f"fresh memory (page faults included): {' / '.join(f'{g:.1f}' for g in result['first_touch_gb_s'])} GB/s")
    shape = f"[{c['n'] // c['seq_len']}, {c['seq_len']}, V]" if c["seq_len"] else "[N, V]"
    print(f"- N = {c['n']} tokens (token logits {shape}), H = {c['h']} (linear); medians of the repeats "
          f"(token: {c['repeats_token']}, linear: {c['repeats_linear']}) after {c['warmup']} warm-up; "
          f"workers run with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    print("- speed-up = peer's fwd+bwd time / this row's (> 1: this row is faster); memory % = this row's peak "
          "extra / torch eager's; GB/s = N*V*4 bytes of logits / forward time (token case only); adjacent read = "
          "read_sum over the same logits timed just before each forward (same bytes, same machine load), median "
          "of the per-repeat ratios; load = 1-minute load average at the worker's start-end\n")
    for line in table(result["rows"]):
        print(line)
    worst = max((r["check_vs_eager"] for r in result["rows"] if r.get("check_vs_eager") is not None), default=None)
    if worst is not None:
        print(f"\nResults agree with torch eager's (sums of logprobs and entropies, norms of the first 16 gradient "
              f"rows): largest relative difference {worst:.1e}.")
    print("\n## Targets (rlgen row = inplace_backward=True, as rlgen's trainers call it)\n")
    if c["n"] != 8192 or c["h"] != 1024:
        print(f"(The issue states these targets at N=8192, H=1024; this run has N={c['n']}, H={c['h']}, where fixed "
              "per-call costs and the linear case's [V, H] gradients weigh more.)\n")
    for t in result["targets"]:
        print(f"- {verdict(t['pass']):4}  {t['target']}: {t['shown']}")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32000,151936", help="vocabulary sizes, comma-separated (default: 32000,151936)")
    p.add_argument("--n", type=int, default=None, help="tokens (default: 8192; 256 with --quick)")
    p.add_argument("--h", type=int, default=None, help="hidden size of the linear case (default: 1024; 256 with --quick)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per sequence: token logits are [N/S, S, V] (default: 1024; 0 = flat [N, V])")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement (default: 3; linear at V > 65536: 2; --quick: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward+backward runs first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every implementation (default: all CPUs)")
    p.add_argument("--only", choices=("both", "token", "linear"), default="both")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="read-bandwidth buffer size in GiB (default: 1, minimum 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: N=256, H=256, 1 repeat")
    p.add_argument("--device", default="cpu", metavar="auto|cpu|cuda|cuda:N",
                   help="where every implementation runs (default: cpu); Liger-Kernel rows on CUDA when installed")
    p.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    args = p.parse_args(argv)
    args.n = args.n or (256 if args.quick else 8192)
    args.h = args.h or (256 if args.quick else 1024)
    args.threads = args.threads or cpu_count()
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error("--sizes takes integers separated by commas")
    if args.seq_len:
        args.seq_len = min(args.seq_len, args.n)
        if args.n % args.seq_len:
            p.error(f"--n {args.n} is not a multiple of --seq-len {args.seq_len}")
    if args.n < 1 or args.h < 1 or not args.sizes or min(args.sizes) < 1:
        p.error("--n, --h and --sizes must be positive")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.bandwidth_gib < 1:
        p.error("--bandwidth-gib must be >= 1")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import resolve_bench_device

    args.device = str(resolve_bench_device(args.device))
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl and args.only != "linear":
        log("note: trl is not installed; no TRL rows")
    args.have_liger = args.device.startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None
    if importlib.util.find_spec("liger_kernel") is None:
        log("note: liger_kernel is not installed; no Liger-Kernel rows")
    elif not args.have_liger:
        log("note: Liger-Kernel runs on CUDA only (Triton); no Liger-Kernel rows on the CPU")
    specs = plan(args, have_trl, args.have_liger)
    machine = machine_info(args, have_trl)
    machine["loadavg_before"] = loadavg()
    if machine["loadavg_before"] and machine["loadavg_before"][0] + args.threads > machine["cpus"] + 0.5:
        log(f"note: load average {machine['loadavg_before']} with {args.threads} threads on {machine['cpus']} CPUs: "
            "the machine is busy, timings will be noisy")
    wall = time.perf_counter()
    results, bandwidth = run_all(args, specs)
    machine["wall_s"] = time.perf_counter() - wall
    machine["loadavg_after"] = loadavg()
    bw, probes = best_bandwidth(bandwidth)
    rows = summarize(results, bw)
    repeats = {kind: sorted({s["repeats"] for s in specs if s["kind"] == kind}) for kind in ("token", "linear")}
    result = {
        "config": {"n": args.n, "h": args.h, "sizes": args.sizes, "seq_len": args.seq_len, "threads": args.threads,
                   "warmup": args.warmup, "seed": args.seed, "quick": args.quick, "only": args.only, "device": args.device,
                   "bandwidth_gib": args.bandwidth_gib,
                   "repeats_token": "/".join(map(str, repeats["token"])) or "-",
                   "repeats_linear": "/".join(map(str, repeats["linear"])) or "-"},
        "machine": machine,
        "bandwidth_gb_s": bw,
        "bandwidth_probes": probes,
        "first_touch_gb_s": [b["first_touch_write"]["gb_s"] for b in bandwidth if "first_touch_write" in b],
        "bandwidth_runs": bandwidth,
        "rows": rows,
        "targets": check_targets(rows),
        "raw": results,
    }
    report(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

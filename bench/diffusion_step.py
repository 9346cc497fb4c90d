#!/usr/bin/env python
"""Time and measure the memory of one training step of rlgen's diffusion trainers on the tiny-digits models.

Configurations (one subprocess each, so that every one gets its own peak-RSS record):

  ddpo                        DDIM eta=1 rollouts, PPO clip per denoising step, per-prompt statistics
  flow-grpo                   SDE rollouts of the flow model, group advantages, KL to the reference (beta > 0)
  reward-backprop K=1         DRaFT-K / AlignProp through the last denoising step, gradient checkpointing on
  reward-backprop K=1 no-ckpt ... and off (algorithm.gradient_checkpointing=false)
  reward-backprop K=T         ... through all T denoising steps, checkpointing on
  reward-backprop K=T no-ckpt ... and off: the peer, the same computation without rlgen's memory saving
  diffusion-dpo               Diffusion-DPO on image pairs that the worker makes first from the same model
                              (sample, score with the reward, pair best / worst per prompt, PNGs + pairs.jsonl)

Each trainer is built through the normal config path (`rlgen.build_trainer` with the algorithm's
preset, the model's recommended settings and the flags / --set values below), set up (`trainer.setup()`),
then stepped with `trainer.train_step()` as `Trainer.fit()` does: `--warmup` untimed steps, `--steps` timed
steps, medians; `--repeats R` repeats that with a fresh trainer in the same worker. Defaults: 2 prompts x 4
images per step (the trainers' own defaults are 8 x 8 for ddpo / flow-grpo and 8 x 4 for reward-backprop),
8 pairs for diffusion-dpo, T = sampling.num_steps from the config (10), one torch thread per worker.

Memory, all measured in the worker's first repeat:

  peak RSS delta    VmHWM over the warm-up + timed steps minus VmRSS right after setup (the peak is reset
                    there by writing 5 to /proc/self/clear_refs; where that is not possible, ru_maxrss,
                    which includes the setup's own peak). Includes what the first step creates (AdamW
                    state, the reward model loaded on first use, lazy imports, gradients).
  step RSS delta    the same over the timed steps only, from VmRSS after the warm-up (peak reset there):
                    what a steady-state step adds. Before each baseline the worker runs gc and glibc's
                    malloc_trim(0), so memory freed earlier goes back to the OS instead of hiding the
                    steps' peak in the heap (malloc is otherwise left alone: a 64 KiB
                    MALLOC_MMAP_THRESHOLD_ made these steps 1.7x slower). RSS moves in pages and with
                    the allocator, so small differences in it mean little; the next two are exact.
  saved for bwd     exact bytes of the tensors autograd holds for backward, from
                    `torch.autograd.graph.saved_tensors_hooks` on one extra step: storages de-duplicated by
                    data_ptr, the peak over the step of those alive at once (a trainer that runs several
                    forward/backward passes per step counts its largest), parameters and buffers of every
                    nn.Module excluded (they are not activations). Inside a checkpointed region
                    torch's checkpoint installs its own hooks: those tensors are not kept (they are
                    recomputed in backward), so they are not counted; the checkpoints' inputs are.
  peak tensor       peak of allocated CPU tensor memory during that extra step, above the level at its
                    start, from the memory events of `torch.profiler` (profile_memory=True): activations,
                    the activations recomputed in backward under checkpointing, gradients, temporaries.
                    With --device cuda: the peak of allocated CUDA memory over that step above its start
                    (torch.cuda.max_memory_allocated), and a "peak CUDA MiB" column: the peak over the first
                    repeat's warm-up + timed steps, weights included.

    python bench/diffusion_step.py                                  # built-in tiny-digits / tiny-digits-flow
    python bench/diffusion_step.py --model /tmp/init/tiny-digits --flow-model /tmp/init/tiny-digits-flow
    python bench/diffusion_step.py --only reward-backprop --steps 3 --json rb.json
    python bench/diffusion_step.py --prompts 8 --images-per-prompt 8  # the trainers' own batch (slow on CPU)

(/tmp/init from `python recipes/tiny-digits/make_init.py /tmp/init`: the same networks, random weights.)
images/s = images per step / step seconds (median over the timed steps): sampled images for ddpo, flow-grpo
and reward-backprop, chosen + rejected images for diffusion-dpo. Ratios "off / on" compare reward backprop
without gradient checkpointing (the peer) with rlgen's default (checkpointing on).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Shared with the LM benchmarks (it also sets the offline environment before torch loads).
import bench_common as common  # noqa: E402
from bench_common import fmt, median  # noqa: E402

import torch  # noqa: E402

ALGORITHMS = ("ddpo", "flow-grpo", "reward-backprop", "diffusion-dpo")
MIB = 2**20


# --------------------------------------------------------------------------- configurations

def configurations(args) -> list[dict]:
    """The measured configurations, in run order. K for 'all steps' is given as "all" and resolved by the
    worker from the trainer's config (sampling.num_steps)."""
    chosen = set(args.only)
    out = []
    if "ddpo" in chosen:
        out.append({"name": "ddpo", "algorithm": "ddpo", "family": "ddim"})
    if "flow-grpo" in chosen:
        out.append({"name": "flow-grpo", "algorithm": "flow-grpo", "family": "flow"})
    if "reward-backprop" in chosen:
        for k in args.backprop_k:
            for ckpt in (True, False):
                out.append({"name": f"reward-backprop K={k}" + ("" if ckpt else " no-ckpt"), "algorithm": "reward-backprop",
                            "family": "ddim", "backprop_steps": k, "checkpointing": ckpt})
    if "diffusion-dpo" in chosen:
        out.append({"name": "diffusion-dpo", "algorithm": "diffusion-dpo", "family": "ddim"})
    return out


def config_sets(args, spec: dict, num_steps: int | None) -> list[str]:
    """--set assignments for one configuration (on top of the algorithm preset and model defaults)."""
    p, g = args.prompts, args.images_per_prompt
    sets = ["run.eval_every=0", "run.save_every=0", "run.threads=0", "data.eval_samples=0"]
    algo = spec["algorithm"]
    if algo in ("ddpo", "flow-grpo"):
        sets += [f"rollout.prompts_per_step={p}", f"rollout.num_generations={g}", f"rollout.batch_size={p * g}",
                 f"algorithm.train_batch_size={p * g}"]
        if algo == "flow-grpo":
            sets.append(f"algorithm.beta={args.kl_beta}")
    elif algo == "reward-backprop":
        sets += [f"rollout.prompts_per_step={p}", f"rollout.num_generations={g}",
                 f"algorithm.backprop_steps={num_steps if spec['backprop_steps'] == 'all' else spec['backprop_steps']}",
                 f"algorithm.gradient_checkpointing={'true' if spec['checkpointing'] else 'false'}",
                 "algorithm.backprop_strategy=fixed"]
    elif algo == "diffusion-dpo":
        sets += [f"algorithm.batch_size={args.dpo_pairs}"]
    if num_steps and algo != "diffusion-dpo":
        sets.append(f"sampling.num_steps={num_steps}")
    return sets


# --------------------------------------------------------------------------- memory probes (worker side)

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> int | None:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Give the heap's free memory back to the OS (glibc); False where there is no malloc_trim."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


class RssProbe:
    """Peak RSS above two baselines: right after setup (everything the steps add: AdamW state, the reward
    model loaded on first use, gradients, activations) and after the warm-up steps (the steady state of a
    timed step). Each baseline is read after gc and malloc_trim, with the peak reset there (VmHWM); without
    /proc/self/clear_refs the peak is ru_maxrss (which includes the setup's own peak) for both."""

    def __init__(self):
        self.trimmed = self._settle()
        self.after_setup = rss_bytes()
        self.hwm = reset_peak_rss() and hwm_bytes() is not None
        self.warmup_peak = None
        self.steady = None

    @staticmethod
    def _settle() -> bool:
        gc.collect()
        return malloc_trim()

    def peak(self) -> int | None:
        return hwm_bytes() if self.hwm else ru_maxrss_bytes()

    def mark_steady(self) -> None:
        """Called after the warm-up steps, before the timed ones."""
        self.warmup_peak = self.peak()
        self._settle()
        self.steady = rss_bytes()
        if self.hwm:
            reset_peak_rss()

    def finish(self) -> dict:
        steps_peak = self.peak()
        if self.steady is None:  # no warm-up: the timed steps start right after setup
            self.steady = self.after_setup
        overall = max(p for p in (self.warmup_peak, steps_peak) if p is not None) if steps_peak is not None else None

        def delta(peak, base):
            return None if peak is None or base is None else peak - base

        return {"rss_method": "VmHWM, reset at each baseline" if self.hwm else "ru_maxrss", "malloc_trim": self.trimmed,
                "rss_after_setup_bytes": self.after_setup, "rss_after_warmup_bytes": self.steady,
                "peak_rss_bytes": overall, "ru_maxrss_bytes": ru_maxrss_bytes(), "rss_after_steps_bytes": rss_bytes(),
                "peak_rss_delta_bytes": delta(overall, self.after_setup),
                "step_peak_rss_delta_bytes": delta(steps_peak, self.steady)}


class _Held:
    """What the pack hook hands autograd: its lifetime is the saved tensor's time in the graph."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Bytes of the storages autograd keeps for backward, de-duplicated by data_ptr: the peak over time of
    those alive at once, and how many tensors were packed. Storages in `excluded` (parameters, buffers) are
    counted apart."""

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, references]
        self.current = 0
        self.peak = 0
        self.packed = 0
        self.param_refs = 0
        self.param_bytes = 0
        self._params_seen: set[int] = set()

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def pack(self, tensor):
        held = _Held(tensor)
        try:
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
            return held
        self.packed += 1
        if ptr in self.excluded:
            self.param_refs += 1
            if ptr not in self._params_seen:
                self._params_seen.add(ptr)
                self.param_bytes += nbytes
            return held
        if ptr == 0 or nbytes == 0:
            return held
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(held, self._release, ptr)
        return held

    @staticmethod
    def unpack(held):
        return held.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def module_storage_ptrs() -> set[int]:
    """data_ptrs of the parameters and buffers of every live nn.Module (the model, its reference copy, the
    reward model ...)."""
    ptrs = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module):
            for tensor in list(obj.parameters(recurse=False)) + list(obj.buffers(recurse=False)):
                if tensor is not None:
                    try:
                        ptrs.add(tensor.untyped_storage().data_ptr())
                    except (RuntimeError, NotImplementedError):
                        pass
    ptrs.discard(0)
    return ptrs


def profiler_peak_bytes(prof) -> int | None:
    """Peak of allocated CPU tensor memory over a profiled region, above the level at its start: the running
    sum of the profiler's memory events (allocations +, frees -) in time order."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    except AttributeError:  # a profiler without kineto results
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------- image pairs for diffusion-dpo

def make_image_pairs(model_path: str, reward: str, out_dir: str, images_per_prompt: int, num_steps: int, seed: int,
                     device: str) -> dict:
    """Sample `images_per_prompt` images for each of the digits task's training prompts from the model
    (deterministic DDIM), score them with `reward`, pair the best and the worst of each prompt; PNGs and
    pairs.jsonl (paths relative to it) in out_dir. Returns {"path", "pairs", "images", "seconds"}."""
    import rlgen

    started = time.perf_counter()
    samples_path = os.path.join(out_dir, "samples.jsonl")
    samples = rlgen.sample(model_path, task="digits", split="train", n=images_per_prompt, num_steps=num_steps,
                           eta=0.0, seed=seed, out=samples_path, image_dir=os.path.join(out_dir, "img"), device=device)
    with open(samples_path, "w") as fh:
        for sample in samples:
            fh.write(json.dumps(sample) + "\n")
    pairs = rlgen.pairs(rlgen.score(samples_path, [reward], device=device), mode="best-worst", field="reward", source=samples_path,
                        out=os.path.join(out_dir, "pairs.jsonl"))
    if not pairs:
        raise RuntimeError(f"no image pairs: every prompt's {images_per_prompt} images got the same '{reward}' score")
    path = os.path.join(out_dir, "pairs.jsonl")
    with open(path, "w") as fh:
        for pair in pairs:
            fh.write(json.dumps({k: v for k, v in pair.items() if not k.startswith("_")}) + "\n")
    gc.collect()
    return {"path": path, "pairs": len(pairs), "images": len(samples), "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- worker: one configuration

def build_trainer(job: dict, run_dir: str):
    import rlgen

    flags = {"model.path": job["model"], "run.out": run_dir, "run.steps": 10**6, "run.seed": job["seed"],
             "rewards": [job["reward"]], "data.path": job.get("data_path"), "run.device": job["device"]}
    return rlgen.build_trainer(job["algorithm"], None, sets=job["sets"], **flags)


def images_per_step(trainer, algorithm: str) -> int:
    c = trainer.config
    if algorithm in ("ddpo", "flow-grpo", "reward-backprop"):
        return c.rollout.prompts_per_step * c.rollout.num_generations
    return 2 * c.algorithm.batch_size  # diffusion-dpo: chosen + rejected


def settings_of(trainer, algorithm: str) -> dict:
    c = trainer.config
    out = {"model": str(trainer.model.path), "family": trainer.model.family,
           "denoiser_params": sum(p.numel() for p in trainer.model.denoiser.parameters()),
           "trained_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
           "lr": c.optim.lr}
    if algorithm != "diffusion-dpo":
        out.update(num_steps=c.sampling.num_steps, eta=c.sampling.eta, noise_level=c.sampling.noise_level,
                   guidance_scale=c.sampling.guidance_scale, rewards=[s.name for s in c.rewards])
    a = c.algorithm
    if algorithm in ("ddpo", "flow-grpo"):
        out.update(advantage=a.advantage, beta=a.beta, trained_steps=len(trainer.train_steps),
                   train_batch_size=a.train_batch_size, shuffle_timesteps=a.shuffle_timesteps)
    elif algorithm == "reward-backprop":
        out.update(backprop_steps=a.backprop_steps, gradient_checkpointing=a.gradient_checkpointing)
    else:
        out.update(beta=a.beta, batch_pairs=a.batch_size, pairs_in_data=len(trainer.pairs))
    return out


def run_one_step(trainer) -> tuple[float, dict]:
    trainer.step += 1  # as Trainer.fit does before each train_step
    started = time.perf_counter()
    metrics = trainer.train_step()
    common.synchronize(trainer.device)
    return time.perf_counter() - started, metrics


def instrumented_step(trainer) -> dict:
    """One more step under the saved-tensor meter and the profiler's memory events (on CUDA: the peak of
    allocated CUDA memory above the level at the step's start instead of the profiler's CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    meter = SavedTensorMeter(module_storage_ptrs())
    if trainer.device.type == "cuda":
        common.reset_peak_memory(trainer.device)
        start = torch.cuda.memory_allocated(trainer.device)
        with meter.hooks():
            seconds, _ = run_one_step(trainer)
        peak = torch.cuda.max_memory_allocated(trainer.device) - start
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with meter.hooks():
                seconds, _ = run_one_step(trainer)
        peak = profiler_peak_bytes(prof)
    gc.collect()
    return {"saved_bytes": meter.peak, "saved_tensors": meter.packed, "saved_left_after_step": meter.current,
            "saved_param_refs": meter.param_refs, "saved_param_bytes": meter.param_bytes,
            "peak_tensor_bytes": peak, "instrumented_step_s": seconds}


def worker(job: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    out: dict = {"name": job["name"], "algorithm": job["algorithm"], "sets": job["sets"], "threads": torch.get_num_threads(),
                 "loadavg_before": common.loadavg()}
    if job["algorithm"] == "reward-backprop":
        out.update(k_label=job["backprop_steps"], checkpointing=job["checkpointing"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlgen-diffusion-bench-") as tmp:
        if job["algorithm"] == "diffusion-dpo":
            out["pairs"] = make_image_pairs(job["model"], job["reward"], os.path.join(tmp, "pairs"), job["pair_images"],
                                            job["pair_steps"], job["seed"], job["device"])
            job = {**job, "data_path": out["pairs"]["path"]}
        steps, per_repeat, setup_s = [], [], []
        for r in range(job["repeats"]):
            gc.collect()
            t0 = time.perf_counter()
            trainer = build_trainer(job, os.path.join(tmp, f"run{r}"))
            trainer.setup()
            setup_s.append(time.perf_counter() - t0)
            n_images = images_per_step(trainer, job["algorithm"])
            if r == 0:
                out["settings"] = settings_of(trainer, job["algorithm"])
                out["images_per_step"] = n_images
                rss = RssProbe()
                common.reset_peak_memory(trainer.device)
            mine = []
            for k in range(job["warmup"] + job["steps"]):
                if r == 0 and k == job["warmup"]:
                    rss.mark_steady()
                seconds, metrics = run_one_step(trainer)
                if k >= job["warmup"]:
                    mine.append({"seconds": seconds, "images": n_images,
                                 **{key: float(metrics[key]) for key in ("loss", "reward", "kl") if key in metrics}})
            steps += mine
            per_repeat.append(median([s["seconds"] for s in mine]))
            if r == 0:
                out.update(rss.finish())
                out["cuda_peak_mib"] = common.peak_memory_mib(trainer.device)  # warm-up + timed steps, weights included
                out.update(instrumented_step(trainer))
            del trainer
        out.update(steps=steps, per_repeat_step_s=per_repeat, setup_s=setup_s)
    out["step_s"] = median([s["seconds"] for s in steps])
    out["images_per_s"] = median([s["images"] / s["seconds"] for s in steps])
    out["min_step_s"] = min(s["seconds"] for s in steps)
    out["max_step_s"] = max(s["seconds"] for s in steps)
    out["wall_s"] = time.perf_counter() - started
    out["loadavg_after"] = common.loadavg()
    return out


def run_worker(job: dict, timeout: float | None) -> dict:
    """One configuration in a fresh Python process; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="rlgen-diffusion-bench-job-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as fh:
            json.dump(job, fh)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job_path, out_path],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": job["name"], "algorithm": job["algorithm"], "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.isfile(out_path):
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            return {"name": job["name"], "algorithm": job["algorithm"], "error": f"worker exited with {proc.returncode}:\n{tail}"}
        with open(out_path) as fh:
            out = json.load(fh)
        out["process_s"] = time.perf_counter() - started
        return out


# --------------------------------------------------------------------------- command line and output

def parse_args(argv=None):
    p = common.new_parser(__doc__)
    p.add_argument("--model", default="tiny-digits",
                   help="DDIM pipeline for ddpo, reward-backprop and diffusion-dpo: built-in name or directory (default: tiny-digits)")
    p.add_argument("--flow-model", default="tiny-digits-flow",
                   help="flow-matching pipeline for flow-grpo (default: tiny-digits-flow)")
    p.add_argument("--reward", default="digit-classifier",
                   help="reward (differentiable for reward-backprop; also scores diffusion-dpo's pairs) (default: digit-classifier)")
    p.add_argument("--only", default=",".join(ALGORITHMS), metavar="ALGO[,ALGO...]",
                   help=f"comma-separated subset of {', '.join(ALGORITHMS)} (default: all)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and repeat (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--repeats", type=int, default=2, help="fresh trainers per configuration, in the same worker (default: 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every worker (default: 1; 0 = torch's default). These steps are "
                        "thousands of tiny ops: with 2 threads on 2 busy cores one step took 15.6 s instead of 0.18 s")
    p.add_argument("--seed", type=int, default=0)
    common.add_device_arg(p)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (default: 2; the trainers' default is 8)")
    p.add_argument("--images-per-prompt", type=int, default=4,
                   help="images per prompt (default: 4; ddpo / flow-grpo default to 8, reward-backprop to 4)")
    p.add_argument("--num-steps", type=int, default=0,
                   help="sampling.num_steps T, also K of 'K=all' (default: 0 = the config's value, 10 unless the model "
                        "recommends another)")
    p.add_argument("--backprop-k", default="1,all", metavar="K[,K...]",
                   help="reward-backprop's K values, each run with checkpointing on and off: numbers or 'all' (= T) "
                        "(default: 1,all)")
    p.add_argument("--kl-beta", type=float, default=0.04, help="flow-grpo's KL coefficient (default: 0.04, its preset)")
    p.add_argument("--dpo-pairs", type=int, default=8, help="pairs per diffusion-dpo step (default: 8; its config default is 32)")
    p.add_argument("--pair-images", type=int, default=4,
                   help="images sampled per training prompt to make diffusion-dpo's pairs (default: 4; 20 prompts)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker (default: 900)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse_suppress())
    args = p.parse_args(argv)
    if args.worker:
        return args
    for name in ("steps", "repeats", "prompts", "images_per_prompt", "dpo_pairs", "pair_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.num_steps < 0 or args.threads < 0:
        p.error("--warmup, --num-steps and --threads must be >= 0")
    if args.kl_beta <= 0:
        p.error("--kl-beta must be > 0 (flow-grpo is measured with its KL term)")
    args.backprop_k = [k.strip() for k in args.backprop_k.split(",") if k.strip()]
    if not args.backprop_k or any(k != "all" and not (k.isdigit() and int(k) >= 1) for k in args.backprop_k):
        p.error("--backprop-k: a comma-separated list of numbers >= 1 or 'all'")
    if args.num_steps and any(k != "all" and int(k) > args.num_steps for k in args.backprop_k):
        p.error("--backprop-k: K cannot exceed --num-steps")
    args.only = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in args.only if a not in ALGORITHMS]
    if unknown or not args.only:
        p.error(f"--only: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(ALGORITHMS)}")
    return args


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def resolve_pipeline(name: str, option: str) -> str:
    from rlgen.api import RlgenError, resolve_pipeline_path

    try:
        return str(resolve_pipeline_path(name).resolve())
    except RlgenError as exc:
        sys.exit(f"error: {option}: {exc}\n"
                 "hint: pass --model DIR/tiny-digits --flow-model DIR/tiny-digits-flow with the random-init pipelines from\n"
                 "      python recipes/tiny-digits/make_init.py DIR")


def mib(value) -> float | None:
    return None if value is None else value / MIB


def ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def checkpointing_rows(results: list[dict]) -> list[dict]:
    """Reward backprop with checkpointing on and off, per K: the measurements and off / on ratios."""
    pairs: dict[str, dict] = {}
    for r in results:
        if "error" not in r and r["algorithm"] == "reward-backprop":
            pairs.setdefault(r["k_label"], {})["on" if r["checkpointing"] else "off"] = r
    rows = []
    for k, both in pairs.items():
        on, off = both.get("on"), both.get("off")
        if not on or not off:
            continue
        rows.append({
            "K": on["settings"]["backprop_steps"], "K_label": "all" if k == "all" else k,
            "num_steps": on["settings"]["num_steps"],
            "step_s": {"on": on["step_s"], "off": off["step_s"]},
            "saved_bytes": {"on": on["saved_bytes"], "off": off["saved_bytes"]},
            "peak_tensor_bytes": {"on": on["peak_tensor_bytes"], "off": off["peak_tensor_bytes"]},
            "peak_rss_delta_bytes": {"on": on["peak_rss_delta_bytes"], "off": off["peak_rss_delta_bytes"]},
            "step_peak_rss_delta_bytes": {"on": on["step_peak_rss_delta_bytes"], "off": off["step_peak_rss_delta_bytes"]},
            "ratio_off_on": {
                "saved_bytes": ratio(off["saved_bytes"], on["saved_bytes"]),
                "peak_tensor_bytes": ratio(off["peak_tensor_bytes"], on["peak_tensor_bytes"]),
                "peak_rss_delta_bytes": ratio(off["peak_rss_delta_bytes"], on["peak_rss_delta_bytes"]),
                "step_peak_rss_delta_bytes": ratio(off["step_peak_rss_delta_bytes"], on["step_peak_rss_delta_bytes"]),
                "step_s": ratio(off["step_s"], on["step_s"]),
            },
        })
    return rows


def print_table(result: dict) -> None:
    c, m = result["config"], result["machine"]
    names = {r["algorithm"] for r in result["results"]}
    models = ([c["model"]] if names - {"flow-grpo"} else []) + ([c["flow_model"]] if "flow-grpo" in names else [])
    dpo = f" (diffusion-dpo: {c['dpo_pairs']} pairs)" if "diffusion-dpo" in names else ""
    print(f"Diffusion training step: {c['prompts']} prompts x {c['images_per_prompt']} images per step{dpo}, "
          f"reward {c['reward']}, fp32 {c['device']}, {m['torch_threads_workers']} torch thread(s) per worker; "
          f"model{'s' if len(models) > 1 else ''} {' / '.join(models)}")
    print(f"{c['steps']} timed steps after {c['warmup']} warm-up, x{c['repeats']} repeats (fresh trainers, one worker per "
          f"row); medians. {common.load_text(result)}")
    print()
    cuda = c["device"].startswith("cuda")
    header = ("| algorithm | T | images/step | sec/step (median) | images/s | saved-for-backward MiB | peak tensor MiB "
              "| peak RSS delta MiB | step RSS delta MiB |" + (" peak CUDA MiB |" if cuda else ""))
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in result["results"]:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'].splitlines()[0]} | | | | | | | |")
            continue
        t = r["settings"].get("num_steps", "-")
        print(f"| {r['name']} | {t} | {r['images_per_step']} | {fmt(r['step_s'], '.3f')} | {fmt(r['images_per_s'], '.1f')} | "
              f"{fmt(mib(r['saved_bytes']), '.2f')} | {fmt(mib(r['peak_tensor_bytes']), '.2f')} | "
              f"{fmt(mib(r['peak_rss_delta_bytes']), '.1f')} | {fmt(mib(r['step_peak_rss_delta_bytes']), '.1f')} |"
              + (f" {fmt(r.get('cuda_peak_mib'), '.1f')} |" if cuda else ""))
    rows = result.get("checkpointing") or []
    if rows:
        print()
        print("Reward backprop, gradient checkpointing on (rlgen's default) vs off (the peer); ratio = off / on")
        print()
        head = ("| K | saved MiB on / off | ratio | peak tensor MiB on / off | ratio | step RSS delta MiB on / off | ratio "
                "| sec/step on / off | ratio |")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for row in rows:
            k = f"{row['K']} (all)" if row["K_label"] == "all" else str(row["K"])
            cells = []
            for key, spec in (("saved_bytes", ".2f"), ("peak_tensor_bytes", ".2f"), ("step_peak_rss_delta_bytes", ".1f")):
                cells.append(f"{fmt(mib(row[key]['on']), spec)} / {fmt(mib(row[key]['off']), spec)}")
                rr = row["ratio_off_on"][key]
                cells.append("-" if rr is None else f"x{rr:.2f}")
            cells.append(f"{fmt(row['step_s']['on'], '.3f')} / {fmt(row['step_s']['off'], '.3f')}")
            rr = row["ratio_off_on"]["step_s"]
            cells.append("-" if rr is None else f"x{rr:.2f}")
            print(f"| {k} | " + " | ".join(cells) + " |")
        print("(sec/step ratio < 1: checkpointing is slower, the price of recomputing each step in backward)")
    for r in result["results"]:
        if "error" not in r:
            extra = f"; pairs: {r['pairs']['pairs']} from {r['pairs']['images']} images" if "pairs" in r else ""
            print(f"  {r['name']}: per-repeat median s/step " + ", ".join(fmt(x, ".3f") for x in r["per_repeat_step_s"])
                  + f"; min/max {fmt(r['min_step_s'], '.3f')}/{fmt(r['max_step_s'], '.3f')}; setup {fmt(r['setup_s'][0], '.2f')} s"
                  + f"; RSS after setup {fmt(mib(r['rss_after_setup_bytes']), '.0f')} MiB ({r['rss_method']}); "
                  + f"load {r['loadavg_before']} -> {r['loadavg_after']}{extra}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        with open(args.worker[0]) as fh:
            job = json.load(fh)
        out = worker(job)
        with open(args.worker[1], "w") as fh:
            json.dump(out, fh, default=str)
        return out

    device = common.resolve_bench_device(args.device)
    needs_ddim = any(a in args.only for a in ("ddpo", "reward-backprop", "diffusion-dpo"))
    model = resolve_pipeline(args.model, "--model") if needs_ddim else args.model
    flow_model = resolve_pipeline(args.flow_model, "--flow-model") if "flow-grpo" in args.only else args.flow_model
    num_steps = args.num_steps or None
    if num_steps is None and "reward-backprop" in args.only:
        num_steps = resolved_num_steps(model)  # K = all needs T before the worker runs
    threads = args.threads or torch.get_num_threads()
    load_before = common.note_load(threads)
    jobs = []
    for spec in configurations(args):
        jobs.append({**spec, "model": flow_model if spec["family"] == "flow" else model, "reward": args.reward,
                     "sets": config_sets(args, spec, num_steps if spec.get("backprop_steps") or args.num_steps else None),
                     "seed": args.seed, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
                     "repeats": args.repeats, "pair_images": args.pair_images, "pair_steps": num_steps or 10,
                     "device": str(device)})
    wall = time.perf_counter()
    results = []
    for n, job in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job['name']}: {args.warmup} warm-up + {args.steps} timed steps x{args.repeats} ...",
              file=sys.stderr)
        out = run_worker(job, args.timeout)
        if "error" in out:
            print(f"error: {job['name']}: {out['error']}", file=sys.stderr)
        results.append(out)
    wall = time.perf_counter() - wall
    result = {
        "config": {"model": args.model, "model_path": model, "flow_model": args.flow_model, "flow_model_path": flow_model,
                   "reward": args.reward, "prompts": args.prompts, "images_per_prompt": args.images_per_prompt,
                   "num_steps": num_steps, "kl_beta": args.kl_beta, "dpo_pairs": args.dpo_pairs,
                   "pair_images": args.pair_images, "backprop_k": args.backprop_k, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "seed": args.seed, "dtype": "float32", "device": str(device), "only": args.only},
        "machine": {**common.machine_info(threads, load_before, wall), "torch_threads_workers": threads},
        "versions": versions(),
        "results": results,
        "checkpointing": checkpointing_rows(results),
    }
    print_table(result)
    common.write_json(args.json, result)
    if any("error" in r for r in results):
        sys.exit(1)
    return result


def resolved_num_steps(model_path: str) -> int:
    """sampling.num_steps of reward-backprop for this model through the normal config path (preset, the
    model's recommended settings)."""
    import rlgen

    return rlgen.load_config("reward-backprop", model=model_path).sampling.num_steps


def versions() -> dict:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "rlgen"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    return out


if __name__ == "__main__":
    main()

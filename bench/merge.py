#!/usr/bin/env python
"""Time and peak memory of `rlgen merge` against mergekit's `mergekit-yaml` on three ~0.5B bf16 checkpoints.

The models (made once, cached in --work): a random Llama base (hidden 1024, intermediate 4096, 26 layers,
16 heads, vocabulary 32000, untied lm_head: 0.50B parameters, 1.0 GB in bf16) and three "fine-tunes", each
the base plus Gaussian noise (std --noise) on every tensor. They are written tensor by tensor with rlgen's
streaming writer as sharded Hugging Face directories, so making them never holds a whole model in memory.

Each configuration runs in a child process, --repeats times (interleaved: rlgen, mergekit, rlgen, ...),
reporting the median wall time and the median peak RSS of the child (ru_maxrss from os.wait4). The two
tools read the same YAML (mergekit's schema, which `rlgen merge --config` accepts):

    ties       density 0.5, weight 1 for each model, normalize true, lambda 1
    dare-ties  density 0.5, weight 1, normalize true, lambda 1, rescale true (random drop: results differ)

with `dtype: float32` (mergekit computes in float32, as rlgen always does; --mergekit-dtype bfloat16 makes it
compute in bf16) and `out_dtype: bfloat16`. With both tools run, rlgen's ties output is compared with
mergekit's (max abs difference over all tensors). mergekit: on PATH, else /work/mk-venv/bin/mergekit-yaml,
or --mergekit PATH (`--mergekit none`: rlgen only). Both tools get the same torch thread count (--threads,
default torch's: mergekit by -j, rlgen by OMP_NUM_THREADS); the inputs are in the page cache for both (read
once while making them, then by every run).

    python bench/merge.py --work /tmp/merge-bench                  # the full size (writes ~4 GB + 1 GB per output)
    python bench/merge.py --work /tmp/merge-bench --json merge.json --repeats 5
    python bench/merge.py --work /tmp/mb-tiny --tiny --repeats 1 --mergekit none   # seconds, for tests
    python bench/merge.py --work /tmp/merge-bench --device cuda    # rlgen --device cuda, mergekit --cuda

With --device cuda (or cuda:N) both tools merge on the GPU (rlgen streams host -> device -> host per tensor;
mergekit gets --cuda) and each child also reports its peak allocated CUDA memory
(torch.cuda.max_memory_allocated, read at the child's exit by a small shim that runs the tool's entry point).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import loadavg, median  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "full": dict(hidden=1024, intermediate=4096, layers=26, heads=16, vocab=32000),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=256),
}
METHODS = {"ties": "ties", "dare-ties": "dare_ties"}  # rlgen name -> mergekit name
MERGEKIT_FALLBACK = Path("/work/mk-venv/bin/mergekit-yaml")


# --------------------------------------------------------------------------- models

def llama_tensors(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a LlamaForCausalLM state dict, in the order transformers builds it."""
    h, inter, vocab = spec["hidden"], spec["intermediate"], spec["vocab"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def _generator(name: str, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{k}:{name}".encode()))


def base_tensor(name: str, shape) -> torch.Tensor:
    if len(shape) == 1:  # norms start at one
        return torch.ones(shape)
    return torch.randn(shape, generator=_generator(name, 0)) * 0.02


def make_models(work: Path, spec: dict, noise: float, shard_size: int, count: int = 3) -> dict[str, Path]:
    """base + `count` fine-tunes under work/models (reused when their recorded spec matches)."""
    from transformers import LlamaConfig

    from rlgen.api import ShardedWriter

    root = work / "models"
    names = ["base"] + [f"ft{k}" for k in range(1, count + 1)]
    dirs = {n: root / n for n in names}
    record = {"spec": spec, "noise": noise, "shard_size": shard_size, "dtype": "bfloat16"}
    if all((d / "bench_spec.json").is_file() and json.loads((d / "bench_spec.json").read_text()) == record
           for d in dirs.values()):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    entries = llama_tensors(spec)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["heads"], tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    writers = {}
    for name, d in dirs.items():
        d.mkdir(parents=True)
        config.to_json_file(str(d / "config.json"))
        writers[name] = ShardedWriter(d, [(n, torch.bfloat16, s) for n, s in entries], max_shard_size=shard_size)
    print(f"making {len(dirs)} models of {sum(_numel(s) for _, s in entries) / 1e9:.2f}B parameters in {root}",
          file=sys.stderr)
    for tensor_name, shape in entries:  # one tensor of every model at a time
        base = base_tensor(tensor_name, shape)
        writers["base"].write(tensor_name, base.to(torch.bfloat16))
        for k in range(1, count + 1):
            tuned = base + noise * torch.randn(shape, generator=_generator(tensor_name, k))
            writers[f"ft{k}"].write(tensor_name, tuned.to(torch.bfloat16))
    for name, d in dirs.items():
        writers[name].finish()
        (d / "bench_spec.json").write_text(json.dumps(record))
    return dirs


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_yaml(path: Path, method: str, dirs: dict[str, Path], density: float, compute_dtype: str) -> Path:
    models = "".join(f"  - model: {dirs[n]}\n    parameters: {{weight: 1.0, density: {density}}}\n"
                     for n in dirs if n != "base")
    path.write_text(f"merge_method: {METHODS[method]}\nbase_model: {dirs['base']}\nmodels:\n{models}"
                    f"parameters: {{normalize: true, lambda: 1.0}}\ndtype: {compute_dtype}\nout_dtype: bfloat16\n")
    return path


# --------------------------------------------------------------------------- runs

# Runs one command and records its wall time and ru_maxrss. It runs in a fresh `python -S` process: the
# kernel folds the memory image a child was forked from into the child's ru_maxrss (the old mm's high-water
# mark at exec), so forking straight from this torch-laden process would add its peak to every reading.
WRAPPER = r"""
import json, os, sys, time
result_file, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result_file, "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, fh)
"""


# Runs a Python entry point (`-m MODULE` or a console script's path) and, at exit, writes the process's
# peak allocated CUDA memory to $BENCH_CUDA_PEAK_FILE: how a child's GPU peak is read (--device cuda).
CUDA_PEAK_SHIM = r"""
import atexit, json, os, runpy, sys
def _write_peak():
    torch = sys.modules.get("torch")
    used = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if used else 0
    with open(os.environ["BENCH_CUDA_PEAK_FILE"], "w") as fh:
        json.dump({"cuda_peak_bytes": peak}, fh)
atexit.register(_write_peak)
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(cmd: list[str], env: dict, scratch: Path, cuda: bool = False) -> dict:
    """Run a command; its wall time, peak RSS (MB), stdout and, with `cuda` (the command runs under
    CUDA_PEAK_SHIM), its peak allocated CUDA memory (MB). A failure stops the benchmark."""
    record, cuda_record = scratch / "child.json", scratch / "child-cuda.json"
    if cuda:
        env = {**env, "BENCH_CUDA_PEAK_FILE": str(cuda_record)}
    proc = subprocess.run([sys.executable, "-S", "-c", WRAPPER, str(record), *cmd], capture_output=True, text=True,
                          env=env)
    measured = json.loads(record.read_text())
    record.unlink()
    if proc.returncode != 0 or measured["rc"] != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({measured['rc']}):\n{proc.stderr[-3000:]}")
    out = {"wall_s": round(measured["wall_s"], 3), "peak_rss_mb": round(measured["maxrss_kb"] / 1024, 1),
           "stdout": proc.stdout}
    if cuda:
        out["cuda_peak_mb"] = round(json.loads(cuda_record.read_text())["cuda_peak_bytes"] / 2**20, 1)
        cuda_record.unlink()
    return out


def python_of(script: str) -> str:
    """The interpreter of a console script (its #! line), so that the shim runs it in its own environment."""
    with open(script, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") and "python" in first else sys.executable


def rlgen_cmd(config: Path, out: Path, seed: int, device: str) -> list[str]:
    args = ["merge", "--config", str(config), "--out", str(out), "--seed", str(seed), "--json", "--quiet", "--device", device]
    if device.startswith("cuda"):
        return [sys.executable, "-c", CUDA_PEAK_SHIM, "-m", "rlgen", *args]
    return [sys.executable, "-m", "rlgen", *args]


def mergekit_cmd(exe: str, config: Path, out: Path, threads: int, seed: int, device: str) -> list[str]:
    args = [str(config), str(out), "-j", str(threads), "--random-seed", str(seed), "--quiet",
            "--no-copy-tokenizer", "--no-write-model-card"]
    if device.startswith("cuda"):
        script = shutil.which(exe) or exe
        return [python_of(script), "-c", CUDA_PEAK_SHIM, script, *args, "--cuda"]
    return [exe, *args]


def find_mergekit(arg: str | None) -> str | None:
    if arg == "none":
        return None
    if arg:
        return arg
    found = shutil.which("mergekit-yaml")
    return found or (str(MERGEKIT_FALLBACK) if MERGEKIT_FALLBACK.is_file() else None)


def compare_ties(a: Path, b: Path, dirs: dict[str, Path], density: float) -> dict:
    """Largest |a - b| over the tensors both outputs have (float32), the names only one has, and how many
    differing elements sit on a tie at TIES' magnitude cut (some model's |delta| equals its k-th largest,
    so which of the equal entries is kept is up to the sort's tie-breaking)."""
    from rlgen.api import SafetensorsCheckpoint as Checkpoint

    left, right = Checkpoint(a), Checkpoint(b)
    base, tuned = Checkpoint(dirs["base"]), [Checkpoint(d) for n, d in dirs.items() if n != "base"]
    worst, differing, not_at_tie, total = 0.0, 0, 0, 0
    common = [n for n in left.names if n in right]
    for name in common:
        diff = (left.tensor(name).float() - right.tensor(name).float()).abs().reshape(-1)
        total += diff.numel()
        if diff.numel() and float(diff.max()) > 0:
            worst = max(worst, float(diff.max()))
            differs = diff > 0
            differing += int(differs.sum())
            at_cut = torch.zeros_like(differs)
            flat_base = base.tensor(name).float().reshape(-1)
            k = int(density * diff.numel())
            for model in tuned:
                magnitude = (model.tensor(name).float().reshape(-1) - flat_base).abs()
                if 0 < k < magnitude.numel():
                    at_cut |= magnitude == torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
                model.release(name)
            not_at_tie += int((differs & ~at_cut).sum())
            base.release(name)
        left.release(name)
        right.release(name)
    only = sorted(set(left.names) ^ set(right.names))
    for checkpoint in (left, right, base, *tuned):
        checkpoint.close()
    return {"max_abs_diff": worst, "elements_differing": differing, "differing_not_at_a_tie": not_at_tie,
            "elements": total, "tensors": len(common), "names_in_one_only": only}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="directory for the models (cached) and the outputs")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (seconds; for tests)")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="ties,dare-ties", help="comma-separated: ties, dare-ties")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.002, help="std of the fine-tunes' noise (base std 0.02)")
    p.add_argument("--input-shard-size", default="400MB", help="shard size of the generated models")
    p.add_argument("--mergekit", help="mergekit-yaml executable ('none': rlgen only)")
    p.add_argument("--mergekit-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the YAML's `dtype` (mergekit's compute dtype; rlgen computes in float32 regardless)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both tools (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N",
                   help="where both tools merge (default: cpu); CUDA: rlgen --device, mergekit --cuda (its current device)")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}")
    return args


def main(argv=None) -> dict:
    from rlgen.api import parse_size

    from bench_common import resolve_bench_device

    args = parse_args(argv)
    device = str(resolve_bench_device(args.device))
    cuda = device.startswith("cuda")
    work = Path(args.work).resolve()
    spec = dict(SIZES["tiny" if args.tiny else "full"])
    if args.layers:
        spec["layers"] = args.layers
    threads = args.threads or torch.get_num_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    dirs = make_models(work, spec, args.noise, parse_size(args.input_shard_size))
    model_bytes = dir_bytes(dirs["ft1"])
    mergekit = find_mergekit(args.mergekit)
    if args.mergekit and args.mergekit != "none" and not Path(mergekit).exists() and not shutil.which(mergekit):
        sys.exit(f"error: --mergekit {mergekit}: not found")
    tools = ["rlgen"] + (["mergekit"] if mergekit else [])
    methods = args.methods.split(",")
    runs = {(tool, m): [] for tool in tools for m in methods}
    outs = work / "out"
    outs.mkdir(exist_ok=True)
    keep = {("rlgen", "ties"), ("mergekit", "ties")}
    for r in range(args.repeats):
        for m in methods:
            config = write_yaml(work / f"{m}.yml", m, dirs, args.density, args.mergekit_dtype)
            for tool in (tools if r % 2 == 0 else list(reversed(tools))):
                out = outs / f"{tool}-{m}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = rlgen_cmd(config, out, args.seed, device) if tool == "rlgen" else \
                    mergekit_cmd(mergekit, config, out, threads, args.seed, device)
                print(f"repeat {r + 1}/{args.repeats}: {tool} {m}", file=sys.stderr)
                result = run_child(cmd, env, work, cuda)
                if tool == "rlgen":
                    summary = json.loads(result["stdout"].strip().splitlines()[-1])
                    result["threads"] = summary["threads"]
                    result["seconds_inside"] = summary["seconds"]
                result.pop("stdout")
                runs[tool, m].append(result)
                if (tool, m) not in keep or r < args.repeats - 1:
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    comparison = None
    if ("mergekit", "ties") in runs and "ties" in methods:
        comparison = compare_ties(outs / "rlgen-ties", outs / "mergekit-ties", dirs, args.density)
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
    result = summarize(args, spec, threads, model_bytes, mergekit, runs, comparison, device)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return result


def summarize(args, spec, threads, model_bytes, mergekit, runs, comparison, device: str) -> dict:
    table = {}
    for (tool, m), rows in runs.items():
        table.setdefault(m, {})[tool] = {"wall_s": median([r["wall_s"] for r in rows]),
                                         "peak_rss_mb": median([r["peak_rss_mb"] for r in rows]),
                                         "cuda_peak_mb": median([r.get("cuda_peak_mb") for r in rows]),
                                         "runs": rows}
    for m, row in table.items():
        if "mergekit" in row:
            row["ratio_wall"] = round(row["rlgen"]["wall_s"] / row["mergekit"]["wall_s"], 3)
            row["ratio_rss"] = round(row["rlgen"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"], 3)
    params = sum(_numel(s) for _, s in llama_tensors(spec))
    rlgen_threads = sorted({r.get("threads") for rows in runs.values() for r in rows if r.get("threads")})
    return {
        "model": {**spec, "params": params, "dtype": "bfloat16", "bytes_on_disk": model_bytes, "noise": args.noise},
        "config": {"repeats": args.repeats, "density": args.density, "mergekit": mergekit,
                   "mergekit_dtype": args.mergekit_dtype, "seed": args.seed, "device": device},
        "threads": {"rlgen": rlgen_threads, "mergekit": threads if mergekit else None},
        "machine": {"cpu_count": os.cpu_count(), "loadavg": loadavg()},
        "results": table,
        "ties_rlgen_vs_mergekit": comparison,
    }


def print_table(result: dict) -> None:
    model = result["model"]
    print(f"3 x {model['params'] / 1e9:.2f}B-parameter bf16 Llama checkpoints ({model['bytes_on_disk'] / 1e6:.0f} MB "
          f"each on disk), median of {result['config']['repeats']}; threads: rlgen {result['threads']['rlgen']}, "
          f"mergekit {result['threads']['mergekit']}")
    header = f"{'method':<10} {'rlgen s':>9} {'mergekit s':>11} {'ratio':>6} {'rlgen MB':>9} {'mergekit MB':>12} {'ratio':>6}"
    print(header)
    print("-" * len(header))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for m, row in result["results"].items():
        rl, mk = row["rlgen"], row.get("mergekit", {})
        print(f"{m:<10} {fmt(rl['wall_s'], '.2f'):>9} {fmt(mk.get('wall_s'), '.2f'):>11} "
              f"{fmt(row.get('ratio_wall'), '.2f'):>6} {fmt(rl['peak_rss_mb'], '.0f'):>9} "
              f"{fmt(mk.get('peak_rss_mb'), '.0f'):>12} {fmt(row.get('ratio_rss'), '.2f'):>6}")
    print("ratios are rlgen / mergekit (< 1: rlgen faster / smaller); peak RSS of the child process (ru_maxrss)")
    if result["config"]["device"].startswith("cuda"):
        print(f"merged on {result['config']['device']}; peak CUDA memory allocated (MB): " + ", ".join(
            f"{m} rlgen {fmt(row['rlgen']['cuda_peak_mb'], '.0f')} / mergekit {fmt(row.get('mergekit', {}).get('cuda_peak_mb'), '.0f')}"
            for m, row in result["results"].items()))
    comparison = result["ties_rlgen_vs_mergekit"]
    if comparison:
        print(f"ties, rlgen vs mergekit: max abs diff {comparison['max_abs_diff']:.3g} over {comparison['tensors']} tensors "
              f"({comparison['elements_differing']} of {comparison['elements']} elements differ, "
              f"{comparison['differing_not_at_a_tie']} of them not at a tie of the magnitude cut)"
              + (f"; only in one: {comparison['names_in_one_only']}" if comparison["names_in_one_only"] else ""))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

"""run.distributed = fsdp (rlgen.training.fsdp): FSDP2 on 2 gloo processes against DDP and one process (same
losses and final weights), world-size independent pickle-free checkpoints (2 -> 1 and 1 -> 2 resume),
bf16-mixed, and the per-rank bytes sharding saves."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen_ok

# A minimal SFT-like trainer (full-sequence cross-entropy on arithmetic records), following the
# data-parallel contract: the same global batch on every rank, a contiguous shard each, a global token count.
WORKER = textwrap.dedent('''
    import json, os, pickle, sys, torch
    from pathlib import Path
    from rlgen.algorithms.sft import SFTConfig
    from rlgen.distributed import shutdown
    from rlgen.events import Events
    from rlgen.training import fsdp
    from rlgen.training.run_dir import RunDir
    from rlgen.training.trainer import Trainer, load_records

    class TinySFT(Trainer):
        supports_distributed = True

        def prepare_data(self):
            self.records = load_records(self.config.data, "train")[:64]

        def batch_tensors(self, batch):
            enc = self.tokenizer([r["prompt"] + r["answer"] for r in batch], return_tensors="pt", padding=True)
            return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

        def train_step(self):
            size = self.config.algorithm.batch_size
            start = (self.step - 1) * size % len(self.records)
            ids, mask = self.batch_tensors(self.dist.shard(self.records[start:start + size]))
            tokens = self.dist.sum(int(mask[:, 1:].sum()))
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (nll * mask[:, 1:]).sum() / tokens
            self.backward(loss)
            norm = self.optimizer_step()
            return {"loss": self.dist.sum(float(loss.detach())), "grad_norm": norm}

    def refuse_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    class RefusingUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse_pickle()

    def run(out, distributed="ddp", precision="fp32", resume=False, reshard_after_forward=True, checkpoint_format="auto"):
        cfg = SFTConfig()
        cfg.model.path = "tiny-arith"
        cfg.data.task = "arithmetic"
        cfg.algorithm.batch_size = 8
        cfg.optim.lr = 1e-3
        cfg.optim.warmup_steps = 0
        cfg.run.out, cfg.run.steps, cfg.run.save_every, cfg.run.threads = out, 3, 2, 1
        cfg.run.distributed, cfg.run.precision = distributed, precision
        cfg.run.reshard_after_forward = reshard_after_forward
        cfg.run.checkpoint_format = checkpoint_format
        if resume:  # nothing in a checkpoint is unpickled
            pickle.load = pickle.loads = torch.load = refuse_pickle
            pickle.Unpickler = RefusingUnpickler
        trainer = TinySFT(cfg, RunDir(out), Events(), resume=resume)
        trainer.fit()
        return trainer

    def state_bytes(trainer):
        """Per-rank bytes with gradients present (fit() ends with them freed)."""
        ids, mask = trainer.batch_tensors(trainer.records[:2])
        trainer.model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
        return fsdp.local_state_bytes(trainer.model, trainer.optimizer)

    root, mode = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    out = {}
    if mode == "one":  # one process: the references
        out["bytes"] = state_bytes(run(str(root / "one")))
        run(str(root / "one-bf16"), precision="bf16-mixed")
    elif mode == "two":
        run(str(root / "ddp"))
        trainer = run(str(root / "fsdp"), "fsdp")
        out["sharded"] = fsdp.is_sharded(trainer.model)
        out["bytes"] = state_bytes(trainer)
        run(str(root / "fsdp-bf16"), "fsdp", "bf16-mixed", reshard_after_forward=False, checkpoint_format="full")
        run(str(root / "one-to-two"), "fsdp", resume=True)
    elif mode == "resume":
        run(str(root / "two-to-one"), resume=True)
    (root / f"{mode}-rank{rank}.json").write_text(json.dumps(out))
    shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, mode: str, processes: int, worker: str = WORKER) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if processes == 1:
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(_free_port()), str(script)]
    proc = subprocess.run([*command, str(tmp_path), mode], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(processes)]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in _rows(run_dir) if "loss" in row]


def _assert_same_weights(a_dir, b_dir, atol: float) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_and_resumes_at_any_world_size(tmp_path):
    one = _launch(tmp_path, "one", 1)[0]
    shutil.copytree(tmp_path / "one", tmp_path / "one-to-two")  # its step-2 checkpoint, resumed by 2 fsdp ranks
    (tmp_path / "one-to-two" / "final").rename(tmp_path / "one-final")
    two = _launch(tmp_path, "two", 2)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "two-to-one")  # the fsdp run's step-2 checkpoint, on 1 process
    shutil.rmtree(tmp_path / "two-to-one" / "final")
    _launch(tmp_path, "resume", 1)

    reference = _losses(tmp_path / "one")
    assert len(reference) == 3
    with pytest.raises(AssertionError):  # the last step moves the weights (else "the same final" says nothing)
        _assert_same_weights(tmp_path / "one-final", tmp_path / "one" / "checkpoints" / "step-2" / "model", atol=1e-5)
    for run in ("ddp", "fsdp"):
        assert _losses(tmp_path / run) == pytest.approx(reference, rel=1e-4)
        _assert_same_weights(tmp_path / run / "final", tmp_path / "one" / "final", atol=1e-5)
    # FSDP checkpoints are sharded (each rank's rows; auto), or with checkpoint_format = full plain HF weights
    # and the single-process optimiser layout; both world-size independent, neither pickled
    fsdp_checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-2"
    assert (fsdp_checkpoint / "shards" / "shards.json").is_file() and not (fsdp_checkpoint / "model").exists()
    assert (tmp_path / "fsdp-bf16" / "checkpoints" / "step-2" / "model" / "model.safetensors").is_file()
    for run in ("fsdp", "fsdp-bf16"):
        assert not list((tmp_path / run).rglob("*.metadata")) and not list((tmp_path / run).rglob("*.pt"))
    _assert_same_weights(tmp_path / "two-to-one" / "final", tmp_path / "fsdp" / "final", atol=1e-5)
    _assert_same_weights(tmp_path / "one-to-two" / "final", tmp_path / "one-final", atol=1e-5)
    assert _losses(tmp_path / "two-to-one") == pytest.approx(_losses(tmp_path / "fsdp"), rel=1e-4)

    # bf16-mixed under FSDP (bf16 gathered weights, fp32 reduction; here with the gathered weights kept from
    # the forward to the backward) tracks the 1-process bf16-mixed run
    assert _losses(tmp_path / "fsdp-bf16") == pytest.approx(_losses(tmp_path / "one-bf16"), rel=2e-2)
    _assert_same_weights(tmp_path / "fsdp-bf16" / "final", tmp_path / "one-bf16" / "final", atol=2e-2)

    # each rank holds half the parameters, gradients and AdamW moments (within one row of padding)
    assert all(rank["sharded"] for rank in two)
    for key in ("params", "grads", "optimizer"):
        for rank in two:
            assert rank["bytes"][key] == pytest.approx(one["bytes"][key] / 2, rel=0.02), key
        assert sum(rank["bytes"][key] for rank in two) == one["bytes"][key]


def test_fsdp_settings_are_documented_run_keys():
    rows = {line.split()[0]: line.split() for line in rlgen_ok("config", "show", "sft").out.splitlines() if line.strip()}
    assert '"ddp"' in rows["run.distributed"] and "fsdp" in " ".join(rows["run.distributed"])
    assert "true" in rows["run.reshard_after_forward"] and "false" in rows["run.cpu_offload"]
    assert '"auto"' in rows["run.checkpoint_format"] and "sharded" in " ".join(rows["run.checkpoint_format"])


def test_fsdp_on_one_process_trains_unsharded(tmp_path):
    # without torchrun there is nothing to shard over: the run is an ordinary one-process run
    plain = tmp_path / "plain"
    rlgen_ok("train", "sft", "--model", "tiny-arith", "--task", "arithmetic", "--steps", "1", "--out", str(plain),
             "--set", "algorithm.batch_size=4", "--set", "run.threads=1")
    sharded = tmp_path / "fsdp"
    rlgen_ok("train", "sft", "--model", "tiny-arith", "--task", "arithmetic", "--steps", "1", "--out", str(sharded),
             "--set", "algorithm.batch_size=4", "--set", "run.threads=1", "--set", "run.distributed=fsdp")
    _assert_same_weights(sharded / "final", plain / "final", atol=0)


def _sft_runs_distributed() -> bool:
    from rlgen.algorithms.sft import SFTTrainer

    return SFTTrainer.supports_distributed


@pytest.mark.slow
@pytest.mark.skipif(not _sft_runs_distributed(), reason="SFTTrainer does not run multi-process yet")
def test_rlgen_train_sft_under_fsdp_matches_one_process(tmp_path):
    # with the held-out evaluation, which every FSDP rank runs (its forward passes gather weights)
    args = ["-m", "rlgen", "train", "sft", "--model", "tiny-arith", "--task", "arithmetic", "--steps", "2",
            "--set", "algorithm.batch_size=4", "--set", "run.threads=1", "--set", "optim.lr=1e-3",
            "--set", "run.eval_every=2", "--set", "data.eval_samples=3", "--set", "algorithm.max_new_tokens=6"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), *args, "--out", str(tmp_path / "fsdp"), "--set", "run.distributed=fsdp",
                          "--set", "model.gradient_checkpointing=true"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    _assert_same_weights(tmp_path / "fsdp" / "final", tmp_path / "one" / "final", atol=1e-5)
    evaluations = [[row["eval/accuracy"] for row in _rows(tmp_path / run) if "eval/accuracy" in row] for run in ("one", "fsdp")]
    assert len(evaluations[0]) == 2 and evaluations[0] == evaluations[1]


@pytest.mark.parametrize("sets, key", [({"run.precision": "fp16-mixed"}, "run.precision"),
                                       ({"model.lora_r": 4}, "model.lora_r"),
                                       ({"algorithm.batch_size": 5}, "algorithm.batch_size"),
                                       ({"algorithm.batch_size": 6, "run.precision": "bf16-mixed"}, None)])
def test_what_fsdp_cannot_run_is_refused_naming_the_key(sets, key):
    from rlgen.algorithms.sft import SFTConfig, SFTTrainer
    from rlgen.distributed import Dist
    from rlgen.errors import RlgenError

    cfg = SFTConfig()
    cfg.run.distributed = "fsdp"
    cfg.algorithm.batch_size = 4
    for name, value in sets.items():
        section, field = name.split(".")
        setattr(getattr(cfg, section), field, value)
    trainer = SFTTrainer(cfg, run_dir=None, reporter=None)
    trainer.dist = Dist(rank=0, world_size=2)  # as under torchrun, without a process group
    assert trainer.fsdp
    if key is None:  # a batch the ranks share evenly, a precision FSDP runs
        trainer.check_fsdp()
        return
    with pytest.raises(RlgenError, match=key):
        trainer.check_fsdp()
    cfg.run.distributed = "ddp"
    assert not trainer.fsdp


def test_the_sharded_units_are_the_blocks_none_inside_another(tmp_path):
    from diffusers import UNet2DConditionModel

    from rlgen.diffusion.testing import build_tiny_text_pipeline
    from rlgen.models.causal_lm import ModelConfig, load_policy
    from rlgen.training.fsdp import blocks_of

    model = load_policy(ModelConfig(path="tiny-arith"))[0]
    assert blocks_of(model) == list(model.model.layers)
    unet = UNet2DConditionModel.from_pretrained(build_tiny_text_pipeline(tmp_path / "pipe") / "unet")
    assert blocks_of(unet) == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    # a model known only by its _no_split_modules: the outermost such modules
    wrapper = torch.nn.Module()
    wrapper.unet = unet
    wrapper._no_split_modules = ["ResnetBlock2D", "CrossAttnUpBlock2D"]
    units = blocks_of(wrapper)
    assert unet.up_blocks[1] in units and not any(m in units for m in unet.up_blocks[1].resnets)
    assert unet.down_blocks[0].resnets[0] in units


@pytest.mark.slow
def test_reward_model_under_fsdp_matches_one_process(tmp_path):
    # the RM's 1-output head shards to an empty piece on rank 1: the weight check and the save must cope
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n"
                             for a in range(10) for b in range(4)))
    common = ["-m", "rlgen", "train", "rm", "--data", str(pairs), "--steps", "2", "--set", "algorithm.batch_size=8",
              "--set", "run.eval_every=0", "--set", "run.threads=1", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), *common, "--set", 'run.distributed="fsdp"', "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-4)
    _assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", atol=1e-5)


# DPO (reference cache filled before step 1, and pair by pair as pairs are first seen) and KTO, whose frozen
# reference FSDP shards like the policy: the ranks must run it equally often. Each rank counts the reference's
# forward passes (a hook on its first block) and the dummy passes it ran for a share with nothing to compute.
REFERENCE_WORKER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from rlgen.algorithms.dpo import DPOConfig, PreferenceTrainer
    from rlgen.algorithms.kto import KTOConfig, KTOTrainer
    from rlgen.distributed import shutdown
    from rlgen.events import Events
    from rlgen.training import fsdp
    from rlgen.training.run_dir import RunDir

    def run(kind, out, data, distributed, **algorithm):
        cfg = KTOConfig() if kind == "kto" else DPOConfig()
        cfg.model.path, cfg.data.path = "tiny-arith", data
        for key, value in algorithm.items():
            setattr(cfg.algorithm, key, value)
        cfg.optim.lr, cfg.optim.adam_eps = 1e-3, 1e-3  # adam_eps: see tests/test_distributed_offline.py
        cfg.run.out, cfg.run.steps, cfg.run.threads, cfg.run.eval_every = out, 3, 1, 0
        cfg.run.distributed = distributed
        trainer = (KTOTrainer if kind == "kto" else PreferenceTrainer)(cfg, RunDir(out), Events())
        counts = {"passes": 0, "dummy": 0}
        build, dummy = trainer.reference_policy, trainer.reference_dummy_pass

        def counted_reference():
            reference = build()
            counts["bytes"] = fsdp.local_parameter_bytes(reference.module)
            counts["sharded"] = fsdp.is_sharded(reference.module)
            first = fsdp.blocks_of(reference.module)[0]
            first.register_forward_pre_hook(lambda *_: counts.__setitem__("passes", counts["passes"] + 1))
            return reference

        def counted_dummy():
            counts["dummy"] += 1
            dummy()

        trainer.reference_policy, trainer.reference_dummy_pass = counted_reference, counted_dummy
        trainer.fit()
        return counts

    root, mode = Path(sys.argv[1]), sys.argv[2]
    distributed = "fsdp" if mode == "two" else "ddp"
    out = {
        "dpo-precompute": run("dpo", str(root / mode / "dpo-precompute"), str(root / "pairs7.jsonl"), distributed,
                              batch_size=4, precompute_ref_log_probs=True),
        "dpo-lazy": run("dpo", str(root / mode / "dpo-lazy"), str(root / "pairs5.jsonl"), distributed, batch_size=2),
        "kto": run("kto", str(root / mode / "kto"), str(root / "examples5.jsonl"), distributed, batch_size=2),
    }
    (root / f"{mode}-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))
    shutdown()
''')

REFERENCE_SUMS = [(407, 779), (488, 790), (535, 648), (12, 34), (250, 250), (901, 87), (66, 77)]


@pytest.mark.slow
def test_fsdp_shards_the_frozen_reference_and_runs_it_evenly(tmp_path):
    pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10 * (k % 3 + 1))}
             for k, (a, b) in enumerate(REFERENCE_SUMS)]
    # 7 pairs: the precomputed cache is split 4 / 3 over the ranks. 5 pairs (KTO: examples) at 2 a step, drawn
    # with run.seed 0: step 3 draws a new one and one seen at step 1, so rank 1 has nothing to compute.
    for count in (7, 5):
        (tmp_path / f"pairs{count}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:count]))
    (tmp_path / "examples5.jsonl").write_text("".join(
        json.dumps({"prompt": p["prompt"], "completion": p["chosen"] if k % 2 else p["rejected"], "label": bool(k % 2)}) + "\n"
        for k, p in enumerate(pairs[:5])))
    one = _launch(tmp_path, "one", 1, REFERENCE_WORKER)[0]
    two = _launch(tmp_path, "two", 2, REFERENCE_WORKER)
    for case in ("dpo-precompute", "dpo-lazy", "kto"):
        single, sharded = _rows(tmp_path / "one" / case), _rows(tmp_path / "two" / case)
        assert [r["step"] for r in sharded] == [r["step"] for r in single] == [1, 2, 3]
        for a, b in zip(single, sharded):
            for key, value in a.items():
                # rewards/accuracies counts exact ties as wrong: at step 1 the rewards are rounding noise
                # around 0, whose sign depends on how the batch was padded
                if key in ("step_time", "rewards/accuracies") or value is None:
                    continue
                # FSDP takes the plain path, not the shared-prefix one: log-probs (~20) differ by ~1e-5
                # relative, and the rewards (beta x log-prob differences) carry that as absolute error
                assert b[key] == pytest.approx(value, rel=1e-4, abs=5e-5), (case, a["step"], key)
        _assert_same_weights(tmp_path / "two" / case / "final", tmp_path / "one" / case / "final", atol=1e-5)
        # the reference is sharded: each rank holds half its bytes (within a row of padding), none lost
        assert all(rank[case]["sharded"] for rank in two) and not one[case]["sharded"]
        for rank in two:
            assert rank[case]["bytes"] == pytest.approx(one[case]["bytes"] / 2, rel=0.02), case
        assert sum(rank[case]["bytes"] for rank in two) == one[case]["bytes"]
        # ... and every rank ran it as often as the others
        assert two[0][case]["passes"] == two[1][case]["passes"] > 0, case
    # the uneven cases happened: rank 1 had nothing to compute and ran a dummy pass instead
    for case in ("dpo-lazy", "kto"):
        assert [rank[case]["dummy"] for rank in two] == [0, 1], case
    assert all(one[case]["dummy"] == 0 for case in one)

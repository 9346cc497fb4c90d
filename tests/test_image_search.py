"""Test-time search for image models: best-of-n, ReNO and FK steering on a small class-conditional pipeline."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import rlgen
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams
from rlgen.rollout.image_search import best_of_n, chi_norm_penalty, fk_steering, plain, reno
from rlgen.rewards.base import RewardSet, RewardSpec

ROOT = Path(__file__).resolve().parent.parent


# The searches on a real pipeline (a fresh make_init.py run, then sampling) are slow tests; the fast tier keeps the
# option checks and the image sampling of test_diffusion_e2e.
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    subprocess.run([sys.executable, str(ROOT / "recipes/tiny-digits/make_init.py"), str(out)], check=True, capture_output=True)
    m = load_diffusion_model(DiffusionModelConfig(path=str(out / "tiny-digits")))
    return m.eval()


RECORDS = [{"prompt": "three", "label": 3}, {"prompt": "seven", "label": 7}]
PARAMS = DiffusionSamplingParams(num_steps=4, eta=1.0, noise_level=0.7)


def _brightness(samples):
    return torch.stack([s["image"].mean() for s in samples])


def test_chi_penalty_is_smallest_in_the_gaussian_typical_set():
    d = 64
    radii = torch.tensor([0.5, 1.0, 1.5])  # ||z|| = radius * sqrt(d - 1): the chi law's mode at radius 1
    noise = torch.ones(3, d) / d**0.5 * (radii * (d - 1) ** 0.5).unsqueeze(1)
    penalty = chi_norm_penalty(noise.view(3, 1, 8, 8))
    assert penalty[1] < penalty[0] and penalty[1] < penalty[2]


@pytest.mark.slow
def test_best_of_n_keeps_the_brightest_of_the_same_candidates(model):
    rewards = RewardSet([RewardSpec("brightness")])
    picked = best_of_n(model, [r["prompt"] for r in RECORDS], PARAMS, torch.Generator().manual_seed(5), rewards=rewards,
                       records=RECORDS, n=4)
    candidates = plain(model, None, PARAMS, torch.Generator().manual_seed(5),
                       records=[r for r in RECORDS for _ in range(4)])
    best = _brightness(candidates).view(2, 4).max(dim=1).values
    assert torch.allclose(_brightness(picked), best)
    assert [s["prompt"] for s in picked] == ["three", "seven"]


@pytest.mark.slow
def test_fk_steering_with_one_particle_is_plain_sampling(model):
    rewards = RewardSet([RewardSpec("brightness")])
    steered = fk_steering(model, None, PARAMS, torch.Generator().manual_seed(3), rewards=rewards, records=RECORDS, particles=1)
    drawn = plain(model, None, PARAMS, torch.Generator().manual_seed(3), records=RECORDS)
    assert torch.equal(torch.stack([s["image"] for s in steered]), torch.stack([s["image"] for s in drawn]))


@pytest.mark.slow
def test_fk_steering_resamples_towards_the_reward(model):
    rewards = RewardSet([RewardSpec("brightness")])
    stats = {}
    records = RECORDS * 4
    steered = fk_steering(model, None, PARAMS, torch.Generator().manual_seed(0), rewards=rewards, records=records,
                          particles=6, lam=200.0, resample_every=1, ess_threshold=1.0, stats=stats)
    drawn = plain(model, None, PARAMS, torch.Generator().manual_seed(0), records=records)
    assert stats["resamples"] > 0
    assert _brightness(steered).mean() > _brightness(drawn).mean()


@pytest.mark.slow
def test_reno_does_not_lose_reward_and_keeps_its_best_iterate(model):
    rewards = RewardSet([RewardSpec("brightness")])
    start = reno(model, None, PARAMS, torch.Generator().manual_seed(1), rewards=rewards, records=RECORDS, iterations=0)
    ode = plain(model, None, PARAMS.deterministic(), torch.Generator().manual_seed(1), records=RECORDS)
    assert torch.allclose(torch.stack([s["image"] for s in start]), torch.stack([s["image"] for s in ode]), atol=1e-6)
    improved = reno(model, None, PARAMS, torch.Generator().manual_seed(1), rewards=rewards, records=RECORDS,
                    iterations=5, lr=5.0)
    assert (_brightness(improved) >= _brightness(start) - 1e-6).all()
    assert _brightness(improved).mean() > _brightness(start).mean()
    assert all(p.requires_grad for p in model.denoiser.parameters())  # the model is left trainable as found


# --- option ranges: checked before any model loads (review round 2, F6) ---

@pytest.mark.parametrize("name, options, words", [
    ("reno", {"lr": -1}, ["'reno'", "option 'lr'", "got -1", "> 0"]),
    ("reno", {"lr": 0.0}, ["option 'lr'", "got 0"]),
    ("reno", {"lr": float("inf")}, ["option 'lr'", "got inf"]),
    ("reno", {"reg": float("nan")}, ["option 'reg'", "got nan"]),
    ("reno", {"reg": -1.0}, ["option 'reg'", "got -1", ">= 0"]),
    ("reno", {"iterations": -3}, ["option 'iterations'", "got -3", "integer >= 1"]),
    ("reno", {"iterations": 0}, ["option 'iterations'", "got 0"]),
    ("reno", {"grad_clip": 0.0}, ["option 'grad_clip'", "got 0"]),
    ("fk-steering", {"lam": float("nan")}, ["'fk-steering'", "option 'lam'", "got nan"]),
    ("fk-steering", {"lam": float("-inf")}, ["option 'lam'", "got -inf"]),
    ("fk-steering", {"ess_threshold": float("nan")}, ["option 'ess_threshold'", "got nan"]),
    ("fk-steering", {"ess_threshold": 5}, ["option 'ess_threshold'", "got 5", "[0, 1]"]),
    ("fk-steering", {"particles": 0}, ["option 'particles'", "got 0"]),
    ("fk-steering", {"resample_every": 0}, ["option 'resample_every'", "got 0"]),
    ("best-of-n", {"n": 0}, ["'best-of-n'", "option 'n'", "got 0"]),
])
def test_image_sampler_options_out_of_range_are_one_line_errors(name, options, words):
    from rlgen.errors import RlgenError
    from rlgen.plugins import registry
    from rlgen.rollout.samplers import check_sampler

    fn = registry("image-sampler").get(name)
    with pytest.raises(RlgenError) as info:
        check_sampler(name, fn, options, has_guide=True)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert "\n" not in str(info.value)


def test_cli_image_sampler_option_error_before_the_model_loads(tmp_path, monkeypatch):
    from rlgen.api import _sample
    from rlgen.diffusion import pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_diffusion_model", no_load)
    monkeypatch.setattr(_sample, "load_diffusion_model", no_load)  # the name `rlgen sample` calls
    code, out, err = rlgen("sample", "--model", "tiny-digits", "--task", "digits", "--limit", 1, "--num-steps", 2,
                           "--sampler", "reno", "--sampler-reward", "digit-classifier", "--sampler-opt", "iterations=-3",
                           "--image-dir", tmp_path / "x1", "--out", tmp_path / "o.jsonl")
    assert code == 2 and out == "", err
    assert err.strip().startswith("rlgen: error: option 'iterations' of image-sampler 'reno' must be an integer >= 1, got -3") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x1").exists()

"""Numerics of the image samplers and objectives against hand computations and the reference code (issue 13:
one-step flow sampling, Diffusion-DPO's scale and the flow shift, ReNO's regulariser, FK steering's potentials)."""
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlgen.algorithms.diffusion.dpo import DiffusionDPOAlgoConfig, DiffusionDPOConfig, DiffusionDPOTrainer
from rlgen.algorithms.diffusion.sft import DiffusionSFTAlgoConfig, DiffusionSFTConfig, DiffusionSFTTrainer
from rlgen.rollout import image_search as search
from rlgen.diffusion.objectives import diffusion_dpo_loss, noised, sample_times
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams, make_schedule, sample
from rlgen.rollout.image_search import FKState, add_log_potentials, chi_norm_penalty, fk_log_potentials, fk_steering
from rlgen.diffusion.steps import flow_sde_step
from rlgen.distributed import Dist
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.samplers import prepare_sampler
from rlgen.training.precision import PrecisionPolicy

INF = math.inf


@pytest.fixture(scope="module")
def flow_model():
    return load_diffusion_model(DiffusionModelConfig(path="tiny-digits-flow")).eval()


@pytest.fixture(scope="module")
def ddim_model():
    return load_diffusion_model(DiffusionModelConfig(path="tiny-digits")).eval()


def _flow_scheduler(shift: float = 1.0, **extra) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **extra)


# --- item 20: one-step (and two-step) flow sampling ------------------------------------------------

def test_one_step_flow_schedule_takes_sigma_max_from_the_next_sigma_zero():
    schedule = make_schedule(SimpleNamespace(family="flow", scheduler=_flow_scheduler()), 1)
    assert schedule.current.tolist() == [1.0] and schedule.following.tolist() == [0.0]
    assert schedule.sigma_max == 0.0  # Flow-GRPO's sigmas[1]; a "largest sigma in (0, 1)" found none and gave 1
    two = make_schedule(SimpleNamespace(family="flow", scheduler=_flow_scheduler()), 2)
    assert two.sigma_max == pytest.approx(float(two.following[0]))


def test_sde_step_from_sigma_one_to_zero_matches_the_hand_gaussian():
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 1, 2, 2, generator=g) for _ in range(3))
    a = 0.7
    step = flow_sde_step(v, x, torch.tensor(1.0), torch.tensor(0.0), a, sigma_max=0.0, noise=z)
    # sigma = 1, sigma_next = 0: g = a * sqrt(1 / (1 - 0)) = a, dt = -1, std = g * sqrt(1) = a
    mean = x * (1 - a**2 / 2) - v
    assert torch.allclose(step.mean, mean, atol=1e-6)
    assert torch.allclose(step.prev_sample, mean + a * z, atol=1e-6)
    expected = (-(z**2) / 2 - math.log(a) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob, expected, atol=1e-5)
    # sigma_max left out: at sigma == 1 it is sigma_next, as Flow-GRPO's sigmas[1] is there
    assert torch.allclose(flow_sde_step(v, x, 1.0, 0.0, a, noise=z).prev_sample, step.prev_sample)


def test_ode_step_at_sigma_one_is_exact_euler_even_with_sigma_max_one():
    x, v = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    step = flow_sde_step(v, x, torch.tensor(1.0), torch.tensor(0.0), 0.0, sigma_max=1.0)
    assert torch.equal(step.prev_sample, x - v)  # g = 0, never 0 * inf = NaN
    assert torch.equal(step.log_prob, torch.zeros(1))


@pytest.mark.parametrize("num_steps", [1, 2])
@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_one_and_two_step_flow_sampling_gives_finite_images(flow_model, num_steps, noise_level):
    records = [{"prompt": "three", "label": 3}, {"prompt": "seven", "label": 7}]
    cond = flow_model.conditioning([r["prompt"] for r in records], records)
    params = DiffusionSamplingParams(num_steps=num_steps, eta=noise_level, noise_level=noise_level)
    trajectory = sample(flow_model, cond, None, params, torch.Generator().manual_seed(0))
    assert torch.isfinite(trajectory.images).all() and torch.isfinite(trajectory.latents).all()
    assert torch.isfinite(trajectory.log_probs).all()
    assert trajectory.images.std() > 0.05  # not a black (NaN -> 0) image


def test_one_step_ddim_sampling_stays_finite(ddim_model):
    cond = ddim_model.conditioning(["three"], [{"prompt": "three", "label": 3}])
    trajectory = sample(ddim_model, cond, None, DiffusionSamplingParams(num_steps=1), torch.Generator().manual_seed(0))
    assert torch.isfinite(trajectory.images).all() and torch.isfinite(trajectory.log_probs).all()


# --- item 23: Diffusion-DPO's scale and the flow-matching shift ---------------------------------------

def test_dpo_default_beta_is_comparable_with_both_diffusers_scripts():
    beta = DiffusionDPOAlgoConfig().beta
    assert beta == 5000.0  # train_diffusion_dpo_sdxl.py's default, with its -0.5 * beta
    policy, reference = torch.tensor([0.20, 0.26]), torch.tensor([0.21, 0.25])
    _, inside = diffusion_dpo_loss(policy, reference, beta)
    model_diff, ref_diff = 0.20 - 0.26, 0.21 - 0.25
    sdxl = -0.5 * 5000 * (model_diff - ref_diff)  # train_diffusion_dpo_sdxl.py: scale_term = -0.5 * beta_dpo
    sd15 = 2500 * (ref_diff - model_diff)  # train_diffusion_dpo.py: beta_dpo (2500) * (ref_diff - model_diff)
    assert inside.item() == pytest.approx(sdxl, rel=1e-5) and inside.item() == pytest.approx(sd15, rel=1e-5)


def test_flow_training_noise_levels_follow_the_scheduler_shift():
    model = SimpleNamespace(family="flow", scheduler=_flow_scheduler(shift=3.0))
    x0, noise = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    x_t, t, target = noised(model, x0, noise, torch.tensor([0.25, 0.5]))
    # sigma' = 3 u / (1 + 2 u): 0.25 -> 0.75 / 1.5 = 0.5, 0.5 -> 1.5 / 2 = 0.75
    assert x_t.flatten().tolist() == pytest.approx([0.5, 0.75])
    assert t.tolist() == pytest.approx([500.0, 750.0])
    assert torch.equal(target, noise - x0)
    # the same sigmas the scheduler trains with: its own table at u = j / 1000
    scheduler = model.scheduler
    u = torch.tensor([1.0, 0.5, 0.1, 0.001])
    table = scheduler.sigmas[(1000 - (u * 1000).round().long()).clamp(max=999)]
    _, t, _ = noised(model, torch.zeros(4, 1), torch.ones(4, 1), u)
    assert torch.allclose(t / 1000, table.float(), atol=1e-6)
    # a seeded draw
    u = sample_times(6, torch.Generator().manual_seed(7))
    _, t, _ = noised(model, torch.zeros(6, 1), torch.ones(6, 1), u)
    assert torch.allclose(t, 1000 * 3 * u / (1 + 2 * u), rtol=1e-6)


def test_flow_training_noise_is_unshifted_at_shift_one_and_with_dynamic_shifting():
    u = sample_times(5, torch.Generator().manual_seed(3))
    for scheduler in (_flow_scheduler(1.0), _flow_scheduler(3.0, use_dynamic_shifting=True)):
        _, t, _ = noised(SimpleNamespace(family="flow", scheduler=scheduler), torch.zeros(5, 1), torch.ones(5, 1), u)
        assert torch.equal(t, u * 1000)


class _RecordingFlowModel(torch.nn.Module):
    """A stand-in denoiser with a shift-3 flow scheduler that records the timesteps it is asked about."""
    family = "flow"

    def __init__(self):
        super().__init__()
        self.scheduler = _flow_scheduler(shift=3.0)
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.timesteps: list[torch.Tensor] = []

    device = torch.device("cpu")

    def conditioning(self, prompts, records=None):
        return None

    def predict(self, x, t, cond, null=None, guidance_scale=1.0, reference=False):
        self.timesteps.append(t.detach().clone())
        return x * self.weight


def _trainer(cls, config, model):
    trainer = cls.__new__(cls)  # only train_step's inputs, no run directory or model files
    trainer.config, trainer.model = config, model
    trainer.generator = torch.Generator().manual_seed(11)
    trainer.optimizer_step = lambda: 0.0
    trainer.precision = PrecisionPolicy("fp32", torch.device("cpu"))
    trainer.dist = Dist()  # one process: the whole batch is this rank's
    return trainer


def test_sft_and_dpo_train_at_the_shifted_noise_levels():
    model = _RecordingFlowModel()
    sft = _trainer(DiffusionSFTTrainer, DiffusionSFTConfig(algorithm=DiffusionSFTAlgoConfig(batch_size=4)), model)
    sft.images, sft.records = torch.rand(3, 1, 2, 2), [{"prompt": "a"}] * 3
    sft.train_step()
    draws = torch.Generator().manual_seed(11)  # SFT's draws in order: rows, noise, times
    torch.randint(3, (4,), generator=draws)
    torch.randn((4, 1, 2, 2), generator=draws)
    u = sample_times(4, draws)
    assert torch.allclose(model.timesteps[-1], 1000 * 3 * u / (1 + 2 * u), rtol=1e-6)

    model.timesteps.clear()
    dpo = _trainer(DiffusionDPOTrainer, DiffusionDPOConfig(algorithm=DiffusionDPOAlgoConfig(batch_size=2)), model)
    dpo.pairs, dpo.chosen, dpo.rejected = [{"prompt": "a"}] * 3, torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    dpo.train_step()
    draws = torch.Generator().manual_seed(11)  # DPO's: rows, noise, times (shared by the two images of a pair)
    torch.randint(3, (2,), generator=draws)
    torch.randn((2, 1, 2, 2), generator=draws)
    u = sample_times(2, draws).repeat(2)
    for timesteps in model.timesteps:  # policy and reference
        assert torch.allclose(timesteps, 1000 * 3 * u / (1 + 2 * u), rtol=1e-6)


# --- item 26: ReNO's norm regulariser ----------------------------------------------------------------

def test_reno_penalty_is_renos_chi_form():
    noise = torch.full((1, 1, 8, 8), 0.5)  # d = 64, ||z|| = sqrt(64 / 4) = 4
    assert chi_norm_penalty(noise).item() == pytest.approx(0.5 * 16 - 63 * math.log(4.0), rel=1e-6)
    noise = torch.full((2, 4, 2, 2), 2.0)  # per sample: d = 16, ||z|| = 8
    assert chi_norm_penalty(noise).tolist() == pytest.approx([32 - 15 * math.log(8.0)] * 2, rel=1e-6)


def test_reno_penalty_is_smallest_at_the_chi_mode():
    d = 64
    direction = torch.randn(d, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    radii = torch.tensor([0.99, 1.0, 1.01]) * math.sqrt(d - 1)
    penalty = chi_norm_penalty((radii.unsqueeze(1) * direction).view(3, 1, 8, 8))
    assert penalty[1] < penalty[0] and penalty[1] < penalty[2]
    z = (math.sqrt(d - 1) * direction).view(1, 1, 8, 8).requires_grad_(True)
    chi_norm_penalty(z).sum().backward()
    assert z.grad.abs().max().item() < 1e-4  # stationary there: d/dr (r^2 / 2 - (d - 1) log r) = 0


# --- item 27: FK steering's potentials -------------------------------------------------------------

REWARDS = [torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.5]]), torch.tensor([[0.9, -2.0]])]
LAM = 2.0
# log G_t by hand for r = (0.5, 0.2, 0.9) and (-1.0, -0.5, -2.0), lam = 2; the last step is the final correction
EXPECTED = {
    "difference": [[1.0, -2.0], [-0.6, 1.0], [1.4, -3.0]],  # lam (r_t - r_{t-1}), r_{-1} = 0
    "max": [[1.0, -2.0], [1.0, -1.0], [1.8 - 2.0, -4.0 + 3.0]],  # lam max_{s<=t} r_s; final lam r_T - sum
    "sum": [[1.0, -2.0], [1.4, -3.0], [1.8 - 2.4, -4.0 + 5.0]],  # lam sum_{s<=t} r_s; final lam r_T - sum
}


@pytest.mark.parametrize("potential", sorted(EXPECTED))
def test_fk_potentials_match_hand_values_and_telescope(potential):
    state = FKState.start(potential, (1, 2))
    logs = []
    for t, rewards in enumerate(REWARDS):
        log_g, state = fk_log_potentials(potential, rewards, state, LAM, final=t == len(REWARDS) - 1)
        logs.append(log_g)
    for got, want in zip(logs, EXPECTED[potential]):
        assert got.flatten().tolist() == pytest.approx(want, abs=1e-6)
    assert torch.stack(logs).sum(dim=0).flatten().tolist() == pytest.approx([1.8, -4.0])  # lam * r_T


def test_fk_potentials_before_the_final_step():
    for potential, want in (("max", [1.8, -1.0]), ("sum", [3.2, -7.0]), ("difference", [1.4, -3.0])):
        state = FKState.start(potential, (1, 2))
        for rewards in REWARDS:
            log_g, state = fk_log_potentials(potential, rewards, state, LAM)
        assert log_g.flatten().tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("potential", sorted(EXPECTED))
def test_fk_nan_reward_gets_weight_zero_not_potential_zero(potential):
    state = FKState.start(potential, (1, 2))
    log_g, state = fk_log_potentials(potential, torch.tensor([[math.nan, -3.0]]), state, LAM)
    assert log_g[0, 0].item() == -INF and log_g[0, 1].item() == pytest.approx(-6.0)
    weights = torch.softmax(add_log_potentials(torch.zeros(1, 2), log_g), dim=1)
    assert weights.tolist() == [[0.0, 1.0]]  # the old rule (NaN -> potential 0) gave the NaN particle ~all of it
    # the state is untouched by the NaN, so later steps give no NaN (and the zero weight stays zero)
    assert state.log_product[0, 0].item() == 0.0
    log_g2, _ = fk_log_potentials(potential, torch.tensor([[1.0, -3.0]]), state, LAM, final=True)
    total = add_log_potentials(add_log_potentials(torch.zeros(1, 2), log_g), log_g2)
    assert not torch.isnan(total).any() and total[0, 0].item() == -INF


def test_fk_all_weights_zero_start_again_from_equal_weights():
    log_g, _ = fk_log_potentials("difference", torch.full((2, 3), math.nan), FKState.start("difference", (2, 3)), LAM)
    assert torch.equal(add_log_potentials(torch.zeros(2, 3), log_g), torch.zeros(2, 3))


def test_fk_potential_option_is_checked_before_any_model_loads():
    with pytest.raises(RlgenError, match="potential"):
        prepare_sampler("fk-steering", ["potential=best"], ["brightness"], kind="image-sampler")
    fn, options, _ = prepare_sampler("fk-steering", ["potential=max"], ["brightness"], kind="image-sampler")
    assert options == {"potential": "max"}
    with pytest.raises(RlgenError, match="difference, max, sum"):
        fk_steering(None, None, DiffusionSamplingParams(), rewards=None, records=[{"prompt": "three"}], potential="best")


class _NaNForFirstParticle:
    """A guide that scores every image -1 - brightness, except NaN for the first particle of each prompt
    while sampling (the final images are scored normally)."""

    def __init__(self, particles: int, calls_with_nan: int):
        self.particles, self.calls_with_nan, self.calls = particles, calls_with_nan, 0

    def score(self, samples):
        self.calls += 1
        total = torch.stack([-1.0 - s["image"].mean() for s in samples]).double()
        if self.calls <= self.calls_with_nan:
            total[:: self.particles] = math.nan
        return None, torch.ones(len(samples), dtype=torch.bool), total


def test_fk_steering_never_resamples_a_particle_with_a_nan_reward(ddim_model, monkeypatch):
    seen = []
    real = search.resample_indices

    def recording(log_weights, generator=None):
        seen.append(log_weights.clone())
        return real(log_weights, generator)

    monkeypatch.setattr(search, "resample_indices", recording)
    records = [{"prompt": "three", "label": 3}, {"prompt": "seven", "label": 7}]
    params = DiffusionSamplingParams(num_steps=3, eta=1.0)
    guide = _NaNForFirstParticle(particles=4, calls_with_nan=1)
    fk_steering(ddim_model, None, params, torch.Generator().manual_seed(0), rewards=guide, records=records,
                particles=4, lam=5.0, resample_every=1, ess_threshold=1.0)
    assert seen, "the steering never resampled"
    first = seen[0]
    assert torch.isneginf(first[:, 0]).all() and torch.isfinite(first[:, 1:]).all()


@pytest.mark.parametrize("potential", ["max", pytest.param("sum", marks=pytest.mark.slow)])
def test_fk_steering_with_max_and_sum_potentials_resamples_towards_the_reward(ddim_model, potential):
    rewards = RewardSet([RewardSpec("brightness")])
    records = [{"prompt": "three", "label": 3}, {"prompt": "seven", "label": 7}] * 2
    params = DiffusionSamplingParams(num_steps=4, eta=1.0)
    stats = {}
    steered = fk_steering(ddim_model, None, params, torch.Generator().manual_seed(0), rewards=rewards, records=records,
                          particles=4, lam=200.0, resample_every=1, ess_threshold=1.0, potential=potential, stats=stats)
    drawn = search.plain(ddim_model, None, params, torch.Generator().manual_seed(0), records=records)
    assert stats["resamples"] > 0
    assert torch.stack([s["image"].mean() for s in steered]).mean() > torch.stack([s["image"].mean() for s in drawn]).mean()

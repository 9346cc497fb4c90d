"""Denoising steps, log-probs, advantages and losses of the image trainers against direct computations."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rlgen.diffusion.objectives import diffusion_dpo_loss
from rlgen.diffusion.stat_tracking import PerPromptStatTracker
from rlgen.diffusion.steps import ddim_step, flow_sde_step, gaussian_log_prob, step_kl


def _normal_mean_log_prob(x, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))


def test_gaussian_log_prob_is_the_mean_over_pixels_of_the_density():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    assert torch.allclose(gaussian_log_prob(x, mean, std), _normal_mean_log_prob(x, mean, std.expand_as(x)), atol=1e-6)
    # one pixel by hand: -(x-m)^2/(2 s^2) - log s - log sqrt(2 pi)
    one = gaussian_log_prob(torch.tensor([[[[1.0]]]]), torch.tensor([[[[0.0]]]]), torch.tensor(2.0))
    assert one.item() == pytest.approx(-1 / 8 - math.log(2.0) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def _ddim():
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                      set_alpha_to_one=False, timestep_spacing="trailing")
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_and_its_density(eta):
    s = _ddim()
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 1, 8, 8, generator=g) for _ in range(3))
    t = int(s.timesteps[3])
    prev_t = t - 1000 // 10
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev_t]
    ours = ddim_step(eps, x, a_t, a_prev, eta, noise=z)
    theirs = s.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    assert torch.allclose(ours.prev_sample, theirs, atol=1e-5)
    if eta > 0:
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        assert float(ours.std.flatten()[0]) == pytest.approx(sigma, rel=1e-5)
        direct = _normal_mean_log_prob(ours.prev_sample, ours.mean, torch.full_like(x, sigma))
        assert torch.allclose(ours.log_prob, direct, atol=1e-5)
        # scoring the stored sample again gives the same log-prob (the on-policy ratio is exactly 1)
        again = ddim_step(eps, x, a_t, a_prev, eta, prev_sample=ours.prev_sample)
        assert torch.equal(again.log_prob, ours.log_prob)
    else:
        assert torch.equal(ours.log_prob, torch.zeros(2))


def test_flow_sde_with_zero_noise_is_the_euler_ode_step_of_diffusers():
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    sigma, sigma_next = s.sigmas[2], s.sigmas[3]
    ours = flow_sde_step(v, x, sigma, sigma_next, noise_level=0.0)
    theirs = s.step(v, s.timesteps[2], x).prev_sample
    s._step_index = None
    assert torch.allclose(ours.prev_sample, theirs, atol=1e-6)
    assert torch.allclose(ours.prev_sample, x + v * (sigma_next - sigma), atol=1e-7)


def test_flow_sde_step_is_flow_grpo_gaussian():
    g = torch.Generator().manual_seed(3)
    x, v, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    sigma, sigma_next, a = 0.6, 0.5, 0.7
    ours = flow_sde_step(v, x, torch.tensor(sigma), torch.tensor(sigma_next), a, noise=z)
    dt = sigma_next - sigma
    gg = a * math.sqrt(sigma / (1 - sigma))
    # the drift v + g^2/(2 sigma) * eps_hat with eps_hat = x + (1 - sigma) v (the marginal-preserving SDE)
    eps_hat = x + (1 - sigma) * v
    mean = x + (v + gg**2 / (2 * sigma) * eps_hat) * dt
    std = gg * math.sqrt(-dt)
    assert torch.allclose(ours.mean, mean, atol=1e-6)
    assert torch.allclose(ours.prev_sample, mean + std * z, atol=1e-6)
    assert torch.allclose(ours.log_prob, _normal_mean_log_prob(ours.prev_sample, mean, torch.full_like(x, std)), atol=1e-5)
    assert torch.allclose(ours.pred_original, x - sigma * v)


def test_flow_sde_at_sigma_one_uses_sigma_max():
    x = torch.zeros(1, 1, 2, 2)
    v = torch.ones(1, 1, 2, 2)
    step = flow_sde_step(v, x, torch.tensor(1.0), torch.tensor(0.9), 0.5, sigma_max=0.9)
    assert float(step.kl_scale.flatten()[0]) == pytest.approx(0.25 * 1.0 / (1 - 0.9), rel=1e-5)
    assert torch.isfinite(step.log_prob).all()


def test_step_kl_is_flow_grpo_kl():
    mean = torch.ones(2, 1, 2, 2)
    ref = torch.zeros(2, 1, 2, 2)
    scale = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    assert torch.allclose(step_kl(mean, ref, scale), torch.tensor([1.0, 0.25]))


def test_per_prompt_stat_tracker_matches_hand_values():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.advantages(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    # fewer than min_count rewards per prompt: batch mean 3, population std sqrt(8/3)
    std = math.sqrt(8 / 3)
    assert torch.allclose(first, torch.tensor([-2 / std, 0.0, 2 / std]) * (std / (std + 1e-6)), atol=1e-6)
    second = tracker.advantages(["a"], torch.tensor([5.0]))
    # prompt a now holds [1, 3, 5]: mean 3, population std sqrt(8/3)
    assert second.item() == pytest.approx(2 / (std + 1e-6), rel=1e-6)
    tracker.advantages(["a", "a"], torch.tensor([7.0, 9.0]))
    assert list(tracker.history["a"]) == [3.0, 5.0, 7.0, 9.0]  # bounded history
    restored = PerPromptStatTracker(buffer_size=4, min_count=3)
    restored.restore(tracker.state())
    assert list(restored.history["a"]) == [3.0, 5.0, 7.0, 9.0]


def test_diffusion_dpo_loss_hand_values():
    policy = torch.tensor([0.2, 0.5])  # winner error, loser error
    reference = torch.tensor([0.3, 0.4])
    loss, inside = diffusion_dpo_loss(policy, reference, beta=10.0)
    expected_inside = -0.5 * 10.0 * ((0.2 - 0.5) - (0.3 - 0.4))
    assert inside.item() == pytest.approx(expected_inside)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-expected_inside))), rel=1e-6)
    hinge, _ = diffusion_dpo_loss(policy, reference, beta=10.0, loss_type="hinge")
    assert hinge.item() == pytest.approx(max(0.0, 1 - expected_inside))

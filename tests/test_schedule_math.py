"""The forward process, noise schedules and DDIM update checked against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler


def test_worked_example_one_forward_step():
    # x_t = sqrt(1 - beta_t) * x_{t-1} + sqrt(beta_t) * eps
    x_prev, beta, eps = 0.8, 0.1, -0.3
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * eps
    assert x_t == pytest.approx(0.664, abs=5e-4)
    # The same step through the scheduler: a one-step chain has alpha_bar_1 = 1 - beta_1.
    sched = DDPMScheduler(num_train_timesteps=1, trained_betas=[beta])
    out = sched.add_noise(torch.tensor([x_prev]), torch.tensor([eps]), torch.tensor([0]))
    assert out.item() == pytest.approx(x_t, abs=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_is_closed_form(schedule):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    alpha_bar = torch.cumprod(1 - sched.betas.double(), dim=0)
    x0, eps = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    expected = alpha_bar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1) * eps
    got = sched.add_noise(x0.float(), eps.float(), t).double()
    assert torch.allclose(got, expected, atol=1e-5)


def test_schedules_match_their_formulas():
    T, b0, b1 = 1000, 0.00085, 0.012
    linear = DDPMScheduler(num_train_timesteps=T, beta_start=b0, beta_end=b1, beta_schedule="linear").betas
    assert torch.allclose(linear.double(), torch.linspace(b0, b1, T, dtype=torch.float64), atol=1e-7)
    scaled = DDPMScheduler(
        num_train_timesteps=T, beta_start=b0, beta_end=b1, beta_schedule="scaled_linear"
    ).betas
    expected = torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=torch.float64) ** 2
    assert torch.allclose(scaled.double(), expected, atol=1e-7)
    # Cosine (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).
    cosine = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas.double()
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([min(1 - f[t + 1] / f[t], 0.999) for t in range(T)], dtype=torch.float64)
    assert torch.allclose(cosine, expected, atol=1e-6)
    # Every schedule destroys the signal by t = T: alpha_bar_T is small.
    for betas in (linear, scaled, cosine):
        assert torch.cumprod(1 - betas.double(), 0)[-1] < 0.01


def test_iterated_chain_matches_closed_form_in_mean_and_variance():
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=200, beta_schedule="linear", beta_start=1e-4, beta_end=0.04)
    betas = sched.betas.double()
    x0, n, t = 1.5, 200_000, 120
    x = torch.full((n,), x0, dtype=torch.float64)
    for s in range(t + 1):  # q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s I)
        x = (1 - betas[s]).sqrt() * x + betas[s].sqrt() * torch.randn(n, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    assert x.mean().item() == pytest.approx(alpha_bar.sqrt().item() * x0, abs=0.01)
    assert x.var().item() == pytest.approx(1 - alpha_bar.item(), abs=0.01)
    closed = sched.add_noise(torch.full((n,), x0), torch.randn(n), torch.full((n,), t)).double()
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=0.01)
    assert closed.var().item() == pytest.approx(x.var().item(), abs=0.01)


def test_ddim_step_is_the_deterministic_update():
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    sched.set_timesteps(10)
    t, t_prev = sched.timesteps[3], sched.timesteps[4]
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    # DDIM eq. 12 with sigma = 0: x_{t-1} = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev) * eps
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    expected = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    assert torch.allclose(sched.step(eps, t, x_t, eta=0.0).prev_sample, expected, atol=1e-5)


def test_zero_terminal_snr_schedule_and_min_snr_weighting_stay_finite():
    from ldm.training.loss import diffusion_loss, snr

    base = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    sched = DDPMScheduler.from_config(
        base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    )
    alpha_bar = sched.alphas_cumprod
    assert alpha_bar[-1] == 0 and base.alphas_cumprod[-1] > 0  # x_T is pure noise only after the rescale
    # Lin et al. 2023, Alg. 1: sqrt(alpha_bar) is shifted to 0 at T and rescaled to keep its value at t = 0.
    torch.testing.assert_close(alpha_bar[0], base.alphas_cumprod[0])
    t = torch.tensor([0, 500, 999])
    assert snr(sched, t)[-1] == 0
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    pred = torch.randn(3, 4, 8, 8)
    loss = diffusion_loss(pred, latents, noise, t, sched, snr_gamma=5.0)
    assert torch.isfinite(loss)
    # At SNR 0 the v-weight min(SNR, gamma) / (SNR + 1) is 0: the terminal sample adds nothing, NaN-free.
    target = sched.get_velocity(latents, noise, t)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    ratio = snr(sched, t)
    expected = (per_sample * torch.clamp(ratio, max=5.0) / (ratio + 1)).mean()
    torch.testing.assert_close(loss, expected)
    # Sampling starts at the terminal timestep with trailing spacing.
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(10)
    assert ddim.timesteps[0] == 999


def test_cubic_timestep_sampling_follows_its_distribution_and_leaves_uniform_draws_alone():
    from ldm.training.loss import sample_noise_and_timesteps

    latents = torch.zeros(20000, 1, 1, 1)
    _, uniform = sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=generator)
    # The DDPM draw, unchanged:
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=generator))
    cubic_generator = torch.Generator().manual_seed(0)
    _, cubic = sample_noise_and_timesteps(latents, 1000, cubic_generator, timestep_sampling="cubic")
    assert cubic.min() >= 0 and cubic.max() <= 999
    # t = floor((1 - u^3) T): P(t < s) = P(u > (1 - s/T)^(1/3)) = 1 - (1 - s/T)^(1/3).
    for s in (100, 500, 900):
        expected = 1 - (1 - s / 1000) ** (1 / 3)
        assert abs((cubic < s).float().mean().item() - expected) < 0.01, s
    assert abs((uniform < 500).float().mean().item() - 0.5) < 0.01

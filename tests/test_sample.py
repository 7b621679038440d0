# SPDX-License-Identifier: MIT
"""Tests for sample.py: schedules, parameterisations, spacings, the samplers against a Gaussian oracle.

The oracle (sample.py section 9): for data N(mu, std^2) per element the exact eps-prediction is
eps*(x_t, t) = (x_t - sqrt(ab) mu) sqrt(1 - ab) / (ab std^2 + 1 - ab), and the probability-flow ODE
keeps (x_t - sqrt(ab) mu) / sqrt(ab std^2 + 1 - ab) constant, so its exact solution is known.
"""
import math

import pytest
import torch

import sample
from sample import CLEAN, KnownRegion, NoiseSchedule

MU, STD = 0.5, 0.5                      # the oracle's data distribution


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("scaled_linear", 1000)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- 1. schedules

def test_scaled_linear_schedule_has_stable_diffusions_values(schedule):
    # PAPER: beta from 0.00085 to 0.012, sqrt-linear; PDM brief §6.1 reference points.
    assert schedule.betas.dtype == torch.float64 and schedule.alpha_bar.shape == (1000,)
    assert schedule.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert schedule.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert schedule.alpha_bar[0].item() == pytest.approx(0.99915, rel=1e-12)
    assert schedule.alpha_bar[-1].item() == pytest.approx(0.00466, abs=5e-6)
    assert math.sqrt(schedule.alpha_bar[-1].item()) == pytest.approx(0.0683, abs=5e-5)


def test_linear_and_cosine_schedules_follow_their_papers():
    linear = NoiseSchedule("linear", 1000)
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    cosine = NoiseSchedule("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2   # improved DDPM Eq. 17
    for t in (0, 100, 500, 900):    # unclipped region: alpha_bar(t) = f((t+1)/T) / f(0)
        assert cosine.alpha_bar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert cosine.betas.max().item() == pytest.approx(0.999)


def test_sigma_snr_and_log_snr_are_consistent(schedule):
    t = torch.tensor([0, 1, 250, 999])
    alpha, sigma = schedule.sqrt_alpha_bar(t), schedule.sigma(t)
    assert alpha.dtype == torch.float32 and alpha.shape == (4,)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(4))
    torch.testing.assert_close(schedule.snr(t), alpha ** 2 / sigma ** 2)
    torch.testing.assert_close(schedule.log_snr(t), schedule.snr(t).log())
    a, s, lam = schedule.coefficients(250)
    assert lam == pytest.approx(math.log(a / s), rel=1e-12)
    assert schedule.coefficients(CLEAN) == (1.0, 0.0, math.inf)


# ----------------------------------------------------------------------------- 2. forward process

def test_q_sample_has_the_forward_process_moments(schedule):
    z0 = torch.full((20000,), 0.7)
    t = torch.full((20000,), 300)
    for k in (1.0, 2.0):
        z_t = schedule.q_sample(z0, t, randn(20000, seed=1), noise_scale=k)
        a, s, _ = schedule.coefficients(300)
        assert z_t.mean().item() == pytest.approx(a * 0.7, abs=4 * k * s / math.sqrt(20000))
        assert z_t.std().item() == pytest.approx(k * s, rel=0.03)


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_eps_and_x0_conversions_round_trip(schedule, k):
    x0, eps, t = randn(3, 4, 5, 5, seed=1), randn(3, 4, 5, 5, seed=2), torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, eps, k)
    torch.testing.assert_close(sample.predict_x0_from_eps(x_t, t, eps, schedule, k), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(sample.predict_eps_from_x0(x_t, t, x0, schedule, k), eps, atol=1e-5, rtol=0)


def test_v_conversions_round_trip(schedule):
    x0, eps, t = randn(3, 4, 5, 5, seed=1), randn(3, 4, 5, 5, seed=2), torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    v = sample.predict_v(x0, eps, t, schedule)
    torch.testing.assert_close(sample.predict_x0_from_v(x_t, t, v, schedule), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample.predict_eps_from_v(x_t, t, v, schedule), eps, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        sample.to_x0_and_eps(v, "v", x_t, t, schedule, noise_scale=2.0)


# ----------------------------------------------------------------------------- 3. spacings

def test_spacings_give_the_documented_sequences():
    assert sample.make_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sample.make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sample.make_timesteps(1000, 10, "linspace").tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    ldmseg = sample.make_timesteps(1000, 50, "leading", offset=19).tolist()   # LDMSeg's 999, 979, ..., 19
    assert ldmseg[0] == 999 and ldmseg[-1] == 19 and ldmseg == sample.make_timesteps(1000, 50, "trailing").tolist()
    assert sample.make_timesteps(1000, 10).dtype == torch.int64


def test_spacings_reject_timesteps_outside_the_schedule():
    with pytest.raises(ValueError, match=r"outside 0\.\.999 \(1000, \.\.\., 1\); use fewer steps or another offset"):
        sample.make_timesteps(1000, 1000, "leading", offset=1)       # would reach t = 1000
    with pytest.raises(ValueError, match="need 1 <= steps"):
        sample.make_timesteps(1000, 0)
    with pytest.raises(ValueError, match="linspace spacing with T=1000, S=1000 gives timestep 500 twice; use fewer"):
        sample.make_timesteps(1000, 1000, "linspace")                 # 999 distinct points below 999
    assert sample.make_timesteps(1000, 999, "linspace").unique().numel() == 999


# ----------------------------------------------------------------------------- oracle samplers

def oracle(schedule, prediction="eps", k=1.0, mu=MU, std=STD):
    return sample.gaussian_denoiser(mu, std, schedule, prediction, noise_scale=k)


def marginal_at_999(schedule, n, seed=0):
    """4 x n draws of x_999 from q(x_999) itself: N(0, I) misses its mean sqrt(ab_999) mu = 0.034,
    which the ODE would carry to the output. Few rows, many columns: one t per row."""
    x0 = MU + STD * randn(4, n, seed=seed + 1)
    return schedule.q_sample(x0, torch.full((4,), 999), randn(4, n, seed=seed))


def test_ddim_eta0_with_many_steps_recovers_the_data_mean_and_std(schedule):
    x = sample.ddim_sample(oracle(schedule), marginal_at_999(schedule, 4000), schedule, steps=200,
                           spacing="trailing", set_alpha_to_one=True)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(STD, abs=0.01)


def test_ddpm_samples_the_data_distribution(schedule):
    x = sample.ddpm_sample(oracle(schedule), marginal_at_999(schedule, 4000), schedule,
                           generator=torch.Generator().manual_seed(3))
    # 16000 draws: standard errors 0.004 (mean) and 0.003 (std). The beta_tilde variance makes
    # DDPM's chain slightly narrow even with an exact model: std 0.4952 for this data (the 1-D
    # linear-Gaussian recursion of the chain), hence the tolerance.
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, abs=0.015)


def test_ddim_eta1_is_ddpms_ancestral_step(schedule):
    # [DDIM §4.1] eta = 1 gives the DDPM posterior with beta_tilde variance; both draw one normal
    # per step, so with one generator seed they take the same path.
    x_T = marginal_at_999(schedule, 500)
    ddpm = sample.ddpm_sample(oracle(schedule), x_T, schedule, steps=50, spacing="leading",
                              generator=torch.Generator().manual_seed(3))
    ddim = sample.ddim_sample(oracle(schedule), x_T, schedule, steps=50, eta=1.0, spacing="leading",
                              set_alpha_to_one=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=0)


def test_stochastic_samplers_are_reproducible_from_their_generator(schedule):
    runs = [sample.ddpm_sample(oracle(schedule), randn(8, 4), schedule, steps=20,
                               generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_dpm_solver_pp_order1_equals_ddim_eta0_step_for_step(schedule):
    traj = {"ddim": [], "dpm": []}
    x_T = randn(16, 8)
    out_ddim = sample.ddim_sample(oracle(schedule), x_T, schedule, steps=12, spacing="leading",
                                  set_alpha_to_one=True, callback=lambda i, t, x, x0: traj["ddim"].append((t, x)))
    out_dpm = sample.dpm_solver_pp_sample(oracle(schedule), x_T, schedule, steps=12, order=1, spacing="leading",
                                          callback=lambda i, t, x, x0: traj["dpm"].append((t, x)))
    assert [t for t, _ in traj["ddim"]] == [t for t, _ in traj["dpm"]]
    for (_, a), (_, b) in zip(traj["ddim"], traj["dpm"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_ddim, out_dpm, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_orders_2_and_3_land_closer_to_the_exact_ode_than_ddim(schedule, steps):
    x_T = randn(64, 16)
    exact = sample.gaussian_flow(x_T, 999, CLEAN, MU, STD, schedule)
    err = lambda x: (x.double() - exact).abs().mean().item()
    ddim = err(sample.ddim_sample(oracle(schedule), x_T, schedule, steps=steps, spacing="linspace",
                                  set_alpha_to_one=True))
    for order in (2, 3):
        for method in ("multistep", "singlestep"):
            dpm = err(sample.dpm_solver_pp_sample(oracle(schedule), x_T, schedule, steps=steps,
                                                  order=order, method=method))
            assert dpm < 0.8 * ddim, (order, method, dpm, ddim)


def _const(v):
    return (torch.tensor([v], dtype=torch.float64),)


def _exact_update(schedule, x_s, f, s, t):
    """x_t = (sigma_t / sigma_s) x_s + sigma_t * int e^lambda f(lambda) dlambda, by Simpson's rule."""
    ls, lt = schedule.coefficients(s)[2], schedule.coefficients(t)[2]
    lam = torch.linspace(ls, lt, 20001, dtype=torch.float64)
    y = lam.exp() * f(lam)
    integral = (lt - ls) / 60000 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return schedule.coefficients(t)[1] / schedule.coefficients(s)[1] * x_s + schedule.coefficients(t)[1] * integral.item()


def test_third_order_updates_are_exact_when_x0_is_quadratic_in_lambda(schedule):
    f = lambda lam: 0.3 + 0.7 * lam - 0.4 * lam ** 2          # x0 as a function of lambda
    x0_at = lambda t: _const(f(schedule.coefficients(t)[2]))
    exact = _exact_update(schedule, 0.123, f, 600, 400)
    multistep = sample._multistep_third(schedule, _const(0.123), x0_at(600), x0_at(700), x0_at(800),
                                        600, 700, 800, 400)[0].item()
    assert multistep == pytest.approx(exact, abs=1e-9)
    run = sample._Run(model=lambda x, t: torch.full_like(x, f(schedule.coefficients(int(t[0]))[2])),
                      schedule=schedule, predictions=("x0",), noise_scales=(1.0,), known=(None,),
                      generator=None, callback=None, is_tuple=False)
    s1, s2 = sample._intermediate_timesteps(schedule, 600, 400, 2)
    assert 600 > s1 > s2 > 400
    single = sample._singlestep_third(run, _const(0.123), x0_at(600), 600, s1, s2, 400)[0].item()
    assert single == pytest.approx(exact, abs=1e-8)


def test_solver_orders_follow_the_warm_up_and_lower_order_final_rules():
    # multistep (diffusers' rules): warm up 1, 2, ...; last step 1; second-to-last <= 2 below 15 steps
    assert [sample._multistep_order(i, 10, 3) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [sample._multistep_order(i, 16, 3) for i in range(16)] == [1, 2] + [3] * 13 + [1]
    assert [sample._multistep_order(i, 5, 2) for i in range(5)] == [1, 2, 2, 2, 1]
    # single-step: DPM-Solver-fast's split of the budget, lower orders first; PDM's 50 calls
    assert sample._fast_orders(49, 3) == [1] + [3] * 16
    assert sample._fast_orders(9, 3) == [1, 2, 3, 3] and sample._fast_orders(9, 2) == [1, 2, 2, 2, 2]


def test_every_model_call_gets_int64_timesteps_of_the_training_grid(schedule):
    seen = []

    def model(x, t):
        seen.append(t)
        return oracle(schedule)(x, t)
    sample.dpm_solver_pp_sample(model, randn(2, 3), schedule, steps=11, order=3, method="singlestep")
    assert len(seen) == 11                                          # steps = model calls
    assert all(t.dtype == torch.int64 and t.shape == (2,) and 0 <= int(t[0]) < 1000 for t in seen)
    assert int(seen[-1][0]) == 0                                    # the last call denoises at t = 0


# ----------------------------------------------------------------------------- 4. tuple states

def test_x0_and_v_prediction_models_give_the_same_samples_as_eps(schedule):
    x_T = randn(8, 6)
    ref = sample.ddim_sample(oracle(schedule, "eps"), x_T, schedule, steps=20)
    for prediction in ("x0", "v"):
        out = sample.ddim_sample(oracle(schedule, prediction), x_T, schedule, steps=20, prediction=prediction)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler, kwargs", [
    (sample.ddim_sample, dict(steps=15)),
    (sample.dpm_solver_pp_sample, dict(steps=15, order=3)),
    (sample.dpm_solver_pp_sample, dict(steps=16, order=3, method="singlestep")),
])
def test_tuple_state_with_mixed_predictions_equals_the_parts_sampled_separately(schedule, sampler, kwargs):
    image_model = oracle(schedule, "eps", 1.0, mu=0.2, std=0.8)         # PDM: image eps, k = 1
    map_model = oracle(schedule, "x0", 2.0, mu=-0.5, std=1.0)           # PDM: map x0, noise std 2
    x_img, x_map = randn(4, 4, 2, 2, seed=1), 2 * randn(4, 8, 4, 4, seed=2)
    joint = sampler(lambda x, t: (image_model(x[0], t), map_model(x[1], t)), (x_img, x_map), schedule,
                    prediction=("eps", "x0"), noise_scale=(1.0, 2.0), **kwargs)
    assert isinstance(joint, tuple) and joint[1].shape == (4, 8, 4, 4)
    img = sampler(image_model, x_img, schedule, prediction="eps", **kwargs)
    map_ = sampler(map_model, x_map, schedule, prediction="x0", noise_scale=2.0, **kwargs)
    torch.testing.assert_close(joint[0], img, atol=1e-6, rtol=0)
    torch.testing.assert_close(joint[1], map_, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler, kwargs, tolerance", [
    (sample.ddim_sample, dict(spacing="linspace", set_alpha_to_one=True), 0.1),
    (sample.dpm_solver_pp_sample, dict(order=2), 0.05),
    (sample.dpm_solver_pp_sample, dict(order=3, method="singlestep"), 0.02),
])
def test_map_part_with_noise_std_2_follows_its_own_exact_ode(schedule, sampler, kwargs, tolerance):
    # A wrong sign or a missing k in the map's update (PDM's code, brief §8.3) throws the map O(1)
    # off; at 50 calls the solvers' own errors are 0.05 / 0.026 / 0.007 (mean absolute).
    x_T = 2 * randn(64, 16)
    exact = sample.gaussian_flow(x_T, 999, CLEAN, -0.5, 1.0, schedule, noise_scale=2.0)
    out = sampler(oracle(schedule, "x0", 2.0, mu=-0.5, std=1.0), x_T, schedule, steps=50,
                  prediction="x0", noise_scale=2.0, **kwargs)
    assert (out.double() - exact).abs().mean().item() < tolerance


# ----------------------------------------------------------------------------- 5. guidance, known regions

def test_cfg_scale_1_is_the_conditional_prediction_and_0_the_unconditional(schedule):
    def doubled(x, t):             # first half conditional (+1), second half unconditional (-1)
        sign = torch.cat([torch.ones(len(t) // 2), -torch.ones(len(t) // 2)]).view(-1, 1)
        return x[0] + sign, x[1] * 0 + 3 * sign
    x, t = (randn(3, 2), randn(3, 5)), torch.tensor([5, 6, 7])
    cond = sample.classifier_free_guidance(doubled, 1.0)(x, t)
    torch.testing.assert_close(cond[0], x[0] + 1)
    torch.testing.assert_close(cond[1], torch.full((3, 5), 3.0))
    uncond = sample.classifier_free_guidance(doubled, 0.0)(x, t)
    torch.testing.assert_close(uncond[1], torch.full((3, 5), -3.0))
    guided = sample.classifier_free_guidance(doubled, 7.5)(x, t)       # u + 7.5 (c - u)
    torch.testing.assert_close(guided[1], torch.full((3, 5), -3.0 + 7.5 * 6))


@pytest.mark.parametrize("prediction, k", [("eps", 1.0), ("x0", 2.0)])
def test_known_region_is_q_of_the_known_latent_at_every_step(schedule, prediction, k):
    z_known, mask = randn(2, 4, 6, 6, seed=4), (randn(2, 1, 6, 6, seed=5) > 0).float()
    seen = []
    out = sample.ddim_sample(oracle(schedule, prediction, k), k * randn(2, 4, 6, 6), schedule, steps=8,
                             prediction=prediction, noise_scale=k, known=KnownRegion(z_known, mask),
                             generator=torch.Generator().manual_seed(9),
                             callback=lambda i, t, x, x0: seen.append((t, x)))
    replay = torch.Generator().manual_seed(9)    # DDIM eta = 0 draws only the hook's noise, one per step
    for t, x_t in seen:
        noise = torch.randn(x_t.shape, generator=replay)
        expected = schedule.q_sample(z_known, torch.full((2,), t), noise, noise_scale=k)
        torch.testing.assert_close(x_t * mask, expected * mask, atol=1e-6, rtol=0)
    assert torch.equal(out * mask, z_known * mask)
    assert not torch.allclose(out * (1 - mask), z_known * (1 - mask))


def test_clean_known_region_is_pasted_unchanged_at_every_step(schedule):
    z_known, mask = randn(2, 4, 6, 6, seed=4), torch.ones(2, 1, 6, 6)
    seen = []
    out = sample.dpm_solver_pp_sample(oracle(schedule), randn(2, 4, 6, 6), schedule, steps=6,
                                      known=KnownRegion(z_known, mask, clean=True),
                                      callback=lambda i, t, x, x0: seen.append(x))
    assert all(torch.equal(x, z_known) for x in seen) and torch.equal(out, z_known)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_resampling_takes_every_step_but_the_last_u_times_and_keeps_the_known_region(schedule, sampler):
    z_known, mask = randn(2, 4, 6, 6, seed=4), (randn(2, 1, 6, 6, seed=5) > 0).float()
    calls, reports = [], []
    model = lambda x, t: calls.append(int(t[0])) or oracle(schedule)(x, t)
    fn = sample.ddim_sample if sampler == "ddim" else sample.ddpm_sample
    out = fn(model, randn(2, 4, 6, 6), schedule, steps=4, known=KnownRegion(z_known, mask, resample=3),
             generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: reports.append(i))
    grid = sorted(set(calls), reverse=True)
    assert len(grid) == 4 and calls == [t for t in grid[:3] for _ in range(3)] + [grid[3]]
    assert reports == [0, 1, 2, 3]                                          # one report per step
    assert torch.equal(out * mask, z_known * mask)
    plain = fn(oracle(schedule), randn(2, 4, 6, 6), schedule, steps=4, known=KnownRegion(z_known, mask),
               generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out * (1 - mask), plain * (1 - mask))        # the takes change the result


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_resampling_goes_back_through_the_forward_process_of_the_stride(schedule, k):
    run, _ = sample._setup(oracle(schedule), torch.zeros(1), schedule, "eps", k, None,
                           torch.Generator().manual_seed(0), None)
    x = torch.full((200_000,), 1.5)
    back = sample._renoise(run, (x,), 300, 500)[0]                          # q(x_500 | x_300)
    ratio = schedule.alpha_bar[500].item() / schedule.alpha_bar[300].item()
    assert back.mean().item() == pytest.approx(ratio ** 0.5 * 1.5, abs=0.01)
    assert back.std().item() == pytest.approx(k * (1 - ratio) ** 0.5, rel=0.01)


def test_resampling_is_refused_by_dpm_solver_and_needs_a_whole_number_of_takes(schedule):
    z_known, mask = randn(1, 4, 4, 4), torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="per-step sampler"):
        sample.dpm_solver_pp_sample(oracle(schedule), randn(1, 4, 4, 4), schedule, steps=4,
                                    known=KnownRegion(z_known, mask, resample=2))
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="resample"):
            KnownRegion(z_known, mask, resample=bad)


def test_known_region_on_one_part_of_a_tuple_state_leaves_the_other_free(schedule):
    model = lambda x, t: (oracle(schedule)(x[0], t), oracle(schedule, "x0", 2.0)(x[1], t))
    z_map = randn(2, 3, 4, 4, seed=6)
    img, map_ = sample.dpm_solver_pp_sample(
        model, (randn(2, 4, 2, 2), randn(2, 3, 4, 4, seed=1)), schedule, steps=5,
        prediction=("eps", "x0"), noise_scale=(1.0, 2.0),
        known=(None, KnownRegion(z_map, torch.ones(1, 1, 4, 4), clean=True)))
    assert torch.equal(map_, z_map) and img.shape == (2, 4, 2, 2)


@pytest.mark.parametrize("argv, where", [
    (["--task", "panoptic", "--ckpt", "RUN", "--image", "a.png", "--prompt", "a red circle"], "--prompt belongs to --task cogen"),
    (["--task", "panoptic", "--ckpt", "RUN", "--image", "a.png", "--known-map", "m.png"], "--known-map belongs to --task inpaint"),
    (["--task", "panoptic", "--ckpt", "RUN", "--image", "a.png", "--split", "val"], "give them or --image, not both"),
    (["--task", "cogen", "--ckpt", "RUN", "--prompt", "a red circle", "--image", "a.png"], "--image belongs to the segmentation"),
])
def test_a_flag_the_chosen_task_would_ignore_is_refused(argv, where, capsys):
    with pytest.raises(SystemExit):
        sample.main(argv)
    assert where in capsys.readouterr().err

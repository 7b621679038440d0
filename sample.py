# SPDX-License-Identifier: MIT
"""
sample.py -- the diffusion process and its samplers, shared by LDMSeg and PDM.

What it implements
  The discrete variance-preserving diffusion both papers train on: a beta schedule with T steps,
  the forward process q(z_t | z_0), the three parameterisations of the denoiser (eps, x0, v), the
  timestep spacings used at inference, and three samplers with one shared signature:
    * DDPM ancestral sampling         [DDPM Alg. 2]            Ho et al., arXiv 2006.11239
    * DDIM, eta in [0, 1]             [DDIM Eq. 12]            Song et al., arXiv 2010.02502
    * DPM-Solver++, data prediction   [DPM-Solver++ Alg. 1-2]  Lu et al., arXiv 2211.01095
      multistep orders 1-3 and the single-step order 2/3 solver PDM samples with [PDM brief §6.5],
      on DPM-Solver's exponential integrator                    Lu et al., arXiv 2206.00927
  plus classifier-free guidance [CFG, Ho & Salimans, arXiv 2207.12598] and the known-region hook
  of LDMSeg's mask inpainting [LDMSeg brief §5; RePaint, Lugmayr et al., arXiv 2201.09865].
  LDMSeg (arXiv 2401.10227) samples its panoptic latent with DDIM, eta = 0, 50 steps;
  PDM (arXiv 2412.02929) samples (image latent, map bits) jointly with DPM-Solver++ of order 3.

Contents (grep -n '^# [0-9]' sample.py)
  1. Noise schedules          linear / scaled_linear / cosine betas; alpha_bar, sigma, SNR, lambda
  2. Forward process and parameterisations       q(z_t | z_0); eps <-> x0 <-> v
  3. Timestep spacings        leading (with offset) / trailing / linspace
  4. States and model calls   one tensor or a tuple of tensors, each with its own prediction type
                              and noise scale (PDM: image eps + map x0 with noise std 2)
  5. Guidance and known regions   classifier-free guidance; KnownRegion (the inpainting hook)
  6. DDPM ancestral sampler
  7. DDIM sampler
  8. DPM-Solver++             the exponential integrator, updates of order 1-3, the sampler
  9. A Gaussian oracle        exact denoiser and exact probability-flow ODE solution for
                              N(mu, std^2) data: what the tests and the benchmark check against
  10. Command line            python sample.py --task panoptic | inpaint | cogen | semantic | depth

Run
  python sample.py --help                       the command line
  python benchmarks/sampler_error.py            error against the exact ODE solution (seconds, CPU)
  python -m pytest tests/test_sample.py -q

Shape legend
  B batch, C channels, h,w latent, K bits, T training steps, S sampling steps,
  t a (B,) int64 tensor of training timesteps in [0, T). A "state" is one float32 tensor (B, ...)
  or a tuple of them; every sampler returns the structure it was given.

Notation (DDIM writes alpha for DDPM's alpha_bar; DPM-Solver's alpha_t is sqrt(alpha_bar_t))
  | this file                  | DDPM               | DDIM            | DPM-Solver(++)   | diffusers            |
  |----------------------------|--------------------|-----------------|------------------|----------------------|
  | alpha_bar[t]               | alpha_bar_t        | alpha_t         | alpha_t^2        | alphas_cumprod[t]    |
  | alpha = sqrt(alpha_bar)    | sqrt(alpha_bar_t)  | sqrt(alpha_t)   | alpha_t          | alpha_t              |
  | sigma = sqrt(1 - alpha_bar)| sqrt(1-alpha_bar_t)| sqrt(1-alpha_t) | sigma_t          | sigma_t              |
  | lambda = log(alpha/sigma)  | -                  | -               | lambda_t         | lambda_t             |
  | eps_pred                   | eps_theta          | eps_theta       | eps_theta        | model_output         |
  | x0_pred                    | -                  | f_theta         | x_theta          | pred_original_sample |
  | k = noise_scale            | 1                  | 1               | 1                | -                    |
  lambda = log(SNR) / 2. A part with noise scale k is noised as z_t = alpha z_0 + k sigma eps
  (PDM's map bits: k = 2); to DPM-Solver it is a schedule with sigma_t -> k sigma_t.

Deviations from the papers / reference code (and why)
  * DEVIATION: the single-step DPM-Solver++ places its intermediate points at the integer training
    timestep whose lambda is nearest to lambda_s + r h (r = 1/2, or 1/3 and 2/3) and uses that
    integer's exact lambda, instead of interpolating log alpha linearly in continuous time and
    passing a float t to the model (PDM's NoiseScheduleVP('discrete')). Every model call gets an
    int64 t the model was trained on; the updates are written for any r, so their order holds.
  * DEVIATION: the single-step solver ends at training step 0 and spends its last model call on
    x0_pred there (a first-order step to sigma = 0), so that every sampler returns a clean
    estimate; PDM stops at step 0 and returns that slightly noisy state (sigma_0 = 0.03).
  * DEVIATION: the single-step solver takes its lower-order steps first, DPM-Solver-fast last
    (see `_fast_orders`: the last lambda-step of a grid uniform in t is by far the largest).
  * DEVIATION: DPM-Solver++(3M) weighs its second-derivative term D2 twice as much as the
    DPM-Solver / diffusers code, whose D2 = (D1_0 - D1_1)/(r0 + r1) estimates h^2 x0''/2 but is
    multiplied by the coefficient of h^2 x0''. Ours is exact when x0 is quadratic in lambda (a
    test checks it) and converges with order 3; with the reference weight the error falls only
    about like order 2. Orders 1 and 2 follow diffusers' trajectory to float32 precision.
  * DEVIATION: PDM's code gets the sign of the map's signal term wrong in its single-step solver
    [PDM brief §8.3]; here every part of a tuple state goes through the same data-prediction
    update, which is exact for any noise scale k (its coefficients hold sigma only in ratios and
    lambda only in differences, in which k cancels).
  * DEVIATION: v-prediction is defined for noise scale 1 only (neither paper uses v).
  * QUIRK: DDIM ends at alpha_bar_0, not at 1, by default (set_alpha_to_one=False, Stable
    Diffusion's scheduler config), so its trajectory matches diffusers' DDIMScheduler.
  * QUIRK: multistep DPM-Solver++ of order 3 drops to order 2 on its second-to-last step when
    fewer than 15 steps are taken, as diffusers' DPMSolverMultistepScheduler(lower_order_final).

Left out
  Karras / exponential sigma grids, SDE variants of DPM-Solver++, dynamic thresholding, UniPC,
  continuous-time schedules, DDPM's sigma^2 = beta variance: neither paper uses them.
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

State = Union[Tensor, tuple[Tensor, ...]]        # one tensor (B, ...) or a tuple of them
Prediction = Literal["eps", "x0", "v"]           # what the model outputs for a part
Spacing = Literal["leading", "trailing", "linspace"]
Model = Callable[[State, Tensor], State]         # model(x_t, t) -> prediction, t (B,) int64
Callback = Callable[[int, int, State, State], None]   # callback(i, t, x_t, x0_pred)

Known = Optional[Union["KnownRegion", tuple]]        # a KnownRegion, or one (or None) per part

CLEAN = -1   # grid marker for the clean end point: alpha_bar = 1, sigma = 0, lambda = +inf


# -----------------------------------------------------------------------------
# 1. Noise schedules                  [DDPM §4; LDM / Stable Diffusion; improved DDPM Eq. 17]
# -----------------------------------------------------------------------------
# All tables are float64 on the CPU: alpha_bar is a product of 1000 factors and sigma_T, SNR_T and
# lambda at the ends of the schedule lose digits in float32. The samplers read python floats from
# these tables and do their arithmetic on float32 states.


def make_betas(kind: Literal["linear", "scaled_linear", "cosine"], num_steps: int,
               beta_start: Optional[float] = None, beta_end: Optional[float] = None) -> Tensor:
    """beta_t for t = 0..T-1 as a (T,) float64 tensor.

    linear         beta linear from 1e-4 to 0.02                       [DDPM §4] (for T = 1000)
    scaled_linear  sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) [Stable Diffusion; LDMSeg,
                   PDM both use it]
    cosine         alpha_bar[t] = f((t+1)/T) / f(0), f(u) = cos^2((u + s)/(1 + s) * pi/2),
                   s = 0.008, beta clipped to 0.999                    [improved DDPM Eq. 17]
    Index t = 0 is the first noising step (PDM's code counts it n = 1 and prepends beta_0 = 0).
    """
    T = num_steps
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta_start / beta_end")
        u = torch.arange(T + 1, dtype=torch.float64) / T                       # (T+1,) in [0, 1]
        # PAPER: s = 0.008 keeps beta_0 from being vanishingly small [improved DDPM §3.2].
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2                    # (T+1,)
        # PAPER: clip at 0.999 so the last step does not divide by alpha_bar -> 0.
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)                             # (T,)
    # PAPER: DDPM's 1e-4 ... 0.02; Stable Diffusion's 0.00085 ... 0.012 (both for T = 1000).
    default = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
    if kind not in default:
        raise ValueError(f"unknown beta schedule {kind!r}; use linear, scaled_linear or cosine")
    start = default[kind][0] if beta_start is None else beta_start
    end = default[kind][1] if beta_end is None else beta_end
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2


class NoiseSchedule:
    """Discrete VP schedule with T training steps; all tables float64 on CPU.

    alpha_bar_t = prod_{i <= t} (1 - beta_i)  [DDPM Eq. 4]; alpha_t = sqrt(alpha_bar_t),
    sigma_t = sqrt(1 - alpha_bar_t), SNR_t = alpha_bar_t / (1 - alpha_bar_t),
    lambda_t = log(alpha_t / sigma_t) = log(SNR_t) / 2 [DPM-Solver §3.1].
    The tensor methods take t: (B,) int64 and return (B,) float32 on t.device.
    """

    def __init__(self, kind: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear",
                 num_steps: int = 1000, beta_start: Optional[float] = None,
                 beta_end: Optional[float] = None):
        self.kind = kind
        self.num_steps = num_steps                                               # T
        self.betas = make_betas(kind, num_steps, beta_start, beta_end)           # (T,) float64
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)                    # (T,) float64
        # 1 - alpha_bar through expm1 of the summed log factors: exact to float64 even where
        # alpha_bar is within 1e-4 of 1 (t = 0 of the linear schedule).
        one_minus = -torch.expm1(torch.cumsum(torch.log1p(-self.betas), dim=0))  # (T,) float64
        self.log_snr_table = torch.log(self.alpha_bar) - torch.log(one_minus)    # (T,) float64
        self._tables = {"sqrt_alpha_bar": self.alpha_bar.sqrt(), "sigma": one_minus.sqrt(),
                        "snr": self.alpha_bar / one_minus, "log_snr": self.log_snr_table}
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    def _lookup(self, name: str, t: Tensor) -> Tensor:
        # float32 copies per device, cast from the float64 tables once: indexing on the device
        # avoids a host sync per training step (and MPS has no float64).
        key = (name, t.device)
        if key not in self._cache:
            self._cache[key] = self._tables[name].float().to(t.device)
        return self._cache[key][t]                                               # (B,) float32

    def sqrt_alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_t = sqrt(alpha_bar_t). t: (B,) int64 -> (B,) float32."""
        return self._lookup("sqrt_alpha_bar", t)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma_t = sqrt(1 - alpha_bar_t). t: (B,) int64 -> (B,) float32."""
        return self._lookup("sigma", t)

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t) (min-SNR weights use it). -> (B,) float32."""
        return self._lookup("snr", t)

    def log_snr(self, t: Tensor) -> Tensor:
        """log SNR_t = 2 lambda_t. t: (B,) int64 -> (B,) float32."""
        return self._lookup("log_snr", t)

    def coefficients(self, t: int) -> tuple[float, float, float]:
        """(alpha_t, sigma_t, lambda_t) as python floats from the float64 tables.

        t = CLEAN (-1) is the clean end point: (1, 0, +inf).
        """
        if t == CLEAN:
            return 1.0, 0.0, math.inf
        return (float(self._tables["sqrt_alpha_bar"][t]), float(self._tables["sigma"][t]),
                float(self.log_snr_table[t]) / 2)

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor, noise_scale: float = 1.0) -> Tensor:
        """Forward process [DDPM Eq. 4]: z_t = alpha_t z0 + sigma_t * noise_scale * noise.

        z0, noise: (B, ...) float; t: (B,) int64 -> z_t (B, ...) float32.
        noise_scale k: PDM noises its map bits with std 2, z_t = alpha z0 + 2 sigma eps.
        """
        alpha = _per_sample(self.sqrt_alpha_bar(t), z0)                          # (B, 1, ...)
        sigma = _per_sample(self.sigma(t), z0)                                   # (B, 1, ...)
        return alpha * z0 + sigma * noise_scale * noise


def _per_sample(a: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return a.view(-1, *([1] * (x.dim() - 1)))                                    # (B,) -> (B, 1, ...)


# -----------------------------------------------------------------------------
# 2. Forward process and parameterisations       [DDPM Eq. 4, 11; Salimans & Ho §4 (v)]
# -----------------------------------------------------------------------------
# z_t = alpha z_0 + k sigma eps, so knowing z_t and any one of (eps, z_0) gives the other.
# v = alpha eps - sigma x0 (Salimans & Ho, "Progressive Distillation", arXiv 2202.00512, §4) is
# the velocity of z on the unit circle alpha^2 + sigma^2 = 1; it needs k = 1.


def predict_x0_from_eps(x_t: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule,
                        noise_scale: float = 1.0) -> Tensor:
    """x0 = (x_t - k sigma_t eps) / alpha_t  [DDPM Eq. 15; DDIM Eq. 9]. x_t, eps: (B, ...)."""
    alpha = _per_sample(schedule.sqrt_alpha_bar(t), x_t)                         # (B, 1, ...)
    sigma = _per_sample(schedule.sigma(t), x_t)                                  # (B, 1, ...)
    return (x_t - noise_scale * sigma * eps) / alpha


def predict_eps_from_x0(x_t: Tensor, t: Tensor, x0: Tensor, schedule: NoiseSchedule,
                        noise_scale: float = 1.0) -> Tensor:
    """eps = (x_t - alpha_t x0) / (k sigma_t), the inverse of `predict_x0_from_eps`."""
    alpha = _per_sample(schedule.sqrt_alpha_bar(t), x_t)                         # (B, 1, ...)
    sigma = _per_sample(schedule.sigma(t), x_t)                                  # (B, 1, ...)
    return (x_t - alpha * x0) / (noise_scale * sigma)


def predict_v(x0: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The v target: v = alpha_t eps - sigma_t x0  [Salimans & Ho §4]."""
    alpha = _per_sample(schedule.sqrt_alpha_bar(t), x0)                          # (B, 1, ...)
    sigma = _per_sample(schedule.sigma(t), x0)                                   # (B, 1, ...)
    return alpha * eps - sigma * x0


def predict_x0_from_v(x_t: Tensor, t: Tensor, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x0 = alpha_t x_t - sigma_t v (uses alpha^2 + sigma^2 = 1)."""
    alpha = _per_sample(schedule.sqrt_alpha_bar(t), x_t)                         # (B, 1, ...)
    sigma = _per_sample(schedule.sigma(t), x_t)                                  # (B, 1, ...)
    return alpha * x_t - sigma * v


def predict_eps_from_v(x_t: Tensor, t: Tensor, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    """eps = sigma_t x_t + alpha_t v (uses alpha^2 + sigma^2 = 1)."""
    alpha = _per_sample(schedule.sqrt_alpha_bar(t), x_t)                         # (B, 1, ...)
    sigma = _per_sample(schedule.sigma(t), x_t)                                  # (B, 1, ...)
    return sigma * x_t + alpha * v


def to_x0_and_eps(pred: Tensor, prediction: Prediction, x_t: Tensor, t: Tensor,
                  schedule: NoiseSchedule, noise_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Any parameterisation -> (x0_pred, eps_pred), eps_pred the unit-variance noise estimate.

    The one place where the prediction type is looked at; every sampler works on the pair.
    """
    if prediction == "eps":
        return predict_x0_from_eps(x_t, t, pred, schedule, noise_scale), pred
    if prediction == "x0":
        return pred, predict_eps_from_x0(x_t, t, pred, schedule, noise_scale)
    if prediction == "v":
        if noise_scale != 1.0:
            # DEVIATION: v is defined on alpha^2 + sigma^2 = 1; with k != 1 it is not (see charter).
            raise ValueError("v-prediction needs noise_scale = 1")
        return predict_x0_from_v(x_t, t, pred, schedule), predict_eps_from_v(x_t, t, pred, schedule)
    raise ValueError(f"unknown prediction type {prediction!r}; use eps, x0 or v")


# -----------------------------------------------------------------------------
# 3. Timestep spacings                [DDIM §4.2; Lin et al., arXiv 2305.08891, Table 2]
# -----------------------------------------------------------------------------
# Which S of the T training timesteps the model is evaluated at, largest first. After the last
# one each sampler takes one more step to its end point (sigma = 0, or alpha_bar_0 for DDIM's
# default). numpy does the arithmetic because the reference schedulers round with numpy, and
# float64 ties (x.5) must fall the same way for their trajectories to match ours.


def make_timesteps(num_train_steps: int, steps: int, spacing: Spacing = "leading",
                   offset: int = 1) -> Tensor:
    """S training timesteps in descending order, as a (S,) int64 tensor.

    leading   t_i = i * floor(T/S) + offset, i = S-1..0 (DDIM / Stable Diffusion; SD's config
              uses offset 1).  T=1000, S=10, offset=1: [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
              (LDMSeg's code uses offset floor(T/S) - 1, which gives 999, 979, ..., 19 for S = 50.)
    trailing  t_i = round(T - i T/S) - 1, i = 0..S-1 (always starts at T-1).
              T=1000, S=10: [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    linspace  the S largest of round(linspace(0, T-1, S+1)), as diffusers'
              DPMSolverMultistepScheduler (its end point 0 is replaced by sigma = 0).
              T=1000, S=10: [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
              (DDIMScheduler's "linspace" is round(linspace(0, T-1, S)), which ends at 0.)
    `offset` is used by `leading` only.
    """
    T, S = num_train_steps, steps
    if not 1 <= S <= T:
        raise ValueError(f"need 1 <= steps <= num_train_steps, got steps={S}, T={T}")
    if spacing == "leading":
        ts = np.arange(S) * (T // S) + offset                                   # (S,) ascending
    elif spacing == "trailing":
        # QUIRK: np.arange with a float step, as the reference schedulers do (its values differ
        # from T - i*T/S in the last bit, which decides some x.5 roundings); for some S it
        # returns S+1 values, of which the first S are the spacing.
        ts = (np.round(np.arange(T, 0, -T / S)) - 1)[:S][::-1]                    # (S,) ascending
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, S + 1))[1:]                          # (S,) ascending
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use leading, trailing or linspace")
    ts = torch.from_numpy(ts[::-1].copy()).long()                                # (S,) descending
    repeated = (ts[:-1] <= ts[1:]).nonzero().flatten()
    if ts.min() < 0 or ts.max() >= T or len(repeated):
        # linspace has T - 1 distinct points below T - 1 (S = T repeats one); leading's offset can
        # push past T - 1 or below 0.
        what = (f"timestep {int(ts[repeated[0]])} twice" if len(repeated)
                else f"timesteps outside 0..{T - 1} ({int(ts.max())}, ..., {int(ts.min())})")
        raise ValueError(f"{spacing} spacing with T={T}, S={S}" + (f", offset={offset}" if spacing == "leading" else "")
                         + f" gives {what}; use fewer steps" + (" or another offset" if spacing == "leading" else ""))
    return ts


# -----------------------------------------------------------------------------
# 4. States and model calls                                  [PDM brief §6.2, §6.5]
# -----------------------------------------------------------------------------
# A sampler state is a tuple of parts, each with its own prediction type and noise scale: PDM
# denoises (image latent (B, 4, h, w), eps-prediction, k = 1) and (map bits (B, K, H_m, W_m),
# x0-prediction, k = 2) together, with one t for both. Internally every state is a tuple; the
# model and the callback see the caller's structure (one tensor stays one tensor).


@dataclass
class KnownRegion:
    """The known part of a state, kept fixed while the rest is generated (inpainting).

    Before every model call the known entries of x_t are replaced by a fresh sample of
    q(x_t | z0_known) = alpha_t z0_known + k sigma_t eps (one standard-normal draw of the part's
    shape from the sampler's generator), or by z0_known itself when clean=True; the returned x0
    has its known entries equal to z0_known exactly. resample = u > 1 takes every step but the
    last u times, re-noising the result back between the takes (RePaint's resampling, DDIM and
    DDPM only; section 5).
    """
    z0_known: Tensor        # (B, C, h, w) float: clean latent; only entries where mask = 1 matter
    mask: Tensor            # broadcastable to z0_known; 1 = known, 0 = to be generated
    clean: bool = False     # True: paste z0_known itself (PDM's given-map mode), not re-noised
    resample: int = 1       # u: takes of each step (1 = none)  [RePaint Alg. 1, jump length 1]

    def __post_init__(self):
        if int(self.resample) != self.resample or self.resample < 1:
            raise ValueError(f"resample must be an integer >= 1, got {self.resample}")


@dataclass
class _Run:
    """Everything a sampler needs besides the state, normalised to one entry per part."""
    model: Model                                   # model(x_t, t) -> prediction
    schedule: NoiseSchedule
    predictions: tuple[str, ...]                   # per part: eps / x0 / v
    noise_scales: tuple[float, ...]                # per part: k
    known: tuple[Optional[KnownRegion], ...]       # per part: KnownRegion or None
    generator: Optional[torch.Generator]           # all noise comes from here
    callback: Optional[Callback]
    is_tuple: bool                                 # the caller passed a tuple state


def _per_part(value, n: int, name: str) -> tuple:
    """A scalar setting for every part, or a tuple with one entry per part."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for a state of {n} parts")
        return value
    return (value,) * n


def _setup(model, x_T, schedule, prediction, noise_scale, known, generator,
           callback) -> tuple[_Run, tuple[Tensor, ...]]:
    """Normalise a sampler's arguments; returns the run and the state as a float32 tuple."""
    is_tuple = isinstance(x_T, tuple)
    x = tuple(p.float() for p in (x_T if is_tuple else (x_T,)))
    n = len(x)
    if known is not None and not isinstance(known, tuple) and n > 1:
        raise ValueError("give `known` as a tuple with one KnownRegion (or None) per part")
    known_parts = known if isinstance(known, tuple) else (known,) * n
    run = _Run(model, schedule, _per_part(prediction, n, "prediction"),
               _per_part(noise_scale, n, "noise_scale"), _per_part(known_parts, n, "known"),
               generator, callback, is_tuple)
    return run, x


def _out(run: _Run, parts: tuple[Tensor, ...]) -> State:
    """The caller's structure: a tuple stays a tuple, one part becomes a tensor."""
    return parts if run.is_tuple else parts[0]


def _randn(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device."""
    device = like.device if generator is None else generator.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device)


def _denoise(run: _Run, x: tuple[Tensor, ...], t: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One model call at training timestep t -> (x0_pred, eps_pred), one tensor per part."""
    t_b = torch.full((x[0].shape[0],), t, dtype=torch.long, device=x[0].device)   # (B,) int64
    out = run.model(_out(run, x), t_b)
    out = out if isinstance(out, tuple) else (out,)
    if len(out) != len(x):
        raise ValueError(f"the model returned {len(out)} parts for a state of {len(x)}")
    pairs = [to_x0_and_eps(o.float(), p, xi, t_b, run.schedule, k)  # bf16 outputs -> float32 math
             for o, p, xi, k in zip(out, run.predictions, x, run.noise_scales)]
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def _combine(*terms: tuple[float, tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """sum_j c_j * state_j, part by part: every solver update is such a linear combination."""
    return tuple(sum(c * s[p] for c, s in terms) for p in range(len(terms[0][1])))


def _report(run: _Run, i: int, t: int, x: tuple[Tensor, ...], x0: tuple[Tensor, ...]) -> None:
    """callback(i, t, x_t, x0_pred): step index, training timestep (int), what the model saw."""
    if run.callback is not None:
        run.callback(i, t, _out(run, x), _out(run, x0))


# -----------------------------------------------------------------------------
# 5. Guidance and known regions                 [CFG Eq. 6; LDMSeg brief §5, RePaint §4.1]
# -----------------------------------------------------------------------------


def classifier_free_guidance(model_cond_uncond: Model, scale: float) -> Model:
    """Wrap a model evaluated on one doubled batch into a guided model(x_t, t).

    model_cond_uncond(x_2B, t_2B) sees [x_t, x_t] (and [t, t]) stacked on the batch axis and must
    return predictions whose first half is conditional and second half unconditional (the
    caller's closure puts [cond, null_cond] beside them). Returns, part by part,
        guided = uncond + scale * (cond - uncond)
    Scale convention (Stable Diffusion's guidance_scale): scale = 1 is the conditional prediction,
    0 the unconditional one. [CFG Eq. 6] writes (1 + w) cond - w uncond, so scale = 1 + w;
    PDM / U-ViT's "scale s = 1" (cond + s (cond - uncond)) is scale = 2 here.
    Guiding eps, x0 or v gives the same update: each is affine in the others at fixed (x_t, t).
    """
    def guided(x_t: State, t: Tensor) -> State:
        parts = x_t if isinstance(x_t, tuple) else (x_t,)
        doubled = tuple(torch.cat([p, p]) for p in parts)                        # (B, ...) -> (2B, ...)
        out = model_cond_uncond(doubled if isinstance(x_t, tuple) else doubled[0], torch.cat([t, t]))
        out = out if isinstance(out, tuple) else (out,)
        guided_parts = []
        for o in out:
            cond, uncond = o.chunk(2)                                            # (2B, ...) -> 2 x (B, ...)
            guided_parts.append(uncond + scale * (cond - uncond))
        return tuple(guided_parts) if isinstance(x_t, tuple) else guided_parts[0]
    return guided


# RePaint's resampling [RePaint §4.2, Alg. 1 lines 4 and 12]. Replacing the known entries keeps
# them right, but the generated ones only ever see them through the model: an early step can commit
# the unknown region to something the known region then contradicts, and later steps do not undo
# it. With resample = u, each step t -> t_prev (but the last) is taken u times; between the takes
# the result goes back to t through the forward process over that stride,
#   x_t ~ q(x_t | x_prev) = N(sqrt(ab_t / ab_prev) x_prev, k^2 (1 - ab_t / ab_prev) I)   [DDPM Eq. 2],
# so the model meets its own output beside fresh known entries again. Jumps of one step (RePaint
# also goes back j > 1 steps at a time); u times the model calls. Only the per-step samplers:
# DPM-Solver++'s multistep history would mix takes.


def _resamples(run: _Run) -> int:
    """u: how many takes of each step the known regions ask for (1 = no resampling)."""
    return max([r.resample for r in run.known if r is not None] or [1])


def _renoise(run: _Run, x: tuple[Tensor, ...], t_prev: int, t: int) -> tuple[Tensor, ...]:
    """x_{t_prev} -> a sample of q(x_t | x_{t_prev}), t > t_prev  [DDPM Eq. 2 over the stride]"""
    ratio = run.schedule.coefficients(t)[0] ** 2 / run.schedule.coefficients(t_prev)[0] ** 2
    return tuple(math.sqrt(ratio) * p + k * math.sqrt(1 - ratio) * _randn(p, run.generator)
                 for p, k in zip(x, run.noise_scales))


def _take_step(run: _Run, x: tuple[Tensor, ...], i: int, num_steps: int, t: int, t_prev: int,
               step: Callable) -> tuple[Tensor, ...]:
    """Step i (of num_steps) of a per-step sampler, t -> t_prev: impose the known region, call the
    model, step(x_t, x0_pred, eps_pred) -> x_{t_prev}. With resampling the step is taken u times
    (the last step once: it lands on x0), re-noised back to t in between; reported after the last take."""
    takes = 1 if i == num_steps - 1 else _resamples(run)
    for take in range(takes):
        if take:
            x = _renoise(run, x, t_prev, t)
        x = _impose_known(run, x, t)
        x0, eps = _denoise(run, x, t)
        if take == takes - 1:
            _report(run, i, t, x, x0)
        x = step(x, x0, eps)
    return x


def _impose_known(run: _Run, x: tuple[Tensor, ...], t: int) -> tuple[Tensor, ...]:
    """Replace the known entries of x_t by q(x_t | z0_known), or by z0_known (clean or t = CLEAN)."""
    # PAPER: LDMSeg keeps the known latents fixed at every step [LDMSeg brief §5]; re-noising them
    # to t (RePaint §4.1, SD's legacy inpainting) keeps the model's input on its training
    # distribution, and clean=True gives the other reading (and PDM's given-map mode).
    out = []
    for part, region, k in zip(x, run.known, run.noise_scales):
        if region is None:
            out.append(part)
            continue
        z0 = region.z0_known.to(part.device, torch.float32)
        if not region.clean and t != CLEAN:
            t_b = torch.full((part.shape[0],), t, dtype=torch.long, device=part.device)
            z0 = run.schedule.q_sample(z0, t_b, _randn(part, run.generator), k)   # q(x_t | z0)
        out.append(torch.where(region.mask.to(part.device) > 0.5, z0, part))
    return tuple(out)


# -----------------------------------------------------------------------------
# 6. DDPM ancestral sampler                                  [DDPM Alg. 2, Eq. 6-7]
# -----------------------------------------------------------------------------
# DDPM Alg. 2 samples x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I). We write the mean as the
# posterior mean of q(x_{t-1} | x_t, x0) at x0 = x0_pred [DDPM Eq. 7] -- the same number as
# Alg. 2 line 4 for eps-models [DDPM Eq. 11], and it also serves x0-models. With S < T steps the
# "previous" step is the next grid point and beta is that stride's 1 - alpha_bar_t/alpha_bar_prev
# (respacing, improved DDPM §4). Variance: sigma^2 = beta_tilde [DDPM §3.2, the smaller of the
# paper's two choices], zero on the last step, which lands on x0_pred.


def _ddpm_step(run: _Run, x, x0, t: int, t_prev: int):
    """x_t -> x_{t_prev}: posterior mean [DDPM Eq. 7] plus beta_tilde noise [DDPM Alg. 2 line 4]."""
    ab_t = run.schedule.coefficients(t)[0] ** 2
    ab_prev = run.schedule.coefficients(t_prev)[0] ** 2
    # 1. The stride's beta: 1 - alpha_bar_t / alpha_bar_prev (= beta_t when t_prev = t - 1).
    beta = 1 - ab_t / ab_prev
    # 2. Posterior mean coefficients [DDPM Eq. 7]: mu = c_x0 x0 + c_xt x_t.
    c_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
    c_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    # 3. Posterior variance beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta [DDPM Eq. 7].
    std = math.sqrt((1 - ab_prev) / (1 - ab_t) * beta)
    mean = _combine((c_x0, x0), (c_xt, x))
    if std == 0:
        return mean
    # 4. x_prev = mu + k sigma z, z ~ N(0, I): a part with noise scale k has k^2 times the variance.
    return tuple(m + k * std * _randn(m, run.generator) for m, k in zip(mean, run.noise_scales))


def ddpm_sample(model: Model, x_T: State, schedule: NoiseSchedule, *, steps: Optional[int] = None,
                spacing: Spacing = "trailing", offset: int = 1,
                prediction: Union[Prediction, tuple] = "eps", noise_scale: Union[float, tuple] = 1.0,
                known: Known = None, generator: Optional[torch.Generator] = None,
                callback: Optional[Callback] = None) -> State:
    """Ancestral sampling [DDPM Alg. 2] from x_T down to x0.

    model(x_t, t) -> prediction, t (B,) int64; x_T: (B, ...) float or a tuple of parts.
    steps: None = all T steps (the paper's algorithm); fewer = strided (respaced) steps.
    spacing defaults to trailing, the only spacing whose S = T grid is T-1..0 with any offset.
    prediction / noise_scale: one value or one per part. known: KnownRegion (or one per part).
    generator: all noise (the ancestral steps, the known-region re-noising). Returns x0 (B, ...).
    """
    run, x = _setup(model, x_T, schedule, prediction, noise_scale, known, generator, callback)
    grid = make_timesteps(schedule.num_steps, steps or schedule.num_steps, spacing, offset).tolist()
    grid = grid + [CLEAN]                       # the last step lands on alpha_bar = 1: x0_pred
    for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:])):
        x = _take_step(run, x, i, len(grid) - 1, t, t_prev,
                       lambda x_t, x0, _: _ddpm_step(run, x_t, x0, t, t_prev))
    return _out(run, _impose_known(run, x, CLEAN))


# -----------------------------------------------------------------------------
# 7. DDIM sampler                                             [DDIM Eq. 12, 16]
# -----------------------------------------------------------------------------
# [DDIM Eq. 12], in DDPM's notation (DDIM writes alpha for alpha_bar):
#   x_prev = sqrt(ab_prev) x0_pred  +  sqrt(1 - ab_prev - s^2) eps_pred  +  s z
#            "predicted x0"            "direction pointing to x_t"          random noise
#   s = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)      [DDIM Eq. 16]
# eta = 0 is deterministic (LDMSeg); eta = 1 is DDPM's ancestral step with beta_tilde variance
# [DDIM §4.1] (a test checks that both take the same path from one generator seed).


def _ddim_step(run: _Run, x, x0, eps, t: int, t_prev: int, eta: float):
    """x_t -> x_{t_prev} [DDIM Eq. 12]; eps is the unit-variance noise estimate of each part."""
    ab_t = run.schedule.coefficients(t)[0] ** 2
    ab_prev = run.schedule.coefficients(t_prev)[0] ** 2
    # 1. Noise level of the stochastic part [DDIM Eq. 16]; 0 for eta = 0.
    s = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    # 2. Coefficient of the "direction pointing to x_t" [DDIM Eq. 12]; max() guards a -1e-17.
    c_dir = math.sqrt(max(1 - ab_prev - s * s, 0.0))
    out = []
    for x0_p, eps_p, k in zip(x0, eps, run.noise_scales):
        # 3. x_prev = sqrt(ab_prev) x0 + k c_dir eps (+ k s z): a part noised with k sigma
        #    carries k in front of every noise term.
        x_prev = math.sqrt(ab_prev) * x0_p + (k * c_dir) * eps_p
        if s > 0:
            x_prev = x_prev + (k * s) * _randn(x_prev, run.generator)
        out.append(x_prev)
    return tuple(out)


def ddim_sample(model: Model, x_T: State, schedule: NoiseSchedule, *, steps: int = 50,
                eta: float = 0.0, spacing: Spacing = "leading", offset: int = 1,
                set_alpha_to_one: bool = False, prediction: Union[Prediction, tuple] = "eps",
                noise_scale: Union[float, tuple] = 1.0, known: Known = None,
                generator: Optional[torch.Generator] = None,
                callback: Optional[Callback] = None) -> State:
    """DDIM [DDIM Eq. 12] with eta in [0, 1]. LDMSeg: eta = 0, 50 steps 999, 979, ..., 19
    (spacing="trailing", or "leading" with offset 19).

    Shared sampler signature (see `ddpm_sample`). set_alpha_to_one: the last step goes to
    alpha_bar = 1 and returns exactly the last x0_pred (what LDMSeg's code returns); False (the
    default, SD's config) goes to alpha_bar_0, as diffusers' DDIMScheduler. Each step goes to the
    next grid point (the reference's t - T//S is the same point for every leading grid).
    Returns (B, ...), or a tuple for a tuple state.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    run, x = _setup(model, x_T, schedule, prediction, noise_scale, known, generator, callback)
    grid = make_timesteps(schedule.num_steps, steps, spacing, offset).tolist()
    # QUIRK: after t_1 DDIM goes to alpha_bar_0 ("final_alpha_cumprod") unless set_alpha_to_one.
    grid = grid + [CLEAN if set_alpha_to_one else 0]
    for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:])):
        x = _take_step(run, x, i, len(grid) - 1, t, t_prev,
                       lambda x_t, x0, eps: _ddim_step(run, x_t, x0, eps, t, t_prev, eta))
    # The known entries of the result are z0_known even when DDIM stops at alpha_bar_0.
    return _out(run, _impose_known(run, x, CLEAN))


# -----------------------------------------------------------------------------
# 8. DPM-Solver++                           [DPM-Solver++ §4, Alg. 1-2; DPM-Solver §3]
# -----------------------------------------------------------------------------
# The probability-flow ODE in data-prediction form, with lambda = log(alpha / sigma) as the time
# variable, has the exact solution from s to t [DPM-Solver++ §4]
#   x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda.
# With h = lambda_t - lambda_s, phi_1 = expm1(-h) = e^-h - 1, and x0(lambda) expanded in a Taylor
# series around lambda_s, the integral's terms are
#   alpha_t (1 - e^-h)              x0          = -alpha_t phi_1                  * x0
#   alpha_t (h - 1 + e^-h)          x0'         =  alpha_t (phi_1/h + 1)          * (h x0')
#   alpha_t (h^2/2 - h + 1 - e^-h)  x0''        = -alpha_t ((phi_1/h + 1)/h - 1/2) * (h^2 x0'')
# (' = d/dlambda at s). Order 1 keeps the first term (= DDIM); the solvers of order 2 and 3 only
# differ in how they estimate D1 ~ h x0' and D2 ~ h^2 x0'': from the x0_pred of earlier steps
# (multistep, Adams-Bashforth-like) or from extra model calls inside the step (single-step,
# Runge-Kutta-like).
# Symbols: one step goes s -> t (the papers' t_{i-1} -> t_i); m = x0_pred (the papers' x_theta);
# r = (a lambda interval) / h. The noise scale k of a part appears nowhere below: sigma enters only
# as ratios and lambda only as differences, in which k cancels -- so PDM's map (k = 2) takes the
# image's update verbatim (PDM's code flips a sign there [PDM brief §8.3]; we do not).
# On the last step t is CLEAN (sigma_t = 0, h = inf): phi_1 = -1 and the first-order update
# returns x0_pred; higher orders are undefined there (r = 0), which is why every solver below
# ends with a first-order step.


def _first_order(schedule: NoiseSchedule, x, m, s: int, t: int):
    """DPM-Solver++(1) [DPM-Solver++ §4]: x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 m.

    The same update as DDIM with eta = 0, written with lambda (a test checks it step by step).
    """
    alpha_t, sigma_t, lambda_t = schedule.coefficients(t)
    _, sigma_s, lambda_s = schedule.coefficients(s)
    phi_1 = math.expm1(-(lambda_t - lambda_s))                    # e^-h - 1; -1 when t is CLEAN
    return _combine((sigma_t / sigma_s, x), (-alpha_t * phi_1, m))


def _multistep_second(schedule: NoiseSchedule, x, m0, m1, s0: int, s1: int, t: int):
    """DPM-Solver++(2M) [DPM-Solver++ Alg. 2]: one step s0 -> t reusing m1 = x0_pred at s1 > s0."""
    alpha_t, sigma_t, lambda_t = schedule.coefficients(t)
    _, sigma_s0, lambda_s0 = schedule.coefficients(s0)
    lambda_s1 = schedule.coefficients(s1)[2]
    # 1. h_i = lambda_t - lambda_s0 and r_i = h_{i-1} / h_i  [Alg. 2].
    h = lambda_t - lambda_s0
    r = (lambda_s0 - lambda_s1) / h
    phi_1 = math.expm1(-h)
    # 2. D_i = (1 + 1/(2 r)) m0 - 1/(2 r) m1 = m0 + D1/2, D1 = (m0 - m1)/r ~ h x0'  [Alg. 2].
    # 3. x_t = (sigma_t/sigma_s0) x - alpha_t phi_1 D_i  [Alg. 2].
    return _combine((sigma_t / sigma_s0, x), (-alpha_t * phi_1 * (1 + 1 / (2 * r)), m0),
                    (alpha_t * phi_1 / (2 * r), m1))


def _multistep_third(schedule: NoiseSchedule, x, m0, m1, m2, s0: int, s1: int, s2: int, t: int):
    """DPM-Solver++(3M): one step s0 -> t from x0_pred at s0 < s1 < s2 (in noise).

    The third-order multistep update of the DPM-Solver++ code release (the paper's Alg. 2 is the
    second-order one), with D1, D2 from backward differences in lambda.
    """
    alpha_t, sigma_t, lambda_t = schedule.coefficients(t)
    _, sigma_s0, lambda_s0 = schedule.coefficients(s0)
    lambda_s1, lambda_s2 = schedule.coefficients(s1)[2], schedule.coefficients(s2)[2]
    # 1. Step sizes in lambda and their ratios to h.
    h = lambda_t - lambda_s0
    r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
    # 2. Backward differences: D1_0 ~ h x0' at the midpoint of (s1, s0), D1_1 at that of (s2, s1).
    d1_0 = _combine((1 / r0, m0), (-1 / r0, m1))
    d1_1 = _combine((1 / r1, m1), (-1 / r1, m2))
    # 3. Extrapolate D1 to s0, and D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0''.
    # DEVIATION: the reference code drops the 2 (charter): its D2 is h^2 x0''/2 under the
    # coefficient of h^2 x0'', so its x0'' term is half the Taylor term and the update is not
    # exact for x0 quadratic in lambda (ours is; tests/test_sample.py checks it).
    D1 = _combine((1 + r0 / (r0 + r1), d1_0), (-r0 / (r0 + r1), d1_1))
    D2 = _combine((2 / (r0 + r1), d1_0), (-2 / (r0 + r1), d1_1))
    # 4. x_t from the three Taylor terms of the section comment.
    phi_1 = math.expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return _combine((sigma_t / sigma_s0, x), (-alpha_t * phi_1, m0), (alpha_t * phi_2, D1),
                    (-alpha_t * phi_3, D2))


def _model_x0(run: _Run, x, t: int):
    """Impose the known region, call the model at t; -> (x_t as the model saw it, x0_pred)."""
    x = _impose_known(run, x, t)
    return x, _denoise(run, x, t)[0]


def _singlestep_second(run: _Run, x, m_s, s: int, s1: int, t: int):
    """DPM-Solver++(2S) [DPM-Solver++ Alg. 1]: one step s -> t with one extra call at s1."""
    sched = run.schedule
    lambda_s, lambda_s1, lambda_t = (sched.coefficients(u)[2] for u in (s, s1, t))
    # 1. r_i = (lambda_s1 - lambda_s) / h_i (1/2 in the paper; see `_intermediate_timesteps`).
    r1 = (lambda_s1 - lambda_s) / (lambda_t - lambda_s)
    # 2. u_i: first-order step s -> s1, and the model's x0_pred there  [Alg. 1].
    u, m_s1 = _model_x0(run, _first_order(sched, x, m_s, s, s1), s1)
    # 3. D_i = (1 - 1/(2 r)) m_s + 1/(2 r) m_s1  [Alg. 1].
    D = _combine((1 - 1 / (2 * r1), m_s), (1 / (2 * r1), m_s1))
    # 4. x_t = (sigma_t/sigma_s) x - alpha_t phi_1 D_i  [Alg. 1].
    return _first_order(sched, x, D, s, t)


def _singlestep_third(run: _Run, x, m_s, s: int, s1: int, s2: int, t: int):
    """DPM-Solver++(3S): one step s -> t with extra calls at s1 and s2 [DPM-Solver §3.3,
    DPM-Solver-3, in DPM-Solver++'s data-prediction form; the Taylor form, valid for any r1 < r2]."""
    sched = run.schedule
    lambda_s, lambda_s1, lambda_s2, lambda_t = (sched.coefficients(u)[2] for u in (s, s1, s2, t))
    alpha_s2, alpha_t = sched.coefficients(s2)[0], sched.coefficients(t)[0]
    h = lambda_t - lambda_s
    r1, r2 = (lambda_s1 - lambda_s) / h, (lambda_s2 - lambda_s) / h
    # 1. First-order step s -> s1 and the model there.
    x_s1, m_s1 = _model_x0(run, _first_order(sched, x, m_s, s, s1), s1)
    # 2. Second-order step s -> s2 using D1 ~ (r2 h) x0' from (m_s1 - m_s) / r1 * r2.
    phi_1_s2 = math.expm1(-r2 * h)
    c_s2 = (r2 / r1) * alpha_s2 * (phi_1_s2 / (r2 * h) + 1)
    x_s2 = _combine((1.0, _first_order(sched, x, m_s, s, s2)), (c_s2, m_s1), (-c_s2, m_s))
    x_s2, m_s2 = _model_x0(run, x_s2, s2)
    # 3. Derivative estimates at s: D1 ~ h x0' and D2 ~ h^2 x0'' from divided differences.
    d1_0 = _combine((1 / r1, m_s1), (-1 / r1, m_s))
    d1_1 = _combine((1 / r2, m_s2), (-1 / r2, m_s))
    D1 = _combine((r2 / (r2 - r1), d1_0), (-r1 / (r2 - r1), d1_1))
    D2 = _combine((2 / (r2 - r1), d1_1), (-2 / (r2 - r1), d1_0))
    # 4. x_t from the three Taylor terms of the section comment.
    phi_1 = math.expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return _combine((1.0, _first_order(sched, x, m_s, s, t)), (alpha_t * phi_2, D1),
                    (-alpha_t * phi_3, D2))


def _intermediate_timesteps(schedule: NoiseSchedule, s: int, t: int, num: int) -> list[int]:
    """The integer timesteps strictly between t < s closest in lambda to lambda_s + r h.

    r = 1/2 for one point (DPM-Solver++(2S)), r = 1/3, 2/3 for two (DPM-Solver-3) [DPM-Solver §3.3].
    """
    # DEVIATION: snapped to training timesteps (charter); with fewer integers than points between
    # s and t the step gets fewer points and drops to the order they allow.
    interior = torch.arange(t + 1, s)                                            # strictly between
    num = min(num, len(interior))
    if num == 0:
        return []
    lam = schedule.log_snr_table[interior] / 2                                   # (n,) float64
    lambda_s, lambda_t = schedule.coefficients(s)[2], schedule.coefficients(t)[2]
    ratios = [0.5] if num == 1 else [1 / 3, 2 / 3]
    picks = [int(interior[(lam - (lambda_s + r * (lambda_t - lambda_s))).abs().argmin()])
             for r in ratios]
    if num == 2 and picks[0] == picks[1]:        # both rounded to one integer: split them
        picks = [picks[0] + 1, picks[0]] if picks[0] - 1 <= t else [picks[0], picks[0] - 1]
    return picks


def _multistep_order(i: int, num_steps: int, order: int) -> int:
    """Order of multistep step i of S: warm-up, lower-order final steps (diffusers' rules)."""
    if i == num_steps - 1:
        return 1                     # the step into sigma = 0: only order 1 is defined
    if i == num_steps - 2 and num_steps < 15:
        order = min(order, 2)        # QUIRK: diffusers' lower_order_final for fewer than 15 steps
    return min(order, i + 1)         # only i + 1 earlier x0_preds exist yet


def _fast_orders(nfe: int, order: int) -> list[int]:
    """Orders of the single-step solver's steps for `nfe` model calls  [DPM-Solver §3.4,
    "DPM-Solver-fast"]: as many steps of `order` as fit, the remainder as lower-order steps.
    """
    # DEVIATION: DPM-Solver-fast puts the lower-order steps last; we put them first. On grids
    # uniform in t (every spacing here, and PDM's "time_uniform") the last lambda-step dwarfs the
    # others -- scaled_linear, linspace, 17 steps: h = 0.34 first, 0.19 mid-way, 2.14 last -- so
    # the highest order belongs at the end. On the Gaussian oracle of benchmarks/sampler_error.py
    # this cuts the error of order 3 at 50 calls about tenfold (0.040 -> 0.004 RMS).
    if order == 3 and nfe >= 3:
        q, rem = divmod(nfe, 3)
        # PAPER: DPM-Solver-fast's split: 3, ..., 3, 2, 1 when 3 divides the budget, else 3, ..., 3, rem.
        orders = [3] * (q - 1) + [2, 1] if rem == 0 else [3] * q + [rem]
    elif order >= 2 and nfe >= 2:
        orders = [2] * (nfe // 2) + [1] * (nfe % 2)
    else:
        orders = [1] * nfe
    return orders[::-1]


def _dpm_multistep(run: _Run, x, timesteps: list[int], order: int):
    """DPM-Solver++(1M/2M/3M) over the model times `timesteps`, then into sigma = 0."""
    grid = timesteps + [CLEAN]
    ms, ss = [], []                        # the last three x0_preds and their timesteps
    for i, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
        x, m = _model_x0(run, x, s)
        _report(run, i, s, x, m)
        ms, ss = (ms + [m])[-3:], (ss + [s])[-3:]
        step_order = _multistep_order(i, len(timesteps), order)
        if step_order == 1:
            x = _first_order(run.schedule, x, m, s, t)
        elif step_order == 2:
            x = _multistep_second(run.schedule, x, ms[-1], ms[-2], ss[-1], ss[-2], t)
        else:
            x = _multistep_third(run.schedule, x, ms[-1], ms[-2], ms[-3], ss[-1], ss[-2], ss[-3], t)
    return x


def _dpm_singlestep(run: _Run, x, timesteps: list[int], orders: list[int]):
    """DPM-Solver++(2S/3S) over timesteps + [0], then one first-order step 0 -> sigma = 0."""
    grid = timesteps + [0]
    for i, (s, t, order) in enumerate(zip(grid[:-1], grid[1:], orders)):
        x, m = _model_x0(run, x, s)
        _report(run, i, s, x, m)
        inner = _intermediate_timesteps(run.schedule, s, t, order - 1)
        if len(inner) == 0:
            x = _first_order(run.schedule, x, m, s, t)
        elif len(inner) == 1:
            x = _singlestep_second(run, x, m, s, inner[0], t)
        else:
            x = _singlestep_third(run, x, m, s, inner[0], inner[1], t)
    # DEVIATION: the last call denoises at training step 0 (charter): x0_pred at sigma = 0.
    x, m = _model_x0(run, x, 0)
    _report(run, len(orders), 0, x, m)
    return _first_order(run.schedule, x, m, 0, CLEAN)


def dpm_solver_pp_sample(model: Model, x_T: State, schedule: NoiseSchedule, *, steps: int = 20,
                         order: int = 2, method: Literal["multistep", "singlestep"] = "multistep",
                         spacing: Spacing = "linspace", offset: int = 1,
                         prediction: Union[Prediction, tuple] = "eps",
                         noise_scale: Union[float, tuple] = 1.0, known: Known = None,
                         generator: Optional[torch.Generator] = None,
                         callback: Optional[Callback] = None) -> State:
    """DPM-Solver++ in data-prediction form [DPM-Solver++ Alg. 1-2] -> x0 at sigma = 0.

    Shared sampler signature (see `ddpm_sample`); steps = number of model calls (NFE).
    multistep   S = steps model times from `make_timesteps`, then sigma = 0; warm-up with lower
                orders, the last step first order; follows diffusers' DPMSolverMultistepScheduler
                (algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                final_sigmas_type="zero").
    singlestep  PDM's solver (order 3, 50 NFE [PDM brief §6.5]): orders from DPM-Solver-fast
                for steps - 1 calls (lower orders first), outer grid = make_timesteps(...) + [0],
                intermediate points snapped to integer timesteps, and a last call that returns
                x0_pred at step 0. PDM's 50 calls: orders 1, 3 x 16, then the denoise at t = 0.
    The callback gets one call per outer step (i, t, x_t, x0_pred at that step's first call).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    run, x = _setup(model, x_T, schedule, prediction, noise_scale, known, generator, callback)
    if _resamples(run) > 1:
        raise ValueError("resampling a known region (resample > 1) needs a per-step sampler: ddim or ddpm")
    T = schedule.num_steps
    if method == "multistep":
        x = _dpm_multistep(run, x, make_timesteps(T, steps, spacing, offset).tolist(), order)
    elif method == "singlestep":
        if steps < 2:
            raise ValueError("the single-step solver needs steps >= 2 (one call is the last denoise)")
        orders = _fast_orders(steps - 1, order)
        timesteps = make_timesteps(T, len(orders), spacing, offset).tolist()
        if timesteps[-1] == 0:
            raise ValueError(f"the single-step solver appends step 0 itself, but {spacing} spacing with "
                             f"{len(orders)} outer steps ends there: "
                             + ("use offset >= 1" if spacing == "leading" else "use fewer steps"))
        x = _dpm_singlestep(run, x, timesteps, orders)
    else:
        raise ValueError(f"unknown method {method!r}; use multistep or singlestep")
    return _out(run, _impose_known(run, x, CLEAN))


# -----------------------------------------------------------------------------
# 9. A Gaussian oracle                      [used by tests/test_sample.py, benchmarks/]
# -----------------------------------------------------------------------------
# For data x0 ~ N(mu, std^2) i.i.d. per element, z_t = alpha x0 + k sigma eps is jointly Gaussian
# with x0 and eps, so the best predictions are linear regressions on z_t, with
# V_t = Var(z_t) = alpha^2 std^2 + k^2 sigma^2:
#   eps*(z_t) = k sigma (z_t - alpha mu) / V_t      (k = 1: (z_t - sqrt(ab) mu) sqrt(1-ab) / (ab std^2 + 1 - ab))
#   x0*(z_t)  = mu + alpha std^2 (z_t - alpha mu) / V_t
# The probability-flow ODE of this data is linear in z and carries the marginal N(alpha mu, V_t)
# of one noise level to the next; a linear map between two 1-D Gaussians that moves continuously
# is the one that keeps the standardised value (z - alpha mu) / sqrt(V) -- differentiate
# (z - alpha mu)/sqrt(V) along dz/dt = f z - g^2/2 * grad log p_t(z) with d(alpha mu)/dt = f alpha mu
# and dV/dt = 2 f V + g^2: the two terms cancel. Hence the exact ODE solution between any two
# noise levels, whatever the schedule does in between:
#   z_to = alpha_to mu + sqrt(V_to / V_from) (z_from - alpha_from mu).


def gaussian_denoiser(mu, std, schedule: NoiseSchedule, prediction: Prediction = "eps",
                      noise_scale: float = 1.0) -> Model:
    """The exact model(x_t, t) for data N(mu, std^2) per element, computed in float64.

    mu, std: floats, or tensors broadcastable against one sample (e.g. (D,) for x_t (B, D)).
    Returns a model whose output is float32, like a network's.
    """
    mu, std = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        ab = _per_sample(schedule.alpha_bar[t.cpu()], x_t)                      # (B, 1, ...) float64
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt() * noise_scale                  # sigma incl. k
        centred = x_t.double().cpu() - alpha * mu                                # z_t - alpha mu
        var = alpha ** 2 * std ** 2 + sigma ** 2                                 # V_t
        eps = sigma * centred / var                                              # eps*(z_t)
        x0 = mu + alpha * std ** 2 * centred / var                               # x0*(z_t)
        out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
        return out.float().to(x_t.device)
    return model


def gaussian_flow(z: Tensor, t_from: int, t_to: int, mu, std, schedule: NoiseSchedule,
                  noise_scale: float = 1.0) -> Tensor:
    """Exact probability-flow ODE solution from noise level t_from to t_to (CLEAN = sigma 0),
    for data N(mu, std^2) per element (derivation above). z: (B, ...) -> (B, ...) float64."""
    mu, std = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
    a_from, s_from, _ = schedule.coefficients(t_from)
    a_to, s_to, _ = schedule.coefficients(t_to)
    v_from = a_from ** 2 * std ** 2 + (noise_scale * s_from) ** 2               # V at t_from
    v_to = a_to ** 2 * std ** 2 + (noise_scale * s_to) ** 2                     # V at t_to
    return a_to * mu + (v_to / v_from).sqrt() * (z.double().cpu() - a_from * mu)


# -----------------------------------------------------------------------------
# 10. Command line
# -----------------------------------------------------------------------------
# python sample.py --task panoptic --ckpt RUN --image IMG [IMG ...] | --split val   (LDMSeg)
# python sample.py --task inpaint --ckpt RUN --image IMG --known-map PARTIAL.png     (LDMSeg §5)
# python sample.py --task cogen --ckpt RUN --prompt "two red circles on grass" [--map MAP.png]  (PDM)
# python sample.py --task panoptic | semantic | depth --ckpt MULTITASK_RUN --split val       (LDMSeg §6)
# The models live downstream of this file (ldmseg.py imports it), so main() imports them late.


def time_shift_arg(text: str) -> int:
    """argparse type of --time-shift: a whole number of training steps, 0..999."""
    import argparse
    value = int(text)
    if not 0 <= value < 1000:
        raise argparse.ArgumentTypeError(f"takes 0..999 (training steps added to t), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (--steps, --batch-size)."""
    import argparse
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes 1 or more, got {value}")
    return value


def count_arg(text: str) -> int:
    """argparse type of counts where 0 means all (--limit)."""
    import argparse
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"takes 0 (all) or more, got {value}")
    return value


def clamp_choice(value: str | None) -> bool | None:
    """--clamp-x0 on | off | not given -> True | False | None (the checkpoint's setting)."""
    return None if value is None else value == "on"


def check_clamp_for_multitask(args, ckpt: dict) -> None:
    """Refuse --clamp-x0 on for a multi-task checkpoint without the instance task: clamping acts on the
    panoptic (instance) latent only; semantic and depth pass unclamped (ldmseg.py section 10)."""
    tasks = (ckpt.get("model_config") or {}).get("tasks") or ()
    if getattr(args, "clamp_x0", None) == "on" and tasks and "instance" not in tasks:
        raise SystemExit(f"{args.ckpt}: --clamp-x0 on clamps the instance latent, and this model was trained on "
                         f"{', '.join(tasks)} only (ldmseg.py sections 8 and 10)")


def guide_sigma_arg(text: str) -> float:
    """argparse type of --depth-guide-sigma: a colour sigma >= 0 ([-1, 1] RGB; 0 = nearest upsampling)."""
    import argparse
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"takes a colour sigma >= 0 (0 = nearest upsampling), got {text}")
    return value


def add_inpaint_options(group, prefix: str = "") -> None:
    """Inpainting's options (`ldmseg.inpaint`) on an argparse group, for this file and evaluate.py."""
    group.add_argument("--resample", type=int, default=1,
                       help=prefix + "RePaint's resampling: take every denoising step this many times, re-noising "
                            "in between (1 = none; ddim / ddpm; that many times the model calls)")
    group.add_argument("--fill-width", type=int, default=3,
                       help=prefix + "unknown pixels this close to the given ones (px) take the nearest given id "
                            "before the known latent is encoded (0 = none; ldmseg.py section 11)")
    group.add_argument("--fit-steps", type=int, default=50,
                       help=prefix + "Adam steps fitting the sampled latent's known cells and their neighbours to "
                            "the given pixels, the rest held as sampled (0 = none; ldmseg.py section 11)")
    group.add_argument("--guide-steps", type=int, default=5,
                       help=prefix + "Adam steps fitting every denoising step's x0 estimate (the known cells and "
                            "their neighbours) to the given pixels (0 = none; ldmseg.py section 11)")


def build_parser() -> "argparse.ArgumentParser":
    import argparse
    p = argparse.ArgumentParser(description="Sample a trained model: segment images (LDMSeg) or co-generate "
                                            "images and maps from a caption (PDM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=["panoptic", "inpaint", "cogen", "semantic", "depth"], default="panoptic",
                   help="panoptic: segment images with an LDMSeg stage-2 checkpoint (class-aware with a multi-task "
                        "checkpoint: its instance and semantic outputs merged); "
                        "semantic, depth: category maps or depth maps with a multi-task (train.py --stage multitask) "
                        "checkpoint; inpaint: complete a partial panoptic map (--image + --known-map); "
                        "cogen: images and category maps from --prompt with a PDM (train.py --stage cogen) checkpoint")
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    src = p.add_argument_group("inputs (one of)")
    src.add_argument("--image", nargs="+", default=[], help="image files to segment")
    src.add_argument("--split", default="", help="segment a dataset split instead (e.g. val)")
    src.add_argument("--data", default="", help="dataset folder for --split; default: the checkpoint's")
    p.add_argument("--limit", type=count_arg, default=0, help="with --split: only the first N images (0 = all)")
    inp = p.add_argument_group("inpainting (--task inpaint)")
    inp.add_argument("--known-map", default="", help="partial map: COCO id PNG or colour PNG; black / 0 = unknown")
    inp.add_argument("--known-mask", default="", help="optional mask PNG: white = known (default: map != 0)")
    inp.add_argument("--clean-known", action="store_true",
                     help="paste the clean known latent at every step instead of re-noising it to t")
    add_inpaint_options(inp)
    gen = p.add_argument_group("co-generation (--task cogen)")
    gen.add_argument("--prompt", default="", help="the caption to generate for")
    gen.add_argument("--num", type=int, default=8, help="samples to generate for the prompt")
    gen.add_argument("--text-scale", type=float, default=None,
                     help="text guidance (1 = none); default: the checkpoint's (2, PDM's s = 1)")
    gen.add_argument("--map-scale", type=float, default=None, help="map guidance (1 = none); default: the checkpoint's")
    gen.add_argument("--map", default="",
                     help="given-map mode: a single-channel PNG of category ids (0 = void), e.g. a *_map.png this "
                          "command wrote; the images are generated for that map (best with a model trained "
                          "with train.py --clean-map-prob > 0)")
    p.add_argument("--out-dir", default="samples", help="where pictures and COCO-format predictions go")
    p.add_argument("--sampler", choices=["ddim", "dpm++", "ddpm"], default=None,
                   help="sampler; default: ddim (panoptic, inpaint), the checkpoint's dpm++ (cogen; ddpm not offered)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (model calls); default: 50 (panoptic, inpaint), the checkpoint's (cogen)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="cogen: samples per batch (the other tasks sample one image at a time)")
    p.add_argument("--save-trajectory", action="store_true",
                   help="panoptic (stage-2 checkpoint): also write a strip: the image, then the map decoded from "
                        "the x0 estimate at 8 points of the denoising, each labelled with its t")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights, not their EMA")
    p.add_argument("--time-shift", type=time_shift_arg, default=None,
                   help="panoptic / inpaint / multi-task: tell the denoiser t + N (ldmseg.py section 8); "
                        "default: the checkpoint's (shapes x0 runs: 300; 0 = none)")
    p.add_argument("--clamp-x0", choices=["on", "off"], default=None,
                   help="panoptic (a multi-task model's instance task): replace each x0 estimate by the latent of "
                        "the map it decodes to (ldmseg.py section 8); default: the checkpoint's (shapes runs: on). "
                        "inpaint: off unless on")
    p.add_argument("--depth-guide-sigma", type=guide_sigma_arg, default=None,
                   help="depth: upsample the depth latent guided by the image with this colour sigma (ldmseg.py "
                        "section 10); default: the checkpoint's (0.1); 0 = nearest")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda")
    return p


def _inputs(args, train_cfg: dict):
    """Yield (file_name, image_id, image tensor (3, S, S) in [-1, 1], original (H, W), picture) per input.

    picture: (H, W, 3) uint8, the image at its own size for overlays -- the file itself for --image; a
    split's items come at the model's size, so there it is that tensor resized (bicubic) to (H, W).
    """
    import numpy as np
    from PIL import Image
    import data
    size = train_cfg["image_size"]
    if args.image:
        stems = [Path(p).stem for p in args.image]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:                             # the outputs are named by stem: one would overwrite the other
            raise SystemExit(f"--image: several inputs named {twice[0]}.* (their outputs would overwrite each "
                             f"other); rename them or sample them in separate runs")
        for k, path in enumerate(args.image):
            im = data.read_image(path)
            x = np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0
            yield Path(path).name, k, torch.from_numpy(x).permute(2, 0, 1), (im.height, im.width), np.asarray(im)
        return
    ds = data.shapes_dataset(args.data or train_cfg["data"], args.split, size=size)
    for i in range(len(ds) if not args.limit else min(args.limit, len(ds))):
        item = ds[i]
        orig = item["orig_size"]
        picture = np.asarray(Image.fromarray(((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)
                                             .astype(np.uint8)).resize(orig[::-1], Image.BICUBIC))
        yield item["file_name"], item["image_id"], item["image"], orig, picture


def _trajectory_strip(model, rgb: "np.ndarray", frames: list, size) -> "np.ndarray":
    """One row: the image, then the map decoded from each x0 estimate collected along the sampling
    path, each panel labelled underneath (the sampler's t; the model was told t + the time shift).

    rgb: (H, W, 3) uint8; frames: [(t, x0 (1, 4, h, w))]; size: (H, W).  -> (H + 12, (1 + n) W, 3) uint8.
    """
    import numpy as np
    from PIL import Image, ImageDraw
    import data
    import ldmseg
    panels = [("image", rgb)] + [(f"t={t}", data.colorize(ldmseg.decode_panoptic(model, x0, size)[0]))
                                 for t, x0 in frames]
    strip = Image.new("RGB", (len(panels) * size[1], size[0] + 12), "white")
    draw = ImageDraw.Draw(strip)
    for k, (label, pic) in enumerate(panels):
        strip.paste(Image.fromarray(pic), (k * size[1], 0))
        draw.text((k * size[1] + 3, size[0]), label, fill="black")      # PIL's built-in bitmap font
    return np.asarray(strip)


def segment_images(args, model, train_cfg: dict, device) -> Path:
    """The panoptic task: segment every input, write coloured maps, overlays and COCO predictions."""
    import numpy as np
    from PIL import Image
    import data
    import ldmseg
    out = Path(args.out_dir)
    writer = data.PanopticWriter(out)
    gen = torch.Generator().manual_seed(args.seed)
    for file_name, image_id, x, orig, rgb in _inputs(args, train_cfg):
        frames: list = []
        keep = set(np.linspace(0, args.steps - 1, 8).round().astype(int).tolist())
        cb = (lambda i, t, x_t, x0: frames.append((t, x0)) if i in keep else None) if args.save_trajectory else None
        ids = ldmseg.segment(model, x[None].to(device), sampler=args.sampler, steps=args.steps,
                             generator=gen, callback=cb, size=orig)[0].cpu().numpy()
        writer.add(file_name, image_id, ids)
        stem = Path(file_name).stem
        Image.fromarray(data.colorize(ids)).save(out / f"{stem}_color.png")
        Image.fromarray(data.overlay(rgb, ids)).save(out / f"{stem}_overlay.png")
        if frames:
            Image.fromarray(_trajectory_strip(model, rgb, frames, orig)).save(out / f"{stem}_trajectory.png")
        print(f"{file_name}: {len(np.unique(ids[ids > 0]))} segments")
    path = writer.close()
    print(f"wrote pictures and COCO panoptic predictions ({path}) to {out}")
    return path


def _read_known(args, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The partial map (H, W) int64 user ids and the pixel known-mask (H, W) bool, at the image's `size`.

    A map of another size is resized nearest (label maps are never interpolated), with a notice.
    Colour PNGs (any mode of several bands, or a palette) are read as COCO's id = R + 256 G + 256^2 B.
    """
    from PIL import Image
    import data
    for flag, path in (("--known-map", args.known_map), ("--known-mask", args.known_mask)):
        if path and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    with _open_image("--known-map", args.known_map) as im:
        colour = len(im.getbands()) > 1 or im.mode == "P"
        arr = np.asarray(im.convert("RGB")) if colour else np.asarray(im)
    ids = data.rgb2id(arr) if colour else arr.astype(np.int64)
    if ids.shape != size:
        print(f"note: --known-map is {ids.shape[1]}x{ids.shape[0]}, the image {size[1]}x{size[0]}: resized (nearest)")
        ids = data.nearest_resize(ids, size)
    known = ids > 0
    if args.known_mask:
        with _open_image("--known-mask", args.known_mask) as im:
            known = data.nearest_resize(np.asarray(im.convert("L")) > 127, size) & known
    return np.where(known, ids, 0), known


def inpaint_image(args, model, train_cfg: dict, device) -> Path:
    """The inpaint task: complete --known-map for --image; write map, colour, overlay and a figure."""
    import numpy as np
    from PIL import Image
    import data
    import ldmseg
    if len(args.image) != 1 or not args.known_map:
        raise SystemExit("--task inpaint needs one --image and a --known-map")
    problem = ldmseg.inpaint_options_error(args.fill_width, args.resample, args.sampler, args.fit_steps,
                                           args.guide_steps)
    if problem:
        raise SystemExit(problem)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = train_cfg["image_size"]
    im = data.read_image(args.image[0])
    x = torch.from_numpy(np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0)
    given_full, known_full = _read_known(args, (im.height, im.width))      # at the image's own size
    given = torch.from_numpy(data.nearest_resize(given_full, (size, size)))   # at the model's
    pixel_known = torch.from_numpy(data.nearest_resize(known_full, (size, size)))
    cells = ldmseg.known_cells_from_pixels(pixel_known, model.mask_ae.downsample_factor)
    if not cells.any():
        print("note: no 8x8 latent cell is fully known: plain segmentation")
    ids, _ = ldmseg.inpaint(model, x.permute(2, 0, 1)[None].to(device), given, cells, sampler=args.sampler,
                            steps=args.steps, clean=args.clean_known, fill_width=args.fill_width,
                            resample=args.resample, clamp=args.clamp_x0 == "on", fit_steps=args.fit_steps,
                            guide_steps=args.guide_steps,
                            generator=torch.Generator().manual_seed(args.seed))
    ids = data.nearest_resize(ids.numpy(), (im.height, im.width))
    ids = np.where(known_full, given_full, ids)              # the given ids, to the pixel, at the image's size
    stem = Path(args.image[0]).stem
    rgb = np.asarray(im)
    data.write_panoptic_png(out / f"{stem}_completed.png", ids)
    Image.fromarray(data.colorize(ids)).save(out / f"{stem}_completed_color.png")
    Image.fromarray(data.overlay(rgb, ids)).save(out / f"{stem}_overlay.png")
    figure = np.concatenate([rgb, data.colorize(given_full), data.colorize(ids)], axis=1)
    Image.fromarray(figure).save(out / f"{stem}_inpaint.png")
    print(f"{stem}: {int(known_full.mean() * 100)}% of pixels given, {len(np.unique(ids[ids > 0]))} "
          f"segments; wrote {stem}_completed.png (ids), _completed_color.png, _overlay.png, _inpaint.png "
          f"(image | given | completed) to {out}")
    return out


def _open_image(flag: str, path):
    """PIL's Image.open, with one clear error for a file that is not an image."""
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"{flag} {path}: not a readable image ({exc})") from None


def _read_category_map(path: str, config) -> Tensor:
    """--map: a single-channel PNG of category ids (0 = void) -> (1, H, W) int64, checked against the model."""
    import numpy as np
    from PIL import Image
    if not Path(path).is_file():
        raise SystemExit(f"--map {path}: no such file")
    with _open_image("--map", path) as im:
        if im.mode not in ("L", "I", "I;16"):
            raise SystemExit(f"--map {path}: a PNG of mode {im.mode}; expected a single-channel PNG whose pixel "
                             f"values are category ids (0 = void), as the *_map.png files of --task cogen. A COCO "
                             f"panoptic PNG holds segment ids, not category ids: convert it with its JSON's "
                             f"segments_info first")
        ids = np.asarray(im).astype(np.int64)
    if ids.max() > config.num_categories:
        raise SystemExit(f"--map {path}: ids up to {ids.max()}, but this model knows category ids "
                         f"0..{config.num_categories}")
    return torch.from_numpy(ids)[None]                                        # (1, H, W)


def _given_map_bits(args, config) -> Optional[Tensor]:
    """The given map as the PDM's clean map bits (1, K, H_m, W_m) (min-pooled as in training), or None."""
    import cogen
    if not args.map:
        return None
    category = _read_category_map(args.map, config)
    if not config.clean_map_prob:
        print("note: this model never saw a clean map in training (train.py --clean-map-prob): it reads the given "
              "map as a nearly noise-free one, and its images follow it only as far as that reading goes")
    # A panoptic model also wants instance bits: each connected region of one category is an instance.
    segments = cogen.connected_components(category[0])[None] if config.panoptic else None
    return cogen.encode_map(category, config, segments, torch.Generator().manual_seed(args.seed))


def _prompt_notes(model, prompt: str) -> None:
    """Print what the model cannot read of the prompt: unknown words, words beyond its L tokens."""
    words = model.tokenizer.words(prompt)
    unknown = sorted({w for w in words if w not in model.tokenizer.index})
    if unknown:
        print(f"note: words never seen in training (read as <unk>): {', '.join(unknown)}")
    if len(words) > model.tokenizer.length:
        print(f"note: the prompt has {len(words)} words; the model reads the first {model.tokenizer.length}")


def _cogen_pictures(model, autoencoder, args, given: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """--num samples for --prompt, in batches of --batch-size from one generator.

    Returns images (N, 3, H, W) in [-1, 1], category maps (N, H, W) int64 at image size (0 = void)
    and, for a panoptic PDM, its segments (N, H, W) int64 (one per (category, instance id) pair), else None.
    """
    import cogen
    import evaluate
    gen, images, maps, segments = torch.Generator().manual_seed(args.seed), [], [], []
    for lo in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - lo)
        x0_image, m0_bits = cogen.generate(model, [args.prompt] * n, sampler=args.sampler, steps=args.steps,
                                           text_scale=args.text_scale, map_scale=args.map_scale, generator=gen,
                                           given_map=None if given is None else given.expand(n, -1, -1, -1))
        x = cogen.decode_images(autoencoder, x0_image).cpu()                  # (n, 3, H, W)
        category, instance = cogen.decode_map(m0_bits, model.config)        # (n, H_m, W_m) each
        # Bits can spell ids above num_categories, which name no category (PDM's MCD drops them
        # [PDM brief §7.1]): they are written as void, so every written map can be fed back as --map.
        category = torch.where(category > model.config.num_categories, 0, category).cpu()
        images.append(x)
        maps.append(cogen.nearest_resize_ids(category, tuple(x.shape[-2:])))
        if instance is not None:
            seg = torch.stack([evaluate.map_instances(c, model.config.num_categories, i)
                               for c, i in zip(category, instance.cpu())])           # (n, H_m, W_m)
            segments.append(cogen.nearest_resize_ids(seg, tuple(x.shape[-2:])))
    return torch.cat(images), torch.cat(maps), torch.cat(segments) if segments else None


def _count_line(counts: dict[int, int], names: dict[int, str]) -> str:
    """'circle 2, square 1, grass 1' from {category id: count} (cogen.component_counts / instance_counts)."""
    return ", ".join(f"{names.get(k, f'id {k}')} {n}" for k, n in sorted(counts.items())) or "(empty)"


def cogen_images(args, ckpt: dict, device) -> Path:
    """The cogen task: write grid.png (images / coloured maps / overlays) and every image and map."""
    import numpy as np
    from PIL import Image
    import cogen
    import data
    import train
    with train.weights_must_fit(args.ckpt):               # a damaged / foreign file: one clear error
        model = cogen.load_pdm(ckpt, use_ema=not args.raw_weights)
        autoencoder = cogen.load_image_ae(ckpt)
    model, autoencoder = model.to(device), autoencoder.to(device)
    if model.tokenizer is None:
        raise SystemExit(f"{args.ckpt}: a context-mode PDM reads precomputed CLIP features, not prompts")
    given = _given_map_bits(args, model.config)
    _prompt_notes(model, args.prompt)
    images, maps, segments = _cogen_pictures(model, autoencoder, args, given)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in ckpt.get("categories", [])}
    # A panoptic PDM's segments also go out as a COCO panoptic folder (panoptic/NN.png + panoptic.json).
    writer = data.PanopticWriter(out, ckpt.get("categories")) if segments is not None else None
    rows: list = [[], [], []] + ([[]] if writer else [])
    for k, (x, ids) in enumerate(zip(images, maps)):
        rgb = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)   # (3, H, W) -> (H, W, 3)
        ids = ids.numpy()
        Image.fromarray(rgb).save(out / f"{k:02d}_image.png")
        Image.fromarray(ids.astype(np.uint8)).save(out / f"{k:02d}_map.png")          # category ids, mode L
        Image.fromarray(data.colorize(ids)).save(out / f"{k:02d}_map_color.png")
        pictures = [rgb, data.colorize(ids), data.overlay(rgb, ids)]
        if writer:
            seg = segments[k].numpy()
            category_of = {int(i): int(ids[seg == i][0]) for i in np.unique(seg) if i}
            writer.add(f"{k:02d}.png", k, seg, category_of)
            pictures.append(data.colorize(seg))
            counts = cogen.instance_counts(torch.from_numpy(ids), torch.from_numpy(seg))    # segments
        else:
            counts = cogen.component_counts(torch.from_numpy(ids))                         # connected components
        print(f"{k:02d}: {_count_line(counts, names)}")
        for row, picture in zip(rows, pictures):
            row.append(picture)
    Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)).save(out / "grid.png")
    if writer:
        writer.close()
    extra = ", panoptic/NN.png + panoptic.json (the segments, COCO format)" if writer else ""
    print(f"wrote grid.png (rows: images, maps, overlays{', segments' if writer else ''}) and NN_image.png, "
          f"NN_map.png (category ids), NN_map_color.png{extra} for {args.num} samples of {args.prompt!r} to {out}")
    return out


def multitask_images(args, device) -> Path:
    """--task panoptic | semantic | depth with a multi-task checkpoint (train.py --stage multitask)  [LDMSeg §6].

    panoptic: class-aware, the instance and semantic outputs merged (ldmseg.merge_panoptic), written as
    COCO predictions with the checkpoint's categories plus colour and overlay pictures; semantic:
    NAME_semantic.png (category ids, 0 = void) and a colour picture; depth: NAME_depth.png (uint16
    millimetres, the dataset's format) and a grey picture, near = bright.
    """
    import numpy as np
    from PIL import Image
    import data
    import ldmseg
    import train
    if args.task == "inpaint":
        raise SystemExit(f"{args.ckpt}: mask inpainting needs a stage-2 checkpoint (train.py --stage 2)")
    ckpt = train.load_checkpoint(args.ckpt, "multitask")
    check_clamp_for_multitask(args, ckpt)
    with train.weights_must_fit(args.ckpt):
        model = ldmseg.load_ldmseg(ckpt, use_ema=not args.raw_weights, time_shift=args.time_shift,
                                   depth_guide_sigma=args.depth_guide_sigma,
                                   clamp_x0=clamp_choice(args.clamp_x0)).to(device)
    categories = ckpt["categories"]
    names = {c["id"]: c["name"] for c in categories}
    tasks = ("instance", "semantic") if args.task == "panoptic" else (args.task,)
    missing = [t for t in tasks if t not in model.config.tasks]
    if missing:
        raise SystemExit(f"{args.ckpt}: --task {args.task} needs the {' and '.join(missing)} task, but this model "
                         f"was trained on {', '.join(model.config.tasks)} (train.py --tasks)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = data.PanopticWriter(out, categories) if args.task == "panoptic" else None
    gen = torch.Generator().manual_seed(args.seed)
    for file_name, image_id, x, orig, rgb in _inputs(args, ckpt["config"]):
        pred = ldmseg.predict_tasks(model, x[None].to(device), tasks, sampler=args.sampler, steps=args.steps,
                                    generator=gen, size=orig)
        pred = {k: v[0].cpu() for k, v in pred.items()}                     # (H, W) each
        stem = Path(file_name).stem
        if args.task == "panoptic":
            merged, info = ldmseg.merge_panoptic(pred["instance"], pred["semantic"], categories)
            writer.add(file_name, image_id, merged.numpy(), {s["id"]: s["category_id"] for s in info})
            Image.fromarray(data.colorize(merged)).save(out / f"{stem}_color.png")
            Image.fromarray(data.overlay(rgb, merged.numpy())).save(out / f"{stem}_overlay.png")
            print(f"{file_name}: " + (", ".join(names[s["category_id"]] for s in info) or "(no segment)"))
        elif args.task == "semantic":
            known = torch.tensor(sorted(names))
            semantic = torch.where(torch.isin(pred["semantic"], known), pred["semantic"], 0).numpy()
            Image.fromarray(semantic.astype(np.uint8)).save(out / f"{stem}_semantic.png")     # mode L: ids
            Image.fromarray(data.colorize(semantic)).save(out / f"{stem}_semantic_color.png")
            print(f"{file_name}: " + ", ".join(names[int(c)] for c in np.unique(semantic) if c))
        else:
            depth = pred["depth"]
            millimetres = (depth * 1000).round().clamp(0, 65535).numpy().astype(np.uint16)
            Image.fromarray(millimetres).save(out / f"{stem}_depth.png")                     # mode I;16
            grey = ldmseg.depth_picture(depth, model.config.depth_range).numpy()
            Image.fromarray(grey).save(out / f"{stem}_depth_color.png")
            print(f"{file_name}: depth {float(depth.min()):.2f} - {float(depth.max()):.2f} m")
    if writer is not None:
        print(f"wrote class-aware COCO panoptic predictions ({writer.close()})")
    print(f"wrote {args.task} pictures to {out}")
    return out


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests named on the command line: the arguments parsed again with every default suppressed."""
    import argparse
    import copy
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def refuse_ignored(parser: argparse.ArgumentParser, given: set[str], flags, where: str) -> None:
    """parser.error naming those of `flags` that were given, when `where` is the only place they act:
    a flag the chosen task would ignore is refused, not silently dropped."""
    named = [f"--{f.replace('_', '-')}" for f in flags if f in given]
    if named:
        parser.error(f"{', '.join(named)} {'belongs' if len(named) == 1 else 'belong'} to {where}")


INPAINT_FLAGS = ("known_map", "known_mask", "clean_known", "resample", "fill_width", "fit_steps", "guide_steps")
COGEN_FLAGS = ("prompt", "num", "text_scale", "map_scale", "map")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """Refuse the flags the chosen task (or input) would ignore."""
    if args.task != "inpaint":
        refuse_ignored(parser, given, INPAINT_FLAGS, "--task inpaint")
    if args.task != "cogen":
        refuse_ignored(parser, given, COGEN_FLAGS, "--task cogen")
    else:
        refuse_ignored(parser, given, ("image", "split", "data", "limit"), "the segmentation tasks, not --task cogen")
    if args.image and given & {"split", "data", "limit"}:
        parser.error("--split, --data and --limit choose images from a dataset split: give them or --image, not both")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args, given_flags(parser, argv))
    import train
    import ldmseg
    device = train.pick_device(args.device)
    if args.save_trajectory and (args.task != "panoptic" or train.checkpoint_stage(args.ckpt) not in (None, "2")):
        raise SystemExit("--save-trajectory belongs to --task panoptic with a stage-2 (LDMSeg) checkpoint")
    if args.task == "cogen":
        if not args.prompt.strip():
            raise SystemExit("--task cogen needs a non-empty --prompt, e.g. --prompt \"two red circles on grass\"")
        if args.num < 1 or args.sampler == "ddpm":
            raise SystemExit("--task cogen needs --num >= 1 and samples with dpm++ or ddim")
        ckpt = train.load_checkpoint(args.ckpt, "cogen")
        try:
            cogen_images(args, ckpt, device)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        return 0
    args.sampler, args.steps = args.sampler or "ddim", args.steps or 50
    if not args.image and not args.split:
        raise SystemExit("give --image IMG [IMG ...] or --split NAME")
    if args.task in ("semantic", "depth") or train.checkpoint_stage(args.ckpt) == "multitask":
        try:
            multitask_images(args, device)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        return 0
    ckpt = train.load_checkpoint(args.ckpt, "2")
    with train.weights_must_fit(args.ckpt):                   # a damaged / foreign file: one clear error
        model = ldmseg.load_ldmseg(ckpt, use_ema=not args.raw_weights, time_shift=args.time_shift,
                                   clamp_x0=clamp_choice(args.clamp_x0))
    model = model.to(device)
    try:
        if args.task == "inpaint":
            inpaint_image(args, model, ckpt["config"], device)
        else:
            segment_images(args, model, ckpt["config"], device)
    except ValueError as exc:                   # bad input (e.g. too many given segments): one clear line
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

# SPDX-License-Identifier: MIT
"""
benchmarks/sampler_error.py -- how far each sampler lands from the exact probability-flow ODE solution.

For Gaussian data x0 ~ N(mu_j, std_j^2) (independently per element j) the best denoiser and the
exact solution of the probability-flow ODE are both known in closed form (sample.py, section 9).
We start every deterministic sampler from the same x_T at t = 999 and compare what it returns
(at sigma = 0) with the exact ODE solution from that x_T, as the number of model calls grows.
Every error is the solver's own: the model is exact.

Setup: Stable Diffusion's scaled_linear schedule, T = 1000 (both papers); the linspace spacing
(starts at t = 999 for every step count); 64 samples of 256 elements with mu_j ~ U(-1, 1) and
std_j ~ U(0.1, 1.0); error = root mean square of (sample - exact) over all elements.
DDIM runs with set_alpha_to_one=True so that it ends at sigma = 0 like the others; it then
equals DPM-Solver++(1M) step for step. Columns count model calls (NFE); the single-step solvers
spend the last call on x0_pred at t = 0 (sample.py, section 8).
The multistep rows are bounded by their last step, a first-order jump from the last model time
(t = 1000/S on this grid) straight to sigma = 0, as diffusers' final_sigmas_type="zero" does;
that is why 2M and 3M end up close, while the single-step solvers, which reach t = 0 first,
keep gaining from their order.

Run:  python benchmarks/sampler_error.py        (a few seconds on a CPU)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402  (the repository root is put on the path first)

STEPS = (5, 10, 20, 50, 100)


def samplers():
    """(name, sampler(model, x_T, schedule, steps) -> x0) for every deterministic sampler."""
    def dpm(order, method):
        return lambda m, x, s, n: sample.dpm_solver_pp_sample(m, x, s, steps=n, order=order,
                                                              method=method, spacing="linspace")
    return [
        ("DDIM (eta = 0)", lambda m, x, s, n: sample.ddim_sample(
            m, x, s, steps=n, spacing="linspace", set_alpha_to_one=True)),
        ("DPM-Solver++(1M)", dpm(1, "multistep")),
        ("DPM-Solver++(2M)", dpm(2, "multistep")),
        ("DPM-Solver++(3M)", dpm(3, "multistep")),
        ("DPM-Solver++(2S)", dpm(2, "singlestep")),
        ("DPM-Solver++(3S)", dpm(3, "singlestep")),
    ]


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip()).parse_args(argv)   # --help; no options
    start = time.time()
    schedule = sample.NoiseSchedule("scaled_linear", 1000)
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(256, generator=gen) * 2 - 1                               # (D,) in [-1, 1)
    std = torch.rand(256, generator=gen) * 0.9 + 0.1                          # (D,) in [0.1, 1.0)
    x_T = torch.randn(64, 256, generator=gen)                                 # (B, D) at t = 999
    model = sample.gaussian_denoiser(mu, std, schedule, prediction="eps")
    exact = sample.gaussian_flow(x_T, 999, sample.CLEAN, mu, std, schedule)  # (B, D) float64

    print("RMS error against the exact probability-flow ODE solution (Gaussian data, "
          "scaled_linear, T = 1000, linspace spacing)\n")
    print("| sampler | " + " | ".join(f"{n} NFE" for n in STEPS) + " |")
    print("|---|" + "---:|" * len(STEPS))
    for name, run in samplers():
        errors = [((run(model, x_T, schedule, n).double() - exact) ** 2).mean().sqrt().item()
                  for n in STEPS]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    print(f"\n(data std averages {std.mean().item():.2f}; {time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

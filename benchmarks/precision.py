# SPDX-License-Identifier: MIT
"""
benchmarks/precision.py -- do bf16 autocast and torch.compile train the same models as fp32 eager?

For each stage asked for (vae, 1, 2 by default), this runs train.py once per mode from the same
seed and the same data -- fp32 eager (the reference), bf16 autocast eager, bf16 autocast +
torch.compile (--modes picks) -- logging the loss at every step, and prints:
  * the first step's loss in each mode: same weights, same batch, same noise, so the only
    difference is the arithmetic (bf16 rounds each matmul / convolution input to 8 mantissa bits);
  * the mean loss over the last quarter of the run, the figure a training curve is judged by. The
    trajectories themselves diverge slowly (rounding differences grow through the updates), so
    step-by-step equality is not expected after the first step;
  * wall-clock time and steps/s of each whole run: compilation, the end-of-run evaluation and, for the
    first run, writing Shapes when --data does not exist yet are all in it.
A mode agrees when its first-step loss is within --first-tol and its last-quarter mean within
--mean-tol (relative) of the reference's. Stage 2 runs on the same frozen autoencoders in every
mode (the reference mode's runs when this call trained them, else train.py's default ones), so the
stage-2 runs differ in their own arithmetic only. The end-of-run evaluations are
shortened (--eval-images) since only the losses are compared here.

Run (a CUDA device; on a CPU bf16 autocast is slower and compile rarely pays, so train.py keeps fp32):
  python benchmarks/precision.py --device cuda --steps 300
Measured on one H200 (PyTorch 2.11.0+cu130), `shapes`, 300 steps (relative gaps to fp32 eager:
first step / last-quarter mean):
  image AE     bf16 2.3e-3 / 3.0e-2    bf16 + compile 2.3e-3 / 5.1e-2 (just outside 5 %)
  mask AE      bf16 1.4e-4 / 4.9e-3    bf16 + compile 1.8e-4 / 4.5e-2
  LDMSeg UNet  bf16 1.1e-3 / 5.1e-3    bf16 + compile 1.1e-3 / 8.8e-3
(the stage-2 rows from a separate `--stages 2` run, beside another training job; README, Speed).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (the repository root is put on the path first)

MODES = {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"], "bf16+compile": ["--dtype", "bf16", "--compile"]}
LOSS = re.compile(r"^step (\d+) \| loss ([0-9.eE+-]+|nan|inf)")


def read_losses(run_dir: Path) -> list[float]:
    """The loss of every logged step of a run's log.txt, in step order."""
    rows = [LOSS.match(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    return [float(m.group(2)) for m in rows if m]


def run_dir(root: Path, stage: str, mode: str) -> Path:
    return root / f"{stage}_{mode.replace('+', '_')}"


def run_stage(stage: str, mode: str, args, root: Path, extra: list[str]) -> dict:
    """Train one stage in one mode with a loss line every step; its losses, time and speed."""
    out = run_dir(root, stage, mode)
    argv = ["--stage", stage, "--preset", args.preset, "--data", args.data, "--out-dir", str(out),
            "--max-steps", str(args.steps), "--device", args.device, "--log-every", "1",
            "--preview-every", "0", "--ckpt-every", str(10 * args.steps), "--eval-images", str(args.eval_images),
            "--seed", str(args.seed), "--num-workers", str(args.num_workers)] + MODES[mode] + extra
    if stage == "2":
        argv += ["--eval-steps", "5", "--eval-dpm-steps", "5"]
    if out.exists():                               # an earlier run of this benchmark: start afresh
        shutil.rmtree(out)
    start = time.perf_counter()
    train.main(argv)
    seconds = time.perf_counter() - start
    losses = read_losses(out)
    tail = losses[-max(1, len(losses) // 4):]
    return {"first": losses[0], "last_quarter_mean": sum(tail) / len(tail), "seconds": seconds,
            "steps": len(losses), "run": str(out)}


def compare(stage: str, results: dict, first_tol: float, mean_tol: float) -> list[str]:
    """Table rows for one stage; a mode agrees with the first (the reference) when both of its
    relative gaps are inside the tolerances."""
    ref = next(iter(results.values()))
    rows = []
    for mode, r in results.items():
        d_first = abs(r["first"] - ref["first"]) / abs(ref["first"])
        d_mean = abs(r["last_quarter_mean"] - ref["last_quarter_mean"]) / abs(ref["last_quarter_mean"])
        ok = "reference" if r is ref else ("yes" if d_first <= first_tol and d_mean <= mean_tol else "NO")
        rows.append(f"{stage:>5} {mode:>13} {r['first']:>11.5f} {d_first:>9.2e} {r['last_quarter_mean']:>11.5f} "
                    f"{d_mean:>9.2e} {r['seconds']:>8.1f} {r['steps'] / r['seconds']:>7.1f}  {ok}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", default="vae,1,2", help="stages to compare, in this order")
    p.add_argument("--modes", default=",".join(MODES), help="modes to run; the first is the reference")
    p.add_argument("--preset", default="shapes", help="train.py preset")
    p.add_argument("--data", default="data/shapes", help="dataset folder (Shapes written there if missing)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--device", default="cuda", help="device (bf16 autocast is what train.py uses on CUDA)")
    p.add_argument("--out", default="runs/precision", help="folder for the runs and results.json")
    p.add_argument("--eval-images", type=int, default=16, help="val images of each run's end-of-run evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of each run")
    p.add_argument("--first-tol", type=float, default=0.02, help="relative tolerance on the first step's loss")
    p.add_argument("--mean-tol", type=float, default=0.05, help="relative tolerance on the last-quarter mean loss")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    root = Path(args.out)
    results: dict = {}
    for stage in args.stages.split(","):
        extra = []
        if stage == "2":     # the same frozen autoencoders in every mode: the reference runs' when there are any
            vae, mae = run_dir(root, "vae", modes[0]), run_dir(root, "1", modes[0])
            extra = (["--image-vae", str(vae)] if vae.exists() else []) + (["--mask-ae", str(mae)] if mae.exists() else [])
        results[stage] = {mode: run_stage(stage, mode, args, root, extra) for mode in modes}
    lines = [f"{'stage':>5} {'mode':>13} {'first loss':>11} {'rel gap':>9} {'last 1/4':>11} {'rel gap':>9} "
             f"{'seconds':>8} {'it/s':>7}  agrees"]
    for stage, res in results.items():
        lines += compare(stage, res, args.first_tol, args.mean_tol)
    print("\n".join(lines))
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all("NO" not in row for row in lines) else 1


if __name__ == "__main__":
    sys.exit(main())

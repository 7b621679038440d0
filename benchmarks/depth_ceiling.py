# SPDX-License-Identifier: MIT
"""
benchmarks/depth_ceiling.py -- the best depth delta < 1.25 any model can reach on Shapes.

Shapes (data.py, section 3) gives its stuff a depth that follows from the picture (sky 60 m, ground
receding upwards from 3 to 30 m), but each thing's depth is drawn at random: n depths uniform in
1-2.8 m, sorted so that later-drawn things are nearer. The picture reveals at most n and a thing's
rank in that order (through occlusion), never the drawn value. This script scores an oracle that is
told more than any picture shows -- every stuff depth exactly, and for each thing n and its rank k --
and predicts for the thing the depth c*(n, k) that maximises P(max(c/d, d/c) < 1.25) under the
distribution of the k-th largest of n uniforms (found by Monte Carlo and a grid over log c). No
predictor of depth from the image can beat it in expectation, so its score bounds the multi-task
model's (README, Multi-task LDMSeg).

Printed: the oracle's AbsRel / RMSE / delta<1.25 on the val maps (evaluate.depth_metrics, as the
multi-task model is scored), its expected delta<1.25 (the Monte Carlo hit rates weighted by each
thing's area, which does not depend on this draw of depths), and the same two for an oracle that
knows only which pixels are things (one depth for every thing).

Run:  python benchmarks/depth_ceiling.py            (about 20 seconds on a CPU; writes nothing)
Measured on Shapes val (200 images, 128^2, seed 0): the rank oracle AbsRel 0.018 / RMSE 0.10 m /
delta<1.25 0.982; one depth for every thing 0.043 / 0.20 m / 0.946.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the repository root is put on the path first)
import evaluate  # noqa: E402

NEAR_RANGE = (1.0, 2.8)      # data.render_shapes_item: things' depths, uniform in metres
DELTA = 1.25


def thing_depths(seed: int, split: str, index: int, size: int) -> np.ndarray:
    """The n drawn thing depths of one Shapes item, nearest last, replaying render_shapes_item's draws."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for name, _ in data._stuff_layout(rng, size, yy, xx):
        data._texture(rng, name, size, yy)                                # consumes the same draws
    things = data._place_things(rng, size)
    return np.sort(rng.uniform(*NEAR_RANGE, len(things)))[::-1]          # (n,) as rendered


def best_depths(n_max: int, draws: int, generator: np.random.Generator) -> tuple[dict, dict]:
    """c*(n, k) and its hit rate P(max(c/d, d/c) < 1.25) for the k-th of n sorted uniforms (k = 0 farthest)."""
    grid = np.exp(np.linspace(math.log(NEAR_RANGE[0]), math.log(NEAR_RANGE[1]), 721))   # (G,) candidates
    best, rate = {}, {}
    for n in range(1, n_max + 1):
        d = np.sort(generator.uniform(*NEAR_RANGE, (draws, n)), axis=1)[:, ::-1]        # (draws, n)
        for k in range(n):
            ratio = grid[:, None] / d[None, :, k]                                       # (G, draws)
            hits = ((ratio < DELTA) & (ratio > 1 / DELTA)).mean(axis=1)                  # (G,)
            best[n, k], rate[n, k] = float(grid[hits.argmax()]), float(hits.max())
    # One depth for every thing, knowing nothing of n or k: the best c for a single uniform draw.
    u = generator.uniform(*NEAR_RANGE, draws)
    ratio = grid[:, None] / u[None]
    hits = ((ratio < DELTA) & (ratio > 1 / DELTA)).mean(axis=1)
    best["any"], rate["any"] = float(grid[hits.argmax()]), float(hits.max())
    return best, rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="val", help="Shapes split to score")
    p.add_argument("--num", type=int, default=200, help="items of the split (Shapes val has 200)")
    p.add_argument("--size", type=int, default=128, help="image side (the multi-task model is scored at 128)")
    p.add_argument("--seed", type=int, default=0, help="the Shapes seed (data.ensure_shapes writes seed 0)")
    p.add_argument("--draws", type=int, default=100_000, help="Monte Carlo draws per n")
    args = p.parse_args(argv)
    best, rate = best_depths(8, args.draws, np.random.default_rng(0))
    preds = {"rank": [], "any": []}
    expected = {"rank": [], "any": []}
    targets = []
    for i in range(args.num):
        item = data.render_shapes_item(args.seed, args.split, i, args.size)
        depth = item["depth"].astype(np.float64) / 1000                   # (H, W) metres, as the PNG holds
        near = thing_depths(args.seed, args.split, i, args.size)
        mm = np.round(near * 1000)
        rank = np.full(depth.shape, -1)
        for k, v in enumerate(mm):
            rank[item["depth"] == v] = k                                 # thing pixels -> their rank
        is_thing = rank >= 0
        # Every thing pixel must be one of the replayed depths: the replay matches the renderer.
        assert np.array_equal(is_thing, depth < NEAR_RANGE[1] + 1e-3), f"replay mismatch at item {i}"
        for name in preds:
            pred, hit = depth.copy(), np.ones(depth.shape)
            for k in range(len(near)):
                key = (len(near), k) if name == "rank" else "any"
                pred[rank == k], hit[rank == k] = best[key], rate[key]
            preds[name].append(pred)
            expected[name].append(hit.mean())
        targets.append(depth)
    target = torch.from_numpy(np.stack(targets))
    print(f"Shapes {args.split}: {args.num} images at {args.size}^2, things' depths uniform in "
          f"{NEAR_RANGE[0]}-{NEAR_RANGE[1]} m; stuff given exactly to both oracles")
    for name, label in (("rank", "told n and each thing's rank"), ("any", "one depth for every thing")):
        m = evaluate.depth_metrics(torch.from_numpy(np.stack(preds[name])), target)
        print(f"oracle {label:30s}: AbsRel {m['abs_rel']:.3f} | RMSE {m['rmse']:.2f} m | "
              f"delta<1.25 {m['delta1']:.3f} (expected over the draw of depths: {np.mean(expected[name]):.3f})")


if __name__ == "__main__":
    main()

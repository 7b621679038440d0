# SPDX-License-Identifier: MIT
"""
benchmarks/mask_ae_ceiling.py -- the best reconstruction PQ an output at H/f can hope for.

LDMSeg's mask decoder ends with logits at H/2 that are upsampled x2 bilinearly before the argmax
(ldmseg.py, section 3). However well it is trained, it can only draw the boundaries that such logits
can draw. Two answers, each scored with the PQ the trained autoencoder is scored with (class-agnostic,
LDMSeg's thresholds and area filter; and plain argmax):

  pooled  the *true* map of every val image, one-hot over the 2^K ids, averaged over f x f pixels
          and upsampled back bilinearly like the decoder's logits: what a decoder that outputs the
          share of each id in its cell would draw;
  fitted  logits at H/f fitted to the true map by gradient descent (Adam on the full-resolution
          cross-entropy through the same bilinear upsampling, starting from `pooled`): what a
          decoder could draw at best. Logits are not shares: where a boundary falls between two
          logit cells is set by their values, so it can be placed to the pixel.

Run:  python benchmarks/mask_ae_ceiling.py --data data/shapes        (two minutes on a CPU)
Measured on Shapes val (200 images, 128^2), with thresholds (argmax):
  H/2, the paper's design: pooled PQ 95.1 / SQ 98.2 / RQ 96.8 (95.8); fitted PQ 96.9 / SQ 100.0 / RQ 96.9 (100.0).
  H/4: pooled PQ 90.9 (90.7); fitted PQ 96.1 / SQ 99.2 / RQ 96.9 (97.9).
With thresholds, RQ 96.9 is the cost of the area filter alone: it drops the segments under 32 px.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the repository root is put on the path first)
import evaluate  # noqa: E402
import ldmseg  # noqa: E402


def pooled_logits(segments: torch.Tensor, factor: int, num_ids: int) -> torch.Tensor:
    """(1, H, W) ids -> (1, num_ids, H, W) log-probabilities of the one-hot map seen at H/factor."""
    one_hot = F.one_hot(segments, num_ids).permute(0, 3, 1, 2).float()      # (1, N, H, W)
    coarse = F.avg_pool2d(one_hot, factor)                                    # (1, N, H/f, W/f)
    fine = F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)
    return (fine + 1e-4).log()                                                # (1, N, H, W)


def fitted_logits(segments: torch.Tensor, factor: int, num_ids: int, steps: int = 150,
                  lr: float = 0.2) -> torch.Tensor:
    """(1, H, W) ids -> (1, num_ids, H, W): logits at H/factor fitted to the map, upsampled bilinearly.

    Adam on the mean cross-entropy of every full-resolution pixel, read through the x factor bilinear
    upsampling the decoder's logits go through (align_corners=False), from the pooled start.
    """
    start = F.avg_pool2d(F.one_hot(segments, num_ids).permute(0, 3, 1, 2).float(), factor)
    coarse = (start + 1e-4).log().requires_grad_(True)                       # (1, N, H/f, W/f)
    opt = torch.optim.Adam([coarse], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            fine = F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(fine, segments)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="COCO-layout panoptic folder (Shapes by default)")
    p.add_argument("--factors", default="2,4", help="output strides to score, comma-separated")
    p.add_argument("--num-bits", type=int, default=4, help="K: ids 0..2^K-1 (the shapes mask AE has 4)")
    p.add_argument("--size", type=int, default=128, help="image side the maps are resized to (nearest)")
    p.add_argument("--fit-steps", type=int, default=150, help="Adam steps of the fitted logits (0: pooled only)")
    args = p.parse_args(argv)
    factors = [int(x) for x in args.factors.split(",")]
    if any(f < 1 or args.size % f for f in factors):
        p.error(f"--factors {args.factors}: each must divide --size {args.size}")
    ds = data.shapes_dataset(args.data, "val", size=args.size, load_image=False, load_depth=False,
                             max_segments=2 ** args.num_bits - 1)                # ids beyond the K bits: dropped
    for f in factors:
        kinds = ["pooled"] + (["fitted"] * (args.fit_steps > 0))
        scores = {(k, d): evaluate.PQAccumulator(None, class_agnostic=True)
                  for k in kinds for d in ("thresholds", "argmax")}
        for i in range(len(ds)):
            item = ds[i]
            seg = item["segments"][None]                                      # (1, H, W)
            for kind in kinds:
                logits = (pooled_logits(seg, f, 2 ** args.num_bits) if kind == "pooled"
                          else fitted_logits(seg, f, 2 ** args.num_bits, args.fit_steps))
                for name, pred in (("thresholds", ldmseg.panoptic_from_logits(logits)), ("argmax", logits.argmax(1))):
                    pred = pred[0]
                    scores[kind, name].add(seg[0], item["segments_info"], pred, data.make_segments_info(pred.numpy()))
        for (kind, name), acc in scores.items():
            r = acc.compute()["All"]
            print(f"H/{f} {kind} {name:10s} PQ {100 * r['pq']:.1f} | SQ {100 * r['sq']:.1f} | RQ {100 * r['rq']:.1f} "
                  f"({len(ds)} val images)")


if __name__ == "__main__":
    main()

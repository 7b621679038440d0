# SPDX-License-Identifier: MIT
"""
benchmarks/mask_ae_ceiling.py -- the best reconstruction PQ an output at H/f can hope for.

LDMSeg's mask decoder ends with logits at H/2 that are upsampled x2 bilinearly before the argmax
(ldmseg.py, section 3). However well it is trained, it cannot draw a boundary finer than that grid
lets it. This script takes the *true* map of every val image, one-hot over the 2^K ids, averages it
over f x f pixels (what a perfect H/f output could hold), upsamples it back bilinearly like the
decoder's logits, and scores the result with the PQ the trained autoencoder is scored with
(class-agnostic, LDMSeg's thresholds and area filter; and plain argmax).

Run:  python benchmarks/mask_ae_ceiling.py --data data/shapes        (about a minute on a CPU)
Measured on Shapes val (200 images, 128^2): f = 2, the paper's design: PQ 95.1 / SQ 98.2 / RQ 96.8
with thresholds (95.8 with argmax); f = 4: PQ 90.9.
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="COCO-layout panoptic folder (Shapes by default)")
    p.add_argument("--factors", default="2,4", help="output strides to score, comma-separated")
    p.add_argument("--num-bits", type=int, default=4, help="K: ids 0..2^K-1 (the shapes mask AE has 4)")
    p.add_argument("--size", type=int, default=128, help="image side the maps are resized to (nearest)")
    args = p.parse_args(argv)
    ds = data.shapes_dataset(args.data, "val", size=args.size, load_image=False, load_depth=False)
    for f in (int(x) for x in args.factors.split(",")):
        scores = {k: evaluate.PQAccumulator(None, class_agnostic=True) for k in ("thresholds", "argmax")}
        for i in range(len(ds)):
            item = ds[i]
            seg = item["segments"][None]                                      # (1, H, W)
            logits = pooled_logits(seg, f, 2 ** args.num_bits)
            for name, pred in (("thresholds", ldmseg.panoptic_from_logits(logits)), ("argmax", logits.argmax(1))):
                pred = pred[0]
                scores[name].add(seg[0], item["segments_info"], pred, data.make_segments_info(pred.numpy()))
        for name, acc in scores.items():
            r = acc.compute()["All"]
            print(f"H/{f} {name:10s} PQ {100 * r['pq']:.1f} | SQ {100 * r['sq']:.1f} | RQ {100 * r['rq']:.1f} "
                  f"({len(ds)} val images)")


if __name__ == "__main__":
    main()

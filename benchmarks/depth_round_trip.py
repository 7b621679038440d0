# SPDX-License-Identifier: MIT
"""
benchmarks/depth_round_trip.py -- how much depth the multi-task model's direct depth encoding keeps.

The multi-task model (ldmseg.py, section 10) regresses depth as a 16 x 16 latent of cell medians of
log depth (encode_depth) and decodes it back to pixels (decode_depth). Whatever that round trip loses
no model can win back, so its score is a ceiling for the model's depth. This script encodes the true
depth maps of a Shapes split and decodes them with each decoder: nearest upsampling, and the image-
guided joint bilateral upsampling (ldmseg.guided_upsample) at a few colour sigmas, for one median per
cell and for 2 x 2 sub-cell medians (--depth-subcells 2). Scored with evaluate.depth_metrics, as the
model is.

Run:  python benchmarks/depth_round_trip.py                 (a few seconds on a CPU; writes nothing)
      python benchmarks/depth_round_trip.py --split train --num 100   (where the sigma was chosen)
      python benchmarks/depth_round_trip.py --picture docs/img/depth_round_trip.png
          (also a picture of the first 4 images: image | true depth | nearest | guided, near = bright)
Measured on Shapes val (200 images, 128^2), AbsRel / RMSE / delta<1.25:
  one median per cell, nearest              0.266 / 5.38 m / 0.961
  one median per cell, guided, sigma 0.1    0.024 / 0.78 m / 0.996   (the default decoder)
  2 x 2 sub-cells, nearest                  0.120 / 3.85 m / 0.980
  2 x 2 sub-cells, guided, sigma 0.1        0.014 / 0.66 m / 0.998
(sigma 0.1 chosen on 100 train maps: 0.960 nearest; 0.986 / 0.995 / 0.993 / 0.978 at 0.05 / 0.1 / 0.2 / 0.4.)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the repository root is put on the path first)
import evaluate  # noqa: E402
import ldmseg  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="a Shapes folder (written there first if missing)")
    p.add_argument("--split", default="val", help="split to score")
    p.add_argument("--num", type=int, default=200, help="items of the split (0 = all)")
    p.add_argument("--factor", type=int, default=8, help="pixels per latent cell (the mask autoencoder's f)")
    p.add_argument("--sigmas", default="0.05,0.1,0.2,0.4", help="colour sigmas of the guided decoder, [-1, 1] RGB")
    p.add_argument("--picture", default="", help="also write image | truth | nearest | guided (the default sigma, 0.1) rows here")
    args = p.parse_args(argv)
    data.ensure_shapes(args.data)
    ds = data.PanopticDataset(data.resolve_split(args.data, args.split), size=None)
    n = len(ds) if not args.num else min(args.num, len(ds))
    items = [ds[i] for i in range(n)]
    image = torch.stack([it["image"] for it in items])                   # (N, 3, H, W) in [-1, 1]
    depth = torch.stack([it["depth"] for it in items])                   # (N, H, W) metres
    config = ldmseg.LDMSegConfig()                                        # depth_range, the default sigma
    depth_range = config.depth_range
    print(f"{n} {args.split} depth maps, {tuple(depth.shape[-2:])}, cells of {args.factor} px; AbsRel / RMSE / delta<1.25")
    for subcells in (1, 2):
        z, _ = ldmseg.encode_depth(depth, args.factor, depth_range, 4, subcells)
        for sigma in [0.0] + [float(s) for s in args.sigmas.split(",")]:
            out = ldmseg.decode_depth(z, depth_range, tuple(depth.shape[-2:]), subcells, guide=image, sigma_color=sigma)
            m = evaluate.depth_metrics(out, depth)
            how = "nearest" if sigma == 0 else f"guided, sigma {sigma:g}"
            print(f"  {subcells} x {subcells} median(s) per cell, {how:<18} {m['abs_rel']:.3f} / {m['rmse']:.2f} / {m['delta1']:.3f}")
    if args.picture:
        save_picture(args.picture, image[:4], depth[:4], depth_range, args.factor, config.depth_guide_sigma)


def save_picture(path: str, image: torch.Tensor, depth: torch.Tensor, depth_range, factor: int, sigma: float) -> None:
    """Rows image | true depth | nearest round trip | guided round trip at `sigma` (one median per cell)."""
    from PIL import Image
    z, _ = ldmseg.encode_depth(depth, factor, depth_range, 4)
    size = tuple(depth.shape[-2:])
    columns = [((image.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)]
    for d in (depth, ldmseg.decode_depth(z, depth_range, size),
              ldmseg.decode_depth(z, depth_range, size, guide=image, sigma_color=sigma)):
        columns.append(torch.stack([ldmseg.depth_picture(x, depth_range) for x in d]))   # (N, H, W, 3)
    grid = torch.cat([torch.cat(list(c), dim=0) for c in columns], dim=1)                # (N H, 4 W, 3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

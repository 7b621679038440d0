# SPDX-License-Identifier: MIT
"""
benchmarks/mask_latent_geometry.py -- where the mask autoencoder puts each id in its latent.

Stage 2 denoises the mask autoencoder's latent. With random ids it must settle, for every segment,
which of the 2^K - 1 id codes all its cells take, and how far apart those codes lie (in the units
the diffusion sees: s * mean, unit variance) sets how much noise still lets two ids be told apart.
Nothing in stage 1 asks for the codes to be far apart: its loss reads the decoder's logits only.
For a stage-1 or stage-2 checkpoint this prints:

  channels  mean and std of each latent channel over train maps, ids drawn at random as stage 2
            draws them;
  codes     the latent of a map that is one id everywhere (a cell far from any border), per id;
  spread    the distances between the codes of ids 1..2^K-1 (nearest, mean), their distance to
            their mean, and each principal axis's share of their variance: how many of the latent's
            dimensions the ids use.

Run:  python benchmarks/mask_latent_geometry.py --ckpt runs/shapes/stage1       (seconds on a CPU)
Measured on the quick start's mask autoencoder (README, Results; trained with noise on its latent,
ldmseg.py section 2): channel std 1.19 / 1.16 / 1.15 / 0.57; the 15 ids spread over three principal
axes (39 / 33 / 28 / 0 % of their variance), 1.80-2.33 from their mean, nearest codes 1.45 apart
(mean 2.93). Trained on the bare mean instead (`train.py --stage 1 --latent-noise 0`, the preset
before): channel std 0.45 / 1.34 / 1.37 / 0.40; the ids on a circle (1.8-2.2 from their mean) in the
plane of channels 1 and 2, one every 24 degrees on average (12-29): nearest codes 0.69 apart (mean
2.68), 97 % of their variance on two axes (53 / 44 / 3 / 0 %). What stage 2 gains from the spread:
docs/experiments.md (LDMSeg).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the repository root is put on the path first)
import ldmseg  # noqa: E402
import train  # noqa: E402


def load_mask_encoder(path: str) -> tuple[ldmseg.MaskAutoencoder, float]:
    """A stage-1 or stage-2 run -> (its mask autoencoder (EMA weights, eval mode), its scale s)."""
    ckpt = train.load_checkpoint(path)
    if ckpt["stage"] == "1":
        model = ldmseg.MaskAutoencoder(ldmseg.MaskAEConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["ema"] or ckpt["model"])
    elif ckpt["stage"] == "2":
        model = ldmseg.load_ldmseg(ckpt).mask_ae
    else:
        raise SystemExit(f"{path}: a stage-{ckpt['stage']} checkpoint; give a stage-1 or stage-2 run")
    return model.eval(), model.config.scale_factor


@torch.no_grad()
def encode(model: ldmseg.MaskAutoencoder, scale: float, ids: torch.Tensor) -> torch.Tensor:
    """(B, H, W) ids -> (B, 4, h, w) s * posterior mean, the latent stage 2 denoises."""
    return scale * model.encode(data.ids_to_bits(ids, model.config.num_bits))[0]


def spread(codes: torch.Tensor) -> dict:
    """(N, C) codes -> nearest and mean pairwise distance, min / max distance to their mean, the
    share of their variance on each principal axis (descending), and their coordinates on the two
    main axes (N, 2)."""
    dist = torch.cdist(codes, codes)
    off = dist[~torch.eye(len(codes), dtype=torch.bool)]
    centred = codes - codes.mean(0)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)                          # sv descending
    radius = centred.norm(dim=1)
    return {"nearest": off.min().item(), "mean": off.mean().item(), "radius": (radius.min().item(), radius.max().item()),
            "shares": (sv ** 2 / (sv ** 2).sum()).tolist(), "plane": centred @ vh[:2].T}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a stage-1 or stage-2 run folder or ckpt.pt")
    p.add_argument("--data", default="data/shapes", help="panoptic folder whose train maps give the channel statistics")
    p.add_argument("--num-maps", type=int, default=256, help="train maps for the channel statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids")
    args = p.parse_args(argv)

    model, scale = load_mask_encoder(args.ckpt)
    K, gen = model.config.num_bits, torch.Generator().manual_seed(args.seed)
    # 1. Channel statistics over train maps with random ids (stage 2's input).
    ds = data.PanopticDataset(data.resolve_split(args.data, "train"), load_image=False, load_depth=False)
    n = min(args.num_maps, len(ds))
    segs = torch.stack([torch.as_tensor(ds[i]["segments"]) for i in range(n)])           # (n, H, W)
    z = encode(model, scale, data.order_ids(segs, K, "random", gen))                     # (n, 4, h, w)
    print(f"{args.ckpt}: s = {scale:.4f}; latent over {n} train maps: std {z.std():.3f}")
    for c in range(z.shape[1]):
        print(f"  channel {c}: mean {z[:, c].mean():+.3f}  std {z[:, c].std():.3f}")
    # 2. The code of each id: the centre cell of a map that is that id everywhere.
    size = segs.shape[-1]
    const = torch.arange(2 ** K).view(-1, 1, 1).expand(-1, size, size).contiguous()     # (2^K, H, W)
    zc = encode(model, scale, const)
    codes = zc[:, :, zc.shape[2] // 2, zc.shape[3] // 2]                                 # (2^K, 4)
    # 3. Their spread, over the ids stage 2 draws (1..2^K-1; 0 is void).
    out = spread(codes[1:])
    print(f"codes of ids 1..{2 ** K - 1}: nearest pair {out['nearest']:.2f} apart, mean {out['mean']:.2f}; "
          f"distance to their mean {out['radius'][0]:.2f}-{out['radius'][1]:.2f}")
    print("  variance on each principal axis: " + " / ".join(f"{100 * v:.0f} %" for v in out["shares"]))
    print("  ids by angle in the plane of the two main axes (angle in degrees, radius):")
    for ang, k, r in sorted((math.degrees(math.atan2(y, x)), k + 1, math.hypot(x, y))
                            for k, (x, y) in enumerate(out["plane"].tolist())):
        print(f"    id {k:3d}: {ang:7.1f}  {r:.2f}")
    print("  void (id 0): " + " ".join(f"{v:+.2f}" for v in codes[0].tolist()))
    return {"codes": codes, "channel_std": z.std(dim=(0, 2, 3)), **out}


if __name__ == "__main__":
    main()

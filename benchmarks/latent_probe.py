# SPDX-License-Identifier: MIT
"""
benchmarks/latent_probe.py -- how much of the segmentation can be read from the image latent?

LDMSeg's denoiser sees the image only through the image autoencoder's latent (f8, 4 channels:
16 x 16 x 4 for a 128^2 Shapes image). If that latent has lost a thing, no amount of diffusion
training finds it again. This script trains the same small probe -- five 3x3 convolutions at the
latent's resolution, output at 2x that, bilinear to full size -- on one of two inputs and one of two
targets, and scores it on val:

  latent   s_i * posterior mean of the given image autoencoder, (B, 4, H/8, W/8);
  pixels   the image itself, pixel-unshuffled to the same grid, (B, 192, H/8, W/8): everything
           the image holds, at no loss, laid out at the latent's resolution.

  category the category map, cross-entropy (void is a class); scored by mIoU over Shapes' 9
           categories (void excluded), the IoU of each, and the IoU of 'any thing' against the rest
           (class-agnostic: how well the thing regions are found);
  depth    log depth mapped to [-1, 1] as the multi-task model's depth task (ldmseg.depth_to_unit,
           1-64 m), L1; scored by AbsRel, RMSE and delta < 1.25 (evaluate.depth_metrics).

The gap between the two inputs is what the autoencoder's latent costs a reader of that size; the
depth probe says how far a plain regressor reading the latent gets on the multi-task model's
depth target.

Run:  python benchmarks/latent_probe.py --input latent --image-vae runs/shapes/vae
      python benchmarks/latent_probe.py --input pixels
      python benchmarks/latent_probe.py --input latent --target depth
Each run is 1,500 steps at batch 32: about 6 minutes on 2 CPU cores, 10 - 15 on one thread beside
another run. Measured (Shapes val, the quick start's image autoencoder): category mIoU 0.550 from
the latent, 0.682 from the pixels; any-thing IoU 0.773 / 0.911; depth delta < 1.25 0.868 / 0.870.
README: Results ("What limits these numbers") and Multi-task.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the repository root is put on the path first)
import evaluate  # noqa: E402
import ldmseg  # noqa: E402
import train  # noqa: E402


DEPTH_RANGE = (1.0, 64.0)                    # metres onto [-1, 1], as ldmseg.LDMSegConfig.depth_range


def load_items(root: str, split: str, limit: int, target: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images in [-1, 1] and (N, H, W) targets of a split: int64 category ids (0 = void)
    or float32 depth in metres (0 = unknown)."""
    ds = data.shapes_dataset(root, split, size=size, load_depth=target == "depth")
    n = min(limit, len(ds)) if limit else len(ds)
    batch = data.collate([ds[i] for i in range(n)])
    if target not in batch:
        raise SystemExit(f"{root}: the {split} split has no {target} maps")
    return batch["image"], batch[target]


@torch.no_grad()
def encode(run: str, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) -> s_i * posterior mean (N, 4, H/8, W/8) through a `--stage vae` run."""
    ckpt = train.load_checkpoint(run, "vae")
    ae = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig(**ckpt["model_config"]))
    ae.load_state_dict(ckpt["ema"] or ckpt["model"])
    ae.eval()
    z = torch.cat([ae.encode_mean(images[i:i + 50]) for i in range(0, len(images), 50)])
    return z * ae.config.scale_factor


def probe(in_channels: int, num_classes: int, width: int = 96) -> nn.Module:
    """(B, C_in, h, w) -> (B, num_classes, 2h, 2w) logits: five 3x3 convolutions, GroupNorm + SiLU."""
    layers = [nn.Conv2d(in_channels, width, 3, padding=1)]
    for _ in range(4):
        layers += [nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)]
    layers += [nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, num_classes * 4, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


def logits_at(net: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """The probe's output (B, C, 2h, 2w), bilinearly resized to the (B, C, size, size) of the targets."""
    return F.interpolate(net(x), size=size, mode="bilinear", align_corners=False)


def loss_of(out: torch.Tensor, y: torch.Tensor, target: str) -> torch.Tensor:
    """Cross-entropy on category ids, or L1 on log depth in [-1, 1] over pixels of known depth."""
    if target == "category":
        return F.cross_entropy(out, y)
    known = y > 0
    return (out[:, 0] - ldmseg.depth_to_unit(y.clamp_min(DEPTH_RANGE[0]), DEPTH_RANGE)).abs()[known].mean()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="Shapes folder (written by train.py)")
    p.add_argument("--input", choices=("latent", "pixels"), default="latent", help="what the probe reads")
    p.add_argument("--target", choices=("category", "depth"), default="category", help="what the probe predicts")
    p.add_argument("--image-vae", default="runs/shapes/vae", help="`--stage vae` run (for --input latent)")
    p.add_argument("--size", type=int, default=128, help="image side (a multiple of 8; Shapes is 128)")
    p.add_argument("--steps", type=int, default=1500, help="probe training steps")
    p.add_argument("--batch-size", type=int, default=32, help="probe batch size")
    p.add_argument("--train-limit", type=int, default=4000, help="train images used (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's initialisation and batches")
    args = p.parse_args(argv)
    if args.size % 8 or args.size <= 0:
        p.error(f"--size must be a positive multiple of 8 (the latent is H/8), got {args.size}")

    t0 = time.time()
    x, y = prepare(args)
    print(f"input {args.input} {tuple(x['train'].shape[1:])}, {len(y['train'])} train / {len(y['val'])} val "
          f"images, prepared in {time.time() - t0:.0f}s", flush=True)
    net = train_probe(x["train"], y["train"], args)
    net.eval()
    with torch.no_grad():
        out = torch.cat([logits_at(net, x["val"][i:i + 50], args.size) for i in range(0, len(y["val"]), 50)])
    name = f"{args.input}{' ' + args.image_vae if args.input == 'latent' else ''}"
    if args.target == "depth":
        m = evaluate.depth_metrics(ldmseg.unit_to_depth(out[:, 0], DEPTH_RANGE), y["val"])
        print(f"{name}: depth AbsRel {m['abs_rel']:.3f} | RMSE {m['rmse']:.2f} m | delta<1.25 {m['delta1']:.3f}")
        return m
    m = score_categories(out.argmax(1), y["val"])
    print(f"{name}: mIoU {m['miou']:.3f} | any thing vs rest IoU {m['thing_iou']:.3f}")
    print("  " + " ".join(f"{c['name']} {m[c['name']]:.2f}" for c in data.shapes_categories()))
    return m


def prepare(args) -> tuple[dict, dict]:
    """Inputs {'train', 'val'} -> (N, C, h, w) and targets {'train', 'val'} -> (N, H, W)."""
    splits = {s: load_items(args.data, s, args.train_limit if s == "train" else 0, args.target, args.size)
              for s in ("train", "val")}
    if args.input == "latent":
        x = {s: encode(args.image_vae, img) for s, (img, _) in splits.items()}
    else:
        x = {s: F.pixel_unshuffle(img, 8) for s, (img, _) in splits.items()}
    return x, {s: target for s, (_, target) in splits.items()}


def train_probe(x: torch.Tensor, y: torch.Tensor, args) -> nn.Module:
    """AdamW (lr 2e-3) for args.steps steps on random batches drawn with a seeded generator."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = probe(x.shape[1], len(data.shapes_categories()) + 1 if args.target == "category" else 1)  # + void
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (args.batch_size,), generator=gen)
        loss = loss_of(logits_at(net, x[idx], args.size), y[idx], args.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == args.steps:
            print(f"step {step} | loss {loss.item():.4f} | {time.time() - t0:.0f}s", flush=True)
    return net


def score_categories(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    """IoU per Shapes category (by name), their mean 'miou' (void excluded) and 'thing_iou': the IoU of
    'any thing category' against everything else. pred, truth: (N, H, W) int64 category ids."""
    def iou(p: torch.Tensor, t: torch.Tensor) -> float:
        return ((p & t).sum() / (p | t).sum().clamp(min=1)).item()
    cats = data.shapes_categories()
    out = {c["name"]: iou(pred == c["id"], truth == c["id"]) for c in cats}
    out["miou"] = sum(out.values()) / len(cats)
    things = torch.zeros(max(c["id"] for c in cats) + 1, dtype=torch.bool)
    things[[c["id"] for c in cats if c["isthing"]]] = True
    out["thing_iou"] = iou(things[pred], things[truth])
    return out

if __name__ == "__main__":
    main()

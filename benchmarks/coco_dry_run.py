# SPDX-License-Identifier: MIT
"""
benchmarks/coco_dry_run.py -- the `coco` recipe's memory and speed, before downloading COCO or SD weights.

Writes what the coco commands of the README read, at their real sizes, with stand-ins for the data:
  * OUT/sd-random.safetensors: Stable Diffusion 1.x's VAE and UNet (943 M numbers, 3.8 GB) with
    random weights, in the CompVis layout (first_stage_model.*, model.diffusion_model.*), read by
    --image-vae and --init-unet exactly as sd-v1-4.ckpt would be;
  * OUT/coco: a flat COCO panoptic folder (images/, panoptic/, one JSON) holding --copies copies of
    a small COCO-format split (default: the 16 real val2017 images of ../shared/data), so that a
    batch of 32 fills;
then prints the train.py commands that run the recipe's stages on them. Their step rate and GPU
memory are the recipe's: the networks, image size, batch, optimizer, EMA, self-conditioning and the
frozen VAE's encoding are all real; only the values are not (the loss, PQ and samples mean nothing).
One difference in the loader: the copies fit train.py's decoded-item cache (--data-cache-mb), so
each image is decoded once per loader process, where full COCO is decoded every epoch;
--data-cache-mb 0 makes the dry run decode every step as well (not measured).

Measured on one H200 (README, Real Stable Diffusion weights), with --num-workers 8 or 14:
  stage 1 (mask AE, batch 16 x 512^2): 3.6 it/s over its first 60 steps (4.3 over steps 40-60),
    25,121 MiB used (nvidia-smi);
  stage 2 (batch 32 x 512^2, eager bf16): 2.2-2.5 it/s once warm, 64,907 MiB used.

Run
  python benchmarks/coco_dry_run.py --out /tmp/coco_dry            # then the printed commands
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data    # noqa: E402  (the project root is put on the path just above)
import ldmseg  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "coco-val2017-sample"


def sd_unet_config(config: ldmseg.UNetConfig) -> ldmseg.UNetConfig:
    """SD-1.x's own UNet from LDMSeg's at a preset: 4 latent inputs and cross-attention to CLIP (768)."""
    return dataclasses.replace(config, in_channels=4, context_dim=768)


def write_random_sd(path: Path, preset: str = "coco", seed: int = 0) -> int:
    """SD-1.x-shaped VAE + UNet with random weights as one CompVis-layout .safetensors; returns the numbers."""
    torch.manual_seed(seed)
    unet_cfg = sd_unet_config(ldmseg.UNetConfig.preset(preset))
    device = "cuda" if torch.cuda.is_available() else "cpu"       # initialising 860 M numbers: faster there
    with torch.device(device):
        vae, unet = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig.preset(preset)), ldmseg.UNet(unet_cfg)
    state = {"first_stage_model." + k: v.cpu() for k, v in vae.state_dict().items()}
    state.update({"model.diffusion_model." + k: v.cpu()
                  for k, v in ldmseg.to_compvis_unet_keys(unet.state_dict(), unet_cfg).items()})
    ldmseg.save_safetensors(state, path)
    return sum(v.numel() for v in state.values())


def replicate_split(src: Path, split: str, dst: Path, copies: int) -> int:
    """A flat folder at dst with `copies` copies of src's split (files renamed, ids kept apart); its size."""
    files = data.resolve_split(src, split)
    meta = json.loads(files.panoptic_json.read_text())
    images = {im["id"]: im for im in meta["images"]}
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "panoptic").mkdir(exist_ok=True)
    new_images, new_annotations = [], []
    for k in range(copies):
        for a in meta["annotations"]:
            im = images[a["image_id"]]
            new_id = im["id"] * copies + k
            image_name, png_name = f"c{k}_{im['file_name']}", f"c{k}_{a['file_name']}"
            shutil.copyfile(files.image_dir / im["file_name"], dst / "images" / image_name)
            shutil.copyfile(files.panoptic_dir / a["file_name"], dst / "panoptic" / png_name)
            new_images.append(dict(im, id=new_id, file_name=image_name))
            new_annotations.append(dict(a, image_id=new_id, file_name=png_name))
    (dst / "panoptic_copies.json").write_text(json.dumps(dict(meta, images=new_images, annotations=new_annotations)))
    return len(new_annotations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Random SD-1.x weights and a replicated COCO split for a coco dry run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for sd-random.safetensors and coco/")
    p.add_argument("--data", default=str(SAMPLE), help="a COCO-format panoptic folder to replicate")
    p.add_argument("--split", default="val", help="its split")
    p.add_argument("--copies", type=int, default=4, help="copies of the split (16 images x 4 = two batches of 32)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: no such folder; --data takes a COCO-format panoptic folder")
    n = replicate_split(Path(args.data), args.split, out / "coco", args.copies)
    print(f"{n} items in {out / 'coco'}")
    weights = out / "sd-random.safetensors"
    if not weights.exists():
        print(f"random SD-1.x weights: {write_random_sd(weights):,} numbers -> {weights}")
    print("then:\n"
          f"  python train.py --stage 1 --preset coco --data {out / 'coco'} --max-steps 60 --eval-images 16 "
          f"--out-dir {out / 'stage1'} --log-every 20 --num-workers 8\n"
          f"  python train.py --stage 2 --preset coco --data {out / 'coco'} --image-vae {weights} --init-unet {weights} "
          f"--mask-ae {out / 'stage1'} --max-steps 100 --eval-images 16 --eval-steps 5 --eval-dpm-steps 5 "
          f"--out-dir {out / 'stage2'} --log-every 10 --num-workers 14")
    return 0


if __name__ == "__main__":
    sys.exit(main())

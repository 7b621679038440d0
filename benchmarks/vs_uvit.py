# SPDX-License-Identifier: MIT
"""
benchmarks/vs_uvit.py -- our U-ViT against the official U-ViT code: same network, one run.

PDM builds on U-ViT-S/2 [PDM brief §3.3, §4.3]. This builds cogen.T2IUViT -- the text-to-image
U-ViT here, the network of U-ViT's released `mscoco_uvit_small.pth` and PDM's image stream --
and the official `UViT` class (libs/uvit_t2i.py of a U-ViT clone, given with --uvit-repo) at the
same configuration, U-ViT's configs/mscoco_uvit_small.py: 32x32x4 latents (256^2 images, SD's
VAE), patch 2, width 512, 13 blocks, 8 heads, MLP ratio 4, no qkv bias, raw sinusoidal time
token, 77 CLIP-L tokens of width 768. Then, as benchmarks/vs_diffusers.py does for the UNet:
  * evidence: our state dict in U-ViT's layout (cogen.t2i_to_uvit_state_dict) loads into the
    official model strictly, and both give the same output on the same input (ours at t, theirs at
    n = t + 1: U-ViT's time token embeds n, ours t + time_offset with time_offset = 1);
  * timing: interleaved rounds of a training step (forward + backward + fused AdamW, MSE to a fixed
    noise target) and a no-grad forward, for both, eager and (--compile) compiled; medians; MFU of
    the training step from its FLOPs (torch.utils.flop_counter) against 790 TFLOP/s on an H200.
The one-stream PDM is this network with N map tokens and a map head added (cogen.OneStreamPDM; its
MFU is benchmarks/speed.py's `uvit` row).

The official code is never a dependency of the project and is imported here only, from the folder
given: it needs einops (the official libs/ carries its own timm functions). In a scratch environment:
  git clone https://github.com/baofff/U-ViT /tmp/U-ViT
  python -m venv --system-site-packages /tmp/benchenv && /tmp/benchenv/bin/pip install einops
  /tmp/benchenv/bin/python benchmarks/vs_uvit.py --uvit-repo /tmp/U-ViT --device cuda --compile

Measured on one H200 (PyTorch 2.11.0+cu130, bf16 autocast, batch 64, 20 rounds, 1.9 min; the official
code at commit ce55170, its 'flash' (SDPA) attention path, einops 0.8.2; our weights in the official
model: max |diff| 8.7e-6 in fp32, max |output| 3.12), forward + backward + AdamW:
  eager: ours 35.3 ms (1,815 img/s, MFU 22.7 %), official 41.0 ms (1,560 img/s, 19.5 %): ratio 1.163;
  compiled: ours 28.7 ms (2,228 img/s, 27.9 %), official 29.4 ms (2,176 img/s, 27.2 %): 1.024;
  ours compiled / official eager: 1.428. No-grad forward: 1.263 eager, 1.023 compiled.
  Our reading of the eager gap (not profiled): the official attention rearranges q, k, v with
  einops and casts them to float32 before SDPA, which autocast then casts back to bf16; ours hands
  SDPA views in the autocast dtype. Compiled, the two land within 3 %.
  U-ViT-S/2 alone (334 tokens of width 512) fills an H200 less than the one-stream PDM (590 tokens):
  speed.py's `uvit` row reaches 39.2 % (batch 64) and 44.3 % (batch 128) compiled.

Contents
  1. The two networks     ours from PDMConfig; the official UViT from the same numbers
  2. Same network check
  3. Command line         (the timing is vs_diffusers.py's section 3)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cogen         # noqa: E402  (the project root is put on the path just above)
import vs_diffusers  # noqa: E402  (its timing: step_fns, interleaved, compare)

# -----------------------------------------------------------------------------
# 1. The two networks
# -----------------------------------------------------------------------------


def our_config(preset: str) -> cogen.PDMConfig:
    """T2IUViT's config for U-ViT's weights: arch t2i, CLIP-feature context, time offset 1."""
    return dataclasses.replace(cogen.PDMConfig.preset(preset), arch="t2i", text_encoder="context", time_offset=1)


def import_official(repo: str):
    """The official libs/uvit_t2i.py module from a U-ViT clone, or a message saying what is missing."""
    root = Path(repo)
    if not (root / "libs" / "uvit_t2i.py").is_file():
        raise SystemExit(f"{root}: no libs/uvit_t2i.py here; --uvit-repo takes a clone of "
                         "https://github.com/baofff/U-ViT")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("libs.uvit_t2i")
    except ImportError as e:
        raise SystemExit(f"the official U-ViT code does not import ({e}); it needs einops: pip install einops")


def official_uvit(module, c: cogen.PDMConfig) -> torch.nn.Module:
    """U-ViT's UViT (t2i) at `c`'s sizes, as configs/mscoco_uvit_small.py builds it for `coco`."""
    return module.UViT(img_size=c.latent_size, in_chans=c.latent_channels, patch_size=c.patch_size,
                       embed_dim=c.dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                       qkv_bias=c.qkv_bias, mlp_time_embed=False, clip_dim=c.context_dim,
                       num_clip_token=c.num_text_tokens)


# -----------------------------------------------------------------------------
# 2. Same network check
# -----------------------------------------------------------------------------


def check_same_network(ours, ref, x, t, context) -> dict:
    """Our weights (perturbed, so that no layer is at its init) into the official model; max |diff|."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    state = cogen.t2i_to_uvit_state_dict(ours.state_dict())
    ref.load_state_dict(state, strict=True)                       # names and shapes, every tensor
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            out = ours(x, t, context)
            diff = (out - ref(x, t + 1, context)).abs().max().item()   # U-ViT embeds n = t + 1
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return dict(params_ours=sum(p.numel() for p in ours.parameters()),
                params_ref=sum(p.numel() for p in ref.parameters()), tensors=len(state), max_abs_diff=diff,
                max_abs_out=out.abs().max().item())


# -----------------------------------------------------------------------------
# 3. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Our U-ViT against the official U-ViT code, same configuration.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--uvit-repo", required=True, help="a clone of https://github.com/baofff/U-ViT")
    p.add_argument("--preset", default="coco", choices=("tiny", "shapes", "coco"),
                   help="network sizes (coco: U-ViT-S/2 of mscoco_uvit_small)")
    p.add_argument("--batch", type=int, default=64, help="batch (U-ViT's MS-COCO recipe: 256 over 4 GPUs)")
    vs_diffusers.add_timing_arguments(p, rounds=10, warmup=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    official = import_official(args.uvit_repo)
    device = vs_diffusers.train.pick_device(args.device)
    amp = None if args.dtype == "fp32" or (args.dtype == "auto" and device.type != "cuda") else torch.bfloat16
    c = our_config(args.preset)
    torch.manual_seed(0)
    ours, ref = cogen.T2IUViT(c).to(device), official_uvit(official, c).to(device)
    gen = torch.Generator().manual_seed(0)
    B, h = args.batch, c.latent_size
    x = torch.randn(B, c.latent_channels, h, h, generator=gen).to(device)          # (B, 4, 32, 32)
    t = torch.randint(0, c.num_train_steps, (B,), generator=gen).to(device)
    context = torch.randn(B, c.num_text_tokens, c.context_dim, generator=gen).to(device)   # (B, 77, 768)
    eps = torch.randn(B, c.latent_channels, h, h, generator=gen).to(device)
    same = check_same_network(ours, ref, x, t, context)
    print(f"preset {args.preset} (U-ViT t2i, {c.dim} wide, {c.depth + 1} blocks, patch {c.patch_size}, "
          f"{h}x{h}x{c.latent_channels} latents, {c.num_text_tokens} context tokens) | batch {B} | device "
          f"{vs_diffusers.device_name(device)} | dtype {'bf16 autocast' if amp else 'fp32'} | compile "
          f"{args.compile} | torch {torch.__version__}")
    print(f"same network: {same['params_ours']:,} parameters (ours) = {same['params_ref']:,} (official), "
          f"{same['tensors']} tensors loaded strictly; our weights in the official model: max |output "
          f"difference| {same['max_abs_diff']:.2e} (fp32; max |output| {same['max_abs_out']:.2f})")
    if same["max_abs_diff"] > vs_diffusers.SAME_OUTPUT_TOL * max(1.0, same["max_abs_out"]):
        raise SystemExit(f"not the same network: outputs differ by {same['max_abs_diff']:.2e}; "
                         "timing them against each other would mislead")
    vs_diffusers.compare({"ours": (ours, lambda x, t: ours(x, t, context)),
                          "official": (ref, lambda x, t: ref(x, t + 1, context))}, x, t, eps, B, args, device, amp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

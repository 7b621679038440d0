# SPDX-License-Identifier: MIT
"""
ldmseg.py -- LDMSeg: panoptic segmentation as image-conditioned latent diffusion.

Implements Van Gansbeke & De Brabandere, "A Simple Latent Diffusion Approach for Panoptic
Segmentation and Mask Inpainting", arXiv 2401.10227 (ECCV 2024). Paper and official-code details are
summarised in docs/papers/ldmseg.md ("LDMSeg brief §x.y" below). Two frozen autoencoders turn a
panoptic map and its RGB image into 4-channel latents at 1/8 resolution; a Stable-Diffusion UNet
learns to denoise the map latent given the image latent.

Contents (`grep -n '^# [0-9]' ldmseg.py`)
  1. Shared layers                 LayerNorm2d, attention (SDPA beside the explicit softmax),
                                   2x down / up sampling convs, the diagonal-Gaussian posterior
  2. Mask autoencoder              [LDMSeg brief §2.2] stage 1: K analog bits -> 4 x H/8 x W/8 ->
                                   2^K logits at H/2; MaskAEConfig, MaskAutoencoder
  3. Point sampling                [PointRend; Mask2Former] uncertainty-driven point selection
  4. Mask autoencoder losses       [LDMSeg brief §2.3] point-sampled CE + per-segment BCE + Dice + KL
  5. Image autoencoder             [LDM, Rombach et al. 2022] Stable Diffusion's KL-f8 VAE with the
                                   CompVis parameter names; ImageAEConfig, ImageAutoencoder, vae_loss
  6. UNet layers                   [SD-1.x UNet] timestep embedding, ResNet block, transformer block
                                   (self-attention, optional cross-attention, GEGLU)
  7. UNet                          [SD-1.x UNet; LDMSeg brief §3.2] down / mid / up blocks with skips,
                                   diffusers' UNet2DConditionModel parameter names; UNetConfig, UNet
  8. LDMSeg model                  [LDMSeg brief §3] concat conditioning, zero-initialised new input
                                   channels, self-conditioning, min-SNR-gamma weights, void-masked
                                   (optionally area-weighted) loss; optional learnable task
                                   embeddings read by cross-attention
  9. Decoding                      [LDMSeg brief §4] logits -> panoptic segments (argmax + thresholds)
 10. Multi-task LDMSeg             [LDMSeg §6 / Fig. 1] instance, semantic and depth latents, the
                                   task-sampling rule, per-task decoding, the class-aware merge
 11. Mask inpainting               [LDMSeg brief §5; ReSample] zero-shot, known latents kept during
                                   sampling, the known cells then fitted to the given pixels
 12. Weight loading                Stable Diffusion / diffusers / CompVis checkpoints by name

Run
  Nothing to run here: train.py trains the models, sample.py samples them, evaluate.py scores them.
  python -m pytest tests/test_ldmseg_modules.py   checks the building blocks (sections 1-7).

Shape legend
  B batch, C channels, H,W pixels, h,w latent (H/8, W/8), K bits, N tokens, D width,
  P sampled points, M segment masks in a batch, t a (B,) timestep tensor.
  Bits are float32 in {-1, +1} with void = 0; ids are int64 with 0 = void; images are in [-1, 1].

Presets (every config has `.preset(name)`): `coco` is the paper's model (mask AE 2,023,208 params,
SD KL-f8 image AE 83,653,863 params, SD-1.x UNet), `shapes` trains on a CPU in minutes on 128x128
Shapes images, `tiny` is what the tests use.

Deviations from the paper / official code (and why)
  * DEVIATION: the mask loss divides by the number of masks in the local batch; the official code
    all-reduces that count over GPUs first. Identical on one device; under DDP each process then
    weighs its own masks (a small change in relative weighting, not in the optimum).
  * DEVIATION: the `shapes` / `tiny` presets use narrower networks and fewer bits (Shapes has at
    most 11 segments); `shapes` samples as many loss points as its 64^2 training crops have logit
    cells (1,024) and trains on the posterior mean (see its preset for why); `tiny` uses 49 points.
  * DEVIATION: the image autoencoder is trained here (on Shapes, when no SD weights are given) with
    L1 + tiny KL only; Stable Diffusion adds LPIPS and a patch GAN. Shapes images are flat colours
    and simple textures, for which L1 alone reconstructs well; real SD weights load unchanged.
  * QUIRK: the mask AE is trained with the sampled posterior while its KL weight is 0 (sigma is
    never regularised); diffusion uses the posterior mean [LDMSeg brief §2.3, §8.11].
  * DEVIATION: point sampling extends maps by their border values where the official code pads
    with zeros (which damps logits and soft targets at the image border; see `point_sample`).
  * DEVIATION: multi-task LDMSeg was never released (brief §6): only the task embeddings through
    cross-attention are the paper's; how semantic maps and depth become latents and at which signal
    scale, the task-sampling rule, the loss balance and the class-aware merge rule are ours (section
    10 says which and why).

Left out
  The official code's unused options (codebook / Gumbel bottlenecks, mid blocks in the mask AE,
  RGB fusion, Hungarian matching) and UNet2DConditionModel features SD-1.x does not use (class
  embeddings, linear projections, attention up-casting, other block types).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import pickle
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from data import ID_ORDERS, ids_to_bits, order_ids, raster_ids
from sample import (KnownRegion, NoiseSchedule, ddim_sample, ddpm_sample, dpm_solver_pp_sample,
                    to_x0_and_eps)


def _as_tuples(config) -> None:
    """Turn every list field of a dataclass into a tuple (in place).

    Checkpoints store configs as plain dicts and JSON turns tuples into lists; converting back here
    makes `Config(**dataclasses.asdict(c)) == c` hold whichever way the dict travelled.
    """
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            setattr(config, f.name, tuple(value))


def _preset(cls, presets: dict[str, dict], name: str):
    """Build `cls` from the named preset's overrides of the defaults (the defaults are `coco`)."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r} for {cls.__name__}; choose from {sorted(presets)}")
    return cls(**presets[name])


# -----------------------------------------------------------------------------
# 1. Shared layers                                  [Stable Diffusion; detectron2; Vaswani 2017]
# -----------------------------------------------------------------------------
# Pieces used by more than one model below. Randomness always comes from an explicit generator; noise
# is drawn on the generator's own device and then moved, so a CPU generator gives the same numbers
# whether the model runs on a CPU or a GPU.


def _randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, I) noise of `shape` with the dtype and device of `like`, drawn from `generator`."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) float32 numbers of `shape` on `device`, drawn from `generator`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(high: int, shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """int64 numbers in [0, high) of `shape` on `device`, drawn from `generator` (training times t)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def _fp32(x: Tensor):
    """A context without autocast on x's device: what runs inside computes in fp32 (given fp32 inputs)."""
    return torch.autocast(x.device.type, enabled=False)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map  [detectron2 / ConvNeXt].

    Unlike GroupNorm(1, C) it normalises each pixel on its own, not the whole map, so a pixel's
    features do not depend on the rest of the image. The LDMSeg mask decoder uses it after every
    transposed convolution [LDMSeg brief §2.2].
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)                                    # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)                     # biased, as LayerNorm
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def attention(q: Tensor, k: Tensor, v: Tensor, use_sdpa: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(d)) v   [Vaswani et al. 2017, Eq. 1]

    q: (B, nh, Nq, d), k and v: (B, nh, Nk, d), any float dtype  ->  (B, nh, Nq, d).
    use_sdpa=True calls PyTorch's fused kernel (flash / memory-efficient on GPUs); False runs the
    explicit formula below, which is what the fused kernel computes and what a reader should read.
    """
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)   # (B, nh, Nq, Nk)
    return weights @ v                                                    # (B, nh, Nq, d)


def set_attention_backend(model: nn.Module, use_sdpa: bool) -> None:
    """Switch every attention layer inside `model` between SDPA and the explicit reference path."""
    for module in model.modules():
        if hasattr(module, "use_sdpa"):
            module.use_sdpa = use_sdpa


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 convolution (C -> C).

    Stable Diffusion's UNet pads 1 pixel on every side. Its autoencoder pads only right and bottom,
    (0, 1, 0, 1), and convolves without padding -- a QUIRK of the CompVis code, kept because it is
    what the released weights were trained with (the two differ by a one-pixel shift).
    """

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))                                    # (B, C, H, W) -> (B, C, H+1, W+1)
        return self.conv(x)                                               # -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 convolution (C -> C)  [SD UNet and VAE].

    `size` forces the output size, for a UNet whose skip tensor has an odd size.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")        # (B, C, H, W) -> (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")               # (B, C, H, W) -> (B, C, *size)
        return self.conv(x)


# Both autoencoders are "KL" autoencoders [Kingma & Welling 2014; LDM §3]: the encoder outputs the
# mean and log-variance of a diagonal Gaussian q(z | x); training decodes a sample of it, diffusion
# uses its mean.


def split_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2C, h, w) encoder output -> mean, logvar, each (B, C, h, w).

    logvar is clamped to [-30, 20] as in the CompVis / diffusers / LDMSeg code: exp(0.5 logvar) then
    stays finite in float32 (and fp16) whatever the encoder outputs early in training.
    """
    mean, logvar = moments.chunk(2, dim=1)                                # (B, 2C, h, w) -> 2 x (B, C, h, w)
    return mean, logvar.clamp(-30.0, 20.0)


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised sample z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)  [Kingma & Welling §2.4]."""
    return mean + torch.exp(0.5 * logvar) * _randn(mean.shape, generator, mean)


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over (C, h, w): (B, C, h, w) x2 -> (B,).

    0.5 * sum(mean^2 + var - 1 - logvar)   [Kingma & Welling 2014, App. B]
    """
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)               # (B, C, h, w)
    return kl.flatten(1).sum(1)                                           # (B, C, h, w) -> (B,)


# -----------------------------------------------------------------------------
# 2. Mask autoencoder (stage 1)                     [LDMSeg brief §2.2; official vae.py]
# -----------------------------------------------------------------------------
# A deliberately shallow convolutional autoencoder. The encoder maps K analog-bit planes (one per
# bit of a randomly remapped segment id, void = 0) to a 4-channel latent at 1/8 resolution, the
# same shape as Stable Diffusion's image latent so both can be concatenated for the UNet. The
# decoder predicts one logit per possible id (2^K channels) at 1/2 resolution; the last x2 is a
# bilinear upsampling applied only at decode time [LDMSeg brief §2.2, §8.12]. Channel k means
# "this pixel has id k": the ids were random, so the map must be reproduced id for id.
#
# The layers sit in two nn.Sequential with exactly the official layout (including the Identity
# placeholders where the paper's model has no mid blocks), so the parameter names -- encoder.0.weight,
# ..., decoder.10.bias -- are those of the released LDMSeg autoencoder checkpoint. The official code's
# optional mid blocks (`num_mid_blocks`) take those placeholders' places, with the same names.
#
# DEVIATION (shapes preset): noise on the latent in training, `latent_noise` = c. The decoder is
# trained on z = mean + c * std(mean) * eps, std over the batch's latents, detached: noise relative
# to the codes' own scale, which the encoder cannot learn away by scaling them up, as it can the
# sampled posterior's (its sigma is learned, and free while the KL weight is 0). Trained on the bare
# mean, the Shapes autoencoder reconstructs well but packs its 15 ids on a circle in two of its four
# latent channels (97 % of the codes' variance on two axes, nearest codes 0.69 std apart;
# benchmarks/mask_latent_geometry.py). Stage 2 must tell the ids apart through diffusion noise, and
# neighbours on that circle cost it little latent loss. A decoder that must read noisy codes wants
# them apart: at c = 0.1 the ids spread over three axes (nearest 1.26-1.45 apart), reconstruction PQ
# does not fall, and stage 2 gains 8-14 PQ over three seeds (README, Results; docs/experiments.md).
# At c = 0.3 reconstruction PQ falls by ~10.


@dataclass
class MaskAEConfig:
    """Mask autoencoder and its loss. Defaults = the paper's COCO model (`coco` preset)."""

    num_bits: int = 7                                  # K bit planes in; 2^K id logits out  [PAPER: 7 -> 128]
    block_channels: tuple[int, ...] = (32, 64, 128, 256)  # encoder width per resolution; len-1 stride-2 convs  [PAPER]
    mid_channels: int = 256                            # encoder width at the latent resolution (code: int_channels)  [PAPER]
    latent_channels: int = 4                           # channels of the latent z, as SD's image latent  [PAPER]
    num_upsamplers: int = 2                            # ConvTranspose x2 stages; logits at stride 8 / 2^n  [PAPER: 2 -> H/2]
    upsample_channels: int = 256                       # width of the decoder's upsampling stages  [PAPER]
    norm_groups: int = 32                              # groups of the GroupNorms  [PAPER]
    num_mid_blocks: int = 0                            # ResNet pairs at the latent resolution (official option)  [PAPER: 0]
    scale_factor: float = 0.18215                      # s: diffusion sees s * mean; not applied inside the module; stage 1 sets 1/std  [PAPER; DEVIATION]
    num_points: int = 12544                            # points per image (CE) / per mask (BCE + Dice)  [PAPER: 112^2 at 512^2]
    oversample_ratio: int = 3                          # candidates = ratio * num_points, scored by uncertainty  [PAPER]
    importance_ratio: float = 0.75                     # share of points chosen by uncertainty; the rest uniform  [PAPER]
    ce_weight: float = 1.0                             # weight of the point-sampled cross-entropy  [PAPER]
    mask_weight: float = 1.0                           # weight of the per-segment BCE + Dice  [PAPER]
    kl_weight: float = 0.0                             # weight of the KL term; weight decay bounds z instead  [PAPER: 0]
    sample_posterior: bool = True                      # train on z = mean + sigma * eps (True) or on the mean  [PAPER: True]
    latent_noise: float = 0.0                          # train on z + this * std(mean) * eps: ids kept apart in the latent (0 = off)  [DEVIATION]

    _PRESETS: ClassVar[dict[str, dict]] = {
        "coco": {},
        # 128^2 Shapes images hold <= 11 segments: 4 bits (15 ids), widths 16..32 instead of 32..256.
        # DEVIATION (CPU budget): trained on 64^2 crops with 1024 points per crop, as many as the 32^2
        # cells of a crop's H/2 logits (still sampled: 768 by uncertainty, 256 uniform, so about 600
        # distinct cells are hit), and on the posterior mean. With a few thousand steps
        # instead of LDMSeg's 66k, sparse points starve the loss, and the sampled posterior starts at
        # sigma = 1 (KL weight 0 never shrinks it), drowning the latent until logvar is learned down.
        # DEVIATION: noise at 0.1 of the latent's std in training instead (MaskAutoencoder.forward).
        "shapes": dict(num_bits=4, block_channels=(16, 32, 32, 32), mid_channels=32,
                       upsample_channels=32, norm_groups=8, num_points=1024, sample_posterior=False,
                       latent_noise=0.1),
        # 32^2 test images: 12544 * (32 / 512)^2 = 49 points.
        "tiny": dict(num_bits=4, block_channels=(8, 8, 16, 16), mid_channels=16,
                     upsample_channels=16, norm_groups=4, num_points=49),
    }

    def __post_init__(self):
        _as_tuples(self)
        if not self.latent_noise >= 0:
            raise ValueError(f"latent_noise must be >= 0 (0: off), got {self.latent_noise}")

    @classmethod
    def preset(cls, name: str) -> "MaskAEConfig":
        """`coco` (the paper's), `shapes` or `tiny`."""
        return _preset(cls, cls._PRESETS, name)

    @property
    def num_classes(self) -> int:
        """Output logit channels, one per id 0..2^K-1 (0 = void)."""
        return 2 ** self.num_bits


class MaskAEMidBlock(nn.Module):
    """Two ResNet blocks at the latent resolution, width mid_channels -> mid_channels.

    The official code's optional mid block (diffusers' UNetMidBlock2D with no attention and no
    timestep, whose parameters are named resnets.0.*, resnets.1.*). The paper's model has none,
    nor do our presets: on Shapes one block (2,400 x 16 steps) scored reconstruction PQ 79.3
    against 88.2 without (one run each).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)                                                  # (B, C, h, w) -> (B, C, h, w)
        return x


def _mid_blocks(cfg: MaskAEConfig, n: int) -> list[nn.Module]:
    """n mid blocks, or the official Identity placeholder when n = 0 (keeps the layer indices)."""
    return [MaskAEMidBlock(cfg.mid_channels, cfg.norm_groups) for _ in range(n)] or [nn.Identity()]


def _mask_encoder_layers(cfg: MaskAEConfig) -> list[nn.Module]:
    """The encoder, layer for layer as the LDMSeg brief §2.2 table (indices = checkpoint names)."""
    widths = cfg.block_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.num_bits, widths[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        # QUIRK: a same-width conv without activation, then the stride-2 conv with SiLU -- so two
        # convolutions are composed linearly; kept because the released weights are laid out so.
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1),
                   nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
    layers += [nn.Conv2d(widths[-1], cfg.mid_channels, 3, padding=1),
               *_mid_blocks(cfg, cfg.num_mid_blocks),                     # [PAPER: none -> one Identity]
               nn.GroupNorm(cfg.norm_groups, cfg.mid_channels, eps=1e-6), nn.SiLU(),
               nn.Conv2d(cfg.mid_channels, 2 * cfg.latent_channels, 3, padding=1)]  # mean | logvar
    return layers


def _mask_decoder_layers(cfg: MaskAEConfig) -> list[nn.Module]:
    """The decoder: conv to width, [ConvTranspose 2x2 s2 -> LayerNorm2d -> SiLU] x n, GN-SiLU-conv."""
    # QUIRK: one mid block whatever num_mid_blocks > 0 says, as the official decoder builds it.
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.mid_channels, 3, padding=1),
                               *_mid_blocks(cfg, min(cfg.num_mid_blocks, 1))]  # [PAPER: none -> Identity]
    width = cfg.mid_channels
    for _ in range(cfg.num_upsamplers):
        layers += [nn.ConvTranspose2d(width, cfg.upsample_channels, 2, stride=2),
                   LayerNorm2d(cfg.upsample_channels), nn.SiLU()]
        width = cfg.upsample_channels
    # QUIRK: this GroupNorm keeps PyTorch's eps 1e-5 while the encoder's uses 1e-6, as the official code.
    layers += [nn.GroupNorm(cfg.norm_groups, width), nn.SiLU(),
               nn.Conv2d(width, cfg.num_classes, 3, padding=1)]
    return layers


class MaskAutoencoder(nn.Module):
    """LDMSeg's stage-1 autoencoder: analog bits (B, K, H, W) <-> latent (B, 4, H/8, W/8).  [LDMSeg brief §2.2]

    H and W should be multiples of 8 (of 2^(len(block_channels)-1) in general).
    """

    def __init__(self, config: MaskAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Sequential(*_mask_encoder_layers(config))
        self.decoder = nn.Sequential(*_mask_decoder_layers(config))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for every preset)."""
        return 2 ** (len(self.config.block_channels) - 1)

    @property
    def logit_stride(self) -> int:
        """Pixels per logit of `decode` along each axis (2: the decoder stops at H/2)."""
        return self.downsample_factor // 2 ** self.config.num_upsamplers

    def encode(self, bits: Tensor) -> tuple[Tensor, Tensor]:
        """bits (B, K, H, W) float in {-1, 0, +1}  ->  mean, logvar, each (B, 4, H/8, W/8)."""
        return split_moments(self.encoder(bits))                         # (B, 8, h, w) -> 2 x (B, 4, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 4, h, w)  ->  logits (B, 2^K, H/2, W/2), one channel per id (0 = void)."""
        return self.decoder(z)

    def decode_full(self, z: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """z (B, 4, h, w)  ->  logits (B, 2^K, H, W), or at `size` if given.

        The remaining x2 is a bilinear interpolation (align_corners=False), applied only at decode
        time; training scores the H/2 logits directly through point sampling [LDMSeg brief §2.2].
        PAPER: another size is reached by a second bilinear resize from the model's H x W, as the
        official evaluation resizes to the original image [LDMSeg brief §4, step 4].
        """
        logits = self.decode(z)                                           # (B, 2^K, H/2, W/2)
        full = (z.shape[-2] * self.downsample_factor, z.shape[-1] * self.downsample_factor)
        logits = F.interpolate(logits, size=full, mode="bilinear", align_corners=False)  # -> (B, 2^K, H, W)
        if size is not None and tuple(size) != full:
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)  # -> *size
        return logits

    def forward(self, bits: Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True,
                latent_noise: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: bits (B, K, H, W) -> (logits (B, 2^K, H/2, W/2), mean, logvar (B, 4, h, w)).

        sample_posterior=True decodes z = mean + sigma * eps (eps from `generator`), as the official
        training; False decodes the mean. latent_noise = c > 0 adds c * std(mean) * eps' on top (below).
        """
        mean, logvar = self.encode(bits)                                  # 2 x (B, 4, h, w)
        z = sample_gaussian(mean, logvar, generator) if sample_posterior else mean
        if latent_noise:
            z = z + latent_noise * mean.detach().std() * _randn(mean.shape, generator, mean)
        return self.decode(z), mean, logvar


# -----------------------------------------------------------------------------
# 3. Point sampling                                 [PointRend, Kirillov et al. 2020; Mask2Former]
# -----------------------------------------------------------------------------
# The mask AE is not scored on every pixel but on P points per image (or per mask), most of them
# where the prediction is least certain -- segment borders -- and a few uniformly everywhere:
#   1. draw oversample_ratio * P uniform candidate points in the unit square;
#   2. read the logits at the candidates (bilinear) and score each with an uncertainty function;
#   3. keep the importance_ratio * P most uncertain candidates ...
#   4. ... and add (1 - importance_ratio) * P fresh uniform points.
# The uncertainty is scored on the *interpolated* logits at each point, not interpolated from
# per-pixel scores: a point midway between logits -1 and +1 has logit 0, the most uncertain value.
# Points are continuous, so the low-resolution logits (H/2) and the full-resolution targets (H) are
# read at exactly the same places; this is how the loss reaches full resolution without ever
# upsampling the logits.
#
# Coordinates are (x, y) in [0, 1]^2 -- x along the width -- the convention of grid_sample after
# the map [0, 1] -> [-1, 1], with align_corners=False (0 and 1 are the outer pixel edges).


def point_sample(values: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Read a map at continuous points.  values (N, C, H, W), coords (N, P, 2) (x, y) in [0, 1]  ->  (N, C, P).

    mode="bilinear" for logits and soft masks, "nearest" for integer ids (pass them as float).
    Computed and returned in float32, so bf16 / fp16 inputs are read at exactly the same places as
    the float32 targets (a bf16 coordinate is off by up to 1/256 of the image).
    DEVIATION: outside the outer pixel centres the map is extended by its edge values
    (padding_mode="border"); the official code pads with zeros, which pulls logits within half a
    pixel of the image border towards 0 and soft targets towards 1/2. A perfect prediction then
    still pays a loss there, and importance sampling -- which hunts for logits near 0 -- spends
    more and more of its points on that border band as the model gets confident.
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0                                # (N, P, 2) -> (N, P, 1, 2) in [-1, 1]
    out = F.grid_sample(values.float(), grid.float(), mode=mode, padding_mode="border",
                        align_corners=False)                              # (N, C, P, 1)
    return out.squeeze(3)                                                 # (N, C, P, 1) -> (N, C, P)


def uncertainty_top2(point_logits: Tensor) -> Tensor:
    """Multi-class uncertainty: second-best minus best logit (<= 0; 0 = a tie).  (N, C, P) -> (N, P)

    [PointRend App.; LDMSeg brief §2.3] -- used for the cross-entropy points.
    """
    top2 = point_logits.topk(2, dim=1).values                             # (N, C, P) -> (N, 2, P)
    return top2[:, 1] - top2[:, 0]


def uncertainty_abs(point_logits: Tensor) -> Tensor:
    """Binary uncertainty: -|logit| (<= 0; 0 = probability 1/2).  (N, 1, P) -> (N, P)  [Mask2Former]"""
    return -point_logits[:, 0].abs()


@torch.no_grad()
def sample_uncertain_points(logits: Tensor, uncertainty: Callable[[Tensor], Tensor], num_points: int,
                            oversample_ratio: int, importance_ratio: float,
                            generator: torch.Generator | None = None) -> Tensor:
    """PointRend's training-point selection (steps 1-4 above).  logits (N, C, h, w)  ->  coords (N, P, 2).

    coords[:, :n_imp] are the n_imp = int(importance_ratio * P) most uncertain of the
    oversample_ratio * P candidates, coords[:, n_imp:] the P - n_imp uniform ones. No gradient:
    where to look is not learned.
    """
    N = logits.shape[0]
    num_candidates = int(oversample_ratio * num_points)
    num_importance = int(importance_ratio * num_points)
    candidates = _rand((N, num_candidates, 2), generator, logits.device)  # step 1: (N, P*r, 2)
    scores = uncertainty(point_sample(logits, candidates))                # step 2: (N, C, P*r) -> (N, P*r)
    top = scores.topk(num_importance, dim=1).indices                      # step 3: (N, n_imp)
    chosen = candidates.gather(1, top.unsqueeze(2).expand(-1, -1, 2))     # (N, n_imp, 2)
    uniform = _rand((N, num_points - num_importance, 2), generator, logits.device)  # step 4
    return torch.cat([chosen, uniform], dim=1)                            # (N, P, 2)


# -----------------------------------------------------------------------------
# 4. Mask autoencoder losses                        [LDMSeg brief §2.3; official losses.py]
# -----------------------------------------------------------------------------
#   L = ce_weight * L_ce + mask_weight * (L_bce + L_dice) + kl_weight * L_kl      [PAPER: 1, 1, 0]
# L_ce   softmax cross-entropy over the 2^K ids at P points per image chosen by top-2 uncertainty;
#        targets read *nearest* from the full-resolution id map; void (id 0) ignored -- but channel 0
#        stays in the softmax, so the model may still put probability on "void".
# L_bce, L_dice  one binary problem per segment present (logit channel k vs. the mask id == k), P
#        points per mask chosen by -|logit|; targets read *bilinearly* from the float mask, hence
#        soft at borders. Summed over masks, divided by the number of masks (Mask2Former's mask loss
#        without Hungarian matching: the bits already fix which channel is which segment).
# L_kl   KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch.


def point_ce_loss(logits: Tensor, target_ids: Tensor, config: MaskAEConfig,
                  generator: torch.Generator | None = None) -> Tensor:
    """Point-sampled softmax cross-entropy.  [LDMSeg brief §2.3; PointRend]

    logits: (B, 2^K, H/2, W/2) float; target_ids: (B, H, W) int64 in 0..2^K-1, 0 = void (ignored).
    Returns a scalar: mean CE over the non-void points (0 with a gradient path if there are none).
    """
    coords = sample_uncertain_points(logits, uncertainty_top2, config.num_points,
                                     config.oversample_ratio, config.importance_ratio, generator)
    with torch.no_grad():
        ids = target_ids.unsqueeze(1).float()                             # (B, H, W) -> (B, 1, H, W)
        labels = point_sample(ids, coords, mode="nearest")[:, 0].round().long()  # (B, 1, P) -> (B, P)
    point_logits = point_sample(logits, coords)                           # (B, 2^K, P)
    if not (labels != 0).any():
        # Numerical guard: cross_entropy with every target ignored is 0/0 = NaN.
        return point_logits.sum() * 0.0
    return F.cross_entropy(point_logits, labels, ignore_index=0)


def segment_masks(target_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split each id map into one binary mask per non-void id present.

    target_ids: (B, H, W) int64.  Returns batch_index (M,), ids (M,), masks (M, 1, H, W) float32.
    """
    batch_index, ids = [], []
    for b in range(target_ids.shape[0]):
        present = torch.unique(target_ids[b])
        present = present[present != 0]                                  # void is not a segment
        batch_index.append(torch.full_like(present, b))
        ids.append(present)
    batch_index, ids = torch.cat(batch_index), torch.cat(ids)             # (M,), (M,)
    masks = (target_ids[batch_index] == ids[:, None, None]).float()       # (M, H, W)
    return batch_index, ids, masks.unsqueeze(1)                           # -> (M, 1, H, W)


def point_mask_loss(logits: Tensor, target_ids: Tensor, config: MaskAEConfig,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-segment BCE and Dice at uncertain points.  [LDMSeg brief §2.3; Mask2Former §3.2]

    logits: (B, 2^K, H/2, W/2); target_ids: (B, H, W) int64, 0 = void.
    Returns (bce, dice), scalars, each summed over masks / number of masks (>= 1).
    """
    batch_index, ids, masks = segment_masks(target_ids)                   # (M,), (M,), (M, 1, H, W)
    if len(ids) == 0:
        zero = logits.sum() * 0.0                                         # an all-void batch: no masks
        return zero, zero
    mask_logits = logits[batch_index, ids].unsqueeze(1)                   # (M, 1, H/2, W/2)
    coords = sample_uncertain_points(mask_logits, uncertainty_abs, config.num_points,
                                     config.oversample_ratio, config.importance_ratio, generator)
    with torch.no_grad():
        targets = point_sample(masks, coords)[:, 0]                       # (M, 1, P) -> (M, P), soft
    point_logits = point_sample(mask_logits, coords)[:, 0]                # (M, 1, P) -> (M, P)
    num_masks = max(len(ids), 1)
    bce = F.binary_cross_entropy_with_logits(point_logits, targets, reduction="none").mean(1)  # (M,)
    probs = point_logits.sigmoid()
    # Dice with +1 in numerator and denominator (Mask2Former): a tiny mask missed entirely costs < 1
    # instead of a division by ~0.
    dice = 1.0 - (2.0 * (probs * targets).sum(1) + 1.0) / (probs.sum(1) + targets.sum(1) + 1.0)  # (M,)
    return bce.sum() / num_masks, dice.sum() / num_masks


def mask_ae_loss(logits: Tensor, target_ids: Tensor, mean: Tensor, logvar: Tensor,
                 config: MaskAEConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The stage-1 objective.  [LDMSeg brief §2.3]

    logits: (B, 2^K, H/2, W/2) from MaskAutoencoder.forward; target_ids: (B, H, W) int64 (the
    remapped ids the bits were made from, 0 = void); mean, logvar: (B, 4, h, w).
    Returns scalars 'loss' (weighted total), 'ce', 'bce', 'dice', 'mask' (= bce + dice), 'kl'.
    """
    ce = point_ce_loss(logits, target_ids, config, generator)
    bce, dice = point_mask_loss(logits, target_ids, config, generator)
    kl = kl_to_standard_normal(mean, logvar).mean()                       # (B,) -> scalar
    loss = config.ce_weight * ce + config.mask_weight * (bce + dice) + config.kl_weight * kl
    return {"loss": loss, "ce": ce, "bce": bce, "dice": dice, "mask": bce + dice, "kl": kl}


# -----------------------------------------------------------------------------
# 5. Image autoencoder (Stable Diffusion KL-f8)     [LDM, Rombach et al. 2022, §3 / App. G]
# -----------------------------------------------------------------------------
# The autoencoder of Stable Diffusion v1: x (B, 3, H, W) in [-1, 1] <-> z (B, 4, H/8, W/8).
# Encoder: conv_in, then per level num_res_blocks ResNet blocks and (but the last level) a
# downsampling conv; a mid stage of ResNet - single-head self-attention - ResNet; GroupNorm - SiLU -
# conv to the 2 x 4 moments; quant_conv (1x1). The decoder mirrors it with one more ResNet block per
# level and nearest x2 + conv upsampling. Parameter names are those of the original CompVis
# checkpoint (encoder.down.0.block.0.norm1.weight, ...), so SD weights load by name; diffusers'
# AutoencoderKL holds the same tensors under other names (and its attention as Linear layers).
# LDMSeg keeps this network frozen and uses the posterior mean times 0.18215 [LDMSeg brief §3.1];
# the scale factor is a config value, applied by the caller.


@dataclass
class ImageAEConfig:
    """KL-f8 image autoencoder. Defaults = Stable Diffusion v1's (`coco` preset)."""

    in_channels: int = 3                               # image channels in (RGB in [-1, 1])
    out_channels: int = 3                              # image channels out
    ch: int = 128                                      # base width; level i has ch * ch_mult[i]  [SD: 128]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)            # width multipliers; len-1 downsamplings -> f8  [SD]
    num_res_blocks: int = 2                            # ResNet blocks per encoder level (decoder: +1)  [SD: 2]
    latent_channels: int = 4                           # channels of z (CompVis z_channels = embed_dim)  [SD: 4]
    norm_groups: int = 32                              # GroupNorm groups (eps is 1e-6 throughout)  [SD: 32]
    dropout: float = 0.0                               # dropout inside ResNet blocks  [SD: 0]
    scale_factor: float = 0.18215                      # s_i: diffusion sees s_i * mean; not applied inside  [SD; LDMSeg]
    kl_weight: float = 1e-6                            # KL weight relative to the summed L1 when training  [LDM: 1e-6]

    _PRESETS: ClassVar[dict[str, dict]] = {
        "coco": {},
        # Still f8 with 4 latent channels, sized for a CPU on 128^2 Shapes images: the full-
        # resolution level dominates the cost, so it is narrow (16) and the low levels are wider.
        # 7.7 GFLOP per image for forward + backward (ch=32, ch_mult (1, 2, 2, 4): 22.8).
        "shapes": dict(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8),
        "tiny": dict(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4),
    }

    def __post_init__(self):
        _as_tuples(self)

    @classmethod
    def preset(cls, name: str) -> "ImageAEConfig":
        """`coco` (Stable Diffusion's VAE shapes), `shapes` or `tiny`."""
        return _preset(cls, cls._PRESETS, name)


class VAEResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x))))))  (C_in -> C_out)  [LDM / CompVis ResnetBlock, no timestep]

    A 1x1 `nin_shortcut` ("network in network") matches channels when C_in != C_out.
    """

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                             # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over all H*W pixels, 1x1 convs for q, k, v, out  [CompVis AttnBlock]."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.use_sdpa = True

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1)        # (B, C, H, W) -> (B, 1, HW, C)
                   for conv in (self.q, self.k, self.v))
        h = attention(q, k, v, self.use_sdpa)                             # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)              # (B, 1, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h)


class VAEMid(nn.Module):
    """ResNet - attention - ResNet at the lowest resolution (width C -> C)."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = VAEAttnBlock(channels, groups)
        self.block_2 = VAEResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEEncoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 * 4, H/8, W/8) (before quant_conv)."""

    def __init__(self, cfg: ImageAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for level, c_out in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(VAEResnetBlock(c_in, c_out, cfg.norm_groups, cfg.dropout))
                c_in = c_out
            if level != len(widths) - 1:
                stage.downsample = Downsample(c_out, asymmetric_pad=True)
            self.down.append(stage)
        self.mid = VAEMid(c_in, cfg.norm_groups, cfg.dropout)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.latent_channels, 3, padding=1)  # "double_z": mean | logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)                                               # (B, 3, H, W) -> (B, ch, H, W)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)                                   # (B, C, H', W') -> (B, C, H'/2, W'/2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))                    # -> (B, 8, h, w)


class VAEDecoder(nn.Module):
    """z (B, 4, h, w) (after post_quant_conv) -> image (B, 3, 8h, 8w)."""

    def __init__(self, cfg: ImageAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c_in, 3, padding=1)
        self.mid = VAEMid(c_in, cfg.norm_groups, cfg.dropout)
        levels = []
        for level in reversed(range(len(widths))):                        # lowest resolution first
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(VAEResnetBlock(c_in, widths[level], cfg.norm_groups, cfg.dropout))
                c_in = widths[level]
            if level != 0:
                stage.upsample = Upsample(c_in)
            levels.insert(0, stage)                                       # CompVis indexes up[] by level
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))                                     # (B, 4, h, w) -> (B, C, h, w)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)                                     # (B, C, H', W') -> (B, C, 2H', 2W')
        return self.conv_out(F.silu(self.norm_out(h)))                    # -> (B, 3, H, W)


class ImageAutoencoder(nn.Module):
    """Stable Diffusion's KL-f8 autoencoder (CompVis parameter names).  [LDM §3; LDMSeg brief §3.1]"""

    def __init__(self, config: ImageAEConfig):
        super().__init__()
        self.config = config
        zc = config.latent_channels
        self.encoder = VAEEncoder(config)
        self.decoder = VAEDecoder(config)
        self.quant_conv = nn.Conv2d(2 * zc, 2 * zc, 1)                    # named after VQGAN's quantiser slot
        self.post_quant_conv = nn.Conv2d(zc, zc, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) in [-1, 1]  ->  mean, logvar, each (B, 4, H/8, W/8) (unscaled)."""
        return split_moments(self.quant_conv(self.encoder(x)))            # (B, 8, h, w) -> 2 x (B, 4, h, w)

    def encode_mean(self, x: Tensor) -> Tensor:
        """The posterior mode/mean, what LDMSeg conditions on (multiply by scale_factor yourself)."""
        return self.encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 4, h, w) (unscaled)  ->  image (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: x (B, 3, H, W) -> (recon (B, 3, H, W), mean, logvar (B, 4, h, w))."""
        mean, logvar = self.encode(x)
        z = sample_gaussian(mean, logvar, generator) if sample_posterior else mean
        return self.decode(z), mean, logvar


def vae_loss(recon: Tensor, x: Tensor, mean: Tensor, logvar: Tensor,
             kl_weight: float = 1e-6) -> dict[str, Tensor]:
    """L1 reconstruction + kl_weight * KL, for training the image AE on Shapes.  [LDM App. G, no GAN]

    recon, x: (B, 3, H, W) in [-1, 1]; mean, logvar: (B, 4, h, w).
    LDM sums both terms over each image (kl_weight 1e-6). We report the per-value mean L1 and divide
    the KL by the same count (3 * H * W), which keeps LDM's balance at a learning-rate-friendly scale.
    DEVIATION: no LPIPS and no patch-GAN term (they sharpen natural-image textures; Shapes images
    are flat colours and simple patterns, and a GAN would make a CPU run slow and brittle).
    Returns scalars 'loss', 'rec' (mean |recon - x|) and 'kl' (per image, summed over the latent).
    """
    rec = (recon - x).abs().mean()
    kl = kl_to_standard_normal(mean, logvar).mean()                       # (B,) -> scalar
    values_per_image = x[0].numel()
    return {"loss": rec + kl_weight * kl / values_per_image, "rec": rec, "kl": kl}


# -----------------------------------------------------------------------------
# 6. UNet layers                                    [SD-1.x UNet; DDPM App. B; Vaswani 2017; GLU variants]
# -----------------------------------------------------------------------------
# The parts of Stable Diffusion's denoiser, named as in diffusers' UNet2DConditionModel so
# diffusers-layout weights load by identity.


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim) float32.  [DDPM; Transformer]

    Frequencies f_i = 10000^(-i / (dim/2)) for i = 0..dim/2-1; output [cos(t f), sin(t f)] -- cosine
    first (SD: flip_sin_to_cos=True) and no frequency shift (freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                          # (B,) x (half,) -> (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)       # -> (B, 2 * half)


class TimestepMLP(nn.Module):
    """Linear - SiLU - Linear, from the sinusoid (D0) to the embedding every ResNet reads (4 * D0)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """ResNet block with timestep input (C_in -> C_out)  [DDPM App. B; diffusers ResnetBlock2D]

    h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); out = shortcut(x) + conv2(dropout(SiLU(GN(h)))).
    The timestep enters as a per-channel bias added between the two convolutions.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                             # (B, C_in, H, W) -> (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]         # (B, 4D0) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Multi-head attention of tokens x over themselves (attn1) or over a context (attn2).

    x: (B, N, D); context: (B, L, D_ctx) or None  ->  (B, N, D). q, k, v have no bias (SD).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])  # names: to_out.0
        self.use_sdpa = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        context = x if context is None else context
        nh = self.num_heads
        q = self.to_q(x).view(B, N, nh, D // nh).transpose(1, 2)          # (B, N, D) -> (B, nh, N, D/nh)
        k = self.to_k(context).view(B, -1, nh, D // nh).transpose(1, 2)   # (B, L, D_ctx) -> (B, nh, L, D/nh)
        v = self.to_v(context).view(B, -1, nh, D // nh).transpose(1, 2)
        h = attention(q, k, v, self.use_sdpa)                             # (B, nh, N, D/nh)
        h = h.transpose(1, 2).reshape(B, N, D)                            # -> (B, N, D)
        return self.to_out[1](self.to_out[0](h))


class GEGLU(nn.Module):
    """a * GELU(b) with [a, b] = Linear(x): a gated GELU unit  [Shazeer 2020, "GLU Variants"]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)                              # (B, N, 2 D_ff) -> 2 x (B, N, D_ff)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU (D -> 4D) - dropout - Linear (4D -> D); the ModuleList gives diffusers' names ff.net.0/2."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, N, D) tokens  [SD-1.x BasicTransformerBlock]

    x += attn1(LN(x)); x += attn2(LN(x), context) [if cross-attention]; x += ff(LN(x)).
    context_dim=None removes attn2 and norm2 altogether, as LDMSeg does [LDMSeg brief §3.2].
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, dropout=dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, num_heads, context_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        if hasattr(self, "attn2"):
            if context is None:
                raise ValueError("this UNet has cross-attention (context_dim set): pass context (B, L, D_ctx)")
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """A transformer block applied to a feature map, with a residual around it  [SD-1.x Transformer2DModel]

    GN -> 1x1 conv (proj_in) -> tokens -> TransformerBlock -> map -> 1x1 conv (proj_out) -> + x.
    SD-1.x projects with 1x1 convolutions (use_linear_projection=False); SD-2 uses Linear layers.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None, groups: int,
                 dropout: float = 0.0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, num_heads, context_dim, dropout)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)                    # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)                     # (B, HW, C) -> (B, C, H, W)
        return self.proj_out(h) + x


# -----------------------------------------------------------------------------
# 7. UNet                                           [SD-1.x UNet (LDM App. E); LDMSeg brief §3.2]
# -----------------------------------------------------------------------------
# conv_in -> down levels (ResNet [+ transformer]) x layers_per_block, then a stride-2 conv except at
# the last level -> mid (ResNet, transformer, ResNet) -> up levels with layers_per_block + 1 ResNets
# (each ResNet first concatenates one skip tensor saved on the way down), nearest x2 + conv between
# levels -> GN - SiLU - conv_out. Every ResNet reads the timestep embedding. Names follow diffusers'
# UNet2DConditionModel: conv_in, time_embedding.linear_1, down_blocks.{i}.resnets.{j},
# down_blocks.{i}.attentions.{j}, down_blocks.{i}.downsamplers.0.conv, mid_block.{resnets,attentions},
# up_blocks.{i}.{resnets,attentions,upsamplers.0.conv}, conv_norm_out, conv_out.
# LDMSeg uses SD-1.4's UNet with 12 input channels (noisy map latent | image latent | self-
# conditioning estimate) and without cross-attention [LDMSeg brief §3.2].


@dataclass
class UNetConfig:
    """Denoising UNet. Defaults = LDMSeg's COCO model: SD-1.x shapes, 12 inputs, no cross-attention."""

    in_channels: int = 12                              # 4 noisy map latent + 4 image latent + 4 self-cond  [PAPER]
    out_channels: int = 4                              # the epsilon prediction for the 4-channel latent  [PAPER]
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level  [SD-1.x]
    layers_per_block: int = 2                          # ResNet (+ transformer) pairs per down level  [SD-1.x]
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # transformer blocks at which levels  [SD-1.x]
    num_heads: int = 8                                 # attention heads at every level  [SD-1.x: 8]
    # QUIRK: diffusers' SD-1.x config stores these 8 heads under the name "attention_head_dim".
    context_dim: int | None = None                     # cross-attention context width; None = removed  [PAPER; SD: 768]
    norm_groups: int = 32                              # GroupNorm groups  [SD-1.x]
    dropout: float = 0.0                               # dropout in ResNet blocks and transformers  [SD-1.x: 0]
    gradient_checkpointing: bool = False               # recompute block activations in backward to save memory  [PAPER: on]

    _PRESETS: ClassVar[dict[str, dict]] = {
        "coco": {},
        # 16x16 latents of 128^2 Shapes images: 3 levels (16, 8, 4), self-attention at all three, as SD-1.x
        # has it at its three finest. Sized for a CPU (3.9 M parameters).
        # Choice: attention at 16x16 too, where a cell is an 8 x 8 image patch and the noisy cells of one
        # segment must agree on its random id. Stage 2, 2,400 x 16 at lr 1e-3 (the preset of then), three
        # training seeds: PQ 28.8 / 28.6 / 30.3 on val (DDIM 50) and 27.5 / 25.0 / 30.2 on 100 *train* images
        # (DDIM 20) against 22.5 / 19.1 / 22.9 and 19.4 / 18.3 / 19.5 with attention at 8x8 and 4x4 only; a
        # step costs 1.2x, and in the former time (1,950 steps) it scored 25.0 (docs/experiments.md). The
        # multi-task model keeps 8x8 and 4x4 (multitask_config), the levels its figures were measured with.
        "shapes": dict(block_out_channels=(32, 64, 128), layers_per_block=1,
                       attention_levels=(True, True, True), num_heads=4, norm_groups=16),
        "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
                     num_heads=2, norm_groups=8),
    }

    def __post_init__(self):
        _as_tuples(self)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        """`coco` (SD-1.x shapes as LDMSeg uses them), `shapes` or `tiny`."""
        return _preset(cls, cls._PRESETS, name)

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding: 4x the first level's width (1280 in SD-1.x)."""
        return 4 * self.block_out_channels[0]


def _run(module: nn.Module, use_checkpoint: bool, *args):
    """module(*args), recomputed in the backward pass instead of stored when `use_checkpoint`."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class DownBlock(nn.Module):
    """One down level: (ResNet [-> Transformer2D]) x n, then an optional stride-2 conv.

    Returns the output and every intermediate the up path concatenates back (n or n + 1 tensors).
    """

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig, with_attention: bool, downsample: bool):
        super().__init__()
        emb_dim, g = cfg.time_embed_dim, cfg.norm_groups
        self.resnets = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, emb_dim, g, cfg.dropout)
                                      for j in range(cfg.layers_per_block)])
        if with_attention:
            self.attentions = nn.ModuleList([Transformer2D(c_out, cfg.num_heads, cfg.context_dim, g, cfg.dropout)
                                             for _ in range(cfg.layers_per_block)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _run(resnet, self.gradient_checkpointing, x, emb)         # (B, C_in, H, W) -> (B, C_out, H, W)
            if hasattr(self, "attentions"):
                x = _run(self.attentions[j], self.gradient_checkpointing, x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)                                   # -> (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResNet -> Transformer2D -> ResNet at the lowest resolution (C -> C)  [SD-1.x UNetMidBlock2DCrossAttn]."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        emb_dim, g = cfg.time_embed_dim, cfg.norm_groups
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, emb_dim, g, cfg.dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(channels, cfg.num_heads, cfg.context_dim, g, cfg.dropout)])
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        ckpt = self.gradient_checkpointing
        x = _run(self.resnets[0], ckpt, x, emb)
        x = _run(self.attentions[0], ckpt, x, context)
        return _run(self.resnets[1], ckpt, x, emb)


class UpBlock(nn.Module):
    """One up level: (concat a skip -> ResNet [-> Transformer2D]) x (n + 1), then an optional x2 upsampling.

    c_prev: width coming from below; c_out: this level's width; skip_channels[j]: width of the j-th
    skip it consumes (the down path's tensors in reverse order).
    """

    def __init__(self, c_prev: int, c_out: int, skip_channels: list[int], cfg: UNetConfig,
                 with_attention: bool, upsample: bool):
        super().__init__()
        emb_dim, g = cfg.time_embed_dim, cfg.norm_groups
        c_ins = [c_prev] + [c_out] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList([ResnetBlock(c + s, c_out, emb_dim, g, cfg.dropout)
                                      for c, s in zip(c_ins, skip_channels)])
        if with_attention:
            self.attentions = nn.ModuleList([Transformer2D(c_out, cfg.num_heads, cfg.context_dim, g, cfg.dropout)
                                             for _ in skip_channels])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(c_out)])
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor | None) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)                        # (B, C, H, W) -> (B, C + C_skip, H, W)
            x = _run(resnet, self.gradient_checkpointing, x, emb)         # -> (B, C_out, H, W)
            if hasattr(self, "attentions"):
                x = _run(self.attentions[j], self.gradient_checkpointing, x, context)
        if hasattr(self, "upsamplers"):
            # Upsample to the next skip's size, so odd latent sizes (e.g. 5x5 -> 3x3 -> 5x5) work.
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])          # -> (B, C_out, 2H, 2W)
        return x


def _build_down_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The down path, and the widths of the skip tensors it saves (conv_in's output first)."""
    widths = cfg.block_out_channels
    blocks, skip_channels = nn.ModuleList(), [widths[0]]
    c_in = widths[0]
    for level, c_out in enumerate(widths):
        last = level == len(widths) - 1
        blocks.append(DownBlock(c_in, c_out, cfg, cfg.attention_levels[level], downsample=not last))
        skip_channels += [c_out] * (cfg.layers_per_block + (0 if last else 1))
        c_in = c_out
    return blocks, skip_channels


def _build_up_blocks(cfg: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """The up path: level L-1 first; each level consumes layers_per_block + 1 skips, last saved first."""
    widths = cfg.block_out_channels
    blocks, skips = nn.ModuleList(), list(skip_channels)
    c_prev = widths[-1]
    for level in reversed(range(len(widths))):
        n = cfg.layers_per_block + 1
        level_skips = [skips.pop() for _ in range(n)]                     # the order forward() pops them
        blocks.append(UpBlock(c_prev, widths[level], level_skips, cfg, cfg.attention_levels[level],
                              upsample=level != 0))
        c_prev = widths[level]
    return blocks


class UNet(nn.Module):
    """Stable Diffusion's denoising UNet (diffusers' parameter names).  [SD-1.x; LDMSeg brief §3.2]

    unet(x_t, t, context=None): x_t (B, in_channels, h, w), t (B,) int64 or float timesteps (a
    0-dim t is broadcast), context (B, L, context_dim) when cross-attention is on  ->  (B, out_channels, h, w).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepMLP(c0, config.time_embed_dim)
        self.down_blocks, skip_channels = _build_down_blocks(config)
        self.mid_block = MidBlock(config.block_out_channels[-1], config)
        self.up_blocks = _build_up_blocks(config, skip_channels)
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, c0, eps=1e-5)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(B)                                               # one timestep for the whole batch
        # The sinusoid is computed in float32 (t up to 999 needs the precision), then cast like diffusers.
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(x_t.dtype))  # (B, 4 C0)
        h = self.conv_in(x_t)                                             # (B, C_in, h, w) -> (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)                       # halves h, w but at the last level
            skips += block_skips
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)                             # consumes layers_per_block + 1 skips
        return self.conv_out(F.silu(self.conv_norm_out(h)))               # (B, C0, h, w) -> (B, C_out, h, w)


# -----------------------------------------------------------------------------
# 8. LDMSeg model                                   [LDMSeg §3; brief §3.1-3.3]
# -----------------------------------------------------------------------------
# The denoiser sees three 4-channel latents stacked on channels [LDMSeg brief §3.1]:
#   z_t      the noisy panoptic latent (mask AE encoder mean x s_t, then the forward process),
#   z_image  the image latent (image AE encoder mean x s_i), clean -- the condition,
#   x0_self  the model's own previous estimate of the clean latent (self-conditioning).
# The condition and self-condition input channels of conv_in start at zero, so at initialisation the
# model is exactly an unconditional UNet on z_t: when it starts from Stable Diffusion weights the
# pretrained function is untouched, and the new inputs grow in as they prove useful [LDMSeg §3.2].
#
# Loss: epsilon-prediction on the scaled-linear schedule, weighted by min(SNR_t, gamma) / SNR_t
# (min-SNR-gamma for eps-prediction, Hang et al. 2023; gamma = 2 [PAPER]), with latent cells whose
# (nearest-downsampled) id is void masked out [LDMSeg brief §3.3].
#
# Written in x0 terms, that loss is min(SNR_t, gamma) * |x0_pred - x0|^2: below SNR = gamma
# (t >= 255 of the scaled-linear schedule's 1000) the error of the clean latent counts in
# proportion to SNR_t -- at t = 999 about 1/400 of what it counts at t < 255. Yet
# the high-noise steps are where the sampler decides which segments exist: there z_t says almost
# nothing and only the image can. A model trained from scratch for minutes learns those steps last.
# `prediction="x0"` is the other choice: the UNet outputs x0 and the loss is |x0_pred - x0|^2 with
# the same weight at every t -- the x0-parameterised, unweighted regression of Analog Bits (Chen et
# al. 2023, Alg. 1); its panoptic use, Pix2Seq-D (arXiv 2210.06366), also predicts the mask itself
# (with a cross-entropy loss). The samplers take either output (sample.to_x0_and_eps).
#
# Self-conditioning (Chen et al., "Analog Bits", §3.2). DEVIATION: the official code feeds the
# self-condition on 100 % of training steps, so the all-zero self-condition that starts every
# sampling run is never trained; we follow Analog Bits and feed it on 50 % of samples (zeros on the
# rest), so both states the sampler uses are trained, and the extra no-grad pass runs on half the
# batch only.
#
# Task embeddings [LDMSeg §6, Fig. 1 right: "learnable task embeddings"; brief §6]. With
# `config.tasks` set, the UNet keeps its cross-attention (context_dim = D_ctx) and its context is
# the task's learned embedding: task_tokens rows of an nn.Embedding(num_tasks * task_tokens, D_ctx),
# the hook the official code has (`define_learnable_embedding`, 768-wide) but never trains. The
# same weights then denoise whichever task's latent the embedding names (section 10). With a single
# token the softmax over keys is 1, so every attn2 adds one learned vector per task and block, a
# task-specific shift; more tokens let each position attend to a different mix of them.
#
# Time shift, a sampling setting (`time_shift`; DEVIATION: LDMSeg samples without it). Analog Bits
# (Chen et al. 2023) samples bits with "asymmetric time intervals": the network is told a time td
# later than the one its input was made at. Here: the sampler's state is at step t, the denoiser is
# told t + shift (at most T - 1), its output is read as x0 *at that time* (an eps output converted
# with alpha, sigma of t + shift, which is what it estimated), and the sampler's update goes on
# from the state's own t. It is a property of a trained recipe, like the decoding thresholds, so it
# lives in the config a checkpoint carries; sample.py / evaluate.py --time-shift override it.
# Measured on Shapes (x0 at b = 0.1; 200 val images; PQ DDIM 50 / DPM-Solver++ 20): the 6,000-step
# model 12.3 / 12.7 at shift 0 and 22.7 / 20.9 at 300; the 1,500-step model 6.9 / 5.5 and 7.4 / 6.7.
# On 100 val images with DDIM 20 the 6,000-step model scores 12.1 at 0, 17.5 at 100, 20.5 at 300
# and 18.5 at 600. The gain comes from the last steps: shifting only t <= 100 (the last two of 20)
# gives 20.7, shifting all but those 9.2 (100 train images). At b = 0.1 even t = 49 has SNR 0.2, and
# the model's x0 from such a state is worse than the one it gives when told the noise is larger:
# the stuff regions come out clean, and the things it cannot resolve are left void rather than
# fragmented. On the multi-task eps model (b = 0.3) a shift of 100 helps the categorical tasks
# (class-aware PQ 23.8 -> 25.5) but not depth (delta<1.25 0.61 -> 0.49), and 300 ruins all three (an
# eps output read at a t with small alpha has its error amplified by 1 / alpha). The multi-task preset
# predicts x0 at b = 0.1 as stage 2 did, and there the shift is all but neutral (section 10).
#
# Clamping x0 to a map, a sampling setting (`clamp_x0`; DEVIATION: LDMSeg samples without it). With
# random ids, the regression-optimal x0 of a cell whose id the noise has not yet settled is the mean over
# ids: a latent that decodes to no confident id, which the thresholds turn to void. The sampler moves
# towards that mean, step after step, and small things end as void holes. Diffusion-LM (Li et al. 2022,
# arXiv 2205.14217, §4.2, "the clamping trick") meets the same indecision between word embeddings and maps
# each x0 estimate to its nearest embedding before the update. Here the nearest valid latent is the
# latent of the map the estimate decodes to: x0 -> mask decoder -> LDMSeg's argmax and thresholds ->
# ids -> mask encoder (clamp_to_map), at every step, before the sampler and the self-condition see it.
# Each step then commits to one id per segment, which the next step's model call can revise. Sampling
# only: training is unchanged, and a step costs one mask AE decode and encode more (at 128^2 that is
# twice the UNet's time: DDIM 50 on 64 val images, two threads, 29 s against 9.5 s unclamped).
# Measured on the quick start's stage-2 model (x0, b = 0.1, shift 300), chosen on 100 *train* images
# (DDIM 20): PQ 8.5 without; 12.1 clamped through the bare argmax, 12.3 through LDMSeg's thresholds (kept),
# 11.2 through the softmax-expected bits; clamping only at model times t <= 350 / 600: 8.3 / 11.2. With
# shift 0 it hurts (7.2 -> 5.4): the unshifted x0 of the last steps is the fragmented one the shift fixes.
# Shifts 200 / 300 / 400 / 600 with clamping: 11.5 / 12.3 / 12.7 / 12.9; 300 stays. DDPM 100: 15.5.
# On the 200 val images (DDIM 50 / DPM-Solver++ 20, seeds 0 / 1 / 2): 13.3 / 12.5, 15.1 / 14.5, 14.8 / 15.0
# against 11.3 / 10.1, 11.4 / 9.9, 10.9 / 9.6 without; DDPM 100: 16.0 against 13.3. Mask inpainting does
# not clamp (section 11). Tried and not built, for the same weakness (the model barely reads the image):
# classifier-free guidance on the image. A model trained with the image latent zeroed on 10 % of samples
# scored 6.8 / 7.5 / 7.9 at guidance 1 / 2 / 3 (100 train images, DDIM 20, no clamping) against 8.5 for
# the preset's model unguided. Nor clamping in training (the self-condition clamped as sampling clamps it):
# PQ 14.3 / 13.3 on val (DDIM 50 / DPM-Solver++ 20) against 13.3 / 12.5, 13.4 against 12.3 on the 100 train
# images (one training run), for 15-20 % more time per training step.
#
# Decoded cross-entropy, a training option (`decoded_ce_weight`; DEVIATION: LDMSeg trains on the latent
# loss alone). The latent MSE counts every latent direction alike, though only some of them change the
# map the decoder reads; and it is blind to what the thresholds make of a latent between two ids. The
# option adds stage 1's own point-sampled cross-entropy (section 4) on the logits the frozen mask decoder
# gives for the UNet's x0 estimate, against the remapped ids z_0 encodes (void ignored):
#   L = mean( w * valid * (pred - target)^2 ) + decoded_ce_weight * CE( decode(x0_pred / (b s_t)), ids )
# The decoder's weights stay frozen; the gradient runs through it into x0_pred. Pix2Seq-D (Chen et al.
# 2023, arXiv 2210.06366) found a softmax cross-entropy on its predicted mask better than the L2 on its
# analog bits; here the L2 stays and the cross-entropy is added through the decoder. It
# needs prediction = "x0": an eps model's x0 = (z_t - sigma eps) / alpha carries its error times 1 / alpha
# (15 at t = 999), and the cross-entropy would be ruled by the noisiest samples. A step costs one mask
# decode with its gradient more: 1.3 times the preset's step on the CPU (1.7 against 2.2 it/s, one thread).
# Measured on the quick start's autoencoders, every cell weighed alike (the preset before the area weights
# below; one thread beside another run; PQ DDIM 50 / DPM-Solver++ 20 on the 200 val images): 2,400 steps at
# weight 0.1 score 23.5 / 22.8, and 23.1 / 22.8 with seed 1, against that preset's 21.5 / 21.3 and 19.9 /
# 19.9; at weight 0.3 21.8 / 21.7. But that preset given the same time (3,100 steps) scores 25.5 / 25.1, and
# 23.5 / 23.7 with seed 1; on 100 *train* images (DDIM 20) 23.5 against 22.7 at 0.1 and 21.9 at 0.3. The
# loss buys no more than the steps its time would buy: off in every preset.
#
# Area-weighted latent loss (`area_weight_power` p; DEVIATION: LDMSeg weights every non-void latent cell
# alike; the `shapes` preset takes p = 0.5). Under the plain mean a segment counts in proportion to its
# area, so a Shapes image's sky and sea rule the loss while its things -- one to four latent cells each --
# are where stage 2 fails (missed or merged: RQ 0.25-0.30 against SQ 0.72). With p > 0 each pixel weighs
# area^-p (the area of its segment, in pixels; void 0), a latent cell weighs the mean of its pixels, and
# the weights of each sample's non-void cells are rescaled to average 1:
#   valid_p[c] = valid[c] * mean_{x in c} area(x)^-p / mean_{c' valid}( mean_{x in c'} area(x)^-p )
# so the loss keeps its scale and p = 0 is the paper's mask. p = 1 gives every segment the same total
# weight; p = 0.5 weighs a 100-px thing's cell 7 times a 5,000-px stuff region's. A cell on a thing's
# boundary takes the thing's share of its pixels. The idea is the class- and size-balancing of dense
# prediction losses (e.g. the median-frequency balancing of SegNet, Badrinarayanan et al. 2017); it
# costs nothing measurable per step (4.9 against 4.8 it/s).
# Measured on the AMD EPYC machine of the README, on its quick start's autoencoders (2,400 steps, two
# threads, the UNet's attention at 8x8 and 4x4 then; PQ DDIM 50 / DPM-Solver++ 20 on the 200 val images,
# and DDIM 20 on 100 *train* images): p = 0.5
# scores 22.5 / 22.0 · 19.4, 19.1 / 18.6 · 18.3 and 22.9 / 22.8 · 19.5 in seeds 0 / 1 / 2, against p = 0's
# 18.3 / 18.2 · 16.8, 19.0 / 17.8 · 16.5 and 20.6 / 20.0 · 17.2: up in every pair, by 2.2 / 2.5 / 2.3
# points on average, about p = 0's own spread over seeds. p = 0.25: 21.8 / 21.4 · 19.4. p = 1: 7.7 / 6.9 ·
# 6.0, the stuff regions, weighed too little, broken into many segments (its val grid). The `shapes`
# preset takes p = 0.5 (chosen on the train figures above); `coco`, `tiny` and the multi-task model keep
# the paper's 0.
#
# Matched ids, a training option (`match_ids`; DEVIATION: LDMSeg regresses the ids it drew). Each sample's
# segments take random ids, and z_t is the noised latent of those ids. Where the noise has hidden them
# (large t), the regression-optimal x0 is the mean over the ids a segment could have had: the same blur
# for every segment, which the sampler and the clamp then settle by the noise alone -- and a small thing
# settles into its neighbour's id (most missed things are merged so: docs/experiments.md). With the
# option the x0 target is the latent of the same segments renamed to the ids the UNet's estimate draws
# them with: the frozen mask decoder reads the (detached) x0 estimate, and each segment takes the id of
# least cross-entropy over its cells, injectively per image, void kept:
#   ids' = match_ids(log_softmax(decode(x0_pred / (b s_t))), ids),   L = mean( w * valid * (x0_pred - E(ids'))^2 )
# The noise is left as it was drawn. Where z_t still shows the ids (small t), the estimate draws them and
# nothing is renamed; where it does not, any injective naming of the right segments is a right answer, so
# the model learns to draw every segment distinct from its neighbours instead of the blur. This is
# permutation-invariant training (Yu et al. 2017, speech separation) and the set matching of DETR (Carion
# et al. 2020) applied to the diffusion target. The assignment is greedy, largest segment first (a greedy
# over the cheapest pairs lets a 3-px segment inside a large one take the large one's id at no cost). The
# optimum over all injections (least total cross-entropy, the Hungarian algorithm) differs from it in about
# a third of the images and trained worse: 48.7 against 54.2 (docs/experiments.md). A step costs one mask
# decode and one encode more, without gradients (7-30 % of the `shapes` step on 2 CPU cores). Sampling is
# unchanged.
# Measured on the quick start's autoencoders (2,400 steps; PQ DDIM 50 on the 200 val images): 55.3, and
# 53.0 / 52.6 in seeds 0 / 1 of a scratch copy, against 43.8 unmatched; SQ and RQ both up. The `shapes`
# preset has it on, at 1,900 steps (train.py) for the time 2,400 unmatched took: 54.2; `coco` (the paper's
# eps), `tiny` and the multi-task model keep it off. The model draws its own names instead of reading them
# from z_t, so mask inpainting gives its given segments the names the model draws them with (section 11;
# with random codes it fell from 75.5 to 32.6 with half the map given).


@dataclass
class LDMSegConfig:
    """The stage-2 model: UNet + the two frozen autoencoders it reads and writes through."""

    unet: UNetConfig = None                            # the denoiser (in_channels is set by LDMSeg)
    mask_ae: MaskAEConfig = None                       # stage-1 autoencoder (frozen); its scale_factor = s_t
    image_ae: ImageAEConfig = None                     # image autoencoder (frozen); its scale_factor = s_i
    schedule: str = "scaled_linear"                    # beta schedule  [PAPER: SD's scaled_linear 0.00085-0.012]
    num_train_steps: int = 1000                        # T  [PAPER]
    min_snr_gamma: float = 2.0                         # gamma of the loss weight min(SNR, gamma) / SNR  [PAPER: 2]
    prediction: str = "eps"                            # the UNet's output: 'eps' (min-SNR weighted) or 'x0' (unweighted)  [PAPER: eps]
    self_condition: bool = True                        # feed x0_self as extra input channels  [PAPER]
    self_condition_prob: float = 0.5                   # share of training samples given x0_self  [DEVIATION: code 1.0]
    mask_th: float = 0.5                               # decoding: min softmax confidence of a pixel  [PAPER: 0.5]
    count_th: float = 512.0                            # decoding: min segment area in pixels for a model working at 512^2 (section 9)  [PAPER: 512]
    overlap_th: float = 0.5                            # decoding: min |argmax region| / |sigmoid >= mask_th region|  [PAPER: 0.5]
    zero_init_condition: bool = True                   # zero conv_in's image / self-condition inputs  [PAPER]
    signal_scale: float = 1.0                          # b: the diffusion sees b * s_t * mean; b < 1 lowers every SNR_t  [PAPER: s]
    tasks: tuple[str, ...] = ()                        # multi-task: names from TASKS, one learned embedding each; () = one task  [PAPER §6]
    task_tokens: int = 1                               # multi-task: context tokens per task (cross-attention keys)  [PAPER: 1 embedding]
    depth_range: tuple[float, float] = (1.0, 64.0)     # multi-task: depths (m) mapped to -1 / +1 on a log scale  [ours; Shapes 1-60 m]
    depth_subcells: int = 1                            # multi-task: s x s depth medians per latent cell, s in {1, 2}  [ours; section 10]
    depth_guide_sigma: float = 0.1                     # multi-task: colour sigma of image-guided depth upsampling ([-1, 1] RGB); 0 = nearest  [ours; Kopf 2007; section 10]
    task_signal_scales: dict[str, float] = field(default_factory=dict)  # multi-task: own b of semantic / depth; else signal_scale  [ours; section 10]
    task_loss_weights: dict[str, float] = field(default_factory=dict)   # multi-task: a task's loss weight; else 1  [ours; section 10]
    task_sample_weights: dict[str, float] = field(default_factory=dict) # multi-task: a task's relative sampling weight; else 1  [ours; section 10]
    time_shift: int = 0                                # sampling: the denoiser is told t + time_shift  [DEVIATION: Analog Bits' td; section charter]
    clamp_x0: bool = False                             # sampling: each x0 estimate -> its decoded map -> that map's latent  [DEVIATION: Diffusion-LM's clamping; section charter]
    id_order: str = "random"                           # training ids: 'random' (fresh per sample) or 'raster' (first-pixel order)  [PAPER: random; DEVIATION option: data.py section 2]
    decoded_ce_weight: float = 0.0                     # training: weight of stage 1's CE on the ids decoded from x0_pred; 0 = off  [PAPER: 0; DEVIATION option: section charter]
    area_weight_power: float = 0.0                     # training: latent cells weighted by area^-p of their segments; 0 = alike  [PAPER: 0; DEVIATION: shapes 0.5, section charter]
    match_ids: bool = False                            # training: the target's ids renamed to the ones the x0 estimate draws  [PAPER: off; DEVIATION option: section charter]

    def __post_init__(self):
        # Checkpoints store configs as plain dicts: rebuild the nested configs from them.
        self.unet = UNetConfig(**self.unet) if isinstance(self.unet, dict) else (self.unet or UNetConfig())
        self.mask_ae = MaskAEConfig(**self.mask_ae) if isinstance(self.mask_ae, dict) else (self.mask_ae or MaskAEConfig())
        self.image_ae = (ImageAEConfig(**self.image_ae) if isinstance(self.image_ae, dict)
                         else (self.image_ae or ImageAEConfig()))
        _as_tuples(self)                                                  # tasks, depth_range back from JSON lists
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"LDMSegConfig.prediction must be 'eps' or 'x0', got {self.prediction!r}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"LDMSegConfig.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not 0 <= self.self_condition_prob <= 1:
            raise ValueError(f"LDMSegConfig.self_condition_prob must lie in [0, 1], got {self.self_condition_prob}")
        if self.signal_scale <= 0 or any(b <= 0 for b in self.task_signal_scales.values()):
            raise ValueError(f"LDMSegConfig: signal scales must be > 0, got {self.signal_scale} and {self.task_signal_scales}")
        if set(self.task_signal_scales) - set(OWN_SCALE_TASKS):
            raise ValueError(f"LDMSegConfig.task_signal_scales takes semantic and depth (instance is stage 2's latent at "
                             f"signal_scale), got {sorted(self.task_signal_scales)}")
        for name in ("task_loss_weights", "task_sample_weights"):
            weights = getattr(self, name)
            if set(weights) - set(TASKS) or any(not w > 0 for w in weights.values()):
                raise ValueError(f"LDMSegConfig.{name} takes weights > 0 of {TASKS}, got {weights}")
        if not self.depth_guide_sigma >= 0:
            raise ValueError(f"LDMSegConfig.depth_guide_sigma must be >= 0 (0 = nearest upsampling), got {self.depth_guide_sigma}")
        if not 0 <= self.time_shift < self.num_train_steps:
            raise ValueError(f"LDMSegConfig.time_shift must lie in [0, {self.num_train_steps - 1}], got {self.time_shift}")
        if self.id_order not in ID_ORDERS:
            raise ValueError(f"LDMSegConfig.id_order must be one of {ID_ORDERS}, got {self.id_order!r}")
        if not self.decoded_ce_weight >= 0:
            raise ValueError(f"LDMSegConfig.decoded_ce_weight must be >= 0 (0 = off), got {self.decoded_ce_weight}")
        if self.decoded_ce_weight and self.prediction != "x0":
            raise ValueError("LDMSegConfig.decoded_ce_weight needs prediction='x0': an eps model's x0 estimate carries "
                             "its error times 1 / alpha (section 8)")
        if self.decoded_ce_weight and self.tasks:
            raise ValueError("LDMSegConfig.decoded_ce_weight applies to the single-task panoptic latent; a multi-task "
                             "model's semantic and depth latents have no mask decoder to decode through")
        if not self.area_weight_power >= 0:
            raise ValueError(f"LDMSegConfig.area_weight_power must be >= 0 (0 = every cell alike), got {self.area_weight_power}")
        if self.area_weight_power and self.tasks:
            raise ValueError("LDMSegConfig.area_weight_power applies to the single-task panoptic latent; a multi-task "
                             "model's depth latent has no segments to weigh by")
        if self.match_ids and (self.prediction != "x0" or self.tasks or self.id_order != "random"):
            raise ValueError("LDMSegConfig.match_ids renames the random ids of the single-task panoptic latent against "
                             "an x0 estimate: it needs prediction='x0', no tasks and id_order='random' (section 8)")
        if self.clamp_x0 and self.tasks and "instance" not in self.tasks:
            raise ValueError("LDMSegConfig.clamp_x0 clamps the panoptic (instance) latent; a multi-task model without "
                             "the instance task has none to clamp")

    @classmethod
    def preset(cls, name: str) -> "LDMSegConfig":
        """`coco` (LDMSeg's released model), `shapes` or `tiny`: the three parts' presets."""
        # PAPER: LDMSeg scales its latents with s to lower the SNR, so the model relies more on the
        # image (brief §3.1, second-hand; §7). Ours are made unit-variance by stage 1 (s_t = 1 / std),
        # and a signal scale b < 1 would lower them further (Chen 2023, "On the importance of noise
        # scheduling"; Pix2Seq-D scales its analog bits down). Every preset keeps b = 1.
        # DEVIATION (shapes only): x0-prediction, unweighted (section charter). Measured with the quick
        # start's autoencoders (1,500 x 16, 200 val images, PQ DDIM 50 / DPM-Solver++ 20, before the time
        # shift and clamping): eps at b = 0.3 1.4 / 4.7; x0 at b = 0.3 5.3 / 4.6; x0 at b = 0.1 5.9 / 5.4
        # (5.3 / 4.5 in another run). The preset then took b = 0.1. With the time shift and clamping (2,400
        # x 16, one thread each): x0 at b = 1 21.3 / 21.1 against 13.4 / 12.9 at b = 0.1, and on 100 *train*
        # images (DDIM 20) 19.3 against 13.0. Random ids make a cell's id legible from z_t only where the
        # noise leaves it so; at b = 0.1 that is t < 11 for a single cell, so the model meets the evidence
        # it must group by image on 1 % of its samples, at b = 1 on a third of them.
        # Tried and not adopted: b = 2. Three runs: 24.8 / 23.4 (two threads), 25.3 / 24.5 (one thread, beside
        # a b = 4 run, which scored 14.3 / 12.6), and the quick start itself at b = 2 (fresh clone, two
        # threads) 20.9 / 20.0, against b = 1's 20.8 / 20.4 (the quick start) and 21.3 / 21.1. On the 100
        # train images the first scored 22.2 (shifts 100 / 600: 19.9 / 19.8), the second 21.4 (16.0
        # unclamped). Perhaps two points on average, within one run's spread, and the quick start gained
        # nothing; DPM-Solver++ 20 lands 0.8-1.4 below DDIM 50 at b = 2 (three sampling seeds) though 0.4
        # above DDIM 20. b = 1 stays.
        # coco: the paper's eps.
        # DEVIATION (shapes only): sampled with time_shift 300 (section charter), chosen on 100 *train*
        # images (DDIM 20) of two x0 models: PQ 10.9 at 0, 18.0 at 100, 19.5 at 200, 20.3 at 300, 20.8
        # at 400 (6,000 steps); 4.9, 5.4, 5.1, 5.2, 5.5 (1,500 steps). At b = 1 (2,400 steps, clamped):
        # 15.5 at 0, 17.7 at 100, 19.3 at 300, 18.6 at 600 (a b = 2 model: 19.9 / 22.2 / 19.8 at 100 / 300 / 600).
        # DEVIATION (shapes only): x0 clamped to a map at every sampling step (section charter). At b = 1
        # (the same images): unclamped 7.6 / 10.4 / 14.4 / 16.0 at those shifts (a b = 2 model at 300: 16.0
        # against 21.4 clamped). Clamping stays.
        # DEVIATION (shapes only): the latent loss weighted by area^-0.5 of each cell's segments (section
        # charter). Three training seeds, 2,400 x 16, on 100 *train* images (DDIM 20): 19.4 / 18.3 / 19.5
        # against 16.8 / 16.5 / 17.2 with every cell alike; p = 0.25 19.4 (seed 0), p = 1 6.0.
        # DEVIATION (shapes only): matched ids in training (section charter), with stage 2's steps cut from 2,400
        # to 1,900 (train.py) to pay for them. On the quick start's autoencoders, two threads, PQ DDIM 50 /
        # DPM-Solver++ 20 on the 200 val images: 54.2 / 53.6 at 1,900 steps and 55.3 / 55.2 at 2,400, against
        # 43.8 / 43.1 without (2,400 steps; one machine, the README's Intel Xeon).
        extra = {"shapes": dict(prediction="x0", time_shift=300, clamp_x0=True, area_weight_power=0.5,
                                match_ids=True)}.get(name, {})
        return cls(unet=UNetConfig.preset(name), mask_ae=MaskAEConfig.preset(name),
                   image_ae=ImageAEConfig.preset(name), **extra)


def zero_init_new_inputs(conv_in: nn.Conv2d, keep: int) -> None:
    """Zero the weights of conv_in's input channels from `keep` on (image + self-condition).

    With them zero, the output does not depend on those inputs at initialisation [LDMSeg §3.2].
    """
    with torch.no_grad():
        conv_in.weight[:, keep:].zero_()


class LDMSeg(nn.Module):
    """UNet denoiser of panoptic latents conditioned on image latents, plus its frozen autoencoders.

    forward(z_t, t, z_image, x0_self) -> the prediction (eps or x0, config.prediction), all latents
    (B, 4, h, w), t (B,) int64.
    `self.mask_ae` and `self.image_ae` are frozen (requires_grad False): the checkpoint holds all three
    so that sampling needs nothing but the checkpoint.
    """

    def __init__(self, config: LDMSegConfig):
        super().__init__()
        self.config = config
        c = config.mask_ae.latent_channels
        in_channels = c + config.image_ae.latent_channels + (c if config.self_condition else 0)
        config.unet = dataclasses.replace(config.unet, in_channels=in_channels, out_channels=c)
        self.unet = UNet(config.unet)
        if config.zero_init_condition:
            zero_init_new_inputs(self.unet.conv_in, keep=c)
        self.mask_ae = MaskAutoencoder(config.mask_ae).requires_grad_(False)
        self.image_ae = ImageAutoencoder(config.image_ae).requires_grad_(False)
        self.schedule = NoiseSchedule(config.schedule, config.num_train_steps)
        if config.tasks:
            if config.unet.context_dim is None:
                raise ValueError("a multi-task LDMSeg reads its task through cross-attention: set unet.context_dim")
            # nn.Embedding's N(0, 1) init: unit variance per dimension, the scale of SD's (LayerNormed)
            # CLIP context, so cross-attention started from SD weights sees inputs of its usual size.
            self.task_embedding = nn.Embedding(len(config.tasks) * config.task_tokens, config.unet.context_dim)

    def train(self, mode: bool = True) -> "LDMSeg":
        """The autoencoders stay in eval mode: they are frozen feature extractors."""
        super().train(mode)
        self.mask_ae.eval()
        self.image_ae.eval()
        return self

    def forward(self, z_t: Tensor, t: Tensor, z_image: Tensor, x0_self: Tensor | None = None,
                task: Tensor | None = None) -> Tensor:
        """The prediction (B, 4, h, w) from z_t, z_image (B, 4, h, w), optionally x0_self (zeros if None) and,
        for a multi-task model only, task (B,) int64: indices into config.tasks."""
        parts = [z_t, z_image]
        if self.config.self_condition:
            parts.append(torch.zeros_like(z_t) if x0_self is None else x0_self)
        return self.unet(torch.cat(parts, dim=1), t, self.task_context(task))  # (B, 12, h, w) -> (B, 4, h, w)

    def task_context(self, task: Tensor | None) -> Tensor | None:
        """task (B,) int64 indices into config.tasks -> cross-attention context (B, L, D_ctx), L = task_tokens.

        None for a single-task model (no cross-attention), which must not be given a task.
        """
        if not self.config.tasks:
            if task is not None:
                raise ValueError("this LDMSeg has no tasks (config.tasks is empty): call it without task")
            return None
        if task is None:
            raise ValueError(f"a multi-task LDMSeg needs task (B,) int64, indices into {self.config.tasks}")
        L, device = self.config.task_tokens, self.task_embedding.weight.device
        rows = task.to(device)[:, None] * L + torch.arange(L, device=device)  # (B,) -> (B, L) embedding rows
        return self.task_embedding(rows)                                  # (B, L) -> (B, L, D_ctx)

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in [-1, 1] -> z_image = s_i * posterior mean (B, 4, H/8, W/8)."""
        return self.image_ae.encode_mean(image) * self.config.image_ae.scale_factor

    @torch.no_grad()
    def encode_ids(self, ids: Tensor) -> Tensor:
        """ids (B, H, W) int64 (already remapped into 1..2^K-1) -> z_0 = s_t * mean (B, 4, h, w), fp32.

        PAPER: the frozen mask autoencoder runs in fp32 whatever the UNet's autocast [LDMSeg brief §3.4], so
        the targets a bf16 run trains on are those sampling and inpainting encode. (The image autoencoder
        follows the autocast, as SD's VAE runs in half precision in the official code.)
        """
        with _fp32(ids):
            return self._encode_bits(ids_to_bits(ids, self.config.mask_ae.num_bits).float())

    def _encode_bits(self, bits: Tensor) -> Tensor:
        """bits (B, K, H, W) -> z_0 = s_t * mean (B, 4, h, w)."""
        if bits.device.type == "cpu":
            # Speed only: oneDNN's channels-last convolutions run this frozen encoder, which stage 2 calls on
            # fresh random ids every step, in 29 ms instead of 45 for a batch of 16 at 128^2 on 2 CPU cores
            # (same latent to 3e-6). The decoder stays contiguous: there channels-last measured slower.
            bits = bits.contiguous(memory_format=torch.channels_last)
        return self.mask_ae.encode(bits)[0].contiguous() * self.latent_scale

    @torch.no_grad()
    def decode_latent(self, z0: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """z_0 (B, 4, h, w) -> id logits (B, 2^K, H, W) at full size (or `size`); fp32 (encode_ids)."""
        with _fp32(z0):
            return self.mask_ae.decode_full(z0.float() / self.latent_scale, size)

    @property
    def latent_scale(self) -> float:
        """b * s_t: unit-variance panoptic latents (s_t = 1 / std from stage 1) times the signal scale b."""
        return self.config.mask_ae.scale_factor * self.config.signal_scale


def void_mask_latent(ids: Tensor, h: int, w: int) -> Tensor:
    """(B, H, W) ids -> (B, 1, h, w) float, 1 where the nearest-downsampled id is not void."""
    small = F.interpolate(ids[:, None].float(), size=(h, w), mode="nearest")  # (B, 1, H, W) -> (B, 1, h, w)
    return (small != 0).float()


def area_weighted_mask(ids: Tensor, h: int, w: int, power: float) -> Tensor:
    """(B, H, W) ids -> (B, 1, h, w) loss weights: void_mask_latent's cells, weighted by area^-power (section charter).

    A pixel weighs area^-power, the area (in pixels) of its segment, void 0; a cell, the mean over its
    pixels; each sample's non-void cells are rescaled to average 1. power = 0 returns void_mask_latent.
    """
    valid = void_mask_latent(ids, h, w)                                   # (B, 1, h, w)
    if power == 0:
        return valid
    B = ids.shape[0]
    flat = ids.reshape(B, -1)                                             # (B, H W)
    key = flat + torch.arange(B, device=ids.device)[:, None] * (int(flat.max()) + 1)  # ids made unique per sample
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    area = counts[inverse].float()                                        # (B, H W): each pixel's segment area
    per_pixel = torch.where(flat > 0, area.pow(-power), torch.zeros_like(area)).view(B, 1, *ids.shape[1:])
    cell = F.adaptive_avg_pool2d(per_pixel, (h, w)) * valid               # (B, 1, H, W) -> (B, 1, h, w)
    return cell * valid.sum((1, 2, 3), keepdim=True) / cell.sum((1, 2, 3), keepdim=True).clamp(min=1e-30)


def min_snr_weight(snr: Tensor, gamma: float) -> Tensor:
    """min(SNR_t, gamma) / SNR_t, the min-SNR-gamma weight for eps-prediction [LDMSeg §3.3; Hang 2023]."""
    return snr.clamp(max=gamma) / snr


def denoise(model: nn.Module, z_t: Tensor, t: Tensor, z_image: Tensor, x0_self: Tensor | None,
            task: Tensor | None) -> Tensor:
    """model(z_t, t, z_image, x0_self[, task]): the task is passed only to a multi-task model, so a
    single-task call keeps the four-argument denoiser interface (wrappers and test spies see no change)."""
    if task is None:
        return model(z_t, t, z_image, x0_self)
    return model(z_t, t, z_image, x0_self, task)


def predict_x0(out: Tensor, prediction: str, z_t: Tensor, t: Tensor, schedule) -> Tensor:
    """The UNet's output (eps or x0, as `prediction`) -> the clean-latent estimate x0 (B, 4, h, w)."""
    return to_x0_and_eps(out.float(), prediction, z_t.float(), t, schedule)[0]


def self_condition_input(model: nn.Module, z_t: Tensor, t: Tensor, z_image: Tensor, use: Tensor,
                         schedule, task: Tensor | None = None, prediction: str = "eps") -> Tensor:
    """x0_self for training: a no-grad pass's x0 estimate where `use` (B,) bool, zeros elsewhere.

    The pass runs on the selected samples only; its output is detached, as in Analog Bits.
    """
    x0_self = torch.zeros_like(z_t)
    if use.any():
        with torch.no_grad():
            out = denoise(model, z_t[use], t[use], z_image[use], None, None if task is None else task[use])
            x0_self[use] = predict_x0(out, prediction, z_t[use], t[use], schedule).to(x0_self.dtype)
    return x0_self


def decoded_ce_loss(net: LDMSeg, x0_pred: Tensor, ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stage 1's point-sampled cross-entropy on the ids the frozen mask decoder reads from x0_pred (section charter).

    x0_pred: (B, 4, h, w) float in z_0's units (b * s_t * mean); ids: (B, H, W) int64, the remapped ids z_0
    encodes (0 = void, ignored). The gradient flows through the decoder (its weights frozen) into x0_pred.
    """
    with _fp32(x0_pred):                                                 # the frozen decoder in fp32 (encode_ids)
        logits = net.mask_ae.decode(x0_pred.float() / net.latent_scale)  # (B, 4, h, w) -> (B, 2^K, H/2, W/2)
    return point_ce_loss(logits, ids, net.config.mask_ae, generator)


def match_ids(logp: Tensor, ids: Tensor) -> Tensor:
    """Rename each image's segments to the ids a decoded estimate draws them with (section charter, matched ids).

    logp: (B, 2^K, h', w') log-probabilities of the ids, the mask decoder's on an x0 estimate; ids: (B, H, W)
    int64 in 0..2^K-1 (0 = void), H and W multiples of h' and w'. Returns (B, H, W) int64: each image's ids
    renamed injectively, void kept. Largest segments choose first, each the free id of least cross-entropy
    over its cells; a segment the h' x w' grid does not see keeps its own id if it is still free.
    """
    B, n = logp.shape[:2]
    rows = torch.arange(B, device=ids.device)
    sy, sx = ids.shape[1] // logp.shape[2], ids.shape[2] // logp.shape[3]
    cells = F.one_hot(ids[:, ::sy, ::sx], n).permute(0, 3, 1, 2).flatten(2).to(logp.dtype)  # (B, n, h' w'): segment j's
    cost = -torch.einsum("bjc,bkc->bjk", cells, logp.flatten(2))          # (B, n, n): CE of segment j drawn as id k
    unseen = cells.sum(-1) == 0                                           # (B, n)
    own = 1.0 - torch.eye(n, dtype=cost.dtype, device=cost.device)       # 0 for its own id, 1 for any other
    cost = torch.where(unseen.unsqueeze(-1), own.expand_as(cost), cost)
    ones = torch.ones(1, device=ids.device).expand(B, ids[0].numel())
    area = torch.zeros(B, n, device=ids.device).scatter_add_(1, ids.flatten(1), ones)  # (B, n): pixels of each id
    area[:, 0] = 0                                                        # void is never renamed
    order = area.argsort(1, descending=True)                              # (B, n): largest segment first
    table = torch.zeros(B, n, dtype=torch.long, device=ids.device)        # table[b, j]: the new id of id j
    free = torch.ones(B, n, dtype=torch.bool, device=ids.device)
    free[:, 0] = False                                                    # no segment becomes void
    for rank in range(n - 1):
        j = order[:, rank]                                                # (B,): each image's next segment
        live = area[rows, j] > 0
        if not live.any():
            break
        k = cost[rows, j].masked_fill(~free, float("inf")).argmin(1)      # (B,): its cheapest free id
        table[rows[live], j[live]] = k[live]
        free[rows[live], k[live]] = False
    return torch.gather(table, 1, ids.flatten(1)).view_as(ids)


@torch.no_grad()
def matched_ids(net: LDMSeg, x0_pred: Tensor, ids: Tensor) -> Tensor:
    """The ids z_0 encodes (B, H, W) renamed to those the frozen mask decoder draws from x0_pred (B, 4, h, w)."""
    with _fp32(x0_pred):                                  # the frozen decoder and the costs in fp32 (encode_ids)
        logp = net.mask_ae.decode(x0_pred.float() / net.latent_scale).log_softmax(1)  # (B, 2^K, H/2, W/2)
        return match_ids(logp, ids)


def ldmseg_loss(model: nn.Module, config: LDMSegConfig, schedule, z0: Tensor, z_image: Tensor, valid: Tensor,
                generator: torch.Generator | None = None, task: Tensor | None = None,
                ids: Tensor | None = None, net: LDMSeg | None = None) -> dict[str, Tensor]:
    """The stage-2 objective [LDMSeg brief §3.3]: mean( w(t) * valid * (eps_pred - eps)^2 ), or for
    config.prediction == 'x0' mean( w_task * valid * (x0_pred - z0)^2 ) (section charter; w_task = 1 but for a
    multi-task model whose tasks have their own signal scales: x0_loss_weights). Either way a multi-task
    model's samples are further weighted by config.task_loss_weights (task_loss_weights; default 1).

    model: the (possibly compiled / DDP-wrapped) LDMSeg; z0, z_image: (B, 4, h, w); valid (B, 1, h, w), the
    void mask (void_mask_latent) or the area weights (area_weighted_mask);
    task: (B,) int64 for a multi-task model (each sample's task, section 10), else None.
    With config.decoded_ce_weight > 0 the decoded cross-entropy (decoded_ce_loss) is added, which needs
    ids (B, H, W) int64, the remapped ids z0 encodes, and net, the bare LDMSeg (its frozen mask decoder).
    QUIRK: the mean runs over all elements, masked ones included, as the official code (not over the
    valid count) -- images with much void contribute less [LDMSeg brief §8.10].
    """
    B, device = z0.shape[0], z0.device
    t = _randint(config.num_train_steps, (B,), generator, device)
    eps = _randn(z0.shape, generator, z0.float())
    z_t = schedule.q_sample(z0, t, eps)                                  # [DDPM Eq. 4]
    x0_self = None
    if config.self_condition:
        use = _rand((B,), generator, device) < config.self_condition_prob
        x0_self = self_condition_input(model, z_t, t, z_image, use, schedule, task, config.prediction)
    pred = denoise(model, z_t, t, z_image, x0_self, task).float()
    if config.match_ids:
        if ids is None or net is None:
            raise ValueError("LDMSegConfig.match_ids needs ldmseg_loss's ids and net")
        renamed_ids = matched_ids(net, pred.detach(), ids)               # the noise was drawn from z0's ids ...
        renamed = (renamed_ids != ids).flatten(1).any(1)                 # (B,)
        if renamed.any():                                                # ... the target takes the estimate's
            z0 = z0.clone()
            z0[renamed] = net.encode_ids(renamed_ids[renamed]).to(z0.dtype)
        ids = renamed_ids
    if config.prediction == "x0":
        w, target = x0_loss_weights(config, task, B).to(device), z0        # x0 regression, unweighted across t  [Analog Bits Alg. 1]
    else:
        w, target = min_snr_weight(schedule.snr(t), config.min_snr_gamma), eps  # (B,)  [PAPER]
    w = w * task_loss_weights(config, task, B).to(device)                  # (B,) ones but for a weighted task
    se = (pred - target).pow(2) * valid                                  # (B, 4, h, w)
    loss = (w.view(B, 1, 1, 1) * se).mean()
    if not config.decoded_ce_weight:
        return {"loss": loss, "mse": se.mean()}
    if config.prediction != "x0" or ids is None or net is None:
        raise ValueError("LDMSegConfig.decoded_ce_weight > 0 needs prediction='x0' (section 8) and ldmseg_loss's "
                         "ids and net")
    ce = decoded_ce_loss(net, pred, ids, generator)                       # pred is x0_pred here
    return {"loss": loss + config.decoded_ce_weight * ce, "mse": se.mean(), "dce": ce}


# -----------------------------------------------------------------------------
# 9. Decoding: logits -> panoptic segments           [LDMSeg brief §4.5]
# -----------------------------------------------------------------------------
# No detector, no matching, no NMS: the id with the largest logit wins each pixel, and three
# thresholds remove what is not a confident segment (LDMSeg's evaluation values):
#   (a) confidence: softmax max < mask_th -> void;
#   (b) area: a segment smaller than count_th pixels -> void. count_th is given for LDMSeg's 512 x 512
#       working size and applied at the decoded size, the image's own in evaluation (512 px on a
#       480 x 640 COCO image, as the official code does). DEVIATION: for a model trained at another
#       size it is scaled by that size's area (32 px for 128^2 Shapes), where 512 px would remove
#       most segments;
#   (c) overlap: |argmax region of k| / |{sigmoid(logit_k) >= mask_th}| < overlap_th -> void
#       (a segment that won its pixels only narrowly against many competitors).
# Channel 0 (void) never forms a segment.


def panoptic_from_logits(logits: Tensor, mask_th: float = 0.5, count_th: float = 512.0,
                         overlap_th: float = 0.5, work_size: tuple[int, int] | None = None) -> Tensor:
    """logits (B, 2^K, H, W) -> ids (B, H, W) int64, 0 = void, other values = the winning channels.

    work_size: the size the model works at (its latent times the mask AE's factor), which scales
    count_th from 512^2 (b); default (H, W).
    """
    B, C, H, W = logits.shape
    logits = logits.float()
    conf, pred = logits.softmax(dim=1).max(dim=1)                         # (B, H, W) each
    pred = torch.where(conf < mask_th, 0, pred)                          # (a)
    area = torch.zeros(B, C, device=logits.device).scatter_add_(
        1, pred.flatten(1), torch.ones(B, H * W, device=logits.device))  # (B, C) pixels won per id
    soft = (logits.sigmoid() >= mask_th).flatten(2).sum(-1).float()      # (B, C)
    work_h, work_w = work_size or (H, W)
    min_area = count_th * work_h * work_w / 512 ** 2
    keep = (area >= min_area) & ~(area.double() / soft.double() < overlap_th)  # (b), (c); as the official
    # float64 test: a product in float32 rounds ties (15 / 25 against 0.6) the other way; soft = 0 keeps
    keep[:, 0] = False
    return torch.where(keep.gather(1, pred.flatten(1)).view(B, H, W), pred, 0)


def sample_latent(model: LDMSeg, z_image: Tensor, *, sampler: str = "ddim", steps: int = 50,
                  generator: torch.Generator | None = None, known=None, callback=None,
                  task: Tensor | None = None, clamp: bool | None = None, x0_fn=None) -> Tensor:
    """Denoise a panoptic latent for each image latent: z_image (B, 4, h, w) -> z_0 (B, 4, h, w).

    The denoiser passed to the sampler closes over the self-conditioning state: the first call gets
    zeros, every later call the x0 estimate of the call before [LDMSeg brief §4.3].
    PAPER: DDIM, eta 0, 50 steps on t = 999, 979, ..., 19 ('trailing' spacing), the last step
    returning x0_pred. `sampler` in {'ddim', 'dpm++', 'ddpm'}; initial noise from `generator`.
    task: (B,) int64 for a multi-task model -- which task's latent each row denoises (section 10).
    clamp: clamp each x0 estimate to a map (section 8); None = as model.config.clamp_x0 says. In a
    multi-task model only the instance task's rows are clamped (section 10).
    x0_fn: x0 (B, 4, h, w) -> x0, applied to every x0 estimate after the clamp (inpainting's fit to the
    given pixels, section 11); the sampler then steps from the changed estimate.
    """
    state: dict[str, Tensor | None] = {"x0": None}

    prediction, shift = model.config.prediction, model.config.time_shift
    last = model.schedule.num_steps - 1
    clamp = model.config.clamp_x0 if clamp is None else clamp
    as_x0 = bool(shift) or clamp or x0_fn is not None                   # the sampler is handed x0, not the raw output

    def unet(z_t: Tensor, t: Tensor) -> Tensor:
        t_model = (t + shift).clamp(max=last) if shift else t           # section 8: told a later t
        out = denoise(model, z_t, t_model, z_image, state["x0"], task).float()
        state["x0"] = predict_x0(out, prediction, z_t, t_model, model.schedule)
        if clamp:
            x0 = state["x0"] if known is None else torch.where(known.mask.bool(), known.z0_known, state["x0"])
            state["x0"] = clamp_rows(model, x0, task)                    # section 8: the latent of the map it decodes to
        if x0_fn is not None:
            state["x0"] = x0_fn(state["x0"])                              # section 11: fitted to given pixels
        return state["x0"] if as_x0 else out                             # read at t_model, not at t

    z_T = _randn(z_image.shape, generator, z_image.float())                # float32 whatever the image latent
    kw = dict(steps=steps, generator=generator, known=known, callback=callback,
              prediction="x0" if as_x0 else prediction)
    if sampler == "ddim":
        return ddim_sample(unet, z_T, model.schedule, spacing="trailing", set_alpha_to_one=True, **kw)
    if sampler == "dpm++":
        return dpm_solver_pp_sample(unet, z_T, model.schedule, order=2, **kw)
    if sampler == "ddpm":
        return ddpm_sample(unet, z_T, model.schedule, **kw)
    raise ValueError(f"unknown sampler {sampler!r}: choose ddim, dpm++ or ddpm")


@torch.no_grad()
def segment(model: LDMSeg, image: Tensor, *, sampler: str = "ddim", steps: int = 50,
            generator: torch.Generator | None = None, known=None, callback=None,
            size: tuple[int, int] | None = None) -> Tensor:
    """Panoptic segmentation of images: (B, 3, H, W) in [-1, 1] -> ids (B, H, W) int64, 0 = void.

    size: decode the logits at this size instead of (H, W) -- LDMSeg evaluates at each image's
    original size, resizing logits bilinearly before the argmax [LDMSeg brief §4.4].
    """
    z0 = sample_latent(model, model.encode_image(image), sampler=sampler, steps=steps,
                       generator=generator, known=known, callback=callback)
    return decode_panoptic(model, z0, size or tuple(image.shape[-2:]))


def decode_panoptic(model: LDMSeg, z0: Tensor, size: tuple[int, int]) -> Tensor:
    """Panoptic latent z_0 (B, 4, h, w) -> ids (B, *size) int64 through the mask AE and thresholds."""
    c, f = model.config, model.mask_ae.downsample_factor
    work = (z0.shape[-2] * f, z0.shape[-1] * f)                          # 512^2 for the paper's COCO model
    return panoptic_from_logits(model.decode_latent(z0, size), c.mask_th, c.count_th, c.overlap_th, work)


def clamp_to_map(model: LDMSeg, x0: Tensor) -> Tensor:
    """x0 estimate (B, 4, h, w) -> the latent of the panoptic map it decodes to (B, 4, h, w) (section 8).

    Decoded at the model's own size (h, w times the mask AE's factor) with LDMSeg's thresholds, so the
    map is the one sampling would output if it stopped here; its void pixels encode as void.
    """
    ids = decode_panoptic(model, x0, tuple(model.mask_ae.downsample_factor * n for n in x0.shape[-2:]))
    return model.encode_ids(ids).to(x0.dtype)


def clamp_rows(model: LDMSeg, x0: Tensor, task: Tensor | None) -> Tensor:
    """clamp_to_map on every row of x0 (B, 4, h, w), or, with a multi-task model's task (B,), on the
    instance task's rows only; the semantic and depth rows pass unchanged (section 10)."""
    if task is None or not model.config.tasks:
        return clamp_to_map(model, x0)
    rows = task == task_index(model.config, "instance")                 # (B,) bool
    if not rows.any():
        return x0
    out = x0.clone()
    out[rows] = clamp_to_map(model, x0[rows])
    return out


def load_ldmseg(ckpt: dict, use_ema: bool = True, time_shift: int | None = None,
                depth_guide_sigma: float | None = None, clamp_x0: bool | None = None) -> LDMSeg:
    """Rebuild the stage-2 model from a checkpoint dict (train.load_checkpoint): config + weights.

    time_shift: sample with this shift instead of the checkpoint's (section 8); checkpoints written
    before the setting existed sample with 0, as they were measured.
    depth_guide_sigma: decode depth with this colour sigma instead of the checkpoint's (section 10;
    0 = nearest upsampling, the decoder before guided upsampling existed).
    clamp_x0: sample with (True) or without (False) clamping instead of as the checkpoint says (section 8);
    checkpoints written before the setting existed sample without it, as they were measured.
    """
    config = LDMSegConfig(**ckpt["model_config"])
    if time_shift is not None:
        config = dataclasses.replace(config, time_shift=time_shift)   # validated by __post_init__
    if depth_guide_sigma is not None:
        config = dataclasses.replace(config, depth_guide_sigma=depth_guide_sigma)
    if clamp_x0 is not None:
        config = dataclasses.replace(config, clamp_x0=clamp_x0)           # validated by __post_init__
    model = LDMSeg(config)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()


# -----------------------------------------------------------------------------
# 10. Multi-task LDMSeg: task latents, task sampling, merge    [LDMSeg §6, Fig. 1 right; brief §6]
# -----------------------------------------------------------------------------
# LDMSeg's last claim: one model, several dense tasks, told apart only by a learnable task embedding
# (section 8's `tasks`; brief §6, second-hand: instance segmentation, semantic segmentation and depth,
# with class-aware panoptic from the instance and semantic outputs). None of it was released (brief
# §6, issue #3), so everything below that is not the embedding itself is our choice:
#
#   task      its latent z_0 (B, 4, h, w)                        decoded by
#   instance  stage 2's: random ids in 1..2^K-1 -> bits -> mask   the mask AE + LDMSeg's thresholds
#             AE mean x b s_t
#   semantic  the category-id map itself (no remap: the id is     argmax of the mask AE's 2^K logits
#             the meaning) -> bits -> the same frozen mask AE     (no thresholds: every pixel has a class)
#   depth     log depth in [-1, 1]: the median of each cell,      channel mean -> x f guided by the
#             repeated on the 4 channels, x b                      image (or nearest) -> exp
#                                                                  (s = 2: pixel shuffle first, x f/2)
#
# Semantic: the mask AE was trained on arbitrary ids, so it encodes any map with ids <= 2^K - 1 --
# Shapes' 9 categories fit its 4 bits; COCO's ids reach 200 and need an 8-bit AE (the 7-bit coco AE
# holds 127, so the multi-task stage refuses it).
# Depth enters directly, not through an autoencoder of its own: the encoding needs no training. Each
# latent cell holds the median log depth of its pixels on all 4 channels, decoded by the channel mean
# and upsampling (below) (depth_subcells = 1, the default); or (depth_subcells = 2) the medians of its
# 2 x 2 sub-cells, one per channel (pixel_unshuffle), exact at half a cell. Round trips on 1,000 Shapes
# train depth maps, delta < 1.25 / AbsRel: one mean per cell decoded bilinearly, our first encoding,
# 0.83 / 0.17, below the 0.9 a model should reach; one median per cell, nearest, 0.96 / 0.30; 2 x 2
# sub-cell medians, nearest, 0.98 / 0.13. The failures are at depth edges -- a thing 3 m away in front
# of the 60 m sky -- where any blend of the two depths is wrong for both; a median keeps the majority
# side's depth. The default is the coarser one because a model trained for minutes is noisy: the 4
# copies are denoised with independent noises and averaged at decoding, while 4 sub-cells pass each
# channel's error straight to the pixels (on Shapes, delta < 1.25 of the `shapes` multi-task model:
# README).
# Upsampling: a cell's median is its majority side's depth, so nearest upsampling paints the minority
# side of every edge cell -- a thing's rim -- with the depth behind it. The decoder instead upsamples
# guided by the image (guided_upsample: joint bilateral upsampling, Kopf et al. 2007): each pixel takes
# the neighbouring cells of its own colour. Round trip on Shapes val, delta < 1.25 / AbsRel: 0.996 /
# 0.024 against nearest's 0.961 / 0.266 (benchmarks/depth_round_trip.py); the colour sigma
# (depth_guide_sigma = 0.1) was chosen on train images, for the round trip and for two trained models'
# predictions alike (README). It needs no training and changes no latent, so it applies to models
# trained before it; the guide is the image the model reads, so the decoder is told nothing a depth
# estimator would not have.
# Log depth because AbsRel and delta < 1.25 are relative errors: a fixed error in log depth
# is a fixed relative error, whereas a linear scale would spend the range on the far sky and leave
# things at 1-3 m a few hundredths apart.
#
# A signal scale per task: task_signal_scales holds semantic's and depth's own b; instance (stage 2's
# latent) and any task not listed take signal_scale. The Shapes multi-task preset scales the instance
# latent down (b = 0.1, stage 2's preset when it was measured; section 8) so that the image, not a still
# legible noisy latent, decides where each segment lies and which of the random ids it takes.
# Semantic and depth latents have no random ids to choose:
# each is a function of the image, to be read from it precisely (delta < 1.25 allows +-0.11 of the
# [-1, 1] depth units, +-0.011 after b = 0.1). DEVIATION (shapes): depth at b = 1, drawn for 2/3 of
# the samples with its loss weighted 2.5; instance and semantic at 0.1 (multitask_config, with the measurements).
#
# Task sampling: every training sample gets a task drawn from config.tasks by the step's generator
# (independent per sample), so each batch mixes tasks. Uniformly by default: each task has 1/3 of the
# samples in expectation. config.task_sample_weights draws task k with probability w_k / sum(w) instead
# (tasks not listed: w = 1), e.g. depth=2 gives depth half of the samples; the shapes preset gives depth
# two thirds (depth=4; multitask_config). The loss is stage 2's with equal weights by default (the
# paper's balancing is unknown; task_loss_weights sets others), each task's x0 error counted in the
# maps' units where its b differs (x0_loss_weights).
# Cells whose target is void (no id, no category, no depth) are masked out as in stage 2.
#
# Class-aware panoptic (merge_panoptic): each instance segment takes the majority category of the
# semantic prediction over its pixels; thing segments stay separate, all segments of one stuff
# category become one segment; instance void stays void.
#
# Clamping x0 to a map (section 8), when config.clamp_x0 is set, acts on the instance task's rows only
# (clamp_rows): semantic and depth pass unchanged. On the 9,000-step `shapes` multi-task model (b = 0.1,
# not trained for it), 100 *train* images, DDIM 20: instance PQ 11.7 -> 17.5, class-aware PQ 23.2 ->
# 22.6 (its things score ~0 either way). Clamping the semantic rows too, to their argmax category map,
# gave mIoU 43.7 against 44.0, for half as much sampling time again, so it is not offered. On the 200
# val images (DDIM 50) the preset's two models score instance PQ 19.1 / 22.3 clamped against 16.4 / 16.5,
# class-aware PQ 23.0 / 25.8 against 24.9 / 25.8 (README, Multi-task); the preset samples without it.
#
# (This section follows section 9 because it samples and decodes with section 9's functions.)

TASKS = ("instance", "semantic", "depth")
OWN_SCALE_TASKS = ("semantic", "depth")        # tasks that may have a signal scale of their own (task_signal_scales)
TASK_CONTEXT_DIM = {"coco": 768, "shapes": 64, "tiny": 16}   # PAPER: "786" (brief §6), SD-1.x's 768


def multitask_config(name: str) -> LDMSegConfig:
    """The preset's LDMSegConfig with all three tasks and cross-attention to their embeddings."""
    base = LDMSegConfig.preset(name)
    unet = dataclasses.replace(base.unet, context_dim=TASK_CONTEXT_DIM[name])
    if name == "shapes":                        # the levels every figure below was measured with
        unet = dataclasses.replace(unet, attention_levels=(False, True, True))
    # DEVIATION (shapes only): stage 2's recipe as it was measured here (x0, b = 0.1, time shift 300; section 8;
    # stage 2 has since moved to b = 1, which was not tried for the three tasks). Measured with the former
    # quick start's autoencoders, 4,500 x 16, 200 val images, DDIM 50: class-aware PQ 29.9 (Stuff 67.2),
    # instance PQ 20.2, mIoU 38.8, depth delta<1.25 0.705, against 22.7, 8.0, 28.6, 0.487 for the paper's eps
    # at b = 0.3 (no shift), the preset before (README: on the present ones 27.3, 15.7, 40.7, 0.730). The
    # shift is all but neutral for this model: on 100 *train* images (DDIM 20) shifts 0 / 100 / 200 / 300 /
    # 400 give class-aware PQ 30.1 / 30.0 / 29.9 / 30.2 / 29.9 and delta<1.25 0.694 / 0.703 / 0.706 / 0.706 /
    # 0.705; 300 stays, as for stage 2.
    # DEVIATION (shapes only): the depth latent at b = 1, instance and semantic at 0.1 (section charter).
    # Single-task models, 1,500 x 16, on 100 *train* images (DDIM 20): depth delta<1.25 0.580 / 0.778 / 0.823 /
    # 0.804 at b = 0.1 / 0.3 / 1 / 2; semantic mIoU 39.6 / 46.0 at b = 0.1 / 1. In the three-task model a task
    # at b = 1 took the maps down until its x0 loss was put in the maps' units (x0_loss_weights; README).
    # Depth's loss weighted 10 on top (task_loss_weights), a tenth of b = 1's own weight, under uniform
    # sampling (the preset before the one below). Three-task models, 4,500 x 16, on 100 *train* images
    # (DDIM 20), class-aware PQ / instance PQ / mIoU / delta<1.25 (nearest upsampling): depth weight 1: 28.8 /
    # 14.4 / 40.5 / 0.752; 10: 28.0 / 12.8 / 40.4 / 0.839; 30: 20.8 / 10.9 / 39.0 / 0.848; semantic at b = 1
    # too (weight 1): 25.4 / 15.3 / 40.4 / 0.662, so semantic keeps 0.1.
    # DEVIATION (shapes only): depth drawn for 2/3 of the samples (task_sample_weights depth = 4, against 1 for
    # instance and semantic) over twice the steps (train.py: 9,000), its loss weight cut to 2.5 so that its share
    # of the loss stays as above (2/3 x 2.5 : 1/3 = 1/3 x 10 : 2/3): instance and semantic keep the 1,500 x 16
    # samples each they had, depth gets four times its own. Three-task models, 9,000 x 16, one run each, 100
    # *train* images (DDIM 20) / 200 val (DDIM 50), class-aware PQ / instance PQ / mIoU / delta<1.25 (guided):
    # uniform sampling, weight 10: 17.8 / 7.0 / 42.2 / 0.891 and 18.1 / 9.9 / 42.2 / 0.889 on val; depth on half of
    # the samples, weight 5: 24.2 / 11.2 / 42.6 / 0.899 and 25.0 / 14.0 / 42.2 / 0.895; on two thirds, weight 2.5:
    # 27.1 / 13.0 / 42.2 / 0.907 and 25.1 / 15.3 / 42.3 / 0.905; a second run of it (two threads, fresh clone)
    # 23.7 / 12.4 / 41.9 / 0.903 on val (the 4,500-step preset before: 28.0 / 12.8 / 40.4 / 0.873 and 28.3 /
    # 15.5 / 40.7 / 0.868; README).
    extra = {"shapes": dict(signal_scale=0.1, task_signal_scales={"depth": 1.0}, task_loss_weights={"depth": 2.5},
                            task_sample_weights={"depth": 4.0})}.get(name, {})
    return dataclasses.replace(base, unet=unet, tasks=TASKS, clamp_x0=False, area_weight_power=0.0, match_ids=False,
                               **extra)


def task_index(config: LDMSegConfig, name: str) -> int:
    """Position of task `name` in config.tasks (its embedding rows), with a clear error if absent."""
    if name not in config.tasks:
        raise ValueError(f"this model was trained on tasks {config.tasks}, not {name!r}")
    return config.tasks.index(name)


def sample_tasks(batch_size: int, config: LDMSegConfig, generator: torch.Generator | None = None) -> Tensor:
    """The task-sampling rule: (B,) int64, each sample's task drawn independently over config.tasks,
    uniformly, or in proportion to config.task_sample_weights (a task not listed: 1)."""
    w = torch.tensor([config.task_sample_weights.get(name, 1.0) for name in config.tasks])   # (T,)
    if torch.all(w == w[0]):                        # uniform (one task, or no weights for these tasks)
        return torch.randint(0, len(config.tasks), (batch_size,), generator=generator)
    return torch.multinomial(w, batch_size, replacement=True, generator=generator)


def task_signal_scale(config: LDMSegConfig, name: str) -> float:
    """b of task `name`: its entry in config.task_signal_scales, else the shared signal_scale."""
    return config.task_signal_scales.get(name, config.signal_scale)


def x0_loss_weights(config: LDMSegConfig, task: Tensor | None, batch_size: int) -> Tensor:
    """(B,) weights (b / b_task)^2 of the x0 loss: each task's error measured in the maps' units.

    An x0 error scales with its task's b, so a task at b = 1 beside maps at 0.1 would weigh 100 times
    as much in the loss and take the shared UNet's updates for itself (README, multi-task: the maps'
    scores collapsed). All ones for stage 2 (task None) or when no task has its own b; a single-task
    model at its own b gets one constant, which AdamW all but ignores below the gradient clip. (An eps
    loss needs none: eps is unit-variance.)
    """
    if task is None or not config.task_signal_scales:
        return torch.ones(batch_size)
    b = torch.tensor([task_signal_scale(config, name) for name in config.tasks])         # (T,)
    return (config.signal_scale / b[task.cpu()]) ** 2


def task_loss_weights(config: LDMSegConfig, task: Tensor | None, batch_size: int) -> Tensor:
    """(B,) each sample's weight from config.task_loss_weights (1 for a task not listed).

    A multiplier on top of x0_loss_weights: equal weights (all ones) are the default; the README's
    multi-task table shows what weighting depth up does. The weights balance tasks against each other,
    so stage 2 (task None) and a single-task model (`--tasks depth`) get all ones whatever the preset says.
    """
    if task is None or len(config.tasks) < 2 or not config.task_loss_weights:
        return torch.ones(batch_size)
    w = torch.tensor([config.task_loss_weights.get(name, 1.0) for name in config.tasks])  # (T,)
    return w[task.cpu()]


def _rescale(model: LDMSeg, name: str) -> float:
    """Task b over the shared b: what turns a latent of encode_ids (at the shared b) into one at the task's."""
    return task_signal_scale(model.config, name) / model.config.signal_scale


def depth_to_unit(depth: Tensor, depth_range: tuple[float, float]) -> Tensor:
    """Depth (any shape, metres) -> log depth mapped linearly onto [-1, 1]; clamped to depth_range."""
    lo, hi = math.log(depth_range[0]), math.log(depth_range[1])
    return 2.0 * (depth.clamp(*depth_range).log() - lo) / (hi - lo) - 1.0


def unit_to_depth(u: Tensor, depth_range: tuple[float, float]) -> Tensor:
    """The inverse of depth_to_unit: [-1, 1] (clamped) -> metres."""
    lo, hi = math.log(depth_range[0]), math.log(depth_range[1])
    return torch.exp(lo + (u.clamp(-1.0, 1.0) + 1.0) / 2.0 * (hi - lo))


def encode_depth(depth: Tensor, factor: int, depth_range: tuple[float, float], channels: int,
                 subcells: int = 1) -> tuple[Tensor, Tensor]:
    """depth (B, H, W) metres, 0 = unknown -> latent (B, C, H/f, W/f) in [-1, 1] and valid (B, 1, H/f, W/f).

    Each latent cell (f x f pixels) is split into s x s sub-cells (s = subcells); each sub-cell's value
    is the median log depth of its known pixels, laid out on s^2 channels (row-major, as pixel_unshuffle)
    and repeated C / s^2 times. A sub-cell with no known pixel takes its cell's median; a cell with none
    is 0 and invalid (masked like void). Median (torch's: the lower middle value): a (sub-)cell
    straddling a depth edge keeps the depth of its majority side instead of a blend of both.
    """
    s = subcells
    if s < 1 or channels % (s * s) or factor % s:
        raise ValueError(f"depth sub-cells: {s} x {s} must divide the {channels} latent channels and the {factor} px cell")
    B, H, W = depth.shape
    u = depth_to_unit(depth, depth_range).masked_fill(depth <= 0, float("nan"))   # unknown -> NaN

    def medians(side: int) -> Tensor:                                     # (B, H/side, W/side), NaN if none known
        blocks = u.reshape(B, H // side, side, W // side, side).permute(0, 1, 3, 2, 4)
        return blocks.flatten(-2).nanmedian(-1).values

    cell = medians(factor)                                                # (B, h, w)
    sub = cell if s == 1 else medians(factor // s)                        # (B, s h, s w)
    sub = torch.where(sub.isnan(), cell.repeat_interleave(s, 1).repeat_interleave(s, 2), sub).nan_to_num(0.0)
    z = F.pixel_unshuffle(sub[:, None], s)                                # (B, 1, s h, s w) -> (B, s^2, h, w)
    z = z.repeat(1, channels // (s * s), 1, 1)                            # (B, C, h, w)
    return z.contiguous(), (~cell.isnan()).float()[:, None]              # (B, C, h, w), (B, 1, h, w)


def decode_depth(z: Tensor, depth_range: tuple[float, float], size: tuple[int, int], subcells: int = 1,
                 guide: Tensor | None = None, sigma_color: float = 0.1) -> Tensor:
    """Latent (B, C, h, w) in [-1, 1] -> depth (B, *size) metres: the C / s^2 copies averaged, the
    sub-cells put back in place (pixel_shuffle), upsampled, exp.

    guide: the images the latent was read from, (B, 3, H', W') in [-1, 1] with H' and W' whole multiples
    of the sub-cell grid (the model's input size): the log depth is upsampled to H' x W' by
    guided_upsample with sigma_color, then resized nearest to `size`. Without a guide (or with
    sigma_color 0): nearest upsampling.
    """
    B, C, h, w = z.shape
    s = subcells
    u = F.pixel_shuffle(z.float().reshape(B, C // (s * s), s * s, h, w).mean(1), s)   # (B, 1, s h, s w)
    if guide is not None and sigma_color > 0:
        u = guided_upsample(u, guide.float().to(u.device), sigma_color)               # (B, 1, H', W')
    u = F.interpolate(u, size=size, mode="nearest")                                  # (B, 1, H, W)
    return unit_to_depth(u[:, 0], depth_range)


def guided_upsample(u: Tensor, guide: Tensor, sigma_color: float) -> Tensor:
    """Joint bilateral upsampling (Kopf et al., SIGGRAPH 2007) of a coarse map by its image.

    u (B, 1, h, w) -> (B, 1, H, W), guide (B, 3, H, W) with H = c h, W = c w (c pixels per cell).
    Each pixel p averages the 3 x 3 cells around its own, cell q weighted by
        exp(-|p - centre_q|^2 / (2 (c/2)^2)) * exp(-|I_p - I_q|^2 / (2 sigma_color^2)),
    I_p the guide's colour at p and I_q the per-channel median colour of cell q. A depth cell holds
    the median of its pixels (encode_depth), the depth of its majority side at an edge; the median
    colour is that side's colour too. So a pixel on a cell's minority side -- a thing's rim, which
    nearest upsampling paints with the depth behind it -- takes the neighbour cell whose colour it
    shares, and within a region of one colour the neighbours blend smoothly (Shapes' ground recedes
    linearly). Cells outside the map get weight 0. sigma_color: [-1, 1] RGB units; the spatial sigma
    is half a cell, so the blend reaches a pixel's next cells but not those beyond.
    (On Shapes val the round trip encode_depth -> this decoder scores delta < 1.25 0.996 against 0.961
    for nearest; benchmarks/depth_round_trip.py.)
    """
    B, _, h, w = u.shape
    H, W = guide.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"guided_upsample: guide {H} x {W} is not a whole number of {h} x {w} square cells")
    c = H // h
    cell_colour = (guide.reshape(B, 3, h, c, w, c).permute(0, 1, 2, 4, 3, 5)
                   .flatten(-2).median(-1).values)                                    # (B, 3, h, w)
    up = lambda t: t.repeat_interleave(c, -2).repeat_interleave(c, -1)                # cell grid -> pixels
    off_h = torch.arange(H, device=u.device) % c + 0.5 - c / 2                        # pixel - own cell centre,
    off_w = torch.arange(W, device=u.device) % c + 0.5 - c / 2                        # per row and per column
    pad = lambda t: F.pad(t, (1, 1, 1, 1))
    u_p, colour_p, inside = pad(u), pad(cell_colour), pad(torch.ones_like(u))        # (B, *, h + 2, w + 2)
    values, log_w = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):                                                         # the neighbour cell q
            q = lambda t: up(t[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])            # (B, *, H, W)
            d2 = (off_h.view(H, 1) - dy * c) ** 2 + (off_w.view(1, W) - dx * c) ** 2     # (H, W) px^2
            lw = -d2 / (2 * (c / 2) ** 2) - ((guide - q(colour_p)) ** 2).sum(1, keepdim=True) / (2 * sigma_color ** 2)
            log_w.append(lw.masked_fill(q(inside) == 0, float("-inf")))               # (B, 1, H, W)
            values.append(q(u_p))
    # Normalised in the log domain (a softmax over the 9 cells): a pixel unlike every cell around it
    # (exp underflows for all 9) still takes the most similar one instead of 0 / 0.
    weight = torch.softmax(torch.stack(log_w), dim=0)                                # (9, B, 1, H, W)
    return (weight * torch.stack(values)).sum(0)                                     # (B, 1, H, W)


def _instance_latent(model: LDMSeg, targets: dict, generator) -> tuple[Tensor, Tensor]:
    """Stage 2's target: fresh random ids (PAPER, brief §2.1 step 4; or raster ids) -> mask AE latent; void masked."""
    segments = targets["segments"]
    z0 = model.encode_ids(order_ids(segments, model.config.mask_ae.num_bits, model.config.id_order, generator))
    return z0, void_mask_latent(segments, *z0.shape[-2:])


def _semantic_latent(model: LDMSeg, targets: dict, generator) -> tuple[Tensor, Tensor]:
    """Category ids, as they are, through the same mask AE; void masked."""
    category = targets["category"]
    top = 2 ** model.config.mask_ae.num_bits - 1
    if int(category.max()) > top:
        raise ValueError(f"category ids reach {int(category.max())}, but the {model.config.mask_ae.num_bits}-bit "
                         f"mask autoencoder encodes ids up to {top}")
    z0 = model.encode_ids(category) * _rescale(model, "semantic")
    return z0, void_mask_latent(category, *z0.shape[-2:])


def _depth_latent(model: LDMSeg, targets: dict, generator) -> tuple[Tensor, Tensor]:
    """The direct depth encoding times the depth task's signal scale b; cells without known depth masked."""
    if targets.get("depth") is None:
        raise ValueError("the depth task needs depth maps: the dataset has no depth/<split>/ folder")
    c = model.config
    z, valid = encode_depth(targets["depth"], model.mask_ae.downsample_factor, c.depth_range,
                            c.mask_ae.latent_channels, c.depth_subcells)
    return z * task_signal_scale(c, "depth"), valid


def _decode_instance(model: LDMSeg, z0: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
    """Instance latent -> segment ids (B, *size) int64: stage 2's decoding (the image is not read)."""
    return decode_panoptic(model, z0, size)


def _decode_semantic(model: LDMSeg, z0: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
    """Semantic latent (B, 4, h, w) -> category ids (B, *size) int64: argmax of the 2^K logits."""
    return model.decode_latent(z0 / _rescale(model, "semantic"), size).argmax(dim=1)


def _decode_depth(model: LDMSeg, z0: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
    """Depth latent (B, 4, h, w) -> depth (B, *size) float32 metres, upsampled guided by `image` if given."""
    c = model.config
    return decode_depth(z0 / task_signal_scale(c, "depth"), c.depth_range, size, c.depth_subcells,
                        guide=image, sigma_color=c.depth_guide_sigma)


# task -> (its training latent and validity, its decoder): the one place that lists what a task is.
TASK_CODECS: dict[str, tuple[Callable, Callable]] = {
    "instance": (_instance_latent, _decode_instance),
    "semantic": (_semantic_latent, _decode_semantic),
    "depth": (_depth_latent, _decode_depth),
}


def task_latents(model: LDMSeg, task: Tensor, targets: dict, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Each sample's clean latent for its task: task (B,) int64 -> z_0 (B, 4, h, w), valid (B, 1, h, w).

    targets: segments (B, H, W) int64, category (B, H, W) int64, depth (B, H, W) float metres (or absent).
    """
    z0 = valid = None
    for k, name in enumerate(model.config.tasks):
        rows = task == k
        if not rows.any():
            continue
        z, v = TASK_CODECS[name][0](model, {key: x[rows] for key, x in targets.items() if x is not None}, generator)
        if z0 is None:
            z0 = z.new_zeros(task.shape[0], *z.shape[1:])                 # (B, 4, h, w)
            valid = v.new_zeros(task.shape[0], *v.shape[1:])              # (B, 1, h, w)
        z0[rows], valid[rows] = z.to(z0.dtype), v.to(valid.dtype)
    return z0, valid


def multitask_loss(model: nn.Module, net: LDMSeg, z_image: Tensor, targets: dict,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The multi-task objective: draw each sample's task (sample_tasks), build its latent, stage 2's loss.

    model: what to call (possibly compiled / DDP-wrapped); net: the LDMSeg itself (encoders, config).
    z_image (B, 4, h, w); targets as in task_latents, on z_image's device.
    """
    task = sample_tasks(z_image.shape[0], net.config, generator).to(z_image.device)
    z0, valid = task_latents(net, task, targets, generator)
    return ldmseg_loss(model, net.config, net.schedule, z0.float(), z_image, valid, generator, task)


@torch.no_grad()
def sample_tasks_latents(model: LDMSeg, z_image: Tensor, tasks: tuple[str, ...] | None = None, *,
                         sampler: str = "ddim", steps: int = 50,
                         generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """{task: z_0 (B, 4, h, w)} for every image latent (B, 4, h, w), all tasks in one batched sampling run."""
    tasks = tuple(tasks or model.config.tasks)
    B = z_image.shape[0]
    task = torch.tensor([task_index(model.config, n) for n in tasks]).repeat_interleave(B)   # (T B,)
    z0 = sample_latent(model, z_image.repeat(len(tasks), 1, 1, 1), sampler=sampler, steps=steps,
                       generator=generator, task=task.to(z_image.device))                    # (T B, 4, h, w)
    return {name: z0[k * B:(k + 1) * B] for k, name in enumerate(tasks)}


def decode_task(model: LDMSeg, name: str, z0: Tensor, size: tuple[int, int], image: Tensor | None = None) -> Tensor:
    """z_0 (B, 4, h, w) of task `name` -> instance ids / category ids (B, *size) int64, or depth float32.

    image: the model-size images (B, 3, H, W) in [-1, 1] the latents were read from; depth's decoder
    upsamples guided by them (config.depth_guide_sigma), and nearest without them."""
    return TASK_CODECS[name][1](model, z0, size, image)


@torch.no_grad()
def predict_tasks(model: LDMSeg, image: Tensor, tasks: tuple[str, ...] | None = None, *, sampler: str = "ddim",
                  steps: int = 50, generator: torch.Generator | None = None,
                  size: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> {task: decoded output at `size` (default (H, W))}."""
    size = size or tuple(image.shape[-2:])
    z0 = sample_tasks_latents(model, model.encode_image(image), tasks, sampler=sampler, steps=steps,
                              generator=generator)
    return {name: decode_task(model, name, z, size, image) for name, z in z0.items()}


def merge_panoptic(instance: Tensor, semantic: Tensor, categories) -> tuple[Tensor, list[dict]]:
    """Class-aware panoptic map of one image from its instance and semantic predictions.

    instance (H, W) int64 segment ids, 0 = void; semantic (H, W) int64 category ids, 0 = void;
    categories: COCO category dicts with id and isthing. Returns ids (H, W) int64 (1..S, 0 = void) and
    segments_info [{id, category_id, iscrowd 0, isthing}].
      1. Each instance segment takes the majority category of `semantic` over its pixels. Semantic
         void and ids that name no category do not vote; ties go to the smallest id; a segment with
         no vote at all becomes void.
      2. Thing segments stay separate; all segments of one stuff category become one segment.
      3. Instance void stays void, whatever the semantic map says there.
    """
    isthing = {int(c["id"]): int(c.get("isthing", 1)) for c in categories}
    known = torch.tensor(sorted(isthing), dtype=semantic.dtype, device=semantic.device)
    votes_map = torch.where(torch.isin(semantic, known), semantic, 0)       # (H, W), non-categories -> 0
    out, info, stuff_segment = torch.zeros_like(instance), [], {}
    for k in instance.unique().tolist():
        if k == 0:
            continue
        mask = instance == k
        votes = torch.bincount(votes_map[mask], minlength=1)
        votes[0] = 0                                                      # void does not vote
        if int(votes.sum()) == 0:
            continue                                                      # (1) no vote: void
        cat = int(votes.argmax())                                         # first maximum = smallest id
        if not isthing[cat] and cat in stuff_segment:
            out[mask] = stuff_segment[cat]                                # (2) one segment per stuff category
            continue
        out[mask] = len(info) + 1
        info.append({"id": len(info) + 1, "category_id": cat, "iscrowd": 0, "isthing": isthing[cat]})
        if not isthing[cat]:
            stuff_segment[cat] = len(info)
    return out, info


def depth_picture(depth: Tensor, depth_range: tuple[float, float]) -> Tensor:
    """Depth (H, W) metres -> (H, W, 3) uint8 grey on the log scale of the encoding; near is bright."""
    grey = ((1.0 - depth_to_unit(depth.float(), depth_range)) * 127.5).round()
    return grey.to(torch.uint8)[..., None].expand(-1, -1, 3).cpu()


# -----------------------------------------------------------------------------
# 11. Mask inpainting                  [LDMSeg §5 (brief §5, §8.7); RePaint §4.1; ReSample §3.2]
# -----------------------------------------------------------------------------
# Zero-shot: the stage-2 model is used as trained. The known part of the map is encoded into the
# latent (bits -> mask AE mean x s_t) and, before every denoising step, the known latent cells of
# z_t are replaced by q(z_t | z_known) -- the known latent re-noised to the current t -- while the
# unknown cells are denoised as usual (sample.KnownRegion does this inside every sampler). Why
# re-noised rather than clean: the network was trained only on consistently noised inputs; a clean
# patch inside a noisy latent is an input it has never seen (RePaint §4.1, SD's legacy inpainting).
# `clean=True` gives the other reading of the paper ("keep the latents of known regions fixed").
# Because ids are arbitrary, the given ids are first mapped to distinct random codes in 1..2^K-1;
# the known region then anchors which code each given segment keeps, and the output maps codes
# back to the user's ids. New segments get fresh ids that no given segment uses.
# A model trained on raster ids (`id_order="raster"`, data.py section 2) expects each segment's id to
# be its rank in raster order of first pixels; its given segments are numbered 1, 2, ... in that
# order over the given pixels instead. On 40 Shapes val images (a raster model, DDIM 20, sparse masks
# at 0.1 / 0.5 given) random codes scored PQ 15.9 / 55.1 and these 25.4 / 75.2; codes read from the
# model's own segmentation of the image (the id it draws most under each given segment) 24.4 / 70.1.
# A model trained with matched ids (`match_ids`, section 8) draws its own names and does not take them
# from z_t, so random codes are fought over. Its given segments take the names it draws them with: the
# image is segmented first, as plain segmentation does (clamped as the model's config says), and
# `match_ids` renames the given codes to the ids that segmentation draws under them, largest given
# segment first (`codes_drawn_by_model`), for one sampling run more. On 40 Shapes val images (DDIM 20,
# sparse masks; nothing / a tenth / half given, the share of given ids kept) a matched model scored
# 49.7 / 29.2 (95.1 %) / 32.6 (97.4 %) with random codes and 49.7 / 51.3 (98.8 %) / 73.5 (99.2 %) with
# these; the unmatched model of the same recipe 34.6 / 21.6 (96.7 %) / 75.5 (99.3 %). The `shapes` preset
# matches (section 8): its quick start model scores 51.5 / 50.7 (98.9 %) / 77.1 (99.3 %) (README).
#
# What the known latent is encoded from. The mask encoder reads beyond a cell (3x3 convolutions at
# every level), so a known cell's latent also describes its neighbours' pixels. Encoded with void in
# the unknown pixels, a known cell next to unknown ones says "a segment that ends at this cell's
# edge", and its edge pixels decode as void or the wrong id. DEVIATION (LDMSeg does not say what it
# encodes; its inpainting code was never released): the unknown pixels within `fill_width` pixels of
# the known region first take the nearest given id (`fill_unknown_ids`), so the known latent
# describes segments that run on past its edge; farther pixels stay void. The width was chosen on 40
# Shapes train images (the quick start's stage-2 model, DDIM 20, sparse and global masks at 0.3 / 0.5
# / 0.7 given): mean PQ over those six settings 36.2 with no fill, 37.9 / 39.3 / 39.4 / 38.2 / 37.3 /
# 36.3 at 1 / 2 / 3 / 4 / 6 / 8 px, and 36.4 filling everything; the share of given pixels whose id
# the model's own output keeps rose from 94.2 % to 96.5 % at 3 px. A wide fill invents: a few
# given blocks grow into large segments that are not there.
#
# `resample` > 1 adds RePaint's resampling (sample.py section 5), off by default: on the same model
# and 40 train images two takes per step lifted global-mask PQ (0.3 / 0.5 / 0.7 given: 23.4 / 36.7 /
# 57.8 -> 26.3 / 42.2 / 58.5) and left sparse masks as they were, but on 40 val images it moved
# every setting by -2.2 to +1.9 points with no direction (README, mask inpainting), for twice the calls.
#
# Clamping x0 to a map (section 8) is off here whatever the model's config says (`clamp=True` turns
# it on; the given cells then enter the clamp as given, so the map clamped to holds the given
# segments). On the same 40 train images the six settings above averaged 38.3 with it against 39.4
# without, and sparse 0.5 kept 94.9 % of given ids against 95.5 %: a committed guess in the unknown
# cells beside a given segment can take that segment's edge pixels.
#
# Fitting the latent to the given pixels (`guide_steps`, `fit_steps`; DEVIATION, after ReSample's "hard
# data consistency", Song et al. 2024, arXiv 2307.08123, §3.2: there, at chosen steps, the sampler's
# x0 estimate is replaced by argmin_z ||y - A(D(z))||^2, found by gradient descent through the decoder
# from that estimate, and sampling goes on from it). Imposing the known latent is not imposing the
# known pixels: the mask decoder reads 3 x 3 neighbourhoods of cells, so a given segment's edge pixels
# depend on the generated cells next door, and the encoder -> decoder round trip is itself inexact on
# boundaries (on 40 Shapes val images it keeps 98.8 % of non-void pixels' ids). Two fits, both Adam
# steps on the latent (in unit-variance units) through the frozen decoder on the mask AE's own two
# loss terms (section 4), cross-entropy + per-id BCE, towards the given codes on the given pixels, and
# both moving only the known cells and their 8 neighbours (`near_cells`):
#   during sampling, `guide_steps` = 5 at lr 0.15 on every x0 estimate before the sampler steps from it
#     (`sample_latent(x0_fn=...)`): the generated cells beside a given segment are drawn towards it at
#     every noise level, and the later steps smooth over what the fit changed;
#   after sampling, `fit_steps` = 50 at lr 0.05 on the final latent, with a third term (weight 0.1)
#     holding every other pixel to the id the sampled latent decodes to, so the neighbours keep their
#     own segments (without it they break into fragments of other ids).
# The map is still the decoder's output of one latent; nothing is pasted.
# Chosen on 40 *train* images (the quick start's model of then, b = 1 without area weights, DDIM 20; PQ
# and the share of given ids kept; nothing given scores 12.1 and 14.2 on the sparse and global runs' seeds):
#                                                   sparse 0.1    sparse 0.5    global 0.1    global 0.5
#   final fit of the known cells alone (before)     12.1  94.8 %  57.1  98.6 %  12.6  98.3 %  44.2  99.3 %
#   + 5 steps, lr 0.05, on every x0, every cell     13.1  95.7    62.9  98.9    13.2  98.7    45.2  99.4
#     ... only while t >= 500                       12.2  94.9    57.3  98.6    12.2  98.4    44.3  99.3
#     ... only while t < 500                        11.9  95.6    62.3  98.9    13.6  98.7    45.1  99.4
#   + 5 steps, lr 0.05, near cells only             13.3  95.7    63.1  98.9    13.2  98.6    45.9  99.4
#   + 15 steps, lr 0.05, near cells                 16.5  96.7    68.0  99.2    13.4  98.9    46.4  99.5
#   + 5 steps, lr 0.15, near cells (kept)           16.5  96.5    67.2  99.1    13.4  98.9    46.2  99.5
# The last row costs a third of the one above it. Then the final fit, after that guidance: near cells
# with the hold 0.1 (kept) 17.1 / 99.2 % at sparse 0.1 and 67.6 / 99.4 % at 0.5; hold 0.3 17.0 / 99.05 %
# and 65.6 / 99.3 %. After the 15-step guidance: near cells without the hold 13.5 / 99.3 % and 62.7 /
# 99.6 % (global 0.1: 12.7 / 99.6 %); with the hold 0.1, global 0.1 13.9 / 99.6 %, against 13.4 /
# 98.9 % for the known cells alone. Both fits cost about 1.5 s per 128^2 image at 20 steps on two CPU
# threads, most of it the guidance's (README, the val table: 12.0 min against 3.7 with the known-cell
# fit alone and 1.8 with none).
#
# Masks live on the latent grid: the known region is imposed cell by cell, so a mask finer than a
# latent cell (8 px) could not be honoured. PAPER: sparse masks drop independent 16 x 16 px blocks
# at 512^2 (2 x 2 latent cells) with probability p [LDMSeg brief §5]; the block is scaled with the
# resolution and never below one cell (8 px at 128^2). Global masks hide rectangles of up to an
# eighth of the grid each (BEiT-style block-wise masking, as the official mask generator). The
# global-mask figures above were measured with an earlier generator of ours whose rectangles were
# not capped (up to the whole budget at once) and could span the grid; the README's table is the
# present one's.


def sparse_known_mask(h: int, w: int, given: float, block: int = 2,
                      generator: torch.Generator | None = None) -> Tensor:
    """(h, w) float latent-grid mask, 1 = known: independent block x block cells kept with prob `given`."""
    hb, wb = -(-h // block), -(-w // block)
    keep = (torch.rand(hb, wb, generator=generator) < given).float()      # (hb, wb)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]


def global_known_mask(h: int, w: int, given: float, generator: torch.Generator | None = None,
                      max_tries: int = 10) -> Tensor:
    """(h, w) latent-grid mask, 1 = known, whose unknown part is rectangles (BEiT block-wise masking).

    PAPER: the official `random_global` generator (BEiT's) on its 32 x 32 grid: rectangles of target
    area U(4, min(128, budget left)) cells and log-uniform aspect in [0.3, 1/0.3], strictly smaller than
    the grid in each direction, each accepted only when it hides new cells without exceeding the budget
    (up to max_tries per rectangle) [LDMSeg brief §5]. Here both areas are the same shares of any grid
    (4/1024, at least one cell, and 1/8). DEVIATION: where BEiT stops once max_tries rectangles fail,
    the rest of the budget is hidden as single cells, so exactly round((1 - given) h w) cells are unknown.
    """
    hidden = torch.zeros(h, w)
    budget = round((1.0 - given) * h * w)
    min_cells, max_cells = max(1, round(4 * h * w / 1024)), max(1, round(h * w / 8))
    while hidden.sum() < budget:
        left = budget - int(hidden.sum())
        for _ in range(max_tries):
            box = _block_rectangle(h, w, min(min_cells, left), min(max_cells, left), generator)
            if box is None:
                continue
            top, lft, rh, rw = box
            new = 1 - hidden[top:top + rh, lft:lft + rw]
            if 0 < new.sum() <= left:
                hidden[top:top + rh, lft:lft + rw] = 1
                break
        else:
            cells = (hidden == 0).nonzero()                               # no rectangle fits: hide single cells
            pick = cells[torch.randperm(len(cells), generator=generator)[:left]]
            hidden[pick[:, 0], pick[:, 1]] = 1
    return 1 - hidden


def _block_rectangle(h: int, w: int, min_cells: int, max_cells: int,
                     generator: torch.Generator | None) -> tuple[int, int, int, int] | None:
    """One BEiT rectangle on an h x w grid: (top, left, height, width), or None when it is not strictly
    smaller than the grid. Target area U(min_cells, max_cells), aspect log-uniform in [0.3, 1/0.3]."""
    area = float(torch.empty(1).uniform_(min_cells, max(min_cells, max_cells), generator=generator))
    aspect = math.exp(float(torch.empty(1).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)))
    rh, rw = max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))
    if rh >= h or rw >= w:
        return None
    top = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
    lft = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
    return top, lft, rh, rw


def codes_for_given_ids(given_ids: Tensor, num_bits: int, generator: torch.Generator | None = None,
                        order: str = "random") -> dict[int, int]:
    """{user id: code in 1..2^K-1} for the non-zero ids of a partial map (one image, any integers).

    order: the id order the model was trained on -- 'random' draws distinct random codes, 'raster'
    numbers the given segments 1, 2, ... by their first given pixel (the comment above).
    """
    user = [int(i) for i in given_ids.unique().tolist() if i != 0]
    capacity = 2 ** num_bits - 1
    if len(user) > capacity:
        raise ValueError(f"the given map has {len(user)} segments but the model holds {capacity} ids "
                         f"({num_bits} bits); merge or drop the smallest segments first")
    if order == "raster":
        ranks = raster_ids(given_ids[None])[0]                            # (H, W) 1..n in first-pixel order
        return {u: int(ranks[given_ids == u][0]) for u in user}
    codes = (torch.randperm(capacity, generator=generator)[:len(user)] + 1).tolist()
    return dict(zip(user, codes))


def fill_unknown_ids(ids: Tensor, width: int) -> Tensor:
    """(B, H, W) int64, 0 = unknown -> unknown pixels within `width` of a known one take its id.

    Distances are chessboard distances: the known region grows by one pixel a round, `width` rounds
    (a 3 x 3 max over the ids, so on ties the largest id wins). Pixels farther away stay 0; width 0
    returns the map as it is.
    """
    out = ids.clone()
    for _ in range(width):
        hole = out == 0                                                   # (B, H, W)
        if not hole.any() or hole.all():
            break
        grown = F.max_pool2d(out[:, None].float(), 3, stride=1, padding=1)[:, 0].long()  # (B, H, W)
        out = torch.where(hole, grown, out)
    return out


def inpaint_options_error(fill_width: int, resample: int, sampler: str, fit_steps: int = 0,
                          guide_steps: int = 0) -> str:
    """What is wrong with these `inpaint` options, in the command line's words; '' when nothing is."""
    if fill_width < 0:
        return f"--fill-width {fill_width}: a width in pixels, >= 0"
    if fit_steps < 0:
        return f"--fit-steps {fit_steps}: a number of optimiser steps, >= 0 (0 = no fit)"
    if guide_steps < 0:
        return f"--guide-steps {guide_steps}: a number of optimiser steps per denoising step, >= 0 (0 = none)"
    if resample < 1 or (resample > 1 and sampler == "dpm++"):
        return f"--resample {resample}: an integer >= 1, and above 1 only with --sampler ddim or ddpm"
    return ""


def _apply(table: dict[int, int], ids: Tensor) -> Tensor:
    """Map every value of ids through table (values not in it -> 0)."""
    out = torch.zeros_like(ids)
    for a, b in table.items():
        out[ids == a] = b
    return out


@torch.no_grad()
def codes_drawn_by_model(model: LDMSeg, image: Tensor, codes: Tensor, *, sampler: str = "ddim", steps: int = 50,
                         generator: torch.Generator | None = None) -> Tensor:
    """A matched model's given codes (1, H, W), 0 = unknown, renamed to the ids its own segmentation of
    image (1, 3, H, W) draws under them (the comment above this section)."""
    z0 = sample_latent(model, model.encode_image(image), sampler=sampler, steps=steps, generator=generator)
    logp = model.decode_latent(z0, tuple(codes.shape[-2:])).float().log_softmax(1)   # (1, 2^K, H, W)
    return match_ids(logp, codes)


@torch.no_grad()
def inpaint(model: LDMSeg, image: Tensor, given_ids: Tensor, known: Tensor, *, sampler: str = "ddim",
            steps: int = 50, clean: bool = False, fill_width: int = 3, resample: int = 1, clamp: bool = False,
            fit_steps: int = 50, guide_steps: int = 5, generator: torch.Generator | None = None,
            callback=None) -> tuple[Tensor, Tensor]:
    """Complete a partial panoptic map of one image.

    image (1, 3, H, W) in [-1, 1]; given_ids (H, W) int64 user ids (0 = unknown); known (h, w) latent-grid
    mask, 1 = known (use `known_cells_from_pixels` for a pixel mask). Returns (ids (H, W) in the user's
    ids, model_ids (H, W): the model's own decoding before the given pixels are pasted back).
    An empty known region is plain segmentation. fill_width: unknown pixels this close to the known
    region (in pixels) take the nearest given id before the known latent is encoded (0: none; the
    comment above this section). resample: RePaint's u, takes of each step (ddim / ddpm; 1 = none).
    clamp: clamp x0 to a map, the given cells as given (section 8); off whatever the model's config says
    (the comment above this section). guide_steps: Adam steps fitting every denoising step's x0 estimate to
    the given pixels through the decoder; fit_steps: the same for the sampled latent, the other pixels held
    as sampled; both move the known cells and their neighbours (0 = none; the comment above this section).
    """
    K = model.config.mask_ae.num_bits
    table = codes_for_given_ids(given_ids, K, generator, model.config.id_order)
    codes = _apply(table, given_ids)[None].to(image.device)               # (1, H, W) in 1..2^K-1
    if model.config.match_ids and known.any():                            # the names a matched model draws
        drawn = codes_drawn_by_model(model, image, codes, sampler=sampler, steps=steps, generator=generator)
        table = {u: int(drawn[0][given_ids.to(image.device) == u][0]) for u in table}
        codes = drawn
    z_known = model.encode_ids(fill_unknown_ids(codes, fill_width))      # (1, 4, h, w)
    region = (KnownRegion(z_known, known[None, None].to(image.device), clean=clean, resample=resample)
              if known.any() else None)
    near = near_cells(known.to(image.device))                            # (h, w): known cells and their neighbours
    guide = ((lambda x0: fit_latent_to_given(model, x0, codes, guide_steps, lr=0.15, movable=near))
             if guide_steps else None)                                     # applied to every x0 estimate
    z0 = sample_latent(model, model.encode_image(image), sampler=sampler, steps=steps,
                       generator=generator, known=region, callback=callback, clamp=clamp, x0_fn=guide)
    z0 = fit_latent_to_given(model, z0, codes, fit_steps, movable=near, hold=0.1)  # the rest held as sampled
    pred = decode_panoptic(model, z0, tuple(given_ids.shape))[0].cpu()    # (H, W) codes
    model_ids = codes_to_user_ids(pred, table)
    out = model_ids.clone()
    pixel_known = given_ids > 0
    out[pixel_known] = given_ids[pixel_known]                              # the user's ids where given
    return out, model_ids


@torch.enable_grad()
def fit_latent_to_given(model: LDMSeg, z0: Tensor, codes: Tensor, steps: int = 50, lr: float = 0.05,
                        movable: Tensor | None = None, hold: float = 0.0) -> Tensor:
    """Adjust a sampled panoptic latent so that it decodes to the given codes (the comment above).

    z0 (1, 4, h, w) sampled latent; codes (1, H, W) int64, > 0 on given pixels, 0 elsewhere;
    movable (h, w) latent-grid mask of the cells that may change (None: all); hold: weight of a
    cross-entropy holding the other pixels to the ids z0 decodes to (0 = none).
    Returns the fitted latent (1, 4, h, w); steps 0 returns z0 unchanged.
    """
    if steps <= 0 or not (codes > 0).any() or (movable is not None and not movable.any()):
        return z0
    ae, scale, size = model.mask_ae, model.latent_scale, tuple(codes.shape[-2:])
    given = codes > 0                                                     # (1, H, W)
    target = F.one_hot(codes[given], 2 ** ae.config.num_bits).float()      # (N, C) the given pixels' codes
    u = (z0.detach().float() / scale).requires_grad_(True)               # unit-variance units: lr independent of b
    opt = torch.optim.Adam([u], lr=lr)
    if hold:
        with torch.no_grad():
            sampled = ae.decode_full(u, size).argmax(1)                   # (1, H, W) the ids z0 decodes to
    for _ in range(steps):
        full = ae.decode_full(u, size).permute(0, 2, 3, 1)                # (1, C, H, W) -> (1, H, W, C)
        logits = full[given]                                              # (N, C)
        loss = F.cross_entropy(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        if hold:
            loss = loss + hold * F.cross_entropy(full[~given], sampled[~given])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if movable is not None:
            u.grad.mul_(movable.to(u.device))                              # frozen cells: no gradient, no Adam step
        opt.step()
    return (u.detach() * scale).to(z0.dtype)


def near_cells(known: Tensor) -> Tensor:
    """(h, w) latent-grid mask -> the cells it marks and their 8 neighbours (a decoder conv reads 3 x 3 cells)."""
    return F.max_pool2d(known[None, None].float(), 3, stride=1, padding=1)[0, 0]


def codes_to_user_ids(pred: Tensor, table: dict[int, int]) -> Tensor:
    """Decoded codes (H, W) -> the user's ids via `table` {user id: code}; other codes get fresh ids
    above every given id (so a new segment never merges with a given one); 0 stays void. Where that
    would pass the largest id a COCO panoptic PNG holds (256^3 - 1: a given segment painted white),
    the fresh ids are the smallest ones no given segment uses."""
    back = {c: u for u, c in table.items()}
    new_codes = [c for c in pred.unique().tolist() if c and c not in back]
    start = max(list(table) + [0]) + 1
    if start + len(new_codes) <= 256 ** 3:
        fresh = iter(range(start, start + len(new_codes)))
    else:
        fresh = (i for i in range(1, 256 ** 3) if i not in table)
    out = torch.zeros_like(pred)
    for c in pred.unique().tolist():
        if c in back:
            out[pred == c] = back[c]
        elif c:
            out[pred == c] = next(fresh)
    return out


def known_cells_from_pixels(pixel_known: Tensor, factor: int = 8, min_share: float = 1.0) -> Tensor:
    """(H, W) bool pixel mask -> (H/f, W/f) latent-cell mask: a cell is known when >= min_share of it is."""
    share = F.avg_pool2d(pixel_known[None, None].float(), factor)[0, 0]    # (h, w)
    return (share >= min_share - 1e-6).float()


# -----------------------------------------------------------------------------
# 12. Weight loading                     [safetensors format; CompVis LDM; diffusers; LDMSeg brief §3.2]
# -----------------------------------------------------------------------------
# Stable Diffusion's weights are published in three containers and two naming layouts. This section
# reads all of them into the modules above, on torch and the standard library alone.
#
# Containers (load_weights)
#   .safetensors  bytes 0-7: n, the header length, a little-endian uint64; then n bytes of UTF-8 JSON
#                   {name: {"dtype": "F32", "shape": [320, 4, 3, 3], "data_offsets": [begin, end]}, ...,
#                    "__metadata__": {str: str} (optional)}
#                 (padded with spaces); then one byte buffer. Offsets count from the buffer's start;
#                 the tensors tile it exactly, without gaps or overlaps, each row-major and
#                 little-endian. Nothing in the file is executable: the header is validated and the
#                 buffer memory-mapped, so a 4 GB file costs no copy until a tensor is used.
#   .ckpt .pt .pth .bin  torch pickles, read with torch.load(weights_only=True): tensors and plain
#                 containers only, never code. CompVis .ckpt files wrap the weights in
#                 {"state_dict": ...} beside their PyTorch Lightning training state, whose objects
#                 are read as inert stand-ins (_InertStandIn).
#   diffusers folder  <root>/vae/ and <root>/unet/, each with diffusion_pytorch_model.safetensors
#                 (or .bin, or shards listed in a .index.json) beside its config.json.
#
# Layouts
#   image AE  CompVis = ours    encoder.down.0.block.0.norm1.weight    encoder.mid.attn_1.q.weight (1x1 conv)
#             diffusers         encoder.down_blocks.0.resnets.0.norm1  encoder.mid_block.attentions.0.to_q (Linear)
#             QUIRK: CompVis numbers decoder.up.i by resolution level (0 = full size), diffusers
#             numbers decoder.up_blocks.u in the order they run (0 = lowest resolution): u = L-1-i.
#   UNet      diffusers = ours  down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight
#             CompVis           input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight
#             CompVis numbers every block of the down path in one sequence (input_blocks.K, K = 0 is
#             conv_in, a downsampler takes a number of its own), inside it .0 = ResNet, .1 =
#             transformer; the up path likewise (output_blocks.K, .1 or .2 = upsampler).
#   A full Stable Diffusion .ckpt holds the image AE under first_stage_model. and the UNet under
#   model.diffusion_model., beside the text encoder (cond_stage_model.), EMA copies (model_ema.) and
#   schedule buffers: each loader takes its own prefix and ignores the rest.
#
# Renaming is table-driven: a table maps each block prefix of one layout to the other's prefix plus
# the renames of the layers inside that block (ResNet: in_layers.0 -> norm1, ...). The tables are
# generated from the configs -- levels, blocks per level, where attention sits -- so the CompVis
# numbering is derived rather than listed. A load matches the module exactly or fails with one error
# listing every missing, unexpected and mis-shaped tensor; `drop` holds regular expressions for
# unexpected names that may be ignored (CROSS_ATTENTION_KEYS when the module has no cross-attention).


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100_000_000          # the format's own limit; stops a corrupt length from reading GBs

CROSS_ATTENTION_KEYS = (r"\.attn2\.", r"\.transformer_blocks\.\d+\.norm2\.")  # SD's text cross-attention
CHECKPOINT_EXTRAS = (r"^loss\.", r"^model_ema\.")  # a standalone CompVis VAE .ckpt: its GAN loss, EMA copies


def _check_little_endian() -> None:
    """safetensors stores little-endian bytes; tensors here are written and read as raw native memory."""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors I/O here assumes a little-endian machine")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a dict, refusing a name given twice (plain json keeps the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def _naturals(values) -> bool:
    """A JSON list of non-negative integers (JSON booleans excluded)."""
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _check_entry(name: str, entry, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry -> (dtype, shape, begin, end); ValueError naming what is wrong."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{name!r}: an entry needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name!r}: dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
        raise ValueError(f"{name!r}: shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if not begin <= end <= data_size or end - begin != nbytes:
        raise ValueError(f"{name!r}: data_offsets {offsets} do not hold {nbytes} bytes inside the "
                         f"{data_size}-byte buffer")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end


def _parse_safetensors_header(raw: bytes, data_size: int) -> tuple[dict, dict[str, str]]:
    """Header bytes -> ({name: (dtype, shape, begin, end)}, metadata), checking the layout rules above."""
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map strings to strings")
    entries = {name: _check_entry(name, entry, data_size) for name, entry in header.items()}
    position = 0                                                  # the tensors must tile the buffer
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise ValueError(f"{name!r} starts at byte {begin}, expected {position} (a gap or an overlap)")
        position = end
    if position != data_size:
        raise ValueError(f"the tensors cover {position} of the {data_size} buffer bytes")
    return entries, metadata


def _read_safetensors_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(entries, metadata, byte offset of the buffer) of a safetensors file; ValueError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file: header length {n} does not fit a "
                             f"{size}-byte file")
        raw = f.read(n)
    try:
        entries, metadata = _parse_safetensors_header(raw, size - 8 - n)
    except ValueError as e:                                       # includes bad UTF-8 and bad JSON
        raise ValueError(f"{path}: invalid safetensors header: {e}") from None
    return entries, metadata, 8 + n


def load_safetensors(path) -> dict[str, Tensor]:
    """Read a .safetensors file -> {name: tensor} on the CPU, in the file's dtypes.

    The tensors share one copy-on-write memory map of the file: nothing is read until used, and
    writing into a tensor never changes the file.
    """
    _check_little_endian()
    path = Path(path)
    entries, _, start = _read_safetensors_header(path)
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # the tensors keep it alive
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:                                          # frombuffer refuses empty ranges
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=start + begin).view(shape)
        # A hand-made file may start a tensor at an offset its dtype cannot be aligned on; copy those.
        tensors[name] = t if t.data_ptr() % t.element_size() == 0 else t.clone()
    return tensors


def safetensors_metadata(path) -> dict[str, str]:
    """The optional {str: str} "__metadata__" of a .safetensors file ({} if none)."""
    return _read_safetensors_header(Path(path))[1]


def save_safetensors(tensors: dict[str, Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write {name: tensor} (dtypes of SAFETENSORS_DTYPES) as a .safetensors file, atomically.

    Tensors go largest element size first, then by name, so each starts aligned to its element size
    (the header is padded to a multiple of 8); the file appears complete or not at all.
    """
    _check_little_endian()
    by_dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.get("__metadata__", {}).items()):
        raise ValueError("metadata must map strings to strings")
    blobs, offset = [], 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name]
        if not isinstance(name, str) or name == "__metadata__" or t.dtype not in by_dtype:
            raise ValueError(f"cannot store {name!r} ({t.dtype}): names are strings other than "
                             f"__metadata__, dtypes one of {sorted(SAFETENSORS_DTYPES)}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,) raw bytes
        header[name] = {"dtype": by_dtype[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + data.numel()]}
        blobs.append(data)
        offset += data.numel()
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    _atomic_write(Path(path), [len(text).to_bytes(8, "little"), text] + [b.numpy() for b in blobs])


def _atomic_write(path: Path, chunks: list) -> None:
    """Write byte chunks (bytes or uint8 arrays) to a temporary file beside `path`, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(memoryview(chunk))
        umask = os.umask(0)                                              # mkstemp made it owner-only:
        os.umask(umask)                                                  # give it an ordinary file's mode
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _InertStandIn:
    """Stands in for the training-state objects CompVis .ckpt files pickle beside their weights.

    PyTorch Lightning's ModelCheckpoint callback and the numpy scalars in its state are not weights,
    and weights_only=True refuses them. Registered under their names, this class takes any arguments
    and any state and keeps none: unpickling them then runs no code of theirs, and the weights load.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_INERT_GLOBALS = [(_InertStandIn, name) for name in (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "_codecs.encode")]


def _stand_ins():
    """A context registering the stand-ins: torch >= 2.6 accepts them under another name; else nothing."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6):
        return torch.serialization.safe_globals(_INERT_GLOBALS)
    return contextlib.nullcontext()                               # Lightning .ckpt files are then refused


def _load_torch_weights(path: Path) -> dict[str, Tensor]:
    """A torch pickle -> {name: tensor}, never executing code from it; a CompVis state_dict is unwrapped."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):   # 8-byte length, then JSON
        raise ValueError(f"{path}: a safetensors file under another name; rename it to .safetensors")
    try:
        with _stand_ins():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), str(e)[:200])
        reason = reason.split(". ")[0]                            # not torch's advice to allowlist it
        raise ValueError(f"{path}: refused: not a pickle of tensors and plain containers only (torch: "
                         f"{reason}); unpickling anything more can run code from the file. Load files "
                         f"you trust with weights_only=False yourself, or use a .safetensors copy.") from None
    except Exception as e:                                        # truncated zip, text, empty file, ...
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                                   # CompVis / Lightning .ckpt
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a {{name: tensor}} state dict")
    others = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if others:
        raise ValueError(f"{path}: not a flat state dict; these entries are not tensors: {others[:20]}")
    return dict(obj)


_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _diffusers_weight_files(folder: Path, component: str | None) -> list[Path]:
    """The weight file(s) of a diffusers model folder (or of its `component` subfolder)."""
    if component is not None and (folder / component).is_dir():
        folder = folder / component
    for name in _DIFFUSERS_FILES:
        if (folder / name).is_file():
            return [folder / name]
        indexes = (name + ".index.json", name.replace(".fp16", "") + ".index.fp16.json")   # diffusers' fp16 variant
        index = next((folder / n for n in indexes if (folder / n).is_file()), None)
        if index is not None:                                     # a sharded model
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if any(Path(s).name != s for s in shards):
                raise ValueError(f"{index}: shard names must be plain file names")
            return [folder / s for s in shards]
    where = f"{folder}" + (f" (or its {component}/ subfolder)" if component and folder.name != component else "")
    raise FileNotFoundError(f"{where}: no diffusers weights; looked for {', '.join(_DIFFUSERS_FILES)}")


def load_weights(path, component: str | None = None) -> dict[str, Tensor]:
    """Read a weight file or a diffusers folder -> {name: tensor} on the CPU, names as stored.

    path: a .safetensors file, a torch pickle (.ckpt, .pt, .pth, .bin; read with weights_only=True,
    a top-level "state_dict" unwrapped), or a diffusers folder -- a model folder, or a pipeline
    folder with `component` ("vae", "unet") naming the subfolder.
    """
    path = Path(path)
    if path.is_dir():
        state = {}
        for file in _diffusers_weight_files(path, component):
            state.update(load_weights(file))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file or folder")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _load_torch_weights(path)
    raise ValueError(f"{path}: unknown weight format {path.suffix!r}: expected .safetensors, .ckpt, "
                     f".pt, .pth, .bin or a diffusers folder")


# Renaming. A table maps block prefixes: {prefix: (other layout's prefix, {layer: other's layer})}.

def _rename(name: str, table: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """One parameter name through a block table; None when no block prefix of the table matches.

    The longest dotted prefix found in the table wins; inside the block the first one or two name
    components are the layer (in_layers.0, skip_connection), renamed when listed.
    """
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) not in table:
            continue
        new_prefix, layers = table[".".join(parts[:k])]
        rest = parts[k:]
        for m in (2, 1):
            if len(rest) > m and ".".join(rest[:m]) in layers:
                rest = layers[".".join(rest[:m])].split(".") + rest[m:]
                break
        return ".".join([new_prefix] + rest)
    return None


def _rename_all(state: dict[str, Tensor], table) -> dict[str, Tensor]:
    """Rename every tensor through `table`; names it does not know are kept (and later reported)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        new = _rename(name, table) or name
        if new in out:
            raise ValueError(f"two tensors map to {new!r} (one of them {name!r})")
        out[new] = tensor
    return out


def _invert(table: dict[str, tuple[str, dict[str, str]]]) -> dict[str, tuple[str, dict[str, str]]]:
    """The table of the opposite direction."""
    return {new: (old, {b: a for a, b in layers.items()}) for old, (new, layers) in table.items()}


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix`, without it, if any name has it; otherwise `state` unchanged."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def _vae_table(config: ImageAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Image AE: CompVis (our) block prefix -> (diffusers prefix, layer renames)."""
    table = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                      f"{part}.norm_out": (f"{part}.conv_norm_out", {}),
                      f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", _VAE_RESNET),
                      f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
                      f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", _VAE_RESNET)})
    L = len(config.ch_mult)
    for i in range(L):
        u = L - 1 - i                                             # QUIRK: reversed decoder numbering
        table[f"encoder.down.{i}.downsample"] = (f"encoder.down_blocks.{i}.downsamplers.0", {})
        table[f"decoder.up.{i}.upsample"] = (f"decoder.up_blocks.{u}.upsamplers.0", {})
        for j in range(config.num_res_blocks + 1):                # the decoder has one block more
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
            table[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{u}.resnets.{j}", _VAE_RESNET)
    return table


def _is_vae_attention_weight(name: str) -> bool:
    """The q, k, v and output projections of the image AE's mid attention (CompVis names)."""
    return re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", name) is not None


def image_ae_state_from_any(state: dict[str, Tensor], config: ImageAEConfig) -> dict[str, Tensor]:
    """Image AE weights in the CompVis or diffusers layout (optionally under first_stage_model.) -> our names.

    diffusers holds the mid attention's projections as Linear (C, C); ours are 1x1 convs (C, C, 1, 1).
    """
    state = _strip_prefix(state, "first_stage_model.")
    if not any(".down_blocks." in k or ".mid_block." in k for k in state):
        return state                                              # CompVis: our names already
    legacy = re.compile(r"(\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
    state = {legacy.sub(lambda m: m[1] + _VAE_ATTENTION_LEGACY[m[2]] + ".", k): v for k, v in state.items()}
    out = _rename_all(state, _invert(_vae_table(config)))
    return {k: v[:, :, None, None] if _is_vae_attention_weight(k) and v.dim() == 2 else v  # (C, C) -> (C, C, 1, 1)
            for k, v in out.items()}


def to_diffusers_vae_keys(state: dict[str, Tensor], config: ImageAEConfig) -> dict[str, Tensor]:
    """Our (CompVis) image AE state dict -> diffusers AutoencoderKL names, attention as Linear weights."""
    state = {k: v[:, :, 0, 0] if _is_vae_attention_weight(k) and v.dim() == 4 else v  # (C, C, 1, 1) -> (C, C)
             for k, v in state.items()}
    return _rename_all(state, _vae_table(config))


_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _unet_down_table(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """CompVis input_blocks.K.M -> diffusers down_blocks, numbered in the order the forward pass runs them."""
    table = {"input_blocks.0.0": ("conv_in", {})}
    K, L = 1, len(cfg.block_out_channels)
    for i in range(L):
        for j in range(cfg.layers_per_block):
            table[f"input_blocks.{K}.0"] = (f"down_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if cfg.attention_levels[i]:
                table[f"input_blocks.{K}.1"] = (f"down_blocks.{i}.attentions.{j}", {})
            K += 1
        if i != L - 1:                                            # a downsampler is a block of its own
            table[f"input_blocks.{K}.0"] = (f"down_blocks.{i}.downsamplers.0", {"op": "conv"})
            K += 1
    return table


def _unet_up_table(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """CompVis output_blocks.K.M -> diffusers up_blocks (lowest resolution first in both)."""
    table, K, L = {}, 0, len(cfg.block_out_channels)
    for u, level in enumerate(reversed(range(L))):
        attention = cfg.attention_levels[level]
        for j in range(cfg.layers_per_block + 1):
            table[f"output_blocks.{K}.0"] = (f"up_blocks.{u}.resnets.{j}", _UNET_RESNET)
            if attention:
                table[f"output_blocks.{K}.1"] = (f"up_blocks.{u}.attentions.{j}", {})
            if j == cfg.layers_per_block and level != 0:          # the upsampler shares the last block
                table[f"output_blocks.{K}.{2 if attention else 1}"] = (f"up_blocks.{u}.upsamplers.0", {})
            K += 1
    return table


def _unet_table(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """UNet: CompVis block prefix -> (diffusers (our) prefix, layer renames). Transformers keep their names."""
    table = {"time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
             "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
             "middle_block.1": ("mid_block.attentions.0", {}),
             "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
             "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {})}
    return {**table, **_unet_down_table(cfg), **_unet_up_table(cfg)}


def _is_compvis_unet(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in state)


def unet_state_from_any(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """UNet weights in the diffusers or CompVis layout (optionally under model.diffusion_model.) -> our names.

    `config` fixes the CompVis block numbering (levels, layers per block, attention levels).
    """
    state = _strip_prefix(_ema_unet(state), "model.diffusion_model.")
    return _rename_all(state, _unet_table(config)) if _is_compvis_unet(state) else state


def _ema_unet(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full-EMA SD .ckpt (sd-v1-4-full-ema.ckpt) -> its EMA UNet weights under model.diffusion_model.

    Such a file holds the trained weights under model.diffusion_model.* and their EMA under LitEma's
    flattened names (model_ema.diffusion_model + the name without dots). The EMA weights are what SD
    released as sd-v1-4.ckpt and as the diffusers copy, so they are taken whenever all are there.
    """
    prefix = "model.diffusion_model."
    names = [k for k in state if k.startswith(prefix)]
    ema = {k: "model_ema." + ("diffusion_model" + k[len(prefix):]).replace(".", "") for k in names}
    if not names or not all(e in state for e in ema.values()):
        return state
    return {k: state[ema[k]] for k in names}


def to_compvis_unet_keys(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our (diffusers) UNet state dict -> CompVis names (prefix them with model.diffusion_model. for a full .ckpt)."""
    return _rename_all(state, _invert(_unet_table(config)))


def _listing(what: str, names: list[str], limit: int = 20) -> str:
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {len(names)} {what}: " + ", ".join(names[:limit]) + more if names else ""


def load_exact(module: nn.Module, state: dict[str, Tensor], source, drop: tuple[str, ...] = ()) -> None:
    """Copy `state` (our names) into `module`, or raise one ValueError listing everything that does not fit.

    drop: regular expressions (re.search) for unexpected names that may be ignored. Tensors are
    cast to the module's dtypes.
    """
    expected = module.state_dict()
    unexpected = [k for k in state if k not in expected and not any(re.search(p, k) for p in drop)]
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if unexpected or missing or wrong:
        hint = ("\n  (pass drop=(regex, ...) to ignore unexpected tensors you know are extra, e.g. "
                "CROSS_ATTENTION_KEYS)" if unexpected else "")
        raise ValueError(f"{source}: the weights do not fit {type(module).__name__}:"
                         + _listing("missing", missing) + _listing("unexpected", unexpected)
                         + _listing("with the wrong shape", wrong) + hint)
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def _empty_module(cls, config) -> nn.Module:
    """cls(config) with uninitialised CPU parameters, for a load that overwrites every one of them.

    Skips random initialisation (seconds for an 860 M-parameter UNet). Only valid when the module's
    state dict covers all its tensors, i.e. it has no buffers; otherwise it is built normally.
    """
    with torch.device("meta"):
        module = cls(config)
    if any(True for _ in module.buffers()):
        return cls(config)
    return module.to_empty(device="cpu")


def load_image_autoencoder(path, config: ImageAEConfig | None = None,
                           drop: tuple[str, ...] = CHECKPOINT_EXTRAS) -> ImageAutoencoder:
    """An image AE from a CompVis or diffusers file, a full SD .ckpt, or a diffusers (pipeline) folder.

    config: the architecture (default: Stable Diffusion's KL-f8). Returns the module in eval mode.
    """
    config = config or ImageAEConfig()
    model = _empty_module(ImageAutoencoder, config)
    load_exact(model, image_ae_state_from_any(load_weights(path, component="vae"), config), path, drop)
    return model.eval()


def _infer_unet_config(state: dict[str, Tensor]) -> UNetConfig:
    """SD-1.x shapes with in/out channels and the cross-attention width read from the weights (either layout)."""
    first = state.get("conv_in.weight", state.get("input_blocks.0.0.weight"))
    last = state.get("conv_out.weight", state.get("out.2.weight"))
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if first is None or last is None:
        raise ValueError("cannot read the UNet's input / output convolutions from these weights; pass a config")
    return dataclasses.replace(UNetConfig(), in_channels=first.shape[1], out_channels=last.shape[0],
                               context_dim=None if to_k is None else to_k.shape[1])


def load_unet(path, config: UNetConfig | None = None, drop: tuple[str, ...] = ()) -> UNet:
    """A denoising UNet from a diffusers or CompVis file, a full SD .ckpt, or a diffusers (pipeline) folder.

    config: the architecture; by default SD-1.x shapes with in_channels, out_channels and
    context_dim read from the weights. drop=CROSS_ATTENTION_KEYS loads SD weights into a config with
    context_dim=None. Returns the module in eval mode.
    """
    state = _strip_prefix(_ema_unet(load_weights(path, component="unet")), "model.diffusion_model.")
    config = config or _infer_unet_config(state)
    model = _empty_module(UNet, config)
    load_exact(model, unet_state_from_any(state, config), path, drop)
    return model.eval()


def init_ldmseg_unet_from_sd(model: LDMSeg, sd_unet_state: dict[str, Tensor]) -> list[str]:
    """Start LDMSeg's UNet from Stable Diffusion's  [LDMSeg brief §3.2]. Returns the frozen parameter names.

    sd_unet_state: SD-1.x UNet weights in either layout, e.g. load_weights(folder, component="unet").
    1. conv_in is widened from 4 to 12 inputs: the segmentation columns [:, :4] copied from SD, the
       image and self-condition columns zero, the bias copied -- at initialisation the model is SD
       applied to z_t alone, whatever LDMSegConfig.zero_init_condition says (it sets the start of a
       UNet trained from scratch).  [PAPER]
    2. Cross-attention (attn2, norm2 of every transformer block) is dropped, unless the LDMSeg UNet
       was configured with a context_dim (then it must load).  [PAPER: removed]
    3. The time-embedding MLP is frozen (requires_grad False) -- names "unet.time_embedding.*" as in
       model.named_parameters(). requires_grad is not saved in a state dict: re-freeze on resume.  [PAPER]
    """
    unet = model.unet
    state = unet_state_from_any(sd_unet_state, unet.config)
    if "conv_in.weight" not in state:
        raise ValueError("the Stable Diffusion weights have no conv_in")
    sd_conv_in = state["conv_in.weight"]                          # (C0, 4, 3, 3)
    keep = model.config.mask_ae.latent_channels
    if sd_conv_in.dim() != 4 or sd_conv_in.shape[1] != keep:
        raise ValueError(f"expected SD's conv_in with {keep} input channels, got shape {tuple(sd_conv_in.shape)}")
    wide = sd_conv_in.new_zeros(sd_conv_in.shape[0], unet.config.in_channels, *sd_conv_in.shape[2:])
    wide[:, :keep] = sd_conv_in                                   # (C0, 4, 3, 3) -> (C0, 12, 3, 3), new inputs zero
    state["conv_in.weight"] = wide
    drop = CROSS_ATTENTION_KEYS if unet.config.context_dim is None else ()
    load_exact(unet, state, "Stable Diffusion UNet weights", drop)
    return freeze_time_embedding(model)


def freeze_time_embedding(model: LDMSeg) -> list[str]:
    """requires_grad False on the UNet's time-embedding MLP (from SD, kept as it is); returns the names.
    A state dict does not carry requires_grad: a resumed run calls this again."""
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith("unet.time_embedding."):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen

# SPDX-License-Identifier: MIT
"""
train.py -- one training loop for every stage of both papers.

Stages
  vae     the image autoencoder (Stable Diffusion's KL-f8 architecture) trained on the dataset; it
          stands in for SD's frozen VAE when no SD weights are given
  1       LDMSeg stage 1: the shallow mask autoencoder                          [LDMSeg §3.1]
  2       LDMSeg stage 2: the image-conditioned latent diffusion UNet            [LDMSeg §3]
          (trains / reuses the image AE and the mask AE first); 'all' is an alias of 2
  cogen   PDM: the one-stream U-ViT co-generating image latents and category maps from captions
          (trains / reuses the image AE first)                                  [PDM Alg. 1]
          --two-stream: a map stream beside the frozen image stream of a t2i run (trains / reuses
          it first), or of U-ViT's released weights                            [PDM §2.5.2]
  t2i     the image stream alone: U-ViT's text-to-image model on the captions   [U-ViT; PDM brief §4]
  multitask  LDMSeg with learnable task embeddings: one UNet for instance, semantic and depth
          latents (reuses stage 2's image AE and mask AE)                       [LDMSeg §6]

Contents
  1. Configuration        TrainConfig (every flag), presets tiny / shapes / coco
  2. Run bookkeeping      devices, seeding, distributed set-up, logging, atomic checkpoints
  3. Optimisation         AdamW groups, warm-up + cosine LR, EMA
  4. The training loop    train(cfg, stage): one loop, every stage plugs in a `Stage` object
  5. Stages               vae, 1, 2, cogen, t2i -- each a small class with build / loss / preview /
                          finish; 2, cogen and t2i share the frozen image autoencoder and its latent
                          cache, cogen and t2i the captions and vocabulary (CaptionStage);
                          multitask is stage 2 with task embeddings (MultiTaskStage)
  6. Command line         python train.py --stage 1 [--preset shapes] ...

Run
  python train.py --stage vae               # image autoencoder on Shapes (written on first use)
  python train.py --stage 1                 # mask autoencoder on Shapes
  python train.py --stage cogen             # PDM on Shapes captions (image AE trained first if missing)
  python train.py --stage multitask         # multi-task LDMSeg (class-aware PQ, mIoU, depth at the end)
  python train.py --stage cogen --two-stream                  # two-stream PDM (t2i run trained first if missing)
  python train.py --stage cogen --two-stream --init-image-stream runs/shapes/t2i
  python train.py --stage t2i --preset coco --image-vae SD --init-image-stream mscoco_uvit_small.pth
  torchrun --nproc_per_node=2 train.py ...  # DDP (NCCL on CUDA, gloo on CPU)

Reproducibility
  Every random draw of step k (noise, timesteps, id remaps, point samples) comes from a generator
  seeded with (seed, rank, k), and the data order of epoch e from (seed, e). A checkpoint therefore
  only needs the step to resume: N steps straight equal N/2 + --resume + N/2, bit for bit on CPU for
  the autoencoders; to ~1e-7 in the weights for the stages that cache image latents (2, multitask,
  cogen, t2i), whose cache a resumed run refills in other batches (a CPU convolution's sums depend
  on the batch). `--resume RUN` alone continues RUN with its own settings (resume_settings).

Faults (the full table with the test of each: docs/faults.md)
  SIGINT / SIGTERM save a checkpoint and exit with 128 + the signal number. Checkpoints are written
  to a temporary file, fsynced and renamed, so a crash or a full disk leaves the previous one intact;
  a periodic checkpoint that cannot be written is logged and retried at the next. A step whose loss
  or gradient norm is not finite never reaches AdamW: training stops (--skip-nonfinite N: skips up to
  N such steps). A bad data file stops training naming it (--skip-bad-samples: replaced, counted).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data

# -----------------------------------------------------------------------------
# 1. Configuration
# -----------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every training flag; `python train.py --help` lists them with their defaults."""
    stage: str = "1"                 # which stage to train: vae | 1 | 2 | all (= 2 and what it needs) | cogen (PDM) | t2i (PDM's image stream) | multitask (LDMSeg §6)
    preset: str = "shapes"           # model / data sizes: tiny | shapes | coco
    data: str = "data/shapes"        # COCO-format panoptic folder; Shapes is written there if missing (tiny / shapes presets)
    out_dir: str = ""                # run folder; default runs/<preset>/<stage>
    image_size: int = 0              # training resolution; 0 = the preset's
    crop: int = -1                   # random training crop side (autoencoders); -1 = the preset's, 0 = none
    max_steps: int = 0               # optimisation steps; 0 = the preset's
    batch_size: int = 0              # per-process batch; 0 = the preset's
    lr: float = 0.0                  # peak learning rate; 0 = the preset's
    weight_decay: float = -1.0       # AdamW decoupled weight decay (none on norms / biases); -1 = the preset's (0.05)  # PAPER: LDMSeg 0.05
    adam_beta2: float = -1.0         # AdamW beta2; -1 = the preset's (0.999; PDM's coco recipe 0.9)
    warmup_steps: int = -1           # linear warm-up from 0; -1 = the preset's (200)         # PAPER: LDMSeg 200
    min_lr_ratio: float = -1.0       # cosine decays to lr * this (1 = constant); -1 = the preset's (0.01)  # PAPER: 1e-4 -> 1e-6
    grad_clip: float = -1.0          # max global gradient norm; -1 = the preset's (1.0; 3.0 for the coco AE), 0 = off
    ema_decay: float = -1.0          # EMA of the weights used for sampling and evaluation (0 = off); -1 = the preset's (0.999)
    seed: int = 0                    # seeds data order, augmentation and every random draw
    device: str = "auto"             # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"              # autocast dtype: auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False            # torch.compile the model (same numbers, faster on GPU)
    num_workers: int = 2             # DataLoader worker processes
    data_cache_mb: int = 1024        # keep the decoded training items in memory when the whole train split fits in this many MiB, in each data process (0 = off; data.PanopticDataset)
    log_every: int = 50              # steps between log lines
    preview_every: int = 500         # steps between preview PNGs (0 = only at the end)
    ckpt_every: int = 1000           # steps between checkpoints (always one at the end)
    eval_images: int = 0             # val images for the end-of-run evaluation; 0 = the preset's (all; cogen: 100 on shapes)
    resume: str = ""                 # checkpoint (or run folder) to continue from
    stop_after: int = 0              # end this invocation after N steps with a checkpoint (0 = run to max-steps)
    skip_bad_samples: bool = False   # replace a missing / unreadable / inconsistent training sample by the next good one, counted in the log (off: stop, naming the file)
    skip_nonfinite: int = 0          # skip up to N steps whose loss or gradient norm is inf / NaN (no update), counted in the log, then stop (0: stop at the first)
    num_train: int = 4000            # Shapes images written when --data does not exist
    num_val: int = 200               # Shapes val images written when --data does not exist
    image_vae: str = ""              # image autoencoder: a run / checkpoint of --stage vae, or Stable Diffusion weights (.ckpt, .safetensors, diffusers folder); default: train / reuse runs/<preset>/vae
    init_unet: str = ""              # start stage 2's UNet from Stable Diffusion 1.x weights (file or diffusers folder)  # PAPER: SD v1.4
    mask_ae: str = ""                # stage-1 mask autoencoder checkpoint; default: train / reuse runs/<preset>/stage1
    latent_noise: float = -1.0       # stage 1: train the decoder on the latent plus this x its std x N(0, 1) noise (ldmseg.py section 2; 0 = off); -1 = the preset's (shapes: 0.1; else 0)
    prediction: str = ""             # stage 2 / multitask: the UNet's output, eps (min-SNR weighted, LDMSeg) | x0 (unweighted); "" = the preset's
    signal_scale: float = 0.0        # stage 2 / multitask: b, the diffusion sees b x the unit-variance mask latent; 0 = the preset's
    id_order: str = ""               # stage 2 / multitask: the training ids, random (fresh per sample, LDMSeg) | raster (first-pixel order, data.py section 2); "" = the preset's (random)
    time_shift: int = -1             # stage 2 / multitask: sampling time shift the checkpoint carries (ldmseg.py section 8); -1 = the preset's (shapes: 300 for its x0 recipe, 0 if --prediction changes it)
    decoded_ce_weight: float = -1.0  # stage 2: weight of the cross-entropy on the ids decoded from x0_pred, beside the latent loss (ldmseg.py section 8; needs x0); -1 = the preset's (0: off)
    area_weight_power: float = -1.0  # stage 2: p, each latent cell's loss weighted by area^-p of its segments (ldmseg.py section 8); -1 = the preset's (shapes: 0.5, 0 if --prediction changes it; else 0: every cell alike)
    match_ids: str = ""              # stage 2: on | off, the loss target's random ids renamed to those the UNet's x0 estimate draws (ldmseg.py section 8; needs x0, random ids); "" = the preset's (shapes: on)
    attention_levels: str = ""       # stage 2 / multitask: which UNet levels (finest first) have self-attention, a 0 or 1 each, e.g. 1,1,1; "" = the preset's (shapes: 1,1,1 for stage 2, 0,1,1 for multitask)
    tasks: str = ""                  # multitask: the tasks, comma-separated from instance,semantic,depth (one task: the single-task model of the README's table, in the same code); "" = all three
    depth_subcells: int = 0          # multitask: s x s depth medians per latent cell, 1 (averages 4 copies) or 2 (finer); 0 = the model's (1)
    task_signal_scales: str = ""     # multitask: own b of the semantic / depth latent, e.g. semantic=1,depth=0.5 (instance and tasks not named keep --signal-scale's); "" = the preset's (shapes: depth=1)
    task_loss_weights: str = ""      # multitask: a task's loss weight, e.g. depth=10 (tasks not named: 1; replaces the preset's); "" = the preset's (shapes: depth=2.5)
    task_sample_weights: str = ""    # multitask: a task's relative sampling weight, e.g. depth=2 for half of the samples (tasks not named: 1; replaces the preset's); "" = the preset's (shapes: depth=4; others: uniform)
    eval_steps: int = 0              # stage 2 / multitask: DDIM steps of the end-of-run evaluation; 0 = the preset's  # PAPER: DDIM 50
    eval_dpm_steps: int = 0          # stage 2 / cogen: DPM-Solver++ steps of the end-of-run evaluation; 0 = the preset's (shapes: 20; coco cogen: 50)
    min_word_count: int = 0          # cogen / t2i: caption words seen fewer times become <unk>; 0 = the preset's (1; coco 5)
    patch_factor: int = 0            # cogen: Multi-Scale Patching f in {1, 2, 4} (map f x the latent side, map patch f x the image patch); 0 = the preset's (2)  [PDM Table 2]
    clean_map_prob: float = -1.0     # cogen: share of samples whose map input is the clean map, what given-map sampling (sample.py --map) feeds; -1 = the preset's (0)  [PDM 'given maps']
    panoptic_map: bool = False       # cogen: also co-generate instance bits beside the category bits, a true panoptic map (our extension, cogen.py §2)
    two_stream: bool = False         # cogen: the two-stream PDM, a trained map stream beside the frozen image stream of a --stage t2i run  [PDM §2.5.2]
    init_image_stream: str = ""      # cogen --two-stream: the image stream, a --stage t2i run or U-ViT's released weights (mscoco_uvit_small.pth); default: train / reuse runs/<preset>/t2i. --stage t2i: start from such a file


# Per (preset, stage) values for the fields left at 0 above. Shapes numbers are sized so each stage
# finishes in minutes on a 2-core CPU; coco follows the papers (LDMSeg Appendix A).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny":   {"vae": dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3),
               "1":   dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3)},
    # DEVIATION: the Shapes autoencoders train on random 64^2 crops of the 128^2 images (both are
    # fully convolutional, so they run at 128^2 afterwards); 4x fewer FLOPs per step on a CPU.
    # Stage 1 gets the steps that fit its 5-minute budget on 2 cores: reconstruction PQ rises with
    # the steps up to ~2,400 and then flattens (one run each, 200 val images, trained on the latent's
    # mean: 77.6 at 1,200, 84.7 at 1,800, 88.6 at 2,400, 89.7 at 4,800). 2,400 steps took 3.3 min on the
    # README's slower 2-core machine, 1.7 min on its AMD EPYC one. Its latent noise: ldmseg.py section 2.
    "shapes": {"vae": dict(image_size=128, crop=64, max_steps=600, batch_size=16, lr=1e-3),
               "1":   dict(image_size=128, crop=64, max_steps=2400, batch_size=16, lr=3e-3)},
    "coco":   {"vae": dict(image_size=512, max_steps=100_000, batch_size=8, lr=4.5e-6),
               "1":   dict(image_size=512, max_steps=66_000, batch_size=16, lr=1e-4, grad_clip=3.0,  # PAPER: LDMSeg AE
                           min_lr_ratio=1.0)},                         # PAPER: constant after the warm-up
}
# DEVIATION (every stage, coco too): weight decay skips norms and biases (make_optimizer; LDMSeg's AE
# decays every parameter, its stage 2 skips norms), and an EMA of the weights (0.999 unless a preset
# says otherwise) is what previews, evaluation, sampling and later stages read; LDMSeg trains without
# one (ema_on=False [LDMSeg brief §3.3]). --ema-decay 0 trains without it.
PRESETS["tiny"]["2"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_steps=3, eval_dpm_steps=2)
# Stage 2 on shapes: the steps that keep `--stage all` within about 20 minutes on the README's 2-core
# machines; PQ rises with length there (README, Results). 2,400 until the preset matched its ids
# (ldmseg.py section 8), which costs 7-30 % more per step: 1,900 matched steps take the time 2,400 took
# (PQ 54.2 against 55.3 at 2,400 on the Intel Xeon machine; 43.8 unmatched at 2,400). lr 2e-3: up on
# 100 train images in three training seeds against 1e-3 (+5.4 / +2.3 / +1.9 PQ), while 4e-3 breaks
# training down after the warm-up and 3e-3 gains nothing unmatched and stalls matched (PQ 27.8;
# docs/experiments.md).
# DEVIATION: the paper fine-tunes SD's UNet at lr 1e-4, batch 256 (PAPER: LDMSeg Appendix A); this small
# UNet trains from scratch at 16.
PRESETS["shapes"]["2"] = dict(image_size=128, max_steps=1900, batch_size=16, lr=2e-3, eval_steps=50, eval_dpm_steps=20)
PRESETS["coco"]["2"] = dict(image_size=512, max_steps=200_000, batch_size=32, lr=1e-4,   # PAPER: x 8 GPUs = 256
                            eval_steps=50, eval_dpm_steps=20)
# Multi-task LDMSeg (LDMSeg §6): stage 2's recipe. Each sample trains one of three tasks; shapes runs
# 9,000 steps with depth drawn for 2/3 of the samples (ldmseg.multitask_config), so instance and semantic
# each see 1,500 x 16 samples (stage 2's length when this was set) and depth four times as many.
# coco: the paper's budget is unknown; COCO has no depth maps and its category ids need an 8-bit mask AE.
PRESETS["tiny"]["multitask"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_steps=3)
PRESETS["shapes"]["multitask"] = dict(image_size=128, max_steps=9000, batch_size=16, lr=1e-3, eval_steps=50)
PRESETS["coco"]["multitask"] = dict(image_size=512, max_steps=200_000, batch_size=32, lr=1e-4, eval_steps=50)
# PDM (cogen). The image size fixes the latent side the U-ViT is built for (image_size / 8).
PRESETS["tiny"]["cogen"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_dpm_steps=2,
                                eval_images=4, min_word_count=1)
# Shapes: 2.55 it/s at batch 16 on an idle 2-core CPU (two threads), so 3,500 x 16 = 56k samples
# (14 epochs) take ~24 min, inside the 30-minute budget. Caption agreement: 0.133 at 1,500 steps,
# 0.143 and 0.192 in two runs of 3,500 (README, PDM). --two-stream uses this preset too, at 1.82
# it/s ~32 min, past that budget: the README compares the two at --max-steps 1500.
PRESETS["shapes"]["cogen"] = dict(image_size=128, max_steps=3500, batch_size=16, lr=1e-3, warmup_steps=100,
                                  eval_dpm_steps=20, eval_images=100, min_word_count=1)
# PAPER: PDM's released small config [PDM brief §6.6]: 256^2 images, AdamW 2e-4, wd 0.03, betas
# (0.9, 0.9), 5k warm-up then a constant rate, batch 64, 2M steps, EMA 0.9999; 50-NFE DPM-Solver++.
# The paper itself gives no schedule (UNVERIFIED which of these its numbers used). DEVIATION: weight
# decay skips norms and biases here, as in every stage; PDM's code decays every parameter.
PRESETS["coco"]["cogen"] = dict(image_size=256, max_steps=2_000_000, batch_size=64, lr=2e-4, weight_decay=0.03,
                                adam_beta2=0.9, warmup_steps=5000, min_lr_ratio=1.0, ema_decay=0.9999,
                                eval_dpm_steps=50, min_word_count=5)
# The image stream alone (--stage t2i), what the two-stream PDM freezes: tiny and shapes as cogen.
# --stage cogen --two-stream uses the cogen presets above.
PRESETS["tiny"]["t2i"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_images=4, min_word_count=1)
PRESETS["shapes"]["t2i"] = dict(image_size=128, max_steps=1500, batch_size=16, lr=1e-3, warmup_steps=100,
                                eval_images=100, min_word_count=1)
# PAPER: U-ViT-S/2's MS-COCO recipe (U-ViT's configs/mscoco_uvit.py, released as mscoco_uvit_small.pth,
# PDM's pretrained image stream [PDM brief §4.3]): 256^2 images, AdamW 2e-4, wd 0.03, betas (0.9, 0.9),
# a 5k-step warm-up then a constant rate, batch 256 in all, 1M steps, EMA 0.9999, captions dropped with p 0.1.
# --init-image-stream mscoco_uvit_small.pth replaces this training (T2IStage).
PRESETS["coco"]["t2i"] = dict(image_size=256, max_steps=1_000_000, batch_size=32, lr=2e-4,   # PAPER: x 8 GPUs = 256
                              weight_decay=0.03, adam_beta2=0.9, warmup_steps=5000, min_lr_ratio=1.0,
                              ema_decay=0.9999, min_word_count=5)
# Values of the fields whose flag default is -1 ("the preset's") when a preset does not set them.
PRESET_DEFAULTS: dict[str, Any] = dict(crop=0, grad_clip=1.0,                                  # PAPER: LDMSeg clip 1.0
                                       weight_decay=0.05, adam_beta2=0.999, warmup_steps=200,   # PAPER: LDMSeg
                                       min_lr_ratio=0.01, ema_decay=0.999)

# What the numeric flags take once the preset has filled them (the -1 / 0 "preset's" values are gone by then).
FLAG_RANGES = (
    (("max_steps", "batch_size", "lr", "image_size", "log_every", "ckpt_every", "num_train", "num_val"),
     lambda v: v > 0, "a positive number"),
    (("crop", "num_workers", "data_cache_mb", "preview_every", "eval_images", "stop_after", "skip_nonfinite",
      "warmup_steps", "weight_decay", "grad_clip", "eval_steps", "eval_dpm_steps", "min_word_count", "seed"),
     lambda v: v >= 0, "0 or more"),
    (("min_lr_ratio",), lambda v: 0 <= v <= 1, "0..1"),
    (("ema_decay", "adam_beta2"), lambda v: 0 <= v < 1, "0..1, 1 excluded"),
)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the 0 / empty fields from the preset; the result is what the run uses and saves."""
    if cfg.stage == "all":                     # the whole first-paper pipeline = stage 2 + what it needs
        cfg = dataclasses.replace(cfg, stage="2")
    if cfg.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    if cfg.stage not in PRESETS[cfg.preset]:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose from {sorted(PRESETS[cfg.preset]) + ['all']}")
    if cfg.two_stream and cfg.stage != "cogen":
        raise SystemExit("--two-stream belongs to --stage cogen")
    if cfg.init_image_stream and not (cfg.stage == "t2i" or cfg.two_stream):
        raise SystemExit("--init-image-stream needs --stage cogen --two-stream or --stage t2i")
    if (cfg.patch_factor or cfg.panoptic_map or cfg.clean_map_prob != -1) and cfg.stage != "cogen":
        raise SystemExit("--patch-factor, --panoptic-map and --clean-map-prob belong to --stage cogen")
    if cfg.clean_map_prob != -1 and not 0 <= cfg.clean_map_prob <= 1:
        raise SystemExit(f"--clean-map-prob takes 0..1, got {cfg.clean_map_prob}")
    if cfg.prediction and (cfg.stage not in ("2", "multitask") or cfg.prediction not in ("eps", "x0")):
        raise SystemExit(f"--prediction takes eps or x0 and belongs to --stage 2 / all / multitask, got {cfg.prediction!r}")
    if cfg.signal_scale and (cfg.stage not in ("2", "multitask") or cfg.signal_scale < 0):
        raise SystemExit(f"--signal-scale takes a positive b and belongs to --stage 2 / all / multitask, got {cfg.signal_scale}")
    if cfg.id_order and (cfg.stage not in ("2", "multitask") or cfg.id_order not in data.ID_ORDERS):
        raise SystemExit(f"--id-order takes {' or '.join(data.ID_ORDERS)} and belongs to --stage 2 / all / multitask, "
                         f"got {cfg.id_order!r}")
    if cfg.latent_noise != -1 and (cfg.stage != "1" or not cfg.latent_noise >= 0):
        raise SystemExit(f"--latent-noise takes a scale >= 0 (0: off) and belongs to --stage 1, got {cfg.latent_noise}")
    if cfg.time_shift != -1 and (cfg.stage not in ("2", "multitask") or not 0 <= cfg.time_shift < 1000):
        raise SystemExit(f"--time-shift takes 0..999 and belongs to --stage 2 / all / multitask, got {cfg.time_shift}")
    if cfg.decoded_ce_weight != -1 and (cfg.stage != "2" or not cfg.decoded_ce_weight >= 0):
        raise SystemExit(f"--decoded-ce-weight takes a weight >= 0 (0: off) and belongs to --stage 2 / all, "
                         f"got {cfg.decoded_ce_weight}")
    if cfg.area_weight_power != -1 and (cfg.stage != "2" or not cfg.area_weight_power >= 0):
        raise SystemExit(f"--area-weight-power takes a power >= 0 (0: every cell alike) and belongs to --stage 2 / all, "
                         f"got {cfg.area_weight_power}")
    if cfg.match_ids and (cfg.stage != "2" or cfg.match_ids not in ("on", "off")):
        raise SystemExit(f"--match-ids takes on or off and belongs to --stage 2 / all, got {cfg.match_ids!r}")
    if cfg.attention_levels and (cfg.stage not in ("2", "multitask")
                                 or any(x.strip() not in ("0", "1") for x in cfg.attention_levels.split(","))):
        raise SystemExit(f"--attention-levels takes a 0 or 1 per UNet level, e.g. 1,1,1, and belongs to --stage 2 / all "
                         f"/ multitask, got {cfg.attention_levels!r}")
    if cfg.depth_subcells and (cfg.stage != "multitask" or cfg.depth_subcells not in (1, 2)):
        raise SystemExit(f"--depth-subcells takes 1 or 2 and belongs to --stage multitask, got {cfg.depth_subcells}")
    if (cfg.task_signal_scales or cfg.task_loss_weights or cfg.task_sample_weights) and cfg.stage != "multitask":
        raise SystemExit("--task-signal-scales, --task-loss-weights and --task-sample-weights belong to --stage multitask")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"--dtype takes auto, fp32 or bf16 (fp16 would need loss scaling), got {cfg.dtype!r}")
    for flag, value, stages in (("--mask-ae", cfg.mask_ae, ("2", "multitask")),
                                ("--init-unet", cfg.init_unet, ("2", "multitask")),
                                ("--image-vae", cfg.image_vae, ("2", "multitask", "cogen", "t2i")),
                                ("--eval-steps", cfg.eval_steps, ("2", "multitask")),
                                ("--eval-dpm-steps", cfg.eval_dpm_steps, ("2", "cogen")),
                                ("--min-word-count", cfg.min_word_count, ("cogen", "t2i"))):
        if value and cfg.stage not in stages:           # a flag the stage would silently ignore
            raise SystemExit(f"{flag} belongs to --stage {' / '.join(stages)}, not {cfg.stage}")
    if cfg.patch_factor not in (0, 1, 2, 4):
        raise SystemExit(f"--patch-factor must be 1, 2 or 4 [PDM Table 2], got {cfg.patch_factor}")
    values = {**PRESET_DEFAULTS, **PRESETS[cfg.preset][cfg.stage]}
    unset = lambda k: getattr(cfg, k) == (-1 if k in PRESET_DEFAULTS else type(getattr(cfg, k))())
    out = dataclasses.replace(cfg, **{k: v for k, v in values.items() if unset(k)})
    for names, ok, takes in FLAG_RANGES:       # after the preset has filled them: a clear error, not a traceback later
        for name in names:
            if not ok(getattr(out, name)):
                raise SystemExit(f"--{name.replace('_', '-')} takes {takes}, got {getattr(out, name)}")
    if out.crop > out.image_size:              # every image is resized to image_size before the crop
        raise SystemExit(f"--crop {out.crop} is larger than --image-size {out.image_size}")
    if out.image_size % 8 or out.crop % 8:     # the autoencoders' stride: latents must cover the image exactly
        raise SystemExit(f"--image-size and --crop must be multiples of 8 (the autoencoders' stride), "
                         f"got {out.image_size} and {out.crop}")
    if not out.out_dir:
        name = f"stage{out.stage}" if out.stage.isdigit() else out.stage
        # Variants get folders of their own, so prerequisite() never reuses the other kind of run.
        name += "_two_stream" if out.two_stream else "_uvit" if out.init_image_stream else ""
        name += f"_f{out.patch_factor}" if out.patch_factor else ""
        name += "_panoptic" if out.panoptic_map else ""
        out.out_dir = str(Path("runs") / out.preset / name)
    return out


# The fields that belong to one invocation: --resume never takes them from the run it continues.
INVOCATION_FIELDS = ("resume", "stop_after", "device", "num_workers", "data_cache_mb", "compile")


def resume_settings(cfg: TrainConfig, given: set[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """On --resume: the run's own settings for every flag not given here; (resolved config, log notes).

    `python train.py --resume RUN` alone continues RUN as it was started: in RUN (not the preset's
    folder), with its stage, preset, length, learning-rate schedule, batch, seed and data. A flag given
    here overrides the run's value (e.g. --max-steps to train longer), and each such change is noted.
    given: the fields named on the command line (main() knows them); None = every field whose value
    differs from TrainConfig's default (for train() called from Python).
    """
    if not cfg.resume:
        return cfg, []
    try:
        ckpt = torch.load(find_checkpoint(cfg.resume), map_location="meta", weights_only=True)
    except Exception:                           # not a readable checkpoint: load_checkpoint says why later
        return cfg, []
    run = ckpt.get("config") if isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT else None
    if not isinstance(run, dict):
        return cfg, []
    defaults = TrainConfig()
    if given is None:
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    run = {**run, "out_dir": str(find_checkpoint(cfg.resume).parent)}       # where the run is now
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name in run and f.name not in INVOCATION_FIELDS]
    out = resolve(dataclasses.replace(cfg, **{k: run[k] for k in fields if k not in given}))
    notes = [f"--{k.replace('_', '-')} {getattr(out, k)} here, {run[k]} in the run"
             for k in fields if k in given and getattr(out, k) != run[k]]
    return out, notes


# -----------------------------------------------------------------------------
# 2. Run bookkeeping: devices, seeds, processes, logs, checkpoints
# -----------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """--device auto picks cuda > mps > cpu; under torchrun each process takes its LOCAL_RANK GPU
    (with --device auto or a bare --device cuda; cuda:N names one GPU for every process)."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) elsewhere -- CPU bf16 is slower, not faster."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for every random draw of one training step: a pure function of (seed, rank, step).

    Rank 0 (and a single process) seeds it with seed * 1_000_003 + step; the other ranks hash (seed,
    rank, step), so no rank replays another's draws at a later step.
    """
    g = torch.Generator(device="cpu")
    if rank == 0:
        g.manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    else:
        g.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]) % (2 ** 63))
    return g


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (used only by weight initialisation)."""
    import random
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def global_rng_kept():
    """Run a block (a prerequisite stage trained in this process) and put the global RNGs back as they
    were: the caller's model is then initialised as it is when that prerequisite is already on disk,
    so `--stage all` trains the same stage-2 model as `--stage vae`, `--stage 1`, `--stage 2` in turn."""
    import random
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Dist:
    """Where this process stands in a torchrun launch (world 1 when run plainly)."""
    rank: int = 0
    world: int = 1
    wait_group: Any = None               # gloo group for waiting on rank 0's evaluation (init_distributed)

    @property
    def main(self) -> bool:
        return self.rank == 0


# Rank 0 evaluates each stage alone while the other ranks wait for its checkpoint (the next stage of
# --stage all reads it). On COCO val that takes longer than NCCL's 10-minute collective timeout (about
# 20 min for DDIM 50 + DPM-Solver++ 20 on 5,000 images at 512^2, from the H200 sampling times in the
# README), so the wait is a barrier on a gloo group of its own with a long timeout; training's
# collectives keep NCCL's, which is what catches a hung rank.
EVAL_WAIT_TIMEOUT_S = 6 * 3600


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Dist()
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=EVAL_WAIT_TIMEOUT_S))
    return Dist(dist.get_rank(), dist.get_world_size(), wait)


class Logger:
    """Prints on rank 0 and appends the same lines to <run>/log.txt."""

    def __init__(self, run_dir: Path | None, enabled: bool = True):
        self.path = run_dir / "log.txt" if run_dir and enabled else None
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


CKPT_FORMAT = "ldmseg-pdm-checkpoint/1"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission, ...); the message names the path."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write a checkpoint atomically: temporary file, fsync, rename. A crash leaves the old one intact.

    The old file is only ever replaced by a complete, flushed new one (os.replace is atomic); a write
    that fails (e.g. a full disk) removes the partial temporary file and raises CheckpointWriteError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CKPT_FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())                  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as exc:                  # also a KeyboardInterrupt mid-write: no half file left
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CheckpointWriteError(_write_failure(path, exc)) from exc
        raise
    _fsync_dir(path.parent)


def _write_failure(path: Path, exc: OSError) -> str:
    """'ckpt.pt: checkpoint not written (No space left on device; 0 MiB free on runs/x); the previous one is kept'"""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += f"; {shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free on {path.parent}"
    kept = "the previous checkpoint is kept" if path.exists() else "there is no previous checkpoint"
    return f"{path}: checkpoint not written ({reason}); {kept}"


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: sync the folder's entries). Best effort: some file systems refuse."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file (clear error when there is none)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ckpt.pt"
    if not p.is_file():
        raise SystemExit(f"{path}: no checkpoint here (expected a file or a run folder with ckpt.pt)")
    return p


def load_checkpoint(path: str | os.PathLike, stage: str | None = None) -> dict:
    """Load a checkpoint safely (weights_only=True: nothing in it is executed) and check its kind."""
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SystemExit(f"{p}: not a loadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SystemExit(f"{p}: not a checkpoint of this project (no '{CKPT_FORMAT}' format tag)")
    if stage is not None and ckpt.get("stage") != stage:
        raise SystemExit(f"{p}: a stage-{ckpt.get('stage')} checkpoint, but stage {stage} is needed here")
    return ckpt


def checkpoint_stage(path: str | os.PathLike) -> str | None:
    """The stage a checkpoint was trained by, read without loading its tensors (map_location='meta');
    None when `path` is not a readable checkpoint of this project (load_checkpoint then says why)."""
    try:
        ckpt = torch.load(find_checkpoint(path), map_location="meta", weights_only=True)
    except (Exception, SystemExit):
        return None
    return ckpt.get("stage") if isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT else None


@contextlib.contextmanager
def weights_must_fit(source, what: str = "the model its config describes"):
    """Turn a checkpoint whose weights do not fit the model into one clear SystemExit naming `source`.

    with train.weights_must_fit(args.ckpt):
        model = ldmseg.load_ldmseg(ckpt)
    load_state_dict raises RuntimeError (missing / unexpected / mis-shaped tensors), a config
    dataclass TypeError (a field it does not know), a lookup KeyError (an entry the file lacks).
    Wrap only the load: a RuntimeError from elsewhere (e.g. out of memory) must not be renamed.
    """
    try:
        yield
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:400]
        raise SystemExit(f"{source}: the weights do not fit {what} (a damaged or edited file, or one "
                         f"from another configuration or version): {type(exc).__name__}: {detail}") from None


# -----------------------------------------------------------------------------
# 3. Optimisation: AdamW, learning-rate schedule, EMA
# -----------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; norms, biases and embeddings' 1-d parameters get no weight decay, nor LDMSeg's task embeddings.

    PAPER: LDMSeg uses AdamW 1e-4, wd 0.05 with wd 0 on norm layers [LDMSeg brief §3.4], and its
    optimizer exempts the learnable cross-attention embedding as well [LDMSeg brief §6, optim.py].
    The kernel is adamw_kernel(device)'s.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = lambda n, p: p.ndim < 2 or n.startswith("task_embedding.")
    decay = [p for n, p in named if not exempt(n, p)]
    no_decay = [p for n, p in named if exempt(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), **adamw_kernel(device))


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's kernel: fused on CUDA and CPU, multi-tensor (foreach) elsewhere (MPS).

    On a 2-core CPU the fused kernel steps stage 2's 3.9 M UNet parameters in 3.5 ms against 11 ms for the
    multi-tensor one, and agrees with it to 3e-8 after 23 steps.
    """
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio at max_steps.

    The warm-up lasts warmup_steps, capped at a tenth of the run so short runs are not all warm-up.
    min_lr_ratio = 1 gives a constant rate after the warm-up (PDM's schedule).
    """
    warmup = min(cfg.warmup_steps, cfg.max_steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32 (frozen parts are not copied).

    The decay is warmed up as min(decay, (1 + k) / (10 + k)) so early averages are not dominated by
    the random initialisation (the common practice of the DDPM / LDM code bases).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        names, params = zip(*[(k, p) for k, p in model.named_parameters() if k in self.shadow])
        torch._foreach_lerp_([self.shadow[k] for k in names], [p.float() for p in params], 1 - d)

    def copy_to(self, model: nn.Module) -> None:
        """Put the averaged weights into `model` (a copy of the trained one)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in self.shadow.items():
                params[k].copy_(v.to(params[k].dtype))

    def state_dict_of(self, model: nn.Module) -> dict:
        """The model's full state dict with the averaged weights in place of the trained ones."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in model.state_dict().items()}


# -----------------------------------------------------------------------------
# 4. The training loop
# -----------------------------------------------------------------------------


class Stage:
    """What differs between stages. The loop in `train` calls, in order:
    build() once, datasets() once, loss() every step, preview() now and then, finish() at the end.
    """
    name = ""
    # What the training loss reads besides the segments; the rest is not decoded (data.PanopticDataset).
    needs_image, needs_depth = True, False

    def __init__(self, cfg: TrainConfig, device: torch.device, log: Logger):
        self.cfg, self.device, self.log = cfg, device, log

    def datasets(self) -> tuple[data.PanopticDataset, data.PanopticDataset]:
        """(train, val) datasets; Shapes is written to --data first when that folder does not exist."""
        root = self.data_root()
        kw = dict(size=self.cfg.image_size, seed=self.cfg.seed, max_segments=self.max_segments())
        return (data.shapes_dataset(root, "train", train=True, crop=self.cfg.crop, load_image=self.needs_image,
                                    load_depth=self.needs_depth, cache_mb=self.cfg.data_cache_mb, **kw),
                data.shapes_dataset(root, "val", train=False, **kw))

    def data_root(self) -> Path:
        root = Path(self.cfg.data)
        if self.cfg.preset == "coco" and not (root.is_dir() and any(root.iterdir())):
            raise SystemExit(f"--data {root}: no such folder, or an empty one; the coco preset trains on COCO 2017 "
                             f"panoptic there (README, Real Stable Diffusion weights). Shapes is written to a missing "
                             f"--data only for the tiny and shapes presets")
        return data.ensure_shapes(root, size=max(self.cfg.image_size, 128), num_train=self.cfg.num_train,
                                  num_val=self.cfg.num_val, seed=0, log=self.log)

    def max_segments(self) -> int | None:
        return None

    def build(self) -> nn.Module:
        raise NotImplementedError

    def model_config(self) -> dict:
        """The built model's config as a plain dict (checkpoints rebuild the model from it)."""
        return dataclasses.asdict(self.mcfg)

    def checkpoint_extras(self) -> dict:
        """More checkpoint entries the stage's sampler needs besides the model (e.g. a frozen decoder)."""
        return {}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def preview(self, model: nn.Module, batch: dict) -> np.ndarray:
        raise NotImplementedError

    def finish(self, model: nn.Module, val: data.PanopticDataset, run_dir: Path) -> dict:
        return {}


def epoch_batches(num_items: int, batch: int, dist: Dist, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of epoch `epoch`: a permutation from (seed, epoch), split across ranks.

    A dataset smaller than one global batch is repeated (an honest way to train on 1 image).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    need = batch * dist.world
    perm = torch.randperm(num_items, generator=g)
    while len(perm) < need:
        perm = torch.cat([perm, torch.randperm(num_items, generator=g)])
    per_rank = perm[dist.rank::dist.world].tolist()
    n = len(perm) // need
    return [per_rank[i * batch:(i + 1) * batch] for i in range(n)]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epoch_keys(num_items: int, cfg: TrainConfig, dist: Dist, start: int):
    """This rank's batches of (epoch, index) keys from global step `start` on, epoch after epoch."""
    per_epoch = len(epoch_batches(num_items, cfg.batch_size, dist, cfg.seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        for b in epoch_batches(num_items, cfg.batch_size, dist, cfg.seed, epoch)[offset:]:
            yield [(epoch, i) for i in b]
        epoch, offset = epoch + 1, 0


def batch_stream(ds: data.PanopticDataset, cfg: TrainConfig, dist: Dist, device: torch.device, start: int):
    """Yield training batches from global step `start` on, in the same order as an uninterrupted run.

    One DataLoader for the whole run: each key carries its epoch, so the workers start once and keep
    prefetching across epoch ends, where a loader per epoch would restart them and drain its queue.
    """
    loader = torch.utils.data.DataLoader(ds, batch_sampler=epoch_keys(len(ds), cfg, dist, start),
                                         num_workers=cfg.num_workers, collate_fn=data.collate,
                                         pin_memory=device.type == "cuda")
    for b in loader:
        yield _to_device(b, device)


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits
    with status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), the shell's convention."""

    def __init__(self):
        self.stop = False
        self.signum = signal.SIGINT                           # the signal received, once stop is set
        self.old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:                                # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum, frame):
        self.stop, self.signum = True, signal.Signals(signum)

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log_line(step: int, terms: dict[str, float], lr: float, its: float, eta: float) -> str:
    """'step 000200 | loss 0.0912 (ce 0.0300, dice 0.0600) | lr 1.0e-04 | 14.2 it/s | eta 3m12s'"""
    rest = ", ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")
    return (f"step {step:06d} | loss {terms['loss']:.4f}" + (f" ({rest})" if rest else "")
            + f" | lr {lr:.1e} | {its:.2f} it/s | eta {format_eta(eta)}")


def save_preview(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Train one stage. Returns the final metrics (also written to <run>/metrics.json).

    given: the fields named on the command line, for --resume (resume_settings); None from Python.
    """
    cfg, notes = resume_settings(cfg, given) if cfg.resume else (resolve(cfg), [])
    run_dir = Path(cfg.out_dir)
    if not cfg.resume and (run_dir / "ckpt.pt").exists():       # never train over a run: nothing is lost
        raise SystemExit(_occupied(run_dir))
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(run_dir, dist.main)
    for note in notes:
        log(f"resuming with a changed setting: {note}")
    seed_everything(cfg.seed)
    stage = STAGES[cfg.stage](cfg, device, log)
    if dist.world > 1:                  # one writer: rank 0 writes Shapes where --data is missing, the rest wait
        import torch.distributed as tdist
        if dist.main:
            stage.data_root()
        tdist.barrier(group=dist.wait_group)
    model = stage.build().to(device)
    train_ds, val_ds = stage.datasets()
    train_ds.skip_bad = cfg.skip_bad_samples           # val stays strict: evaluation names a bad file
    opt = make_optimizer(model, cfg, device)
    # After build(): pretrained weights (a two-stream PDM's image stream and its copy) are already in,
    # so the EMA starts from them -- PDM's code copies its EMA before loading them [PDM brief §8.8].
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    start = _maybe_resume(cfg, model, opt, ema, log)
    if dist.main:
        data.write_json(run_dir / "config.json", {"train": dataclasses.asdict(cfg), "model": stage.model_config()})
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"stage {cfg.stage} | preset {cfg.preset} | {n_params / 1e6:.3f} M parameters "
        f"({n_train / 1e6:.3f} M trained) | device {device} | "
        f"{len(train_ds)} train / {len(val_ds)} val images | batch {cfg.batch_size} x {dist.world} | "
        f"steps {start} -> {cfg.max_steps}")
    step = _loop(cfg, stage, model, opt, ema, train_ds, val_ds, device, dist, run_dir, log, start)
    if step < cfg.max_steps:                                   # --stop-after: no final evaluation yet
        return {}
    return _finish(cfg, stage, model, opt, ema, val_ds, dist, run_dir, log, step)


def _occupied(run_dir: Path) -> str:
    """The message for a run folder that already holds a checkpoint: what the user can do with it."""
    try:
        ckpt = torch.load(run_dir / "ckpt.pt", map_location="meta", weights_only=True)
        step, done = ckpt.get("step"), bool(ckpt.get("metrics"))
    except Exception:
        step, done = None, False
    held = f"a finished run (step {step})" if done else f"a run stopped at step {step}" if step is not None else "a run"
    todo = (f"train it longer with --resume {run_dir} --max-steps N" if done else f"continue it with --resume {run_dir}")
    return (f"{run_dir} already holds {held}: {todo}, or start a new one with another --out-dir "
            f"(or delete the folder first)")


def _maybe_resume(cfg, model, opt, ema, log) -> int:
    """Load model, optimizer and EMA from --resume; return the step to continue from."""
    if not cfg.resume:
        return 0
    ckpt = load_checkpoint(cfg.resume, cfg.stage)
    old = ckpt.get("config") or {}
    differ = [f"--{k.replace('_', '-')} {old[k]} there, {getattr(cfg, k)} here"
              for k in ("preset", "image_size") if k in old and old[k] != getattr(cfg, k)]
    with weights_must_fit(cfg.resume, "this run's model" + (f" ({'; '.join(differ)})" if differ else "")):
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.shadow = {k: ckpt["ema"][k].float().to(v.device) for k, v in ema.shadow.items()}
        elif ema is not None:                     # an EMA turned on at resume starts from the loaded weights
            ema.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if k in ema.shadow}
    log(f"resumed from {cfg.resume} at step {ckpt['step']}")
    return int(ckpt["step"])


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm is inf / NaN, caught before AdamW: the weights are untouched."""


def _check_finite(terms: dict, model: nn.Module, dist: Dist, step: int) -> None:
    """The numerical guard before optimizer.step: raise NonFiniteStep (gradients cleared) on inf / NaN.

    Costs one host-device sync per step. bf16 autocast needs no loss scaling: bf16 keeps fp32's 8-bit
    exponent (largest value ~3.4e38, where fp16 stops at 65504) and the weights and gradients stay
    fp32, so overflow is as rare as in fp32 and this check is the whole guard. Under DDP the flag is
    all-reduced, so every rank skips or stops together.
    """
    norm = terms.get("grad_norm")
    if norm is None:                                      # --grad-clip 0: the norm only for the check
        grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros(())
    values = torch.stack([terms["loss"].detach().float(), norm.detach().float()])
    bad = (~torch.isfinite(values)).float()
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
    if bad.any():
        model.zero_grad(set_to_none=True)
        loss, norm = values.tolist()
        raise NonFiniteStep(f"step {step + 1:06d}: non-finite loss ({loss:.4g}) or gradient norm ({norm:.4g})")


def _train_step(cfg, stage, model, fwd, opt, ema, batch, step, dist, amp) -> dict[str, torch.Tensor]:
    """One optimisation step: forward under autocast, backward, clip, the non-finite guard, AdamW, EMA."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    device = batch["segments"].device
    gen = step_generator(cfg.seed, dist.rank, step, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        terms = stage.loss(fwd, batch, gen)
    terms["loss"].backward()
    if cfg.grad_clip:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
    _check_finite(terms, model, dist, step)               # before AdamW and the EMA see a NaN
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step)
    return {k: v.detach() for k, v in terms.items()}


def _kept_checkpoint(run_dir: Path) -> str:
    """'runs/x/ckpt.pt (step 200)' or 'no checkpoint in runs/x yet': what a stopped run leaves to resume."""
    p = Path(run_dir) / "ckpt.pt"
    try:
        return f"{p} (step {torch.load(p, map_location='meta', weights_only=True)['step']})"
    except Exception:                                     # absent or unreadable: either way nothing to resume
        return f"no checkpoint in {run_dir} yet"


class FaultLog:
    """What training recovered from, counted per invocation and appended to every log line.

    bad samples skipped       items replaced under --skip-bad-samples (data.PanopticDataset.skip_bad)
    segments dropped          segments over the model's id capacity made void (data.cap_segments)
    non-finite steps skipped  steps left out under --skip-nonfinite
    Counts come from this rank's batches (rank 0 logs); a resumed run starts from 0.
    """

    def __init__(self, log: Logger):
        self.log, self.seen = log, set()
        self.counts = {"bad samples skipped": 0, "segments dropped": 0, "non-finite steps skipped": 0}

    def note_batch(self, batch: dict) -> None:
        """Count what the dataset reported for this batch; log each bad file the first time it is skipped."""
        for msg in (m for ms in batch.get("skipped", ()) for m in ms):
            self.counts["bad samples skipped"] += 1
            if msg not in self.seen:
                self.seen.add(msg)
                self.log(f"--skip-bad-samples: {msg}; replaced by the next good item")
        dropped = sum(batch.get("dropped_segments", ()))
        if dropped and not self.counts["segments dropped"]:
            self.log("images with more segments than the model's id capacity: the smallest segments are "
                     "made void (data.cap_segments), counted in the log lines")
        self.counts["segments dropped"] += dropped

    def nonfinite(self, exc: NonFiniteStep, budget: int, run_dir: Path) -> None:
        """Count a skipped step; past --skip-nonfinite stop (SystemExit), keeping the last good checkpoint."""
        self.counts["non-finite steps skipped"] += 1
        n = self.counts["non-finite steps skipped"]
        if n <= budget:
            self.log(f"{exc}: step skipped, no update ({n} of --skip-nonfinite {budget})")
            return
        msg = (f"{exc}: stopping; the weights were not updated by it. Kept: {_kept_checkpoint(run_dir)}. "
               f"Try a lower --lr, --dtype fp32, or --skip-nonfinite N to skip up to N such steps")
        self.log(msg)
        raise SystemExit(msg)

    def suffix(self) -> str:
        """' | 2 bad samples skipped, 1 non-finite steps skipped' -- empty while nothing happened."""
        parts = [f"{n} {name}" for name, n in self.counts.items() if n]
        return " | " + ", ".join(parts) if parts else ""


def _bad_sample(exc: data.PanopticFormatError, step: int, run_dir: Path, log: Logger) -> data.PanopticFormatError:
    """The error that stops training at a bad file (--skip-bad-samples off), logged, with what to do.

    A DataLoader worker's error arrives with the worker's traceback in its text: keep its last line.
    """
    text = str(exc).strip().splitlines()[-1].split("PanopticFormatError: ", 1)[-1]
    msg = (f"{text}\nstopped before step {step + 1}; kept: {_kept_checkpoint(run_dir)}. Fix or remove the "
           f"file and --resume {run_dir}, or pass --skip-bad-samples to replace bad samples (counted in the log)")
    log(msg)
    return data.PanopticFormatError(msg)


def _save_or_warn(cfg, stage, model, opt, ema, step, run_dir, log) -> None:
    """A periodic checkpoint; one that cannot be written (e.g. a full disk) is logged and training goes on.

    Safe because save_checkpoint leaves the previous checkpoint intact; the next periodic checkpoint
    tries again. The final, --stop-after and signal checkpoints are not optional: they stop the run.
    """
    try:
        _save(cfg, stage, model, opt, ema, step, run_dir)
    except CheckpointWriteError as exc:
        log(f"{exc}; training continues and tries again at step {min(step + cfg.ckpt_every, cfg.max_steps)}")


def _loop(cfg, stage, model, opt, ema, train_ds, val_ds, device, dist, run_dir, log, start) -> int:
    """Steps start..max_steps with logging, previews, checkpoints and a clean stop on SIGINT / SIGTERM.

    Previews show the first 4 val images (unseen, uncropped, and with every field a preview draws).
    """
    fwd = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(cfg, device)
    stream = batch_stream(train_ds, cfg, dist, device, start)
    t0, sums, count, step = time.time(), {}, 0, start
    faults = FaultLog(log)
    preview_batch = (_to_device(data.collate([val_ds[i] for i in range(min(4, len(val_ds)))]), device)
                     if dist.main and len(val_ds) else None)
    stopper = StopFlag()              # installed just before the try whose finally restores the handlers
    try:
        for step in range(start, cfg.max_steps):
            try:
                batch = next(stream)
            except data.PanopticFormatError as exc:           # --skip-bad-samples off: stop, naming the file
                if dist.main and step > start:
                    _save(cfg, stage, model, opt, ema, step, run_dir)
                raise _bad_sample(exc, step, run_dir, log) from None
            faults.note_batch(batch)
            try:
                terms = _train_step(cfg, stage, model, fwd, opt, ema, batch, step, dist, amp)
            except NonFiniteStep as exc:
                faults.nonfinite(exc, cfg.skip_nonfinite, run_dir)    # SystemExit past --skip-nonfinite
                terms = {}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            count += bool(terms)
            done = step + 1
            if count and (done % cfg.log_every == 0 or done == cfg.max_steps):
                avg = {k: (v / count).item() for k, v in sums.items()}
                its = (done - start) / (time.time() - t0)
                log(log_line(done, avg, lr_at(step, cfg), its, (cfg.max_steps - done) / max(its, 1e-9)) + faults.suffix())
                sums, count = {}, 0
            if preview_batch is not None and cfg.preview_every and done % cfg.preview_every == 0:
                _preview(stage, model, ema, preview_batch, run_dir / f"preview_{done:06d}.png")
            if dist.main and done % cfg.ckpt_every == 0 and done < cfg.max_steps:
                _save_or_warn(cfg, stage, model, opt, ema, done, run_dir, log)
            step = done
            if stopper.stop:
                log(f"stopped by {stopper.signum.name} at step {done}; saving a checkpoint (resume with --resume {run_dir})")
                if dist.main:
                    _save(cfg, stage, model, opt, ema, done, run_dir)
                raise SystemExit(128 + stopper.signum)
            if cfg.stop_after and done - start >= cfg.stop_after and done < cfg.max_steps:
                log(f"--stop-after {cfg.stop_after}: stopping at step {done} (continue with --resume {run_dir})")
                if dist.main:
                    _save(cfg, stage, model, opt, ema, done, run_dir)
                return step
    finally:
        stopper.restore()
    if preview_batch is not None:
        _preview(stage, model, ema, preview_batch, run_dir / "preview_final.png")
    return step


def _ema_model(model: nn.Module, ema: EMA | None) -> nn.Module:
    """A copy of the model holding the EMA weights (the model itself when EMA is off)."""
    if ema is None:
        return model
    import copy
    m = copy.deepcopy(model)
    ema.copy_to(m)
    return m


@torch.no_grad()
def _preview(stage, model, ema, batch, path) -> None:
    m = _ema_model(model, ema).eval()
    save_preview(stage.preview(m, batch), path)
    model.train()


def _save(cfg, stage, model, opt, ema, step, run_dir, metrics=None) -> None:
    save_checkpoint(run_dir / "ckpt.pt", {
        **stage.checkpoint_extras(),
        "stage": cfg.stage, "step": step, "config": dataclasses.asdict(cfg),
        "model_config": stage.model_config(), "model": model.state_dict(),
        "ema": ema.state_dict_of(model) if ema is not None else None, "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()}, "metrics": metrics or {}})


def _finish(cfg, stage, model, opt, ema, val_ds, dist, run_dir, log, step) -> dict:
    """Final checkpoint, the stage's evaluation on val (EMA weights), metrics.json."""
    metrics = {}
    if dist.main:
        _save(cfg, stage, model, opt, ema, step, run_dir)
        m = _ema_model(model, ema).eval()
        with torch.no_grad():
            metrics = stage.finish(m, val_ds, run_dir)
        _save(cfg, stage, model, opt, ema, step, run_dir, metrics)   # model_config may have gained e.g. a scale
        data.write_json(run_dir / "metrics.json", metrics)
        if metrics:
            log("final | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        log(f"checkpoint: {run_dir / 'ckpt.pt'}")
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.barrier(group=dist.wait_group)                 # see EVAL_WAIT_TIMEOUT_S
    return metrics


# -----------------------------------------------------------------------------
# 5. Stages
# -----------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 pictures into one picture, rows x columns."""
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)


def val_batches(ds: data.PanopticDataset, batch_size: int, limit: int = 0):
    """Evaluation batches in dataset order (the first `limit` images; 0 = all)."""
    n = len(ds) if not limit else min(limit, len(ds))
    for lo in range(0, n, batch_size):
        yield data.collate([ds[i] for i in range(lo, min(lo + batch_size, n))])


class ImageAEStage(Stage):
    """The image autoencoder (SD KL-f8 architecture), trained when no SD VAE weights are given.

    It stands in for SD's frozen VAE on Shapes; at the end its latent scale factor is measured as
    1 / std of the posterior means on val -- how SD's 0.18215 was obtained [LDM §4.3.2 / App.].
    """
    name = "vae"

    def build(self) -> nn.Module:
        import ldmseg
        self.mcfg = ldmseg.ImageAEConfig.preset(self.cfg.preset)
        return ldmseg.ImageAutoencoder(self.mcfg)

    def loss(self, model, batch, generator):
        import ldmseg
        recon, mean, logvar = model(batch["image"], generator=generator)
        return ldmseg.vae_loss(recon, batch["image"], mean, logvar, self.mcfg.kl_weight)

    def preview(self, model, batch) -> np.ndarray:
        """Rows: image | reconstruction."""
        recon = model(batch["image"], sample_posterior=False)[0]
        return grid([[to_uint8(x), to_uint8(r)] for x, r in zip(batch["image"], recon)])

    def finish(self, model, val, run_dir) -> dict:
        """PSNR of reconstructions on val and the latent scale factor 1 / std(mean)."""
        latents, se, n = [], 0.0, 0
        for b in val_batches(val, self.cfg.batch_size, self.cfg.eval_images):
            x = b["image"].to(self.device)
            mean = model.encode_mean(x)
            recon = model.decode(mean).clamp(-1, 1)
            mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)             # in [0, 1] units
            se += (10 * torch.log10(1 / mse.clamp_min(1e-10))).sum().item()
            n += len(x)
            latents.append(mean.float().cpu())
        std = torch.cat(latents).std().item()
        self.mcfg.scale_factor = 1.0 / std
        return {"psnr": se / n, "latent_std": std, "scale_factor": self.mcfg.scale_factor}


class MaskAEStage(Stage):
    """LDMSeg stage 1: the shallow mask autoencoder on randomly remapped ids.  [LDMSeg §3.1]"""
    name = "1"
    needs_image = False                                     # ids in, ids out

    def build(self) -> nn.Module:
        """The preset's autoencoder, or on --resume the run's own (a preset changed since must not
        change a run midway; a --latent-noise that disagrees with it is refused)."""
        import ldmseg
        noise = self.cfg.latent_noise if self.cfg.latent_noise >= 0 else None
        if self.cfg.resume:
            self.mcfg = ldmseg.MaskAEConfig(**load_checkpoint(self.cfg.resume, self.cfg.stage)["model_config"])
            refuse_other_model(self.cfg.resume, self.mcfg, {"latent_noise": ("--latent-noise", noise)})
        else:
            self.mcfg = ldmseg.MaskAEConfig.preset(self.cfg.preset)
            if noise is not None:
                self.mcfg.latent_noise = noise
        return ldmseg.MaskAutoencoder(self.mcfg)

    def max_segments(self) -> int:
        return 2 ** self.mcfg.num_bits - 1

    def loss(self, model, batch, generator):
        import ldmseg
        K = self.mcfg.num_bits
        ids = data.remap_ids(batch["segments"], K, generator)            # PAPER: fresh random ids per sample
        logits, mean, logvar = model(data.ids_to_bits(ids, K), generator=generator,
                                     sample_posterior=self.mcfg.sample_posterior, latent_noise=self.mcfg.latent_noise)
        return ldmseg.mask_ae_loss(logits.float(), ids, mean.float(), logvar.float(), self.mcfg, generator)

    def reconstruct(self, model, segments: torch.Tensor) -> torch.Tensor:
        """ids (B, H, W) -> bits -> encoder mean -> decoder -> ids (B, H, W), 0 = void.

        Decoded with LDMSeg's thresholds (confidence, area, overlap), as its AE evaluation does and
        as stage 2 decodes [LDMSeg brief §4.5], so stage-1 PQ bounds what stage 2 can reach.
        """
        import ldmseg
        bits = data.ids_to_bits(segments, self.mcfg.num_bits)
        mean, _ = model.encode(bits)
        return ldmseg.panoptic_from_logits(model.decode_full(mean, segments.shape[-2:]))

    def preview(self, model, batch) -> np.ndarray:
        """Rows: image | ground truth | reconstruction."""
        rec = self.reconstruct(model, batch["segments"])
        return grid([[to_uint8(x), data.colorize(s), data.colorize(r)]
                     for x, s, r in zip(batch["image"], batch["segments"], rec)])

    def finish(self, model, val, run_dir) -> dict:
        """Class-agnostic PQ and mean IoU of id -> AE -> decoded reconstructions on val."""
        import evaluate
        acc = evaluate.PQAccumulator(None, class_agnostic=True)
        ious, latents = [], []
        for b in val_batches(val, self.cfg.batch_size, self.cfg.eval_images):
            seg = b["segments"].to(self.device)
            latents.append(model.encode(data.ids_to_bits(seg, self.mcfg.num_bits))[0].float().cpu())
            rec = self.reconstruct(model, seg).cpu()
            for gt, pr, info in zip(b["segments"], rec, b["segments_info"]):
                acc.add(gt, info, pr, data.make_segments_info(pr.numpy()))
                ious.append(segment_miou(gt, pr))
        res = acc.compute()["All"]
        # DEVIATION: diffusion sees s_t * mean with s_t = 1 / std, measured here: unit-variance
        # latents, as SD's 0.18215 made its image latents. LDMSeg reuses 0.18215 for its own AE.
        std = torch.cat(latents).std().item()
        self.mcfg.scale_factor = 1.0 / std
        return {"pq": res["pq"], "sq": res["sq"], "rq": res["rq"], "miou": float(np.mean(ious)),
                "latent_std": std, "scale_factor": self.mcfg.scale_factor}


def segment_miou(gt: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over the ground-truth segments of IoU(gt == k, pred == k) -- ids must correspond."""
    ids = [k for k in gt.unique().tolist() if k != 0]
    if not ids:
        return 1.0
    return float(np.mean([((gt == k) & (pred == k)).sum().item() / ((gt == k) | (pred == k)).sum().item()
                          for k in ids]))


def prerequisite(cfg: TrainConfig, stage: str, path: str, log: Logger, carry: tuple[str, ...] = ()) -> dict:
    """The checkpoint of an earlier stage: `path` if given, else runs/<preset>/<stage>, trained now if missing.

    carry: more fields of `cfg` the earlier run must share (t2i: the image autoencoder, image size).
    """
    if path:
        return load_checkpoint(path, stage)
    sub = TrainConfig(stage=stage, preset=cfg.preset, data=cfg.data, seed=cfg.seed, device=cfg.device,
                      dtype=cfg.dtype, compile=cfg.compile, num_workers=cfg.num_workers,
                      data_cache_mb=cfg.data_cache_mb, num_train=cfg.num_train, num_val=cfg.num_val)
    sub = dataclasses.replace(sub, **{k: getattr(cfg, k) for k in carry})
    run = Path(resolve(sub).out_dir)
    if not (run / "ckpt.pt").exists():
        log(f"no stage-{stage} run in {run}: training it first")
        with global_rng_kept():
            train(sub)
    elif not load_checkpoint(run, stage).get("metrics"):          # stopped early (Ctrl-C, --stop-after)
        log(f"an unfinished stage-{stage} run in {run}: resuming it first")
        with global_rng_kept():
            train(dataclasses.replace(sub, resume=str(run)))
    else:
        log(f"reusing the stage-{stage} run in {run}")
    return load_checkpoint(run, stage)


def refuse_other_model(resume: str, config, given: dict[str, tuple[str, Any]]) -> None:
    """On --resume: SystemExit when a model flag given here disagrees with the run's model config.

    given: config field -> (flag, the value given, or None when the flag was left unset).
    """
    differ = [f"{flag} {value} here, {getattr(config, field)} there"
              for field, (flag, value) in given.items() if value is not None and value != getattr(config, field)]
    if differ:
        raise SystemExit(f"--resume {resume}: the run was trained with another model ({'; '.join(differ)})")


def _is_run(path: str) -> bool:
    """True for a run folder (holding ckpt.pt) or a checkpoint file of this project."""
    p = Path(path)
    if p.is_dir():
        return (p / "ckpt.pt").exists()
    if p.suffix == ".pt" and p.is_file():
        try:
            return torch.load(p, map_location="meta", weights_only=True).get("format") == CKPT_FORMAT
        except Exception:
            return False
    return False


class LatentStage(Stage):
    """What LDMSeg's stage 2 and PDM share: a frozen image autoencoder and a cache of its encodings.

    Subclasses define `encode_image(images)`: the tensor the cache keeps per item (LDMSeg: the
    scaled posterior mean; PDM: the posterior moments, sampled afresh every step).
    """
    sd_scale: float | None = None       # latent scale with Stable Diffusion's VAE; None = SD's 0.18215

    def image_autoencoder(self) -> tuple[dict, dict]:
        """(config, weights) of the frozen image AE: a run of --stage vae, or SD's VAE from its weights.

        PAPER: with SD weights LDMSeg's latent scale is SD's 0.18215 [LDMSeg brief §3.1], PDM's
        `sd_scale`; a VAE trained here carries the scale measured at the end of its run.
        """
        import ldmseg
        src = self.cfg.image_vae
        if src and not _is_run(src):
            ae = ldmseg.load_image_autoencoder(src, ldmseg.ImageAEConfig.preset(self.cfg.preset))
            config = dataclasses.replace(ae.config, scale_factor=self.sd_scale or ae.config.scale_factor)
            self.log(f"image autoencoder: Stable Diffusion weights from {src} (scale {config.scale_factor})")
            return dataclasses.asdict(config), ae.state_dict()
        if not src and self.cfg.preset == "coco":
            raise SystemExit("the coco recipe uses Stable Diffusion's VAE: pass --image-vae PATH "
                             "(sd-v1-4.ckpt, a .safetensors file or a diffusers folder); see README")
        vae = prerequisite(self.cfg, "vae", src, self.log)
        return vae["model_config"], vae["ema"] or vae["model"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_latents(self, batch) -> torch.Tensor:
        """encode_image of a batch, cached per (item, flip) while the cache stays under 1 GiB.

        The image AE is frozen and an uncropped item is fixed by its index and flip, so this is the
        encoding itself, to the last bits of the batch it was first encoded in (a resumed run refills
        the cache in other batches: about 1e-7). On Shapes it removes the image encoder from every step
        after the first epoch.
        """
        if self.cfg.crop:
            return self.encode_image(batch["image"])
        cache = self.__dict__.setdefault("_latents", {})
        keys = list(zip(batch["index"], batch["flipped"]))
        missing = [k for k, key in enumerate(keys) if key not in cache]
        if missing:
            z = self.encode_image(batch["image"][missing]).float()
            if len(cache) * z[0].numel() * 4 < 2 ** 30:
                cache.update({keys[k]: z[j] for j, k in enumerate(missing)})
            else:
                return self.encode_image(batch["image"]).float()
        return torch.stack([cache[key] for key in keys])


class LDMSegStage(LatentStage):
    """LDMSeg stage 2: the image-conditioned latent diffusion model.  [LDMSeg §3]"""
    name = "2"

    def build(self) -> nn.Module:
        import ldmseg
        if self.cfg.resume:
            return self._resumed_network()
        image_cfg, image_state = self.image_autoencoder()
        mae = prerequisite(self.cfg, "1", self.cfg.mask_ae, self.log)
        self.mcfg = dataclasses.replace(self.base_config(), mask_ae=mae["model_config"], image_ae=image_cfg)
        if self.cfg.prediction:
            self.mcfg.prediction = self.cfg.prediction
        if self.cfg.signal_scale:
            self.mcfg.signal_scale = self.cfg.signal_scale
        if self.cfg.id_order:
            self.mcfg.id_order = self.cfg.id_order
        if self.cfg.time_shift >= 0:
            self.mcfg.time_shift = self.cfg.time_shift
        elif self.mcfg.prediction != self.base_config().prediction:
            self.mcfg.time_shift = 0              # the preset's shift was chosen for its own output type
        if self.mcfg.prediction != self.base_config().prediction:
            self.mcfg.clamp_x0 = False            # so was its clamping (ldmseg.py section 8)
            self.mcfg.decoded_ce_weight = 0.0     # and its decoded loss, which needs x0
            self.mcfg.area_weight_power = 0.0     # and its loss weights, measured with x0 only
        if self.cfg.decoded_ce_weight >= 0:
            self.mcfg.decoded_ce_weight = self.cfg.decoded_ce_weight
        if self.mcfg.decoded_ce_weight and self.mcfg.prediction != "x0":
            raise SystemExit("--decoded-ce-weight needs the x0 prediction (--prediction x0; ldmseg.py section 8)")
        if self.cfg.area_weight_power >= 0:
            self.mcfg.area_weight_power = self.cfg.area_weight_power
        if self.mcfg.prediction != "x0" or self.mcfg.id_order != "random":
            self.mcfg.match_ids = False           # renaming needs an x0 estimate and random ids (ldmseg.py section 8)
        if self.cfg.match_ids:
            self.mcfg.match_ids = self.cfg.match_ids == "on"
        if self.mcfg.match_ids and (self.mcfg.prediction != "x0" or self.mcfg.id_order != "random"):
            raise SystemExit("--match-ids on needs the x0 prediction and random ids (--prediction x0, --id-order "
                             "random; ldmseg.py section 8)")
        if self.cfg.attention_levels:
            levels = attention_levels(self.cfg.attention_levels, self.mcfg.unet)
            self.mcfg.unet = dataclasses.replace(self.mcfg.unet, attention_levels=levels)
        self.net = ldmseg.LDMSeg(self.mcfg)
        self.net.image_ae.load_state_dict(image_state)                   # frozen
        self.net.mask_ae.load_state_dict(mae["ema"] or mae["model"])     # the EMA weights, frozen
        if self.cfg.init_unet:
            frozen = ldmseg.init_ldmseg_unet_from_sd(self.net, ldmseg.load_weights(self.cfg.init_unet, component="unet"))
            self.log(f"UNet initialised from {self.cfg.init_unet}; frozen: {', '.join(frozen)}")
        return self.net

    def _resumed_network(self) -> nn.Module:
        """On --resume, the run's own model config (autoencoders, latent scales, output type...); the
        loop then loads its weights, the frozen autoencoders' included. No prerequisite is read: one
        trained again or pointed to elsewhere since must not change a run midway."""
        import ldmseg
        ckpt = load_checkpoint(self.cfg.resume, self.cfg.stage)
        self.mcfg = ldmseg.LDMSegConfig(**ckpt["model_config"])
        c = self.cfg                                       # the model flags given (unset: "", 0 or -1)
        refuse_other_model(c.resume, self.mcfg, {
            "prediction": ("--prediction", c.prediction or None),
            "signal_scale": ("--signal-scale", c.signal_scale or None),
            "id_order": ("--id-order", c.id_order or None),
            "time_shift": ("--time-shift", c.time_shift if c.time_shift >= 0 else None),
            "decoded_ce_weight": ("--decoded-ce-weight", c.decoded_ce_weight if c.decoded_ce_weight >= 0 else None),
            "area_weight_power": ("--area-weight-power", c.area_weight_power if c.area_weight_power >= 0 else None),
            "match_ids": ("--match-ids", c.match_ids == "on" if c.match_ids else None)})
        refuse_other_model(c.resume, self.mcfg.unet, {"attention_levels": (
            "--attention-levels", attention_levels(c.attention_levels, self.mcfg.unet) if c.attention_levels else None)})
        self.net = ldmseg.LDMSeg(self.mcfg)
        if (ckpt.get("config") or {}).get("init_unet"):              # started from SD: its time embedding
            ldmseg.freeze_time_embedding(self.net)                      # stays frozen (optimizer, EMA alike)
        return self.net

    def base_config(self) -> "ldmseg.LDMSegConfig":
        """The preset's model config, before the trained autoencoders' configs are put in."""
        import ldmseg
        return ldmseg.LDMSegConfig.preset(self.cfg.preset)

    def max_segments(self) -> int:
        return 2 ** self.mcfg.mask_ae.num_bits - 1

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(images)                             # s_i * posterior mean

    def loss(self, model, batch, generator):
        import ldmseg
        ids = data.order_ids(batch["segments"], self.mcfg.mask_ae.num_bits, self.mcfg.id_order, generator)  # PAPER: random
        z0, z_image = self.net.encode_ids(ids), self.image_latents(batch)
        valid = ldmseg.area_weighted_mask(batch["segments"], *z0.shape[-2:], self.mcfg.area_weight_power)
        return ldmseg.ldmseg_loss(model, self.mcfg, self.net.schedule, z0.float(), z_image.float(), valid, generator,
                                  ids=ids, net=self.net)

    def preview(self, model, batch) -> np.ndarray:
        """Rows: image | ground truth | DDIM-20 sample (fixed generator)."""
        import ldmseg
        pred = ldmseg.segment(model, batch["image"], steps=20, generator=torch.Generator().manual_seed(0))
        return grid([[to_uint8(x), data.colorize(s), data.colorize(p)]
                     for x, s, p in zip(batch["image"], batch["segments"], pred)])

    def finish(self, model, val, run_dir) -> dict:
        """Class-agnostic PQ on val: DDIM (eval_steps) and DPM-Solver++ (eval_dpm_steps)."""
        import evaluate
        out = {}
        for sampler, steps in (("ddim", self.cfg.eval_steps), ("dpm++", self.cfg.eval_dpm_steps)):
            res = evaluate.evaluate_segmentation(model, val, sampler=sampler, steps=steps, batch_size=self.cfg.batch_size,
                                                 limit=self.cfg.eval_images, device=self.device,
                                                 pictures=run_dir / f"val_{sampler}{steps}" if sampler == "ddim" else None)
            out.update({f"{k}_{sampler}{steps}": v for k, v in res.items()})
        return out


def attention_levels(text: str, unet) -> tuple[bool, ...]:
    """--attention-levels '1,1,1' -> (True, True, True): one 0 / 1 per level of `unet` (a UNetConfig), finest
    first; a clear exit when the count differs."""
    levels = tuple(x.strip() == "1" for x in text.split(","))
    if len(levels) != len(unet.block_out_channels):
        raise SystemExit(f"--attention-levels {text!r}: this UNet has {len(unet.block_out_channels)} levels, "
                         f"give a 0 or 1 for each (finest first)")
    return levels


def parse_tasks(text: str) -> tuple[str, ...]:
    """'semantic,depth' -> ('semantic', 'depth') in ldmseg.TASKS order; a clear exit on unknown names."""
    import ldmseg
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ldmseg.TASKS]
    if not names or unknown:
        raise SystemExit(f"--tasks {text!r}: choose one or more of {','.join(ldmseg.TASKS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(t for t in ldmseg.TASKS if t in names)


def parse_task_values(text: str, names: tuple[str, ...], flag: str, hint: str = "") -> dict[str, float]:
    """'semantic=1,depth=0.5' -> {'semantic': 1.0, 'depth': 0.5} for task names in `names`, values > 0;
    a clear exit naming `flag` on anything else."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = (x.strip() for x in item.partition("="))
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if name not in names or not v > 0:
            raise SystemExit(f"{flag} {text!r}: give TASK=VALUE pairs, TASK in {', '.join(names)}, VALUE > 0{hint}")
        out[name] = v
    return out


def parse_signal_scales(text: str) -> dict[str, float]:
    """--task-signal-scales: 'semantic=1,depth=0.5' -> {'semantic': 1.0, 'depth': 0.5}."""
    import ldmseg
    return parse_task_values(text, ldmseg.OWN_SCALE_TASKS, "--task-signal-scales",
                             " (instance is stage 2's latent and keeps --signal-scale)")


def parse_loss_weights(text: str) -> dict[str, float]:
    """--task-loss-weights: 'depth=10' -> {'depth': 10.0}."""
    import ldmseg
    return parse_task_values(text, ldmseg.TASKS, "--task-loss-weights")


class MultiTaskStage(LDMSegStage):
    """Multi-task LDMSeg: one UNet for instance, semantic and depth latents, told apart by learnable
    task embeddings.  [LDMSeg §6; ldmseg.py §10]

    Stage 2 with another model config (ldmseg.multitask_config: the tasks, cross-attention), other
    targets (each sample's task drawn by ldmseg.sample_tasks) and another evaluation; the image AE,
    the mask AE, the latent cache and the build are stage 2's. The dataset's categories travel in the
    checkpoint: the merge rule and class-aware PQ need to know which are things.
    """
    name = "multitask"
    needs_depth = True

    def base_config(self) -> "ldmseg.LDMSegConfig":
        import ldmseg
        config = ldmseg.multitask_config(self.cfg.preset)
        if self.cfg.tasks:
            config = dataclasses.replace(config, tasks=parse_tasks(self.cfg.tasks))
        if self.cfg.depth_subcells:
            config.depth_subcells = self.cfg.depth_subcells
        if self.cfg.task_signal_scales:
            config.task_signal_scales = parse_signal_scales(self.cfg.task_signal_scales)   # replaces the preset's
        if self.cfg.task_loss_weights:
            config.task_loss_weights = parse_loss_weights(self.cfg.task_loss_weights)
        if self.cfg.task_sample_weights:
            config.task_sample_weights = parse_task_values(self.cfg.task_sample_weights, ldmseg.TASKS,
                                                           "--task-sample-weights")
        return config

    def datasets(self) -> tuple[data.PanopticDataset, data.PanopticDataset]:
        """Stage 2's datasets, checked for what the tasks need: depth maps, category ids the mask AE holds."""
        train_ds, val_ds = super().datasets()
        top = 2 ** self.mcfg.mask_ae.num_bits - 1
        if max(train_ds.categories) > top:
            raise SystemExit(f"{self.cfg.data}: category ids reach {max(train_ds.categories)}, but the semantic task "
                             f"encodes them with the {self.mcfg.mask_ae.num_bits}-bit mask autoencoder (ids <= {top})")
        if "depth" in self.mcfg.tasks and (train_ds.files.depth_dir is None or val_ds.files.depth_dir is None):
            raise SystemExit(f"{self.cfg.data}: the depth task needs depth maps (a depth/<split>/ folder of "
                             f"uint16 millimetre PNGs, as Shapes has)")
        self.categories = list(train_ds.categories.values())
        return train_ds, val_ds

    def checkpoint_extras(self) -> dict:
        return {"categories": self.categories}

    def loss(self, model, batch, generator):
        import ldmseg
        targets = {k: batch.get(k) for k in ("segments", "category", "depth")}
        return ldmseg.multitask_loss(model, self.net, self.image_latents(batch).float(), targets, generator)

    def preview(self, model, batch) -> np.ndarray:
        """Rows: image | semantic truth | semantic | instance | class-aware merge | depth truth | depth
        (DDIM 20, fixed generator); the columns of tasks the model lacks are left out."""
        import ldmseg
        out = ldmseg.predict_tasks(model, batch["image"], steps=20, generator=torch.Generator().manual_seed(0))
        rows = []
        for k, x in enumerate(batch["image"]):
            row = [to_uint8(x)]
            if "semantic" in out:
                row += [data.colorize(batch["category"][k]), data.colorize(out["semantic"][k])]
            if "instance" in out:
                row += [data.colorize(out["instance"][k])]
            if "instance" in out and "semantic" in out:
                row += [data.colorize(ldmseg.merge_panoptic(out["instance"][k], out["semantic"][k], self.categories)[0])]
            if "depth" in out:
                row += [ldmseg.depth_picture(d, self.mcfg.depth_range).numpy() for d in (batch["depth"][k], out["depth"][k])]
            rows.append(row)
        return grid(rows)

    def finish(self, model, val, run_dir) -> dict:
        """On val (DDIM eval_steps): class-aware PQ (All / Things / Stuff) of the merged maps,
        class-agnostic PQ of the instance task, semantic mIoU, depth AbsRel / RMSE / delta < 1.25."""
        import evaluate
        return evaluate.evaluate_multitask(model, val, self.categories, steps=self.cfg.eval_steps,
                                           batch_size=self.cfg.batch_size, limit=self.cfg.eval_images,
                                           device=self.device, pictures=run_dir / f"val_ddim{self.cfg.eval_steps}")


class CaptionStage(LatentStage):
    """What PDM's trainings share (CogenStage, T2IStage): captioned images, the word vocabulary, a
    U-ViT rebuilt from its saved config on --resume.  [PDM brief §2]

    The frozen image autoencoder (a --stage vae run, or SD's VAE with PDM's scale) encodes the
    images and decodes the samples; it travels in the checkpoint with the dataset's categories, and
    the word vocabulary travels in the model config, so `cogen.load_pdm(ckpt)` and
    `cogen.load_image_ae(ckpt)` need nothing but the checkpoint. Subclasses set `arch` (the
    PDMConfig.arch they train) and build a fresh network in `fresh_network()`.
    """
    arch = ""
    resumed: dict | None = None          # the checkpoint of --resume, once build() has read it
    # PAPER: U-ViT's MS-COCO scale for SD's VAE latents (1 / their std on COCO) [PDM brief §2.2,
    # U-ViT issue #17]; SD itself uses 0.18215.
    sd_scale = 0.23010

    def datasets(self) -> tuple[data.PanopticDataset, data.PanopticDataset]:
        """Built once (build() reads the captions). PAPER: centre crops, no flips [PDM brief §2.1-2.2]:
        PDM encodes every image once, and a flip would contradict captions that say left or right."""
        if "_datasets" not in self.__dict__:
            import cogen
            pdm = cogen.PDMConfig.preset(self.cfg.preset)
            kw = dict(size=self.cfg.image_size, seed=self.cfg.seed, resize_mode="center_crop", hflip=False,
                      max_segments=2 ** pdm.instance_bits - 1 if pdm.panoptic or self.cfg.panoptic_map else None)
            root = self.data_root()
            self._datasets = (data.shapes_dataset(root, "train", train=True, load_depth=self.needs_depth,
                                                  cache_mb=self.cfg.data_cache_mb, **kw),
                              data.shapes_dataset(root, "val", train=False, **kw))
        return self._datasets

    def build(self) -> nn.Module:
        """The network: fresh_network(), or on --resume the run's own (image AE, config; the loop
        then loads its weights) -- no prerequisite is read again."""
        import cogen
        if not self.cfg.resume:
            self.net = self.fresh_network()
            return self.net
        self.resumed = load_checkpoint(self.cfg.resume, self.cfg.stage)
        self.set_image_ae(self.resumed["image_ae"]["config"], self.resumed["image_ae"]["weights"])
        self.mcfg = cogen.PDMConfig(**self.resumed["model_config"])
        if self.mcfg.arch != self.arch:
            raise SystemExit(f"--resume {self.cfg.resume}: a {self.mcfg.arch} run, but these flags train "
                             f"a {self.arch} model (--two-stream or not?)")
        c = self.cfg                                       # the model flags given (unset: 0, False, -1)
        refuse_other_model(c.resume, self.mcfg, {
            "patch_factor": ("--patch-factor", c.patch_factor or None),
            "panoptic": ("--panoptic-map", True if c.panoptic_map else None),
            "clean_map_prob": ("--clean-map-prob", c.clean_map_prob if c.clean_map_prob >= 0 else None)})
        self.net = cogen.build_model(self.mcfg)
        return self.net

    def fresh_network(self) -> nn.Module:
        raise NotImplementedError

    def set_image_ae(self, config: dict, weights: dict) -> None:
        """The frozen image autoencoder, in eval mode on the training device."""
        import ldmseg
        self.image_ae = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig(**config)).requires_grad_(False)
        self.image_ae.load_state_dict(weights)
        self.image_ae.eval().to(self.device)

    def vocabulary(self) -> list[str]:
        """WordTokenizer.build over every training caption (words seen < min_word_count -> <unk>)."""
        import cogen
        captions = [c for caps in self.datasets()[0].captions.values() for c in caps if c]
        if not captions:
            raise SystemExit(f"{self.cfg.data}: no captions (annotations/captions_train*.json): PDM trains on captions")
        length = cogen.PDMConfig.preset(self.cfg.preset).num_text_tokens
        tokenizer = cogen.WordTokenizer.build(captions, length, self.cfg.min_word_count)
        longest = max(len(cogen.WordTokenizer.words(c)) for c in captions)
        self.log(f"vocabulary: {len(tokenizer.vocab)} words from {len(captions)} training captions "
                 f"(longest {longest} words; {length} text tokens{', the rest cut' if longest > length else ''})")
        return tokenizer.vocab

    def pdm_config(self, vocab: list[str]) -> "cogen.PDMConfig":
        """The preset's PDMConfig with the latent shape of the image AE at --image-size, and the vocabulary."""
        import cogen
        base, ae = cogen.PDMConfig.preset(self.cfg.preset), self.image_ae.config
        factor = 2 ** (len(ae.ch_mult) - 1)                                    # 8 for SD's KL-f8
        if self.cfg.image_size % (factor * base.patch_size):
            raise SystemExit(f"--image-size {self.cfg.image_size} must be a multiple of {factor * base.patch_size} "
                             f"(autoencoder factor {factor} x patch {base.patch_size})")
        top = max(self.datasets()[0].categories)
        if top > base.num_categories:
            raise SystemExit(f"category ids reach {top}; the {self.cfg.preset} PDM encodes 0..{base.num_categories}")
        # DEVIATION: PDM reads frozen CLIP ViT-L/14 token features; nothing is downloaded here, so the
        # trainer always learns the words encoder (coco: CLIP's 77 tokens and 768 width) [cogen.py §3].
        if self.cfg.patch_factor:
            base = dataclasses.replace(base, patch_factor=self.cfg.patch_factor)
        if self.cfg.panoptic_map:
            base = dataclasses.replace(base, panoptic=True)
        if self.cfg.clean_map_prob >= 0:
            base = dataclasses.replace(base, clean_map_prob=self.cfg.clean_map_prob)
        return dataclasses.replace(base, text_encoder="words", vocab=tuple(vocab),
                                   latent_size=self.cfg.image_size // factor, latent_channels=ae.latent_channels)

    def checkpoint_extras(self) -> dict:
        """The frozen image AE (to decode samples) and the dataset's categories (names, things / stuff)."""
        image_ae = {"config": dataclasses.asdict(self.image_ae.config), "weights": self.image_ae.state_dict()}
        return {"image_ae": image_ae, "categories": list(self.datasets()[0].categories.values())}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> posterior moments (B, 2C, h, w), unscaled: the loss samples from them."""
        return torch.cat(self.image_ae.encode(images), dim=1)

    def x0_image(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The batch's scaled image latents x_0 (B, C, h, w).

        PAPER: a fresh posterior sample every step, x_0 = s (mu + sigma eps) [PDM brief §2.2].
        """
        import ldmseg
        mean, logvar = ldmseg.split_moments(self.image_latents(batch))       # 2 x (B, C, h, w)
        return self.image_ae.config.scale_factor * ldmseg.sample_gaussian(mean, logvar, generator)


# The PDMConfig fields that shape the image stream (T2IUViT): a two-stream PDM takes them from its
# --stage t2i run; the rest (maps, losses, sampling) come from its own preset.
IMAGE_STREAM_FIELDS = ("latent_size", "latent_channels", "patch_size", "dim", "depth", "num_heads", "mlp_ratio",
                       "qkv_bias", "text_encoder", "context_dim", "num_text_tokens", "vocab", "text_layers",
                       "text_heads", "schedule", "num_train_steps", "time_offset")


class CogenStage(CaptionStage):
    """PDM: co-generation of image latents and category maps from captions.  [PDM Alg. 1; brief §2, §6]

    One-stream (default): the U-ViT trains from scratch on (image latent, category-map bits,
    caption tokens). --two-stream [PDM §2.5.2; brief §4]: cogen.two_stream_from_t2i on a --stage t2i
    run -- its EMA weights, its image AE and its vocabulary (the image stream's text encoder is
    frozen with the rest of it); only the map stream and the zero-convolutions train, so the
    optimiser and the EMA see only those (cogen.py §5). `train` builds the EMA after build() has
    returned the loaded model: it starts from the pretrained-derived weights [brief §8.8].
    """
    name = "cogen"

    @property
    def arch(self) -> str:
        return "two_stream" if self.cfg.two_stream else "one_stream"

    def fresh_network(self) -> nn.Module:
        """One-stream: the image AE (trained first if missing), the vocabulary, a PDM sized to both."""
        import cogen
        if self.cfg.two_stream:
            return self.two_stream_network()
        self.set_image_ae(*self.image_autoencoder())
        self.mcfg = self.pdm_config(self.vocabulary())
        return cogen.build_model(self.mcfg)

    def two_stream_network(self) -> nn.Module:
        """The two-stream PDM on the image stream of a t2i run, with that run's image AE and vocabulary."""
        import cogen
        t2i = self.image_stream_run()
        self.set_image_ae(t2i["image_ae"]["config"], t2i["image_ae"]["weights"])
        image = cogen.PDMConfig(**t2i["model_config"])
        ours = self.pdm_config(list(image.vocab))                              # this run's data and maps
        if (ours.latent_size, ours.latent_channels) != (image.latent_size, image.latent_channels):
            raise SystemExit(f"the image stream reads {image.latent_channels} x {image.latent_size}^2 latents, but "
                             f"--image-size {self.cfg.image_size} gives {ours.latent_channels} x {ours.latent_size}^2")
        config = dataclasses.replace(ours, **{f: getattr(image, f) for f in IMAGE_STREAM_FIELDS})
        net = cogen.two_stream_from_t2i(t2i["ema"] or t2i["model"], config)
        self.mcfg = net.config
        self.log(f"two-stream PDM on the image stream of {self.image_stream_source} (EMA weights, frozen); "
                 f"map stream: a {self.mcfg.map_stream_init} of its blocks")
        return net

    def image_stream_run(self) -> dict:
        """The --stage t2i checkpoint: --init-image-stream RUN; for U-ViT's weights file, the t2i run
        that learns a caption encoder for it (T2IStage); else runs/<preset>/t2i, trained if missing.
        The t2i run shares this run's image autoencoder and image size."""
        src = self.cfg.init_image_stream
        from_file = bool(src) and not _is_run(src)
        carry = ("image_vae", "image_size", "min_word_count") + (("init_image_stream",) if from_file else ())
        self.image_stream_source = src if src and not from_file else "the --stage t2i run"
        return prerequisite(self.cfg, "t2i", "" if from_file else src, self.log, carry)

    def loss(self, model, batch, generator):
        import cogen
        x0_image = self.x0_image(batch, generator)                            # (B, C, h, w)
        m0_bits = cogen.encode_map(batch["category"], self.mcfg, batch["segments"], generator)   # (B, K, H_m, W_m)
        text = self.net.tokenize(batch["caption"])                           # (B, L)
        return cogen.pdm_loss(model, x0_image, m0_bits, text, self.net.schedule, self.mcfg, generator)

    def cogenerate(self, model, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> images (B, 3, H, W) in [-1, 1] and category maps (B, H, W) at image size (seed 0)."""
        import cogen
        x0_image, m0_bits = cogen.generate(model, list(captions), generator=torch.Generator().manual_seed(0))
        images = cogen.decode_images(self.image_ae, x0_image)
        category = cogen.decode_map(m0_bits, model.config)[0]                 # (B, H_m, W_m)
        return images, cogen.nearest_resize_ids(category, tuple(images.shape[-2:]))

    def preview(self, model, batch) -> np.ndarray:
        """Rows, one per training caption of the batch: its image | its map | generated image | generated map."""
        images, maps = self.cogenerate(model, batch["caption"])
        return grid([[to_uint8(x), data.colorize(c), to_uint8(g), data.colorize(m)]
                     for x, c, g, m in zip(batch["image"], batch["category"], images, maps)])

    def finish(self, model, val, run_dir) -> dict:
        """Metrics that need no other model, on the first eval_images val captions: MCD and caption
        agreement (with the val maps' own agreement, its ceiling); pictures in <run>/val_cogen."""
        import evaluate
        res = evaluate.evaluate_cogen(model, val, steps=self.cfg.eval_dpm_steps, limit=self.cfg.eval_images,
                                      batch_size=self.cfg.batch_size, image_ae=self.image_ae,
                                      pictures=run_dir / "val_cogen")
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}   # per-category detail: evaluate.py


class T2IStage(CaptionStage):
    """The image stream alone: U-ViT's text-to-image model (cogen.T2IUViT) on the captions, the
    network --stage cogen --two-stream freezes and controls.  [U-ViT; PDM brief §4.1, §4.3]

    --init-image-stream FILE starts from U-ViT's released weights instead (mscoco_uvit_small.pth,
    PDM's pretrained image stream), read by cogen.uvit_to_t2i_state_dict: every U-ViT weight stays
    frozen and only a words encoder trains, in front of U-ViT's context_embed.
    DEVIATION: U-ViT reads frozen CLIP ViT-L/14 features of the caption [PDM brief §2.3]; nothing is
    downloaded here, so the words encoder learns to stand in for CLIP.
    """
    name = "t2i"
    arch = "t2i"
    EVAL_T = (100, 500, 900)             # the fixed timesteps of finish()'s eps-MSE: low, middle, high noise

    def build(self) -> nn.Module:
        """CaptionStage.build; a run from U-ViT's file (this one, or the one resumed) trains only
        its text encoder, so the optimiser and the EMA see only that."""
        net = super().build()
        run_cfg = self.resumed["config"] if self.resumed else dataclasses.asdict(self.cfg)
        if run_cfg.get("init_image_stream"):                                  # U-ViT's weights: frozen
            net.requires_grad_(False)
            net.text_encoder.requires_grad_(True)
        return net

    def fresh_network(self) -> nn.Module:
        """The image AE (trained first if missing), the vocabulary, a T2IUViT sized to both."""
        import cogen
        self.set_image_ae(*self.image_autoencoder())
        self.mcfg = dataclasses.replace(self.pdm_config(self.vocabulary()), arch="t2i")
        if not self.cfg.init_image_stream:
            return cogen.build_model(self.mcfg)
        # U-ViT's time token embeds n = t + 1 [cogen.py §9].
        self.mcfg = dataclasses.replace(self.mcfg, time_offset=1)
        return self.uvit_network(self.cfg.init_image_stream)

    def uvit_network(self, path: str) -> nn.Module:
        """A words-mode T2IUViT holding U-ViT's weights from `path`; only its text encoder is new."""
        import cogen
        if _is_run(path):
            raise SystemExit(f"--init-image-stream {path}: a run of this project; --stage t2i starts from U-ViT's "
                             f"weights file (continue a run with --resume)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SystemExit(f"--init-image-stream {path}: not a loadable state dict "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(state, dict):
            raise SystemExit(f"--init-image-stream {path}: holds a {type(state).__name__}, not U-ViT's state dict")
        try:                                   # U-ViT's layout is context mode: D_txt = the words encoder's width
            context = dataclasses.replace(self.mcfg, text_encoder="context", vocab=())
            state = cogen.uvit_to_t2i_state_dict(state, context)
        except ValueError as exc:
            raise SystemExit(f"--init-image-stream {path}: {exc}\n(the coco preset is U-ViT-S/2 at "
                             f"--image-size 256)") from None
        state.pop("empty_text")                # words mode: "" is the <empty> token, not stored features
        net = cogen.build_model(self.mcfg)
        missing, unexpected = net.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("text_encoder.") for k in missing), (missing, unexpected)
        self.log(f"image stream: U-ViT's weights from {path} (frozen); a words encoder trains in front of them")
        return net

    def loss(self, model, batch, generator):
        import cogen
        x0_image = self.x0_image(batch, generator)                            # (B, C, h, w)
        text = self.net.tokenize(batch["caption"])                           # (B, L)
        return cogen.t2i_loss(model, x0_image, text, self.net.schedule, self.mcfg, generator)

    def preview(self, model, batch) -> np.ndarray:
        """Rows, one per caption of the (fixed) preview batch: its image | the image generated for it (seed 0)."""
        import cogen
        x0_image = cogen.generate_images(model, list(batch["caption"]), generator=torch.Generator().manual_seed(0))
        images = cogen.decode_images(self.image_ae, x0_image)                # (B, 3, H, W)
        return grid([[to_uint8(x), to_uint8(g)] for x, g in zip(batch["image"], images)])

    def finish(self, model, val, run_dir) -> dict:
        """The eps-MSE on the first eval_images val images at t in EVAL_T, with their captions and with
        "" -- a cheap check that the model denoises and reads its captions (samples: the previews).
        Deterministic: x_0 is the posterior mean and the noise comes from a generator seeded 0."""
        import ldmseg
        g, n = torch.Generator().manual_seed(0), 0
        sums = {f"eps_mse_t{t}": 0.0 for t in self.EVAL_T} | {"eps_mse_empty": 0.0}
        for b in val_batches(val, self.cfg.batch_size, self.cfg.eval_images):
            mean, _ = ldmseg.split_moments(self.encode_image(b["image"].to(self.device)))
            x0_image, text = self.image_ae.config.scale_factor * mean, model.tokenize(b["caption"])
            B, empty = len(x0_image), torch.ones(len(x0_image), dtype=torch.bool, device=self.device)
            for t in self.EVAL_T:
                eps = torch.randn(x0_image.shape, generator=g).to(self.device)
                steps = torch.full((B,), t, device=self.device)
                x_t = model.schedule.q_sample(x0_image, steps, eps)
                sq_err = lambda drop: (model(x_t, steps, text, drop_text=drop).float() - eps).pow(2).mean().item() * B
                sums[f"eps_mse_t{t}"] += sq_err(None)
                sums["eps_mse_empty"] += sq_err(empty) / len(self.EVAL_T)
            n += B
        out = {k: v / n for k, v in sums.items()}
        out["eps_mse"] = sum(out[f"eps_mse_t{t}"] for t in self.EVAL_T) / len(self.EVAL_T)
        return out


STAGES: dict[str, type[Stage]] = {"vae": ImageAEStage, "1": MaskAEStage, "2": LDMSegStage,
                                 "cogen": CogenStage, "t2i": T2IStage, "multitask": MultiTaskStage}


# -----------------------------------------------------------------------------
# 6. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from TrainConfig: kebab-case names, the field comment as help, defaults shown."""
    p = argparse.ArgumentParser(description="Train a stage of LDMSeg / PDM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=help_text)
    return p


def _field_comments(cls) -> dict[str, str]:
    """The trailing '# ...' comment of every dataclass field, read from this file's source.

    The class body is cut out of the file text by indentation, not by inspect.getsource, which parses
    the file with `ast`: CPython 3.11's parser can fail in a process forked while another thread
    parses ("AST constructor recursion depth mismatch"), and a forked training process builds this
    parser too.
    """
    import inspect
    lines = Path(inspect.getsourcefile(cls)).read_text().splitlines()
    start = lines.index(f"class {cls.__name__}:") + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    out = {}
    for line in lines[start:end]:
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip().replace("%", "%%")
    return out


def main(argv: list[str] | None = None) -> dict:
    from sample import given_flags
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        return train(cfg, given_flags(parser, argv))
    except (data.PanopticFormatError, CheckpointWriteError) as exc:   # bad data, full disk: the message, no traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()

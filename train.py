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

Contents
  1. Configuration        TrainConfig (every flag), presets tiny / shapes / coco
  2. Run bookkeeping      devices, seeding, distributed set-up, logging, atomic checkpoints
  3. Optimisation         AdamW groups, warm-up + cosine LR, EMA
  4. The training loop    train(cfg, stage): one loop, every stage plugs in a `Stage` object
  5. Stages               vae, 1, 2, cogen -- each a small class with build / loss / preview / finish;
                          2 and cogen share the frozen image autoencoder and its latent cache
  6. Command line         python train.py --stage 1 [--preset shapes] ...

Run
  python train.py --stage vae               # image autoencoder on Shapes (written on first use)
  python train.py --stage 1                 # mask autoencoder on Shapes
  python train.py --stage cogen             # PDM on Shapes captions (image AE trained first if missing)
  torchrun --nproc_per_node=2 train.py ...  # DDP (NCCL on CUDA, gloo on CPU)

Reproducibility
  Every random draw of step k (noise, timesteps, id remaps, point samples) comes from a generator
  seeded with (seed, rank, k), and the data order of epoch e from (seed, e). A checkpoint therefore
  only needs the step to resume: N steps straight equal N/2 + --resume + N/2, bit for bit on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
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
    stage: str = "1"                 # which stage to train: vae | 1 | 2 | all (= 2 and what it needs) | cogen (PDM)
    preset: str = "shapes"           # model / data sizes: tiny | shapes | coco
    data: str = "data/shapes"        # COCO-format panoptic folder; Shapes is written there if missing
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
    log_every: int = 50              # steps between log lines
    preview_every: int = 500         # steps between preview PNGs (0 = only at the end)
    ckpt_every: int = 1000           # steps between checkpoints (always one at the end)
    eval_images: int = 0             # val images for the end-of-run evaluation; 0 = the preset's (all; cogen: 100 on shapes)
    resume: str = ""                 # checkpoint (or run folder) to continue from
    stop_after: int = 0              # end this invocation after N steps with a checkpoint (0 = run to max-steps)
    num_train: int = 4000            # Shapes images written when --data does not exist
    num_val: int = 200               # Shapes val images written when --data does not exist
    image_vae: str = ""              # image autoencoder: a run / checkpoint of --stage vae, or Stable Diffusion weights (.ckpt, .safetensors, diffusers folder); default: train / reuse runs/<preset>/vae
    init_unet: str = ""              # start stage 2's UNet from Stable Diffusion 1.x weights (file or diffusers folder)  # PAPER: SD v1.4
    mask_ae: str = ""                # stage-1 mask autoencoder checkpoint; default: train / reuse runs/<preset>/stage1
    eval_steps: int = 0              # DDIM steps of the end-of-run evaluation; 0 = the preset's  # PAPER: DDIM 50
    eval_dpm_steps: int = 0          # DPM-Solver++ steps of the end-of-run evaluation; 0 = the preset's (20)
    min_word_count: int = 0          # cogen: caption words seen fewer times become <unk>; 0 = the preset's (1; coco 5)


# Per (preset, stage) values for the fields left at 0 above. Shapes numbers are sized so each stage
# finishes in minutes on a 2-core CPU; coco follows the papers (LDMSeg Appendix A).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny":   {"vae": dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3),
               "1":   dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3)},
    # DEVIATION: the Shapes autoencoders train on random 64^2 crops of the 128^2 images (both are
    # fully convolutional, so they run at 128^2 afterwards); 4x fewer FLOPs per step on a CPU.
    "shapes": {"vae": dict(image_size=128, crop=64, max_steps=600, batch_size=16, lr=1e-3),
               "1":   dict(image_size=128, crop=64, max_steps=1200, batch_size=16, lr=3e-3)},
    "coco":   {"vae": dict(image_size=512, max_steps=100_000, batch_size=8, lr=4.5e-6),
               "1":   dict(image_size=512, max_steps=66_000, batch_size=16, lr=1e-4, grad_clip=3.0)},  # PAPER: LDMSeg AE
}
PRESETS["tiny"]["2"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_steps=3, eval_dpm_steps=2)
PRESETS["shapes"]["2"] = dict(image_size=128, max_steps=1500, batch_size=16, lr=5e-4, eval_steps=50, eval_dpm_steps=20)
PRESETS["coco"]["2"] = dict(image_size=512, max_steps=200_000, batch_size=32, lr=1e-4,   # PAPER: x 8 GPUs = 256
                            eval_steps=50, eval_dpm_steps=20)
# PDM (cogen). The image size fixes the latent side the U-ViT is built for (image_size / 8).
PRESETS["tiny"]["cogen"] = dict(image_size=32, max_steps=20, batch_size=4, lr=1e-3, eval_dpm_steps=2,
                                eval_images=4, min_word_count=1)
# Shapes: 0.5 it/s measured at batch 16 on one thread of a 2-core CPU busy with other jobs (load
# average 3.4); about twice that on an idle core, so ~25 min for 1,500 x 16 = 24k samples (6 epochs).
PRESETS["shapes"]["cogen"] = dict(image_size=128, max_steps=1500, batch_size=16, lr=1e-3, warmup_steps=100,
                                  eval_dpm_steps=20, eval_images=100, min_word_count=1)
# PAPER: PDM's released small config [PDM brief §6.6]: 256^2 images, AdamW 2e-4, wd 0.03, betas
# (0.9, 0.9), 5k warm-up then a constant rate, batch 64, 2M steps, EMA 0.9999; 50-NFE DPM-Solver++.
# The paper itself gives no schedule (UNVERIFIED which of these its numbers used). DEVIATION: weight
# decay skips norms and biases here, as in every stage; PDM's code decays every parameter.
PRESETS["coco"]["cogen"] = dict(image_size=256, max_steps=2_000_000, batch_size=64, lr=2e-4, weight_decay=0.03,
                                adam_beta2=0.9, warmup_steps=5000, min_lr_ratio=1.0, ema_decay=0.9999,
                                eval_dpm_steps=50, min_word_count=5)
# Values of the fields whose flag default is -1 ("the preset's") when a preset does not set them.
PRESET_DEFAULTS: dict[str, Any] = dict(crop=0, grad_clip=1.0,                                  # PAPER: LDMSeg clip 1.0
                                       weight_decay=0.05, adam_beta2=0.999, warmup_steps=200,   # PAPER: LDMSeg
                                       min_lr_ratio=0.01, ema_decay=0.999)



def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the 0 / empty fields from the preset; the result is what the run uses and saves."""
    if cfg.stage == "all":                     # the whole first-paper pipeline = stage 2 + what it needs
        cfg = dataclasses.replace(cfg, stage="2")
    if cfg.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    if cfg.stage not in PRESETS[cfg.preset]:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose from {sorted(PRESETS[cfg.preset])}")
    values = {**PRESET_DEFAULTS, **PRESETS[cfg.preset][cfg.stage]}
    unset = lambda k: getattr(cfg, k) == (-1 if k in PRESET_DEFAULTS else type(getattr(cfg, k))())
    out = dataclasses.replace(cfg, **{k: v for k, v in values.items() if unset(k)})
    if not out.out_dir:
        out.out_dir = str(Path("runs") / out.preset / f"stage{out.stage}" if out.stage.isdigit()
                          else Path("runs") / out.preset / out.stage)
    return out


# -----------------------------------------------------------------------------
# 2. Run bookkeeping: devices, seeds, processes, logs, checkpoints
# -----------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """--device auto picks cuda > mps > cpu; under torchrun each process takes its LOCAL_RANK GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        name = "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) elsewhere -- CPU bf16 is slower, not faster."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for every random draw of one training step: a pure function of (seed, rank, step)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63))
    return g


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (used only by weight initialisation)."""
    import random
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@dataclass
class Dist:
    """Where this process stands in a torchrun launch (world 1 when run plainly)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size())


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


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write a checkpoint atomically: temporary file, fsync, rename. A crash leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": CKPT_FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    if stage is not None and ckpt["stage"] != stage:
        raise SystemExit(f"{p}: a stage-{ckpt['stage']} checkpoint, but stage {stage} is needed here")
    return ckpt


# -----------------------------------------------------------------------------
# 3. Optimisation: AdamW, learning-rate schedule, EMA
# -----------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; norms, biases and embeddings' 1-d parameters get no weight decay.

    PAPER: LDMSeg uses AdamW 1e-4, wd 0.05 with wd 0 on norm layers [LDMSeg brief §3.4].
    The fused kernel on CUDA, the multi-tensor (foreach) one on CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), **kwargs)


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
    datasets() once, build() once, loss() every step, preview() now and then, finish() at the end.
    """
    name = ""

    def __init__(self, cfg: TrainConfig, device: torch.device, log: Logger):
        self.cfg, self.device, self.log = cfg, device, log

    def datasets(self) -> tuple[data.PanopticDataset, data.PanopticDataset]:
        """(train, val) datasets; Shapes is written to --data first when that folder does not exist."""
        root = self._data_root()
        kw = dict(size=self.cfg.image_size, seed=self.cfg.seed, max_segments=self.max_segments())
        return (data.shapes_dataset(root, "train", train=True, crop=self.cfg.crop, **kw),
                data.shapes_dataset(root, "val", train=False, **kw))

    def _data_root(self) -> Path:
        return data.ensure_shapes(self.cfg.data, size=max(self.cfg.image_size, 128), num_train=self.cfg.num_train,
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


def batch_stream(ds: data.PanopticDataset, cfg: TrainConfig, dist: Dist, device: torch.device, start: int):
    """Yield training batches from global step `start` on, in the same order as an uninterrupted run."""
    per_epoch = len(epoch_batches(len(ds), cfg.batch_size, dist, cfg.seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        ds.set_epoch(epoch)                                   # workers fork after this: they see the epoch
        batches = epoch_batches(len(ds), cfg.batch_size, dist, cfg.seed, epoch)[offset:]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.num_workers,
                                             collate_fn=data.collate, pin_memory=device.type == "cuda")
        for b in loader:
            yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        epoch, offset = epoch + 1, 0


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.stop = False
        self.old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:                                # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum, frame):
        self.stop = True

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


def train(cfg: TrainConfig) -> dict:
    """Train one stage. Returns the final metrics (also written to <run>/metrics.json)."""
    cfg = resolve(cfg)
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    run_dir = Path(cfg.out_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(run_dir, dist.main)
    seed_everything(cfg.seed)
    stage = STAGES[cfg.stage](cfg, device, log)
    model = stage.build().to(device)
    train_ds, val_ds = stage.datasets()
    opt = make_optimizer(model, cfg, device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    start = _maybe_resume(cfg, model, opt, ema, log)
    if dist.main:
        data.write_json(run_dir / "config.json", {"train": dataclasses.asdict(cfg), "model": stage.model_config()})
    n_params = sum(p.numel() for p in model.parameters())
    log(f"stage {cfg.stage} | preset {cfg.preset} | {n_params / 1e6:.3f} M parameters | device {device} | "
        f"{len(train_ds)} train / {len(val_ds)} val images | batch {cfg.batch_size} x {dist.world} | "
        f"steps {start} -> {cfg.max_steps}")
    step = _loop(cfg, stage, model, opt, ema, train_ds, device, dist, run_dir, log, start)
    if step < cfg.max_steps:                                   # --stop-after: no final evaluation yet
        return {}
    return _finish(cfg, stage, model, opt, ema, val_ds, dist, run_dir, log, step)


def _maybe_resume(cfg, model, opt, ema, log) -> int:
    """Load model, optimizer and EMA from --resume; return the step to continue from."""
    if not cfg.resume:
        return 0
    ckpt = load_checkpoint(cfg.resume, cfg.stage)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.shadow = {k: ckpt["ema"][k].float().to(v.device) for k, v in ema.shadow.items()}
    log(f"resumed from {cfg.resume} at step {ckpt['step']}")
    return int(ckpt["step"])


def _train_step(cfg, stage, model, fwd, opt, ema, batch, step, dist, amp) -> dict[str, torch.Tensor]:
    """One optimisation step: forward under autocast, backward, clip, AdamW, EMA."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    gen = step_generator(cfg.seed, dist.rank, step, batch["image"].device)
    with torch.autocast(batch["image"].device.type, dtype=amp, enabled=amp is not None):
        terms = stage.loss(fwd, batch, gen)
    terms["loss"].backward()
    if cfg.grad_clip:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step)
    return {k: v.detach() for k, v in terms.items()}


def _loop(cfg, stage, model, opt, ema, train_ds, device, dist, run_dir, log, start) -> int:
    """Steps start..max_steps with logging, previews, checkpoints and a clean stop on SIGINT / SIGTERM."""
    fwd = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(cfg, device)
    stream = batch_stream(train_ds, cfg, dist, device, start)
    stopper, t0, sums, count, step = StopFlag(), time.time(), {}, 0, start
    preview_batch = None
    try:
        for step in range(start, cfg.max_steps):
            batch = next(stream)
            preview_batch = preview_batch or {k: (v[:4] if isinstance(v, torch.Tensor) else v[:4]) for k, v in batch.items()}
            terms = _train_step(cfg, stage, model, fwd, opt, ema, batch, step, dist, amp)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            count += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                avg = {k: (v / count).item() for k, v in sums.items()}
                if not math.isfinite(avg["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {done}; the last good checkpoint "
                                             f"in {run_dir} is kept. Try a lower --lr or --dtype fp32.")
                its = (done - start) / (time.time() - t0)
                log(log_line(done, avg, lr_at(step, cfg), its, (cfg.max_steps - done) / max(its, 1e-9)))
                sums, count = {}, 0
            if dist.main and cfg.preview_every and done % cfg.preview_every == 0:
                _preview(stage, model, ema, preview_batch, run_dir / f"preview_{done:06d}.png")
            if dist.main and done % cfg.ckpt_every == 0 and done < cfg.max_steps:
                _save(cfg, stage, model, opt, ema, done, run_dir)
            step = done
            if stopper.stop:
                log(f"stopped by signal at step {done}; saving a checkpoint (resume with --resume {run_dir})")
                if dist.main:
                    _save(cfg, stage, model, opt, ema, done, run_dir)
                raise SystemExit(130)
            if cfg.stop_after and done - start >= cfg.stop_after and done < cfg.max_steps:
                log(f"--stop-after {cfg.stop_after}: stopping at step {done} (continue with --resume {run_dir})")
                if dist.main:
                    _save(cfg, stage, model, opt, ema, done, run_dir)
                return step
    finally:
        stopper.restore()
    if dist.main and preview_batch is not None:
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
        tdist.barrier()
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

    def build(self) -> nn.Module:
        import ldmseg
        self.mcfg = ldmseg.MaskAEConfig.preset(self.cfg.preset)
        return ldmseg.MaskAutoencoder(self.mcfg)

    def max_segments(self) -> int:
        return 2 ** self.mcfg.num_bits - 1

    def loss(self, model, batch, generator):
        import ldmseg
        K = self.mcfg.num_bits
        ids = data.remap_ids(batch["segments"], K, generator)            # PAPER: fresh random ids per sample
        logits, mean, logvar = model(data.ids_to_bits(ids, K), generator=generator,
                                     sample_posterior=self.mcfg.sample_posterior)
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
        # Diffusion sees s_t * mean with s_t = 1 / std: unit-variance latents, as SD's 0.18215 made
        # its image latents (LDMSeg reuses 0.18215 for its own AE; ours is measured instead).
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


def prerequisite(cfg: TrainConfig, stage: str, path: str, log: Logger) -> dict:
    """The checkpoint of an earlier stage: `path` if given, else runs/<preset>/<stage>, trained now if missing."""
    if path:
        return load_checkpoint(path, stage)
    sub = TrainConfig(stage=stage, preset=cfg.preset, data=cfg.data, seed=cfg.seed, device=cfg.device,
                      dtype=cfg.dtype, compile=cfg.compile, num_workers=cfg.num_workers,
                      num_train=cfg.num_train, num_val=cfg.num_val)
    run = Path(resolve(sub).out_dir)
    if not (run / "ckpt.pt").exists() or not load_checkpoint(run, stage).get("metrics"):
        log(f"no finished stage-{stage} run in {run}: training it first")
        train(sub)
    else:
        log(f"reusing the stage-{stage} run in {run}")
    return load_checkpoint(run, stage)


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

        Exact, not an approximation: the image AE is frozen and an uncropped item is fixed by its
        index and flip. On Shapes this removes the image encoder from every step after the first epoch.
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
        image_cfg, image_state = self.image_autoencoder()
        mae = prerequisite(self.cfg, "1", self.cfg.mask_ae, self.log)
        self.mcfg = dataclasses.replace(ldmseg.LDMSegConfig.preset(self.cfg.preset),
                                        mask_ae=mae["model_config"], image_ae=image_cfg)
        self.net = ldmseg.LDMSeg(self.mcfg)
        self.net.image_ae.load_state_dict(image_state)                   # frozen
        self.net.mask_ae.load_state_dict(mae["ema"] or mae["model"])     # the EMA weights, frozen
        if self.cfg.init_unet:
            frozen = ldmseg.init_ldmseg_unet_from_sd(self.net, ldmseg.load_weights(self.cfg.init_unet, component="unet"))
            self.log(f"UNet initialised from {self.cfg.init_unet}; frozen: {', '.join(frozen)}")
        return self.net

    def max_segments(self) -> int:
        return 2 ** self.mcfg.mask_ae.num_bits - 1

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(images)                             # s_i * posterior mean

    def loss(self, model, batch, generator):
        import ldmseg
        ids = data.remap_ids(batch["segments"], self.mcfg.mask_ae.num_bits, generator)
        z0, z_image = self.net.encode_ids(ids), self.image_latents(batch)
        valid = ldmseg.void_mask_latent(batch["segments"], *z0.shape[-2:])
        return ldmseg.ldmseg_loss(model, self.mcfg, self.net.schedule, z0.float(), z_image.float(), valid, generator)

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


class CogenStage(LatentStage):
    """PDM: co-generation of image latents and category maps from captions.  [PDM Alg. 1; brief §2, §6]

    The U-ViT trains on (image latent, category-map bits, caption tokens). The frozen image
    autoencoder (a --stage vae run, or SD's VAE with PDM's scale) encodes the images and decodes
    the samples; it travels in the checkpoint with the dataset's categories, and the word
    vocabulary travels in the model config, so `cogen.load_pdm(ckpt)` and `cogen.load_image_ae(ckpt)`
    need nothing but the checkpoint.
    """
    name = "cogen"
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
                      max_segments=2 ** pdm.instance_bits - 1 if pdm.panoptic else None)
            root = self._data_root()
            self._datasets = (data.shapes_dataset(root, "train", train=True, **kw),
                              data.shapes_dataset(root, "val", train=False, **kw))
        return self._datasets

    def build(self) -> nn.Module:
        """Image AE and vocabulary (from the run resumed, else fresh), then the PDM sized to both."""
        import cogen
        import ldmseg
        resumed = load_checkpoint(self.cfg.resume, "cogen") if self.cfg.resume else None
        ae_cfg, ae_state = ((resumed["image_ae"]["config"], resumed["image_ae"]["weights"]) if resumed
                            else self.image_autoencoder())
        self.image_ae = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig(**ae_cfg)).requires_grad_(False)
        self.image_ae.load_state_dict(ae_state)
        self.image_ae.eval().to(self.device)
        vocab = resumed["model_config"]["vocab"] if resumed else self.vocabulary()
        self.mcfg = self.pdm_config(vocab)
        self.net = cogen.build_model(self.mcfg)
        return self.net

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

    def loss(self, model, batch, generator):
        import cogen
        import ldmseg
        mean, logvar = ldmseg.split_moments(self.image_latents(batch))       # 2 x (B, C, h, w)
        # PAPER: a fresh posterior sample every step, x_0 = s (mu + sigma eps) [PDM brief §2.2].
        x0_image = self.image_ae.config.scale_factor * ldmseg.sample_gaussian(mean, logvar, generator)
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


STAGES: dict[str, type[Stage]] = {"vae": ImageAEStage, "1": MaskAEStage, "2": LDMSegStage,
                                 "cogen": CogenStage}


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
    """The trailing '# ...' comment of every dataclass field, read from this file's source."""
    import inspect
    out = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip().replace("%", "%%")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    return train(cfg)


if __name__ == "__main__":
    main()

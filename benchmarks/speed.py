# SPDX-License-Identifier: MIT
"""
benchmarks/speed.py -- training, sampling and PQ-evaluation throughput of the networks here.

For one preset (tiny | shapes | coco) this prints:
  (a) per network (LDMSeg's UNet, PDM's U-ViT, the mask and image autoencoders): training-step
      throughput in images/s (forward + backward + AdamW, median of --steps timed steps after
      --warmup untimed ones), the FLOPs of one forward + backward (torch.utils.flop_counter, which
      counts matmuls, convolutions and attention, 2 FLOPs per multiply-add), the achieved GFLOP/s,
      model-FLOP utilisation against --peak-tflops, and peak memory;
  (b) LDMSeg sampling throughput (images/s): image encoding + DDIM 50 + mask decoding, and the
      same with DPM-Solver++(2M) 20, with random weights (speed does not depend on them);
  (c) PQ evaluation throughput (pairs/s), with benchmarks/pq_speed.py's synthetic COCO-format set.

Contents
  1. Workloads       one synthetic batch and a loss per network, sized by the training presets
  2. Timing          training step, FLOP count, peak memory
  3. Sampling and PQ LDMSeg segment() with each sampler; pq_speed.py's set and timer
  4. Command line

Sizes and batches are train.py's (stage 2 / cogen / stage 1 / vae presets, with their crops);
--batch overrides them. What a "training step" is here:
  * UNet and U-ViT: the denoising MSE against fixed noise targets. train.py draws t and the noise
    per step and LDMSeg adds a self-conditioning pass on half the batch (about 1/6 more FLOPs);
    both are left out, so the step is the network's, with no host work in it.
  * Mask AE: its real loss (mask_ae_loss); the per-segment masks have data-dependent counts, so
    this step synchronises with the host, as in training.
  * Image AE: its real loss (vae_loss: L1 + KL).
Fast paths (section 2): bf16 autocast (--dtype, default bf16 on CUDA, fp32 elsewhere: CPU bf16 is
slower), --compile, SDPA attention (the models' default), fused AdamW on CUDA and CPU (foreach on MPS),
--channels-last, and no host synchronisation inside a timed step (the CUDA synchronize brackets it).
FLOPs are counted on the uncompiled model, once, outside the timed steps.

Memory: on CUDA torch.cuda.max_memory_allocated per network; elsewhere the peak resident set of
the whole process so far (resource.getrusage), which only grows: run one --models entry per call
for a per-network figure.

MFU: achieved FLOP/s / --peak-tflops. Default peak: 790 TFLOP/s for bf16 on an H200 (dense, what
large bf16 matrix products reach there), not the data sheet's 989 (--peak-tflops 989 for that
convention: every MFU 0.80x as large); none elsewhere (only GFLOP/s is printed).

Measured (`--preset shapes --device cpu --threads 1`, fp32, on the 2-core x86 VM while other training
jobs ran, under nice 19: treat absolute figures as lower bounds; with 2 threads under that load the
threads wait on each other and everything was 5-30x slower):
  training img/s: UNet 37.7 (12.1 GFLOP/step, 28.5 GFLOP/s), U-ViT 12.0 (64.3, 48.3), mask AE 95.5
  (3.6, 21.4), image AE 23.0 (30.4, 43.5); sampling 16 images at 128^2: DDIM 50 5.75 s (2.8 img/s),
  DPM-Solver++ 20 2.93 s (5.5 img/s); PQ 294 pairs/s (128^2, 2 workers).
Measured on one H200 (`--preset coco --device cuda`, bf16 autocast, PyTorch 2.11.0): UNet 105.1 img/s at
  batch 32 x 512^2, MFU 31.6 %, 44.5 GiB (--compile: 140.6, 42.3 %, 39.1 GiB); U-ViT 1,081 img/s at
  64 x 256^2, 26.7 % (--compile: 1,609, 39.8 %; a second run 1,584, 39.2 %; at batch 128: 1,792 img/s,
  44.3 %, 19.4 GiB); DDIM 50 for 32 images at 512^2 5.50 s, DPM-Solver++ 20 2.37 s.

Run
  python benchmarks/speed.py --preset shapes                       all sections, this machine
  python benchmarks/speed.py --preset coco --device cuda --compile --models uvit --batch 64
  python benchmarks/speed.py --preset coco --device cuda --compile --models uvit --sections train --batch 128 --steps 10 --warmup 3
  python benchmarks/speed.py --preset tiny --steps 1 --warmup 1    a smoke test (tests/test_benchmarks.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import cogen     # noqa: E402  (the project root is put on the path just above)
import data      # noqa: E402
import evaluate  # noqa: E402
import ldmseg    # noqa: E402
import pq_speed  # noqa: E402
import train     # noqa: E402

MODELS = ("unet", "uvit", "mask_ae", "image_ae")
SECTIONS = ("train", "sample", "pq")
H200_BF16_TFLOPS = 790.0      # dense bf16 matmul peak measured on an H200
PQ_SETS = {"tiny": (8, 64, 48), "shapes": (200, 128, 128), "coco": (200, 640, 480)}   # pairs, W, H
SAMPLE_BATCH = {"tiny": 2, "shapes": 16, "coco": 32}

# -----------------------------------------------------------------------------
# 1. Workloads
# -----------------------------------------------------------------------------
# Each builder takes `put` (moves a CPU tensor to the device) and returns (model, loss_fn, B, side):
# loss_fn(module) -> scalar loss on one fixed synthetic batch already on the device, `module` the
# model or its compiled form; side = image pixels per side.


def _size_and_batch(preset: str, stage: str, batch: int) -> tuple[int, int]:
    """Training side (the crop if the preset crops) and batch of train.py's (preset, stage)."""
    p = train.PRESETS[preset][stage]
    return (p.get("crop") or p["image_size"]), (batch or p["batch_size"])


def _blob_ids(B: int, H: int, W: int, num_bits: int, gen: torch.Generator) -> torch.Tensor:
    """(B, H, W) int64 ids in 0..2^K-1 (0 = void): random 8x8-pixel blocks, so segments have area."""
    coarse = torch.randint(0, 2 ** num_bits, (B, 1, -(-H // 8), -(-W // 8)), generator=gen)
    return F.interpolate(coarse.float(), scale_factor=8.0, mode="nearest")[:, 0, :H, :W].long()


def unet_workload(preset: str, batch: int, gen: torch.Generator, put):
    """LDMSeg's denoiser: (B, 12, h, w) -> eps_pred, MSE against fixed noise."""
    size, B = _size_and_batch(preset, "2", batch)
    model = ldmseg.UNet(ldmseg.UNetConfig.preset(preset))                        # 12 inputs, 4 outputs as LDMSeg
    h = size // 8
    x = put(torch.randn(B, model.config.in_channels, h, h, generator=gen))       # (B, 12, h, w)
    t = put(torch.randint(0, 1000, (B,), generator=gen))
    eps = put(torch.randn(B, model.config.out_channels, h, h, generator=gen))    # (B, 4, h, w)
    return model, lambda m: F.mse_loss(m(x, t).float(), eps), B, size


def uvit_workload(preset: str, batch: int, gen: torch.Generator, put):
    """PDM's one-stream U-ViT: (x_t, m_t, t, text) -> (eps_pred, m0_pred), the two MSEs [PDM Alg. 1].

    Built as train.py builds it: the words text encoder, latent side = image_size / 8; a stand-in
    vocabulary of 40 words (the embedding table's size does not change the speed).
    """
    size, B = _size_and_batch(preset, "cogen", batch)
    cfg = dataclasses.replace(cogen.PDMConfig.preset(preset), text_encoder="words", latent_size=size // 8,
                              vocab=cogen.WordTokenizer.SPECIALS + tuple(f"w{i}" for i in range(40)))
    model = cogen.build_model(cfg)
    h, hm, L = cfg.latent_size, cfg.map_size, cfg.num_text_tokens
    x_t = put(torch.randn(B, cfg.latent_channels, h, h, generator=gen))          # (B, C, h, w)
    m_t = put(torch.randn(B, cfg.num_map_bits, hm, hm, generator=gen))           # (B, K, H_m, W_m)
    text = put(torch.randint(0, len(cfg.vocab), (B, L), generator=gen))        # (B, L) word ids
    t = put(torch.randint(0, 1000, (B,), generator=gen))
    eps, m0 = torch.randn_like(x_t), torch.randn_like(m_t).sign()               # targets: noise, bits

    def loss_fn(m):
        eps_pred, m0_pred = m(x_t, m_t, t, text)
        return F.mse_loss(eps_pred.float(), eps) + F.mse_loss(m0_pred.float(), m0)
    return model, loss_fn, B, size


def mask_ae_workload(preset: str, batch: int, gen: torch.Generator, put):
    """LDMSeg stage 1: ids -> bits -> (logits, mean, logvar), mask_ae_loss (point-sampled)."""
    size, B = _size_and_batch(preset, "1", batch)
    cfg = ldmseg.MaskAEConfig.preset(preset)
    model = ldmseg.MaskAutoencoder(cfg)
    ids = put(_blob_ids(B, size, size, cfg.num_bits, gen))                      # (B, H, W)
    bits = put(data.ids_to_bits(ids, cfg.num_bits))                             # (B, K, H, W)

    def loss_fn(m):
        logits, mean, logvar = m(bits, sample_posterior=cfg.sample_posterior)
        return ldmseg.mask_ae_loss(logits.float(), ids, mean.float(), logvar.float(), cfg)["loss"]
    return model, loss_fn, B, size


def image_ae_workload(preset: str, batch: int, gen: torch.Generator, put):
    """The KL-f8 image autoencoder: x -> (recon, mean, logvar), vae_loss (L1 + KL)."""
    size, B = _size_and_batch(preset, "vae", batch)
    cfg = ldmseg.ImageAEConfig.preset(preset)
    model = ldmseg.ImageAutoencoder(cfg)
    x = put(torch.rand(B, 3, size, size, generator=gen) * 2 - 1)               # (B, 3, H, W) in [-1, 1]

    def loss_fn(m):
        recon, mean, logvar = m(x)
        return ldmseg.vae_loss(recon.float(), x, mean.float(), logvar.float(), cfg.kl_weight)["loss"]
    return model, loss_fn, B, size


WORKLOADS = {"unet": unet_workload, "uvit": uvit_workload, "mask_ae": mask_ae_workload,
             "image_ae": image_ae_workload}


def build_workload(name: str, preset: str, batch: int, device: torch.device, channels_last: bool):
    """The workload on `device`, model and 4-d tensors channels-last if asked (same data either way)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, memory_format=fmt if x.dim() == 4 else torch.contiguous_format)
    model, loss_fn, B, side = WORKLOADS[name](preset, batch, torch.Generator().manual_seed(0), put)
    return model.to(device, memory_format=fmt), loss_fn, B, side


# -----------------------------------------------------------------------------
# 2. Timing
# -----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA); a no-op on the CPU, where every op is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, warmup: int, steps: int, device: torch.device) -> float:
    """Median wall time of `steps` calls of fn after `warmup` untimed ones (synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with train.py's kernel (train.adamw_kernel: fused on CUDA and CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, **train.adamw_kernel(device))


def train_step_fn(module, loss_fn, opt, device: torch.device, amp: torch.dtype | None):
    """One step: forward + loss under autocast, backward, AdamW, gradients freed. No .item(), no sync."""
    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(module)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def count_flops(model, loss_fn, device: torch.device, amp: torch.dtype | None) -> int:
    """FLOPs of one forward + backward of the uncompiled model (2 per multiply-add); grads discarded."""
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(MiB, label): CUDA's max allocated since the last reset, else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"   # KiB on Linux


def peak_tflops(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> float | None:
    """--peak-tflops, else the H200 bf16 dense figure when that is what runs, else None (no MFU)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and amp == torch.bfloat16 and "H200" in torch.cuda.get_device_name(device):
        return H200_BF16_TFLOPS
    return None


def bench_training(name: str, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Build one network, count its FLOPs, time its training step; one result row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, loss_fn, B, pixels = build_workload(name, args.preset, args.batch, device, args.channels_last)
    model.train()
    flops = count_flops(model, loss_fn, device, amp)
    module = torch.compile(model) if args.compile else model
    step = train_step_fn(module, loss_fn, make_optimizer(model, device), device, amp)
    sec = median_seconds(step, args.warmup, args.steps, device)
    mem, mem_label = peak_memory_mib(device)
    peak = peak_tflops(args, device, amp)
    return dict(model=name, batch=B, pixels=pixels, params=sum(p.numel() for p in model.parameters()),
                ips=B / sec, ms=1000 * sec, gflop=flops / 1e9, gflops=flops / sec / 1e9,
                mfu=None if peak is None else flops / sec / (peak * 1e12), mem=mem, mem_label=mem_label)


def print_training(rows: list[dict]) -> None:
    """Fixed-width table, one row per network."""
    print(f"{'model':9s} {'batch':>5s} {'side':>5s} {'params':>11s} {'img/s':>9s} {'ms/step':>9s} "
          f"{'GFLOP/step':>11s} {'GFLOP/s':>9s} {'MFU':>6s} {'peak MiB':>9s}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:5.1f}%"
        print(f"{r['model']:9s} {r['batch']:5d} {r['pixels']:5d} {r['params']:11,d} {r['ips']:9.2f} "
              f"{r['ms']:9.1f} {r['gflop']:11.2f} {r['gflops']:9.1f} {mfu:>6s} {r['mem']:9.0f}")
    if rows:
        print(f"(side: image pixels per side; peak MiB: {rows[0]['mem_label']})")


# -----------------------------------------------------------------------------
# 3. Sampling and PQ
# -----------------------------------------------------------------------------
# Sampling: ldmseg.segment on a batch of random images -- image AE encoder, the sampler's UNet
# calls (with self-conditioning), mask AE decoder at full size, panoptic thresholds. PAPER: DDIM 50
# [LDMSeg brief §4.3]; DPM-Solver++(2M) 20 is the fast alternative train.py also evaluates.


def bench_sampling(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> list[dict]:
    """images/s of LDMSeg's segment() per --samplers entry (after a warm-up run of 2 steps each)."""
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset(args.preset)).to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.unet = torch.compile(model.unet)
    size = train.PRESETS[args.preset]["2"]["image_size"]
    B = args.sample_batch or SAMPLE_BATCH[args.preset]
    image = (torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    rows = []
    for entry in args.samplers.split(","):
        sampler, steps = entry.split(":")[0], int(entry.split(":")[1])
        def run(n):
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                        enabled=amp is not None):
                ldmseg.segment(model, image, sampler=sampler, steps=n, generator=torch.Generator().manual_seed(0))
        run(2)                                         # warm-up: kernels, allocator, compilation
        sec = median_seconds(lambda: run(steps), 0, 1, device)
        rows.append(dict(sampler=f"{sampler} {steps}", batch=B, side=size, sec=sec, ips=B / sec))
    return rows


def bench_pq(args: argparse.Namespace) -> dict:
    """pairs/s of evaluate.evaluate_files on pq_speed.py's synthetic set (best of 2)."""
    n, W, H = PQ_SETS[args.preset]
    n = args.pq_images or n
    workers = evaluate.default_workers()
    with tempfile.TemporaryDirectory(prefix="speed_pq_") as tmp:
        pq_speed.write_synthetic_set(Path(tmp), n, W, H, seed=0, workers=workers)
        sec = min(pq_speed.time_ours(Path(tmp), workers)[0] for _ in range(2))
    return dict(pairs=n, side=f"{W}x{H}", workers=workers, sec=sec, pps=n / sec)


# -----------------------------------------------------------------------------
# 4. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training, sampling and PQ throughput of the project's networks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to measure")
    g.add_argument("--preset", default="shapes", choices=("tiny", "shapes", "coco"), help="model and data sizes")
    g.add_argument("--models", default=",".join(MODELS), help=f"networks to train-step, comma-separated: {MODELS}")
    g.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {SECTIONS}")
    g.add_argument("--batch", type=int, default=0, help="training batch; 0 = train.py's preset batch")
    g.add_argument("--sample-batch", type=int, default=0, help=f"sampling batch; 0 = {SAMPLE_BATCH}")
    g.add_argument("--samplers", default="ddim:50,dpm++:20",
                   help="LDMSeg sampler:steps pairs to time (ddim | dpm++ | ddpm); PAPER: DDIM 50")
    g.add_argument("--pq-images", type=int, default=0, help=f"PQ pairs; 0 = the preset's {PQ_SETS}")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=5, help="timed training steps (the median is reported)")
    g.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation, allocator)")
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help=f"device peak for MFU; 0 = {H200_BF16_TFLOPS:g} for bf16 on an H200, else no MFU")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    g = p.add_argument_group("device and fast paths")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cpu, ...")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for conv nets")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, given, known in (("--models", args.models, MODELS), ("--sections", args.sections, SECTIONS)):
        wrong = [x for x in given.split(",") if x not in known]
        if wrong:
            parser.error(f"{flag}: unknown {', '.join(wrong)}; choose from {', '.join(known)}")
    for entry in args.samplers.split(","):
        name, _, steps = entry.partition(":")
        if name not in ("ddim", "dpm++", "ddpm") or not steps.isdigit() or int(steps) < 1:
            parser.error(f"--samplers: {entry!r} is not sampler:steps (ddim | dpm++ | ddpm, steps >= 1), e.g. ddim:50")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = train.pick_device(args.device)
    amp = None if args.dtype == "fp32" or (args.dtype == "auto" and device.type != "cuda") else torch.bfloat16
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type}, {torch.get_num_threads()} threads")
    print(f"preset {args.preset} | device {name} | dtype {'bf16 autocast' if amp else 'fp32'} | "
          f"compile {args.compile} | channels_last {args.channels_last} | torch {torch.__version__}")
    sections = args.sections.split(",")
    if "train" in sections:
        print(f"\ntraining step (forward + backward + AdamW), median of {args.steps} after {args.warmup} warm-up")
        print_training([bench_training(m, args, device, amp) for m in args.models.split(",")])
    if "sample" in sections:
        print("\nLDMSeg sampling (encode image, sampler, decode mask), random weights")
        print(f"{'sampler':9s} {'batch':>5s} {'side':>5s} {'s/batch':>9s} {'img/s':>9s}")
        for r in bench_sampling(args, device, amp):
            print(f"{r['sampler']:9s} {r['batch']:5d} {r['side']:5d} {r['sec']:9.2f} {r['ips']:9.2f}")
    if "pq" in sections:
        r = bench_pq(args)
        print(f"\nPQ evaluation (evaluate.evaluate_files, {r['workers']} workers): {r['pairs']} pairs of "
              f"{r['side']} in {r['sec']:.2f} s = {r['pps']:.1f} pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

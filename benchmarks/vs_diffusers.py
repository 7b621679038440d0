# SPDX-License-Identifier: MIT
"""
benchmarks/vs_diffusers.py -- our UNet against diffusers' UNet2DConditionModel: same network, one run.

Builds ldmseg.UNet at a preset (LDMSeg's denoiser: 12 inputs, 4 outputs, no cross-attention) and
diffusers' UNet2DConditionModel at the same configuration, checks that they are the same network,
then times both, interleaved, so that both see the same machine load:
  * same configuration: block widths, layers per block, attention levels (CrossAttn*Block2D where
    ours has transformers, plain Down/UpBlock2D elsewhere), heads (diffusers' `attention_head_dim`
    holds SD-1.x's head count, as its SD-1.x config does), GroupNorm groups and eps, GEGLU, 1x1-conv
    projections, SDPA attention (diffusers' default AttnProcessor2_0 and ours);
  * cross-attention: diffusers cannot build CrossAttn blocks without a cross_attention_dim, so one
    is given (it only sizes attn2) and then attn2 and norm2 are removed from every
    BasicTransformerBlock (attn2 = norm2 = None, a state diffusers' forward supports), exactly as
    LDMSeg removes them; the model is called with encoder_hidden_states=None. Both networks then
    hold the same tensors under the same names;
  * evidence: equal parameter counts, equal name -> shape maps, and our weights loaded into
    diffusers' model by name (strict) give the same output on the same input (max |diff| printed);
  * timing: per round, ours then diffusers: a training step (forward + backward, + AdamW unless
    --no-optimizer), and a no-grad forward; same batch, input, dtype and optimizer settings (fused
    AdamW on CUDA, foreach elsewhere). With --compile the torch.compile form of each runs in the
    same rounds beside its eager form. Medians over --rounds; ratio = ours images/s / diffusers';
    MFU = the training step's FLOPs (torch.utils.flop_counter) per second / 790 TFLOP/s on an H200.

Measured on one H200 (diffusers 0.42.1, PyTorch 2.11.0+cu130, bf16 autocast; coco = SD-1.x without
cross-attention, 815,556,484 parameters, batch 32 x 64^2 latents = 512^2 images; our weights in
diffusers' model: max |diff| 0 in fp32), forward + backward + AdamW:
  eager: ours 308.2 / 305.8 ms, diffusers 304.7 / 303.1 ms (two runs): ratio 0.989 / 0.991, MFU 31.5 %;
  compiled: ours 230.0 ms, diffusers 229.9 ms: ratio 1.000, MFU 41.8 %; ours compiled / diffusers
  eager 1.318; channels-last (eager, both): ours 315.5, diffusers 334.8 ms -- slower for both.
  The two are the same kernels in the same order; torch.compile is what makes a step faster.
  python benchmarks/vs_diffusers.py --preset coco --device cuda --rounds 10 --warmup 2            # 1.1 min
  python benchmarks/vs_diffusers.py --preset coco --device cuda --rounds 10 --warmup 2 --compile --no-forward   # 4.9 min
Measured on the CPU (diffusers 0.42.1, torch 2.15, fp32, the 2-core x86 VM shared with training
jobs, nice 19; max |diff| 0 at every size below):
  shapes (3,887,268 parameters), batch 16, 16x16, forward + backward + AdamW: ours / diffusers
  throughput 0.96-1.07 in the four runs of >= 10 rounds on one thread (1.038 on the quietest),
  forward alone 0.93-1.08. The two run the same kernels in the same order (torch.profiler: the same
  convolution, mm, SDPA and norm calls); diffusers adds a division per ResNet (output_scale_factor)
  and some copies. The ratio is parity within the noise of a loaded machine.
  coco, batch 1, forward + backward: 64x64, 2 rounds (4 min in all, load rising during the run):
  31.6 s vs 27.0 s (0.85); 32x32, 6 rounds: 37.9 s vs 38.5 s (1.01) under heavier load.

Contents
  1. The two networks     ours from UNetConfig; diffusers' at the same configuration, attn2 removed
  2. Same network check   names, shapes, counts; our weights into diffusers'; max |output diff|
  3. Interleaved timing   (vs_uvit.py uses it too)
  4. Command line

diffusers is never a dependency of the project and is imported here only. Install it in a scratch
virtual environment that sees this one's torch:
  python -m venv --system-site-packages /tmp/benchenv && /tmp/benchenv/bin/pip install diffusers
  /tmp/benchenv/bin/python benchmarks/vs_diffusers.py --preset shapes
  /tmp/benchenv/bin/python benchmarks/vs_diffusers.py --preset coco --batch 1 --latent 64 --no-optimizer --rounds 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ldmseg  # noqa: E402  (the project root is put on the path just above)
import train   # noqa: E402
from speed import H200_BF16_TFLOPS  # noqa: E402  (benchmarks/, this file's folder, is on the path)

# -----------------------------------------------------------------------------
# 1. The two networks
# -----------------------------------------------------------------------------


def import_diffusers():
    """The diffusers module (reference only; never a project dependency), or a message on how to get it."""
    try:
        import diffusers
    except ImportError:
        raise SystemExit("diffusers is not installed here. In a scratch venv: python -m venv "
                         "--system-site-packages /tmp/benchenv && /tmp/benchenv/bin/pip install diffusers")
    return diffusers


def diffusers_unet(cfg: ldmseg.UNetConfig, latent: int):
    """UNet2DConditionModel at `cfg`'s configuration, with cross-attention removed when ours has none."""
    UNet2DConditionModel = import_diffusers().UNet2DConditionModel
    attn = cfg.attention_levels
    ref = UNet2DConditionModel(
        sample_size=latent, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads,                # QUIRK: diffusers' name for SD-1.x's head count
        norm_num_groups=cfg.norm_groups, norm_eps=1e-5, dropout=cfg.dropout,
        cross_attention_dim=cfg.context_dim or cfg.block_out_channels[-1])   # sizes attn2 only
    if cfg.context_dim is None:                          # remove attn2 / norm2, as LDMSeg does
        for m in ref.modules():
            if type(m).__name__ == "BasicTransformerBlock":
                m.attn2, m.norm2 = None, None
    return ref


# -----------------------------------------------------------------------------
# 2. Same network check
# -----------------------------------------------------------------------------


SAME_OUTPUT_TOL = 1e-4    # relative to max(1, max |output|); the check runs in fp32, TF32 off


def check_same_network(ours, ref, x: torch.Tensor, t: torch.Tensor) -> dict:
    """Names, shapes and counts equal; our weights into diffusers' (strict); max |output difference|.

    Our weights are first perturbed (+ 0.05 N(0, 1), seeded) so that no layer is zero or identity at
    initialisation: every tensor then matters to the output being compared.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    a, b = ours.state_dict(), ref.state_dict()
    if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
        raise SystemExit(f"different networks: names only in one of them: {sorted(set(a) ^ set(b))[:10]}")
    ref.load_state_dict(a, strict=True)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # full fp32 for the check
    try:
        with torch.no_grad():
            out = ours(x, t)
            diff = (out - ref(x, t, None, return_dict=False)[0]).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return dict(params_ours=sum(p.numel() for p in ours.parameters()),
                params_ref=sum(p.numel() for p in ref.parameters()), tensors=len(a), max_abs_diff=diff,
                max_abs_out=out.abs().max().item())


# -----------------------------------------------------------------------------
# 3. Interleaved timing
# -----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def step_fns(call, model, x, t, eps, device, amp, optimizer: bool):
    """(train step, no-grad forward) closures; call(x, t) -> eps_pred. No host syncs inside.

    `model` owns the parameters (the optimizer's); `call` may be its compiled form.
    """
    opt = None
    if optimizer:
        kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **kind)
    ctx = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731

    def train_step():
        with ctx():
            loss = F.mse_loss(call(x, t).float(), eps)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)              # frees the gradients before the other model runs

    def forward():
        with torch.no_grad(), ctx():
            call(x, t)
    return train_step, forward


def interleaved(fns: dict, rounds: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per name; each round runs every fn once after `warmup` untimed rounds.

    Odd rounds run the fns in reverse order, so neither network always runs first (cache, load).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            times[k].append(timed(fns[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


def train_flops(model, call, x, t, device, amp) -> int:
    """FLOPs of one forward + backward (torch.utils.flop_counter: 2 per multiply-add); grads discarded."""
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        call(x, t).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, amp) -> float | None:
    """790 TFLOP/s for bf16 on an H200 (dense bf16 matrix products there), else None (no MFU printed)."""
    if device.type == "cuda" and amp == torch.bfloat16 and "H200" in torch.cuda.get_device_name(device):
        return H200_BF16_TFLOPS
    return None


def compare(nets: dict, x, t, eps, B: int, args, device, amp) -> None:
    """Time each network of `nets` ({"ours": (model, call), <peer>: (model, call)}) and print the table.

    Eager always; with args.compile also each network's torch.compile form, in the same rounds.
    Ratios: ours / peer throughput for eager against eager, compiled against compiled, and ours
    compiled against the peer eager (how the papers' code runs its network).
    """
    forms = {}
    for name, (model, call) in nets.items():
        forms[(name, "eager")] = (model, call)
        if args.compile:
            forms[(name, "compiled")] = (model, torch.compile(call))
    fns = {}
    for key, (model, call) in forms.items():
        step, fwd = step_fns(call, model, x, t, eps, device, amp, not args.no_optimizer)
        fns[key + ("train",)] = step
        if not args.no_forward:
            fns[key + ("forward",)] = fwd
    med = interleaved(fns, args.rounds, args.warmup, device)
    flops = {name: train_flops(model, call, x, t, device, amp) for name, (model, call) in nets.items()}
    peak = peak_tflops(device, amp)
    kind = "forward + backward" + ("" if args.no_optimizer else " + AdamW")
    print(f"\n{'network':22s} {'what':30s} {'ms':>9s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for (name, form, what), sec in med.items():
        tf = flops[name] / sec / 1e12 if what == "train" else None
        mfu = f"{100 * tf / peak:5.1f}%" if tf is not None and peak else "-"
        print(f"{name + ' ' + form:22s} {kind if what == 'train' else 'forward (no grad)':30s} "
              f"{1000 * sec:9.1f} {B / sec:9.2f} {'-' if tf is None else f'{tf:8.1f}':>8s} {mfu:>6s}")
    peer = next(n for n in nets if n != "ours")
    pairs = [("eager", "eager")] + ([("compiled", "compiled"), ("compiled", "eager")] if args.compile else [])
    for what in ("train", "forward"):
        for a, b in pairs:
            if ("ours", a, what) in med:
                ratio = med[(peer, b, what)] / med[("ours", a, what)]
                print(f"ours {a} / {peer} {b}, {what}: throughput ratio {ratio:.3f}")
    if peak:
        print(f"(MFU: the training step's FLOPs (forward + backward, torch.utils.flop_counter) per second / "
              f"{peak:g} TFLOP/s)")


# -----------------------------------------------------------------------------
# 4. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Our UNet against diffusers' UNet2DConditionModel, same configuration.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=("tiny", "shapes", "coco"), help="UNet configuration")
    p.add_argument("--batch", type=int, default=0, help="batch; 0 = train.py's stage-2 preset batch")
    p.add_argument("--latent", type=int, default=0, help="latent side h = w; 0 = the preset's image_size / 8")
    add_timing_arguments(p, rounds=6, warmup=1)
    p.add_argument("--channels-last", action="store_true", help="both networks and the input channels-last")
    return p


def add_timing_arguments(p: argparse.ArgumentParser, rounds: int, warmup: int) -> None:
    """The flags `compare` reads, and the device / dtype / threads ones (shared with vs_uvit.py)."""
    p.add_argument("--rounds", type=int, default=rounds, help="timed rounds (medians reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    p.add_argument("--no-optimizer", action="store_true", help="forward + backward only (no AdamW state: less memory)")
    p.add_argument("--no-forward", action="store_true", help="skip the no-grad forward timing")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cpu, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype: auto = bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="also time both networks compiled (torch.compile), in the same rounds as eager")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers = import_diffusers()
    device = train.pick_device(args.device)
    amp = None if args.dtype == "fp32" or (args.dtype == "auto" and device.type != "cuda") else torch.bfloat16
    cfg = ldmseg.UNetConfig.preset(args.preset)
    stage2 = train.PRESETS[args.preset]["2"]
    B, h = args.batch or stage2["batch_size"], args.latent or stage2["image_size"] // 8
    torch.manual_seed(0)
    ours, ref = ldmseg.UNet(cfg).to(device), diffusers_unet(cfg, h).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.in_channels, h, h, generator=gen).to(device)         # (B, 12, h, w)
    t = torch.randint(0, 1000, (B,), generator=gen).to(device)
    eps = torch.randn(B, cfg.out_channels, h, h, generator=gen).to(device)      # (B, 4, h, w)
    same = check_same_network(ours, ref, x, t)
    if args.channels_last:                               # after the check: the layout changes no value
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    print(f"preset {args.preset} | batch {B} | latent {h}x{h} | device {device_name(device)} | "
          f"dtype {'bf16 autocast' if amp else 'fp32'} | compile {args.compile} | channels_last "
          f"{args.channels_last} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print(f"same network: {same['params_ours']:,} parameters (ours) = {same['params_ref']:,} (diffusers), "
          f"{same['tensors']} tensors with equal names and shapes; our weights in diffusers' model: "
          f"max |output difference| {same['max_abs_diff']:.2e} (fp32; max |output| {same['max_abs_out']:.2f})")
    if same["max_abs_diff"] > SAME_OUTPUT_TOL * max(1.0, same["max_abs_out"]):
        raise SystemExit(f"not the same network: outputs differ by {same['max_abs_diff']:.2e} "
                         f"(> {SAME_OUTPUT_TOL:g} x max(1, max |output|)); timing them against each other would mislead")
    compare({"ours": (ours, ours), "diffusers": (ref, lambda x, t: ref(x, t, None, return_dict=False)[0])},
            x, t, eps, B, args, device, amp)
    return 0


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' on CUDA, 'cpu, 2 threads' elsewhere."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())

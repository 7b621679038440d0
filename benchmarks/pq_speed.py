# SPDX-License-Identifier: MIT
"""
benchmarks/pq_speed.py -- how fast evaluate.py scores COCO-format files, against PNG decoding alone.

Scoring panoptic predictions from files is bounded by PNG decoding: every ground-truth and predicted
PNG must be decompressed. This script writes a synthetic COCO-sized set (640x480, ~10-40 blob-shaped
segments per image, things + stuff, some crowd, void borders) and times
  (a) decoding alone: PIL open + np.asarray of every PNG the evaluation reads;
  (b) evaluate.evaluate_files in one process and with worker processes;
  (c) optionally panopticapi's evaluator (single process, and its own pq_compute, which uses one
      process per core) from a checkout given by --panopticapi, checking that the numbers agree.
and prints the ratios. The goal: (b) within 1.5x of (a), and ahead of (c).

Contents
  1. Synthetic panoptic set     blob-shaped things over wavy stuff bands; a jittered prediction
  2. Timers                     decode-only, evaluate.py, panopticapi
  3. Command line

Measured (2-core x86 VM shared with other jobs, 1000 pairs, best of 3, ms per GT + prediction pair):
  decode 8.9, ours 12.1 (1.36x decode), panopticapi single process 17.8 (1.48x ours);
  with 2 processes: decode 5.8, ours 8.2 (1.40x decode), panopticapi pq_compute 9.0.
  Results agree with panopticapi's to 0 (single process) and 8.9e-16 (its multi-process sums).

Run
  python benchmarks/pq_speed.py --num-images 1000 --workers 2 --panopticapi /path/to/panopticapi
  (--data-dir DIR keeps the generated files for another run; panopticapi is only imported, never
  a dependency of the project.)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data      # noqa: E402  (the project root is put on the path just above)
import evaluate  # noqa: E402

# -----------------------------------------------------------------------------
# 1. Synthetic panoptic set
# -----------------------------------------------------------------------------
# COCO-like statistics without COCO: 80 thing and 53 stuff categories (COCO's counts), 2-5 stuff
# bands with wavy borders, 8-35 things drawn as irregular polygons ("blobs") with a 1-pixel void
# outline, as COCO leaves unlabelled borders. The prediction redraws the same scene with jitter,
# drops some things, adds a few false ones and changes some categories, so every PQ term occurs.

THINGS, STUFF = list(range(1, 81)), list(range(81, 134))
CATEGORIES = [{"id": c, "name": f"c{c}", "isthing": int(c in THINGS)} for c in THINGS + STUFF]


def _scene(rng: np.random.Generator, W: int, H: int) -> dict:
    """Random scene description: stuff bands and thing blobs, in the GT's terms."""
    n_bands = int(rng.integers(2, 6))
    bands = [dict(y=float(y), amp=float(rng.uniform(5, 30)), freq=float(rng.uniform(0.005, 0.03)),
                  cat=int(rng.choice(STUFF))) for y in np.sort(rng.uniform(0, H, n_bands))]
    things = [dict(cx=float(rng.uniform(0, W)), cy=float(rng.uniform(0, H)), r=float(rng.uniform(8, 90)),
                   shape=rng.uniform(0.6, 1.4, int(rng.integers(5, 10))).tolist(),
                   cat=int(rng.choice(THINGS)), crowd=bool(rng.random() < 0.05))
              for _ in range(int(rng.integers(8, 36)))]
    return {"bands": bands, "things": things}


def _blob(t: dict, jitter: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Polygon vertices of one blob: radii varying around the centre, optionally jittered."""
    k = len(t["shape"])
    cx, cy = t["cx"] + jitter * t["r"] * rng.normal(), t["cy"] + jitter * t["r"] * rng.normal()
    scale = 1.0 + jitter * rng.normal()
    ang = np.linspace(0, 2 * np.pi, k, endpoint=False)
    radii = scale * t["r"] * np.array(t["shape"])
    return list(zip((cx + radii * np.cos(ang)).tolist(), (cy + radii * np.sin(ang)).tolist()))


def _render(scene: dict, W: int, H: int, jitter: float, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Draw a scene into (H, W) int32 labels 1..S (0 = void) and the category/crowd of each label."""
    canvas = Image.new("I", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    segs = []
    xs = np.arange(0, W + 8, 8)
    for b in scene["bands"]:                      # each band covers everything below its wavy top
        shift = jitter * 20 * rng.normal()
        top = b["y"] + shift + b["amp"] * np.sin(b["freq"] * xs)
        segs.append((b["cat"], False))
        draw.polygon([(0, H)] + list(zip(xs.tolist(), top.tolist())) + [(W, H)], fill=len(segs))
    for t in scene["things"]:
        segs.append((t["cat"], t["crowd"]))
        draw.polygon(_blob(t, jitter, rng), fill=len(segs), outline=0)
    return np.asarray(canvas, np.int32), segs


def _to_coco(labels: np.ndarray, segs: list, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Labels -> random 24-bit segment ids and segments_info (segments fully hidden are dropped)."""
    ids = rng.choice(256 ** 3 - 1, len(segs) + 1, replace=False) + 1
    ids[0] = 0
    id_map = ids[labels]
    present, area = np.unique(labels, return_counts=True)
    info = [{"id": int(ids[k]), "category_id": segs[k - 1][0], "iscrowd": int(segs[k - 1][1]), "area": int(a)}
            for k, a in zip(present.tolist(), area.tolist()) if k > 0]
    return id_map, info


def _write_item(args: tuple) -> tuple[dict, dict]:
    """Write GT and prediction PNGs of item i; returns their annotations."""
    root, i, W, H, seed = args
    rng = np.random.default_rng([seed, i])
    scene = _scene(rng, W, H)
    gt_labels, gt_segs = _render(scene, W, H, 0.0, rng)
    pred_scene = {"bands": scene["bands"], "things": [t for t in scene["things"] if rng.random() > 0.15]}
    pred_scene["things"] += _scene(rng, W, H)["things"][: int(rng.integers(0, 5))]     # false positives
    pred_labels, pred_segs = _render(pred_scene, W, H, 0.05, rng)
    pred_segs = [(c if rng.random() < 0.9 else int(rng.choice(THINGS)), False) for c, _ in pred_segs]
    anns = []
    for kind, labels, segs in (("gt", gt_labels, gt_segs), ("pred", pred_labels, pred_segs)):
        id_map, info = _to_coco(labels, segs, rng)
        data.write_panoptic_png(Path(root) / kind / f"{i:06d}.png", id_map)
        anns.append({"image_id": i, "file_name": f"{i:06d}.png", "segments_info": info})
    return anns[0], anns[1]


def write_synthetic_set(root: Path, num_images: int, W: int, H: int, seed: int, workers: int) -> None:
    """gt/, pred/, gt.json, pred.json under root (skipped when root/pred.json already exists)."""
    if (root / "pred.json").exists():
        return
    for kind in ("gt", "pred"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), i, W, H, seed) for i in range(num_images)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        anns = pool.map(_write_item, jobs, chunksize=16)
    data.write_json(root / "gt.json", {"annotations": [a for a, _ in anns], "categories": CATEGORIES})
    data.write_json(root / "pred.json", {"annotations": [b for _, b in anns]})


# -----------------------------------------------------------------------------
# 2. Timers
# -----------------------------------------------------------------------------


def _decode_pair(paths: tuple[str, str]) -> int:
    """The floor of any file-based evaluation: decode both PNGs into arrays."""
    total = 0
    for p in paths:
        with Image.open(p) as im:
            total += np.asarray(im).shape[0]
    return total


def time_decode(root: Path, workers: int) -> float:
    """Seconds to decode every GT and prediction PNG (workers = 1: in this process)."""
    names = sorted(os.listdir(root / "gt"))
    pairs = [(str(root / "gt" / n), str(root / "pred" / n)) for n in names]
    t0 = time.perf_counter()
    if workers <= 1:
        for pair in pairs:
            _decode_pair(pair)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            list(pool.imap(_decode_pair, pairs, chunksize=max(1, len(pairs) // (workers * 8))))
    return time.perf_counter() - t0


def time_ours(root: Path, workers: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = evaluate.evaluate_files(str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"),
                                     str(root / "pred"), workers=workers)
    return time.perf_counter() - t0, result


def time_panopticapi(root: Path, checkout: str) -> dict:
    """panopticapi's single-process loop and its pq_compute (one process per core); output hidden."""
    sys.path.insert(0, checkout)
    from panopticapi import evaluation as pe   # reference only; not a project dependency
    gt = json.loads((root / "gt.json").read_text())
    pred = {a["image_id"]: a for a in json.loads((root / "pred.json").read_text())["annotations"]}
    cats = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        stat = pe.pq_compute_single_core(0, pairs, str(root / "gt"), str(root / "pred"), cats)
        res = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            res[name], per_class = stat.pq_average(cats, isthing=isthing)
        res["per_class"] = per_class
        out["single"] = (time.perf_counter() - t0, res)
        t0 = time.perf_counter()
        res = pe.pq_compute(str(root / "gt.json"), str(root / "pred.json"),
                            str(root / "gt"), str(root / "pred"))
        out["pq_compute"] = (time.perf_counter() - t0, res)
    return out


def max_abs_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over pq / sq / rq of All, Things, Stuff and every category."""
    rows = [(a[s], b[s]) for s in ("All", "Things", "Stuff")]
    rows += [(a["per_class"][c], b["per_class"][c]) for c in b["per_class"]]
    return max(abs(float(x[k]) - float(y[k])) for x, y in rows for k in ("pq", "sq", "rq"))


# -----------------------------------------------------------------------------
# 3. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time evaluate.py's PQ against PNG decoding and panopticapi.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000, help="ground-truth / prediction pairs")
    p.add_argument("--width", type=int, default=640, help="image width (COCO-sized: 640)")
    p.add_argument("--height", type=int, default=480, help="image height (COCO-sized: 480)")
    p.add_argument("--workers", type=int, default=evaluate.default_workers(), help="worker processes")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds; the fastest is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    p.add_argument("--data-dir", help="keep the synthetic set here (reused if present); default: a temp dir")
    p.add_argument("--panopticapi", help="a panopticapi checkout (the folder holding panopticapi/) "
                   "to time and compare with")
    return p


def run(args: argparse.Namespace, root: Path) -> None:
    t0 = time.perf_counter()
    write_synthetic_set(root, args.num_images, args.width, args.height, args.seed, args.workers)
    print(f"data: {args.num_images} pairs of {args.width}x{args.height} PNGs in {root} "
          f"({time.perf_counter() - t0:.1f}s)")
    best = {}
    for _ in range(args.repeats):                 # interleaved, so a load spike hits every timer alike
        for name, fn in (("decode x1", lambda: time_decode(root, 1)),
                         ("ours x1", lambda: time_ours(root, 1)[0]),
                         (f"decode x{args.workers}", lambda: time_decode(root, args.workers)),
                         (f"ours x{args.workers}", lambda: time_ours(root, args.workers)[0])):
            best[name] = min(best.get(name, float("inf")), fn())
    for name, sec in best.items():
        print(f"{name:16s} {sec:7.2f}s  {1000 * sec / args.num_images:6.2f} ms/image")
    w = args.workers
    print(f"ours / decode, one process:  {best['ours x1'] / best['decode x1']:.2f}")
    print(f"ours / decode, {w} processes: {best[f'ours x{w}'] / best[f'decode x{w}']:.2f}")
    if args.panopticapi:
        ref = time_panopticapi(root, args.panopticapi)
        ours = time_ours(root, 1)[1]
        for name, (sec, res) in ref.items():
            diff = max_abs_difference(ours, res)
            print(f"panopticapi {name:12s} {sec:7.2f}s   max |ours - panopticapi| = {diff:.3g}")
        print(f"panopticapi single process / ours x1: {ref['single'][0] / best['ours x1']:.2f}")
        print(f"panopticapi pq_compute ({os.cpu_count()} processes) / ours x{w}: "
              f"{ref['pq_compute'][0] / best[f'ours x{w}']:.2f}")
    print("PQ (ours): " + evaluate.format_table(time_ours(root, w)[1]).replace("\n", "\n           "))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir:
        run(args, Path(args.data_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="pq_speed_") as tmp:
            run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

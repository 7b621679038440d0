# SPDX-License-Identifier: MIT
"""
data.py -- panoptic data for both papers: COCO panoptic I/O, map encodings, the Shapes dataset.

Everything the models read comes through this file, in one format: the COCO panoptic format
(Kirillov et al., "Panoptic Segmentation", CVPR 2019; the format of COCO 2017 panoptic and ADE20k
panoptic). A folder in that format is a set of RGB images, one PNG per image whose colour encodes a
segment id, and one JSON file that lists each segment's category. The embedded **Shapes** dataset is
written in the same format, so one loader, one trainer and one evaluator serve Shapes, COCO and ADE20k.

Contents
  1. COCO panoptic file format      rgb2id / id2rgb, PNG and JSON read / write, clear errors
  2. Map encodings                  [LDMSeg §3.1] random id remap (or raster ids, an option) + analog
                                    bits, [PDM §2.5] category bits, colour rendering of maps
  3. Shapes                         the procedural dataset writer (images, panoptic PNG + JSON,
                                    captions, 16-bit depth), deterministic per (seed, i)
  4. Dataset                        one torch Dataset for any COCO-format panoptic folder, paired
                                    image / map transforms (maps always nearest)
  5. Command line                   python data.py shapes --out DIR --size 128 --num-train N ...

Run
  python data.py shapes --out data/shapes --size 128 --num-train 4000 --num-val 200 --seed 0
  python data.py show --data data/shapes --split val --index 0 --out item.png

Shape legend
  B batch, H,W pixels, K bits, S segments.  Ids maps are int64 with 0 = void.

Deviations from the official code (and why)
  * DEVIATION: the LDMSeg code stores bits LSB first and the PDM code MSB first; we keep each paper's
    own order (LSB first for LDMSeg instance ids, MSB first for PDM category ids) because the order
    only permutes channels, and keeping it makes weights and pictures comparable with each paper.
  * DEVIATION: PDM resizes label maps with Lanczos [PDM brief §2.4, §8.11], which invents ids at
    boundaries; every label map here is resized nearest.
  * DEVIATION: LDMSeg asserts fewer than 2^K segments per image and crashes otherwise; we drop the
    smallest segments to void (counted per item in `dropped_segments`, summed and logged by the
    trainer) -- see `cap_segments`.
  * Bad files (missing, truncated, corrupt, PNG and JSON disagreeing) raise PanopticFormatError
    naming the file; with `skip_bad` (train.py --skip-bad-samples) a bad item is replaced by the next
    good one and reported in the item's `skipped` list. The fault table: docs/faults.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

# -----------------------------------------------------------------------------
# 1. COCO panoptic file format                         [COCO panoptic format; panopticapi]
# -----------------------------------------------------------------------------
# A panoptic PNG stores the segment id of each pixel in its colour: id = R + 256 G + 256^2 B.
# id 0 is void (unlabelled). Each id that occurs in the PNG has one entry in the JSON's
# annotations[k]["segments_info"] with its category_id, iscrowd, area and bbox, and every entry
# must occur in the PNG (panopticapi's rule; we check both directions).


class PanopticFormatError(ValueError):
    """A file in COCO panoptic format is missing, unreadable or inconsistent; the message names it."""


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Colour -> segment id.  rgb: (H, W, 3) uint8  ->  (H, W) int64, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment id -> colour, the inverse of `rgb2id`.  ids: (H, W) int, < 256^3  ->  (H, W, 3) uint8."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256 ** 3:
        raise ValueError(f"segment ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a panoptic PNG.  Returns (H, W) int64 segment ids, 0 = void."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                raise PanopticFormatError(f"{path}: panoptic PNG must be RGB, got mode {im.mode}")
            return rgb2id(np.asarray(im))
    except FileNotFoundError:
        raise PanopticFormatError(f"{path}: panoptic PNG not found") from None
    except PanopticFormatError:
        raise
    except Exception as exc:  # PIL raises many types for truncated / corrupt files
        raise PanopticFormatError(f"{path}: cannot read panoptic PNG ({exc})") from None


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Write (H, W) integer segment ids as a COCO panoptic PNG."""
    Image.fromarray(id2rgb(ids)).save(path)


def read_json(path: str | os.PathLike) -> Any:
    """json.load with an error that names the file. JSON is UTF-8 (RFC 8259), whatever the locale."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PanopticFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PanopticFormatError(f"{path}: not valid JSON ({exc})") from None
    except IsADirectoryError:
        raise PanopticFormatError(f"{path}: a folder, not a JSON file") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open any image as RGB, EXIF orientation applied (phones store rotated JPEGs + a tag).

    Grayscale (L, I;16), alpha (LA, RGBA: alpha dropped), palette (P) and CMYK all become RGB.
    16-bit grayscale is scaled to 8 bits rather than clipped.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return im.convert("RGB")
    except FileNotFoundError:
        raise PanopticFormatError(f"{path}: image not found") from None
    except Exception as exc:
        raise PanopticFormatError(f"{path}: cannot read image ({exc})") from None


def segment_bbox(mask: np.ndarray) -> list[int]:
    """COCO bbox [x, y, w, h] of a boolean (H, W) mask (all zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def make_segments_info(ids: np.ndarray, categories: dict[int, int] | None = None,
                       crowd: Sequence[int] = ()) -> list[dict]:
    """segments_info for every non-void id in `ids` (H, W); category 1 unless `categories` maps it."""
    out = []
    uniq, counts = np.unique(ids, return_counts=True)
    for sid, area in zip(uniq.tolist(), counts.tolist()):
        if sid == 0:
            continue
        out.append({"id": int(sid), "category_id": int((categories or {}).get(sid, 1)),
                    "iscrowd": int(sid in crowd), "area": int(area), "bbox": segment_bbox(ids == sid)})
    return out


class PanopticWriter:
    """Write predictions as a COCO panoptic folder: out/panoptic/<name>.png + out/panoptic.json.

    This is the format panopticapi's pq_compute and `evaluate.py --pred-json/--pred-dir` read.
    """

    def __init__(self, out: str | os.PathLike, categories: list[dict] | None = None):
        self.out = Path(out)
        (self.out / "panoptic").mkdir(parents=True, exist_ok=True)
        self.categories = categories or [{"id": 1, "name": "segment", "supercategory": "segment", "isthing": 1}]
        self.images, self.annotations = [], []

    def add(self, file_name: str, image_id: int | str, ids: np.ndarray, categories: dict[int, int] | None = None) -> None:
        """ids: (H, W) int segment ids of one image (0 = void); categories: {id: category_id} (default 1)."""
        name = Path(file_name).stem + ".png"
        write_panoptic_png(self.out / "panoptic" / name, ids)
        self.images.append({"id": image_id, "file_name": file_name, "height": int(ids.shape[0]), "width": int(ids.shape[1])})
        self.annotations.append({"image_id": image_id, "file_name": name,
                                 "segments_info": make_segments_info(ids, categories)})

    def close(self) -> Path:
        write_json(self.out / "panoptic.json",
                   {"images": self.images, "annotations": self.annotations, "categories": self.categories})
        return self.out / "panoptic.json"


def check_annotation(ids: np.ndarray, segments_info: list[dict], where: str) -> None:
    """Check that the PNG and its JSON entry agree; raise PanopticFormatError naming `where` if not."""
    json_ids = [s["id"] for s in segments_info]
    if len(set(json_ids)) != len(json_ids):
        dup = sorted({i for i in json_ids if json_ids.count(i) > 1})
        raise PanopticFormatError(f"{where}: duplicate segment ids in JSON: {dup[:10]}")
    png_ids = set(np.unique(ids).tolist()) - {0}
    missing_in_png = sorted(set(json_ids) - png_ids)
    missing_in_json = sorted(png_ids - set(json_ids))
    if missing_in_png:
        raise PanopticFormatError(f"{where}: JSON segment ids absent from the PNG: {missing_in_png[:10]}")
    if missing_in_json:
        raise PanopticFormatError(f"{where}: PNG segment ids absent from the JSON: {missing_in_json[:10]}")


# -----------------------------------------------------------------------------
# 2. Map encodings                         [LDMSeg §3.1 / brief §2.1; PDM §2.5; Analog Bits]
# -----------------------------------------------------------------------------
# LDMSeg turns a panoptic map into something a Gaussian diffusion can model in three steps:
#   (a) the segment ids of one image are replaced by distinct random ids in 1..2^K-1, fresh every
#       time the sample is drawn -- so which id an instance gets carries no meaning and the model
#       must learn to separate instances, not to name them [LDMSeg brief §2.1 step 4];
#   (b) each id becomes K binary planes mapped to {-1, +1} ("analog bits", Chen et al. 2022);
#   (c) void pixels are 0 in every plane -- neither bit value -- so they are recognisable.
# PDM encodes *category* ids (not instances) the same way but MSB first and keeps void as the id 0,
# i.e. all bits -1 [PDM brief §2.5].
#
# DEVIATION (an option, `LDMSegConfig.id_order="raster"`; the paper and every preset use (a)): the
# segments numbered 1..M in raster order of their first pixel (top row first, then left to right), so
# the id of every segment is a function of the map and the image tells it. With random ids the model
# must first choose an id per segment and keep it over all the segment's latent cells, which a small
# model trained for minutes does poorly (README, Results: PQ 22.5 -> 27.4 on Shapes val, 21.5 -> 31.8 on
# another machine with the preset before). The price is
# what random ids buy: the noise no longer chooses the ids, so a partial map's ids must follow the same
# order to be completed (ldmseg.py section 11).


def cap_segments(ids: np.ndarray, max_segments: int) -> tuple[np.ndarray, int]:
    """Keep at most `max_segments` non-void segments, the largest; the rest become void.

    DEVIATION: the LDMSeg code asserts fewer than 2^K segments and crashes deep in a batch
    otherwise. Dropping the smallest segments loses the least area and is logged by the caller.
    Returns (ids, number of segments dropped).
    """
    uniq, counts = np.unique(ids[ids > 0], return_counts=True)
    if len(uniq) <= max_segments:
        return ids, 0
    order = np.argsort(-counts, kind="stable")          # largest first; ties keep id order
    drop = uniq[order[max_segments:]]
    ids = np.where(np.isin(ids, drop), 0, ids)
    return ids, len(drop)


def remap_ids(ids: torch.Tensor, num_bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random injective remap of each image's segment ids into 1..2^K-1; void stays 0.  [LDMSeg §3.1]

    ids: (B, H, W) int64 with values in 0..M (contiguous ids from the Dataset, M < 2^K).
    Returns (B, H, W) int64.  A fresh permutation per image, drawn from `generator`.
    """
    B = ids.shape[0]
    capacity = 2 ** num_bits - 1
    M = int(ids.max().item()) if ids.numel() else 0
    if M > capacity:
        raise ValueError(f"ids go up to {M} but {num_bits} bits hold at most {capacity} segments per image")
    # One random permutation of 1..capacity per image; table[b, j] is the new id of old id j.
    perms = torch.argsort(torch.rand(B, capacity, generator=generator), dim=1) + 1     # (B, capacity)
    table = torch.cat([torch.zeros(B, 1, dtype=torch.long), perms], dim=1)[:, : M + 1]  # (B, M+1)
    table = table.to(ids.device)
    return torch.gather(table, 1, ids.reshape(B, -1)).reshape(ids.shape)


def raster_ids(ids: torch.Tensor) -> torch.Tensor:
    """Each image's segments renumbered 1..M in raster order of their first pixel; void stays 0.

    ids: (B, H, W) int64 >= 0, any labels.  Returns (B, H, W) int64: the segment whose first pixel
    (row-major) comes first gets 1, the next 2, ... (the comment above this function's section).
    """
    B = ids.shape[0]
    labels = torch.unique(torch.cat([ids.new_zeros(1), ids.reshape(-1)]))  # sorted, 0 first
    flat = torch.searchsorted(labels, ids.reshape(B, -1))                 # (B, HW) labels -> 0..M, void 0
    M, HW = len(labels) - 1, flat.shape[1]
    # first[b, j] = flat index of label j's first pixel in image b (HW where j is absent).
    first = torch.full((B, M + 1), HW, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, flat, torch.arange(HW, device=ids.device).expand(B, HW), "amin")
    first[:, 0] = -1                                                     # void sorts first -> rank 0
    rank = torch.argsort(torch.argsort(first, dim=1, stable=True), dim=1, stable=True)  # (B, M+1) rank of each id
    return torch.gather(rank, 1, flat).reshape(ids.shape)


ID_ORDERS = ("random", "raster")


def order_ids(ids: torch.Tensor, num_bits: int, order: str = "random",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage 2's ids: `remap_ids` (order 'random', the paper's) or `raster_ids` ('raster', an option).

    ids: (B, H, W) int64 contiguous 0..M.  Returns (B, H, W) int64 in 0..2^K-1.
    """
    if order == "random":
        return remap_ids(ids, num_bits, generator)
    if order != "raster":
        raise ValueError(f"id order must be one of {ID_ORDERS}, got {order!r}")
    out = raster_ids(ids)
    if out.numel() and int(out.max()) > 2 ** num_bits - 1:
        raise ValueError(f"{int(out.max())} segments, but {num_bits} bits hold at most {2 ** num_bits - 1} per image")
    return out


def ids_to_bits(ids: torch.Tensor, num_bits: int, *, msb_first: bool = False,
                void_zero: bool = True) -> torch.Tensor:
    """Integer map -> analog bits in {-1, +1}.  [Analog Bits, Chen et al. 2022; LDMSeg §3.1; PDM §2.5]

    ids: (B, H, W) int64 in 0..2^K-1.  Returns (B, K, H, W) float32.
    LDMSeg: msb_first=False, void_zero=True  (bit i = (id >> i) & 1; void pixels 0 in every plane).
    PDM:    msb_first=True,  void_zero=False (channel 0 = most significant bit; void is the id 0).
    """
    shifts = torch.arange(num_bits, device=ids.device)
    if msb_first:
        shifts = shifts.flip(0)
    bits = (ids.unsqueeze(1) >> shifts.view(1, -1, 1, 1)) & 1            # (B, H, W) -> (B, K, H, W)
    bits = bits.float() * 2.0 - 1.0
    if void_zero:
        bits = bits * (ids.unsqueeze(1) > 0)
    return bits


def bits_to_ids(bits: torch.Tensor, *, msb_first: bool = False) -> torch.Tensor:
    """Analog bits -> integer map by thresholding at 0.  (B, K, H, W) float -> (B, H, W) int64.

    The inverse of `ids_to_bits` for non-void pixels; a void pixel (all planes 0) decodes to 0.
    """
    K = bits.shape[1]
    shifts = torch.arange(K, device=bits.device)
    if msb_first:
        shifts = shifts.flip(0)
    ones = (bits > 0).long()                                             # (B, K, H, W)
    return (ones << shifts.view(1, -1, 1, 1)).sum(dim=1)                 # (B, K, H, W) -> (B, H, W)


def num_bits_for(num_values: int) -> int:
    """How many bits encode the ids 0..num_values-1 (PDM: 8 for COCO's ids up to 200)."""
    return max(1, math.ceil(math.log2(max(num_values, 2))))


def colorize(ids: np.ndarray | torch.Tensor, seed: int = 0) -> np.ndarray:
    """Render an id map as colours for pictures: (H, W) int -> (H, W, 3) uint8, void black.

    The colour of an id is a fixed hash of the id, so the same id has the same colour in every
    picture (a ground truth and a prediction that agree on ids look alike).
    """
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    ids = ids.astype(np.int64)
    h = (ids * 2654435761 + seed * 97) & 0xFFFFFFFF                      # Knuth's multiplicative hash
    rgb = np.stack([(h >> 8) & 255, (h >> 16) & 255, (h >> 24) & 255], -1)
    rgb = 64 + (rgb * 191) // 255                                        # keep colours away from black
    return np.where(ids[..., None] > 0, rgb, 0).astype(np.uint8)


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised map over an image, segment borders drawn white.  (H,W,3) uint8 each."""
    col = colorize(ids).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + col * alpha
    out = np.where(ids[..., None] > 0, out, image.astype(np.float32))
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    out[edge] = 255
    return out.clip(0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# 3. Shapes: the embedded dataset, written in COCO panoptic format
# -----------------------------------------------------------------------------
# Shapes exists so that every command runs on a laptop with nothing downloaded, and so that the
# hard part of panoptic segmentation is still there: each image has 1-3 textured "stuff" regions
# (sky, grass, water, sand) and 1-8 "things" (circles, squares, triangles, diamonds, hexagons) in
# several colours and sizes. Things occlude one another, and at least a third of images hold a
# cluster of two or more *touching or overlapping* things of the same class and colour: there the
# colour alone cannot tell instances apart, which is what makes instance separation necessary.
# Some things are tiny (a few pixels), as in COCO. Each image also gets a caption in COCO captions
# format ("two red circles and a blue square on grass under a sky") for PDM, and a 16-bit depth PNG
# (millimetres; things nearer than the stuff behind them, later-drawn things nearer) for the
# multi-task model. Item i of a split depends only on (seed, split, i).

SHAPES_THINGS = ["circle", "square", "triangle", "diamond", "hexagon"]
SHAPES_STUFF = ["sky", "grass", "water", "sand"]
SHAPES_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
                  "yellow": (235, 210, 40), "purple": (150, 60, 190), "white": (240, 240, 240),
                  "orange": (245, 140, 30)}
_STUFF_RGB = {"sky": (135, 190, 235), "grass": (70, 140, 50), "water": (40, 90, 150), "sand": (205, 180, 120)}
_NUMBER_WORDS = ["zero", "a", "two", "three", "four", "five", "six", "seven", "eight"]


def shapes_categories() -> list[dict]:
    """COCO-style categories of Shapes: things 1..5, stuff 6..9 (so 4 bits hold every id)."""
    cats = [{"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1} for i, n in enumerate(SHAPES_THINGS)]
    cats += [{"id": len(SHAPES_THINGS) + i + 1, "name": n, "supercategory": "stuff", "isthing": 0}
             for i, n in enumerate(SHAPES_STUFF)]
    for c in cats:
        c["color"] = list(_STUFF_RGB.get(c["name"], (200, 200, 200)))
    return cats


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of one shape of circumradius r centred at (cx, cy), rotated by angle."""
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)      # rotate the pixel grid, not the shape
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        return (np.abs(u) <= r / math.sqrt(2)) & (np.abs(v) <= r / math.sqrt(2))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    sides = 3 if kind == "triangle" else 6                                 # regular polygon as half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(sides):
        a = 2 * math.pi * (k + 0.5) / sides
        inside &= u * math.cos(a) + v * math.sin(a) <= r * math.cos(math.pi / sides)
    return inside


def _stuff_layout(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """1-3 stuff regions as wavy horizontal bands, sky (if present) on top. Returns [(name, mask)]."""
    k = int(rng.integers(1, 4))
    names = list(rng.choice(SHAPES_STUFF, size=k, replace=False))
    names.sort(key=lambda n: n != "sky")                                   # sky first = top band
    cuts = np.sort(rng.uniform(0.25, 0.75, size=k - 1)) * size
    band = np.zeros((size, size), np.int64)
    for j, c in enumerate(cuts):                                           # wavy boundary y = c + A sin(w x + phi)
        amp, freq, phase = rng.uniform(1, size / 16), rng.uniform(0.5, 3) * 2 * math.pi / size, rng.uniform(0, 6.3)
        band += yy > c + amp * np.sin(freq * xx + phase)
    return [(n, band == j) for j, n in enumerate(names)]


def _texture(rng: np.random.Generator, name: str, size: int, yy: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture for a stuff class: base colour, gradient, stripes and pixel noise."""
    base = np.array(_STUFF_RGB[name], np.float64) * rng.uniform(0.85, 1.15)
    tex = np.broadcast_to(base, (size, size, 3)).copy()
    if name == "sky":
        tex *= (0.8 + 0.3 * yy / size)[..., None]                          # lighter towards the horizon
    if name == "water":
        tex *= (1 + 0.12 * np.sin(yy * rng.uniform(0.5, 1.2)))[..., None]  # horizontal ripples
    noise = {"sky": 4, "grass": 22, "water": 10, "sand": 14}[name]
    return tex + rng.normal(0, noise, (size, size, 3))


def _place_things(rng: np.random.Generator, size: int) -> list[dict]:
    """Draw 1-8 things; with probability 0.45 start with a cluster of touching same-look things."""
    things = []
    if rng.random() < 0.45:                                                # the hard case: same class + colour, touching
        kind, colour = rng.choice(SHAPES_THINGS), rng.choice(list(SHAPES_COLOURS))
        r = rng.uniform(0.07, 0.13) * size
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        for _ in range(int(rng.integers(2, 4))):
            things.append(dict(kind=kind, colour=colour, cx=cx, cy=cy, r=r * rng.uniform(0.85, 1.15),
                               angle=rng.uniform(0, 2 * math.pi)))
            step, phi = rng.uniform(1.3, 1.9) * r, rng.uniform(0, 2 * math.pi)  # centres 1.3-1.9 r apart: they touch
            cx, cy = cx + step * math.cos(phi), cy + step * math.sin(phi)
    for _ in range(int(rng.integers(1, 9)) - len(things) // 2):
        tiny = rng.random() < 0.1                                          # some tiny segments, as in COCO
        r = rng.uniform(1.5, 3.0) if tiny else rng.uniform(0.05, 0.18) * size
        things.append(dict(kind=rng.choice(SHAPES_THINGS), colour=rng.choice(list(SHAPES_COLOURS)),
                           cx=rng.uniform(0, size), cy=rng.uniform(0, size), r=r, angle=rng.uniform(0, 2 * math.pi)))
    return things[:8]


def _caption(things: list[dict], stuff: list[str]) -> str:
    """'two red circles and a blue square on grass under a sky' from the visible things and stuff."""
    groups: dict[tuple[str, str], int] = {}
    for t in things:
        groups[(t["colour"], t["kind"])] = groups.get((t["colour"], t["kind"]), 0) + 1
    phrases = [f"{_NUMBER_WORDS[n]} {c} {k}{'s' if n > 1 else ''}" for (c, k), n in groups.items()]
    phrases = ["an " + p[2:] if p.startswith("a ") and p[2] in "aeiou" else p for p in phrases]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    ground = [s for s in stuff if s != "sky"]
    if ground:
        text += " on " + " and ".join(ground)
    if "sky" in stuff:
        text += " under a sky"
    return text


def render_shapes_item(seed: int, split: str, index: int, size: int = 128) -> dict:
    """Make Shapes item `index` of `split`: a pure function of (seed, split, index, size).

    Returns dict(image (H,W,3) uint8, ids (H,W) int64 segment ids, segments_info, caption,
    depth (H,W) uint16 millimetres).
    """
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size, 3))
    ids = np.zeros((size, size), np.int64)
    depth = np.zeros((size, size))
    cats = {c["name"]: c["id"] for c in shapes_categories()}
    seg_cat: dict[int, int] = {}
    stuff = _stuff_layout(rng, size, yy, xx)
    for j, (name, mask) in enumerate(stuff):
        image[mask] = _texture(rng, name, size, yy)[mask]
        ids[mask], seg_cat[j + 1] = j + 1, cats[name]
        depth[mask] = 60.0 if name == "sky" else (3.0 + 27.0 * (1 - yy / size))[mask]  # ground recedes upwards
    things = _place_things(rng, size)
    near = np.sort(rng.uniform(1.0, 2.8, len(things)))[::-1]               # later things are nearer
    for j, t in enumerate(things):
        mask = _shape_mask(t["kind"], t["cx"], t["cy"], t["r"], t["angle"], yy, xx)
        shade = 0.8 + 0.35 * (1 - ((yy[mask] - t["cy"]) / (t["r"] + 1)).clip(-1, 1)) / 2   # lit from above
        col = np.array(SHAPES_COLOURS[t["colour"]]) * shade[:, None] + rng.normal(0, 5, (len(shade), 3))
        sid = len(stuff) + j + 1
        image[mask], ids[mask], depth[mask] = col, sid, near[j]
        seg_cat[sid] = cats[t["kind"]]
    ids, visible = _compact_ids(ids)                                       # drop fully occluded things
    seg_cat = {new: seg_cat[old] for old, new in visible.items()}
    vis_things = [t for j, t in enumerate(things) if len(stuff) + j + 1 in visible]
    info = make_segments_info(ids, seg_cat)
    return dict(image=image.clip(0, 255).astype(np.uint8), ids=ids, segments_info=info,
                caption=_caption(vis_things, [n for n, m in stuff if m.any()]),
                depth=(depth * 1000).round().astype(np.uint16))


def _compact_ids(ids: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Renumber the ids present to 1..S in order (void stays 0). Returns (ids, {old: new})."""
    present = [int(i) for i in np.unique(ids) if i != 0]
    table = np.zeros(int(ids.max()) + 1, np.int64)
    mapping = {old: new for new, old in enumerate(present, start=1)}
    for old, new in mapping.items():
        table[old] = new
    return table[ids], mapping


def _write_shapes_chunk(args: tuple) -> list[tuple[dict, dict, list]]:
    """Worker: render and write items [lo, hi) of a split; returns their JSON records."""
    root, split, lo, hi, size, seed = args
    out = []
    for i in range(lo, hi):
        item = render_shapes_item(seed, split, i, size)
        name = f"{i:012d}"
        image_id = i + 1
        Image.fromarray(item["image"]).save(root / split / f"{name}.png", compress_level=1)
        write_panoptic_png(root / "annotations" / f"panoptic_{split}" / f"{name}.png", item["ids"])
        Image.fromarray(item["depth"]).save(root / "depth" / split / f"{name}.png", compress_level=1)
        out.append(({"id": image_id, "file_name": f"{name}.png", "width": size, "height": size},
                    {"image_id": image_id, "file_name": f"{name}.png", "segments_info": item["segments_info"]},
                    [{"id": image_id, "image_id": image_id, "caption": item["caption"]}]))
    return out


def write_shapes(out: str | os.PathLike, *, size: int = 128, num_train: int = 4000, num_val: int = 200,
                 seed: int = 0, workers: int | None = None, log=print) -> Path:
    """Write Shapes in COCO panoptic layout under `out` and return its path.

    Layout (COCO 2017's, with split names 'train' / 'val'):
      out/{train,val}/NNNNNNNNNNNN.png                       RGB images (PNG: lossless)
      out/annotations/panoptic_{split}.json + panoptic_{split}/  panoptic PNGs and segments_info
      out/annotations/captions_{split}.json                  COCO captions format
      out/depth/{split}/NNNNNNNNNNNN.png                     uint16 depth in millimetres
      out/shapes.json                                        the arguments it was made with
    """
    import multiprocessing as mp
    root = Path(out)
    workers = workers or min(os.cpu_count() or 1, 8)
    for split, n in (("train", num_train), ("val", num_val)):
        for d in (root / split, root / "annotations" / f"panoptic_{split}", root / "depth" / split):
            d.mkdir(parents=True, exist_ok=True)
        chunks = [(root, split, lo, min(lo + 100, n), size, seed) for lo in range(0, n, 100)]
        if workers > 1 and len(chunks) > 1:
            # fork where the platform has it: workers only run numpy / PIL, and a spawned worker
            # would spend seconds re-importing torch
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                records = [r for part in pool.map(_write_shapes_chunk, chunks) for r in part]
        else:
            records = [r for c in chunks for r in _write_shapes_chunk(c)]
        images, anns, caps = [r[0] for r in records], [r[1] for r in records], [c for r in records for c in r[2]]
        cats = shapes_categories()
        write_json(root / "annotations" / f"panoptic_{split}.json",
                   {"info": {"description": "Shapes"}, "images": images, "annotations": anns, "categories": cats})
        write_json(root / "annotations" / f"captions_{split}.json", {"images": images, "annotations": caps})
        log(f"shapes: wrote {n} {split} images to {root}")
    write_json(root / "shapes.json", {"size": size, "num_train": num_train, "num_val": num_val, "seed": seed})
    return root


def ensure_shapes(root: str | os.PathLike, *, size: int = 128, num_train: int = 4000, num_val: int = 200,
                  seed: int = 0, log=print) -> Path:
    """Return `root`; when it does not exist yet (or is empty), write Shapes there first (the training
    default). A folder with anything in it is left alone: `resolve_split` finds its layout (COCO,
    ADE20k, flat) or says which it looked for.

    Shapes is written into a hidden folder beside `root` and renamed to `root` when complete, so an
    interrupted write never leaves a half dataset for the next run to read as a user's folder.
    """
    import shutil
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: --data {root}: a file, not a folder (a COCO-format panoptic folder, or one to write Shapes in)")
    if root.exists() and any(root.iterdir()):
        return root
    log(f"{root} {'is empty' if root.exists() else 'does not exist'}: writing the Shapes dataset there ({num_train} train / {num_val} val, {size}px)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.writing-{os.getpid()}"
    try:
        write_shapes(tmp, size=size, num_train=num_train, num_val=num_val, seed=seed,
                     log=lambda msg: log(msg.replace(str(tmp), str(root))))
    except BaseException:                                 # Ctrl-C, a full disk: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if root.exists():
            root.rmdir()                                  # empty (checked above); the rename needs it gone
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root.exists() and any(root.iterdir())):   # else another process finished first: use its copy
            raise
    return root


# -----------------------------------------------------------------------------
# 4. Dataset: any COCO-format panoptic folder                 [LDMSeg brief §2.1]
# -----------------------------------------------------------------------------
# One Dataset serves Shapes, COCO 2017 and ADE20k panoptic. Conventions taken from the LDMSeg code:
#   * images with no segments, or only crowd segments, are skipped (train and val);
#   * for training, crowd segments and segments under 10 pixels (at the original resolution)
#     become void -- the model is not asked to reproduce them; for evaluation they are kept;
#   * image and maps are resized jointly to the training size (image bicubic, maps nearest: a label
#     map must never be interpolated), with a random horizontal flip for training.
# Augmentation randomness is a pure function of (seed, epoch, index), so a resumed run sees the same
# samples in the same order as an uninterrupted one.


@dataclass
class SplitFiles:
    """Where one split of a COCO-format panoptic folder lives."""
    image_dir: Path            # RGB images, named as in the JSON's images[].file_name
    panoptic_json: Path        # COCO panoptic JSON: images, annotations[].segments_info, categories
    panoptic_dir: Path         # panoptic PNGs, named as annotations[].file_name
    captions: Path | None      # COCO captions JSON or {file_name: caption}; None when absent
    depth_dir: Path | None     # uint16 depth PNGs in millimetres; None when absent


def resolve_split(root: str | os.PathLike, split: str) -> SplitFiles:
    """Find a split in COCO's layout: root/{split}[2017]/ and root/annotations/panoptic_{split}[2017].json.

    Works for Shapes (split 'train' / 'val') and for COCO 2017 as downloaded ('train' finds train2017).
    ADE20k panoptic as detectron2's prepare script writes it: root = ADEChallengeData2016 with
    images/{training,validation}/, ade20k_panoptic_{train,val}.json and ade20k_panoptic_{train,val}/.
    A flat folder -- root/images/, root/panoptic/, a single root/panoptic*.json and optionally
    root/captions*.json and root/depth/ -- is one split whatever `split` says.
    """
    root = Path(root)
    for name in (split, f"{split}2017"):
        pj = root / "annotations" / f"panoptic_{name}.json"
        if pj.exists():
            cap = root / "annotations" / f"captions_{name}.json"
            depth = root / "depth" / name
            return SplitFiles(root / name, pj, root / "annotations" / f"panoptic_{name}",
                              cap if cap.exists() else None, depth if depth.exists() else None)
    ade = root / f"ade20k_panoptic_{split}.json"                           # ADE20k as detectron2 prepares it
    if ade.exists():
        images = root / "images" / {"train": "training", "val": "validation"}.get(split, split)
        return SplitFiles(images, ade, root / f"ade20k_panoptic_{split}", None, None)
    flat = sorted(root.glob("panoptic*.json"))                             # flat layout: one split in one folder
    if len(flat) == 1 and (root / "images").is_dir() and (root / "panoptic").is_dir():
        caps = sorted(root.glob("captions*.json"))
        depth = root / "depth"
        return SplitFiles(root / "images", flat[0], root / "panoptic", caps[0] if caps else None,
                          depth if depth.is_dir() else None)
    raise PanopticFormatError(f"{root}: no annotations/panoptic_{split}.json or panoptic_{split}2017.json, "
                              f"nor a flat folder (images/, panoptic/, one panoptic*.json); see README 'Data'")


def _load_captions(path: Path | None) -> dict[str, list[str]]:
    """{file_name: [captions]} from a COCO captions JSON or a plain {file_name: caption} dict."""
    if path is None:
        return {}
    obj = read_json(path)
    if isinstance(obj, dict) and "annotations" in obj:
        names = {im["id"]: im["file_name"] for im in obj.get("images", [])}
        caps: dict[str, list[str]] = {}
        for a in obj["annotations"]:
            caps.setdefault(names.get(a["image_id"], str(a["image_id"])), []).append(a["caption"])
        return caps
    return {k: (v if isinstance(v, list) else [v]) for k, v in obj.items()}


def _annotated_items(meta: dict, path: Path) -> list[tuple[dict, dict]]:
    """[(image entry, annotation)] sorted by image id; PanopticFormatError naming `path` if the JSON is inconsistent.

    PAPER: images with no segments or only crowd segments are skipped [LDMSeg brief §2.1 step 2].
    """
    images = {im["id"]: im for im in meta["images"]}
    for a in meta["annotations"]:
        if a.get("image_id") not in images:
            raise PanopticFormatError(f"{path}: an annotation refers to image id {a.get('image_id')!r}, "
                                      f"which 'images' does not list")
        if not all(isinstance(s, dict) and "id" in s and "category_id" in s for s in a.get("segments_info", [None])):
            raise PanopticFormatError(f"{path}: the annotation of image id {a['image_id']!r} has no segments_info, "
                                      f"or a segment without 'id' / 'category_id'")
    items = [(images[a["image_id"]], a) for a in meta["annotations"]
             if any(not s.get("iscrowd", 0) for s in a["segments_info"])]
    if not items:
        raise PanopticFormatError(f"{path}: no images with annotated segments (an empty dataset: nothing to train on)")
    return sorted(items, key=lambda ia: ia[0]["id"])


def nearest_resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W[, C]) label array to (h, w) -- pixel centres map exactly."""
    H, W = arr.shape[:2]
    h, w = size
    if (h, w) == (H, W):
        return arr.copy()                                 # the same values; a copy, as the indexing below gives
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return arr[rows[:, None], cols[None, :]]


class PanopticDataset(torch.utils.data.Dataset):
    """COCO-format panoptic folder -> training / evaluation samples.

    Each item is a dict:
      image          (3, H, W) float32 in [-1, 1] (absent with load_image=False)
      segments       (H, W) int64, contiguous segment ids 1..S in segments_info order, 0 = void
      category       (H, W) int64 category ids, 0 = void
      segments_info  list of {id (contiguous), category_id, iscrowd, isthing, area}
      caption        str ('' when the folder has none)
      depth          (H, W) float32 metres, 0 = unknown (only when the folder has depth and load_depth)
      image_id, file_name, orig_size (H0, W0), index (idx), flipped (bool)
      dropped_segments  int, segments over `max_segments` made void (only when max_segments is set)
      skipped        list[str], the errors of the bad items this one replaces (only when skip_bad)

    skip_bad (train.py sets it from --skip-bad-samples): an item whose files are bad is replaced by
    the next good item (idx + 1, idx + 2, ... -- deterministic, so resuming stays exact) and the
    error is carried in `skipped`, which reaches the trainer's process even from DataLoader workers.
    Off by default: the PanopticFormatError naming the file goes up to the caller.

    cache_mb (train.py sets it from --data-cache-mb): keep each item's decoded files (the image, the
    contiguous id and category maps, its segments_info) in memory, so that later epochs skip reading,
    decoding and checking them -- when the whole split fits in cache_mb MiB, judged from the first item
    decoded (counting the pixels and maps; Python's objects add about a third); else nothing is kept. Each
    process holds its own copy (a DataLoader worker, its own).
    Items are the same either way: epoch-dependent steps (crop, flip, caption) run on every call.
    """

    def __init__(self, files: SplitFiles, *, size: int | tuple[int, int] | None = 128, train: bool = False,
                 hflip: bool | None = None, resize_mode: str = "stretch", min_segment_area: int = 10,
                 max_segments: int | None = None, crop: int = 0, seed: int = 0, skip_bad: bool = False,
                 load_image: bool = True, load_depth: bool = True, cache_mb: float = 0):
        self.files, self.train, self.seed, self.epoch = files, train, seed, 0
        self.cache_mb = cache_mb                          # decoded items kept when the split fits (class docstring)
        self._decoded: dict[int, tuple] | None = {} if cache_mb > 0 else None
        # A stage that never reads the image (the mask autoencoder) or depth (all but multi-task)
        # skips decoding them: about half of an item's time on Shapes (4.5 ms -> 2.3 ms, 128^2, 1 thread).
        self.load_image, self.load_depth = load_image, load_depth
        self.skip_bad = skip_bad                          # replace bad items by good ones (see class docstring)
        self.crop = crop                                  # random crop side after resizing (0 = none)
        self.size = (size, size) if isinstance(size, int) else size
        self.hflip = train if hflip is None else hflip
        self.resize_mode = resize_mode                    # 'stretch' (LDMSeg) or 'center_crop' (PDM)
        self.min_segment_area = min_segment_area if train else 0
        self.max_segments = max_segments
        self.num_dropped_segments = 0                     # segments over capacity made void, in this process
        meta = read_json(files.panoptic_json)
        for key in ("images", "annotations", "categories"):
            if key not in meta:
                raise PanopticFormatError(f"{files.panoptic_json}: missing top-level key '{key}'")
        self.categories = {c["id"]: c for c in meta["categories"]}
        self.items = _annotated_items(meta, files.panoptic_json)
        unknown = sorted({s["category_id"] for _, a in self.items for s in a["segments_info"]} - set(self.categories))
        if unknown:                                       # else: a thing by default, or a KeyError in panopticapi
            raise PanopticFormatError(f"{files.panoptic_json}: segments of category ids {unknown[:10]} that "
                                      f"'categories' does not list")
        self.captions = _load_captions(files.captions)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations of epoch e are a pure function of (seed, e, index)."""
        self.epoch = epoch

    def _load(self, idx: int) -> tuple[Image.Image | None, np.ndarray, dict, dict]:
        """Read image (None without load_image) and panoptic PNG of item idx; check PNG and JSON agree."""
        im_meta, ann = self.items[idx]
        image = read_image(self.files.image_dir / im_meta["file_name"]) if self.load_image else None
        png = self.files.panoptic_dir / ann["file_name"]
        ids = read_panoptic_png(png)
        check_annotation(ids, ann["segments_info"], str(png))
        if image is not None and ids.shape != (image.height, image.width):
            raise PanopticFormatError(f"{png}: size {ids.shape[::-1]} differs from its image "
                                      f"{im_meta['file_name']} {(image.width, image.height)}")
        return image, ids, im_meta, ann

    def _contiguous(self, ids: np.ndarray, segs: list[dict]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """COCO ids -> contiguous 1..S in segments_info order (training cleanup applied) + category map."""
        keys = np.array([s["id"] for s in segs], np.int64)                # COCO ids can be up to 256^3
        order = np.argsort(keys)
        pos = np.searchsorted(keys[order], ids).clip(max=len(keys) - 1)    # (H, W) position in sorted keys
        contig = np.where(keys[order][pos] == ids, order[pos] + 1, 0)      # (H, W) in 0..S
        category = np.array([0] + [s["category_id"] for s in segs], np.int64)[contig]
        area = np.bincount(contig.ravel(), minlength=len(segs) + 1)
        info = []
        for j, s in enumerate(segs, start=1):
            if self.train and (s.get("iscrowd", 0) or area[j] < self.min_segment_area):
                contig[contig == j] = 0                                    # PAPER: crowd + tiny -> void for training
                continue
            info.append({"id": j, "category_id": s["category_id"], "iscrowd": int(s.get("iscrowd", 0)),
                         "isthing": int(self.categories.get(s["category_id"], {}).get("isthing", 1))})
        return contig, category, info

    def _geometry(self, idx: int, H0: int, W0: int) -> tuple[tuple[int, int, int, int], bool]:
        """Crop box (top, left, h, w) and flip for item idx, from (seed, epoch, idx)."""
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        flip = bool(self.hflip and rng.random() < 0.5)
        if self.resize_mode == "center_crop":
            s = min(H0, W0)
            return ((H0 - s) // 2, (W0 - s) // 2, s, s), flip
        return (0, 0, H0, W0), flip

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item idx (see the class docstring); with skip_bad a bad item is replaced by the next good one.

        key is idx, or (epoch, idx): a stream that crosses epochs (train.batch_stream) sends the epoch
        with every index, so one set of DataLoader workers serves the whole run.
        """
        if isinstance(key, tuple):
            epoch, idx = key
            self.set_epoch(epoch)                          # this process's copy: a worker's or the main one's
        else:
            idx = key
        if not self.skip_bad:                             # the normal path: errors go up, naming the file
            return self._item(idx)
        skipped = []
        for k in range(len(self)):                        # the next good item stands in for a bad one
            try:
                out = self._item((idx + k) % len(self))
            except PanopticFormatError as exc:
                skipped.append(str(exc))
                continue
            out["skipped"] = skipped
            return out
        raise PanopticFormatError(f"{self.files.panoptic_json}: every item is bad; the first: {skipped[0]}")

    def _decode(self, idx: int) -> tuple[Image.Image | None, np.ndarray, np.ndarray, list[dict]]:
        """(image, contiguous ids, category map, segments_info) of item idx: what does not depend on the
        epoch, from the cache when it holds the item. The caller may modify what it gets."""
        hit = None if self._decoded is None else self._decoded.get(idx)
        if hit is None:
            image, ids, _, ann = self._load(idx)
            hit = (image, *self._contiguous(ids, ann["segments_info"]))
            self._keep(idx, hit)
        image, contig, category, info = hit
        return image, contig.astype(np.int64), category.astype(np.int64), [dict(s) for s in info]

    def _keep(self, idx: int, item: tuple) -> None:
        """Cache a decoded item, its maps in the smallest integer type that holds them; on the first
        item, give up caching if the whole split would not fit in cache_mb."""
        if self._decoded is None:
            return
        image, contig, category, info = item
        small = tuple(a.astype(np.min_scalar_type(max(int(a.max(initial=0)), 0))) for a in (contig, category))
        if not self._decoded:
            size = sum(a.nbytes for a in small) + (0 if image is None else image.width * image.height * 3)
            if size * len(self) > self.cache_mb * 2 ** 20:
                self._decoded = None
                return
        self._decoded[idx] = (image, *small, info)

    def _item(self, idx: int) -> dict:
        """Item idx as the class docstring lists it (PanopticFormatError naming the file if it is bad)."""
        image, contig, category, info = self._decode(idx)
        im_meta = self.items[idx][0]
        H0, W0 = contig.shape
        (top, left, h, w), flip = self._geometry(idx, H0, W0)
        image = None if image is None else image.crop((left, top, left + w, top + h))
        contig, category = contig[top:top + h, left:left + w], category[top:top + h, left:left + w]
        depth = self._depth(im_meta, (top, left, h, w), (H0, W0)) if self.load_depth else None
        if self.size is not None:
            image = None if image is None else image.resize(self.size[::-1], Image.BICUBIC)
            contig, category = nearest_resize(contig, self.size), nearest_resize(category, self.size)
            depth = None if depth is None else nearest_resize(depth, self.size)
        if self.crop:
            image, contig, category, depth = self._random_crop(idx, image, contig, category, depth)
        contig, info, dropped = self._cap(contig, info)
        out = {"segments": torch.from_numpy(contig.astype(np.int64)),
               "category": torch.from_numpy(category.astype(np.int64))}
        if image is not None:
            out["image"] = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (H,W,3) -> (3,H,W)
        if depth is not None:
            out["depth"] = torch.from_numpy(depth.astype(np.float32))
        if flip:
            out = {k: v.flip(-1) for k, v in out.items()}
        for s in info:
            s["area"] = int((out["segments"] == s["id"]).sum())
        caps = self.captions.get(im_meta["file_name"], [""])
        rng = np.random.default_rng([self.seed, self.epoch, idx, 1])
        out.update(segments_info=info, caption=caps[int(rng.integers(len(caps)))] if self.train else caps[0],
                   image_id=im_meta["id"], file_name=im_meta["file_name"], orig_size=(H0, W0),
                   index=idx, flipped=flip)
        if self.max_segments is not None:
            out["dropped_segments"] = dropped
        return out

    def _random_crop(self, idx, image, contig, category, depth):
        """A crop x crop window at a position drawn from (seed, epoch, idx); all maps cut alike."""
        H, W = contig.shape
        if self.crop > min(H, W):                         # only without `size`: resizing makes every image size
            raise PanopticFormatError(f"{self.files.image_dir / self.items[idx][0]['file_name']}: "
                                      f"{H}x{W}, smaller than the {self.crop}px training crop")
        rng = np.random.default_rng([self.seed, self.epoch, idx, 2])
        top, left = int(rng.integers(H - self.crop + 1)), int(rng.integers(W - self.crop + 1))
        box = (slice(top, top + self.crop), slice(left, left + self.crop))
        image = None if image is None else image.crop((left, top, left + self.crop, top + self.crop))
        return image, contig[box], category[box], None if depth is None else depth[box]

    def _depth(self, im_meta: dict, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray | None:
        """uint16 millimetre PNG of the map's `shape` -> float metres, cropped to box; None when the folder
        has no depth."""
        if self.files.depth_dir is None:
            return None
        path = self.files.depth_dir / (Path(im_meta["file_name"]).stem + ".png")
        try:
            with Image.open(path) as im:
                d = np.asarray(im, dtype=np.float32) / 1000.0
        except FileNotFoundError:
            raise PanopticFormatError(f"{path}: depth PNG not found") from None
        except Exception as exc:                          # PIL raises many types for truncated / corrupt files
            raise PanopticFormatError(f"{path}: cannot read depth PNG ({exc})") from None
        if d.shape != shape:
            raise PanopticFormatError(f"{path}: size {d.shape[::-1]} differs from its panoptic map's {shape[::-1]}")
        top, left, h, w = box
        return d[top:top + h, left:left + w]

    def _cap(self, contig: np.ndarray, info: list[dict]) -> tuple[np.ndarray, list[dict], int]:
        """Apply the max_segments policy (`cap_segments`) and drop segments resizing removed.

        Returns (ids, segments_info, number of segments dropped). The count also goes into
        num_dropped_segments, which only sees this process (DataLoader workers keep their own).
        """
        dropped = 0
        if self.max_segments is not None:
            contig, dropped = cap_segments(contig, self.max_segments)
            self.num_dropped_segments += dropped
        present = set(np.flatnonzero(np.bincount(contig.ravel())).tolist())   # ids 0..S, small: faster than np.unique
        info = [s for s in info if s["id"] in present]
        if self.max_segments is not None and contig.max(initial=0) > self.max_segments:
            contig, info = _renumber(contig, info)
        return contig, info, dropped


def _renumber(contig: np.ndarray, info: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Ids 1..n for the n segments in `info`, in their order: a capped map whose ids still run past
    the cap (crowd, tiny or dropped segments leave gaps) fits the bits without merging ids.

    Only done where needed: ids that fit keep their segments_info order, and with them the draws
    of the random id remap (`remap_ids`) that a run's results depend on.
    """
    table = np.zeros(int(contig.max(initial=0)) + 1, np.int64)
    table[[s["id"] for s in info]] = np.arange(1, len(info) + 1)
    return table[contig], [{**s, "id": j} for j, s in enumerate(info, start=1)]


def collate(batch: list[dict]) -> dict:
    """Stack tensors; keep per-image lists (segments_info, captions, names) as lists."""
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def shapes_dataset(root: str | os.PathLike, split: str, **kwargs) -> PanopticDataset:
    """PanopticDataset over a split of a COCO-layout folder (Shapes or COCO 2017)."""
    return PanopticDataset(resolve_split(root, split), **kwargs)


# -----------------------------------------------------------------------------
# 5. Command line
# -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Shapes dataset writer and data inspection.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="write the Shapes dataset in COCO panoptic format",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--num-train", type=int, default=4000, help="number of training images")
    s.add_argument("--num-val", type=int, default=200, help="number of validation images")
    s.add_argument("--seed", type=int, default=0, help="item i depends only on (seed, split, i)")
    s.add_argument("--workers", type=int, default=0, help="processes (0 = one per core, at most 8)")
    v = sub.add_parser("show", help="save a picture (image | segments | overlay) of dataset items",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--data", required=True, help="COCO-format panoptic folder")
    v.add_argument("--split", default="val", help="split name ('val' finds val2017 too)")
    v.add_argument("--index", type=int, default=0, help="first item")
    v.add_argument("--num", type=int, default=4, help="number of items")
    v.add_argument("--out", default="items.png", help="output PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "shapes":
        if args.size < 16 or args.num_train < 0 or args.num_val < 0:
            parser.error("shapes needs --size 16 or more (the smallest thing Shapes draws) and counts of 0 or more")
        import time
        t0 = time.time()
        write_shapes(args.out, size=args.size, num_train=args.num_train, num_val=args.num_val,
                     seed=args.seed, workers=args.workers or None)
        print(f"done in {time.time() - t0:.1f}s")
        return 0
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: no such folder")
    try:
        ds = PanopticDataset(resolve_split(args.data, args.split), size=None)
    except PanopticFormatError as exc:
        parser.error(str(exc))
    if not 0 <= args.index < len(ds) or args.num < 1:
        parser.error(f"--index {args.index} --num {args.num}: the split has items 0..{len(ds) - 1}")
    rows = []
    for i in range(args.index, min(args.index + args.num, len(ds))):
        item = ds[i]
        img = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        seg = item["segments"].numpy()
        rows.append(np.concatenate([img, colorize(seg), overlay(img, seg)], axis=1))
        print(f"{item['file_name']}: {len(item['segments_info'])} segments | {item['caption']!r}")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: MIT
"""
evaluate.py -- the metrics of both papers: panoptic quality, PDM's Mean Count Difference, depth errors,
FID, and the evaluation of trained LDMSeg and PDM models.

Panoptic quality (PQ = SQ x RQ; Kirillov et al., "Panoptic Segmentation", CVPR 2019) is computed with
exactly the semantics of the COCO reference evaluator, panopticapi's `pq_compute`: a predicted and a
ground-truth segment of the same category match when their IoU is > 0.5 (the prediction's pixels
on ground-truth void left out of the union); unmatched ground truth is a false negative unless it is crowd;
an unmatched prediction is a false positive unless more than half of it lies on void or on the crowd
region of its category; PQ, SQ, RQ are averaged over the categories that occur (All, Things, Stuff).
It gives the same numbers as panopticapi on the same files (to floating-point precision; the sums
are even taken in the same order). LDMSeg reports *class-agnostic* PQ [LDMSeg brief §4 step 6]:
every segment, thing or stuff, becomes one "thing" category; `class_agnostic=True` does that.

Contents
  1. Per-image matching          [Kirillov et al. 2019 §4.1; panopticapi] segment tables, the pixel
                                 confusion matrix (numpy lookup table / torch on any device), matching
  2. PQ accumulator              PQAccumulator(categories).add(gt, gt_info, pred, pred_info).compute()
  3. COCO-format files           evaluate_files(gt_json, pred_json, ...): fast PNG reading, worker
                                 processes, clear errors naming the file
  4. Mean Count Difference       [PDM suppl. §5.3, brief §7.1] for generated category maps
  5. Depth metrics               AbsRel, RMSE, delta < 1.25 on valid pixels
  6. Evaluating a trained model  sample the val split with an LDMSeg checkpoint, write COCO-format
                                 predictions, score them (also used at the end of training);
                                 mask inpainting: PQ against the fraction of the map given;
                                 multi-task LDMSeg [LDMSeg §6]: class-aware PQ of the merged
                                 instance + semantic maps, semantic mIoU, depth errors
  7. FID                         [Heusel et al. 2017; pytorch-fid; PDM brief §7.2] the FID-Inception
                                 network (TF Inception-v3 as ported by pytorch-fid), loading a local
                                 pt_inception-2015-12-05-6726825d.pth; Frechet distance in float64
  8. Evaluating a co-generation  [PDM suppl. §5.3, brief §7] sample a PDM on the val captions: MCD
     model (PDM)                 against the captions' ground-truth maps, caption agreement (thing
                                 counts), image-map consistency (class-agnostic PQ of an LDMSeg
                                 segmentation of the image against the map's components), FID
  9. Command line                python evaluate.py --gt-json ... --pred-json ...  |  --ckpt RUN

Run
  python evaluate.py --gt-json gt.json --gt-dir gt/ --pred-json pred.json --pred-dir pred/
  python evaluate.py ... --class-agnostic --workers 0 --out result.json   # LDMSeg's protocol
  python evaluate.py --ckpt runs/shapes/stage2 [--sampler dpm++ --steps 20]  # a trained model
  python evaluate.py --ckpt runs/shapes/multitask    # class-aware PQ, semantic mIoU, depth (LDMSeg §6)
  python evaluate.py --ckpt runs/shapes/stage2 --task inpaint --mode sparse --given 0.1,0.5,0.9
  python evaluate.py --ckpt runs/shapes/cogen --task cogen --seg-ckpt runs/shapes/stage2 \
                     --inception ~/weights/pt_inception-2015-12-05-6726825d.pth       # PDM
  python benchmarks/pq_speed.py                                           # speed against PNG decoding

Shape legend
  B batch, H,W pixels, G / P ground-truth / predicted segments of one image, C categories,
  H_m,W_m a PDM map's side, D feature width (2048 for FID).
  Id maps are (H, W) integers, 0 = void, as in the COCO panoptic PNGs (id = R + 256 G + 256^2 B).

Semantics kept from panopticapi (QUIRK), and where we differ (DEVIATION)
  * QUIRK: the area of a ground-truth segment is the JSON's `area` field when present (panopticapi
    never counts GT pixels); a prediction's area is always counted in its PNG.
  * QUIRK: per image, panopticapi remembers one crowd segment per category -- the last one listed in
    the JSON -- so a prediction lying on another crowd region of its category can still be a false
    positive. With class_agnostic=True all crowd regions share one category, so only the last one
    counts; LDMSeg's published numbers include this. `all_crowd=True` uses every crowd region.
  * DEVIATION: a split with no category that occurs (e.g. Stuff in class-agnostic mode) gets
    pq = sq = rq = 0.0 and n = 0; panopticapi divides by zero there.
  * DEVIATION: inconsistent files raise PanopticFormatError naming the file, where panopticapi
    raises KeyError or scores silently: a GT id missing from its JSON, a GT segment listed in the
    JSON but absent from its PNG (panopticapi counts it as a false negative: a sign of maps cropped or
    resized after their JSON was written), a GT category missing from the categories list, a
    duplicate image_id among the predictions, a size mismatch.
  * LDMSeg's own evaluator skips ground-truth images that have no prediction; like panopticapi we
    raise, since a missing prediction would otherwise raise the score.

FID and co-generation (sections 7-8)
  * FID-Inception features are bit-identical to pytorch-fid's InceptionV3([3]) given the same
    weights (checked on random weights, CPU float32), and frechet_distance equals pytorch-fid's
    calculate_frechet_distance to 5e-12 relative (2048-d, 4096 samples; 3e-9 with singular
    covariances from 40 images). DEVIATION: tr sqrt(S1 S2) comes from two symmetric
    eigendecompositions in float64, not scipy's sqrtm (no scipy; no offset for singular covariances).
  * DEVIATION: caption agreement and image-map consistency are our measures; PDM reports MCD, FID
    and CLIP score only. CLIP score is left out (it needs CLIP ViT-B/32 weights).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import data
from data import PanopticFormatError

# -----------------------------------------------------------------------------
# 1. Per-image matching                    [Kirillov et al. 2019 §4.1; panopticapi]
# -----------------------------------------------------------------------------
# One image is scored from a small table: the pixel confusion matrix conf (G+1, P+1), where
# conf[i, j] counts pixels of ground-truth segment i that the prediction labels j (row / column 0 =
# void). Every PQ quantity is a sum of its entries, so the pixels are touched once -- one bincount
# over the pair index (gt_row * (P+1) + pred_col) -- and no Python loop ever runs over a mask.

ID_LIMIT = 256 ** 3          # COCO panoptic ids are 24-bit colours, so they lie in [0, 256^3)


@dataclass
class SegmentTable:
    """The segments_info of one image as arrays, rows in JSON order (conf row / column k+1)."""
    ids: np.ndarray          # (S,) int64 segment ids (the PNG colours)
    cat: np.ndarray          # (S,) int64 category *index* into the evaluator's category list
    crowd: np.ndarray        # (S,) bool iscrowd == 1 (only used for the ground truth)
    area: np.ndarray | None  # (S,) int64 JSON areas (ground truth, QUIRK above) or None: count pixels


@dataclass
class ImageStats:
    """What one image adds to the per-category sums; small, so worker processes return it cheaply."""
    tp_cat: np.ndarray       # (M,) int64 category index of each match, in increasing GT id order
    tp_iou: np.ndarray       # (M,) float64 IoU of each match, same order (panopticapi's summation order)
    fn_cat: np.ndarray       # (F,) int64 category index of each false negative
    fp_cat: np.ndarray       # (Q,) int64 category index of each false positive


def segment_table(segments_info: Sequence[dict], cat_index: dict[int, int] | None, where: str,
                  ground_truth: bool) -> SegmentTable:
    """Read segments_info into arrays; cat_index None = class-agnostic (every segment category 0)."""
    try:
        ids = np.array([int(s["id"]) for s in segments_info], np.int64).reshape(-1)        # (S,)
        cats = [0 if cat_index is None else s["category_id"] for s in segments_info]
        crowd = np.array([ground_truth and int(s.get("iscrowd", 0)) == 1 for s in segments_info], bool)
        area = None                          # QUIRK: a GT segment's area is its JSON field
        if ground_truth and all("area" in s for s in segments_info):
            area = np.array([int(s["area"]) for s in segments_info], np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as exc:
        raise PanopticFormatError(f"{where}: malformed segments_info entry ({exc!r})") from None
    if cat_index is not None:
        unknown = sorted({c for c in cats if c not in cat_index}, key=str)
        if unknown:
            raise PanopticFormatError(f"{where}: category_id {unknown[:10]} not among the "
                                      f"ground-truth categories")
        cats = [cat_index[c] for c in cats]
    return SegmentTable(ids, np.array(cats, np.int64).reshape(-1), crowd.reshape(-1), area)


def _ids_are_valid(table: SegmentTable, limit: int | None = ID_LIMIT) -> bool:
    """Ids distinct, > 0 (0 is void) and below `limit` (the cheap half of data.check_annotation)."""
    ids = table.ids
    in_range = (ids > 0) & (ids < limit) if limit is not None else ids > 0
    return len(np.unique(ids)) == len(ids) and bool(np.all(in_range))


def explain_mismatch(ids: np.ndarray, segments_info: Sequence[dict], where: str) -> None:
    """Raise PanopticFormatError saying how a PNG and its segments_info disagree, if they do."""
    if any(int(s["id"]) == 0 for s in segments_info):
        raise PanopticFormatError(f"{where}: segment id 0 is void and cannot be listed in segments_info")
    data.check_annotation(ids, list(segments_info), where)


class PixelCounter:
    """Pixel confusion matrices of numpy id maps: one lookup table and buffers reused across images.

    np.unique would sort the pixels (~4 ms for 640x480); a table indexed by the 24-bit id turns the
    job into one gather. It spans 256^3 entries (128 MiB of address space), but only the pages of
    ids that occur are ever touched (resident memory grows with the distinct ids seen, up to that
    bound), and the entries set for an image are cleared after it. The
    (H, W) work arrays are reused because fresh megabyte arrays per image cost page faults that
    made the whole evaluation up to 1.6x slower (measured on 640x480 maps).
    """

    def __init__(self):
        self.table = np.zeros(ID_LIMIT, np.intp)       # id -> row (x scale); 0 = void or unknown
        self.shape: tuple | None = None                # shape of the work arrays below

    def _work_arrays(self, shape: tuple) -> None:
        if shape != self.shape:
            self.index, self.gt_rows, self.pred_rows = (np.empty(shape, np.intp) for _ in range(3))
            self.shape = shape

    def _rows(self, ids: np.ndarray, seg_ids: np.ndarray, scale: int, out: np.ndarray) -> int:
        """out = scale x (row of each pixel's id: 1..S, 0 = void); returns the non-void pixel count."""
        np.bitwise_and(ids, ID_LIMIT - 1, out=self.index)    # (H, W); drops PIL's 4th byte (see §3)
        self.table[seg_ids] = np.arange(1, len(seg_ids) + 1) * scale
        np.take(self.table, self.index, out=out, mode="clip")  # 'clip': no bounds buffer; all < 2^24
        self.table[seg_ids] = 0
        return int(np.count_nonzero(self.index))

    def confusion(self, gt_ids: np.ndarray, gt: SegmentTable, pred_ids: np.ndarray,
                  pred: SegmentTable) -> np.ndarray | None:
        """(H, W) uint32 id maps -> (G+1, P+1) int64 confusion, or None when a map and its table
        disagree (an id of the map missing from the table, or a table id absent from the map)."""
        G, P = len(gt.ids), len(pred.ids)
        if not (_ids_are_valid(gt) and _ids_are_valid(pred)):
            return None
        self._work_arrays(gt_ids.shape)
        n_gt = self._rows(gt_ids, gt.ids, P + 1, self.gt_rows)              # (H, W) row * (P+1)
        n_pred = self._rows(pred_ids, pred.ids, 1, self.pred_rows)          # (H, W) col
        self.gt_rows += self.pred_rows                                      # (H, W) pair index
        conf = np.bincount(self.gt_rows.ravel(), minlength=(G + 1) * (P + 1)).reshape(G + 1, P + 1)
        return conf if _confusion_is_consistent(conf, n_gt, n_pred) else None


def _confusion_is_consistent(conf: np.ndarray, n_gt: int, n_pred: int) -> bool:
    """Every non-void pixel found a row / column, and every listed segment has pixels."""
    return (conf[1:, :].sum() == n_gt and conf[:, 1:].sum() == n_pred
            and bool(np.all(conf.sum(axis=1)[1:] > 0)) and bool(np.all(conf.sum(axis=0)[1:] > 0)))


def _rows_torch(ids: torch.Tensor, seg_ids: np.ndarray) -> torch.Tensor | None:
    """(H, W) integer tensor -> (H, W) int64 conf rows 0..S on the same device, None if an id is unknown."""
    order = np.argsort(seg_ids)
    keys = torch.as_tensor(np.concatenate([[0], seg_ids[order]]), device=ids.device)       # (S+1,) sorted
    row_of_key = torch.as_tensor(np.concatenate([[0], order + 1]), device=ids.device)      # (S+1,)
    flat = ids.reshape(-1).long()                                                          # (H*W,)
    pos = torch.searchsorted(keys, flat).clamp_(max=len(keys) - 1)                         # (H*W,)
    if not bool((keys[pos] == flat).all()):
        return None
    return row_of_key[pos].reshape(ids.shape)                                              # (H, W)


def confusion_torch(gt_ids: torch.Tensor, gt: SegmentTable, pred_ids: torch.Tensor,
                    pred: SegmentTable) -> np.ndarray | None:
    """PixelCounter.confusion for tensors on any device (the sampling path: no PNG is written)."""
    G, P = len(gt.ids), len(pred.ids)
    if not (_ids_are_valid(gt, limit=None) and _ids_are_valid(pred, limit=None)):
        return None
    gt_rows, pred_rows = _rows_torch(gt_ids, gt.ids), _rows_torch(pred_ids, pred.ids)
    if gt_rows is None or pred_rows is None:
        return None
    pair = gt_rows * (P + 1) + pred_rows                                                   # (H, W)
    conf = torch.bincount(pair.reshape(-1), minlength=(G + 1) * (P + 1))                   # ((G+1)*(P+1),)
    conf = conf.cpu().numpy().astype(np.int64).reshape(G + 1, P + 1)
    n_gt, n_pred = int(torch.count_nonzero(gt_ids)), int(torch.count_nonzero(pred_ids))
    return conf if _confusion_is_consistent(conf, n_gt, n_pred) else None


def _last_crowd_of_each_category(gt: SegmentTable) -> np.ndarray:
    """(G,) bool: the crowd segment panopticapi keeps per category -- the last one in JSON order (QUIRK)."""
    crowd_rows = np.nonzero(gt.crowd)[0][::-1]                    # crowd rows, last first
    _, first = np.unique(gt.cat[crowd_rows], return_index=True)   # first in reversed = last listed
    keep = np.zeros(len(gt.ids), bool)
    keep[crowd_rows[first]] = True
    return keep


def match_segments(conf: np.ndarray, gt: SegmentTable, pred: SegmentTable,
                   all_crowd: bool = False) -> ImageStats:
    """Match one image's segments and classify them as TP / FN / FP.   [Kirillov et al. 2019 §4.1]

    conf: (G+1, P+1) int64 pixel counts, row / column 0 = void.
    """
    inter = conf[1:, 1:]                                          # (G, P) pixels in both segments
    pred_void = conf[0, 1:]                                       # (P,) prediction pixels on GT void
    pred_area = conf[:, 1:].sum(axis=0)                           # (P,) counted in the PNG
    gt_area = gt.area if gt.area is not None else conf[1:, :].sum(axis=1)   # (G,) QUIRK: JSON area
    same_cat = gt.cat[:, None] == pred.cat[None, :]               # (G, P)
    # The prediction's pixels on ground-truth void are left out of the union: void is "don't know",
    # not an error.
    union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]   # (G, P)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union                                       # (G, P) float64
    # IoU > 0.5 makes matches unique (two disjoint segments cannot both cover > half of a third),
    # so no assignment problem is solved [Kirillov et al. 2019 Thm. 1]. Exactly 0.5 is no match.
    matched = (inter > 0) & same_cat & ~gt.crowd[:, None] & (iou > 0.5)          # (G, P)
    gi, pj = np.nonzero(matched)
    order = np.argsort(gt.ids[gi], kind="stable")                 # panopticapi sums IoUs by GT id
    gi, pj = gi[order], pj[order]
    gt_hit, pred_hit = np.zeros(len(gt.ids), bool), np.zeros(len(pred.ids), bool)
    gt_hit[gi], pred_hit[pj] = True, True
    # A prediction is forgiven (not a FP) when more than half of it lies on void or on the crowd
    # region of its own category -- COCO marks crowds instead of delineating each instance.
    crowd = gt.crowd if all_crowd else _last_crowd_of_each_category(gt)
    ignored = pred_void + (inter * (crowd[:, None] & same_cat)).sum(axis=0)     # (P,)
    with np.errstate(divide="ignore", invalid="ignore"):
        forgiven = ignored / pred_area > 0.5                      # (P,)
    return ImageStats(tp_cat=gt.cat[gi], tp_iou=iou[gi, pj].astype(np.float64),
                      fn_cat=gt.cat[~gt_hit & ~gt.crowd], fp_cat=pred.cat[~pred_hit & ~forgiven])


# -----------------------------------------------------------------------------
# 2. PQ accumulator: sums over images, averages over categories   [Kirillov et al. 2019 Eq. 1]
# -----------------------------------------------------------------------------
# Per category c:  PQ_c = sum_{TP} IoU / (|TP| + |FP|/2 + |FN|/2) = SQ_c x RQ_c, with
# SQ_c = sum_{TP} IoU / |TP| and RQ_c = |TP| / (|TP| + |FP|/2 + |FN|/2). PQ is the plain mean of PQ_c
# over the categories with at least one TP, FP or FN; the others are skipped (not counted as 0).

AGNOSTIC_CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]


class ImageScorer:
    """Scores one image pair into ImageStats; holds the category index and the id lookup table."""

    def __init__(self, categories: Sequence[dict], class_agnostic: bool = False, all_crowd: bool = False):
        ids = list({int(c["id"]): c for c in categories})        # panopticapi's dict: order of first listing
        self.cat_index = None if class_agnostic else {cid: k for k, cid in enumerate(ids)}
        self.all_crowd = all_crowd
        self._counter: PixelCounter | None = None                 # allocated on first numpy image

    def score(self, gt_ids, gt_info: Sequence[dict], pred_ids, pred_info: Sequence[dict],
              gt_where: str, pred_where: str) -> ImageStats:
        """Id maps: numpy (H, W) uint32 < 256^3 (fast path) or torch (H, W) integer tensors."""
        if tuple(gt_ids.shape) != tuple(pred_ids.shape):
            raise PanopticFormatError(f"{pred_where}: prediction is {_hw(pred_ids)} pixels but the "
                                      f"ground truth {gt_where} is {_hw(gt_ids)}")
        gt = segment_table(gt_info, self.cat_index, gt_where, ground_truth=True)
        pred = segment_table(pred_info, self.cat_index, pred_where, ground_truth=False)
        conf = self._confusion(gt_ids, gt, pred_ids, pred)
        if conf is None:                                           # find out which side is wrong
            explain_mismatch(_to_numpy(gt_ids), gt_info, gt_where)
            explain_mismatch(_to_numpy(pred_ids), pred_info, pred_where)
            raise PanopticFormatError(f"{pred_where}: segment ids of the PNGs and JSONs disagree")
        return match_segments(conf, gt, pred, self.all_crowd)

    def _confusion(self, gt_ids, gt: SegmentTable, pred_ids, pred: SegmentTable) -> np.ndarray | None:
        if isinstance(gt_ids, torch.Tensor) or isinstance(pred_ids, torch.Tensor):
            device = gt_ids.device if isinstance(gt_ids, torch.Tensor) else pred_ids.device
            return confusion_torch(_to_tensor(gt_ids, device), gt, _to_tensor(pred_ids, device), pred)
        if self._counter is None:
            self._counter = PixelCounter()
        return self._counter.confusion(gt_ids, gt, pred_ids, pred)


def _hw(ids) -> str:
    return "x".join(str(int(s)) for s in tuple(ids.shape)[:2])


def _to_tensor(ids, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device)
    return torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)


def _to_numpy(ids) -> np.ndarray:
    """Id map as numpy for error messages (a PNG read by _read_png_u32 gets its 4th byte dropped)."""
    return ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids) & (ID_LIMIT - 1)


def _as_id_map(ids):
    """User id maps -> what ImageScorer takes: numpy in the 24-bit range -> uint32, else a tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"an id map must be a 2-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        return ids
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"an id map must be a 2-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= ID_LIMIT):
        return torch.from_numpy(ids.astype(np.int64))             # any int64 id: the general path
    return ids.astype(np.uint32, copy=False)


class PQAccumulator:
    """Panoptic quality over a stream of images, e.g. while sampling (no PNG is ever written).

        acc = PQAccumulator(categories)                 # COCO "categories": dicts with id, isthing
        acc.add(gt_ids, gt_segments_info, pred_ids, pred_segments_info)   # per image
        acc.compute()  # {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ..., "per_class": {id: ...}}

    Id maps are (H, W) numpy arrays or torch tensors (any device) with 0 = void; segments_info is
    the COCO list of {"id", "category_id", "iscrowd"[, "area"]}. class_agnostic=True puts every
    segment in one thing category (LDMSeg's protocol; categories may then be None); all_crowd=True
    forgives predictions on any crowd region of their category, not only the last listed (QUIRK).
    """

    def __init__(self, categories: Sequence[dict] | None, class_agnostic: bool = False,
                 all_crowd: bool = False):
        if class_agnostic or categories is None:
            if not class_agnostic:
                raise ValueError("categories are needed unless class_agnostic=True")
            categories = AGNOSTIC_CATEGORIES
        missing = [c.get("id") for c in categories if "isthing" not in c or "id" not in c]
        if missing:
            raise ValueError(f"categories need 'id' and 'isthing' (missing for {missing[:10]})")
        self.categories = list({int(c["id"]): c for c in categories}.values())
        self.scorer = ImageScorer(self.categories, class_agnostic, all_crowd)
        C = len(self.categories)
        self.iou = np.zeros(C, np.float64)                        # (C,) sum of matched IoUs
        self.tp, self.fp, self.fn = (np.zeros(C, np.int64) for _ in range(3))   # (C,) counts
        self.num_images = 0

    def add(self, gt_ids, gt_segments_info: Sequence[dict], pred_ids,
            pred_segments_info: Sequence[dict], name: str | None = None) -> None:
        """Score one image; `name` (e.g. its file name) appears in error messages."""
        name = name or f"image #{self.num_images}"
        stats = self.scorer.score(_as_id_map(gt_ids), gt_segments_info, _as_id_map(pred_ids),
                                  pred_segments_info, f"{name} (ground truth)", f"{name} (prediction)")
        self.add_stats(stats)

    def add_stats(self, stats: ImageStats) -> None:
        """Add one image's ImageStats; images must come in a fixed order for bit-identical sums."""
        C = len(self.categories)
        np.add.at(self.iou, stats.tp_cat, stats.tp_iou)           # sequential: panopticapi's order
        self.tp += np.bincount(stats.tp_cat, minlength=C)
        self.fp += np.bincount(stats.fp_cat, minlength=C)
        self.fn += np.bincount(stats.fn_cat, minlength=C)
        self.num_images += 1

    def merge(self, other: "PQAccumulator") -> None:
        """Add another accumulator's sums (e.g. from another process); sums may differ in the last bit."""
        if [c["id"] for c in other.categories] != [c["id"] for c in self.categories]:
            raise ValueError("cannot merge PQ accumulators over different categories")
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.num_images += other.num_images

    def compute(self) -> dict:
        """panopticapi's result structure; fractions in [0, 1]; per_class keyed by category id (int)."""
        sums = zip(self.iou.tolist(), self.tp.tolist(), self.fp.tolist(), self.fn.tolist())   # Python numbers
        per_class = {int(c["id"]): category_pq(*s) for c, s in zip(self.categories, sums)}
        occurs = self.tp + self.fp + self.fn > 0                    # (C,) categories that count in n
        results = {}
        for split, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            rows = [per_class[int(c["id"])] for k, c in enumerate(self.categories)
                    if occurs[k] and (isthing is None or (c["isthing"] == 1) == isthing)]
            results[split] = average_pq(rows)
        results["per_class"] = per_class
        return results


def category_pq(iou: float, tp: int, fp: int, fn: int) -> dict:
    """PQ, SQ, RQ of one category from its sums (all 0.0 when it never occurs).  [Kirillov Eq. 1]"""
    if tp + fp + fn == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    denominator = tp + 0.5 * fp + 0.5 * fn
    return {"pq": iou / denominator, "sq": iou / tp if tp else 0.0, "rq": tp / denominator}


def average_pq(rows: list[dict]) -> dict:
    """Mean over categories, summed in category order like panopticapi (DEVIATION: n = 0 -> zeros)."""
    n = len(rows)
    if n == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    pq = sq = rq = 0.0
    for r in rows:
        pq, sq, rq = pq + r["pq"], sq + r["sq"], rq + r["rq"]
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


# -----------------------------------------------------------------------------
# 3. COCO-format files                                         [panopticapi pq_compute]
# -----------------------------------------------------------------------------
# The cost of file evaluation is PNG decoding; everything else is made small beside it. PIL keeps an
# RGB image as 4 bytes per pixel, so asking for the raw "RGBX" bytes and viewing them as
# little-endian uint32 gives R + 256 G + 256^2 B + 2^24 X from one copy (the one np.asarray would
# make anyway): the id is the low 24 bits, which PixelCounter keeps in the pass that gathers rows,
# so no arithmetic over colour channels is ever done.


def _read_png_u32(path: str | os.PathLike) -> np.ndarray:
    """Read a panoptic PNG (RGB, or RGBA) -> (H, W) uint32 whose low 24 bits are the segment id.

    The top byte is PIL's padding (RGB) or the alpha channel (RGBA, ignored like panopticapi does);
    PixelCounter masks it off while it gathers, so no separate pass is spent on it here.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA"):
                raise PanopticFormatError(f"{path}: panoptic PNG must be RGB, got mode {im.mode}")
            raw = im.tobytes("raw", "RGBX" if im.mode == "RGB" else "RGBA")
            W, H = im.size
    except FileNotFoundError:
        raise PanopticFormatError(f"{path}: panoptic PNG not found") from None
    except PanopticFormatError:
        raise
    except Exception as exc:  # PIL raises many types for truncated or corrupt files
        raise PanopticFormatError(f"{path}: cannot read panoptic PNG ({exc})") from None
    return np.frombuffer(raw, dtype="<u4").reshape(H, W)      # (H*W*4 bytes) -> (H, W), no copy


def read_ids_u32(path: str | os.PathLike) -> np.ndarray:
    """Read a panoptic PNG -> (H, W) uint32 segment ids, 0 = void (equal to data.read_panoptic_png)."""
    return _read_png_u32(path) & np.uint32(ID_LIMIT - 1)


@dataclass
class ImagePair:
    """One ground-truth image and its prediction, as listed in the two JSON files."""
    image_id: object         # the COCO image_id (int or str)
    gt_png: str              # path of the ground-truth PNG
    gt_info: list            # its segments_info
    pred_png: str            # path of the predicted PNG
    pred_info: list          # its segments_info


def score_pair(scorer: ImageScorer, pair: ImagePair) -> ImageStats:
    """Read both PNGs of one pair and score them."""
    gt_ids, pred_ids = _read_png_u32(pair.gt_png), _read_png_u32(pair.pred_png)
    return scorer.score(gt_ids, pair.gt_info, pred_ids, pair.pred_info,
                        f"{pair.gt_png} (image_id {pair.image_id})",
                        f"{pair.pred_png} (image_id {pair.image_id})")


def _annotations(obj: object, path: str) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        raise PanopticFormatError(f"{path}: no 'annotations' list (not a COCO panoptic JSON)")
    return obj["annotations"]


def pair_annotations(gt_json: dict, pred_json: dict, gt_dir: str, pred_dir: str,
                     gt_path: str, pred_path: str) -> list[ImagePair]:
    """Pair every ground-truth annotation with the prediction of the same image_id (all required)."""
    gt_anns, pred_anns = _annotations(gt_json, gt_path), _annotations(pred_json, pred_path)
    if not pred_anns:
        raise PanopticFormatError(f"{pred_path}: no predictions (its 'annotations' list is empty)")
    by_id: dict = {}
    for ann in pred_anns:
        if ann.get("image_id") in by_id:
            raise PanopticFormatError(f"{pred_path}: image_id {ann.get('image_id')} is predicted twice")
        by_id[ann.get("image_id")] = ann
    pairs = []
    for ann in gt_anns:
        pred = by_id.get(ann.get("image_id"))
        if pred is None:
            raise PanopticFormatError(
                f"{pred_path}: no prediction for image_id {ann.get('image_id')} (ground truth "
                f"{ann.get('file_name')}); like panopticapi, every ground-truth image needs one")
        try:
            pairs.append(ImagePair(ann["image_id"],
                                   os.path.join(gt_dir, ann["file_name"]), ann["segments_info"],
                                   os.path.join(pred_dir, pred["file_name"]), pred["segments_info"]))
        except KeyError as exc:
            raise PanopticFormatError(f"{gt_path} / {pred_path}: annotation of image_id "
                                      f"{ann.get('image_id')} lacks {exc}") from None
    return pairs


def _check_folders(gt_dir: str, pred_dir: str) -> None:
    for kind, folder in (("ground-truth", gt_dir), ("prediction", pred_dir)):
        if not os.path.isdir(folder):
            raise PanopticFormatError(f"{folder}: {kind} folder does not exist")
    if not any(name.lower().endswith(".png") for name in os.listdir(pred_dir)):
        raise PanopticFormatError(f"{pred_dir}: prediction folder holds no PNG files")


_WORKER_SCORER: ImageScorer | None = None      # set in each worker process by _init_worker


def _init_worker(categories: list, class_agnostic: bool, all_crowd: bool) -> None:
    global _WORKER_SCORER
    _WORKER_SCORER = ImageScorer(categories, class_agnostic, all_crowd)


def _score_in_worker(pair: ImagePair) -> ImageStats:
    return score_pair(_WORKER_SCORER, pair)


def _stats_stream(acc: PQAccumulator, pairs: list[ImagePair], workers: int, class_agnostic: bool,
                  all_crowd: bool):
    """ImageStats of every pair, in order; in this process (workers = 1) or in a process pool."""
    if workers <= 1 or len(pairs) < 2:
        yield from (score_pair(acc.scorer, p) for p in pairs)
        return
    # fork starts workers in milliseconds without re-importing torch; other platforms use their default.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    ctx = multiprocessing.get_context(method)
    chunk = max(1, min(64, len(pairs) // (workers * 8)))
    with ctx.Pool(workers, _init_worker, (acc.categories, class_agnostic, all_crowd)) as pool:
        yield from pool.imap(_score_in_worker, pairs, chunksize=chunk)   # imap keeps the order


def default_workers() -> int:
    """One worker process per core, at most 8 (the convention of data.py's --workers 0)."""
    return max(1, min(8, os.cpu_count() or 1))


def evaluate_files(gt_json: str, pred_json: str, gt_dir: str | None = None, pred_dir: str | None = None,
                   *, class_agnostic: bool = False, all_crowd: bool = False, workers: int = 1) -> dict:
    """PQ / SQ / RQ of COCO-format prediction files -- panopticapi's `pq_compute`, faster.

    gt_dir / pred_dir default to the JSON path without ".json" (panopticapi's convention). The
    result does not depend on `workers` (images are summed in JSON order). Returns the structure
    of PQAccumulator.compute().
    """
    gt_dir = gt_dir or str(gt_json).removesuffix(".json")
    pred_dir = pred_dir or str(pred_json).removesuffix(".json")
    gt, pred = data.read_json(gt_json), data.read_json(pred_json)
    _annotations(gt, str(gt_json)), _annotations(pred, str(pred_json))     # both are COCO panoptic JSONs
    _check_folders(gt_dir, pred_dir)
    pairs = pair_annotations(gt, pred, gt_dir, pred_dir, str(gt_json), str(pred_json))
    if not class_agnostic and not isinstance(gt.get("categories"), list):
        raise PanopticFormatError(f"{gt_json}: no 'categories' list (needed unless --class-agnostic)")
    acc = PQAccumulator(gt.get("categories"), class_agnostic=class_agnostic, all_crowd=all_crowd)
    for stats in _stats_stream(acc, pairs, workers, class_agnostic, all_crowd):
        acc.add_stats(stats)
    return acc.compute()


# -----------------------------------------------------------------------------
# 4. Mean Count Difference (MCD)                       [PDM suppl. §5.3; PDM brief §7.1]
# -----------------------------------------------------------------------------
# PDM scores a generated category map without asking *where* things are: with f_c the number of
# pixels of category c in the ground truth and f'_c in the generated map,
#     MCD = sum_c |f_c - f'_c| / (H W)           in [0, 2]; 0 = identical category histograms.


def mean_count_difference(pred, target, num_classes: int = 200) -> torch.Tensor:
    """Per-map MCD of category maps.   [PDM suppl. §5.3]

    pred, target: (B, H, W) or (H, W) integer category ids (numpy or torch), 0 = void (counted as a
    category, as in PDM's code). Returns (B,) float64, one MCD per map. PDM reports the mean of
    per-batch means, which equals the mean of these values when batches have equal sizes.
    QUIRK: PDM's code counts ids 0..num_classes (201 bins for COCO) and silently drops larger ids
    (an 8-bit map can decode to 255); we drop them too -- and negative ids -- so such pixels count
    in H*W but in no bin.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() == 2:
        pred, target = pred[None], target[None]                   # (H, W) -> (1, H, W)
    B, H, W = pred.shape
    f_pred = _category_counts(pred, num_classes)                  # (B, num_classes + 1)
    f_target = _category_counts(target.to(pred.device), num_classes)
    return (f_pred - f_target).abs().sum(dim=1).double().cpu() / (H * W)


def _category_counts(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) ids -> (B, num_classes + 1) int64 pixel counts of ids 0..num_classes."""
    B, bins = ids.shape[0], num_classes + 1
    flat = ids.reshape(B, -1).long()                                                  # (B, H*W)
    keep = (flat >= 0) & (flat <= num_classes)
    offset = torch.arange(B, device=ids.device)[:, None] * bins                       # (B, 1)
    counts = torch.bincount((flat + offset)[keep], minlength=B * bins)                # (B * bins,)
    return counts.reshape(B, bins)


# -----------------------------------------------------------------------------
# 5. Depth metrics                                     [Eigen et al. 2014; LDMSeg brief §6 (multi-task)]
# -----------------------------------------------------------------------------
# The standard monocular-depth errors (Eigen et al., NeurIPS 2014), on pixels with valid ground truth:
#     AbsRel = mean |d^ - d| / d,   RMSE = sqrt(mean (d^ - d)^2),   delta1 = mean[max(d^/d, d/d^) < 1.25].
# Each is computed per image and then averaged over images, as in Eigen et al.'s evaluation; LDMSeg's
# multi-task depth protocol is not published, so this is our choice, not the paper's.


def depth_metrics(pred, target, valid=None) -> dict:
    """AbsRel, RMSE and delta < 1.25 of predicted depth.

    pred, target: (B, H, W) or (H, W) depths (numpy or torch, any unit, the same for both).
    valid: optional bool mask of the same shape; pixels count only where also target > 0 and finite.
    A prediction <= 0 is clamped to a tiny positive depth, so it is counted as a delta1 failure.
    Returns {"abs_rel", "rmse", "delta1", "n_images"}; images with no valid pixel are skipped.
    """
    pred = torch.as_tensor(pred).double()
    target = torch.as_tensor(target).double().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() == 2:
        pred, target = pred[None], target[None]                   # (H, W) -> (1, H, W)
    mask = torch.isfinite(target) & (target > 0)
    if valid is not None:
        mask &= torch.as_tensor(valid, device=pred.device).bool().reshape(mask.shape)
    n = mask.flatten(1).sum(dim=1).double()                       # (B,) valid pixels per image
    if not bool((n > 0).any()):
        raise ValueError("depth_metrics: no valid ground-truth pixel (target > 0 and finite)")
    d = torch.where(mask, target, torch.ones_like(target))        # 1 on invalid pixels: no 0-division
    d_hat = torch.where(mask, pred, torch.ones_like(pred)).clamp_min(torch.finfo(torch.float64).tiny)
    per_pixel = {"abs_rel": (d_hat - d).abs() / d, "sq": (d_hat - d) ** 2,
                 "delta1": (torch.maximum(d_hat / d, d / d_hat) < 1.25).double()}
    per_image = {k: (v * mask).flatten(1).sum(dim=1)[n > 0] / n[n > 0] for k, v in per_pixel.items()}
    return {"abs_rel": per_image["abs_rel"].mean().item(), "rmse": per_image["sq"].sqrt().mean().item(),
            "delta1": per_image["delta1"].mean().item(), "n_images": int((n > 0).sum())}


# -----------------------------------------------------------------------------
# 6. Evaluating a trained model                          [LDMSeg brief §4; panopticapi]
# -----------------------------------------------------------------------------
# Sample the val split with a stage-2 checkpoint and score it like the files above. Predictions are
# decoded at each image's original size and scored against the original-size ground truth, as
# LDMSeg's evaluation does (logits resized bilinearly before the argmax) [LDMSeg brief §4.4];
# they are also written as a COCO panoptic folder, which this file's --gt-json / --pred-json mode
# re-scores with --class-agnostic (every prediction has category 1, "segment": panopticapi, which has
# no class-agnostic mode, needs the ground truth rewritten to that one category first).


class Progress:
    """Now and then a line on stderr while a model samples a split, e.g.
    'inpainting, sparse masks: 40/400 images | 1m12s | eta 10m48s'.

    At most one line every `every` seconds, and a last one at the end if any was written: loops
    shorter than `every` stay silent, and logs stay short.
    """

    def __init__(self, what: str, total: int, every: float = 30.0):
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.time()
        self.shown = False

    def __call__(self, done: int) -> None:
        from train import format_eta
        now = time.time()
        if now - self.last < self.every and not (done >= self.total and self.shown):
            return
        self.last, self.shown = now, True
        spent = now - self.start
        eta = spent / max(done, 1) * (self.total - done)
        print(f"{self.what}: {done}/{self.total} images | {format_eta(spent)} | eta {format_eta(eta)}",
              file=sys.stderr, flush=True)


def _original_size_dataset(ds: data.PanopticDataset) -> data.PanopticDataset:
    """The same split without resizing: the ground truth at its original resolution."""
    return data.PanopticDataset(ds.files, size=None, train=False, resize_mode=ds.resize_mode)


def _image_latent_batches(model, ds: data.PanopticDataset, batch_size: int, n: int, device=None,
                          what: str = "images"):
    """Yield (model-size images (B, 3, H, W), their latents z_image (B, 4, h, w), their items at original
    size) over ds[:n], reporting progress (labelled `what`) as the caller finishes each batch."""
    device = device or next(model.parameters()).device
    full, progress = _original_size_dataset(ds), Progress(what, n)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        images = torch.stack([ds[i]["image"] for i in idx]).to(device)
        yield images, model.encode_image(images), [full[i] for i in idx]
        progress(idx.stop)                                  # the caller is back for the next batch


@torch.no_grad()
def evaluate_segmentation(model, ds: data.PanopticDataset, *, sampler: str = "ddim", steps: int = 50,
                          batch_size: int = 16, limit: int = 0, device=None, seed: int = 0,
                          pictures: str | os.PathLike | None = None,
                          writer: data.PanopticWriter | None = None) -> dict:
    """Class-agnostic PQ / SQ / RQ of an LDMSeg model on (the first `limit` images of) `ds`.

    ds gives the model-size inputs; ground truth comes from the same files at original size.
    pictures: a folder for a grid (image | ground truth | prediction) of the first 8 images.
    The initial noise of every batch comes from one generator seeded with `seed`.
    """
    import ldmseg
    acc, rows = PQAccumulator(None, class_agnostic=True), []
    gen = torch.Generator().manual_seed(seed)
    n = len(ds) if not limit else min(limit, len(ds))
    for _, z_image, gts in _image_latent_batches(model, ds, batch_size, n, device,
                                                   f"segmentation, {sampler} {steps}"):
        z0 = ldmseg.sample_latent(model, z_image, sampler=sampler, steps=steps, generator=gen)
        for k, gt in enumerate(gts):
            pred = ldmseg.decode_panoptic(model, z0[k:k + 1], tuple(gt["segments"].shape))[0].cpu()
            acc.add(gt["segments"], gt["segments_info"], pred, data.make_segments_info(pred.numpy()))
            if writer is not None:
                writer.add(gt["file_name"], gt["image_id"], pred.numpy())
            if pictures is not None and len(rows) < 8:
                rows.append(_picture_row(gt, pred))
    if rows:
        _save_rows(rows, Path(pictures))
    res = acc.compute()["All"]
    return {"pq": res["pq"], "sq": res["sq"], "rq": res["rq"], "images": n}


def _picture_row(gt: dict, pred: torch.Tensor) -> np.ndarray:
    """image | ground truth | prediction for one item (original size)."""
    img = ((gt["image"].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return np.concatenate([img, data.colorize(gt["segments"]), data.colorize(pred)], axis=1)


def _save_rows(rows: list[np.ndarray], folder: Path) -> None:
    """Stack picture rows (padded to one width) into folder/grid.png."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(folder / "grid.png")


def _model_and_split(args: argparse.Namespace, kind: str, stage: str = "2"):
    """(EMA model on the device, the split at the model's size, the output folder) for --ckpt modes."""
    import ldmseg
    import train
    from sample import check_clamp_for_multitask, clamp_choice
    device = train.pick_device(args.device)
    ckpt = train.load_checkpoint(args.ckpt, stage)
    check_clamp_for_multitask(args, ckpt)
    with train.weights_must_fit(args.ckpt):                   # a damaged / foreign file: one clear error
        model = ldmseg.load_ldmseg(ckpt, time_shift=args.time_shift, depth_guide_sigma=args.depth_guide_sigma,
                                   clamp_x0=clamp_choice(args.clamp_x0))
    model = model.to(device)
    cfg = ckpt["config"]
    ds = data.shapes_dataset(args.data or cfg["data"], args.split, size=cfg["image_size"])
    run = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    return model, ds, Path(args.out_dir or default_out_dir(run, kind, args, args.sampler, args.steps))


def default_out_dir(run: Path, kind: str, args: argparse.Namespace, sampler: str, steps) -> Path:
    """<run>/<kind>_<split>_<sampler><steps>, with what else changes the result appended (_n<limit>,
    _seed<s>, _shift<t>, _clamp<on|off>, _text<s>, _map<s>): one evaluation never overwrites another's."""
    name = f"{kind}_{args.split}_{sampler}{steps}"
    for flag, unset, tag in (("limit", 0, "n"), ("seed", 0, "seed"), ("time_shift", None, "shift"),
                             ("clamp_x0", None, "clamp"), ("text_scale", None, "text"), ("map_scale", None, "map")):
        value = getattr(args, flag, unset)
        if value != unset:
            name += f"_{tag}{value}"
    return run / name


def run_checkpoint(args: argparse.Namespace) -> int:
    """Mode: sample a split with a trained LDMSeg checkpoint, write predictions, print PQ."""
    t0 = time.time()
    model, ds, out = _model_and_split(args, "eval")
    device = next(model.parameters()).device
    writer = data.PanopticWriter(out)
    res = evaluate_segmentation(model, ds, sampler=args.sampler, steps=args.steps, batch_size=args.batch_size,
                                limit=args.limit, device=device, seed=args.seed, pictures=out, writer=writer)
    writer.close()
    print(f"class-agnostic PQ {100 * res['pq']:.2f} | SQ {100 * res['sq']:.2f} | RQ {100 * res['rq']:.2f} "
          f"| {res['images']} {args.split} images | {args.sampler} {args.steps} steps | {time.time() - t0:.0f}s")
    data.write_json(out / "metrics.json", res)
    print(f"predictions, grid.png and metrics.json in {out}")
    return 0


@torch.no_grad()
def evaluate_inpainting(model, ds: data.PanopticDataset, *, mode: str, given: Sequence[float],
                        sampler: str = "ddim", steps: int = 50, limit: int = 0, seed: int = 0,
                        fill_width: int = 3, resample: int = 1, clamp: bool = False,
                        fit_steps: int = 50, guide_steps: int = 5) -> list[dict]:
    """PQ of inpainted maps as a function of the fraction of the map given.  [LDMSeg §5]

    For image i the known region is drawn from a generator seeded with (seed, i), so every fraction
    sees the same images; sparse masks are nested (a block given at 0.3 is given at 0.5). PQ scores
    the model's own output over the whole image -- the decoding of its latent (fitted to the given
    pixels, guide_steps / fit_steps; ldmseg.py section 11), the given pixels *not* pasted back -- so it measures how
    much the hint helped. `kept` is the share of given pixels whose id the model kept.
    Scored at the model's input size, where the known region is a set of latent cells: the images'
    own size on Shapes, the square-resized 512^2 maps on COCO (evaluate_segmentation scores at each
    image's own size instead, so the two PQs compare only on data of the model's size).
    """
    import ldmseg
    device = next(model.parameters()).device
    f = model.mask_ae.downsample_factor
    n = len(ds) if not limit else min(limit, len(ds))
    rows, progress = [], Progress(f"inpainting, {mode} masks", n * len(given))
    for j, g in enumerate(given):
        acc, kept, total = PQAccumulator(None, class_agnostic=True), 0, 0
        for i in range(n):
            item = ds[i]
            gt = item["segments"]
            h, w = gt.shape[0] // f, gt.shape[1] // f
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            cells = (ldmseg.sparse_known_mask(h, w, g, block=max(1, round(2 * gt.shape[0] / 512)), generator=gen)
                     if mode == "sparse" else ldmseg.global_known_mask(h, w, g, generator=gen))
            pixel = cells.repeat_interleave(f, 0).repeat_interleave(f, 1).bool() & (gt > 0)
            _, pred = ldmseg.inpaint(model, item["image"][None].to(device), torch.where(pixel, gt, 0), cells,
                                     sampler=sampler, steps=steps, fill_width=fill_width, resample=resample,
                                     clamp=clamp, fit_steps=fit_steps, guide_steps=guide_steps, generator=gen)
            acc.add(gt, item["segments_info"], pred, data.make_segments_info(pred.numpy()))
            kept += int((pred[pixel] == gt[pixel]).sum())
            total += int(pixel.sum())
            progress(j * n + i + 1)
        res = acc.compute()["All"]
        rows.append({"mode": mode, "given": g, "pq": res["pq"], "sq": res["sq"], "rq": res["rq"],
                     "kept": kept / total if total else None, "images": n})   # None: nothing given
    return rows


def plot_curves(rows: list[dict], path: str | os.PathLike) -> None:
    """A small line plot of PQ against the fraction given, one line per mode (PIL only)."""
    from PIL import ImageDraw
    W, H, m = 420, 300, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    to_xy = lambda g, pq: (m + g * (W - 1.5 * m), H - m - pq * (H - 1.5 * m))
    for k in range(6):
        y, x = to_xy(0, k / 5)[1], to_xy(k / 5, 0)[0]
        d.text((4, y - 6), f"{k / 5:.1f}", fill="black")
        d.text((x - 8, H - m + 6), f"{k / 5:.1f}", fill="black")
    d.text((W // 2 - 50, H - 16), "fraction of the map given", fill="black")
    d.text((4, 2), "PQ", fill="black")
    for mode, colour in (("sparse", (200, 40, 40)), ("global", (40, 80, 200))):
        pts = [to_xy(r["given"], r["pq"]) for r in rows if r["mode"] == mode]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if pts:
            d.text((pts[-1][0] - 40, pts[-1][1] - 16 if mode == "sparse" else pts[-1][1] + 6), mode, fill=colour)
    img.save(path)


def _fractions(text: str) -> list[float]:
    """'0.1,0.5' -> [0.1, 0.5]; a clear error for anything that is not a list of fractions in (0, 1]."""
    try:
        values = [float(g) for g in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0.0 < g <= 1.0 for g in values):
        raise SystemExit(f"--given {text!r}: expected fractions in (0, 1] separated by commas, e.g. 0.1,0.5,0.9")
    return values


def run_inpainting(args: argparse.Namespace) -> int:
    """Mode: PQ vs the fraction of the map given (sparse and / or global masks); table + plot."""
    import ldmseg
    t0 = time.time()
    given = [0.0] + _fractions(args.given)
    problem = ldmseg.inpaint_options_error(args.fill_width, args.resample, args.sampler, args.fit_steps,
                                           args.guide_steps)
    if problem:
        raise SystemExit(problem)
    model, ds, out = _model_and_split(args, "inpaint")
    rows = []
    for mode in (["sparse", "global"] if args.mode == "both" else [args.mode]):
        rows += evaluate_inpainting(model, ds, mode=mode, given=given, sampler=args.sampler, steps=args.steps,
                                    limit=args.limit, seed=args.seed, fill_width=args.fill_width,
                                    resample=args.resample, clamp=args.clamp_x0 == "on", fit_steps=args.fit_steps,
                                    guide_steps=args.guide_steps)
    out.mkdir(parents=True, exist_ok=True)
    print("| mode | given | PQ | SQ | RQ | given ids kept |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['given']:.1f} | {100 * r['pq']:.1f} | {100 * r['sq']:.1f} | {100 * r['rq']:.1f} "
              f"| {100 * r['kept']:.1f}% |" if r["kept"] is not None else
              f"| {r['mode']} | {r['given']:.1f} | {100 * r['pq']:.1f} | {100 * r['sq']:.1f} | {100 * r['rq']:.1f} | - |")
    data.write_json(out / "inpainting.json", rows)
    plot_curves(rows, out / "inpainting.png")
    print(f"{rows[0]['images']} {args.split} images, {args.sampler} {args.steps} steps, {time.time() - t0:.0f}s; "
          f"table and plot in {out}")
    return 0


# Multi-task LDMSeg [LDMSeg §6; ldmseg.py §10]. One checkpoint answers three tasks; what the paper
# reports of it (class-aware PQ, second-hand) needs the instance and semantic outputs merged
# (ldmseg.merge_panoptic). Semantic mIoU is the usual dataset-level one: IoU_c = TP / (TP + FP + FN)
# from one confusion matrix summed over all images, ground-truth void ignored, averaged over the
# categories that occur in the ground truth or the prediction. Depth: section 5's metrics.


def semantic_confusion(gt, pred, num_ids: int) -> np.ndarray:
    """(num_ids, num_ids) int64 pixel counts [ground-truth id, predicted id] over the pixels whose
    ground truth is not void; gt, pred (H, W) integer category ids; predictions outside 0..num_ids-1
    count as void (0)."""
    gt, pred = torch.as_tensor(gt).flatten().long(), torch.as_tensor(pred).flatten().long()
    keep = gt > 0
    gt, pred = gt[keep], pred[keep]
    pred = torch.where((pred >= 0) & (pred < num_ids), pred, 0)
    return torch.bincount(gt * num_ids + pred, minlength=num_ids ** 2).reshape(num_ids, num_ids).numpy()


def miou_from_confusion(confusion: np.ndarray, ids: Sequence[int]) -> float:
    """Mean over the category ids whose union is not empty of TP / (TP + FP + FN); 0.0 if none occurs."""
    ious = []
    for c in ids:
        tp = confusion[c, c]
        union = confusion[c, :].sum() + confusion[:, c].sum() - tp
        if union > 0:
            ious.append(tp / union)
    return float(np.mean(ious)) if ious else 0.0


class MultiTaskScores:
    """Running sums of the multi-task metrics: add(gt item, predictions) per image, then compute()."""

    def __init__(self, categories: Sequence[dict]):
        self.categories = list(categories)
        self.ids = [int(c["id"]) for c in self.categories]
        self.class_aware = PQAccumulator(self.categories)
        self.agnostic = PQAccumulator(None, class_agnostic=True)
        self.confusion = np.zeros((max(self.ids) + 1,) * 2, np.int64)     # (C+1, C+1) [gt id, pred id]
        self.depth_sums, self.depth_images = {"abs_rel": 0.0, "rmse": 0.0, "delta1": 0.0}, 0
        self.images = self.semantic_images = 0

    def add(self, gt: dict, pred: dict) -> tuple[Tensor, list[dict]] | None:
        """gt: a dataset item (segments, segments_info, category[, depth]); pred: {task: (H, W) output at
        the item's size} for the model's tasks (instance, semantic, depth, or a subset). Returns the
        class-aware merged map and its segments_info, or None when instance or semantic is missing."""
        import ldmseg
        merged = None
        if "instance" in pred and "semantic" in pred:
            merged, info = ldmseg.merge_panoptic(pred["instance"], pred["semantic"], self.categories)
            self.class_aware.add(gt["segments"], gt["segments_info"], merged, info)
        if "instance" in pred:
            self.agnostic.add(gt["segments"], gt["segments_info"], pred["instance"],
                              data.make_segments_info(pred["instance"].numpy()))
        if "semantic" in pred:
            self.confusion += semantic_confusion(gt["category"], pred["semantic"], len(self.confusion))
            self.semantic_images += 1
        self.images += 1
        if "depth" in pred and "depth" in gt and bool((gt["depth"] > 0).any()):
            m = depth_metrics(pred["depth"], gt["depth"])
            for k in self.depth_sums:
                self.depth_sums[k] += m[k]
            self.depth_images += 1
        return None if merged is None else (merged, info)

    def compute(self) -> dict:
        """Flat metrics in [0, 1] (depth: AbsRel, RMSE in the data's unit, delta1), per image averages;
        only those the predicted tasks give (class-aware PQ needs instance and semantic)."""
        out = {}
        if self.class_aware.num_images:
            pq = self.class_aware.compute()
            out.update({"pq": pq["All"]["pq"], "sq": pq["All"]["sq"], "rq": pq["All"]["rq"]})
            for split in ("Things", "Stuff"):
                out.update({f"{k}_{split.lower()}": pq[split][k] for k in ("pq", "sq", "rq")})
        if self.agnostic.num_images:
            out["pq_agnostic"] = self.agnostic.compute()["All"]["pq"]
        if self.semantic_images:
            out["miou"] = miou_from_confusion(self.confusion, self.ids)
        if self.depth_images:
            out.update({k: v / self.depth_images for k, v in self.depth_sums.items()})
        out["images"] = self.images
        return out


@torch.no_grad()
def evaluate_multitask(model, ds: data.PanopticDataset, categories: Sequence[dict], *, sampler: str = "ddim",
                       steps: int = 50, batch_size: int = 16, limit: int = 0, device=None, seed: int = 0,
                       pictures: str | os.PathLike | None = None,
                       writer: data.PanopticWriter | None = None) -> dict:
    """A multi-task LDMSeg on (the first `limit` images of) `ds`: MultiTaskScores.compute()'s metrics.

    Every task's latent comes from one batched sampling run per batch (noise from one generator
    seeded with `seed`) and is decoded at the image's original size, as evaluate_segmentation does.
    writer: receives the class-aware merged maps; pictures: a grid of the first 8 images.
    """
    import ldmseg
    scores, rows = MultiTaskScores(categories), []
    gen = torch.Generator().manual_seed(seed)
    n = len(ds) if not limit else min(limit, len(ds))
    for images, z_image, gts in _image_latent_batches(model, ds, batch_size, n, device,
                                                   f"multi-task, {sampler} {steps}"):
        z0 = ldmseg.sample_tasks_latents(model, z_image, sampler=sampler, steps=steps, generator=gen)
        for k, gt in enumerate(gts):
            size = tuple(gt["segments"].shape)
            pred = {name: ldmseg.decode_task(model, name, z[k:k + 1], size, images[k:k + 1])[0].cpu()
                    for name, z in z0.items()}
            merged, info = scores.add(gt, pred) or (None, None)
            if writer is not None and merged is not None:
                writer.add(gt["file_name"], gt["image_id"], merged.numpy(), {s["id"]: s["category_id"] for s in info})
            if pictures is not None and len(rows) < 8:
                rows.append(_multitask_row(gt, pred, merged, model.config.depth_range))
    if rows:
        _save_rows(rows, Path(pictures))
    return scores.compute()


def _multitask_row(gt: dict, pred: dict, merged: Tensor | None, depth_range) -> np.ndarray:
    """image | semantic truth | semantic | panoptic truth | class-aware merge (or the instance task's
    map without semantic) [| depth truth | depth]; the columns of tasks the model lacks are left out."""
    import ldmseg
    img = ((gt["image"].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    cols = [img]
    if "semantic" in pred:
        cols += [data.colorize(gt["category"]), data.colorize(pred["semantic"])]
    if "instance" in pred:
        cols += [data.colorize(gt["segments"]), data.colorize(pred["instance"] if merged is None else merged)]
    if "depth" in gt and "depth" in pred:
        cols += [ldmseg.depth_picture(d, depth_range).numpy() for d in (gt["depth"], pred["depth"])]
    return np.concatenate(cols, axis=1)


def run_multitask(args: argparse.Namespace) -> int:
    """Mode: --ckpt of a multi-task run: sample every task on the split, write the class-aware
    predictions (COCO format, with the split's categories), print PQ, mIoU and depth errors."""
    t0 = time.time()
    model, ds, out = _model_and_split(args, "multitask", stage="multitask")
    categories = list(ds.categories.values())
    merges = {"instance", "semantic"} <= set(model.config.tasks)            # class-aware maps to write
    writer = data.PanopticWriter(out, categories) if merges else None
    res = evaluate_multitask(model, ds, categories, sampler=args.sampler, steps=args.steps,
                             batch_size=args.batch_size, limit=args.limit, seed=args.seed, pictures=out, writer=writer)
    if writer is not None:
        writer.close()
    pct = lambda k: f"{100 * res[k]:.2f}"
    if "pq" in res:
        print(f"class-aware PQ  All {pct('pq')} (SQ {pct('sq')}, RQ {pct('rq')}) | Things {pct('pq_things')} "
              f"| Stuff {pct('pq_stuff')} | class-agnostic PQ of the instance task {pct('pq_agnostic')}")
    elif "pq_agnostic" in res:
        print(f"class-agnostic PQ of the instance task {pct('pq_agnostic')} (class-aware PQ needs the semantic task too)")
    parts = [f"semantic mIoU {pct('miou')}"] if "miou" in res else []
    if "delta1" in res:
        parts.append(f"depth AbsRel {res['abs_rel']:.4f} RMSE {res['rmse']:.4f} delta<1.25 {res['delta1']:.4f}")
    parts.append(f"{res['images']} {args.split} images | {args.sampler} {args.steps} steps | {time.time() - t0:.0f}s")
    print(" | ".join(parts))
    data.write_json(out / "metrics.json", res)
    print(f"{'class-aware predictions, ' if merges else ''}grid.png and metrics.json in {out}")
    return 0


# -----------------------------------------------------------------------------
# 7. FID: the FID-Inception network and the Frechet distance   [Heusel et al. 2017; PDM brief §7.2]
# -----------------------------------------------------------------------------
# FID compares two image sets through the 2048-d pool features of the Inception-v3 network that
# TensorFlow's FID used (the 2015-12-05 ImageNet graph), ported to PyTorch by pytorch-fid -- the
# tool PDM's code calls [PDM brief §7.2]. FID values are only comparable when computed with that
# network and its weights, so the network is written here exactly: torchvision's Inception-v3
# layout (conv without bias + BatchNorm eps 1e-3 + ReLU; blocks A-E) with the port's differences
# -- average pools that skip the padding, a max pool in the last block -- marked QUIRK below.
# Parameter names are those of the weight file
# `pt_inception-2015-12-05-6726825d.pth` (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch_pool.bn.bias,
# ...), so it loads by name; its 1008-way classifier `fc` is not needed for pool features.
#
# Input pipeline, as pytorch-fid applies it to images it reads from 8-bit PNGs [PDM brief §7.2]:
#   RGB in [0, 1] -> bilinear resize to 299 x 299 (align_corners=False, no antialiasing)
#   -> 2 x - 1 -> network -> global average pool -> (B, 2048).
# Generated images are rounded to 8-bit levels first, as PDM saves PNGs before scoring them.
#
# Frechet distance between the Gaussians N(mu_1, S_1) and N(mu_2, S_2) fitted to the two feature sets:
#   d^2 = |mu_1 - mu_2|^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^(1/2).
# tr (S_1 S_2)^(1/2) is the sum of the square roots of the eigenvalues of S_1 S_2, which has the
# eigenvalues of the symmetric PSD matrix A = S_1^(1/2) S_2 S_1^(1/2) (XY and YX share their
# eigenvalues; X = S_1^(1/2), Y = S_1^(1/2) S_2). Two symmetric eigendecompositions in float64
# therefore replace scipy's general sqrtm. They need no diagonal offset when the covariances are
# singular (fewer images than 2048 features), where pytorch-fid may add one; there the square roots
# of rounding-level eigenvalues leave an error of order sqrt(machine epsilon), relative, as sqrtm's.

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"   # the name pytorch-fid downloads it under
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)                       # where a user gets it (never fetched here)
FID_SIZE = 299                                               # Inception-v3's input side


class FIDWeightsError(ValueError):
    """The FID-Inception weight file is missing or is not the expected one."""


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU: torchvision's BasicConv2d."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    """QUIRK (TF's average pool): padded zeros are not counted, count_include_pad=False."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35 x 35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (64 + 64 + 96 + pool_features)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], dim=1)          # (B, 224 + pool, 35, 35)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (384 + 96 + C_in)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], dim=1)              # (B, 768, 17, 17)


class FIDInceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions (1x7, 7x1), c7 channels inside; 4 x 192 out."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], dim=1)          # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (320 + 192 + C_in)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)                             # (B, 1280, 8, 8)


class FIDInceptionE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs: 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels.

    QUIRK: the port's last block (Mixed_7c, pool="max") max-pools in its pool branch where the
    Inception paper and Mixed_7b average -- the TF graph does so, and FID depends on it.
    """

    def __init__(self, c_in: int, pool: str = "avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)          # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)    # (B, 768, 8, 8)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], dim=1)  # (B, 2048, 8, 8)


class FIDInception(nn.Module):
    """FID-Inception: images (B, 3, H, W) in [0, 1] -> pool features (B, 2048) float32.

    Random weights until `load_fid_inception` fills them; eval mode (BatchNorm on running stats).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")                   # QUIRK: see FIDInceptionE
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        B = images.shape[0]
        x = F.interpolate(images.float(), size=(FID_SIZE, FID_SIZE), mode="bilinear",
                          align_corners=False)                            # (B, 3, H, W) -> (B, 3, 299, 299)
        x = 2 * x - 1                                                     # [0, 1] -> [-1, 1], the TF graph's range
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # -> (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                      # -> (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                     # -> (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                      # -> (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                         # -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3)).reshape(B, 2048)                        # global average pool -> (B, 2048)


def load_fid_inception(path: str | os.PathLike) -> FIDInception:
    """FIDInception with the weights of `pt_inception-2015-12-05-6726825d.pth` (a file or its folder).

    Nothing is downloaded. The file must hold exactly the network's tensors, by name and shape;
    `fc.*` (the classifier) is ignored and BatchNorm's `num_batches_tracked` may be absent.
    Raises FIDWeightsError naming the expected file otherwise.
    """
    p = Path(path)
    p = p / FID_WEIGHTS_FILE if p.is_dir() else p
    hint = f"the FID-Inception weights {FID_WEIGHTS_FILE} (pytorch-fid's release file, from {FID_WEIGHTS_URL})"
    if not p.is_file():
        raise FIDWeightsError(f"{path}: no such file; --inception needs {hint}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FIDWeightsError(f"{p}: cannot be read as a torch file ({type(exc).__name__}); "
                              f"expected {hint}") from None
    net = FIDInception()
    if not isinstance(state, dict):
        raise FIDWeightsError(f"{p}: not a state dict; expected {hint}")
    fc = state.get("fc.weight")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}   # the features end before it
    _check_fid_keys(net.state_dict(), state, p, hint)
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) != (1008, 2048):   # TF Inception's 1008 classes
        found = "absent" if fc is None else " x ".join(str(n) for n in getattr(fc, "shape", ()))
        raise FIDWeightsError(f"{p}: its classifier is {found}, not the TF Inception's 1008 x 2048: another "
                              f"Inception-v3 (torchvision's has 1000 classes) gives other features; expected {hint}")
    net.load_state_dict(state, strict=False)                          # only num_batches_tracked may be left
    return net.eval()


def _check_fid_keys(expected: dict, state: dict, path: Path, hint: str) -> None:
    """Raise FIDWeightsError listing missing, unexpected and mis-shaped tensors (up to 5 of each)."""
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(state) & set(expected)
                    if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    problems = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                if names]
    if problems:
        raise FIDWeightsError(f"{path}: its tensors do not match the FID-Inception network -- "
                              f"{'; '.join(problems)}; expected {hint}")


def to_unit_range_8bit(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> [0, 1] rounded to the 256 levels of an 8-bit PNG (as PDM saves them)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


@contextlib.contextmanager
def _no_tf32():
    """cuDNN convolutions in full float32 inside the block (PyTorch allows TF32 there by default)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def inception_features(net: FIDInception, images: Tensor, batch_size: int = 50) -> Tensor:
    """Pool features of images in [-1, 1]: (B, 3, H, W) -> (B, 2048) float32 on the CPU.

    PAPER: pytorch-fid's batch of 50 [PDM brief §7.2] (features do not depend on it). TF32 is off
    in convolutions, so a GPU gives float32 features, not 10-bit-mantissa ones.
    """
    device = next(net.parameters()).device
    out = []
    with _no_tf32():
        for chunk in images.split(batch_size):
            out.append(net(to_unit_range_8bit(chunk).to(device)).float().cpu())   # (b, 2048)
    return torch.cat(out)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """features (N, D), N >= 2 -> mean (D,) and unbiased covariance (D, D), float64 (numpy.cov's)."""
    f = torch.as_tensor(features).double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got {tuple(f.shape)}")
    mu = f.mean(dim=0)                                                # (D,)
    centred = f - mu                                                  # (N, D)
    return mu, centred.T @ centred / (f.shape[0] - 1)                 # (D, D)


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix; eigenvalues below 0 (rounding) are taken as 0."""
    evals, evecs = torch.linalg.eigh(sigma)                           # sigma = V diag(e) V^T
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T              # V diag(sqrt e) V^T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2)  [Heusel et al. 2017 (FID); Dowson & Landau 1982].

    mu: (D,), sigma: (D, D) symmetric PSD (numpy or torch); computed in float64 (section comment).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a).double().cpu() for a in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0]
    if mu1.shape != (D,) or mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"statistics of different sizes: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}")
    root1 = _psd_sqrt(sigma1)                                         # S_1^(1/2)
    a = root1 @ sigma2 @ root1                                        # (D, D), eigenvalues of S_1 S_2
    a = (a + a.T) / 2                                                 # symmetric up to rounding: make it exact
    tr_covmean = torch.linalg.eigvalsh(a).clamp_min(0).sqrt().sum()   # tr (S_1 S_2)^(1/2)
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def fid_from_features(features_a: Tensor, features_b: Tensor) -> float:
    """FID of two feature sets (N_a, 2048), (N_b, 2048): the Frechet distance of their Gaussians."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# -----------------------------------------------------------------------------
# 8. Evaluating a co-generation model (PDM)           [PDM suppl. §5.3, brief §7; LDMSeg §4]
# -----------------------------------------------------------------------------
# A PDM samples an (image, map) pair for each val caption; four questions are asked of the pairs:
#   * MCD (section 4) -- is the generated map's category histogram that of the ground-truth map of
#     the image the caption describes? PAPER: both at the map's resolution H_m x W_m, the ground
#     truth min-pooled as in training; decoded ids above num_categories count in no bin [brief §7.1].
#   * caption agreement -- does the map hold as many things of each kind as the caption says?
#     For each (image, thing category) the caption names, the caption's count (summed over
#     colours: a category map has none) is compared with the connected components of that category
#     in the map. DEVIATION (ours, not PDM's): PDM has no such measure; Shapes captions make it
#     possible. Components ignore 4-connected specks smaller than 1/1024 of the map (1 px at
#     Shapes' 32^2, 4 px at COCO's 64^2). Touching things of one kind merge into one component
#     even in a perfect map, so the same score of the ground-truth maps is reported as its ceiling
#     (0.78 on the Shapes val split at 32^2). A panoptic PDM (config.panoptic, our extension) holds
#     instances: there its segments -- distinct (category, instance id) pairs -- are counted, and the
#     ground truth's, min-pooled as in training, give the ceiling.
#   * image-map consistency -- does the image show the map? An LDMSeg stage-2 model segments the
#     generated image; class-agnostic PQ (section 2) scores its segments against the generated map's
#     connected components (a panoptic map's own segments), upsampled nearest to the image (they are
#     the reference, the segmentation the prediction). The segmenter is imperfect, so the same score
#     of the val images against their own maps (as the model sees them) is reported as its ceiling.
#     A DEVIATION of ours too: PDM shows consistency only in figures.
#   * FID (section 7) of the generated images against the val images whose captions were used.


def default_min_area(map_size: tuple[int, int]) -> int:
    """Smallest component counted as a thing: 1/1024 of the map, at least 1 pixel (section comment)."""
    return max(1, round(map_size[0] * map_size[1] / 1024))


def thing_names(categories) -> dict[str, int]:
    """{name: id} of the thing categories; categories: a COCO list of dicts or the Dataset's {id: dict}."""
    rows = categories.values() if isinstance(categories, dict) else categories
    return {c["name"]: int(c["id"]) for c in rows if c.get("isthing", 1) == 1}


def caption_category_counts(caption: str, names: dict[str, int]) -> dict[int, int]:
    """'two red circles and a blue circle on grass' -> {id of circle: 3} (kinds the categories know)."""
    import cogen
    counts: dict[int, int] = {}
    for (_, kind), n in cogen.caption_counts(caption).items():
        if kind in names:
            counts[names[kind]] = counts.get(names[kind], 0) + n
    return counts


def caption_matches(category_map: Tensor, caption: str, names: dict[str, int],
                    min_area: int | None = None, instance_map: Tensor | None = None) -> list[tuple[int, int, int]]:
    """[(category id, caption's count, the map's things)] for each thing category the caption names.

    category_map: (H_m, W_m) int64 category ids, 0 = void (any ids; invalid ones simply never match).
    instance_map: (H_m, W_m) instance ids of a panoptic map: things are then its segments, else the
    connected components of each category (section comment).
    """
    import cogen
    wanted = caption_category_counts(caption, names)
    if not wanted:
        return []
    min_area = default_min_area(tuple(category_map.shape)) if min_area is None else min_area
    found = (cogen.component_counts(category_map, min_area) if instance_map is None
             else cogen.instance_counts(category_map, instance_map, min_area))
    return [(cat, n, found.get(cat, 0)) for cat, n in sorted(wanted.items())]


def summarize_caption_matches(matches: Sequence[tuple[int, int, int]], names: dict[str, int]) -> dict:
    """Agreement over (image, category) pairs, overall and per category; None where there is no pair.

    Returns {"agreement": share of pairs whose counts are equal, "pairs": n, "count_error": mean
    |components - caption count|, "per_category": {name: {"agreement", "pairs"}}}.
    """
    by_id = {i: name for name, i in names.items()}
    share = lambda rows: sum(want == got for _, want, got in rows) / len(rows) if rows else None
    per = {}
    for cat in sorted({m[0] for m in matches}):
        rows = [m for m in matches if m[0] == cat]
        per[by_id.get(cat, str(cat))] = {"agreement": share(rows), "pairs": len(rows)}
    error = sum(abs(got - want) for _, want, got in matches) / len(matches) if matches else None
    return {"agreement": share(matches), "pairs": len(matches), "count_error": error, "per_category": per}


def caption_agreement(maps, captions: Sequence[str], categories, min_area: int | None = None) -> dict:
    """Do generated maps hold the number of things their captions name? (section comment)

    maps: (B, H_m, W_m) integer category ids, 0 = void; captions: B Shapes captions; categories: the
    COCO categories (list or {id: dict}); min_area: smallest counted component (default 1/1024 of
    the map). Returns summarize_caption_matches' dict.
    """
    names = thing_names(categories)
    maps = torch.as_tensor(maps).long()
    if len(maps) != len(captions):
        raise ValueError(f"{len(maps)} maps but {len(captions)} captions")
    matches = [m for ids, cap in zip(maps, captions) for m in caption_matches(ids, cap, names, min_area)]
    return summarize_caption_matches(matches, names)


def map_instances(category_map: Tensor, num_categories: int, instance_map: Tensor | None = None) -> Tensor:
    """(H_m, W_m) category ids -> (H_m, W_m) int64 segments 1..n; invalid category ids become void.

    The segments are the connected components of each category or, given a panoptic map's
    instance ids, its distinct (category, instance id) pairs; instance id 0 (void instance bits) is
    void, as cogen.instance_counts counts it.
    """
    import cogen
    category_map = torch.as_tensor(category_map).long()
    valid = (category_map > 0) & (category_map <= num_categories)
    if instance_map is None:
        return cogen.connected_components(torch.where(valid, category_map, 0))
    instance_map = torch.as_tensor(instance_map).long()
    valid &= instance_map > 0
    key = category_map * (int(instance_map.max()) + 1) + instance_map
    _, labels = torch.unique(torch.where(valid, key, -1), return_inverse=True)       # -1 (void) sorts first
    return labels + 1 - int((~valid).any())                                          # void -> 0, segments 1..n


def add_consistency(acc: PQAccumulator, category_map: Tensor, segmentation: Tensor, num_categories: int,
                    instance_map: Tensor | None = None) -> None:
    """Score one image: the map's segments (upsampled nearest to segmentation's (H, W)) vs the segments."""
    import cogen
    instances = map_instances(category_map, num_categories, instance_map)[None]      # (1, H_m, W_m)
    instances = cogen.nearest_resize_ids(instances, tuple(segmentation.shape))[0]     # -> (H, W)
    seg = segmentation.cpu()
    acc.add(instances, data.make_segments_info(instances.numpy()), seg, data.make_segments_info(seg.numpy()))


@dataclass
class CogenTally:
    """What evaluate_cogen gathers batch by batch; `result` turns it into the metrics."""
    mcd: list = field(default_factory=list)          # per-map MCD values
    matches: list = field(default_factory=list)      # (category, caption count, components) of generated maps
    gt_matches: list = field(default_factory=list)   # the same for the ground-truth maps: the ceiling
    fake: list = field(default_factory=list)         # (b, 2048) FID features of generated images
    real: list = field(default_factory=list)         # (b, 2048) FID features of the val images
    consistency: PQAccumulator | None = None         # class-agnostic PQ, segmentation vs map
    gt_consistency: PQAccumulator | None = None      # the same for the val images and their true maps: the ceiling
    rows: list = field(default_factory=list)         # picture rows for grid.png

    def result(self, names: dict[str, int]) -> dict:
        out = {"images": len(self.mcd), "mcd": float(np.mean(self.mcd))}
        gen, gt = summarize_caption_matches(self.matches, names), summarize_caption_matches(self.gt_matches, names)
        out.update({f"caption_{k}": v for k, v in gen.items()})
        out["caption_agreement_gt"] = gt["agreement"]
        if self.consistency is not None:
            res = self.consistency.compute()["All"]
            out.update(consistency_pq=res["pq"], consistency_sq=res["sq"], consistency_rq=res["rq"])
            res = self.gt_consistency.compute()["All"]
            out.update(consistency_gt_pq=res["pq"], consistency_gt_sq=res["sq"], consistency_gt_rq=res["rq"])
        if self.fake and len(self.mcd) >= 2:                    # a covariance needs two images
            out["fid"] = fid_from_features(torch.cat(self.fake), torch.cat(self.real))
        return out


def _substream_seed(seed: int, stream: int) -> int:
    """A seed for stream k of run `seed` (independent streams: adding one leaves the others alone)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _segment_images(seg_model, images: Tensor, seg_size, steps: int, generator: torch.Generator) -> Tensor:
    """LDMSeg segments of images (B, 3, H, W) in [-1, 1] -> (B, H, W) int64 on the CPU: the generated
    images, or the val images for the consistency ceiling.

    seg_size: the segmenter's training (H, W) when it differs from the images'; the images are then
    resized to it (bilinear) and the logits decoded back at (H, W) [LDMSeg brief §4.4].
    """
    import ldmseg
    H, W = images.shape[-2:]
    x = images
    if seg_size is not None and tuple(seg_size) != (H, W):
        x = F.interpolate(images, size=tuple(seg_size), mode="bilinear", align_corners=False, antialias=True)
    x = x.to(next(seg_model.parameters()).device)
    return ldmseg.segment(seg_model, x, sampler="ddim", steps=steps, generator=generator, size=(H, W)).cpu()


def _score_maps(tally: CogenTally, items: list[dict], maps: Tensor, instances: Tensor | None, config,
                names: dict[str, int], min_area: int | None) -> tuple[Tensor, list]:
    """MCD against the min-pooled ground truth, and caption matches of generated and ground-truth maps.

    maps, instances: (B, H_m, W_m) generated category and (panoptic PDM) instance ids, else None.
    Returns the ground truth as the model sees it: maps (B, H_m, W_m) and B instance maps (or Nones).
    """
    import cogen
    category = torch.stack([it["category"] for it in items])                          # (B, H, W)
    gt_maps = cogen.pool_category_map(category, config.map_size, config.void_aware_pooling)  # -> (B, H_m, W_m)
    tally.mcd += mean_count_difference(maps, gt_maps, config.num_categories).tolist()
    gt_instances = [None] * len(items)
    if instances is not None:     # the ground truth's segments: encode_map's min-pooling of (category, id) keys
        span = max(int(it["segments"].max()) for it in items) + 1
        segments = torch.stack([it["segments"] for it in items])                      # (B, H, W)
        gt_instances = cogen.pool_category_map(category * span + segments, config.map_size,
                                               config.void_aware_pooling) % span      # (B, H_m, W_m)
    for k, it in enumerate(items):
        inst = None if instances is None else instances[k]
        tally.matches += caption_matches(maps[k], it["caption"], names, min_area, inst)
        tally.gt_matches += caption_matches(gt_maps[k], it["caption"], names, min_area, gt_instances[k])
    return gt_maps, gt_instances


def _score_images(tally: CogenTally, items: list[dict], images: Tensor, maps: Tensor, instances: Tensor | None,
                  num_categories: int, seg_model, seg_size, seg_steps: int, seg_gen, inception) -> Tensor | None:
    """FID features of generated and val images; segmentation + consistency PQ. Returns the segments."""
    if inception is not None:
        tally.fake.append(inception_features(inception, images))
        tally.real.append(inception_features(inception, torch.stack([it["image"] for it in items])))
    if seg_model is None:
        return None
    segments = _segment_images(seg_model, images, seg_size, seg_steps, seg_gen)  # (B, H, W)
    for k, seg in enumerate(segments):
        add_consistency(tally.consistency, maps[k], seg, num_categories, None if instances is None else instances[k])
    return segments


def _score_true_pairs(tally: CogenTally, items: list[dict], gt_maps: Tensor, gt_instances: list, num_categories: int,
                      seg_model, seg_size, seg_steps: int, seg_gen) -> None:
    """Consistency of the val images with their own maps (as the model sees them): what a generator
    whose every pair were real would score through this segmenter -- the ceiling of the measure."""
    images = torch.stack([it["image"] for it in items])                              # (B, 3, H, W)
    for k, seg in enumerate(_segment_images(seg_model, images, seg_size, seg_steps, seg_gen)):
        add_consistency(tally.gt_consistency, gt_maps[k], seg, num_categories, gt_instances[k])


@torch.no_grad()
def evaluate_cogen(model, ds: data.PanopticDataset, *, steps: int | None = None, sampler: str | None = None,
                   seed: int = 0, limit: int = 0, batch_size: int = 16, image_ae=None, seg_model=None,
                   seg_steps: int = 50, seg_size: tuple[int, int] | None = None,
                   inception: FIDInception | None = None, min_area: int | None = None,
                   pictures: str | os.PathLike | None = None) -> dict:
    """MCD, caption agreement, image-map consistency and FID of a PDM on the captions of `ds`.

    model: a PDM whose tokenizer reads captions (words mode); ds: the val split at the model's image
    size (captions, images, category maps). steps / sampler: None = the model config's. image_ae
    (ldmseg.ImageAutoencoder) decodes the image latents; without it no image exists and consistency
    and FID are skipped. seg_model: LDMSeg stage 2 (DDIM, seg_steps), seg_size its training (H, W);
    inception: a loaded FIDInception (any module mapping [0, 1] images to (B, D) features will do).
    Captions go in batches of batch_size in dataset order; the noise of co-generation comes from a
    generator seeded with `seed`, that of segmentation from its own stream (and that of the val
    images' segmentation from a third), so adding a segmenter leaves the samples unchanged.
    pictures: a folder for grid.png (first 8 samples) and captions.txt.
    Returns {"images", "mcd", "caption_agreement", "caption_pairs", "caption_count_error",
    "caption_per_category", "caption_agreement_gt"[, "consistency_pq" / "_sq" / "_rq", and
    "consistency_gt_pq" / "_sq" / "_rq": the val images against their own maps][, "fid"]}.
    """
    import cogen
    c = model.config
    n = len(ds) if not limit else min(limit, len(ds))
    gen, seg_gen, gt_gen = (torch.Generator().manual_seed(s)
                            for s in (seed, _substream_seed(seed, 1), _substream_seed(seed, 2)))
    names = thing_names(ds.categories)
    seg_model = seg_model if image_ae is not None else None
    tally = CogenTally() if seg_model is None else CogenTally(consistency=PQAccumulator(None, class_agnostic=True),
                                                              gt_consistency=PQAccumulator(None, class_agnostic=True))
    captions, progress = [], Progress("co-generation", n)
    for lo in range(0, n, batch_size):
        items = [ds[i] for i in range(lo, min(lo + batch_size, n))]
        x0_image, m0_bits = cogen.generate(model, [it["caption"] for it in items], sampler=sampler, steps=steps,
                                           generator=gen)                     # (B, C, h, w), (B, K, H_m, W_m)
        maps, instances = cogen.decode_map(m0_bits, c)                        # (B, H_m, W_m) ids (instances or None)
        maps, instances = maps.cpu(), None if instances is None else instances.cpu()
        gt_maps, gt_instances = _score_maps(tally, items, maps, instances, c, names, min_area)
        images = segments = None
        if image_ae is not None:
            images = cogen.decode_images(image_ae, x0_image).cpu()                  # (B, 3, H, W) in [-1, 1]
            segments = _score_images(tally, items, images, maps, instances, c.num_categories, seg_model,
                                     seg_size, seg_steps, seg_gen, inception)
            if seg_model is not None:
                _score_true_pairs(tally, items, gt_maps, gt_instances, c.num_categories, seg_model, seg_size,
                                  seg_steps, gt_gen)
        for k, it in enumerate(items[:max(0, 8 - len(tally.rows))] if pictures is not None else []):
            tally.rows.append(_cogen_picture_row(it, None if images is None else images[k], maps[k],
                                                 None if segments is None else segments[k]))
            captions.append(it["caption"])
        progress(min(lo + batch_size, n))
    if tally.rows:
        _save_rows(tally.rows, Path(pictures))
        (Path(pictures) / "captions.txt").write_text("".join(f"{k}: {cap}\n" for k, cap in enumerate(captions)))
    return tally.result(names)


def _image_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, rounded as a PNG writer does."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _cogen_picture_row(item: dict, image: Tensor | None, category_map: Tensor,
                       segments: Tensor | None) -> np.ndarray:
    """generated image | generated map | its LDMSeg segments | val image | val category map, at the val size."""
    import cogen
    H, W = item["category"].shape
    cols = []
    if image is not None:
        if tuple(image.shape[-2:]) != (H, W):
            image = F.interpolate(image[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        cols.append(_image_uint8(image))
    cols.append(data.colorize(cogen.nearest_resize_ids(category_map[None], (H, W))[0]))
    if segments is not None:
        cols.append(data.colorize(cogen.nearest_resize_ids(segments[None], (H, W))[0]))
    return np.concatenate(cols + [_image_uint8(item["image"]), data.colorize(item["category"])], axis=1)


def _cogen_image_autoencoder(ckpt: dict, image_vae: str = ""):
    """(image AE or None, where it came from / why there is none) for a PDM checkpoint.

    In order: `image_vae` (--image-vae, a --stage vae run); the autoencoder the checkpoint carries
    (train.py --stage cogen saves ckpt["image_ae"] = {"config", "weights"}); the run's own
    image_vae setting, else runs/<preset>/vae (where training looks for one).
    """
    import cogen
    import ldmseg
    import train
    cfg = ckpt.get("config") or {}
    if not image_vae and ckpt.get("image_ae") is not None:
        return cogen.load_image_ae(ckpt), "the checkpoint's own autoencoder"
    run = image_vae or cfg.get("image_vae") or train.resolve(
        train.TrainConfig(stage="vae", preset=cfg.get("preset", "shapes"))).out_dir
    if not train._is_run(run):
        if image_vae:                                         # named by the user: an error, not a skipped metric
            raise SystemExit(f"--image-vae {image_vae}: not a --stage vae run (a run folder with ckpt.pt, or its file)")
        return None, f"{run} is not a --stage vae run"
    vae = train.load_checkpoint(run, "vae")
    config, weights, source = vae["model_config"], vae["ema"] or vae["model"], f"the --stage vae run {run}"
    with train.weights_must_fit(run):
        ae = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig(**config))
        ae.load_state_dict(weights)
    return ae.requires_grad_(False).eval(), source


def _cogen_model_and_split(args: argparse.Namespace):
    """(PDM, image AE or None, the split at the model's image size, the run folder) for --task cogen."""
    import cogen
    import train
    device = train.pick_device(args.device)
    ckpt = train.load_checkpoint(args.ckpt, "cogen")
    with train.weights_must_fit(args.ckpt):                   # a damaged / foreign file: one clear error
        model = cogen.load_pdm(ckpt)
    model = model.to(device)
    for name in ("text_scale", "map_scale"):                  # --text-scale / --map-scale: the checkpoint's by default
        if getattr(args, name, None) is not None:
            setattr(model.config, name, getattr(args, name))
    if model.config.text_encoder != "words":
        raise SystemExit(f"{args.ckpt}: a context-mode PDM reads precomputed CLIP features, not captions; "
                         f"evaluating it from captions needs a words-mode model")
    image_ae, source = _cogen_image_autoencoder(ckpt, args.image_vae)
    if image_ae is None:
        print(f"images: no image autoencoder ({source}); consistency and FID are skipped -- give --image-vae RUN")
    else:
        image_ae = image_ae.to(device)
        print(f"images: decoded by {source}")
    cfg = ckpt.get("config") or {}
    factor = 2 ** (len(image_ae.config.ch_mult) - 1) if image_ae is not None else 8
    size = cfg.get("image_size") or model.config.latent_size * factor
    # PAPER: PDM center-crops its images to squares (U-ViT's COCO pipeline), as train.py's cogen stage.
    ds = data.shapes_dataset(args.data or cfg.get("data", "data/shapes"), args.split, size=size,
                             resize_mode="center_crop")
    run = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    return model, image_ae, ds, run


def _cogen_helpers(args: argparse.Namespace, device: torch.device):
    """(LDMSeg model or None, its training size, FIDInception or None) from --seg-ckpt / --inception."""
    import ldmseg
    import train
    from sample import clamp_choice
    seg_model = seg_size = inception = None
    if args.seg_ckpt:
        seg = train.load_checkpoint(args.seg_ckpt, "2")
        with train.weights_must_fit(args.seg_ckpt):
            seg_model = ldmseg.load_ldmseg(seg, clamp_x0=clamp_choice(args.clamp_x0))
        seg_model = seg_model.to(device)
        size = (seg.get("config") or {}).get("image_size")
        seg_size = (size, size) if size else None
    else:
        print("consistency PQ skipped: give --seg-ckpt RUN (an LDMSeg stage-2 run) to segment the generated images")
    if args.inception:
        inception = load_fid_inception(args.inception).to(device)
    else:
        print(f"FID skipped: give --inception PATH to {FID_WEIGHTS_FILE} (download it once from "
              f"{FID_WEIGHTS_URL}; nothing is downloaded here)")
    return seg_model, seg_size, inception


def format_cogen(res: dict, map_size: int) -> str:
    """The printed summary of evaluate_cogen's result."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    lines = [f"MCD {res['mcd']:.4f} ({res['images']} maps at {map_size}x{map_size}; 0 = the ground-truth "
             f"histogram, 2 = disjoint)"]
    if res["caption_pairs"]:
        lines.append(f"caption agreement {pct(res['caption_agreement'])} of {res['caption_pairs']} (image, thing) "
                     f"pairs, mean count error {res['caption_count_error']:.2f} | ground-truth maps "
                     f"{pct(res['caption_agreement_gt'])}")
        lines.append("  " + " | ".join(f"{name} {pct(r['agreement'])} ({r['pairs']})"
                                       for name, r in res["caption_per_category"].items()))
    else:
        lines.append("caption agreement: no caption names a count of a thing category (Shapes captions do)")
    if "consistency_pq" in res:
        lines.append(f"consistency PQ {100 * res['consistency_pq']:.2f} | SQ {100 * res['consistency_sq']:.2f} | "
                     f"RQ {100 * res['consistency_rq']:.2f} (LDMSeg segments of the images vs the maps' "
                     f"components) | val images vs their own maps {100 * res['consistency_gt_pq']:.2f}")
    if "fid" in res:
        few = (" -- fewer than 2048 images: biased upwards, not comparable to 10k-sample FIDs"
               if res["images"] < 2048 else "")
        lines.append(f"FID {res['fid']:.2f} ({res['images']} generated vs {res['images']} val images{few})")
    return "\n".join(lines)


def run_cogen(args: argparse.Namespace) -> int:
    """Mode: co-generate from the val captions with a PDM checkpoint; MCD, caption agreement, consistency, FID."""
    t0 = time.time()
    model, image_ae, ds, run = _cogen_model_and_split(args)
    c, device = model.config, next(model.parameters()).device
    sampler, steps = args.sampler or c.sampler, args.steps or c.sample_steps
    out = Path(args.out_dir or default_out_dir(run, "cogen", args, sampler, steps))
    seg_model, seg_size, inception = _cogen_helpers(args, device)
    res = evaluate_cogen(model, ds, steps=steps, sampler=sampler, seed=args.seed, limit=args.limit,
                         batch_size=args.batch_size, image_ae=image_ae, seg_model=seg_model,
                         seg_steps=args.seg_steps, seg_size=seg_size, inception=inception,
                         min_area=args.min_area or None, pictures=out)
    print(format_cogen(res, c.map_size))
    print(f"{res['images']} {args.split} captions | {sampler} {steps} steps | text guidance {c.text_scale:g}, "
          f"map guidance {c.map_scale:g} | {time.time() - t0:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    data.write_json(out / "metrics.json", {**res, "sampler": sampler, "steps": steps, "seed": args.seed,
                                           "text_scale": c.text_scale, "map_scale": c.map_scale})
    print(f"metrics.json, grid.png and captions.txt in {out}")
    return 0


# -----------------------------------------------------------------------------
# 9. Command line
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from sample import add_inpaint_options, count_arg, guide_sigma_arg, positive_int, time_shift_arg
    p = argparse.ArgumentParser(description="Panoptic quality of COCO-format predictions "
                                "(panopticapi semantics), or of a trained model: LDMSeg PQ, the inpainting "
                                "curve, PDM co-generation metrics (MCD, caption agreement, consistency, FID).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f = p.add_argument_group("COCO-format files")
    f.add_argument("--gt-json", help="ground-truth panoptic JSON (with 'categories')")
    f.add_argument("--gt-dir", help="ground-truth PNG folder; None = the --gt-json path without .json "
                   "(default: %(default)s)")
    f.add_argument("--pred-json", help="predicted panoptic JSON")
    f.add_argument("--pred-dir", help="predicted PNG folder; None = the --pred-json path without .json "
                   "(default: %(default)s)")
    m = p.add_argument_group("metric")
    m.add_argument("--class-agnostic", action="store_true",
                   help="one 'thing' category for every segment (LDMSeg's reported PQ)")
    m.add_argument("--all-crowd", action="store_true",
                   help="forgive predictions on any crowd region of their category, not only the "
                        "last one listed per image (panopticapi's rule)")
    m.add_argument("--workers", type=int, default=0,
                   help="processes reading PNGs (1 = this process only; 0 = one per core, at most 8)")
    m.add_argument("--out", help="write the result (panopticapi's structure) to this JSON file")
    c = p.add_argument_group("a trained model (samples the split, writes predictions, scores them)")
    c.add_argument("--ckpt", help="run folder or checkpoint: LDMSeg stage 2 (panoptic, inpaint), PDM (cogen), or "
                   "multi-task LDMSeg (panoptic: class-aware PQ, semantic mIoU and depth errors together)")
    c.add_argument("--task", choices=["panoptic", "inpaint", "cogen"], default="panoptic",
                   help="panoptic: segment the split; inpaint: PQ against the fraction of the map given; "
                        "cogen: co-generate from the split's captions (MCD, caption agreement, consistency, FID)")
    c.add_argument("--mode", choices=["sparse", "global", "both"], default="both",
                   help="inpaint: which known-region masks (sparse blocks / large regions)")
    c.add_argument("--given", default="0.1,0.3,0.5,0.7,0.9",
                   help="inpaint: fractions of the map given (0 is always added as the baseline)")
    add_inpaint_options(c, prefix="inpaint: ")
    c.add_argument("--data", default="", help="dataset folder; default: the one the checkpoint trained on")
    c.add_argument("--split", default="val", help="split to sample")
    c.add_argument("--limit", type=count_arg, default=0, help="only the first N images (0 = all)")
    c.add_argument("--sampler", choices=["ddim", "dpm++", "ddpm"], default=None,
                   help="sampler; None = ddim for panoptic / inpaint, the checkpoint's (dpm++ or ddim) for cogen")
    c.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps; None = 50 for panoptic / inpaint, the checkpoint's for cogen")
    c.add_argument("--batch-size", type=positive_int, default=16, help="images per sampling batch")
    c.add_argument("--time-shift", type=time_shift_arg, default=None,
                   help="panoptic / inpaint / multi-task: tell the denoiser t + N (ldmseg.py section 8); default: the "
                        "checkpoint's (shapes x0 runs: 300; 0 = none)")
    c.add_argument("--clamp-x0", choices=["on", "off"], default=None,
                   help="panoptic, a multi-task model's instance task (and the --seg-ckpt of cogen): replace each x0 "
                        "estimate by the latent of the map it decodes to (ldmseg.py section 8); default: the "
                        "checkpoint's (shapes runs: on). inpaint: off unless on")
    c.add_argument("--depth-guide-sigma", type=guide_sigma_arg, default=None,
                   help="multi-task depth: upsample the depth latent guided by the image with this colour sigma "
                        "(ldmseg.py section 10); default: the checkpoint's (0.1); 0 = nearest")
    c.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    c.add_argument("--out-dir", default="",
                   help="where outputs go; default: <run>/{eval,inpaint,multitask,cogen}_<split>_<sampler><steps>, "
                        "plus _n<limit>, _seed<s>, ... for the flags that change the result")
    c.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda")
    g = p.add_argument_group("co-generation (--task cogen)")
    g.add_argument("--seg-ckpt", default="", help="LDMSeg stage-2 run that segments the generated images for the "
                   "image-map consistency PQ; without it consistency is skipped")
    g.add_argument("--seg-steps", type=positive_int, default=50, help="DDIM steps of that segmentation")
    g.add_argument("--text-scale", type=float, default=None,
                   help="text guidance (1 = none); default: the checkpoint's (2, PDM's s = 1)")
    g.add_argument("--map-scale", type=float, default=None, help="map guidance (1 = none); default: the checkpoint's")
    g.add_argument("--inception", default="", help=f"local {FID_WEIGHTS_FILE} (pytorch-fid's FID-Inception "
                   "weights; never downloaded here) or its folder; without it FID is skipped")
    g.add_argument("--image-vae", default="", help="a --stage vae run to decode the generated latents with; "
                   "default: the autoencoder the checkpoint carries (else its image_vae run, else "
                   "runs/<preset>/vae)")
    g.add_argument("--min-area", type=count_arg, default=0,
                   help="caption agreement: smallest map component counted as a thing, in map pixels "
                        "(0 = 1/1024 of the map)")
    return p


def format_table(results: dict) -> str:
    """The All / Things / Stuff table, in percent, laid out like panopticapi's printout."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 36]
    for split in ("All", "Things", "Stuff"):
        r = results[split]
        if r["n"] == 0:
            lines.append(f"{split:10s}| {'-':>6s} {'-':>6s} {'-':>6s} {0:5d}")
        else:
            pq, sq, rq = (100 * r[k] for k in ("pq", "sq", "rq"))
            lines.append(f"{split:10s}| {pq:6.2f} {sq:6.2f} {rq:6.2f} {r['n']:5d}")
    return "\n".join(lines)


def run_files(args: argparse.Namespace) -> int:
    """Mode: score COCO-format prediction files against ground-truth files."""
    t0 = time.time()
    workers = args.workers if args.workers > 0 else default_workers()
    results = evaluate_files(args.gt_json, args.pred_json, args.gt_dir, args.pred_dir,
                             class_agnostic=args.class_agnostic, all_crowd=args.all_crowd,
                             workers=workers)
    print(format_table(results))
    print(f"{time.time() - t0:.2f}s with {workers} process(es)")
    if args.out:
        data.write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


# Flags that only one way of evaluating reads: given to another, they are refused, not ignored.
FILES_FLAGS = ("gt_dir", "pred_dir", "class_agnostic", "all_crowd", "workers", "out")
INPAINT_FLAGS = ("mode", "given", "resample", "fill_width", "fit_steps", "guide_steps")
COGEN_FLAGS = ("seg_ckpt", "seg_steps", "text_scale", "map_scale", "inception", "image_vae", "min_area")
CKPT_FLAGS = ("ckpt", "task", "data", "split", "limit", "sampler", "steps", "batch_size", "time_shift", "clamp_x0",
              "depth_guide_sigma", "seed", "out_dir", "device") + INPAINT_FLAGS + COGEN_FLAGS


def choose_mode(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]):
    """The mode the flags ask for: one run_* function per way of obtaining predictions.

    given: the flags named on the command line (sample.given_flags); a flag another mode reads is refused.
    """
    from sample import refuse_ignored
    if args.gt_json or args.pred_json:
        if not (args.gt_json and args.pred_json):
            parser.error("--gt-json and --pred-json go together")
        refuse_ignored(parser, given, CKPT_FLAGS, "--ckpt (a trained model), not to --gt-json / --pred-json")
        return run_files
    refuse_ignored(parser, given, FILES_FLAGS, "--gt-json / --pred-json (COCO-format files), not to --ckpt")
    if args.task != "inpaint":
        refuse_ignored(parser, given, INPAINT_FLAGS, "--task inpaint")
    if args.ckpt and args.task == "cogen":
        if args.sampler == "ddpm":
            parser.error("--task cogen samples with dpm++ or ddim")
        return run_cogen
    refuse_ignored(parser, given, COGEN_FLAGS, "--task cogen")
    if args.ckpt:
        args.sampler, args.steps = args.sampler or "ddim", args.steps or 50
        if _is_multitask_checkpoint(args.ckpt):
            if args.task != "panoptic":
                parser.error(f"{args.ckpt} is a multi-task checkpoint: it is evaluated with --task panoptic "
                             f"(class-aware PQ, semantic mIoU and depth together)")
            return run_multitask
        return run_inpainting if args.task == "inpaint" else run_checkpoint
    parser.error("give --gt-json and --pred-json, or --ckpt")


def _is_multitask_checkpoint(path: str) -> bool:
    """True when --ckpt is a run of train.py --stage multitask (read without loading its tensors)."""
    import train
    return train.checkpoint_stage(path) == "multitask"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sample import given_flags
    mode = choose_mode(parser, args, given_flags(parser, argv))
    try:
        return mode(args)
    except (PanopticFormatError, FIDWeightsError) as exc:   # bad input: one line naming the file, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Tests of evaluate.py: panoptic quality (panopticapi semantics), MCD, depth metrics, the CLI."""
import json

import numpy as np
import pytest
import torch

import data
import evaluate
from data import PanopticFormatError

THING, THING_B, STUFF, NEVER = 1, 2, 10, 11
CATEGORIES = [{"id": THING, "name": "thing", "isthing": 1}, {"id": THING_B, "name": "thing b", "isthing": 1},
              {"id": STUFF, "name": "stuff", "isthing": 0}, {"id": NEVER, "name": "absent", "isthing": 0}]


def info(ids, cats=None, crowd=()):
    """segments_info of an id map; cats maps id -> category (default THING)."""
    return data.make_segments_info(np.asarray(ids), cats or {}, crowd)


def pq(gt, gt_cats, pred, pred_cats, crowd=(), **kwargs):
    """Score one image given as nested lists; returns the compute() dict."""
    acc = evaluate.PQAccumulator(CATEGORIES, **kwargs)
    gt, pred = np.array(gt), np.array(pred)
    acc.add(gt, info(gt, gt_cats, crowd), pred, info(pred, pred_cats))
    return acc.compute()


# ----------------------------------------------------------------------------- hand-worked PQ

def test_two_matches_give_mean_iou_and_rq_one():
    # gt 1 = px 0-3, gt 2 = px 4-7; pred 5 = px 0-2 (IoU 3/4), pred 6 = px 3-7 (IoU 4/5)
    r = pq([[1, 1, 1, 1, 2, 2, 2, 2]], None, [[5, 5, 5, 6, 6, 6, 6, 6]], None)
    assert r["All"] == pytest.approx({"pq": 0.775, "sq": 0.775, "rq": 1.0, "n": 1})


def test_iou_of_exactly_one_half_is_not_a_match():
    # pred 5 covers 2 of gt 1's 4 pixels and nothing else: IoU = 2 / 4 = 0.5 -> FN + FP
    r = pq([[1, 1, 1, 1, 0, 0]], None, [[5, 5, 0, 0, 0, 0]], None)
    assert r["per_class"][THING] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["All"]["n"] == 1
    # one more pixel makes IoU 3/4 > 0.5: a match
    assert pq([[1, 1, 1, 1, 0, 0]], None, [[5, 5, 5, 0, 0, 0]], None)["All"]["pq"] == pytest.approx(0.75)


def test_void_pixels_leave_the_union_and_forgive_false_positives():
    # pred 5 spills onto 2 void pixels: union = 4 + 2 - 2 - 2 = 2, IoU 1. pred 6 lies on void only.
    r = pq([[1, 1, 0, 0, 0, 0]], None, [[5, 5, 5, 5, 6, 6]], None)
    assert r["All"]["pq"] == 1.0
    # a prediction with exactly half its pixels on void is NOT forgiven (> 0.5 is required)
    # (6 = one pixel of gt 2 + one void pixel: IoU 1/3 with gt 2, half on void -> a false positive)
    r = pq([[1, 1, 1, 1, 2, 2, 2, 0]], None, [[5, 5, 5, 5, 7, 7, 6, 6]], None)
    assert r["per_class"][THING]["rq"] == pytest.approx(2 / (2 + 0.5))


def test_crowd_region_is_never_a_false_negative_and_forgives_its_category():
    gt = [[1, 1, 2, 2, 2, 2]]                      # 2 is a crowd region of category THING
    r = pq(gt, None, [[5, 5, 6, 6, 6, 6]], None, crowd=(2,))
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    # a prediction of another category on the crowd region is a false positive of that category
    r = pq(gt, None, [[5, 5, 6, 6, 6, 6]], {6: THING_B}, crowd=(2,))
    assert r["per_class"][THING_B] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["All"]["pq"] == pytest.approx(0.5) and r["All"]["n"] == 2


def test_only_the_last_listed_crowd_region_per_category_forgives_unless_all_crowd():
    gt = np.array([[1, 1, 3, 3, 4, 4]])            # 3 and 4: crowd regions of THING, 4 listed last
    pred = np.array([[7, 7, 5, 5, 0, 0]])          # 5 lies on crowd 3 only
    gt_info = info(gt, crowd=(3, 4))
    results = {}
    for all_crowd in (False, True):
        acc = evaluate.PQAccumulator(CATEGORIES, all_crowd=all_crowd)
        acc.add(gt, gt_info, pred, info(pred))
        results[all_crowd] = acc.compute()["All"]["pq"]
    assert results[False] == pytest.approx(1 / 1.5)    # panopticapi: 5 is a false positive
    assert results[True] == 1.0
    # listing crowd 3 last makes it the one panopticapi keeps
    acc = evaluate.PQAccumulator(CATEGORIES)
    acc.add(gt, gt_info[::-1], pred, info(pred))
    assert acc.compute()["All"]["pq"] == 1.0


def test_ground_truth_area_comes_from_the_json_like_panopticapi():
    gt, pred = np.array([[1, 1, 1, 1, 0, 0]]), np.array([[5, 5, 5, 0, 0, 0]])
    gt_info = info(gt)
    acc = evaluate.PQAccumulator(CATEGORIES)
    acc.add(gt, gt_info, pred, info(pred))
    assert acc.compute()["All"]["pq"] == pytest.approx(0.75)            # IoU 3 / 4
    acc = evaluate.PQAccumulator(CATEGORIES)
    acc.add(gt, [dict(gt_info[0], area=6)], pred, info(pred))            # IoU 3 / (3 + 6 - 3) = 0.5
    assert acc.compute()["All"]["pq"] == 0.0


def test_class_agnostic_ignores_categories_and_has_no_stuff():
    gt, pred = [[1, 1, 2, 2, 2]], [[5, 5, 6, 6, 6]]
    aware = pq(gt, {1: THING, 2: STUFF}, pred, {5: THING_B, 6: THING})
    agnostic = pq(gt, {1: THING, 2: STUFF}, pred, {5: THING_B, 6: THING}, class_agnostic=True)
    assert aware["All"]["pq"] == 0.0
    assert agnostic["All"] == agnostic["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert agnostic["Stuff"]["n"] == 0 and list(agnostic["per_class"]) == [1]


def test_things_stuff_split_and_absent_categories_are_skipped():
    gt = [[1, 1, 1, 2, 2, 2]]                       # 1 thing, 2 stuff
    pred = [[5, 5, 5, 6, 0, 0]]                     # thing perfect, stuff IoU 1/3
    r = pq(gt, {1: THING, 2: STUFF}, pred, {5: THING, 6: STUFF})
    assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}   # NEVER is not counted in n
    assert r["All"]["pq"] == pytest.approx(0.5) and r["All"]["n"] == 2
    assert r["per_class"][NEVER] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


# ----------------------------------------------------------------------------- invariances

def random_scene(rng, size=24, n=6, crowd=False):
    """A blob-like GT map of n segments (random 24-bit ids) and a perturbed prediction."""
    coarse = rng.integers(0, n + 1, (size // 4, size // 4))
    labels = np.kron(coarse, np.ones((4, 4), np.int64))                    # (size, size) blocks
    pred_labels = labels.copy()
    flip = rng.random(labels.shape) < 0.15
    pred_labels[flip] = rng.integers(0, n + 1, flip.sum())
    ids = rng.choice(256 ** 3 - 1, 2 * n + 2, replace=False) + 1
    ids[0] = ids[n + 1] = 0
    gt, pred = ids[labels], ids[n + 1 + pred_labels]
    cats = {int(ids[k]): [THING, THING_B, STUFF][k % 3] for k in range(1, n + 1)}
    cats.update({int(ids[n + 1 + k]): [THING, THING_B, STUFF][k % 3] for k in range(1, n + 1)})
    crowd_ids = (int(ids[1]),) if crowd else ()
    return gt, info(gt, cats, crowd_ids), pred, info(pred, cats)


def test_pq_of_ground_truth_against_itself_is_one():
    rng = np.random.default_rng(0)
    acc = evaluate.PQAccumulator(CATEGORIES)
    for _ in range(3):
        gt, gt_info, _, _ = random_scene(rng, crowd=True)
        acc.add(gt, gt_info, gt, [dict(s, iscrowd=0) for s in gt_info])
    r = acc.compute()
    assert r["All"]["pq"] == r["Things"]["pq"] == r["Stuff"]["pq"] == 1.0


def test_pq_is_invariant_to_permuting_instance_ids():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(4)]
    before, after = evaluate.PQAccumulator(CATEGORIES), evaluate.PQAccumulator(CATEGORIES)
    for gt, gt_info, pred, pred_info in scenes:
        before.add(gt, gt_info, pred, pred_info)
        new_gt, new_gt_info = permute_ids(rng, gt, gt_info)
        new_pred, new_pred_info = permute_ids(rng, pred, pred_info)
        after.add(new_gt, new_gt_info, new_pred, new_pred_info)
    r0, r1 = before.compute(), after.compute()
    assert 0.2 < r0["All"]["pq"] < 0.95                                    # a non-trivial score
    for split in ("All", "Things", "Stuff"):
        assert r1[split] == pytest.approx(r0[split], rel=1e-12)


def permute_ids(rng, ids, segments_info):
    """Give every segment a fresh random id and shuffle the JSON order."""
    old = np.array([s["id"] for s in segments_info])
    new = rng.choice(256 ** 3 - 1, len(old), replace=False) + 1
    table = dict(zip(old.tolist(), new.tolist()))
    out = np.vectorize(lambda v: table.get(v, 0))(ids)
    new_info = [dict(s, id=table[s["id"]]) for s in segments_info]
    return out, [new_info[i] for i in rng.permutation(len(new_info))]


def test_merging_accumulators_equals_one_accumulator():
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(4)]
    whole, first, second = (evaluate.PQAccumulator(CATEGORIES) for _ in range(3))
    for i, scene in enumerate(scenes):
        whole.add(*scene)
        (first if i < 2 else second).add(*scene)
    first.merge(second)
    assert first.num_images == 4
    assert first.compute()["All"] == pytest.approx(whole.compute()["All"], rel=1e-12)


# ----------------------------------------------------------------------------- files, torch, CLI

def write_set(root, scenes, drop_pred=()):
    """Write scenes as COCO panoptic gt/ and pred/ folders + JSONs; returns the four paths."""
    paths = {k: root / k for k in ("gt", "pred")}
    for p in paths.values():
        p.mkdir()
    anns = {"gt": [], "pred": []}
    for i, (gt, gt_info, pred, pred_info) in enumerate(scenes):
        for kind, ids, seg in (("gt", gt, gt_info), ("pred", pred, pred_info)):
            if kind == "pred" and i in drop_pred:
                continue
            data.write_panoptic_png(paths[kind] / f"{i:03d}.png", ids)
            anns[kind].append({"image_id": i, "file_name": f"{i:03d}.png", "segments_info": seg})
    data.write_json(root / "gt.json", {"annotations": anns["gt"], "categories": CATEGORIES})
    data.write_json(root / "pred.json", {"annotations": anns["pred"]})
    return str(root / "gt.json"), str(paths["gt"]), str(root / "pred.json"), str(paths["pred"])


def test_in_memory_torch_and_numpy_paths_equal_the_file_path(tmp_path):
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng, crowd=i % 2 == 0) for i in range(4)]
    gt_json, gt_dir, pred_json, pred_dir = write_set(tmp_path, scenes)
    from_files = evaluate.evaluate_files(gt_json, pred_json, gt_dir, pred_dir)
    for convert in (np.asarray, torch.from_numpy):
        acc = evaluate.PQAccumulator(CATEGORIES)
        for gt, gt_info, pred, pred_info in scenes:
            acc.add(convert(gt), gt_info, convert(pred), pred_info)
        assert acc.compute() == from_files                                  # bit-identical


def test_rgba_prediction_png_is_read_like_panopticapi_alpha_ignored(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(6)
    scenes = [random_scene(rng) for _ in range(2)]
    paths = write_set(tmp_path, scenes)
    before = evaluate.evaluate_files(paths[0], paths[2], paths[1], paths[3])
    rgb = data.id2rgb(scenes[0][2])
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)[..., None]
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(tmp_path / "pred" / "000.png")
    assert evaluate.read_ids_u32(tmp_path / "pred" / "000.png").tolist() == scenes[0][2].tolist()
    assert evaluate.evaluate_files(paths[0], paths[2], paths[1], paths[3]) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu_path():
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng, crowd=True) for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        acc = evaluate.PQAccumulator(CATEGORIES)
        for gt, gt_info, pred, pred_info in scenes:
            acc.add(torch.from_numpy(gt).to(device), gt_info, torch.from_numpy(pred).to(device), pred_info)
        results.append(acc.compute())
    assert results[0] == results[1]


def test_torch_path_accepts_ids_beyond_the_png_range():
    gt = torch.tensor([[2 ** 40, 2 ** 40, 0]])
    pred = torch.tensor([[3, 3, 3]])
    acc = evaluate.PQAccumulator(None, class_agnostic=True)
    acc.add(gt, [{"id": 2 ** 40, "category_id": 1, "iscrowd": 0}], pred, [{"id": 3, "category_id": 1}])
    assert acc.compute()["All"]["pq"] == 1.0


def test_cli_writes_panopticapi_structure_and_workers_do_not_change_it(tmp_path, capsys):
    rng = np.random.default_rng(3)
    gt_json, gt_dir, pred_json, pred_dir = write_set(tmp_path, [random_scene(rng) for _ in range(5)])
    args = ["--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json, "--pred-dir", pred_dir]
    assert evaluate.main(args + ["--workers", "1", "--out", str(tmp_path / "r1.json")]) == 0
    assert evaluate.main(args + ["--workers", "2", "--out", str(tmp_path / "r2.json")]) == 0
    table = capsys.readouterr().out
    assert "All" in table and "Things" in table and "Stuff" in table
    r1, r2 = (json.loads((tmp_path / f"r{k}.json").read_text()) for k in (1, 2))
    assert r1 == r2
    assert set(r1) == {"All", "Things", "Stuff", "per_class"}
    assert set(r1["per_class"]) == {str(c["id"]) for c in CATEGORIES}
    assert 0 <= r1["All"]["pq"] <= 1 and set(r1["All"]) == {"pq", "sq", "rq", "n"}
    direct = evaluate.evaluate_files(gt_json, pred_json, gt_dir, pred_dir)
    assert r1["All"] == direct["All"] and r1["per_class"][str(THING)] == direct["per_class"][THING]


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--gt-json", "--gt-dir", "--pred-json", "--pred-dir", "--class-agnostic", "--all-crowd",
                 "--workers", "--out"):
        assert flag in text
    for bad in (["--limit", "-1"], ["--steps", "0"], ["--batch-size", "0"]):          # refused by argparse
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["--ckpt", "run", *bad])
        assert exc.value.code == 2 and "takes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def small_set(tmp_path):
    rng = np.random.default_rng(4)
    scenes = [random_scene(rng, size=8, n=3) for _ in range(2)]
    return tmp_path, scenes


def rewrite_pred_json(paths, edit):
    pred = json.loads(open(paths[2]).read())
    edit(pred["annotations"])
    data.write_json(paths[2], pred)


def check_error(paths, match):
    with pytest.raises(PanopticFormatError, match=match):
        evaluate.evaluate_files(paths[0], paths[2], paths[1], paths[3])


def test_missing_prediction_png_is_named(small_set):
    root, scenes = small_set
    paths = write_set(root, scenes)
    (root / "pred" / "001.png").unlink()
    check_error(paths, r"pred[/\\]001\.png: panoptic PNG not found")


def test_json_and_png_ids_that_disagree_are_named(small_set):
    root, scenes = small_set
    paths = write_set(root, scenes)
    rewrite_pred_json(paths, lambda anns: anns[1]["segments_info"].append({"id": 4242, "category_id": THING}))
    check_error(paths, r"001\.png.*absent from the PNG: \[4242\]")
    (root / "b").mkdir()
    paths = write_set(root / "b", scenes)
    rewrite_pred_json(paths, lambda anns: anns[0]["segments_info"].pop())
    check_error(paths, r"000\.png.*absent from the JSON")


def test_duplicate_ids_and_unknown_categories_are_named(small_set):
    root, scenes = small_set
    paths = write_set(root, scenes)
    rewrite_pred_json(paths, lambda anns: anns[0]["segments_info"].append(dict(anns[0]["segments_info"][0])))
    check_error(paths, r"000\.png.*duplicate")
    rewrite_pred_json(paths, lambda anns: anns[0]["segments_info"].pop())
    rewrite_pred_json(paths, lambda anns: anns[0]["segments_info"][0].update(category_id=77))
    check_error(paths, r"000\.png.*category_id \[77\]")


def test_size_mismatch_is_named(small_set):
    root, scenes = small_set
    paths = write_set(root, scenes)
    gt, gt_info, pred, pred_info = scenes[1]
    data.write_panoptic_png(root / "pred" / "001.png", np.pad(pred, ((0, 1), (0, 0))))
    check_error(paths, r"001\.png.*9x8 pixels but the ground truth .*8x8")


def test_missing_predictions_and_empty_folders_are_reported(small_set, capsys):
    root, scenes = small_set
    paths = write_set(root, scenes, drop_pred=(1,))
    check_error(paths, r"pred\.json: no prediction for image_id 1 \(ground truth 001\.png\)")
    for png in (root / "pred").iterdir():
        png.unlink()
    check_error(paths, r"pred: prediction folder holds no PNG files")
    rc = evaluate.main(["--gt-json", paths[0], "--gt-dir", paths[1], "--pred-json", paths[2],
                        "--pred-dir", paths[3], "--workers", "1"])
    assert rc == 2 and "holds no PNG files" in capsys.readouterr().err


def test_in_memory_errors_name_the_image():
    acc = evaluate.PQAccumulator(CATEGORIES)
    gt, pred = np.array([[1, 1, 0]]), np.array([[5, 6, 0]])
    with pytest.raises(PanopticFormatError, match=r"img7\.png \(prediction\).*absent from the JSON: \[6\]"):
        acc.add(gt, info(gt), pred, [{"id": 5, "category_id": THING}], name="img7.png")
    with pytest.raises(PanopticFormatError, match=r"img7\.png \(prediction\): prediction is 1x2"):
        acc.add(gt, info(gt), pred[:, :2], info(pred[:, :2]), name="img7.png")


def test_errors_in_worker_processes_still_name_the_file(small_set):
    root, scenes = small_set
    paths = write_set(root, scenes)
    (root / "gt" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(PanopticFormatError, match=r"gt[/\\]001\.png: cannot read"):
        evaluate.evaluate_files(paths[0], paths[2], paths[1], paths[3], workers=2)


# ----------------------------------------------------------------------------- MCD and depth

def test_mean_count_difference_on_known_maps():
    pred = torch.tensor([[[0, 1], [1, 2]], [[3, 3], [3, 3]]])
    target = torch.tensor([[[0, 0], [1, 1]], [[1, 1], [1, 1]]])
    # image 0: counts (1, 2, 1) vs (2, 2, 0) -> 2 / 4; image 1: all 3 vs all 1 -> 8 / 4 (the maximum)
    assert evaluate.mean_count_difference(pred, target, num_classes=3).tolist() == [0.5, 2.0]
    assert evaluate.mean_count_difference(target[0].numpy(), target[0].numpy()).tolist() == [0.0]


def test_mean_count_difference_drops_ids_beyond_num_classes():
    pred, target = torch.tensor([[5, 5], [1, 1]]), torch.tensor([[1, 1], [1, 1]])
    # ids 5 fall outside 0..2 and count in no bin: |2 - 4| / 4
    assert evaluate.mean_count_difference(pred, target, num_classes=2).item() == 0.5


def test_depth_metrics_on_known_values_and_valid_pixels():
    pred = torch.tensor([[[2.0, 1.0, 7.0]], [[1.0, 1.0, 1.0]]])     # (B=2, H=1, W=3)
    target = torch.tensor([[[1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0]]])   # pixel (0, 0, 2) invalid
    m = evaluate.depth_metrics(pred, target)
    # image 0: AbsRel (1 + 0) / 2, RMSE sqrt(1 / 2), delta1 1 / 2; image 1 perfect; mean over images
    assert m["abs_rel"] == pytest.approx(0.25)
    assert m["rmse"] == pytest.approx(np.sqrt(0.5) / 2)
    assert m["delta1"] == pytest.approx(0.75) and m["n_images"] == 2
    masked = evaluate.depth_metrics(pred[0], target[0], valid=np.array([[False, True, True]]))
    assert masked == {"abs_rel": 0.0, "rmse": 0.0, "delta1": 1.0, "n_images": 1}


def test_depth_metrics_count_nonpositive_predictions_as_failures():
    m = evaluate.depth_metrics(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert m["delta1"] == 0.0
    with pytest.raises(ValueError, match="no valid"):
        evaluate.depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))


def test_progress_writes_at_most_a_line_per_interval_and_a_last_one(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 31.0, 45.0, 50.0])                 # the constructor, then one per call
    monkeypatch.setattr(evaluate.time, "time", lambda: next(clock))
    progress = evaluate.Progress("segmentation, ddim 50", 4, every=30.0)
    for done in (1, 2, 3, 4):
        progress(done)
    assert capsys.readouterr().err.splitlines() == [
        "segmentation, ddim 50: 2/4 images | 0m31s | eta 0m31s",   # 31 s after the start
        "segmentation, ddim 50: 4/4 images | 0m50s | eta 0m00s"]   # the end, since a line was written
    clock = iter([0.0, 5.0, 9.0])
    quick = evaluate.Progress("inpainting, sparse masks", 2, every=30.0)
    quick(1), quick(2)
    assert capsys.readouterr().err == ""                          # shorter than the interval: silent


def test_default_output_folders_name_what_changes_the_result(tmp_path):
    """A quick --limit check never overwrites a full evaluation's files, nor one seed another's."""
    import argparse
    args = lambda **kw: argparse.Namespace(**{"split": "val", "limit": 0, "seed": 0, "time_shift": None,
                                              "clamp_x0": None, **kw})
    assert evaluate.default_out_dir(tmp_path, "eval", args(), "ddim", 50) == tmp_path / "eval_val_ddim50"
    assert (evaluate.default_out_dir(tmp_path, "eval", args(limit=10, seed=2, clamp_x0="off"), "dpm++", 20)
            == tmp_path / "eval_val_dpm++20_n10_seed2_clampoff")
    with pytest.raises(SystemExit):                                         # argparse: a positive count
        evaluate.main(["--ckpt", str(tmp_path), "--task", "cogen", "--seg-steps", "0"])


@pytest.mark.parametrize("argv, where", [
    (["--ckpt", "RUN", "--workers", "2"], "--workers belongs to --gt-json / --pred-json"),
    (["--ckpt", "RUN", "--mode", "sparse", "--fit-steps", "3"], "--mode, --fit-steps belong to --task inpaint"),
    (["--ckpt", "RUN", "--seg-steps", "5"], "--seg-steps belongs to --task cogen"),
    (["--gt-json", "a.json", "--pred-json", "b.json", "--limit", "3"], "--limit belongs to --ckpt"),
])
def test_a_flag_the_chosen_mode_would_ignore_is_refused(argv, where, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    assert where in capsys.readouterr().err

"""Tests of data.py: the COCO panoptic format, map encodings, Shapes, the Dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ----------------------------------------------------------------------------- format

def test_rgb2id_inverts_id2rgb_over_the_whole_id_range():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256 ** 3 - 1, 12345678]], np.int64)
    assert np.array_equal(data.rgb2id(data.id2rgb(ids)), ids)


def test_panoptic_png_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 256 ** 3, (7, 9))
    data.write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(data.read_panoptic_png(tmp_path / "x.png"), ids)


def test_missing_and_corrupt_png_errors_name_the_file(tmp_path):
    with pytest.raises(data.PanopticFormatError, match="nope.png"):
        data.read_panoptic_png(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(data.PanopticFormatError, match="bad.png"):
        data.read_panoptic_png(tmp_path / "bad.png")


def test_check_annotation_reports_both_directions_and_duplicates():
    ids = np.array([[0, 5], [7, 7]])
    with pytest.raises(data.PanopticFormatError, match="absent from the JSON: \\[7\\]"):
        data.check_annotation(ids, [{"id": 5}], "f.png")
    with pytest.raises(data.PanopticFormatError, match="absent from the PNG: \\[9\\]"):
        data.check_annotation(ids, [{"id": 5}, {"id": 7}, {"id": 9}], "f.png")
    with pytest.raises(data.PanopticFormatError, match="duplicate"):
        data.check_annotation(ids, [{"id": 5}, {"id": 5}, {"id": 7}], "f.png")


# ----------------------------------------------------------------------------- encodings

@pytest.mark.parametrize("msb_first", [False, True])
def test_bits_round_trip_and_void_is_zero_in_every_plane(msb_first):
    ids = torch.randint(0, 128, (2, 5, 6))
    bits = data.ids_to_bits(ids, 7, msb_first=msb_first)
    assert bits.shape == (2, 7, 5, 6)
    assert torch.equal(data.bits_to_ids(bits, msb_first=msb_first), ids)
    assert torch.all(bits[:, :, ids[0] == 0][0] == 0)
    assert set(bits[ids.unsqueeze(1).expand_as(bits) > 0].unique().tolist()) <= {-1.0, 1.0}


def test_ldmseg_bits_are_lsb_first_and_pdm_bits_msb_first_with_void_as_id_zero():
    ids = torch.tensor([[[1]]])
    assert data.ids_to_bits(ids, 3).flatten().tolist() == [1.0, -1.0, -1.0]
    assert data.ids_to_bits(ids, 3, msb_first=True, void_zero=False).flatten().tolist() == [-1.0, -1.0, 1.0]
    void = torch.zeros(1, 1, 1, dtype=torch.long)
    assert data.ids_to_bits(void, 3, msb_first=True, void_zero=False).flatten().tolist() == [-1.0] * 3


def test_remap_ids_is_injective_keeps_void_and_follows_the_generator():
    ids = torch.arange(12).reshape(1, 3, 4).repeat(3, 1, 1)                 # ids 0..11 in 3 images
    out = data.remap_ids(ids, 4, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        new = out[b].flatten()[1:]
        assert out[b, 0, 0] == 0 and len(set(new.tolist())) == 11 and new.min() >= 1 and new.max() <= 15
    assert not torch.equal(out[0], out[1])                                   # a fresh permutation per image
    again = data.remap_ids(ids, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="at most 7"):
        data.remap_ids(ids, 3)


def test_raster_ids_number_segments_by_first_pixel_whatever_their_labels():
    ids = torch.tensor([[[0, 7, 7, 0],
                         [3, 3, 7, 9],
                         [3, 3, 9, 9]],
                        [[0, 0, 0, 0],
                         [0, 5, 5, 0],
                         [2, 2, 2, 2]]])
    expected = torch.tensor([[[0, 1, 1, 0],
                              [2, 2, 1, 3],
                              [2, 2, 3, 3]],
                             [[0, 0, 0, 0],
                              [0, 1, 1, 0],
                              [2, 2, 2, 2]]])
    assert torch.equal(data.raster_ids(ids), expected)
    relabelled = torch.tensor([0, 0, 40, 11, 0, 70000000, 0, 6, 0, 1])[ids]  # another injective labelling
    assert torch.equal(data.raster_ids(relabelled), expected)
    assert torch.equal(data.order_ids(ids, 4, "raster"), expected)
    assert torch.equal(data.raster_ids(torch.zeros(1, 2, 2, dtype=torch.long)), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 3"):
        data.order_ids(torch.arange(5).reshape(1, 1, 5), 2, "raster")
    with pytest.raises(ValueError, match="id order"):
        data.order_ids(ids, 4, "area")


def test_cap_segments_drops_the_smallest_segments():
    ids = np.array([[1, 1, 1, 2, 2, 3, 0]])
    capped, dropped = data.cap_segments(ids, 2)
    assert dropped == 1 and capped.tolist() == [[1, 1, 1, 2, 2, 0, 0]]


def test_nearest_resize_never_invents_labels():
    ids = np.random.default_rng(0).integers(0, 5, (13, 17))
    out = data.nearest_resize(ids, (40, 9))
    assert out.shape == (40, 9) and set(np.unique(out)) <= set(np.unique(ids))
    assert np.array_equal(data.nearest_resize(ids, (26, 34))[::2, ::2], ids)


# ----------------------------------------------------------------------------- Shapes

def test_shapes_items_are_a_pure_function_of_seed_split_index():
    a, b = data.render_shapes_item(3, "train", 5, 64), data.render_shapes_item(3, "train", 5, 64)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["ids"], b["ids"])
    assert a["caption"] == b["caption"]
    c = data.render_shapes_item(3, "val", 5, 64)
    assert not np.array_equal(a["image"], c["image"])


def _touching_same_class(ids, info):
    """True if two segments of one thing category share a 4-neighbour border."""
    cat = {s["id"]: s["category_id"] for s in info}
    thing = {s["id"] for s in info if s["category_id"] <= len(data.SHAPES_THINGS)}
    pairs = set()
    for a, b in ((ids[1:], ids[:-1]), (ids[:, 1:], ids[:, :-1])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(a[m].tolist(), b[m].tolist()))
    return any(x in thing and y in thing and cat[x] == cat[y] for x, y in pairs)


def test_shapes_has_touching_same_class_instances_in_a_third_of_images_and_valid_annotations():
    items = [data.render_shapes_item(0, "train", i, 96) for i in range(60)]
    cats = {c["id"] for c in data.shapes_categories()}
    for it in items:
        data.check_annotation(it["ids"], it["segments_info"], "shapes")
        assert {s["category_id"] for s in it["segments_info"]} <= cats
        assert it["depth"].dtype == np.uint16 and it["depth"].min() > 0
        assert 1 <= sum(s["category_id"] <= 5 for s in it["segments_info"]) <= 8
    assert sum(_touching_same_class(it["ids"], it["segments_info"]) for it in items) >= 20
    assert any(s["area"] < 30 for it in items for s in it["segments_info"])     # some tiny segments


def test_shapes_caption_counts_things_by_colour_and_class():
    things = [dict(colour="red", kind="circle")] * 2 + [dict(colour="orange", kind="square")]
    assert data._caption(things, ["sky", "grass"]) == "two red circles and an orange square on grass under a sky"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data.main(["shapes", "--out", str(root), "--size", "64", "--num-train", "6", "--num-val", "3", "--workers", "1"])
    return root


def test_data_cli_shows_items_and_refuses_bad_arguments_in_one_line(shapes_root, tmp_path, capsys):
    assert data.main(["show", "--data", str(shapes_root), "--num", "2", "--out", str(tmp_path / "items.png")]) == 0
    assert Image.open(tmp_path / "items.png").size == (3 * 64, 2 * 64)
    for argv, message in ((["show", "--data", str(shapes_root), "--index", "3"], "the split has items 0..2"),
                          (["show", "--data", str(tmp_path / "absent")], "no such folder"),
                          (["show", "--data", str(tmp_path)], "nor a flat folder"),
                          (["shapes", "--out", str(tmp_path / "s"), "--size", "8"], "--size 16 or more")):
        with pytest.raises(SystemExit) as exc:
            data.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_shapes_folder_is_coco_panoptic_and_loads(shapes_root):
    meta = json.loads((shapes_root / "annotations" / "panoptic_val.json").read_text())
    assert len(meta["images"]) == 3 and {"isthing", "id", "name"} <= set(meta["categories"][0])
    ds = data.shapes_dataset(shapes_root, "train", size=64, train=True)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["segments"].shape == (64, 64) and item["category"].shape == (64, 64)
    assert item["depth"].shape == (64, 64) and item["depth"].max() > 1.0
    assert set(item["segments"].unique().tolist()) - {0} == {s["id"] for s in item["segments_info"]}
    assert item["caption"] and isinstance(item["caption"], str)
    batch = data.collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["segments_info"]) == 2


def test_augmentation_depends_only_on_seed_epoch_index(shapes_root):
    ds = data.shapes_dataset(shapes_root, "train", size=48, train=True, seed=1)
    flips = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        a, b = ds[2], ds[2]
        assert torch.equal(a["image"], b["image"])
        flips.append(a["image"])
    assert any(not torch.equal(flips[0], f) for f in flips[1:])              # hflip does happen


def _assert_same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_decoded_item_cache_gives_the_same_items_and_keeps_none_past_its_budget(shapes_root):
    kw = dict(size=48, train=True, seed=1, crop=32, max_segments=3)       # resize, crop, flip, cap: all run
    plain = data.shapes_dataset(shapes_root, "train", **kw)
    cached = data.shapes_dataset(shapes_root, "train", cache_mb=64, **kw)
    for epoch in range(4):
        for idx in range(len(plain)):
            item = cached[(epoch, idx)]
            _assert_same_item(plain[(epoch, idx)], item)
            item["segments"].fill_(7)                                     # what a caller does to an item
            for s in item["segments_info"]:                               # must not reach the cache
                s["id"], s["category_id"] = -1, -1
    assert len(cached._decoded) == len(plain) and plain._decoded is None
    assert any(cached[(e, 0)]["flipped"] for e in range(4)) and any(cached[(0, i)]["dropped_segments"] for i in range(6))
    small = data.shapes_dataset(shapes_root, "train", cache_mb=0.01, **kw)  # one item alone is over 10 KiB
    _assert_same_item(plain[(0, 1)], small[(0, 1)])
    assert small._decoded is None


# ----------------------------------------------------------------------------- COCO-style fixture

def _coco_fixture(root, image_modes):
    """Write a tiny COCO-layout folder; image k has mode image_modes[k]."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    images, anns = [], []
    for k, mode in enumerate(image_modes):
        ids = np.zeros((20, 30), np.int64)
        ids[:, :15] = 1_000_000 + k                                          # big COCO-style ids
        ids[5:15, 18:28] = 2_000_000
        ids[0, 29] = 3_000_000                                               # tiny segment (1 px)
        ids[18:, :4] = 4_000_000                                             # crowd
        data.write_panoptic_png(root / "annotations" / "panoptic_val2017" / f"{k}.png", ids)
        rgb = np.random.default_rng(k).integers(0, 255, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(rgb).convert(mode).save(root / "val2017" / f"{k}.{'jpg' if mode == 'CMYK' else 'png'}")
        info = data.make_segments_info(ids, {2_000_000: 7}, crowd=[4_000_000])
        images.append({"id": k, "file_name": f"{k}.{'jpg' if mode == 'CMYK' else 'png'}", "width": 30, "height": 20})
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": info})
    cats = [{"id": 1, "name": "a", "isthing": 1}, {"id": 7, "name": "b", "isthing": 0}]
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_fixture_loads_any_image_mode_and_applies_training_cleanup(tmp_path):
    _coco_fixture(tmp_path, ["RGB", "L", "RGBA", "P", "CMYK", "LA"])
    ev = data.shapes_dataset(tmp_path, "val", size=None)
    tr = data.shapes_dataset(tmp_path, "val", size=None, train=True, hflip=False)
    for k in range(6):
        e, t = ev[k], tr[k]
        assert e["image"].shape == (3, 20, 30)
        assert len(e["segments_info"]) == 4 and len(t["segments_info"]) == 2   # crowd + tiny dropped for training
        assert t["segments"][19, 0] == 0 and e["segments"][19, 0] > 0
        assert e["category"][10, 20] == 7


def test_a_capped_map_is_renumbered_to_fit_the_bits(tmp_path):
    """20 segments, cap 15: the 5 smallest go void and the rest keep distinct ids 1..15."""
    _coco_fixture(tmp_path, ["RGB"])
    ids = np.zeros((20, 30), np.int64)
    for k in range(20):
        ids[k, :10 + k] = 100 + k                                            # row k, area 10 + k: the first rows are smallest
    data.write_panoptic_png(tmp_path / "annotations" / "panoptic_val2017" / "0.png", ids)
    meta = json.loads((tmp_path / "annotations" / "panoptic_val2017.json").read_text())
    meta["annotations"][0]["segments_info"] = data.make_segments_info(ids, {})
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(meta))
    item = data.shapes_dataset(tmp_path, "val", size=None, max_segments=15)[0]
    seg = item["segments"]
    assert item["dropped_segments"] == 5 and sorted(seg.unique().tolist()) == list(range(16))
    assert [s["id"] for s in item["segments_info"]] == list(range(1, 16))
    assert all(s["area"] == 15 + j for j, s in enumerate(item["segments_info"]))   # rows 5..19, in order
    assert (seg[:5] == 0).all() and (seg[5, :15] == 1).all() and (seg[19, :29] == 15).all()


def test_ade20k_layout_is_found(tmp_path):
    _coco_fixture(tmp_path / "coco", ["RGB", "L"])
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").rename(ade / "images" / "validation")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017").rename(ade / "ade20k_panoptic_val")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").rename(ade / "ade20k_panoptic_val.json")
    ds = data.shapes_dataset(ade, "val", size=16)
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 16, 16)


def test_train_py_reads_a_flat_folder_and_names_the_layouts_it_looked_for(tmp_path):
    import train
    _coco_fixture(tmp_path / "coco", ["RGB", "L"])
    flat = tmp_path / "flat"
    flat.mkdir()
    (tmp_path / "coco" / "val2017").rename(flat / "images")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017").rename(flat / "panoptic")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").rename(flat / "panoptic.json")
    args = ["--stage", "1", "--preset", "tiny", "--num-workers", "0", "--preview-every", "0", "--device", "cpu",
            "--max-steps", "1", "--log-every", "1", "--eval-images", "1"]
    metrics = train.main(args + ["--data", str(flat), "--out-dir", str(tmp_path / "run")])
    assert 0.0 <= metrics["pq"] <= 1.0
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a dataset")
    with pytest.raises((SystemExit, data.PanopticFormatError), match="nor a flat folder"):
        train.main(args + ["--data", str(tmp_path / "junk"), "--out-dir", str(tmp_path / "run2")])
    assert (tmp_path / "junk").exists() and not (tmp_path / "junk" / "annotations").exists()   # nothing written
    with pytest.raises(SystemExit, match="a file, not a folder"):
        train.main(args + ["--data", str(tmp_path / "junk" / "notes.txt"), "--out-dir", str(tmp_path / "run3")])
    assert not any((tmp_path / "run3").rglob("*"))                      # no checkpoint, no config


def test_exif_rotated_image_is_upright(tmp_path):
    _coco_fixture(tmp_path, ["RGB"])
    path = tmp_path / "val2017" / "0.png"
    im = Image.open(path).rotate(90, expand=True)                              # stored sideways (30x20 -> 20x30)
    exif = Image.Exif()
    exif[0x0112] = 8                                                          # orientation: rotate 90 CW to view
    im.save(path, exif=exif)
    assert data.read_image(path).size == (30, 20)


def test_png_disagreeing_with_json_names_the_file(tmp_path):
    _coco_fixture(tmp_path, ["RGB"])
    data.write_panoptic_png(tmp_path / "annotations" / "panoptic_val2017" / "0.png", np.full((20, 30), 99))
    ds = data.shapes_dataset(tmp_path, "val")
    with pytest.raises(data.PanopticFormatError, match="0.png.*absent"):
        ds[0]


def test_real_coco_sample_loads_when_present():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-sample"
    if not root.exists():
        pytest.skip("shared COCO sample not beside this checkout")
    ds = data.shapes_dataset(root, "val", size=64)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["caption"]


def test_a_json_that_is_not_text_or_is_a_folder_is_one_error_naming_it(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')                  # not UTF-8
    with pytest.raises(data.PanopticFormatError, match="latin1.json: not valid JSON"):
        data.read_json(tmp_path / "latin1.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(data.PanopticFormatError, match="folder.json: a folder, not a JSON file"):
        data.read_json(tmp_path / "folder.json")

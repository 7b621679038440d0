# SPDX-License-Identifier: MIT
"""Tests of evaluate.py's co-generation side: the Frechet distance, the FID-Inception network and its
weight file, caption agreement, image-map consistency, evaluate_cogen and `--task cogen`.
Tiny random models on a tiny Shapes set; nothing is downloaded.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import cogen
import data
import evaluate
import ldmseg
import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Tiny Shapes: 32^2 images, 4 val images with distinct captions."""
    root = tmp_path_factory.mktemp("shapes")
    data.write_shapes(root, size=32, num_train=2, num_val=4, seed=0, workers=1, log=lambda *_: None)
    return data.shapes_dataset(root, "val", size=32), root


def tiny_pdm(ds, seed: int = 0, **overrides) -> cogen.OneStreamPDM:
    """The tiny PDM preset at 4^2 latents (32^2 images through a tiny f8 image AE; 8^2 maps)."""
    cfg = cogen.PDMConfig.preset("tiny")
    vocab = cogen.WordTokenizer.build([ds[i]["caption"] for i in range(len(ds))], cfg.num_text_tokens).vocab
    torch.manual_seed(seed)
    return cogen.build_model(dataclasses.replace(cfg, latent_size=4, vocab=tuple(vocab), **overrides)).eval()


def tiny_image_ae(seed: int = 0) -> ldmseg.ImageAutoencoder:
    torch.manual_seed(seed)
    return ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig.preset("tiny")).eval()


def tiny_segmenter(seed: int = 0) -> ldmseg.LDMSeg:
    torch.manual_seed(seed)
    return ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def fid_net():
    torch.manual_seed(0)
    return evaluate.FIDInception()


# ----------------------------------------------------------------------------- 7. Frechet distance

def random_statistics(D: int, N: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return evaluate.feature_statistics(torch.randn(N, D, generator=g) @ torch.randn(D, D, generator=g))


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, sigma = random_statistics(16, 200, 0)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * sigma.trace().item())
    # Rank 4 (5 samples), singular as with few images: the zero eigenvalues carry rounding, whose
    # square roots leave an error of order sqrt(machine epsilon) relative -- as scipy's sqrtm does.
    mu, sigma = random_statistics(16, 5, 1)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * sigma.trace().item())


def test_frechet_distance_equals_the_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(8, generator=g), torch.randn(8, generator=g)
    v1, v2 = torch.rand(8, generator=g) + 0.1, torch.rand(8, generator=g) + 0.1
    v1[0] = 0.0                                                         # a singular covariance too
    # commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum().item() + ((v1.sqrt() - v2.sqrt()) ** 2).sum().item()
    d = evaluate.frechet_distance(mu1.numpy(), np.diag(v1.numpy()), mu2.numpy(), np.diag(v2.numpy()))
    assert d == pytest.approx(expected, rel=1e-6)
    # one rotation of both Gaussians changes nothing, but makes the covariances full matrices
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    rotated = evaluate.frechet_distance(q @ mu1.double(), q @ torch.diag(v1).double() @ q.T,
                                        q @ mu2.double(), q @ torch.diag(v2).double() @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = evaluate.feature_statistics(f)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)


# ----------------------------------------------------------------------------- 7. FID-Inception

def test_fid_inception_on_random_weights_gives_2048_features(fid_net):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1   # 299^2 inside
    features = evaluate.inception_features(fid_net, images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()   # means of ReLU outputs


def test_images_reach_the_network_as_8_bit_png_levels():
    levels = torch.arange(256, dtype=torch.float32)
    images = (levels / 127.5 - 1).view(1, 1, 16, 16).expand(1, 3, 16, 16)      # what the Dataset gives
    assert torch.equal(evaluate.to_unit_range_8bit(images) * 255, levels.view(1, 1, 16, 16).expand(1, 3, 16, 16))
    clipped = evaluate.to_unit_range_8bit(torch.tensor([-2.0, 0.001, 2.0]))
    assert clipped.tolist() == pytest.approx([0, 128 / 255, 1])


# Names and shapes read from pytorch-fid's FID-Inception (fid_inception_v3(), the layout of
# pt_inception-2015-12-05-6726825d.pth): 566 tensors, 94 of them BatchNorm's num_batches_tracked.
WEIGHT_FILE_SPOT_CHECKS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
}


def test_fid_inception_state_dict_has_the_weight_file_layout(fid_net):
    state = fid_net.state_dict()
    assert len(state) == 566 - 2                       # the file's fc.weight, fc.bias are not needed
    assert sum(k.endswith("num_batches_tracked") for k in state) == 94
    for name, shape in WEIGHT_FILE_SPOT_CHECKS.items():
        assert tuple(state[name].shape) == shape, name


def test_fid_weights_load_by_name_and_errors_name_the_expected_file(fid_net, tmp_path):
    with pytest.raises(evaluate.FIDWeightsError, match=evaluate.FID_WEIGHTS_FILE):
        evaluate.load_fid_inception(tmp_path / "nowhere.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(evaluate.FIDWeightsError, match=r"missing: .*mis-shaped: Conv2d_1a_3x3.*pt_inception"):
        evaluate.load_fid_inception(tmp_path / "wrong.pth")
    # The file's layout: the network's tensors plus the classifier; num_batches_tracked may be absent.
    state = {k: v for k, v in fid_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet.pth")   # same layers, 1000 classes
    with pytest.raises(evaluate.FIDWeightsError, match="classifier is 1000 x 2048, not the TF Inception's 1008 x 2048"):
        evaluate.load_fid_inception(tmp_path / "imagenet.pth")
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / evaluate.FID_WEIGHTS_FILE)
    loaded = evaluate.load_fid_inception(tmp_path)                      # a folder holding the file also works
    assert not loaded.training
    for name, value in fid_net.state_dict().items():
        assert name.endswith("num_batches_tracked") or torch.equal(loaded.state_dict()[name], value)


# ----------------------------------------------------------------------------- 8. caption agreement

def test_caption_agreement_on_hand_made_maps():
    C, S, T, G = 1, 2, 3, 7                              # circle, square, triangle; grass (stuff)
    a = torch.full((8, 8), G)
    a[0:2, 0:2] = C
    a[5:7, 5:7] = C                                      # two separate circles
    a[0:3, 5:8] = S                                      # one square
    b = torch.full((8, 8), G)
    b[0:2, 0:4] = C                                      # two circles that touch: one component
    b[4:6, 0:2] = T
    b[4:6, 4:6] = T                                      # two triangles ...
    b[7, 7] = T                                          # ... and a one-pixel speck
    captions = ["two red circles and a blue square on grass",
                "a red circle, a green circle and two white triangles on grass",   # circles: 2 over colours
                "grass under a sky"]                                               # names no thing
    maps = torch.stack([a, b, torch.full((8, 8), G)])
    res = evaluate.caption_agreement(maps, captions, data.shapes_categories(), min_area=2)
    assert res["pairs"] == 4 and res["agreement"] == 3 / 4 and res["count_error"] == 1 / 4
    assert res["per_category"] == {"circle": {"agreement": 0.5, "pairs": 2},
                                   "square": {"agreement": 1.0, "pairs": 1},
                                   "triangle": {"agreement": 1.0, "pairs": 1}}
    assert evaluate.caption_agreement(maps, captions, data.shapes_categories(), min_area=1)["agreement"] == 2 / 4
    assert evaluate.default_min_area((32, 32)) == 1 and evaluate.default_min_area((64, 64)) == 4
    empty = evaluate.caption_agreement(maps[2:], captions[2:], data.shapes_categories())
    assert empty["pairs"] == 0 and empty["agreement"] is None


def test_a_panoptic_map_counts_its_segments_where_components_merge_touching_things():
    C, T, G = 1, 3, 7
    category = torch.full((8, 8), G)
    category[0:2, 0:4] = C                               # two circles that touch ...
    category[4:6, 0:6] = T                               # one triangle, cut in two by a circle
    category[4:6, 2:4] = C
    instance = torch.zeros(8, 8, dtype=torch.long)
    instance[0:2, 0:2], instance[0:2, 2:4] = 5, 9        # ... are two segments
    instance[4:6, 0:6], instance[4:6, 2:4] = 3, 6        # the triangle's two pieces: one segment
    caption, names = "two red circles, a red circle and a white triangle on grass", evaluate.thing_names(
        data.shapes_categories())
    assert evaluate.caption_matches(category, caption, names, 1) == [(C, 3, 2), (T, 1, 2)]
    assert evaluate.caption_matches(category, caption, names, 1, instance) == [(C, 3, 3), (T, 1, 1)]
    assert cogen.instance_counts(category, instance, min_area=5) == {T: 1}              # 4-px circles drop
    assert cogen.instance_counts(category, torch.zeros_like(instance)) == {}           # no instance: no thing
    instance[category == G] = 1                                                        # grass: one stuff segment
    segments = evaluate.map_instances(category, 9, instance)                          # no void here: 1..n
    assert segments.min() == 1 and segments.unique().numel() == 5                      # 3 circles, triangle, grass
    assert (segments[4:6, 0:2] == segments[4, 5]).all()                                # the two pieces: one segment
    category[7, 7], instance[7, 0] = 15, 0                     # an invalid id, void instance bits: void, as counted
    assert evaluate.map_instances(category, 9, instance)[7, 7] == 0
    assert evaluate.map_instances(category, 9, instance)[7, 0] == 0 and cogen.instance_counts(category, instance)[G] == 1


def test_consistency_pq_is_one_when_the_segments_are_the_maps_components():
    category = torch.tensor([[1, 1, 7, 7], [7, 7, 7, 2], [3, 7, 15, 2], [3, 7, 7, 7]])   # 15: an invalid id
    instances = evaluate.map_instances(category, num_categories=9)
    assert instances.max() == 4 and instances[2, 2] == 0                 # 1, 7, 2, 3 (15 -> void)
    up = cogen.nearest_resize_ids(instances[None], (8, 8))[0]
    segmentation = torch.where(up > 0, 100 + up * 3, 0)                # other ids, same regions
    acc = evaluate.PQAccumulator(None, class_agnostic=True)
    evaluate.add_consistency(acc, category, segmentation, num_categories=9)
    assert acc.compute()["All"]["pq"] == 1.0


# ----------------------------------------------------------------------------- 8. evaluate_cogen

class OracleMaps(torch.nn.Module):
    """A stand-in PDM predicting eps = 0 and, as the clean map, the ground-truth bits of the caption."""

    def __init__(self, model, bits_by_caption: dict):
        super().__init__()
        self.inner, self.config, self.schedule = model, model.config, model.schedule
        self.bits = {tuple(model.tokenize([c])[0].tolist()): b for c, b in bits_by_caption.items()}

    def tokenize(self, captions):
        return self.inner.tokenize(captions)

    def forward(self, x_t, m_t, t, text, drop_text=None, drop_map=None):
        return torch.zeros_like(x_t), torch.stack([self.bits[tuple(row.tolist())] for row in text])


@pytest.mark.parametrize("sampler,panoptic", [("dpm++", False), ("ddim", False), ("ddim", True)])
def test_oracle_maps_have_zero_mcd_and_the_ground_truths_caption_agreement(shapes, sampler, panoptic):
    ds, _ = shapes
    model = tiny_pdm(ds, panoptic=panoptic, instance_bits=4)
    items = [ds[i] for i in range(len(ds))]
    assert len({it["caption"] for it in items}) == len(items)
    truth = {it["caption"]: cogen.encode_map(it["category"][None], model.config, it["segments"][None],
                                             torch.Generator().manual_seed(k))[0] for k, it in enumerate(items)}
    oracle = OracleMaps(model, truth)
    res = evaluate.evaluate_cogen(oracle, ds, steps=3, sampler=sampler, batch_size=3)
    assert res["images"] == len(ds) and res["mcd"] == 0.0
    assert res["caption_pairs"] > 0 and res["caption_agreement"] == res["caption_agreement_gt"]
    assert "fid" not in res and "consistency_pq" not in res              # no image AE: no images


def test_evaluate_cogen_runs_end_to_end_on_a_tiny_random_model(shapes, tmp_path):
    ds, _ = shapes
    model, ae, seg = tiny_pdm(ds), tiny_image_ae(), tiny_segmenter()
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten())   # stands in for FID
    run = lambda **kw: evaluate.evaluate_cogen(model, ds, steps=2, seed=3, batch_size=3, image_ae=ae,
                                               seg_model=seg, seg_steps=2, inception=features, **kw)
    res = run(pictures=tmp_path)
    assert res["images"] == len(ds) and 0 <= res["mcd"] <= 2
    assert 0 <= res["caption_agreement"] <= 1 and res["caption_pairs"] >= len(ds)
    assert 0 <= res["consistency_pq"] <= 1 and math.isfinite(res["fid"]) and res["fid"] >= 0
    assert 0 <= res["consistency_gt_pq"] <= 1
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (len(ds) * 32, 5 * 32, 3)     # image | map | segments | val image | val map
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == len(ds)
    assert run(limit=2) != res and run() == res                         # reproducible from the seed



@pytest.mark.parametrize("panoptic", [False, True])
def test_consistency_ceiling_is_one_for_a_segmenter_that_returns_the_true_maps(shapes, monkeypatch, panoptic):
    """The val images' own maps, pooled as the model sees them, are the reference of the ceiling: a
    segmenter that answers each val image with exactly those segments scores 1, and every generated
    image (answered with void) scores 0; the generated pairs' consistency is computed as before."""
    ds, _ = shapes
    model, ae = tiny_pdm(ds, panoptic=panoptic, instance_bits=4), tiny_image_ae()
    items = [ds[i] for i in range(len(ds))]
    category = torch.stack([it["category"] for it in items])
    c = model.config
    pooled = cogen.pool_category_map(category, c.map_size, c.void_aware_pooling)            # (B, H_m, W_m)
    if panoptic:
        span = max(int(it["segments"].max()) for it in items) + 1
        segments = torch.stack([it["segments"] for it in items])
        inst = cogen.pool_category_map(category * span + segments, c.map_size, c.void_aware_pooling) % span
    truth = {}
    for k, it in enumerate(items):
        ids = evaluate.map_instances(pooled[k], c.num_categories, inst[k] if panoptic else None)[None]
        truth[it["image"].numpy().tobytes()] = cogen.nearest_resize_ids(ids, tuple(it["image"].shape[-2:]))[0]

    def stub(seg_model, images, seg_size, steps, generator):
        return torch.stack([truth.get(x.numpy().tobytes(), torch.zeros(x.shape[-2:], dtype=torch.long))
                            for x in images])
    monkeypatch.setattr(evaluate, "_segment_images", stub)
    res = evaluate.evaluate_cogen(model, ds, steps=2, batch_size=3, image_ae=ae, seg_model=object())
    assert res["consistency_gt_pq"] == 1.0 and res["consistency_pq"] == 0.0


# ----------------------------------------------------------------------------- 9. command line

def save_run(folder, stage: str, model_config: dict, model, config: dict, **extras) -> str:
    train.save_checkpoint(folder / "ckpt.pt", {"stage": stage, "step": 0, "config": config,
                                               "model_config": model_config, "model": model.state_dict(),
                                               "ema": None, **extras})
    return str(folder)


def test_cli_cogen_writes_metrics_and_says_what_it_skipped(shapes, tmp_path, capsys):
    ds, root = shapes
    model, ae = tiny_pdm(ds), tiny_image_ae()
    vae = save_run(tmp_path / "vae", "vae", dataclasses.asdict(ae.config), ae, {})
    seg = save_run(tmp_path / "s2", "2", dataclasses.asdict(ldmseg.LDMSegConfig.preset("tiny")), tiny_segmenter(),
                   {"image_size": 32})
    # As train.py --stage cogen writes it: the frozen image AE travels in the checkpoint.
    ckpt = save_run(tmp_path / "cogen", "cogen", dataclasses.asdict(model.config), model,
                    {"data": str(root), "preset": "tiny", "image_size": 32},
                    image_ae={"config": dataclasses.asdict(ae.config), "weights": ae.state_dict()})
    args = ["--ckpt", ckpt, "--task", "cogen", "--steps", "2", "--device", "cpu", "--batch-size", "2"]
    assert evaluate.main(args + ["--seg-ckpt", seg, "--seg-steps", "2", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint's own autoencoder" in out and "MCD" in out and "consistency PQ" in out
    assert "FID skipped" in out and evaluate.FID_WEIGHTS_FILE in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"mcd", "caption_agreement", "caption_agreement_gt", "consistency_pq"} <= set(metrics)
    assert "fid" not in metrics and metrics["sampler"] == model.config.sampler and metrics["steps"] == 2
    assert (tmp_path / "out" / "grid.png").exists()
    assert metrics["text_scale"] == model.config.text_scale
    assert evaluate.main(args + ["--limit", "1", "--image-vae", vae, "--text-scale", "3"]) == 0   # default folder: <run>/cogen_val_...
    metrics = json.loads((tmp_path / "cogen" / f"cogen_val_{model.config.sampler}2_n1_text3.0" / "metrics.json").read_text())
    assert metrics["text_scale"] == 3.0
    out = capsys.readouterr().out
    assert "consistency PQ skipped" in out and "--stage vae run" in out
    assert evaluate.main(args + ["--inception", str(tmp_path / "nowhere.pth")]) == 2
    assert evaluate.FID_WEIGHTS_FILE in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", seg, "--inception", "x.pth"])          # cogen flags need --task cogen
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", seg, "--text-scale", "3"])


def test_an_image_vae_named_by_the_user_that_is_no_vae_run_is_an_error(tmp_path):
    ae = tiny_image_ae()
    ckpt = {"config": {"preset": "tiny"}, "image_ae": {"config": dataclasses.asdict(ae.config), "weights": ae.state_dict()}}
    with pytest.raises(SystemExit, match="--image-vae .*nowhere: not a --stage vae run"):
        evaluate._cogen_image_autoencoder(ckpt, str(tmp_path / "nowhere"))
    assert evaluate._cogen_image_autoencoder(ckpt)[1] == "the checkpoint's own autoencoder"

# SPDX-License-Identifier: MIT
"""Benchmarks: speed.py runs at the tiny preset and prints every section (no timing claims); the mask
decoder's resolution ceiling is exact where it must be; the latent probe scores what it says; the depth
ceiling replays Shapes' depth draws exactly and finds the analytic best depth; the precision check reads
every logged loss, flags a mode outside either tolerance, and trains each mode from one seed; the mask
latent's geometry measures a known layout exactly and reads stage-1 and stage-2 runs alike; the peer
comparisons (vs_diffusers.py, vs_uvit.py) time every form, count forward + backward FLOPs, and build U-ViT-S/2's
numbers (the peers themselves are not installed here); the coco dry run's stand-in SD weights load through
both loaders and its replicated split reads as a dataset."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import coco_dry_run  # noqa: E402
import data  # noqa: E402
import ldmseg  # noqa: E402
import depth_ceiling  # noqa: E402  (benchmarks/ is not a package; its folder is put on the path just above)
import latent_probe  # noqa: E402
import mask_ae_ceiling  # noqa: E402
import mask_latent_geometry  # noqa: E402
import speed  # noqa: E402
import vs_diffusers  # noqa: E402
import vs_uvit  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def test_speed_cli_at_tiny_prints_training_sampling_and_pq_rows(capsys):
    assert speed.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                       "--samplers", "ddim:2,dpm++:2", "--pq-images", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("model"))
    for column in ("batch", "params", "img/s", "ms/step", "GFLOP/step", "GFLOP/s", "MFU", "peak MiB"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for model in speed.MODELS:
        assert float(rows[model][4]) > 0 and rows[model][8] == "-"     # img/s; no MFU without a peak on a CPU
    assert "process peak RSS" in out
    assert "ddim" in rows and "dpm++" in rows
    assert "pairs/s" in out


def test_resolution_ceiling_is_exact_for_maps_constant_on_its_blocks_and_not_otherwise():
    g = torch.Generator().manual_seed(0)
    blocky = torch.randint(0, 16, (1, 4, 4), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(mask_ae_ceiling.pooled_logits(blocky, 2, 16).argmax(1), blocky)       # (1, 8, 8)
    fine = torch.randint(0, 16, (1, 8, 8), generator=g)
    assert torch.equal(mask_ae_ceiling.pooled_logits(fine, 1, 16).argmax(1), fine)
    assert not torch.equal(mask_ae_ceiling.pooled_logits(fine, 2, 16).argmax(1), fine)


def test_fitted_logits_at_half_resolution_draw_a_diagonal_boundary_that_pooled_shares_miss():
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    diagonal = (1 + (xx + yy > 6).long() + (xx > 5).long())[None]         # (1, 8, 8): ids 1, 2, 3
    assert torch.equal(mask_ae_ceiling.fitted_logits(diagonal, 2, 16).argmax(1), diagonal)
    assert not torch.equal(mask_ae_ceiling.pooled_logits(diagonal, 2, 16).argmax(1), diagonal)
    unfitted = mask_ae_ceiling.fitted_logits(diagonal, 2, 16, steps=0)    # the start: log-shares upsampled
    assert not torch.equal(unfitted.argmax(1), diagonal)                   # so the fitting is what draws it


def test_resolution_ceiling_cli_scores_a_tiny_shapes_val(tiny_runs, capsys):
    _, shapes = tiny_runs
    mask_ae_ceiling.main(["--data", str(shapes), "--factors", "1,2", "--size", "32", "--fit-steps", "20"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    pq = {(r[0], r[1], r[2]): float(r[4]) for r in rows}
    assert set(pq) == {(f"H/{f}", k, d) for f in (1, 2) for k in ("pooled", "fitted") for d in ("thresholds", "argmax")}
    assert pq["H/1", "pooled", "argmax"] == 100.0 and pq["H/2", "pooled", "argmax"] <= 100.0


def test_latent_probe_scores_category_iou_and_any_thing_iou_on_a_hand_made_map():
    truth = torch.tensor([[[1, 1, 6, 6]]])                 # circle (a thing) | sky (stuff)
    pred = torch.tensor([[[1, 6, 6, 6]]])                  # half the circle called sky
    m = latent_probe.score_categories(pred, truth)
    assert m["circle"] == 0.5 and abs(m["sky"] - 2 / 3) < 1e-6 and m["thing_iou"] == 0.5
    assert m["square"] == 0.0 and abs(m["miou"] - (0.5 + 2 / 3) / 9) < 1e-6


def test_latent_probe_cli_runs_every_input_and_target_on_tiny_shapes(tiny_runs):
    root, shapes = tiny_runs
    common = ["--data", str(shapes), "--size", "32", "--steps", "2", "--batch-size", "2"]
    m = latent_probe.main([*common, "--input", "latent", "--image-vae", str(root / "vae")])
    assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["thing_iou"] <= 1.0
    m = latent_probe.main([*common, "--input", "pixels", "--target", "depth"])
    assert m["n_images"] == 3 and m["abs_rel"] > 0 and 0.0 <= m["delta1"] <= 1.0


def test_depth_ceiling_replays_the_thing_depths_shapes_renders():
    for split, index, size in (("val", 0, 32), ("val", 7, 64), ("train", 3, 48)):
        item = data.render_shapes_item(0, split, index, size)
        near = depth_ceiling.thing_depths(0, split, index, size)
        assert np.all(np.diff(near) <= 0) and np.all((near >= 1.0) & (near <= 2.8))
        thing_mm = set(np.unique(item["depth"][item["depth"] <= 2800]).tolist())
        assert thing_mm and thing_mm <= set(np.round(near * 1000).tolist())   # every visible thing is a replayed draw


def test_depth_ceiling_finds_the_analytic_best_depth_for_one_uniform_draw():
    best, rate = depth_ceiling.best_depths(2, 20_000, np.random.default_rng(0))
    # One depth d ~ U(1, 2.8): the best window [c / 1.25, 1.25 c] ends at 2.8, so c = 2.8 / 1.25 and the
    # hit rate is (2.8 - 2.8 / 1.5625) / 1.8 = 0.56.
    for key in ((1, 0), "any"):
        assert abs(best[key] - 2.24) < 0.03 and abs(rate[key] - 0.56) < 0.02
    assert (rate[2, 0] + rate[2, 1]) / 2 > rate["any"] + 0.05                 # knowing the rank helps, on average


def test_depth_ceiling_cli_prints_both_oracles(capsys):
    depth_ceiling.main(["--num", "2", "--size", "32", "--draws", "500"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("oracle")]
    assert len(rows) == 2 and all("delta<1.25" in r for r in rows)


def test_precision_reads_every_logged_loss_and_flags_a_mode_outside_either_tolerance(tmp_path):
    import precision
    (tmp_path / "log.txt").write_text("stage 1 | preset tiny\nstep 000001 | loss 4.0000 (ce 1.0) | lr 1e-3 | "
                                      "9.0 it/s | eta 0m01s\nstep 000002 | loss 2.0000 | lr 1e-3 | 9.0 it/s\nfinal | pq 0.5\n")
    assert precision.read_losses(tmp_path) == [4.0, 2.0]
    run = lambda first, mean: {"first": first, "last_quarter_mean": mean, "seconds": 1.0, "steps": 10}
    rows = precision.compare("1", {"fp32": run(4.0, 2.0), "bf16": run(4.01, 2.06), "bf16+compile": run(4.2, 2.0)},
                             first_tol=0.02, mean_tol=0.05)
    assert [row.split()[-1] for row in rows] == ["reference", "yes", "NO"]
    rows = precision.compare("1", {"fp32": run(4.0, 2.0), "bf16": run(4.0, 2.2)}, first_tol=0.02, mean_tol=0.05)
    assert rows[1].split()[-1] == "NO"


def test_precision_cli_trains_each_mode_from_one_seed_and_writes_results(tiny_runs, tmp_path, capsys):
    import precision
    args = ["--preset", "tiny", "--device", "cpu", "--stages", "1", "--modes", "fp32,bf16", "--steps", "3",
            "--data", str(tiny_runs[1]), "--out", str(tmp_path / "runs"), "--eval-images", "2",
            "--num-workers", "0"]
    assert precision.main(args) in (0, 1)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert [r[1] for r in rows] == ["fp32", "bf16"] and rows[0][-1] == "reference"
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert set(results["1"]) == {"fp32", "bf16"} and results["1"]["fp32"]["steps"] == 3
    precision.main([*args[:-1], "0", "--steps", "2", "--modes", "fp32"])        # again into the same folder
    assert json.loads((tmp_path / "runs" / "results.json").read_text())["1"]["fp32"]["steps"] == 2
    assert abs(results["1"]["bf16"]["first"] - results["1"]["fp32"]["first"]) < 0.05 * results["1"]["fp32"]["first"]


def test_latent_geometry_spread_of_square_corners():
    corners = torch.tensor([[1.0, 1, 0, 0], [1, -1, 0, 0], [-1, 1, 0, 0], [-1, -1, 0, 0]])
    out = mask_latent_geometry.spread(corners)
    assert abs(out["nearest"] - 2.0) < 1e-6 and abs(out["mean"] - (4 * 2 + 2 * 8 ** 0.5) / 6) < 1e-6
    assert all(abs(r - 2 ** 0.5) < 1e-6 for r in out["radius"])
    assert np.allclose(out["shares"], [0.5, 0.5, 0.0, 0.0], atol=1e-6)
    assert torch.allclose(out["plane"].norm(dim=1), torch.full((4,), 2 ** 0.5))


def test_latent_geometry_cli_reads_stage_1_and_stage_2_runs_alike(tiny_runs, capsys):
    root, shapes = tiny_runs
    s1 = mask_latent_geometry.main(["--ckpt", str(root / "s1"), "--data", str(shapes)])
    s2 = mask_latent_geometry.main(["--ckpt", str(root / "s2"), "--data", str(shapes)])
    assert s1["codes"].shape == (16, 4) and torch.allclose(s1["codes"], s2["codes"])   # stage 2 froze stage 1's
    assert abs(sum(s1["shares"]) - 1) < 1e-5 and s1["nearest"] <= s1["mean"]
    assert "channel 3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="stage-1 or stage-2"):
        mask_latent_geometry.main(["--ckpt", str(root / "vae"), "--data", str(shapes)])


def test_peer_comparison_times_each_network_and_form_and_prints_every_ratio(capsys):
    torch.manual_seed(0)
    a, b = torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 3, 1)
    x, t, eps = torch.randn(2, 2, 4, 4), torch.zeros(2, dtype=torch.long), torch.randn(2, 3, 4, 4)
    args = argparse.Namespace(compile=False, no_optimizer=False, no_forward=False, rounds=2, warmup=0)
    vs_diffusers.compare({"ours": (a, lambda x, t: a(x)), "peer": (b, lambda x, t: b(x))}, x, t, eps, 2, args,
                         torch.device("cpu"), None)
    out = capsys.readouterr().out
    for name in ("ours eager", "peer eager"):
        rows = [line for line in out.splitlines() if line.startswith(name) and " / " not in line]
        assert len(rows) == 2 and float(rows[0].split()[-3]) > 0            # train and forward; img/s
    for what in ("train", "forward"):
        line = next(line for line in out.splitlines() if line.startswith(f"ours eager / peer eager, {what}"))
        assert float(line.split()[-1]) > 0
    assert "compiled" not in out and "MFU:" not in out                  # no compile asked; no peak on a CPU


def test_training_flops_count_the_forward_and_the_weight_gradient():
    conv = torch.nn.Conv2d(2, 3, 1, bias=False)
    x = torch.randn(2, 2, 4, 4)                                          # no input gradient is needed
    forward = 2 * 2 * 3 * 2 * 4 * 4                                      # 2 per multiply-add, B C_out C_in H W
    assert vs_diffusers.train_flops(conv, lambda x, t: conv(x), x, None, torch.device("cpu"), None) == 2 * forward
    assert conv.weight.grad is None                                      # the counting pass leaves no gradient


def test_uvit_comparison_builds_mscoco_uvit_small_and_asks_for_the_official_clone(tmp_path):
    c = vs_uvit.our_config("coco")
    assert (c.arch, c.text_encoder, c.time_offset) == ("t2i", "context", 1)
    assert (c.latent_size, c.latent_channels, c.patch_size, c.dim, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias,
            c.context_dim, c.num_text_tokens) == (32, 4, 2, 512, 12, 8, 4.0, False, 768, 77)   # configs/mscoco_uvit_small.py
    with pytest.raises(SystemExit, match="libs/uvit_t2i.py"):
        vs_uvit.main(["--uvit-repo", str(tmp_path), "--device", "cpu"])


def test_coco_dry_run_weights_load_as_sd_weights_and_its_copies_read_as_one_split(tiny_runs, tmp_path):
    _, shapes = tiny_runs
    path = tmp_path / "sd.safetensors"
    n = coco_dry_run.write_random_sd(path, preset="tiny")
    vae = ldmseg.load_image_autoencoder(path, ldmseg.ImageAEConfig.preset("tiny"))
    unet = ldmseg.load_unet(path, coco_dry_run.sd_unet_config(ldmseg.UNetConfig.preset("tiny")))
    assert unet.config.in_channels == 4 and unet.config.context_dim == 768                 # SD's own UNet
    assert n == sum(p.numel() for m in (vae, unet) for p in m.state_dict().values())
    assert coco_dry_run.replicate_split(shapes, "val", tmp_path / "coco", copies=2) == 6     # 3 val images x 2
    ds = data.PanopticDataset(data.resolve_split(tmp_path / "coco", "train"), size=32)
    original = data.PanopticDataset(data.resolve_split(shapes, "val"), size=32)
    assert len(ds) == 6
    for j in range(3):                     # items sort by id, original id x copies + copy: copies sit side by side
        for k in (2 * j, 2 * j + 1):
            assert torch.equal(ds[k]["image"], original[j]["image"])
            assert torch.equal(ds[k]["segments"], original[j]["segments"])

"""Tests of multi-task LDMSeg (ldmseg.py §10, train.py --stage multitask, sample.py --task semantic | depth,
evaluate.py on a multi-task checkpoint): task embeddings, task latents, the merge rule, depth encoding."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import data
import evaluate
import ldmseg
import sample
import train

CATEGORIES = data.shapes_categories()          # things 1..5 (circle ... hexagon), stuff 6..9 (sky ... sand)


@pytest.fixture(scope="module")
def tiny_multitask():
    torch.manual_seed(0)
    return ldmseg.LDMSeg(ldmseg.multitask_config("tiny"))


# ----------------------------------------------------------------------------- task embeddings

def test_multitask_model_has_one_embedding_per_task_and_refuses_a_missing_task(tiny_multitask):
    m = tiny_multitask
    assert m.config.tasks == ("instance", "semantic", "depth")
    assert m.task_embedding.weight.shape == (3 * m.config.task_tokens, m.config.unet.context_dim)
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert m(z, t, z, None, torch.tensor([0, 2])).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="needs task"):
        m(z, t, z)
    single = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny"))
    with pytest.raises(ValueError, match="no tasks"):
        single(z, t, z, None, torch.tensor([0, 0]))


def test_task_embedding_steers_one_input_to_each_tasks_target():
    """Two rows with the same z_t, t and image but different tasks, trained towards opposite clean
    latents: whatever separates their predictions can only have come through the task embedding."""
    torch.manual_seed(0)
    model = ldmseg.LDMSeg(dataclasses.replace(ldmseg.multitask_config("tiny"), tasks=("instance", "semantic")))
    z_t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    t, task, z_image = torch.tensor([600, 600]), torch.tensor([0, 1]), torch.zeros(2, 4, 4, 4)
    target = torch.tensor([0.8, -0.8]).view(2, 1, 1, 1)                # task 0: +0.8, task 1: -0.8

    def x0_pred():
        return sample.predict_x0_from_eps(z_t, t, model(z_t, t, z_image, None, task), model.schedule)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    for _ in range(12):
        opt.zero_grad()
        (x0_pred() - target).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        means = x0_pred().mean(dim=(1, 2, 3))
    assert means[0] > 0.4 and means[1] < -0.4                          # at initialisation both ~0.3


# ----------------------------------------------------------------------------- task latents

def test_task_sampling_is_uniform_and_reproducible(tiny_multitask):
    cfg = tiny_multitask.config
    a = ldmseg.sample_tasks(3000, cfg, torch.Generator().manual_seed(1))
    b = ldmseg.sample_tasks(3000, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.int64
    counts = torch.bincount(a, minlength=3).float() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.03)


def test_task_sample_weights_set_each_tasks_share_of_the_samples(tiny_multitask):
    cfg = dataclasses.replace(tiny_multitask.config, task_sample_weights={"depth": 2.0})   # 1 : 1 : 2
    a = ldmseg.sample_tasks(4000, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, ldmseg.sample_tasks(4000, cfg, torch.Generator().manual_seed(1)))
    counts = torch.bincount(a, minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.25, 0.25, 0.5]), atol=0.03)
    single = dataclasses.replace(cfg, tasks=("depth",))                      # a task not trained is not drawn
    assert torch.equal(ldmseg.sample_tasks(50, single, torch.Generator().manual_seed(1)), torch.zeros(50, dtype=torch.long))
    # Equal weights over the tasks trained draw exactly as no weights do (runs made before weights stay reproducible).
    two = dataclasses.replace(cfg, tasks=("instance", "semantic"))
    plain = dataclasses.replace(two, task_sample_weights={})
    assert torch.equal(ldmseg.sample_tasks(50, two, torch.Generator().manual_seed(1)),
                       ldmseg.sample_tasks(50, plain, torch.Generator().manual_seed(1)))
    for bad in ({"depth": 0.0}, {"dpeth": 1.0}):
        with pytest.raises(ValueError, match="task_sample_weights"):
            dataclasses.replace(tiny_multitask.config, task_sample_weights=bad)
    import train
    cfg = train.resolve(train.TrainConfig(stage="multitask", preset="tiny", task_sample_weights="depth=2"))
    assert train.MultiTaskStage(cfg, torch.device("cpu"), None).base_config().task_sample_weights == {"depth": 2.0}
    with pytest.raises(SystemExit, match="task-sample-weights"):
        train.resolve(train.TrainConfig(stage="2", task_sample_weights="depth=2"))
    with pytest.raises(SystemExit, match="task-sample-weights"):
        train.MultiTaskStage(dataclasses.replace(cfg, task_sample_weights="depth=-1"), torch.device("cpu"), None).base_config()


def test_task_latents_use_each_samples_own_target(tiny_multitask):
    m = tiny_multitask.eval()
    g = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 4, (3, 32, 32), generator=g)
    category = torch.randint(0, 10, (3, 32, 32), generator=g)
    depth = torch.rand(3, 32, 32, generator=g) * 50 + 1
    depth[2, :8, :8] = 0                                                    # one unknown latent cell
    task = torch.tensor([2, 1, 2])
    z0, valid = ldmseg.task_latents(m, task, dict(segments=segments, category=category, depth=depth), g)
    assert torch.allclose(z0[1], m.encode_ids(category[1:2])[0])
    z_depth, v_depth = ldmseg.encode_depth(depth[[0, 2]], 8, m.config.depth_range, 4)
    assert torch.allclose(z0[[0, 2]], z_depth * ldmseg.task_signal_scale(m.config, "depth"))
    assert valid[2, 0, 0, 0] == 0 and valid[2].sum() == 15 and valid[0].sum() == 16


@pytest.mark.parametrize("task", ["semantic", "depth"])
def test_a_tasks_own_signal_scale_scales_its_latent_and_decoding_undoes_it(tiny_multitask, task, monkeypatch):
    m = tiny_multitask
    g = torch.Generator().manual_seed(0)
    targets = dict(category=torch.randint(0, 10, (2, 32, 32), generator=g), depth=torch.rand(2, 32, 32, generator=g) * 50 + 1)
    k = torch.full((2,), ldmseg.task_index(m.config, task))
    assert m.config.task_signal_scales == {} and ldmseg.task_signal_scale(m.config, task) == m.config.signal_scale
    shared, _ = ldmseg.task_latents(m, k, targets)
    monkeypatch.setattr(m.config, "task_signal_scales", {task: 0.5 * m.config.signal_scale})
    own, _ = ldmseg.task_latents(m, k, targets)
    assert torch.allclose(own, 0.5 * shared)
    back = ldmseg.decode_task(m, task, own, (32, 32))
    monkeypatch.setattr(m.config, "task_signal_scales", {})
    assert torch.allclose(back.float(), ldmseg.decode_task(m, task, shared, (32, 32)).float(), rtol=1e-5)


def test_x0_loss_weighs_each_tasks_error_in_the_maps_units(tiny_multitask):
    config = dataclasses.replace(tiny_multitask.config, signal_scale=0.1, task_signal_scales={"depth": 1.0})
    task = torch.tensor([0, 1, 2, 2])                                        # instance, semantic, depth, depth
    assert torch.allclose(ldmseg.x0_loss_weights(config, task, 4), torch.tensor([1.0, 1.0, 0.01, 0.01]))
    assert torch.equal(ldmseg.x0_loss_weights(tiny_multitask.config, task, 4), torch.ones(4))
    assert torch.equal(ldmseg.x0_loss_weights(config, None, 3), torch.ones(3))
    # Through the loss: a depth-only batch at b = 1 scores its mse x 0.01 (the mse itself is unweighted).
    m = tiny_multitask
    config = dataclasses.replace(config, prediction="x0")
    g = torch.Generator().manual_seed(0)
    z0, z_image = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    out = ldmseg.ldmseg_loss(m, config, m.schedule, z0, z_image, torch.ones(2, 1, 4, 4), g, torch.tensor([2, 2]))
    assert out["loss"].item() == pytest.approx(out["mse"].item() * 0.01, rel=1e-5)


def test_signal_scales_must_be_positive_and_instance_keeps_the_shared_one(tiny_multitask):
    for bad in ({"depth": 0.0}, {"instance": 1.0}, {"sematic": 1.0}):
        with pytest.raises(ValueError, match="signal scales|task_signal_scales"):
            dataclasses.replace(tiny_multitask.config, task_signal_scales=bad)
    assert train.parse_signal_scales("semantic=1, depth=0.5") == {"semantic": 1.0, "depth": 0.5}
    for bad in ("depth", "depth=x", "depth=-1", "instance=1"):
        with pytest.raises(SystemExit, match="task-signal-scales"):
            train.parse_signal_scales(bad)


def test_task_loss_weights_scale_each_tasks_samples(tiny_multitask):
    m, task = tiny_multitask, torch.tensor([0, 1, 2, 2])                     # instance, semantic, depth, depth
    config = dataclasses.replace(m.config, task_loss_weights={"depth": 10.0, "instance": 0.5})
    assert torch.allclose(ldmseg.task_loss_weights(config, task, 4), torch.tensor([0.5, 1.0, 10.0, 10.0]))
    assert torch.equal(ldmseg.task_loss_weights(m.config, task, 4), torch.ones(4))
    assert torch.equal(ldmseg.task_loss_weights(config, None, 3), torch.ones(3))
    single = dataclasses.replace(config, tasks=("depth",))                    # weights balance tasks: none for one
    assert torch.equal(ldmseg.task_loss_weights(single, torch.zeros(3, dtype=torch.long), 3), torch.ones(3))
    # Through the loss, for both predictions: the same draws (same seed) weigh 10x for depth, 1x for semantic.
    z0, z_image = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for prediction in ("eps", "x0"):
        def loss(cfg, tasks):
            return ldmseg.ldmseg_loss(m, dataclasses.replace(cfg, prediction=prediction), m.schedule, z0, z_image,
                                      torch.ones(2, 1, 4, 4), torch.Generator().manual_seed(0), torch.tensor(tasks))["loss"]
        assert loss(config, [2, 2]).item() == pytest.approx(10 * loss(m.config, [2, 2]).item(), rel=1e-5)
        assert loss(config, [1, 1]).item() == pytest.approx(loss(m.config, [1, 1]).item(), rel=1e-6)
    for bad in ({"depth": 0.0}, {"dpeth": 1.0}):
        with pytest.raises(ValueError, match="task_loss_weights"):
            dataclasses.replace(m.config, task_loss_weights=bad)
    assert train.parse_loss_weights("instance=2, depth=0.5") == {"instance": 2.0, "depth": 0.5}
    for bad in ("depth", "depth=0", "colour=1"):
        with pytest.raises(SystemExit, match="task-loss-weights"):
            train.parse_loss_weights(bad)


# ----------------------------------------------------------------------------- depth encoding

@pytest.mark.parametrize("subcells", [1, 2])
def test_depth_round_trips_through_the_direct_encoding(subcells):
    rng, side = (1.0, 64.0), 8 // subcells                                  # side: pixels per sub-cell
    code = lambda d: ldmseg.encode_depth(d, 8, rng, 4, subcells)
    back = lambda z, size: ldmseg.decode_depth(z, rng, size, subcells)
    flat = torch.full((1, 32, 32), 7.5)
    z, valid = code(flat)
    assert z.shape == (1, 4, 4, 4) and bool(valid.all())
    assert torch.allclose(back(z, (32, 32)), flat, rtol=1e-5)
    # Depth constant on each sub-cell comes back exactly; the 4 channels hold the sub-cells in
    # row-major order (pixel_unshuffle), or 4 copies of the cell's median when s = 1.
    g = torch.Generator().manual_seed(0)
    coarse = torch.exp(torch.rand(2, 32 // side, 32 // side, generator=g) * math.log(60.0))
    blocky = coarse.repeat_interleave(side, 1).repeat_interleave(side, 2)   # (2, 32, 32)
    z, _ = code(blocky)
    assert torch.allclose(back(z, (32, 32)), blocky, rtol=1e-4)
    assert torch.allclose(ldmseg.unit_to_depth(z[:, 1, 0, 0], rng), coarse[:, 0, subcells - 1], rtol=1e-4)
    assert torch.allclose(ldmseg.unit_to_depth(z[:, 2, 0, 0], rng), coarse[:, subcells - 1, 0], rtol=1e-4)
    # The decoder averages the copies: noise on one copy moves the depth by a quarter of it (s = 1).
    if subcells == 1:
        noisy = code(flat)[0]
        noisy[:, 0] += 0.4
        assert torch.allclose(ldmseg.depth_to_unit(back(noisy, (32, 32)), rng),
                              ldmseg.depth_to_unit(flat, rng) + 0.1, atol=1e-4)
    # An edge inside a (sub-)cell: it takes its majority side's depth, not a blend of both.
    edge = torch.full((1, 8, 8), 60.0)
    edge[:, :, :side - 1] = 2.0                                             # all but one column near
    out = back(code(edge)[0], (8, 8))
    assert torch.allclose(out[:, :, :side], torch.full((1, 8, side), 2.0), rtol=1e-4)
    assert torch.allclose(out[:, :, side:], torch.full((1, 8, 8 - side), 60.0), rtol=1e-4)
    # Out-of-range depths are clamped; unknown pixels (0) are left out of the median, a sub-cell with
    # none known takes its cell's, and a cell with none known is invalid.
    assert back(code(torch.full((1, 8, 8), 500.0))[0], (8, 8)).max() == pytest.approx(64.0)
    half = torch.full((1, 8, 8), 4.0)
    half[:, :, :4] = 0
    z, valid = code(half)
    assert valid.item() == 1 and torch.allclose(back(z, (8, 8)), torch.full((1, 8, 8), 4.0), rtol=1e-5)
    assert code(torch.zeros(1, 8, 8))[1].item() == 0


def _two_colour_scene(split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 x 16: colour A and depth 2 m left of column `split`, colour B and 60 m from it on."""
    image, depth = torch.full((1, 3, 16, 16), -0.8), torch.full((1, 16, 16), 2.0)
    image[:, 0, :, split:] = 0.8                                            # B: another red channel
    depth[:, :, split:] = 60.0
    return image, depth


def test_guided_upsampling_gives_a_cells_minority_side_its_own_depth():
    """An edge 3 px into the right-hand cells: their median (60 m) is the far side's, and nearest
    upsampling paints the 3 near columns 60 m; guided by the image they take the left cells' 2 m."""
    rng = (1.0, 64.0)
    image, depth = _two_colour_scene(11)
    z, _ = ldmseg.encode_depth(depth, 8, rng, 4)
    nearest = ldmseg.decode_depth(z, rng, (16, 16))
    assert torch.allclose(nearest[:, :, 8:11], torch.full((1, 16, 3), 60.0), rtol=1e-4)
    guided = ldmseg.decode_depth(z, rng, (16, 16), guide=image, sigma_color=0.1)
    assert torch.allclose(guided, depth, rtol=1e-3)
    assert torch.equal(ldmseg.decode_depth(z, rng, (16, 16), guide=image, sigma_color=0.0), nearest)
    # Output size other than the guide's: upsampled at the guide's size, then resized nearest.
    assert torch.allclose(ldmseg.decode_depth(z, rng, (32, 32), guide=image), depth.repeat_interleave(2, 1)
                          .repeat_interleave(2, 2), rtol=1e-3)


def test_guided_upsampling_blends_within_one_colour_and_survives_a_colour_no_cell_has():
    # One colour, log depth rising linearly down the rows (Shapes' ground): each pixel blends its
    # neighbour cells, closer to the ramp than the steps of nearest upsampling.
    rng = (1.0, 64.0)
    ramp = torch.exp(torch.linspace(0.5, 3.5, 32)).view(1, 32, 1).expand(1, 32, 32).contiguous()
    z, _ = ldmseg.encode_depth(ramp, 8, rng, 4)
    guide = torch.zeros(1, 3, 32, 32)
    err = lambda d: (d.log() - ramp.log()).abs().mean().item()
    assert err(ldmseg.decode_depth(z, rng, (32, 32), guide=guide)) < 0.6 * err(ldmseg.decode_depth(z, rng, (32, 32)))
    # A pixel whose colour no cell around it has: every weight underflows, and the log-domain
    # normalisation still gives it the depth of the most similar cell (A's 2 m; not 0 / 0).
    image, depth = _two_colour_scene(8)
    image[:, :, 5, 5] = torch.tensor([-1.0, 1.0, 1.0])                      # nearer A (-0.8) than B (+0.8, -0.8, -0.8)
    z, _ = ldmseg.encode_depth(depth, 8, rng, 4)
    out = ldmseg.decode_depth(z, rng, (16, 16), guide=image, sigma_color=0.05)
    assert bool(out.isfinite().all()) and out[0, 5, 5].item() == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(ValueError, match="whole number"):
        ldmseg.guided_upsample(z[:, :1], torch.zeros(1, 3, 20, 16), 0.1)
    # Non-square maps: each pixel's offset from its cell centre is taken along its own axis.
    u = torch.arange(6.0).view(1, 1, 2, 3)
    wide = ldmseg.guided_upsample(u, torch.zeros(1, 3, 16, 24), 10.0)
    tall = ldmseg.guided_upsample(u.transpose(-1, -2), torch.zeros(1, 3, 24, 16), 10.0)
    assert wide.shape == (1, 1, 16, 24) and torch.allclose(wide.transpose(-1, -2), tall)


def test_the_multitask_depth_decoder_is_guided_by_the_image(tiny_multitask):
    m = tiny_multitask
    image, depth = _two_colour_scene(11)                                    # x2: the edge 6 px into a cell
    twice = lambda x: x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    image, depth = twice(image), twice(depth)
    b = ldmseg.task_signal_scale(m.config, "depth")
    z = ldmseg.encode_depth(depth, 8, m.config.depth_range, 4)[0] * b
    assert torch.allclose(ldmseg.decode_task(m, "depth", z, (32, 32), image), depth, rtol=1e-3)
    assert not torch.allclose(ldmseg.decode_task(m, "depth", z, (32, 32)), depth, rtol=1e-3)   # nearest
    with pytest.raises(ValueError, match="depth_guide_sigma"):
        dataclasses.replace(m.config, depth_guide_sigma=-0.1)


def test_depth_subcells_must_divide_the_channels_and_the_cell():
    with pytest.raises(ValueError, match="sub-cells"):
        ldmseg.encode_depth(torch.ones(1, 8, 8), 8, (1.0, 64.0), 4, subcells=3)
    with pytest.raises(SystemExit, match="depth-subcells"):
        train.main(["--stage", "2", "--depth-subcells", "2", "--preset", "tiny"])
    with pytest.raises(SystemExit, match="task-signal-scales"):
        train.main(["--stage", "2", "--task-signal-scales", "depth=1", "--preset", "tiny"])


# ----------------------------------------------------------------------------- merge rule

def _maps():
    """A hand-made 6 x 6 image: instance ids and a semantic map (categories as in Shapes)."""
    instance = torch.tensor([[1, 1, 1, 2, 2, 0],
                             [1, 1, 1, 2, 2, 0],
                             [3, 3, 3, 4, 4, 4],
                             [3, 3, 3, 4, 4, 4],
                             [5, 5, 5, 6, 6, 6],
                             [5, 5, 5, 6, 6, 6]])
    semantic = torch.tensor([[1, 1, 2, 1, 1, 7],
                             [1, 1, 2, 1, 1, 7],
                             [6, 6, 6, 6, 6, 6],
                             [6, 6, 7, 6, 6, 6],
                             [0, 0, 0, 13, 13, 2],
                             [0, 0, 0, 13, 13, 3]])
    return instance, semantic


def test_merge_gives_each_thing_segment_its_majority_category_and_keeps_things_apart():
    ids, info = ldmseg.merge_panoptic(*_maps(), CATEGORIES)
    cat = {s["id"]: s["category_id"] for s in info}
    seg1, seg2 = ids[0, 0].item(), ids[0, 3].item()
    assert cat[seg1] == 1 and cat[seg2] == 1 and seg1 != seg2          # 4 of 6 pixels circle; two circles
    assert (ids[:2, :3] == seg1).all()                                  # the minority square pixels follow


def test_merge_makes_one_segment_per_stuff_category():
    ids, info = ldmseg.merge_panoptic(*_maps(), CATEGORIES)
    sky = [s for s in info if s["category_id"] == 6]
    assert len(sky) == 1 and sky[0]["isthing"] == 0
    assert (ids[2:4] == sky[0]["id"]).all()                             # instances 3 and 4 merged


def test_merge_keeps_void_and_ignores_void_and_unknown_votes():
    ids, info = ldmseg.merge_panoptic(*_maps(), CATEGORIES)
    assert (ids[:2, 5] == 0).all()                                      # instance void stays void (semantic 7)
    assert (ids[4:, :3] == 0).all()                                     # only void votes: void
    seg6 = ids[4, 3].item()                                             # 13 names no category: 2 vs 3 tie
    assert {s["id"]: s["category_id"] for s in info}[seg6] == 2         # -> the smallest id
    assert sorted(s["id"] for s in info) == list(range(1, len(info) + 1))
    data.check_annotation(ids.numpy(), info, "merged")


# ----------------------------------------------------------------------------- metrics

def test_semantic_miou_on_known_confusion():
    gt = torch.tensor([[1, 1, 2, 2], [0, 0, 2, 2]])
    pred = torch.tensor([[1, 2, 2, 2], [1, 1, 0, 2]])
    conf = evaluate.semantic_confusion(gt, pred, 6)                     # ids 0..5
    assert conf.sum() == 6                                              # ground-truth void ignored
    # On the non-void ground truth: class 1 tp 1, gt 2, pred 1 -> 1/2; class 2 tp 3, gt 4, pred 4 -> 3/5.
    iou1 = 1 / 2
    iou2 = 3 / (4 + 4 - 3)
    assert evaluate.miou_from_confusion(conf, [1, 2]) == pytest.approx((iou1 + iou2) / 2)
    assert evaluate.miou_from_confusion(conf, [1, 2, 5]) == pytest.approx((iou1 + iou2) / 2)   # 5 never occurs


def test_clamping_a_multitask_batch_touches_only_the_instance_rows(tiny_multitask):
    m = tiny_multitask
    x0 = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    task = torch.tensor([1, 0, 2, 0])                                   # semantic, instance, depth, instance
    out = ldmseg.clamp_rows(m, x0, task)
    assert torch.equal(out[[0, 2]], x0[[0, 2]])                         # semantic and depth pass unchanged
    assert torch.equal(out[[1, 3]], ldmseg.clamp_to_map(m, x0[[1, 3]]))
    assert not torch.equal(out[[1, 3]], x0[[1, 3]])
    assert torch.equal(ldmseg.clamp_rows(m, x0[[0, 2]], task[[0, 2]]), x0[[0, 2]])   # no instance row: nothing to do
    assert torch.equal(ldmseg.clamp_rows(m, x0, None), ldmseg.clamp_to_map(m, x0))   # single task: every row


def test_a_model_without_the_instance_task_refuses_clamp_on_by_name():
    import argparse
    args = argparse.Namespace(ckpt="runs/x", clamp_x0="on")
    with pytest.raises(SystemExit, match="clamps the instance latent.*semantic, depth"):
        sample.check_clamp_for_multitask(args, {"model_config": {"tasks": ["semantic", "depth"]}})
    sample.check_clamp_for_multitask(args, {"model_config": {"tasks": ["instance", "depth"]}})      # allowed
    sample.check_clamp_for_multitask(argparse.Namespace(ckpt="runs/x", clamp_x0="off"),
                                     {"model_config": {"tasks": ["depth"]}})                         # off: always


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def multitask_run(tiny_runs):
    import train
    root, shapes = tiny_runs
    out = root / "mt"
    train.main(["--stage", "multitask", "--preset", "tiny", "--data", str(shapes), "--out-dir", str(out),
                "--num-workers", "0", "--preview-every", "0", "--device", "cpu", "--max-steps", "3",
                "--log-every", "3", "--image-vae", str(root / "vae"), "--mask-ae", str(root / "s1")])
    return root, shapes, out


def test_train_multitask_reports_class_aware_pq_miou_and_depth(multitask_run):
    import train
    _, _, out = multitask_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pq", "pq_things", "pq_stuff", "pq_agnostic", "miou", "abs_rel", "rmse", "delta1"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("pq", "pq_things", "pq_stuff", "miou", "delta1"))
    ckpt = train.load_checkpoint(out, "multitask")
    assert [c["id"] for c in ckpt["categories"]] == list(range(1, 10))
    assert (out / "val_ddim3" / "grid.png").exists()


def test_sample_cli_writes_each_tasks_maps(multitask_run, tmp_path):
    _, shapes, out = multitask_run
    img = sorted((shapes / "val").iterdir())[0]
    for task in ("panoptic", "semantic", "depth"):
        assert sample.main(["--task", task, "--ckpt", str(out), "--image", str(img), "--steps", "2",
                            "--out-dir", str(tmp_path / task), "--device", "cpu"]) == 0
    pred = json.loads((tmp_path / "panoptic" / "panoptic.json").read_text())
    assert [c["id"] for c in pred["categories"]] == list(range(1, 10))
    ids = data.read_panoptic_png(tmp_path / "panoptic" / "panoptic" / f"{img.stem}.png")
    data.check_annotation(ids, pred["annotations"][0]["segments_info"], "prediction")
    from PIL import Image
    with Image.open(tmp_path / "semantic" / f"{img.stem}_semantic.png") as im:
        assert np.asarray(im).max() <= 9
    with Image.open(tmp_path / "depth" / f"{img.stem}_depth.png") as im:
        depth_mm = np.asarray(im)
    assert depth_mm.dtype == np.uint16 and depth_mm.min() >= 1000 and depth_mm.max() <= 64000
    assert (tmp_path / "depth" / f"{img.stem}_depth_color.png").exists()


def test_evaluate_cli_on_a_multitask_checkpoint_prints_every_metric(multitask_run, tmp_path, capsys):
    _, shapes, out = multitask_run
    assert evaluate.main(["--ckpt", str(out), "--steps", "2", "--out-dir", str(tmp_path), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "class-aware PQ" in text and "Things" in text and "Stuff" in text
    assert "semantic mIoU" in text and "delta<1.25" in text
    res = json.loads((tmp_path / "metrics.json").read_text())
    again = evaluate.evaluate_files(str(shapes / "annotations" / "panoptic_val.json"), str(tmp_path / "panoptic.json"),
                                    str(shapes / "annotations" / "panoptic_val"), str(tmp_path / "panoptic"))
    assert again["All"]["pq"] == pytest.approx(res["pq"])


def test_depth_guide_sigma_and_clamp_flags_reach_the_model(multitask_run, tmp_path, monkeypatch):
    _, shapes, out = multitask_run
    seen, load = [], ldmseg.load_ldmseg
    monkeypatch.setattr(ldmseg, "load_ldmseg", lambda *a, **kw: seen.append(
        (kw["depth_guide_sigma"], kw["clamp_x0"])) or load(*a, **kw))
    img = sorted((shapes / "val").iterdir())[0]
    assert sample.main(["--task", "depth", "--ckpt", str(out), "--image", str(img), "--steps", "2",
                        "--out-dir", str(tmp_path / "s"), "--device", "cpu", "--depth-guide-sigma", "0"]) == 0
    assert evaluate.main(["--ckpt", str(out), "--steps", "2", "--limit", "2", "--out-dir", str(tmp_path / "e"),
                          "--device", "cpu", "--depth-guide-sigma", "0.2", "--clamp-x0", "on"]) == 0
    assert sample.main(["--task", "panoptic", "--ckpt", str(out), "--image", str(img), "--steps", "2",
                        "--out-dir", str(tmp_path / "p"), "--device", "cpu", "--clamp-x0", "off"]) == 0
    assert seen == [(0.0, None), (0.2, True), (None, False)]
    for parser in (sample.build_parser(), evaluate.build_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--ckpt", "x", "--depth-guide-sigma", "-1"])


@pytest.mark.parametrize("tasks,metrics,absent", [("depth", {"abs_rel", "rmse", "delta1"}, {"pq", "pq_agnostic", "miou"}),
                                                    ("semantic", {"miou"}, {"pq", "pq_agnostic", "delta1"})])
def test_one_task_trains_a_single_task_model_and_reports_its_metrics(tiny_runs, tmp_path, capsys, tasks, metrics, absent):
    import train
    root, shapes = tiny_runs
    out = tmp_path / tasks
    train.main(["--stage", "multitask", "--preset", "tiny", "--data", str(shapes), "--out-dir", str(out),
                "--num-workers", "0", "--preview-every", "0", "--device", "cpu", "--max-steps", "2", "--log-every", "2",
                "--image-vae", str(root / "vae"), "--mask-ae", str(root / "s1"), "--tasks", tasks,
                "--task-signal-scales", f"{tasks}=0.5"])
    config = train.load_checkpoint(out, "multitask")["model_config"]
    assert tuple(config["tasks"]) == (tasks,) and config["task_signal_scales"] == {tasks: 0.5}
    res = json.loads((out / "metrics.json").read_text())
    assert metrics <= set(res) and not absent & set(res) and res["images"] > 0
    assert (out / "preview_final.png").exists() and (out / "val_ddim3" / "grid.png").exists()
    capsys.readouterr()
    assert evaluate.main(["--ckpt", str(out), "--steps", "2", "--out-dir", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "class-aware PQ" not in text and ("delta<1.25" in text) == (tasks == "depth")
    assert (tmp_path / "ev" / "metrics.json").exists() and not (tmp_path / "ev" / "panoptic.json").exists()
    img = sorted((shapes / "val").iterdir())[0]
    with pytest.raises(SystemExit, match="panoptic"):
        sample.main(["--task", "panoptic", "--ckpt", str(out), "--image", str(img), "--steps", "2",
                     "--out-dir", str(tmp_path / "s"), "--device", "cpu"])


def test_unknown_tasks_are_refused_by_name():
    import train
    with pytest.raises(SystemExit, match="unknown: edges"):
        train.parse_tasks("depth,edges")
    assert train.parse_tasks("depth, instance") == ("instance", "depth")


def test_a_stage2_checkpoint_cannot_answer_the_depth_task(tiny_runs, tmp_path):
    root, shapes = tiny_runs
    img = sorted((shapes / "val").iterdir())[0]
    with pytest.raises(SystemExit, match="stage multitask is needed"):
        sample.main(["--task", "depth", "--ckpt", str(root / "s2"), "--image", str(img), "--steps", "2",
                     "--out-dir", str(tmp_path), "--device", "cpu"])


def test_shapes_stage2_and_multitask_presets_and_coco_the_papers():
    stage2, multi = ldmseg.LDMSegConfig.preset("shapes"), ldmseg.multitask_config("shapes")
    assert (stage2.prediction, stage2.signal_scale, stage2.time_shift, stage2.clamp_x0) == ("x0", 1.0, 300, True)
    assert (multi.prediction, multi.signal_scale, multi.time_shift, multi.clamp_x0) == ("x0", 0.1, 300, False)
    assert stage2.area_weight_power == 0.5 and multi.area_weight_power == 0.0   # a config with tasks refuses p > 0
    assert multi.task_signal_scales == {"depth": 1.0} and stage2.task_signal_scales == {}
    assert multi.task_loss_weights == {"depth": 2.5} and stage2.task_loss_weights == {}
    assert multi.task_sample_weights == {"depth": 4.0} and stage2.task_sample_weights == {}
    assert stage2.unet.attention_levels == (True, True, True) and multi.unet.attention_levels == (False, True, True)
    coco = ldmseg.multitask_config("coco")
    assert coco.unet.attention_levels == ldmseg.UNetConfig().attention_levels          # SD-1.x's
    assert (coco.prediction, coco.signal_scale, coco.time_shift) == ("eps", 1.0, 0)
    assert coco.task_signal_scales == {} and coco.task_loss_weights == {} and coco.task_sample_weights == {}

"""Tests of the LDMSeg diffusion model (ldmseg.py §8-9) and the stage-2 commands end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ldmseg
import sample


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()


def test_unet_input_has_map_image_and_self_condition_channels(tiny_model):
    assert tiny_model.unet.conv_in.in_channels == 12
    z = torch.randn(2, 4, 4, 4)
    assert tiny_model(z, torch.tensor([5, 900]), z).shape == (2, 4, 4, 4)


def test_zero_initialised_inputs_make_the_new_model_ignore_the_image(tiny_model):
    z_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    a = tiny_model(z_t, t, torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))
    b = tiny_model(z_t, t, torch.randn(2, 4, 4, 4) * 5, None)
    assert torch.equal(a, b)


def test_config_round_trips_through_a_plain_dict():
    import dataclasses
    cfg = ldmseg.LDMSegConfig.preset("tiny")
    again = ldmseg.LDMSegConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg
    for bad, match in ((dict(min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
                       (dict(self_condition_prob=1.5), r"self_condition_prob must lie in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(cfg, **bad)


def test_min_snr_weight_values():
    schedule = sample.NoiseSchedule("scaled_linear", 1000)
    t = torch.tensor([0, 99, 249, 300, 999])
    w = ldmseg.min_snr_weight(schedule.snr(t), 2.0)
    # PAPER brief §3.3: w(0) ~ 0.0017, w(99) ~ 0.233, w(249) ~ 0.961, w(>= 255) = 1
    assert w[0].item() == pytest.approx(0.0017, abs=2e-4)
    assert w[1].item() == pytest.approx(0.233, abs=2e-3)
    assert w[2].item() == pytest.approx(0.961, abs=2e-3)
    assert w[3].item() == 1.0 and w[4].item() == 1.0


def test_void_cells_are_masked_out_of_the_loss(tiny_model):
    z0, z_img = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    none = torch.zeros(2, 1, 4, 4)
    out = ldmseg.ldmseg_loss(tiny_model, tiny_model.config, tiny_model.schedule, z0, z_img, none,
                             torch.Generator().manual_seed(0))
    assert out["loss"].item() == 0.0
    ids = torch.zeros(1, 32, 32, dtype=torch.long)
    ids[:, :16] = 3
    assert ldmseg.void_mask_latent(ids, 4, 4)[0, 0].tolist() == [[1.0] * 4] * 2 + [[0.0] * 4] * 2


def test_area_weights_by_hand():
    """Segment 1 covers 10 px, segment 2 4 px, void 2 px; 2 x 2-pixel cells; p = 1 (section 8 charter)."""
    ids = torch.tensor([[1, 1, 1, 1],
                        [1, 1, 1, 1],
                        [1, 1, 2, 2],
                        [0, 0, 2, 2]])[None]
    # Cell means of area^-1: 1/10, 1/10, (1/10 + 1/10 + 0 + 0) / 4, 1/4; their mean 1/8 -> rescaled to 1.
    weights = ldmseg.area_weighted_mask(ids, 2, 2, 1.0)
    assert torch.allclose(weights[0, 0], torch.tensor([[0.8, 0.8], [0.4, 2.0]]))
    half = ldmseg.area_weighted_mask(ids, 2, 2, 0.5)[0, 0]               # p = 0.5: 10^-0.5 ... 4^-0.5
    raw = torch.tensor([[10 ** -0.5, 10 ** -0.5], [10 ** -0.5 / 2, 0.5]])
    assert torch.allclose(half, raw / raw.mean()) and torch.allclose(half.mean(), torch.tensor(1.0))
    assert torch.equal(ldmseg.area_weighted_mask(ids, 2, 2, 0.0), ldmseg.void_mask_latent(ids, 2, 2))  # p = 0: the paper
    two = torch.stack([ids[0], torch.zeros(4, 4, dtype=torch.long)])      # an all-void sample beside it
    weights = ldmseg.area_weighted_mask(two * 70_000, 2, 2, 1.0)          # large (COCO-like) segment ids
    assert torch.allclose(weights[0, 0], torch.tensor([[0.8, 0.8], [0.4, 2.0]])) and not weights[1].any()
    assert ldmseg.LDMSegConfig.preset("coco").area_weight_power == 0 == ldmseg.LDMSegConfig().area_weight_power
    assert ldmseg.LDMSegConfig.preset("shapes").area_weight_power == 0.5 and ldmseg.LDMSegConfig.preset("tiny").area_weight_power == 0
    for bad in (dict(area_weight_power=-0.5), dict(area_weight_power=0.5, tasks=("instance", "depth"))):
        with pytest.raises(ValueError, match="area_weight_power"):
            ldmseg.LDMSegConfig(**bad)


def test_overfitting_one_batch_lowers_the_diffusion_loss():
    torch.manual_seed(0)
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    z0, z_img, valid = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.ones(4, 1, 4, 4)

    def loss_at(seed):
        return ldmseg.ldmseg_loss(model, model.config, model.schedule, z0, z_img, valid,
                                  torch.Generator().manual_seed(seed))["loss"]
    first = sum(loss_at(s).item() for s in range(8))
    for step in range(100):
        opt.zero_grad()
        loss_at(step % 8).backward()
        opt.step()
    assert sum(loss_at(s).item() for s in range(8)) < 0.6 * first


def _logits_for(ids: torch.Tensor, num_classes: int, margin: float = 10.0) -> torch.Tensor:
    """Logits (1, C, H, W) whose argmax is `ids` with a confident margin."""
    logits = torch.full((1, num_classes, *ids.shape), -margin)
    logits[0].scatter_(0, ids[None], margin)
    return logits


def test_post_processing_keeps_confident_segments_and_removes_tiny_ones():
    ids = torch.zeros(64, 64, dtype=torch.long)
    ids[:, 32:] = 5
    ids[10:20, 5:15] = 7                                                     # 100 px
    ids[0, 0] = 9                                                            # 1 px: below the area threshold
    out = ldmseg.panoptic_from_logits(_logits_for(ids, 16), count_th=512.0)  # 512 at 512^2 = 8 px at 64^2
    assert set(out.unique().tolist()) == {0, 5, 7}
    assert (out[0][ids == 5] == 5).all() and out[0, 0, 0] == 0
    # A model working at 32^2 decoded at 64^2 (evaluation at the image's own size): 512 px at 512^2 is
    # 2 px at its size, and stays 2 px at the decoded one, as LDMSeg keeps 512 px at any image size.
    ids[40, 0:3] = 11                                                         # 3 px: kept, not held to 8
    out = ldmseg.panoptic_from_logits(_logits_for(ids, 16), count_th=512.0, work_size=(32, 32))
    assert set(out.unique().tolist()) == {0, 5, 7, 11}                       # 9: 1 px, below 2


def test_decoding_at_another_size_keeps_the_area_threshold_of_the_model_s_own(tiny_model, monkeypatch):
    """The tiny model works at 32^2 (4^2 latents x 8): 512 px at 512^2 is 2 px whatever size it is decoded at."""
    ids = torch.zeros(64, 64, dtype=torch.long)
    ids[:, 32:], ids[40, 0:3] = 5, 11                                         # segment 11: 3 px at 64^2
    monkeypatch.setattr(tiny_model, "decode_latent", lambda z0, size: _logits_for(ids, 16))
    out = ldmseg.decode_panoptic(tiny_model, torch.zeros(1, 4, 4, 4), (64, 64))
    assert set(out.unique().tolist()) == {0, 5, 11}


def test_overlap_threshold_keeps_a_segment_at_an_exact_tie_as_the_official_float64_test():
    """15 of the 25 pixels where channel 1's sigmoid is >= 0.5 won: 15 / 25 = 0.6 is not < 0.6, so it stays."""
    logits = torch.full((1, 3, 5, 5), -10.0)
    logits[0, 1] = 0.5                                                       # sigmoid >= 0.5 on all 25 pixels
    logits[0, 1].view(-1)[:15] = 10.0                                        # ... and the argmax on 15 of them
    logits[0, 2].view(-1)[15:] = 10.0
    out = ldmseg.panoptic_from_logits(logits, count_th=0.0, overlap_th=0.6)
    assert int((out == 1).sum()) == 15
    assert int((ldmseg.panoptic_from_logits(logits, count_th=0.0, overlap_th=0.61) == 1).sum()) == 0


def test_decoding_at_another_size_resizes_twice_as_the_official_evaluation(tiny_model):
    """x2 to the model's own size first, then to the requested size [LDMSeg brief §4, step 4]."""
    ae = tiny_model.mask_ae
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    full = ae.decode_full(z)                                                 # (1, 2^K, 32, 32)
    assert full.shape[-2:] == (32, 32)
    out = ae.decode_full(z, (48, 40))
    want = torch.nn.functional.interpolate(full, size=(48, 40), mode="bilinear", align_corners=False)
    assert torch.equal(out, want)
    assert torch.equal(ae.decode_full(z, (32, 32)), full)


def test_the_frozen_mask_autoencoder_runs_in_fp32_under_autocast(tiny_model):
    """Training's bf16 autocast must not change the targets and decodes that sampling computes in fp32."""
    ids = torch.randint(0, 16, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    z = tiny_model.encode_ids(ids)
    logits = tiny_model.decode_latent(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_amp = tiny_model.encode_ids(ids)
        logits_amp = tiny_model.decode_latent(z)
        matched = ldmseg.matched_ids(tiny_model, z, ids)
    assert z_amp.dtype == torch.float32 and torch.equal(z_amp, z)
    assert logits_amp.dtype == torch.float32 and torch.equal(logits_amp, logits)
    assert torch.equal(matched, ldmseg.matched_ids(tiny_model, z, ids))


def test_post_processing_edge_cases_all_void_one_segment_and_low_confidence():
    ids = torch.zeros(32, 32, dtype=torch.long)
    assert ldmseg.panoptic_from_logits(_logits_for(ids, 8)).max() == 0       # channel 0 never forms a segment
    one = torch.full((32, 32), 3)
    assert (ldmseg.panoptic_from_logits(_logits_for(one, 8)) == 3).all()
    flat = torch.zeros(1, 8, 32, 32)                                         # uniform softmax: 1/8 < 0.5
    assert ldmseg.panoptic_from_logits(flat).max() == 0


def test_sampling_with_self_conditioning_feeds_each_call_the_previous_estimate(tiny_model):
    seen = []
    real_forward = tiny_model.forward

    def spy(z_t, t, z_image, x0_self=None):
        seen.append(None if x0_self is None else x0_self.clone())
        return real_forward(z_t, t, z_image, x0_self)
    tiny_model.forward = spy
    try:
        ldmseg.sample_latent(tiny_model, torch.zeros(1, 4, 4, 4), steps=3, generator=torch.Generator().manual_seed(0))
    finally:
        del tiny_model.forward
    assert seen[0] is None and all(s is not None for s in seen[1:]) and len(seen) == 3


class _Oracle(torch.nn.Module):
    """A denoiser that knows the answer: outputs the true x0 (or the eps that leads to it) for any z_t."""

    def __init__(self, model, z0, prediction, time_shift=0):
        import dataclasses
        super().__init__()
        self.config = dataclasses.replace(model.config, prediction=prediction, time_shift=time_shift)
        self.schedule, self.z0 = model.schedule, z0
        self.x0_selfs, self.ts = [], []

    def forward(self, z_t, t, z_image, x0_self=None):
        self.x0_selfs.append(x0_self)
        self.ts.append(int(t[0]))
        if self.config.prediction == "x0":
            return self.z0.expand_as(z_t)
        return sample.predict_eps_from_x0(z_t, t, self.z0.expand_as(z_t), self.schedule)


@pytest.mark.parametrize("time_shift", [0, 300])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_sampling_reads_the_unet_output_as_its_configured_prediction(tiny_model, prediction, time_shift):
    """With an oracle in either parameterisation, DDIM returns the true latent and every
    self-condition after the first is that latent: the output is read as eps or x0 as configured.
    With a time shift the oracle's eps is exact only at the time it is told (t + shift), so reading
    it at the state's own t would miss the true latent."""
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    oracle = _Oracle(tiny_model, z0, prediction, time_shift)
    out = ldmseg.sample_latent(oracle, torch.zeros(1, 4, 4, 4), steps=5, generator=torch.Generator().manual_seed(0))
    grid = sample.make_timesteps(1000, 5, "trailing").tolist()                # 999, 799, ..., 199
    assert oracle.ts == [min(t + time_shift, 999) for t in grid]
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=0)
    assert oracle.x0_selfs[0] is None
    for x0_self in oracle.x0_selfs[1:]:
        torch.testing.assert_close(x0_self, z0, atol=1e-4, rtol=0)


class _ClampingOracle(_Oracle):
    """The oracle with clamping on, and a transparent stand-in for the mask autoencoder (an untrained one
    decodes every latent to void): channel 0 of a latent cell, rounded, is the id of its 8 x 8 pixels,
    confidently; a map encodes back to its ids in channel 0 and zeros elsewhere."""

    def __init__(self, model, z0, prediction, time_shift):
        import dataclasses
        super().__init__(model, z0, prediction, time_shift)
        self.config = dataclasses.replace(self.config, clamp_x0=True)
        self.mask_ae = model.mask_ae                                         # for its downsample factor (8)
        self.num_ids = 2 ** self.config.mask_ae.num_bits

    def decode_latent(self, z, size=None):
        ids = z[:, 0].round().clamp(0, self.num_ids - 1).long()              # (B, h, w)
        logits = torch.nn.functional.one_hot(ids, self.num_ids).permute(0, 3, 1, 2).float() * 10 - 5
        return torch.nn.functional.interpolate(logits, size=size, mode="nearest")

    def encode_ids(self, ids):
        cells = torch.nn.functional.interpolate(ids[:, None].float(), scale_factor=1 / 8, mode="nearest")
        return torch.cat([cells, torch.zeros_like(cells).expand(-1, 3, -1, -1)], dim=1)


@pytest.mark.parametrize("time_shift", [0, 300])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_clamping_hands_sampler_and_self_condition_the_latent_of_the_decoded_map(tiny_model, prediction, time_shift):
    """With clamp_x0, every estimate is replaced by encode(decode(estimate)) before anything reads it:
    the oracle's true latent z0 comes back as the latent of the map z0 decodes to, in the self-condition
    of every later call and in the sampler's result (eps outputs too: the sampler is then handed x0)."""
    z0 = 3 + 2 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    oracle = _ClampingOracle(tiny_model, z0, prediction, time_shift)
    clamped = ldmseg.clamp_to_map(oracle, z0)
    ids = z0[:, 0].round().clamp(0, oracle.num_ids - 1)
    torch.testing.assert_close(clamped, torch.cat([ids[:, None], torch.zeros(1, 3, 4, 4)], dim=1))
    assert ids.unique().numel() > 3                                          # a map of several segments
    out = ldmseg.sample_latent(oracle, torch.zeros(1, 4, 4, 4), steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, clamped, atol=1e-4, rtol=0)
    assert oracle.x0_selfs[0] is None and len(oracle.x0_selfs) == 4
    for x0_self in oracle.x0_selfs[1:]:
        torch.testing.assert_close(x0_self, clamped, atol=1e-5, rtol=0)


def test_clamping_while_inpainting_decodes_the_given_cells_as_given(tiny_model):
    """With a known region, the estimate is clamped with the known latent in its known cells, so the map
    it is clamped to holds the given segments there (ldmseg.py section 8)."""
    z0 = 3 + 2 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    z_known = 3 + 2 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    oracle = _ClampingOracle(tiny_model, z0, "x0", 300)
    ldmseg.sample_latent(oracle, torch.zeros(1, 4, 4, 4), steps=3, generator=torch.Generator().manual_seed(0),
                         known=sample.KnownRegion(z_known, mask))
    expected = ldmseg.clamp_to_map(oracle, torch.where(mask.bool(), z_known, z0))
    assert not torch.allclose(expected, ldmseg.clamp_to_map(oracle, z0))     # the given cells change the map
    for x0_self in oracle.x0_selfs[1:]:
        torch.testing.assert_close(x0_self, expected, atol=1e-5, rtol=0)


def test_inpainting_clamps_only_when_asked_and_segmentation_as_configured(monkeypatch):
    import dataclasses
    torch.manual_seed(0)
    model = ldmseg.LDMSeg(dataclasses.replace(ldmseg.LDMSegConfig.preset("tiny"), clamp_x0=True)).eval()
    calls, real = [], ldmseg.clamp_to_map
    monkeypatch.setattr(ldmseg, "clamp_to_map", lambda m, x0: calls.append(1) or real(m, x0))
    given = torch.zeros(32, 32, dtype=torch.long)
    given[:, :16] = 5
    cells = torch.zeros(4, 4)
    cells[:, :2] = 1
    image, gen = torch.zeros(1, 3, 32, 32), torch.Generator().manual_seed(0)
    ldmseg.inpaint(model, image, given, cells, steps=3, generator=gen)
    assert calls == []                                                       # the model's config says clamp: not here
    ldmseg.inpaint(model, image, given, cells, steps=3, clamp=True, generator=gen)
    assert len(calls) == 3
    ldmseg.segment(model, image, steps=2, generator=gen)
    assert len(calls) == 5


def test_clamping_needs_a_panoptic_latent_and_is_the_shapes_presets():
    import dataclasses
    assert ldmseg.LDMSegConfig.preset("shapes").clamp_x0 and not ldmseg.LDMSegConfig.preset("coco").clamp_x0
    assert dataclasses.replace(ldmseg.multitask_config("tiny"), clamp_x0=True).clamp_x0      # its instance task
    with pytest.raises(ValueError, match="clamp_x0"):
        dataclasses.replace(ldmseg.multitask_config("tiny"), tasks=("semantic", "depth"), clamp_x0=True)


def test_x0_prediction_loss_is_the_unweighted_masked_x0_error(tiny_model):
    import dataclasses
    config = dataclasses.replace(tiny_model.config, prediction="x0", self_condition=False)
    z0, z_img = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    valid = torch.ones(2, 1, 4, 4)
    valid[1, :, :2] = 0
    guess = torch.randn(2, 4, 4, 4)
    out = ldmseg.ldmseg_loss(lambda z_t, t, zi, x0s: guess, config, tiny_model.schedule, z0, z_img, valid,
                             torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], ((guess - z0).pow(2) * valid).mean())
    with pytest.raises(ValueError, match="prediction"):
        dataclasses.replace(config, prediction="v")


def test_decoded_cross_entropy_is_stage_one_ce_on_the_decoded_x0_added_with_its_weight(tiny_model, monkeypatch):
    """The option's loss is the latent loss + weight * point_ce_loss(mask decoder(x0_pred / (b s_t)), ids)."""
    import dataclasses
    config = dataclasses.replace(tiny_model.config, prediction="x0", self_condition=False, decoded_ce_weight=0.25)
    z0, z_img, valid = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.ones(2, 1, 4, 4)
    ids = torch.randint(0, 4, (2, 32, 32))
    guess = torch.randn(2, 4, 4, 4)
    seen = {}

    def recorder(logits, target_ids, mae_config, generator=None):
        seen.update(logits=logits, ids=target_ids)
        return logits.mean()
    monkeypatch.setattr(ldmseg, "point_ce_loss", recorder)
    out = ldmseg.ldmseg_loss(lambda z_t, t, zi, x0s: guess, config, tiny_model.schedule, z0, z_img, valid,
                             torch.Generator().manual_seed(0), ids=ids, net=tiny_model)
    expected_logits = tiny_model.mask_ae.decode(guess / tiny_model.latent_scale)
    torch.testing.assert_close(seen["logits"], expected_logits)
    assert seen["ids"] is ids
    torch.testing.assert_close(out["dce"], expected_logits.mean())
    torch.testing.assert_close(out["loss"], ((guess - z0).pow(2) * valid).mean() + 0.25 * expected_logits.mean())
    with pytest.raises(ValueError, match="ids and net"):
        ldmseg.ldmseg_loss(lambda z_t, t, zi, x0s: guess, config, tiny_model.schedule, z0, z_img, valid)


def test_decoded_cross_entropy_trains_the_unet_through_the_frozen_mask_decoder():
    import dataclasses
    torch.manual_seed(0)
    config = dataclasses.replace(ldmseg.LDMSegConfig.preset("tiny"), prediction="x0")
    model = ldmseg.LDMSeg(config).train()
    z0, z_img, valid = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.ones(2, 1, 4, 4)
    ids = torch.randint(1, 4, (2, 32, 32))

    def grads(weight):
        model.zero_grad(set_to_none=True)
        model.config.decoded_ce_weight = weight
        out = ldmseg.ldmseg_loss(model, model.config, model.schedule, z0, z_img, valid,
                                 torch.Generator().manual_seed(0), ids=ids, net=model)
        out["loss"].backward()
        return out, model.unet.conv_out.weight.grad.clone()
    plain, g0 = grads(0.0)
    decoded, g1 = grads(1.0)
    assert "dce" not in plain and decoded["dce"].item() > 0
    assert not torch.allclose(g0, g1)                                     # the CE reaches the UNet
    assert all(p.grad is None for p in model.mask_ae.parameters())        # the decoder stays frozen
    assert all(ldmseg.LDMSegConfig.preset(name).decoded_ce_weight == 0 for name in ("tiny", "shapes", "coco"))  # off
    for bad in (dict(decoded_ce_weight=-1.0), dict(decoded_ce_weight=0.1, prediction="eps")):
        with pytest.raises(ValueError, match="decoded_ce_weight"):
            dataclasses.replace(config, **bad)
    with pytest.raises(ValueError, match="decoded_ce_weight"):
        dataclasses.replace(ldmseg.multitask_config("tiny"), prediction="x0", decoded_ce_weight=0.1)


def _log_probs_for(ids: torch.Tensor, num_classes: int = 16) -> torch.Tensor:
    """(B, H, W) ids -> (B, C, H/2, W/2) log-probabilities that draw them, as the mask decoder's at H/2."""
    return torch.cat([_logits_for(i[::2, ::2], num_classes) for i in ids]).log_softmax(1)


def test_match_ids_renames_each_segment_to_the_id_the_estimate_draws_it_with():
    ids = torch.zeros(2, 32, 32, dtype=torch.long)
    ids[:, :, 8:] = 1                                                     # a large segment; void on the left
    ids[:, 20:, 20:] = 2                                                  # a 144-px one
    ids[:, 4:8, 24:28] = 3                                                # a 16-px one
    ids[:, 1, 30] = 5                                                     # 1 px, off the estimate's 16 x 16 grid
    drawn = ids.clone()
    drawn[0] = torch.tensor([0, 7, 4, 9, 0, 12])[ids[0]]                  # image 0's estimate: other names
    out = ldmseg.match_ids(_log_probs_for(drawn), ids)
    assert torch.equal(out[0][ids[0] != 5], drawn[0][ids[0] != 5])
    assert out[0, 1, 30] == 5                                             # unseen: keeps its id, still free
    assert torch.equal(out[1], ids[1])                                    # image 1 drawn as it is: unchanged
    assert torch.equal(out == 0, ids == 0)                                # void stays void


def test_match_ids_lets_larger_segments_choose_first():
    """An estimate that misses a small segment draws it with its large neighbour's id: the large segment keeps
    that id, and the small one takes another (a greedy over the cheapest pairs would give it away)."""
    ids = torch.ones(1, 32, 32, dtype=torch.long)
    ids[:, 10:14, 10:14] = 2                                              # inside segment 1
    ids[:, 24:, :] = 3
    drawn = torch.where(ids == 3, 8, 6)                                   # the small one drawn as its neighbour: 6
    drawn[:, 0, :4] = 8                                                   # two cells of the large one drawn wrong:
    # its cost for 6 is above the small one's 0, which a greedy over the cheapest pairs would take first
    out = ldmseg.match_ids(_log_probs_for(drawn), ids)
    assert (out[ids == 1] == 6).all() and (out[ids == 3] == 8).all()
    small = out[ids == 2].unique()
    assert len(small) == 1 and small.item() not in (0, 6, 8)              # injective, and never void


def test_matched_ids_give_the_x0_target_and_the_noise_keeps_the_drawn_ids(tiny_model, monkeypatch):
    """With match_ids the x0 target is the latent of the ids renamed against the (detached) estimate."""
    import dataclasses
    config = dataclasses.replace(tiny_model.config, prediction="x0", self_condition=False, match_ids=True)
    ids = torch.randint(1, 6, (2, 32, 32))
    z0, z_img, valid = tiny_model.encode_ids(ids), torch.randn(2, 4, 4, 4), torch.ones(2, 1, 4, 4)
    guess = torch.randn(2, 4, 4, 4)
    seen = []
    renamed = torch.stack([(ids[0] % 5) + 1, ids[1]])                   # image 0 renamed, image 1 as drawn
    monkeypatch.setattr(ldmseg, "match_ids", lambda logp, i: seen.append(i) or renamed)
    out = ldmseg.ldmseg_loss(lambda z_t, t, zi, x0s: guess, config, tiny_model.schedule, z0, z_img, valid,
                             torch.Generator().manual_seed(0), ids=ids, net=tiny_model)
    assert len(seen) == 1 and seen[0] is ids
    target = torch.stack([tiny_model.encode_ids(renamed[:1])[0], z0[1]])
    torch.testing.assert_close(out["loss"], ((guess - target).pow(2) * valid).mean())
    with pytest.raises(ValueError, match="ids and net"):
        ldmseg.ldmseg_loss(lambda z_t, t, zi, x0s: guess, config, tiny_model.schedule, z0, z_img, valid)
    assert not any(ldmseg.LDMSegConfig.preset(name).match_ids for name in ("tiny", "coco"))
    assert ldmseg.LDMSegConfig.preset("shapes").match_ids                   # the Shapes recipe matches its ids ...
    assert not any(ldmseg.multitask_config(name).match_ids for name in ("tiny", "shapes", "coco"))  # ... not its tasks
    for bad in (dict(prediction="eps"), dict(id_order="raster")):
        with pytest.raises(ValueError, match="match_ids"):
            dataclasses.replace(config, **bad)
    with pytest.raises(ValueError, match="match_ids"):
        dataclasses.replace(ldmseg.multitask_config("tiny"), prediction="x0", match_ids=True)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def stage2_run(tiny_runs):
    root, shapes = tiny_runs
    return root, shapes, json.loads((root / "s2" / "metrics.json").read_text())


def test_train_stage2_reports_pq_for_both_samplers(stage2_run):
    root, _, metrics = stage2_run
    assert {"pq_ddim3", "sq_ddim3", "rq_ddim3", "pq_dpm++2"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith(("pq", "sq", "rq")))
    assert (root / "s2" / "val_ddim3" / "grid.png").exists()


def test_sample_cli_writes_maps_overlays_trajectory_and_coco_predictions(stage2_run, tmp_path, monkeypatch):
    root, shapes, _ = stage2_run
    img = next((shapes / "val").iterdir())
    shifts, load = [], ldmseg.load_ldmseg
    monkeypatch.setattr(ldmseg, "load_ldmseg",
                        lambda *a, **kw: shifts.append((kw["time_shift"], kw["clamp_x0"])) or load(*a, **kw))
    sample.main(["--task", "panoptic", "--ckpt", str(root / "s2"), "--image", str(img), "--steps", "4",
                 "--out-dir", str(tmp_path), "--save-trajectory", "--device", "cpu", "--time-shift", "100",
                 "--clamp-x0", "on"])
    assert shifts == [(100, True)]
    for bad in (["--time-shift", "-1"], ["--clamp-x0", "yes"]):
        with pytest.raises(SystemExit):
            sample.build_parser().parse_args(["--ckpt", "x"] + bad)
    stem = img.stem
    for suffix in ("_color.png", "_overlay.png", "_trajectory.png"):
        assert (tmp_path / f"{stem}{suffix}").exists()
    w, h = Image.open(img).size
    strip = np.asarray(Image.open(tmp_path / f"{stem}_trajectory.png"))
    assert strip.shape == (h + 12, 5 * w, 3)                  # the image, then one panel per step (4 of 4), labelled
    assert (strip[h:, :, :] < 128).any()                      # the labels are drawn
    pred = json.loads((tmp_path / "panoptic.json").read_text())
    ids = data.read_panoptic_png(tmp_path / "panoptic" / f"{stem}.png")
    data.check_annotation(ids, pred["annotations"][0]["segments_info"], "prediction")


def test_sample_cli_refuses_inputs_whose_outputs_would_overwrite_each_other(stage2_run, tmp_path):
    root, shapes, _ = stage2_run
    img = next((shapes / "val").iterdir())
    (tmp_path / "copy").mkdir()
    twin = tmp_path / "copy" / img.name
    twin.write_bytes(img.read_bytes())
    with pytest.raises(SystemExit, match=f"several inputs named {img.stem}"):
        sample.main(["--task", "panoptic", "--ckpt", str(root / "s2"), "--image", str(img), str(twin),
                     "--steps", "2", "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    (tmp_path / "map.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--known-map .*map.png: not a readable image"):
        sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(img), "--known-map",
                     str(tmp_path / "map.png"), "--steps", "2", "--out-dir", str(tmp_path / "out"), "--device", "cpu"])


def test_evaluate_cli_samples_the_val_split_and_writes_files_panopticapi_reads(stage2_run, tmp_path, capsys):
    import evaluate
    root, shapes, _ = stage2_run
    assert evaluate.main(["--ckpt", str(root / "s2"), "--steps", "3", "--out-dir", str(tmp_path),
                          "--device", "cpu"]) == 0
    assert "class-agnostic PQ" in capsys.readouterr().out
    # The written predictions re-score to the same PQ through the file path.
    again = evaluate.evaluate_files(str(shapes / "annotations" / "panoptic_val.json"), str(tmp_path / "panoptic.json"),
                                    str(shapes / "annotations" / "panoptic_val"), str(tmp_path / "panoptic"),
                                    class_agnostic=True)
    assert again["All"]["pq"] == pytest.approx(json.loads((tmp_path / "metrics.json").read_text())["pq"])


def test_stage2_starts_from_stable_diffusion_weights_in_both_layouts(stage2_run, tmp_path):
    """--image-vae with a diffusers folder, --init-unet with a CompVis file: loaded, widened, frozen."""
    import dataclasses
    import train
    root, shapes, _ = stage2_run
    torch.manual_seed(1)
    vae = ldmseg.ImageAutoencoder(ldmseg.ImageAEConfig.preset("tiny"))
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    ldmseg.save_safetensors(ldmseg.to_diffusers_vae_keys(vae.state_dict(), vae.config),
                            tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
    sd_cfg = dataclasses.replace(ldmseg.UNetConfig.preset("tiny"), in_channels=4, context_dim=8)
    sd_unet = ldmseg.UNet(sd_cfg)
    ldmseg.save_safetensors({"model.diffusion_model." + k: v for k, v in
                             ldmseg.to_compvis_unet_keys(sd_unet.state_dict(), sd_cfg).items()}, tmp_path / "sd.safetensors")
    out = tmp_path / "run"
    train.main(["--stage", "2", "--preset", "tiny", "--data", str(shapes), "--out-dir", str(out), "--num-workers", "0",
                "--preview-every", "0", "--device", "cpu", "--max-steps", "2", "--log-every", "2", "--stop-after", "1",
                "--image-vae", str(tmp_path / "sd"), "--mask-ae", str(root / "s1"), "--init-unet", str(tmp_path / "sd.safetensors")])
    assert "Stable Diffusion weights" in (out / "log.txt").read_text()
    train.main(["--resume", str(out), "--num-workers", "0", "--device", "cpu"])  # the time embedding frozen again
    ckpt = train.load_checkpoint(out, "2")
    model = ldmseg.load_ldmseg(ckpt, use_ema=False)
    assert torch.equal(model.image_ae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert torch.equal(model.unet.time_embedding.linear_1.weight, sd_unet.time_embedding.linear_1.weight)  # frozen
    assert not torch.equal(model.unet.conv_in.weight[:, :4], sd_unet.conv_in.weight)                     # trained
    assert model.config.image_ae.scale_factor == 0.18215


def test_prediction_signal_scale_and_time_shift_flags_reach_the_model_its_checkpoint_rebuilds(tiny_runs, tmp_path,
                                                                                              monkeypatch):
    import data
    import train
    root, shapes = tiny_runs
    orders, order_ids = [], data.order_ids
    monkeypatch.setattr(data, "order_ids", lambda ids, k, order, g=None: orders.append(order) or order_ids(ids, k, order, g))
    powers, area_weighted_mask = [], ldmseg.area_weighted_mask
    monkeypatch.setattr(ldmseg, "area_weighted_mask", lambda ids, h, w, p: powers.append(p) or area_weighted_mask(ids, h, w, p))
    metrics = train.main(["--stage", "2", "--prediction", "x0", "--signal-scale", "0.2", "--time-shift", "40",
                          "--id-order", "raster", "--decoded-ce-weight", "0.5", "--area-weight-power", "0.7",
                          "--attention-levels", "1,0", "--preset", "tiny", "--data", str(shapes),
                          "--image-vae", str(root / "vae"), "--mask-ae", str(root / "s1"), "--out-dir", str(tmp_path),
                          "--num-workers", "0", "--preview-every", "0", "--device", "cpu", "--max-steps", "2",
                          "--eval-images", "1", "--log-every", "2"])
    assert 0.0 <= metrics["pq_ddim3"] <= 1.0
    config = ldmseg.load_ldmseg(train.load_checkpoint(tmp_path / "ckpt.pt")).config
    assert config.prediction == "x0" and config.signal_scale == 0.2 and config.time_shift == 40
    assert config.id_order == "raster" and orders == ["raster", "raster"]      # the two training steps' targets
    assert config.decoded_ce_weight == 0.5 and "dce " in (tmp_path / "log.txt").read_text()
    assert config.area_weight_power == 0.7 and powers == [0.7, 0.7]      # the two training steps' loss weights
    assert config.unet.attention_levels == (True, False) != ldmseg.UNetConfig.preset("tiny").attention_levels
    with pytest.raises(SystemExit, match="this UNet has 2 levels"):
        train.attention_levels("1,1,1", ldmseg.UNetConfig.preset("tiny"))
    assert ldmseg.load_ldmseg(train.load_checkpoint(tmp_path / "ckpt.pt"), time_shift=0).config.time_shift == 0
    with pytest.raises(ValueError, match="time_shift"):
        ldmseg.LDMSegConfig(time_shift=1000)
    for bad in (["--stage", "2", "--prediction", "v"], ["--stage", "vae", "--prediction", "x0"],
                ["--stage", "1", "--signal-scale", "0.2"], ["--stage", "2", "--signal-scale", "-1"],
                ["--stage", "2", "--time-shift", "1000"], ["--stage", "1", "--time-shift", "5"],
                ["--stage", "2", "--id-order", "area"], ["--stage", "1", "--id-order", "raster"],
                ["--stage", "2", "--decoded-ce-weight", "-0.5"], ["--stage", "multitask", "--decoded-ce-weight", "1"],
                ["--stage", "2", "--area-weight-power", "-0.5"], ["--stage", "1", "--area-weight-power", "1"],
                ["--stage", "2", "--attention-levels", "1,yes"], ["--stage", "vae", "--attention-levels", "1,1"]):
        with pytest.raises(SystemExit, match="--prediction|--signal-scale|--time-shift|--id-order|--decoded-ce-weight"
                                             "|--area-weight-power|--attention-levels"):
            train.main(bad)


def test_a_preset_time_shift_is_dropped_when_the_output_type_changes(tiny_runs, tmp_path, monkeypatch):
    """The preset's shift was chosen for its own recipe (shapes: x0); --prediction eps must not
    inherit it (an eps output read at a later t fails, ldmseg.py section 8), unless asked for.
    Nor its clamping, which was measured with that shift."""
    import dataclasses
    import train
    root, shapes = tiny_runs
    preset = dataclasses.replace(ldmseg.LDMSegConfig.preset("tiny"), prediction="x0", time_shift=300, clamp_x0=True,
                                 decoded_ce_weight=0.1, area_weight_power=0.5, match_ids=True)
    monkeypatch.setattr(train.LDMSegStage, "base_config", lambda self: preset)
    common = ["--stage", "2", "--preset", "tiny", "--data", str(shapes), "--image-vae", str(root / "vae"),
              "--mask-ae", str(root / "s1"), "--num-workers", "0", "--preview-every", "0", "--device", "cpu",
              "--max-steps", "1", "--eval-images", "1", "--log-every", "1"]
    for extra, expected in ((["--prediction", "eps"], 0), ([], 300), (["--prediction", "eps", "--time-shift", "7"], 7)):
        out = tmp_path / str(expected)
        train.main(common + extra + ["--out-dir", str(out)])
        config = ldmseg.load_ldmseg(train.load_checkpoint(out / "ckpt.pt")).config
        assert config.time_shift == expected and config.clamp_x0 == (expected == 300)   # clamping goes with x0
        assert config.decoded_ce_weight == (0.1 if expected == 300 else 0.0)             # so does the decoded loss
        assert config.area_weight_power == (0.5 if expected == 300 else 0.0)             # and the loss weights
        assert config.match_ids == (expected == 300)                                     # and the renamed ids
    with pytest.raises(SystemExit, match="--decoded-ce-weight needs the x0"):
        train.main(common + ["--prediction", "eps", "--decoded-ce-weight", "0.1", "--out-dir", str(tmp_path / "e")])
    train.main(common + ["--id-order", "raster", "--out-dir", str(tmp_path / "r")])    # raster ids: nothing to rename
    assert not ldmseg.load_ldmseg(train.load_checkpoint(tmp_path / "r" / "ckpt.pt")).config.match_ids
    with pytest.raises(SystemExit, match="--match-ids on needs the x0 prediction and random ids"):
        train.main(common + ["--id-order", "raster", "--match-ids", "on", "--out-dir", str(tmp_path / "m")])


def test_match_ids_flag_renames_the_targets_of_every_training_step(tiny_runs, tmp_path, monkeypatch):
    import train
    root, shapes = tiny_runs
    calls, matched_ids = [], ldmseg.matched_ids
    monkeypatch.setattr(ldmseg, "matched_ids", lambda net, x0, ids: calls.append(ids.shape) or matched_ids(net, x0, ids))
    common = ["--stage", "2", "--preset", "tiny", "--data", str(shapes), "--image-vae", str(root / "vae"),
              "--mask-ae", str(root / "s1"), "--num-workers", "0", "--preview-every", "0", "--device", "cpu",
              "--max-steps", "2", "--eval-images", "1", "--log-every", "1", "--prediction", "x0"]
    train.main(common + ["--match-ids", "on", "--out-dir", str(tmp_path / "on")])
    assert ldmseg.load_ldmseg(train.load_checkpoint(tmp_path / "on" / "ckpt.pt")).config.match_ids
    assert len(calls) == 2 and calls[0][1:] == (32, 32)                   # (batch, 32, 32) ids, one call a step
    with pytest.raises(SystemExit, match="trained with another model"):
        train.main(common + ["--match-ids", "off", "--resume", str(tmp_path / "on"), "--out-dir", str(tmp_path / "on")])


def test_stage2_resume_keeps_its_own_autoencoders_whatever_the_flags_name(tiny_runs, tmp_path):
    """A resumed run is the run it was: a stage-1 run trained again since (another latent scale)
    must not reach it, and model flags that disagree with it are refused."""
    import train
    root, shapes = tiny_runs
    common = ["--preset", "tiny", "--data", str(shapes), "--num-workers", "0", "--preview-every", "0",
              "--device", "cpu", "--log-every", "1", "--eval-images", "1"]
    train.main(["--stage", "1", "--out-dir", str(tmp_path / "s1b"), "--max-steps", "2", "--seed", "5", *common])
    s2 = ["--stage", "2", "--image-vae", str(root / "vae"), "--out-dir", str(tmp_path / "s2"), "--max-steps", "2", *common]
    train.main(s2 + ["--mask-ae", str(root / "s1"), "--stop-after", "1"])
    first = train.load_checkpoint(tmp_path / "s2")
    train.main(s2 + ["--mask-ae", str(tmp_path / "s1b"), "--resume", str(tmp_path / "s2")])
    resumed = train.load_checkpoint(tmp_path / "s2")
    assert resumed["step"] == 2 and resumed["model_config"] == first["model_config"]
    assert train.load_checkpoint(tmp_path / "s1b")["model_config"] != first["model_config"]["mask_ae"]
    for name, w in first["model"].items():
        if name.startswith(("mask_ae.", "image_ae.")):
            assert torch.equal(resumed["model"][name], w), name
    with pytest.raises(SystemExit, match="another model.*--id-order raster here, random there"):
        train.main(s2 + ["--mask-ae", str(root / "s1"), "--id-order", "raster", "--resume", str(tmp_path / "s2")])
    with pytest.raises(SystemExit, match="another model.*--area-weight-power 0.5 here, 0.0 there"):
        train.main(s2 + ["--mask-ae", str(root / "s1"), "--area-weight-power", "0.5", "--resume", str(tmp_path / "s2")])


def test_latent_noise_flag_reaches_the_stage1_loss_and_its_checkpoint_and_a_resume_keeps_the_runs(
        tiny_runs, tmp_path, monkeypatch):
    """--latent-noise overrides the preset's for stage 1 and is saved with the model; a resumed run
    keeps its own value (a preset changed since does not reach it) and refuses another."""
    import train
    _, shapes = tiny_runs
    seen, forward = [], ldmseg.MaskAutoencoder.forward
    monkeypatch.setattr(ldmseg.MaskAutoencoder, "forward",
                        lambda self, *a, **k: seen.append(k["latent_noise"]) or forward(self, *a, **k))
    run = ["--stage", "1", "--preset", "tiny", "--data", str(shapes), "--num-workers", "0", "--preview-every", "0",
           "--device", "cpu", "--max-steps", "2", "--log-every", "1", "--out-dir", str(tmp_path / "s1")]
    train.main(run + ["--latent-noise", "0.3", "--stop-after", "1"])
    assert seen == [0.3] and train.load_checkpoint(tmp_path / "s1")["model_config"]["latent_noise"] == 0.3
    train.main(run + ["--resume", str(tmp_path / "s1")])                  # the tiny preset's 0 does not reach it
    assert seen == [0.3, 0.3] and train.load_checkpoint(tmp_path / "s1")["model_config"]["latent_noise"] == 0.3
    with pytest.raises(SystemExit, match="another model.*--latent-noise 0.0 here, 0.3 there"):
        train.main(run + ["--latent-noise", "0", "--resume", str(tmp_path / "s1")])
    for bad in (["--stage", "1", "--latent-noise", "-0.5"], ["--stage", "2", "--latent-noise", "0.1"],
                ["--stage", "all", "--latent-noise", "0.1"]):
        with pytest.raises(SystemExit, match="--latent-noise takes a scale >= 0 .* belongs to --stage 1"):
            train.main(bad)


def test_an_unfinished_prerequisite_run_is_resumed_not_trained_again(tiny_runs, tmp_path, monkeypatch):
    """Stage 2 needs stage 1; a stage-1 run stopped early (Ctrl-C, --stop-after) is continued from
    its checkpoint, and ends as the uninterrupted run does."""
    import train
    root, shapes = tiny_runs
    monkeypatch.chdir(tmp_path)                                  # the default run folders: runs/tiny/...
    common = ["--preset", "tiny", "--data", str(shapes), "--num-workers", "0", "--device", "cpu"]
    train.main(["--stage", "1", "--out-dir", "straight", *common])
    assert train.main(["--stage", "1", "--stop-after", "3", *common]) == {}
    train.main(["--stage", "2", "--image-vae", str(root / "vae"), "--max-steps", "1", "--eval-images", "1", *common])
    log = (tmp_path / "runs" / "tiny" / "stage1" / "log.txt").read_text()
    assert "resumed from" in log and "at step 3" in log
    a, b = train.load_checkpoint("straight"), train.load_checkpoint("runs/tiny/stage1")
    assert b["metrics"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_stage_all_trains_the_stage2_model_that_the_stages_in_turn_train(tiny_runs, tmp_path, monkeypatch):
    """Prerequisites trained on the way leave the global random state as they found it, so stage 2's
    initial weights (and everything after) do not depend on whether its autoencoders were on disk."""
    import train
    _, shapes = tiny_runs
    common = ["--preset", "tiny", "--data", str(shapes), "--num-workers", "0", "--device", "cpu"]
    (tmp_path / "all").mkdir()
    (tmp_path / "turn").mkdir()
    monkeypatch.chdir(tmp_path / "all")
    train.main(["--stage", "all", *common, "--eval-images", "1"])
    monkeypatch.chdir(tmp_path / "turn")
    for stage in ("vae", "1"):
        train.main(["--stage", stage, *common])                   # as --stage all trains them
    train.main(["--stage", "2", *common, "--eval-images", "1"])
    a = train.load_checkpoint(tmp_path / "all" / "runs" / "tiny" / "stage2")
    b = train.load_checkpoint(tmp_path / "turn" / "runs" / "tiny" / "stage2")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

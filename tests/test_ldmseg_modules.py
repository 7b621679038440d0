# SPDX-License-Identifier: MIT
"""Tests for ldmseg.py sections 1-7: the LDMSeg building blocks (mask AE, its losses, image AE, UNet).

CPU only, tiny sizes, deterministic. Paper-sized models are built on the meta device (no memory, no
time) to check their parameter counts and names against the published models.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from data import ids_to_bits
from ldmseg import (
    ImageAEConfig,
    ImageAutoencoder,
    LayerNorm2d,
    MaskAEConfig,
    MaskAutoencoder,
    UNet,
    UNetConfig,
    attention,
    kl_to_standard_normal,
    mask_ae_loss,
    point_sample,
    sample_gaussian,
    sample_uncertain_points,
    set_attention_backend,
    timestep_embedding,
    uncertainty_top2,
    vae_loss,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these tiny models on one thread: at these sizes OpenMP's synchronisation costs more than
    it saves, and on a busy 2-core machine it can make a step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_ids(batch: int, size: int, seed: int, num_ids: int) -> torch.Tensor:
    """(B, size, size) int64 maps of 4x4 blocks of random ids in 0..num_ids-1 (0 = void)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_ids, (batch, size // 4, size // 4), generator=g)
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)


# -----------------------------------------------------------------------------
# Shape contracts at the `tiny` presets
# -----------------------------------------------------------------------------

def test_tiny_mask_autoencoder_maps_bits_to_latent_and_half_resolution_logits():
    cfg = MaskAEConfig.preset("tiny")
    model = MaskAutoencoder(cfg)
    bits = ids_to_bits(block_ids(2, 32, 0, 2 ** cfg.num_bits), cfg.num_bits)   # (2, K, 32, 32)
    mean, logvar = model.encode(bits)
    assert mean.shape == logvar.shape == (2, cfg.latent_channels, 4, 4)
    assert model.decode(mean).shape == (2, cfg.num_classes, 16, 16)
    assert model.decode_full(mean).shape == (2, cfg.num_classes, 32, 32)
    assert model.decode_full(mean, size=(30, 20)).shape == (2, cfg.num_classes, 30, 20)
    logits, mean2, logvar2 = model(bits, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, cfg.num_classes, 16, 16)
    assert torch.equal(mean2, mean) and torch.equal(logvar2, logvar)
    assert model.downsample_factor == 8 and model.logit_stride == 2


def test_mask_autoencoder_logvar_is_clamped_to_minus30_plus20():
    model = MaskAutoencoder(MaskAEConfig.preset("tiny"))
    with torch.no_grad():
        model.encoder[-1].bias.fill_(1e4)                     # huge moments: logvar would be 1e4
        _, logvar = model.encode(torch.zeros(1, 4, 16, 16))
        assert logvar.max().item() == 20.0
        model.encoder[-1].bias.fill_(-1e4)
        _, logvar = model.encode(torch.zeros(1, 4, 16, 16))
        assert logvar.min().item() == -30.0


def test_latent_noise_is_off_by_default_and_relative_to_the_latents_std_in_training(monkeypatch):
    """latent_noise = c decodes z = mean + c * std(mean) * eps, eps from the generator; 0 decodes the
    mean and draws nothing. The shapes preset trains with c = 0.1, the paper's coco model without."""
    assert MaskAEConfig.preset("shapes").latent_noise == 0.1 and MaskAEConfig.preset("coco").latent_noise == 0.0
    with pytest.raises(ValueError, match="latent_noise"):
        MaskAEConfig(latent_noise=-0.1)
    model = MaskAutoencoder(MaskAEConfig.preset("tiny"))
    decoded, decode = [], model.decode
    monkeypatch.setattr(model, "decode", lambda z: decoded.append(z) or decode(z))
    bits = ids_to_bits(block_ids(4, 64, 0, 16), 4)                     # (4, 4, 64, 64): 4 x 4 x 8 x 8 latents
    g = torch.Generator().manual_seed(0)
    _, mean, _ = model(bits, generator=g, sample_posterior=False)
    assert torch.equal(decoded[-1], mean) and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    for seed in (0, 0, 1):
        model(bits, generator=torch.Generator().manual_seed(seed), sample_posterior=False, latent_noise=0.5)
    noise = (decoded[1] - mean) / (0.5 * mean.std())
    assert torch.equal(decoded[1], decoded[2]) and not torch.equal(decoded[1], decoded[3])
    assert abs(noise.std().item() - 1) < 0.1 and abs(noise.mean().item()) < 0.1   # N(0, 1) over 1,024 cells
    expected = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noise, expected, atol=1e-4)                 # the generator's draw, nothing else


def test_decode_full_is_bilinear_upsampling_of_the_half_resolution_logits():
    model = MaskAutoencoder(MaskAEConfig.preset("tiny"))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(model.decode(z), scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(model.decode_full(z), expected)


def test_tiny_image_autoencoder_is_f8_with_4_latent_channels():
    model = ImageAutoencoder(ImageAEConfig.preset("tiny"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert torch.equal(model.encode_mean(x), mean)
    assert model.decode(mean).shape == (2, 3, 32, 32)
    recon, _, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape


def test_shapes_image_autoencoder_preset_is_f8_with_4_latent_channels():
    cfg = ImageAEConfig.preset("shapes")
    assert 2 ** (len(cfg.ch_mult) - 1) == 8 and cfg.latent_channels == 4


@pytest.mark.parametrize("t", [torch.tensor([0, 999]), torch.tensor([0.5, 998.25]), torch.tensor(7)])
def test_tiny_unet_predicts_a_tensor_shaped_like_the_latent(t):
    cfg = UNetConfig.preset("tiny")
    model = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, 8, 8)
    assert model(x, t).shape == (2, cfg.out_channels, 8, 8)


def test_unet_handles_odd_latent_sizes_and_cross_attention_context():
    cfg = dataclasses.replace(UNetConfig.preset("tiny"), context_dim=6, attention_levels=(True, True))
    model = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, 5, 7)                # 5x7 -> 3x4 -> back to 5x7
    context = torch.randn(2, 3, 6)
    assert model(x, torch.tensor([1, 2]), context).shape == (2, cfg.out_channels, 5, 7)
    with pytest.raises(ValueError, match="context"):
        model(x, torch.tensor([1, 2]))


def test_unet_without_cross_attention_has_no_attn2_or_norm2():
    names = [n for n, _ in UNet(UNetConfig.preset("tiny")).named_parameters()]
    assert not any(".attn2." in n or "transformer_blocks.0.norm2." in n for n in names)
    assert any("transformer_blocks.0.attn1." in n for n in names)


# -----------------------------------------------------------------------------
# Parameter counts and names of the paper-sized models (meta device: no memory, milliseconds)
# -----------------------------------------------------------------------------

def test_coco_mask_autoencoder_has_the_papers_2_023_208_parameters():
    with torch.device("meta"):
        model = MaskAutoencoder(MaskAEConfig.preset("coco"))
    assert num_params(model.encoder) == 1_192_360
    assert num_params(model.decoder) == 830_848
    assert num_params(model) == 2_023_208


def test_coco_mask_autoencoder_names_follow_the_official_sequential_layout():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MaskAutoencoder(MaskAEConfig.preset("coco")).state_dict().items()}
    assert shapes["encoder.0.weight"] == (32, 7, 3, 3)
    assert shapes["encoder.9.weight"] == (256, 128, 3, 3)     # last stride-2 conv
    assert shapes["encoder.13.weight"] == (256,)              # GroupNorm after the Identity mid block
    assert shapes["encoder.15.weight"] == (8, 256, 3, 3)      # mean | logvar
    assert shapes["decoder.2.weight"] == (256, 256, 2, 2)     # ConvTranspose
    assert shapes["decoder.3.weight"] == (256,)               # LayerNorm2d
    assert shapes["decoder.10.weight"] == (128, 256, 3, 3)    # 2^7 id logits


def test_mask_autoencoder_mid_blocks_take_the_placeholders_names_as_in_the_official_code():
    cfg = dataclasses.replace(MaskAEConfig.preset("tiny"), num_mid_blocks=2)
    model = MaskAutoencoder(cfg)
    names = {k.split(".resnets")[0] for k in model.state_dict() if ".resnets." in k}
    assert names == {"encoder.12", "encoder.13", "decoder.1"}    # QUIRK: the decoder builds one
    assert model.state_dict()["encoder.16.weight"].shape[0] == 2 * cfg.latent_channels
    bits = torch.randn(2, cfg.num_bits, 32, 32).sign()
    mean, logvar = model.encode(bits)
    assert mean.shape == logvar.shape == (2, cfg.latent_channels, 4, 4)
    assert model.decode(mean).shape == (2, cfg.num_classes, 16, 16)


def test_coco_image_autoencoder_has_stable_diffusions_83_653_863_parameters():
    with torch.device("meta"):
        model = ImageAutoencoder(ImageAEConfig.preset("coco"))
    assert num_params(model) == 83_653_863


def test_coco_image_autoencoder_uses_the_compvis_parameter_names():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ImageAutoencoder(ImageAEConfig.preset("coco")).state_dict().items()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.norm2.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert "decoder.up.0.upsample.conv.weight" not in shapes


def test_sd1_unet_with_768_cross_attention_has_859_520_964_parameters():
    cfg = dataclasses.replace(UNetConfig.preset("coco"), in_channels=4, context_dim=768)
    with torch.device("meta"):
        model = UNet(cfg)
    assert num_params(model) == 859_520_964


def test_coco_unet_uses_diffusers_parameter_names():
    cfg = dataclasses.replace(UNetConfig.preset("coco"), context_dim=768)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    a = "down_blocks.0.attentions.1.transformer_blocks.0."
    expected = {
        "conv_in.weight": (320, 12, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "time_embedding.linear_2.weight": (1280, 1280),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
        "down_blocks.0.resnets.1.time_emb_proj.weight": (320, 1280),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        a + "attn1.to_q.weight": (320, 320),
        a + "attn2.to_k.weight": (320, 768),
        a + "attn2.to_out.0.bias": (320,),
        a + "ff.net.0.proj.weight": (2560, 320),
        a + "ff.net.2.weight": (320, 1280),
        a + "norm3.weight": (320,),
        "down_blocks.2.downsamplers.0.conv.weight": (1280, 1280, 3, 3),
        "mid_block.attentions.0.proj_out.weight": (1280, 1280, 1, 1),
        "mid_block.resnets.1.conv2.weight": (1280, 1280, 3, 3),
        "up_blocks.0.resnets.0.conv1.weight": (1280, 2560, 3, 3),
        "up_blocks.3.resnets.2.conv_shortcut.weight": (320, 640, 1, 1),
        "up_blocks.1.attentions.2.proj_out.weight": (1280, 1280, 1, 1),
        "up_blocks.2.upsamplers.0.conv.weight": (640, 640, 3, 3),
        "conv_norm_out.weight": (320,),
        "conv_out.weight": (4, 320, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert not any(k.startswith("down_blocks.3.attentions") or k.startswith("up_blocks.0.attentions") for k in shapes)


# -----------------------------------------------------------------------------
# Shared layers
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(5, 5), (6, 3)])
def test_sdpa_equals_the_explicit_softmax_attention(nq, nk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (nq, nk, nk))
    assert torch.allclose(attention(q, k, v, use_sdpa=True), attention(q, k, v, use_sdpa=False), atol=1e-6)


def test_unet_and_image_autoencoder_agree_between_sdpa_and_reference_attention():
    torch.manual_seed(0)
    cfg = dataclasses.replace(UNetConfig.preset("tiny"), context_dim=6)
    unet, vae = UNet(cfg), ImageAutoencoder(ImageAEConfig.preset("tiny"))
    x, t, ctx = torch.randn(2, cfg.in_channels, 4, 4), torch.tensor([5, 600]), torch.randn(2, 3, 6)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        set_attention_backend(unet, True), set_attention_backend(vae, True)
        fast = unet(x, t, ctx), vae.encode_mean(img)
        set_attention_backend(unet, False), set_attention_backend(vae, False)
        plain = unet(x, t, ctx), vae.encode_mean(img)
    for a, b in zip(fast, plain):
        assert torch.allclose(a, b, atol=1e-5)


def test_layernorm2d_normalises_each_pixel_over_its_channels():
    x = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(6.0)), ln.bias.copy_(torch.ones(6))
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(ln(x), expected, atol=1e-5)


def test_timestep_embedding_is_cosine_first_with_frequencies_down_to_1e_minus_4():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)     # half = 4: f = 1, 0.1, 0.01, 0.001
    assert torch.allclose(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.tensor([1.0, 0.1, 0.01, 0.001])
    assert torch.allclose(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]), atol=1e-6)


def test_posterior_sample_is_reproducible_from_the_generator_and_has_the_posterior_std():
    mean, logvar = torch.full((4000, 1, 1, 1), 2.0), torch.full((4000, 1, 1, 1), math.log(0.25))
    a = sample_gaussian(mean, logvar, torch.Generator().manual_seed(3))
    b = sample_gaussian(mean, logvar, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 2.0) < 0.05 and abs(a.std().item() - 0.5) < 0.03


def test_kl_to_standard_normal_is_zero_at_the_prior_and_matches_the_closed_form():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.allclose(kl_to_standard_normal(zeros, zeros), torch.zeros(2))
    mean, logvar = torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), math.log(2.0))
    assert torch.allclose(kl_to_standard_normal(mean, logvar), torch.tensor([0.5 * (1 + 2 - 1 - math.log(2))]))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = UNetConfig.preset("tiny")
    plain = UNet(cfg)
    ckpt = UNet(dataclasses.replace(cfg, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, cfg.in_channels, 4, 4), torch.tensor([3, 900])
    for model in (plain, ckpt):
        model(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


# -----------------------------------------------------------------------------
# Point sampling and the mask AE losses
# -----------------------------------------------------------------------------

def test_point_sample_reads_pixel_centres_exactly():
    values = torch.arange(12.0).view(1, 1, 3, 4)            # (N, C, H, W)
    # (x, y) of the centres of pixels (row 0, col 0), (row 2, col 3), (row 1, col 2)
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [2.5 / 4, 1.5 / 3]]])
    for mode in ("bilinear", "nearest"):
        assert torch.allclose(point_sample(values, coords, mode), torch.tensor([[[0.0, 11.0, 6.0]]]), atol=1e-5)


@pytest.mark.parametrize("importance_ratio", [0.0, 0.75, 1.0])
def test_point_sampler_draws_the_configured_numbers_of_importance_and_random_points(importance_ratio):
    # Left half (x < 0.5): two tied top logits -> uncertainty 0 (maximal). Right half: a clear winner.
    logits = torch.zeros(2, 4, 16, 16)
    logits[:, 1, :, :8] = logits[:, 2, :, :8] = 5.0
    logits[:, 3, :, 8:] = 10.0
    P = 200
    coords = sample_uncertain_points(logits, uncertainty_top2, P, 3, importance_ratio,
                                     torch.Generator().manual_seed(0))
    n_imp = int(importance_ratio * P)
    assert coords.shape == (2, P, 2)
    assert (coords >= 0).all() and (coords < 1).all()
    assert (coords[:, :n_imp, 0] < 0.5).all()               # every importance point is an uncertain one
    if n_imp < P:                                           # the uniform rest also lands on the right
        right = (coords[:, n_imp:, 0] > 0.5).float().mean().item()
        assert 0.3 < right < 0.7


def test_point_sampler_is_reproducible_from_the_generator():
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = sample_uncertain_points(logits, uncertainty_top2, 20, 3, 0.75, torch.Generator().manual_seed(5))
    b = sample_uncertain_points(logits, uncertainty_top2, 20, 3, 0.75, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mask_ae_loss_of_a_confident_correct_prediction_is_near_zero():
    cfg = MaskAEConfig.preset("tiny")
    ids = torch.full((2, 32, 32), 5)                        # one segment, no borders to be unsure about
    logits = 40.0 * F.one_hot(torch.full((2, 16, 16), 5), cfg.num_classes).permute(0, 3, 1, 2).float() - 20.0
    losses = mask_ae_loss(logits, ids, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), cfg,
                          torch.Generator().manual_seed(0))
    assert losses["ce"] < 1e-3 and losses["bce"] < 1e-3 and losses["dice"] < 1e-3 and losses["kl"] == 0


def test_mask_ae_loss_of_a_wrong_prediction_is_large():
    cfg = MaskAEConfig.preset("tiny")
    ids = torch.full((2, 32, 32), 5)
    logits = 40.0 * F.one_hot(torch.full((2, 16, 16), 6), cfg.num_classes).permute(0, 3, 1, 2).float() - 20.0
    losses = mask_ae_loss(logits, ids, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), cfg,
                          torch.Generator().manual_seed(0))
    assert losses["ce"] > 5 and losses["bce"] > 5 and losses["dice"] > 0.9


def test_mask_ae_loss_ignores_void_pixels():
    cfg = MaskAEConfig.preset("tiny")
    logits = torch.randn(2, cfg.num_classes, 16, 16, requires_grad=True)
    losses = mask_ae_loss(logits, torch.zeros(2, 32, 32, dtype=torch.long), torch.zeros(2, 4, 4, 4),
                          torch.zeros(2, 4, 4, 4), cfg, torch.Generator().manual_seed(0))
    assert losses["loss"].item() == 0.0                      # all void: nothing to learn, and no NaN
    losses["loss"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mask_ae_loss_total_is_the_weighted_sum_of_its_terms():
    cfg = dataclasses.replace(MaskAEConfig.preset("tiny"), ce_weight=2.0, mask_weight=0.5, kl_weight=0.1)
    g = torch.Generator().manual_seed(0)
    logits, mean, logvar = (torch.randn(2, c, s, s, generator=g) for c, s in ((16, 16), (4, 4), (4, 4)))
    losses = mask_ae_loss(logits, block_ids(2, 32, 1, 16), mean, logvar, cfg, torch.Generator().manual_seed(0))
    expected = 2.0 * losses["ce"] + 0.5 * (losses["bce"] + losses["dice"]) + 0.1 * losses["kl"]
    assert torch.allclose(losses["loss"], expected)
    assert losses["kl"] > 0


# -----------------------------------------------------------------------------
# Learning: overfit one batch
# -----------------------------------------------------------------------------

def test_mask_autoencoder_overfits_one_batch():
    torch.manual_seed(0)
    cfg = MaskAEConfig.preset("tiny")
    model = MaskAutoencoder(cfg)
    ids = block_ids(2, 32, 0, 6)                             # up to 5 segments + void
    bits = ids_to_bits(ids, cfg.num_bits)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(60):
        logits, mean, logvar = model(bits, generator=g)
        loss = mask_ae_loss(logits, ids, mean, logvar, cfg, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history


def test_image_autoencoder_overfits_one_batch():
    torch.manual_seed(0)
    cfg = ImageAEConfig.preset("tiny")
    model = ImageAutoencoder(cfg)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = F.avg_pool2d(x, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)   # 4x4 colour blocks
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        recon, mean, logvar = model(x, generator=g)
        loss = vae_loss(recon, x, mean, logvar, cfg.kl_weight)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history


# -----------------------------------------------------------------------------
# Configs
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MaskAEConfig, ImageAEConfig, UNetConfig])
@pytest.mark.parametrize("name", ["tiny", "shapes", "coco"])
def test_config_round_trips_through_a_plain_dict_and_json(cls, name):
    config = cls.preset(name)
    d = dataclasses.asdict(config)
    assert cls(**d) == config
    assert cls(**json.loads(json.dumps(d))) == config        # JSON turns tuples into lists


def test_unknown_preset_names_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        UNetConfig.preset("imagenet")


def test_coco_presets_hold_the_papers_values():
    mask, image, unet = MaskAEConfig.preset("coco"), ImageAEConfig.preset("coco"), UNetConfig.preset("coco")
    assert (mask.num_bits, mask.num_classes, mask.num_points, mask.oversample_ratio) == (7, 128, 12544, 3)
    assert (mask.importance_ratio, mask.kl_weight, mask.scale_factor) == (0.75, 0.0, 0.18215)
    assert image.scale_factor == 0.18215
    assert (unet.in_channels, unet.context_dim, unet.block_out_channels) == (12, None, (320, 640, 1280, 1280))

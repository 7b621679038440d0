# SPDX-License-Identifier: MIT
"""Tests for cogen.py §5 (the image stream T2IUViT and the two-stream PDM) and the U-ViT key map of §9.

Tiny models on synthetic data; the `coco` models only on the meta device. U-ViT's checkpoint layout
is written out here from its libs/uvit_t2i.py, independently of cogen, and filled with random values.
"""
import dataclasses
import json

import pytest
import torch

import cogen

from test_cogen import CAPTIONS, random_inputs, tiny_config   # the tiny PDM config, captions, inputs


def latents(cfg: cogen.PDMConfig, B: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)


def pretrained_t2i(cfg: cogen.PDMConfig, steps: int = 3) -> cogen.T2IUViT:
    """A tiny T2I U-ViT after a few optimiser steps, so no weight is still at its initial value."""
    torch.manual_seed(0)
    model = cogen.build_model(dataclasses.replace(cfg, arch="t2i"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x0, text = latents(cfg), model.tokenize(CAPTIONS + [""])
    for k in range(steps):
        loss = cogen.t2i_loss(model, x0, text, model.schedule, cfg, torch.Generator().manual_seed(k))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_two_stream(**overrides) -> tuple[cogen.TwoStreamPDM, cogen.T2IUViT]:
    cfg = tiny_config(**overrides)
    t2i = pretrained_t2i(cfg)
    return cogen.two_stream_from_t2i(t2i.state_dict(), cfg), t2i


def map_stream_pairs(model: cogen.TwoStreamPDM):
    """(image-stream parameter, map-stream parameter) pairs of the copied blocks, by name."""
    s = model.image_stream
    for src, dst in [(s.in_blocks, model.in_blocks_map), (s.mid_block, model.mid_block_map),
                     (s.out_blocks, model.out_blocks_map)]:
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            yield p, dst_params[name]


def official_uvit_shapes(D: int, depth: int, C: int, p: int, D_txt: int, L: int, N: int) -> dict[str, tuple]:
    """State-dict names and shapes of U-ViT's libs/uvit_t2i.py UViT(qkv_bias=False, mlp_time_embed=False, conv=True)."""
    shapes = {"pos_embed": (1, 1 + L + N, D), "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,),
              "context_embed.weight": (D, D_txt), "context_embed.bias": (D,)}

    def block(prefix: str, skip: bool) -> None:
        shapes.update({f"{prefix}.norm1.weight": (D,), f"{prefix}.norm1.bias": (D,),
                       f"{prefix}.attn.qkv.weight": (3 * D, D),
                       f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
                       f"{prefix}.norm2.weight": (D,), f"{prefix}.norm2.bias": (D,),
                       f"{prefix}.mlp.fc1.weight": (4 * D, D), f"{prefix}.mlp.fc1.bias": (4 * D,),
                       f"{prefix}.mlp.fc2.weight": (D, 4 * D), f"{prefix}.mlp.fc2.bias": (D,)})
        if skip:
            shapes.update({f"{prefix}.skip_linear.weight": (D, 2 * D), f"{prefix}.skip_linear.bias": (D,)})
    for i in range(depth // 2):
        block(f"in_blocks.{i}", False)
    block("mid_block", False)
    for i in range(depth // 2):
        block(f"out_blocks.{i}", True)
    shapes.update({"norm.weight": (D,), "norm.bias": (D,), "decoder_pred.weight": (p * p * C, D),
                   "decoder_pred.bias": (p * p * C,), "final_layer.weight": (C, C, 3, 3), "final_layer.bias": (C,)})
    return shapes


def uvit_context_config() -> cogen.PDMConfig:
    """Tiny sizes in U-ViT's setting: precomputed text features, U-ViT's n = t + 1."""
    return dataclasses.replace(cogen.PDMConfig.preset("tiny"), text_encoder="context", context_dim=24, time_offset=1)


def official_uvit_state(cfg: cogen.PDMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = official_uvit_shapes(cfg.dim, cfg.depth, cfg.latent_channels, cfg.patch_size, cfg.context_dim,
                                  cfg.num_text_tokens, cfg.num_patches)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


# ----------------------------------------------------------------------------- the image stream alone

def test_overfitting_one_batch_lowers_the_t2i_loss():
    cfg = tiny_config(arch="t2i")
    torch.manual_seed(0)
    model = cogen.build_model(cfg)
    x0, text = latents(cfg), model.tokenize(CAPTIONS + [""])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):                       # same t, noise and dropout every step: one fixed batch
        out = cogen.t2i_loss(model, x0, text, model.schedule, cfg, torch.Generator().manual_seed(1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "image"}
    assert losses[-1] < 0.5 * losses[0]


def test_t2i_text_guidance_is_the_samplers_classifier_free_guidance():
    cfg = tiny_config()
    model = pretrained_t2i(cfg)
    x_t, _, t = random_inputs(cfg)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        cond = model(x_t, t, text)
        uncond = model(x_t, t, text, drop_text=torch.ones(3, dtype=torch.bool))
        assert torch.equal(cogen.text_guided_eps(model, text, 1.0)(x_t, t), cond)
        torch.testing.assert_close(cogen.text_guided_eps(model, text, 3.0)(x_t, t), uncond + 3.0 * (cond - uncond))


@pytest.mark.parametrize("sampler", ["dpm++", "ddim"])
def test_generate_images_samples_the_t2i_model_reproducibly(sampler):
    cfg = tiny_config()
    model = pretrained_t2i(cfg)
    a = cogen.generate_images(model, CAPTIONS, sampler=sampler, steps=3, text_scale=2.0,
                              generator=torch.Generator().manual_seed(5))
    b = cogen.generate_images(model, CAPTIONS, sampler=sampler, steps=3, text_scale=2.0,
                              generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, cfg.latent_channels, cfg.latent_size, cfg.latent_size) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.isfinite(a).all()


# ----------------------------------------------------------------------------- the two-stream model at start

@pytest.mark.parametrize("map_stream_init", ["copy", "random"])
def test_two_stream_image_prediction_equals_the_pretrained_t2i_model_at_initialisation(map_stream_init):
    model, t2i = tiny_two_stream(map_stream_init=map_stream_init)
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    drop = torch.tensor([True, False, False])
    with torch.no_grad():
        assert torch.equal(model(x_t, m_t, t, text)[0], t2i(x_t, t, text))
        assert torch.equal(model(x_t, m_t, t, text, drop_text=drop, drop_map=drop.roll(1))[0],
                           t2i(x_t, t, text, drop_text=drop))
        eps, m0 = model(x_t, m_t, t, text)
    assert m0.shape == m_t.shape and m0.abs().max() < 1                       # tanh head
    assert eps.shape == x_t.shape


def test_zero_convs_are_zero_initialised_one_per_block():
    model, _ = tiny_two_stream()
    assert len(model.zero_convs) == model.config.depth + 1                    # 6 in + mid + 6 out for coco
    for zero_conv in model.zero_convs:
        assert zero_conv.weight.shape == (model.config.dim, model.config.dim)
        assert not zero_conv.weight.any() and not zero_conv.bias.any()


def test_map_stream_starts_as_a_copy_of_the_image_blocks():
    model, t2i = tiny_two_stream()
    pairs = list(map_stream_pairs(model))
    assert len(pairs) == len(list(t2i.in_blocks.parameters())) + len(list(t2i.mid_block.parameters())) + \
        len(list(t2i.out_blocks.parameters()))
    for image_p, map_p in pairs:
        assert torch.equal(image_p, map_p)                                    # the pretrained values
        assert image_p.data_ptr() != map_p.data_ptr()                         # copied, not shared
        assert map_p.requires_grad and not image_p.requires_grad
    for name, p in t2i.named_parameters():                                    # the image stream is the T2I model
        assert torch.equal(model.image_stream.get_parameter(name), p)
    random, _ = tiny_two_stream(map_stream_init="random")
    assert not any(torch.equal(a, b) for a, b in map_stream_pairs(random) if a.dim() == 2)


# ----------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("train_image_head", [False, True])
def test_frozen_parameters_get_no_update_from_an_optimizer_step_on_pdm_loss(train_image_head):
    model, _ = tiny_two_stream(train_image_head=train_image_head)
    cfg = model.config
    head = {"pos_embed", "norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias",
            "final_layer.weight", "final_layer.bias"}
    frozen = {f"image_stream.{n}" for n, _ in model.image_stream.named_parameters()
              if not (train_image_head and n in head)}
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():                                  # flags, method and rule agree
        assert (name in frozen) == (not p.requires_grad) == (id(p) not in trainable), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # AdamW with weight decay over *all* parameters: frozen ones have no gradient, so even decay skips them.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    m0 = cogen.encode_map(torch.randint(0, 10, (4, 32, 32), generator=g), cfg)
    loss = cogen.pdm_loss(model.train(), latents(cfg), m0, model.tokenize(CAPTIONS + [""]), model.schedule, cfg, g)
    opt.zero_grad()
    loss["loss"].backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, before[name]), name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(f"zero_convs.{i}.weight" in changed for i in range(cfg.depth + 1))
    assert "in_blocks_map.0.attn.qkv.weight" in changed and "decoder_pred_map.weight" in changed
    assert ("image_stream.decoder_pred.weight" in changed) == train_image_head


# ----------------------------------------------------------------------------- loss, sampling, loading

def test_pdm_loss_and_generate_run_on_a_tiny_two_stream_model():
    model, _ = tiny_two_stream()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    m0 = cogen.encode_map(torch.randint(0, 10, (4, 32, 32), generator=g), cfg)
    out = cogen.pdm_loss(model, latents(cfg), m0, model.tokenize(CAPTIONS + [""]), model.schedule, cfg, g)
    assert set(out) == {"loss", "image", "map"} and torch.isfinite(out["loss"])
    for sampler in ("dpm++", "ddim"):
        a = cogen.generate(model, CAPTIONS, sampler=sampler, steps=3, text_scale=2.0, map_scale=1.5,
                           generator=torch.Generator().manual_seed(5))
        b = cogen.generate(model, CAPTIONS, sampler=sampler, steps=3, text_scale=2.0, map_scale=1.5,
                           generator=torch.Generator().manual_seed(5))
        assert a[0].shape == (3, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        assert a[1].shape == (3, cfg.num_map_bits, cfg.map_size, cfg.map_size)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    given = cogen.encode_map(torch.randint(0, 10, (3, 32, 32), generator=g), cfg)
    assert torch.equal(cogen.generate(model, CAPTIONS, steps=2, given_map=given)[1], given)


def test_load_pdm_rebuilds_a_two_stream_model_from_a_checkpoint_dict():
    model, _ = tiny_two_stream()
    cfg = model.config
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    m0 = cogen.encode_map(torch.randint(0, 10, (4, 32, 32), generator=g), cfg)
    cogen.pdm_loss(model, latents(cfg), m0, model.tokenize(CAPTIONS + [""]), model.schedule, cfg, g)["loss"].backward()
    opt.step()                                                                # zero-convs no longer zero
    ckpt = {"model_config": json.loads(json.dumps(dataclasses.asdict(cfg))), "model": model.state_dict(), "ema": None}
    again = cogen.load_pdm(ckpt)
    assert isinstance(again, cogen.TwoStreamPDM) and again.config == cfg
    assert not any(p.requires_grad for p in again.image_stream.parameters())
    x_t, m_t, t = random_inputs(cfg)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        for a, b in zip(model.eval()(x_t, m_t, t, text), again(x_t, m_t, t, text)):
            assert torch.equal(a, b)


def test_coco_two_stream_parameter_count_reconciles_with_the_brief():
    cfg = dataclasses.replace(cogen.PDMConfig.preset("coco"), arch="two_stream")
    with torch.device("meta"):
        model = cogen.build_model(cfg)
    n, D = cogen.num_parameters(model), cfg.dim
    assert cogen.num_parameters(model.image_stream) == 44_692_644           # U-ViT-S/2 t2i [brief Appendix A]
    assert n - sum(p.numel() for p in model.trainable_parameters()) == 44_692_644   # all of it frozen
    assert n == 92_481_388
    # The code allocates 13 more zero-convs it never uses and an unused map embedding Conv2d(8, 512, 4, 4);
    # it has no map-stream LayerNorm. With those: the brief's 95.96 M (f = 2).
    unused_zero_convs, mask_embed_0, norm_map = 13 * (D * D + D), 8 * D * 4 * 4 + D, 2 * D
    assert n + unused_zero_convs + mask_embed_0 - norm_map == 95_960_940


# ----------------------------------------------------------------------------- U-ViT's checkpoint layout

def test_uvit_checkpoint_loads_into_the_image_stream_and_round_trips():
    cfg = uvit_context_config()
    official = official_uvit_state(cfg)
    empty = torch.randn(cfg.num_text_tokens, cfg.context_dim)
    ddp = {f"module.{k}": v for k, v in official.items()}                    # a DDP-saved copy reads the same
    state = cogen.uvit_to_t2i_state_dict(ddp, cfg, empty_context=empty)
    model = cogen.T2IUViT(cfg)
    model.load_state_dict(state)                                              # strict
    for name, value in official.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.empty_text[0], empty)
    back = cogen.t2i_to_uvit_state_dict(model.state_dict())
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    two = cogen.two_stream_from_t2i(state, cfg)                               # and the two-stream model on it
    assert all(torch.equal(a, b) for a, b in map_stream_pairs(two))
    assert torch.equal(two.image_stream.pos_embed, official["pos_embed"])


def test_coco_preset_fits_the_released_u_vit_s_layout():
    cfg = dataclasses.replace(cogen.PDMConfig.preset("coco"), time_offset=1)
    with torch.device("meta"):                                                # shapes only
        official = {k: torch.empty(s) for k, s in official_uvit_shapes(512, 12, 4, 2, 768, 77, 256).items()}
        state = cogen.uvit_to_t2i_state_dict(official, cfg)
    assert official["pos_embed"].shape == (1, 334, 512)
    assert sum(v.numel() for v in official.values()) == 44_692_644
    assert state.keys() == official.keys() | {"empty_text"}


def test_uvit_mapping_names_every_missing_unexpected_and_misshaped_key():
    cfg = uvit_context_config()
    official = official_uvit_state(cfg)
    official["in_blocks.0.attn.to_qkv.weight"] = official.pop("in_blocks.0.attn.qkv.weight")
    official["pos_embed"] = torch.zeros(1, 1 + cfg.num_text_tokens + 2 * cfg.num_patches, cfg.dim)   # one-stream length
    official["time_embed.0.weight"] = torch.zeros(4 * cfg.dim, cfg.dim)      # mlp_time_embed=True
    with pytest.raises(ValueError) as err:
        cogen.uvit_to_t2i_state_dict(official, cfg)
    message = str(err.value)
    assert "missing (1): in_blocks.0.attn.qkv.weight" in message
    assert "unexpected (2): in_blocks.0.attn.to_qkv.weight, time_embed.0.weight" in message
    assert "mis-shaped (1): pos_embed (1, 41, 32) (model: (1, 25, 32))" in message
    with pytest.raises(ValueError, match="time_offset=1"):
        cogen.uvit_to_t2i_state_dict(official_uvit_state(cfg), dataclasses.replace(cfg, time_offset=0))
    with pytest.raises(ValueError, match="text_encoder='context'"):
        cogen.uvit_to_t2i_state_dict(official_uvit_state(cfg), tiny_config(time_offset=1))


def test_time_offset_shifts_the_time_token_by_one_step():
    cfg = uvit_context_config()
    torch.manual_seed(0)
    shifted = cogen.T2IUViT(cfg).eval()
    plain = cogen.T2IUViT(dataclasses.replace(cfg, time_offset=0)).eval()
    plain.load_state_dict(shifted.state_dict())
    x_t, _, t = random_inputs(cfg)
    text = torch.randn(3, cfg.num_text_tokens, cfg.context_dim)
    with torch.no_grad():
        assert torch.equal(shifted(x_t, t, text), plain(x_t, t + 1, text))   # U-ViT's n = t + 1

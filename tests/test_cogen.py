# SPDX-License-Identifier: MIT
"""Tests for cogen.py (PDM): U-ViT pieces, Multi-Scale Patching, maps, text, loss, guidance, sampling,
and the evaluation helpers. Tiny models on synthetic data; the `coco` model only on the meta device.
"""
import dataclasses
import json
import random
from collections import deque

import pytest
import torch

import cogen
import data
import sample
from ldmseg import set_attention_backend

CAPTIONS = ["two red circles and an orange square on grass under a sky",
            "a blue hexagon on water", "three white triangles, a green diamond and a purple circle on sand"]


def tiny_config(**overrides) -> cogen.PDMConfig:
    cfg = cogen.PDMConfig.preset("tiny")
    vocab = cogen.WordTokenizer.build(CAPTIONS, cfg.num_text_tokens).vocab
    return dataclasses.replace(cfg, vocab=tuple(vocab), **overrides)


def tiny_model(seed: int = 0, **overrides) -> cogen.OneStreamPDM:
    torch.manual_seed(seed)
    return cogen.build_model(tiny_config(**overrides)).eval()


def random_inputs(cfg: cogen.PDMConfig, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    m_t = 2 * torch.randn(B, cfg.num_map_bits, cfg.map_size, cfg.map_size, generator=g)
    t = torch.randint(0, cfg.num_train_steps, (B,), generator=g)
    return x_t, m_t, t


# ----------------------------------------------------------------------------- 1. U-ViT blocks

def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 12)
    for p in (1, 2, 4):
        tokens = cogen.patchify(x, p)
        assert tokens.shape == (2, (8 // p) * (12 // p), p * p * 3)
        torch.testing.assert_close(cogen.unpatchify(tokens, 3, (8 // p, 12 // p)), x, rtol=0, atol=0)


def test_patch_embedding_conv_equals_linear_on_patchify():
    embed = cogen.PatchEmbed(3, 16, 2)
    x = torch.randn(2, 3, 8, 8)
    # The (p1, p2, C) token layout reads the conv weight (D, C, p1, p2) as (D, p1 p2 C).
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(16, -1)
    expected = cogen.patchify(x, 2) @ weight.T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_equals_reference_attention():
    model = tiny_model()
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        fast = model(x_t, m_t, t, text)
        set_attention_backend(model, use_sdpa=False)
        slow = model(x_t, m_t, t, text)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 2. maps and MSP

@pytest.mark.parametrize("f", [1, 2, 4])
def test_image_and_map_give_the_same_token_count_at_every_patch_factor(f):
    model = tiny_model(patch_factor=f)
    cfg = model.config
    assert cfg.map_size == f * cfg.latent_size and cfg.map_patch == f * cfg.patch_size
    x_t, m_t, t = random_inputs(cfg)
    assert model.patch_embed(x_t).shape == model.map_embed(m_t).shape == (3, cfg.num_patches, cfg.dim)
    with torch.no_grad():
        eps, m0 = model(x_t, m_t, t, model.tokenize(CAPTIONS))
    assert eps.shape == x_t.shape and m0.shape == m_t.shape
    assert m0.abs().max() < 1                                             # tanh head


def test_coco_preset_has_the_u_vit_s_parameter_count():
    cfg = cogen.PDMConfig.preset("coco")
    with torch.device("meta"):
        model = cogen.build_model(cfg)
    n = cogen.num_parameters(model)
    assert n == 44_956_012
    # PDM brief Appendix A counts the code's unused second map embedding, Conv2d(8, 512, k=s=4).
    assert n + (8 * 512 * 4 * 4 + 512) == 45_022_060
    # Without the map parts and the 256 extra positions it is the U-ViT-S/2 t2i baseline (44.69 M).
    map_parts = sum(p.numel() for name, p in model.named_parameters() if "map" in name)
    assert n - map_parts - 256 * 512 == 44_692_644
    assert cfg.num_map_bits == 8 and 1 + cfg.num_text_tokens + 2 * cfg.num_patches == 590


def test_min_pooling_keeps_the_smallest_id_of_each_block():
    category = torch.tensor([[[5, 5, 7, 7],
                              [5, 3, 7, 7],
                              [0, 9, 8, 8],
                              [9, 9, 8, 6]]])
    assert cogen.pool_category_map(category, 2).tolist() == [[[3, 7], [0, 6]]]
    # void = 0 wins any block that touches void (the paper's rule); void_aware keeps the min non-void.
    assert cogen.pool_category_map(category, 2, void_aware=True).tolist() == [[[3, 7], [9, 6]]]
    all_void = torch.zeros(1, 4, 4, dtype=torch.long)
    assert cogen.pool_category_map(all_void, 2, void_aware=True).sum() == 0


def test_min_pooling_of_a_non_multiple_size_resizes_nearest_first():
    # 6 x 6 -> 4 x 4: nearest to 4 x 4 (k = round(6 / 4) = 2 would need 8 x 8: nearest to 8 x 8 first).
    category = torch.arange(36).view(1, 6, 6) + 1
    pooled = cogen.pool_category_map(category, 4)
    resized = cogen.nearest_resize_ids(category, (8, 8))
    assert set(resized.unique().tolist()) <= set(category.unique().tolist())   # no invented ids
    expected = resized.view(1, 4, 2, 4, 2).amin(dim=(2, 4))
    assert torch.equal(pooled, expected)


def test_category_bits_are_msb_first_and_decode_back():
    cfg = tiny_config()
    category = torch.randint(0, cfg.num_categories + 1, (2, 32, 32))
    bits = cogen.encode_map(category, cfg)
    assert bits.shape == (2, cfg.num_category_bits, cfg.map_size, cfg.map_size)
    pooled = cogen.pool_category_map(category, cfg.map_size)
    assert torch.equal(cogen.decode_map(bits, cfg)[0], pooled)
    assert set(bits.unique().tolist()) == {-1.0, 1.0}                     # void is the id 0: all -1
    one = torch.full((1, 32, 32), 8)                                      # 8 = 1000b with 4 bits
    assert cogen.encode_map(one, cfg)[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0, -1.0]


def test_panoptic_maps_add_instance_bits_and_keep_the_token_count():
    cfg = tiny_config(panoptic=True)
    segments = torch.zeros(1, 32, 32, dtype=torch.long)
    segments[:, :, 16:] = 1
    segments[:, 20:, :8] = 2
    category = torch.tensor([0, 3, 3])[segments]                          # segment 0 is void
    bits = cogen.encode_map(category, cfg, segments, generator=torch.Generator().manual_seed(0))
    assert bits.shape[1] == cfg.num_category_bits + cfg.instance_bits == cfg.num_map_bits
    cat, inst = cogen.decode_map(bits, cfg)
    assert torch.equal(cat, cogen.pool_category_map(category, cfg.map_size))
    right, corner = inst[0, 0, -1], inst[0, -1, 0]                        # same category, two instances
    assert right != corner and right > 0 and corner > 0 and inst[0, 0, 0] == 0
    model = cogen.build_model(cfg)
    assert model.map_embed(bits).shape == (1, cfg.num_patches, cfg.dim)


# ----------------------------------------------------------------------------- 3. text

def test_tokenizer_round_trip_and_serialisation():
    tok = cogen.WordTokenizer.build(CAPTIONS, length=12)
    assert tok.vocab[:3] == ["<pad>", "<unk>", "<empty>"]
    assert cogen.WordTokenizer.build(CAPTIONS[::-1], length=12).vocab == tok.vocab   # order-free
    ids = tok.encode(CAPTIONS[:2] + [""])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert tok.decode(ids)[1] == "a blue hexagon on water"
    assert tok.decode(ids)[0] == " ".join(cogen.WordTokenizer.words(CAPTIONS[0])[:12])   # truncated
    assert ids[2].tolist() == [tok.EMPTY] + [tok.PAD] * 11
    assert tok.encode(["a golden circle"])[0, 1] == tok.UNK
    again = cogen.WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert torch.equal(again.encode(CAPTIONS), tok.encode(CAPTIONS))


def test_config_with_vocabulary_survives_a_json_round_trip():
    cfg = tiny_config()
    back = cogen.PDMConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and isinstance(back.vocab, tuple)


def test_dropped_text_reads_the_empty_caption():
    model = tiny_model()
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        dropped = model(x_t, m_t, t, text, drop_text=torch.tensor([True, False, True]))
        empty = model(x_t, m_t, t, model.tokenize(["", CAPTIONS[1], ""]))
    for a, b in zip(dropped, empty):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- 5. loss

def test_overfitting_one_batch_lowers_the_loss():
    model = tiny_model().train()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    m0 = cogen.encode_map(torch.randint(0, 10, (4, 32, 32), generator=g), cfg)
    text = model.tokenize(CAPTIONS + [""])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):                       # same t, noise and dropout every step: one fixed batch
        out = cogen.pdm_loss(model, x0, m0, text, model.schedule, cfg, torch.Generator().manual_seed(1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "image", "map"}
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- 6. guidance, sampling

def test_guidance_scale_one_is_the_conditional_prediction():
    model = tiny_model()
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        cond = model(x_t, m_t, t, text)
        guided = cogen.guided_denoiser(model, text, text_scale=1.0, map_scale=1.0)((x_t, m_t), t)
        no_text = model(x_t, m_t, t, text, drop_text=torch.ones(3, dtype=torch.bool))
        no_map = model(x_t, m_t, t, text, drop_map=torch.ones(3, dtype=torch.bool))
        text_only = cogen.guided_denoiser(model, text, text_scale=3.0)((x_t, m_t), t)
        map_only = cogen.guided_denoiser(model, text, map_scale=2.5)((x_t, m_t), t)
        both = cogen.guided_denoiser(model, text, text_scale=3.0, map_scale=2.5)((x_t, m_t), t)
    for k in range(2):                        # image eps, map x0
        assert torch.equal(guided[k], cond[k])
        assert not torch.allclose(no_text[k], cond[k]) and not torch.allclose(no_map[k], cond[k])
        torch.testing.assert_close(text_only[k], no_text[k] + 3.0 * (cond[k] - no_text[k]))
        torch.testing.assert_close(map_only[k], no_map[k] + 2.5 * (cond[k] - no_map[k]))
        torch.testing.assert_close(both[k], cond[k] + 2.0 * (cond[k] - no_text[k]) + 1.5 * (cond[k] - no_map[k]))


def test_text_guidance_agrees_with_the_samplers_classifier_free_guidance():
    model = tiny_model()
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    null = model.tokenize([""] * 3)

    def doubled(state, t2):                   # [cond, uncond] halves, as sample.py expects
        return model(state[0], state[1], t2, torch.cat([text, null]))
    with torch.no_grad():
        ours = cogen.guided_denoiser(model, text, text_scale=4.0)((x_t, m_t), t)
        theirs = sample.classifier_free_guidance(doubled, 4.0)((x_t, m_t), t)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the map input of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.schedule, self.maps = model, model.config, model.schedule, []

    def tokenize(self, captions):
        return self.model.tokenize(captions)

    def forward(self, x_t, m_t, t, text, **kw):
        self.maps.append(m_t.clone())
        return self.model(x_t, m_t, t, text, **kw)


def test_map_noise_at_sampling_start_has_std_two():
    model = Recorder(tiny_model())
    captions = [CAPTIONS[i % 3] for i in range(16)]                        # 16 x 4 x 16 x 16 values
    cogen.generate(model, captions, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.maps[0].std().item() == pytest.approx(2.0, rel=0.05)
    model.maps.clear()
    cogen.generate(model, captions, steps=2, map_init_std=1.0, generator=torch.Generator().manual_seed(0))
    assert model.maps[0].std().item() == pytest.approx(1.0, rel=0.05)   # the official code's start


@pytest.mark.parametrize("sampler", ["dpm++", "ddim"])
def test_given_map_mode_keeps_the_map_exactly(sampler):
    model = Recorder(tiny_model())
    cfg = model.config
    given = cogen.encode_map(torch.randint(0, 10, (3, 32, 32), generator=torch.Generator().manual_seed(3)), cfg)
    image, maps = cogen.generate(model, CAPTIONS, sampler=sampler, steps=3, given_map=given,
                                 text_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(maps, given)
    assert all(torch.equal(m[:3], given) for m in model.maps)              # the model saw it every call
    assert image.shape == (3, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    with pytest.raises(ValueError, match=r"given_map must be \(B, K, H_m, W_m\)"):
        cogen.generate(model, CAPTIONS, sampler=sampler, steps=3, given_map=given[:1])   # one map for 3 captions


def test_generation_is_reproducible_from_the_generator():
    model = tiny_model()
    a = cogen.generate(model, CAPTIONS, generator=torch.Generator().manual_seed(5))
    b = cogen.generate(model, CAPTIONS, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- 7. evaluation helpers

def test_caption_counts_parse_the_shapes_captions():
    assert cogen.caption_counts(CAPTIONS[0]) == {("red", "circle"): 2, ("orange", "square"): 1}
    rng = random.Random(0)
    for _ in range(200):
        things = [dict(colour=rng.choice(list(data.SHAPES_COLOURS)), kind=rng.choice(data.SHAPES_THINGS))
                  for _ in range(rng.randint(1, 8))]
        stuff = rng.sample(data.SHAPES_STUFF, rng.randint(1, 3))
        expected: dict = {}
        for t in things:
            expected[(t["colour"], t["kind"])] = expected.get((t["colour"], t["kind"]), 0) + 1
        assert cogen.caption_counts(data._caption(things, stuff)) == expected


def bfs_components(ids: torch.Tensor) -> torch.Tensor:
    """Reference: breadth-first search, components numbered in raster order."""
    H, W = ids.shape
    out = torch.zeros(H, W, dtype=torch.long)
    n = 0
    for y in range(H):
        for x in range(W):
            if ids[y, x] == 0 or out[y, x]:
                continue
            n += 1
            out[y, x], queue = n, deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < H and 0 <= nx < W and not out[ny, nx] and ids[ny, nx] == ids[cy, cx]:
                        out[ny, nx] = n
                        queue.append((ny, nx))
    return out


def test_connected_components_on_a_hand_made_map():
    ids = torch.tensor([[1, 1, 0, 2, 2],
                        [0, 1, 0, 0, 2],
                        [3, 0, 1, 1, 2],
                        [0, 3, 0, 1, 0],
                        [1, 1, 1, 1, 0]])
    expected = torch.tensor([[1, 1, 0, 2, 2],
                             [0, 1, 0, 0, 2],
                             [3, 0, 4, 4, 2],                           # diagonal 3s are apart
                             [0, 5, 0, 4, 0],
                             [4, 4, 4, 4, 0]])                          # a U: the bottom row joins 4
    assert torch.equal(cogen.connected_components(ids), expected)
    assert cogen.component_counts(ids) == {1: 2, 2: 1, 3: 2}
    assert cogen.component_counts(ids, min_area=2) == {1: 2, 2: 1}


def test_connected_components_agree_with_breadth_first_search():
    g = torch.Generator().manual_seed(0)
    spiral = torch.ones(9, 9, dtype=torch.long)           # a 1-pixel-wide path winding inwards
    for rows, cols in [(1, slice(1, 8)), (slice(1, 8), 7), (7, slice(1, 8)), (slice(3, 8), 1),
                       (3, slice(1, 6)), (slice(3, 6), 5)]:
        spiral[rows, cols] = 0
    for ids in [torch.randint(0, 3, (12, 17), generator=g) for _ in range(20)] + [spiral]:
        assert torch.equal(cogen.connected_components(ids), bfs_components(ids))


# ----------------------------------------------------------------------------- 8. loading

def test_a_checkpoint_dict_rebuilds_the_same_model():
    model = tiny_model()
    ckpt = {"model_config": json.loads(json.dumps(dataclasses.asdict(model.config))),
            "model": model.state_dict(), "ema": None}
    again = cogen.load_pdm(ckpt)
    x_t, m_t, t = random_inputs(model.config)
    text = model.tokenize(CAPTIONS)
    with torch.no_grad():
        for a, b in zip(model(x_t, m_t, t, text), again(x_t, m_t, t, text)):
            assert torch.equal(a, b)

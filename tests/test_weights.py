# SPDX-License-Identifier: MIT
"""Tests for ldmseg.py section 11: weight files, the CompVis / diffusers layouts, SD -> LDMSeg init.

CPU only, tiny models, deterministic. Every layout test exports our own model's weights into the
other layout, loads them back through the public loaders and compares outputs bit for bit; a few
hand-checked names pin the CompVis / diffusers numbering independently of our own inverse mapping.
"""
import dataclasses
import json
import struct
import sys
import types

import numpy as np
import pytest
import torch

from ldmseg import (
    CROSS_ATTENTION_KEYS,
    ImageAEConfig,
    ImageAutoencoder,
    LDMSeg,
    LDMSegConfig,
    MaskAEConfig,
    UNet,
    UNetConfig,
    _infer_unet_config,
    init_ldmseg_unet_from_sd,
    load_exact,
    load_image_autoencoder,
    load_safetensors,
    load_unet,
    load_weights,
    safetensors_metadata,
    save_safetensors,
    to_compvis_unet_keys,
    to_diffusers_vae_keys,
)

# An SD-1.x-shaped UNet in miniature: 3 levels, 2 layers per level, attention at the two upper
# levels only, cross-attention on -- so every kind of CompVis block (ResNet, transformer,
# downsampler, upsampler after a transformer and after a ResNet) occurs.
SD_TINY = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
                     attention_levels=(True, True, False), num_heads=2, context_dim=8, norm_groups=4)
VAE_TINY = ImageAEConfig.preset("tiny")


def seeded(cls, config, seed=0):
    """cls(config) with random weights (biases and norms included, so a misplaced tensor shows)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def unet_inputs(config, batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([3, 700])
    context = torch.randn(batch, 5, config.context_dim, generator=g) if config.context_dim else None
    return x, t, context


def vae_outputs(vae, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        return mean, logvar, vae.decode(mean)


# -----------------------------------------------------------------------------
# safetensors
# -----------------------------------------------------------------------------

def test_safetensors_round_trip_keeps_every_dtype_shape_value_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=g)
    tensors = {
        "f64": floats.double(), "f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(),
        "i64": torch.tensor([-(2 ** 62), 5]), "i32": torch.tensor([[-7, 2 ** 30]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "strided": floats.t(),
    }
    save_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt", "note": "x"})
    loaded = load_safetensors(tmp_path / "a.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert safetensors_metadata(tmp_path / "a.safetensors") == {"format": "pt", "note": "x"}
    n = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert n % 8 == 0                                             # the data starts 8-byte aligned


def test_hand_written_safetensors_file_is_read_as_the_format_specifies(tmp_path):
    # Bytes laid out by hand: u8 first, so the float32 tensor starts at an unaligned offset (1).
    header = {"flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
              "ids": {"dtype": "I16", "shape": [1, 3], "data_offsets": [9, 15]},
              "__metadata__": {"source": "hand"}}
    text = json.dumps(header).encode()
    data = bytes([7]) + struct.pack("<2f", 1.5, -2.0) + struct.pack("<3h", 1, -2, 300)
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    loaded = load_safetensors(path)
    assert loaded["flag"].tolist() == [7]
    assert loaded["w"].dtype == torch.float32 and loaded["w"].tolist() == [1.5, -2.0]
    assert loaded["ids"].shape == (1, 3) and loaded["ids"].tolist() == [[1, -2, 300]]
    assert safetensors_metadata(path) == {"source": "hand"}


def _file(header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, reason", [
    (b"\x01\x00", "header length"),
    (_file({"a": F32_2}, bytes(8), length=10 ** 9), "header length"),
    (_file(b"{not json", bytes(8)), "invalid safetensors header"),
    (_file(b'{"a": ' + json.dumps(F32_2).encode() + b', "a": ' + json.dumps(F32_2).encode() + b"}",
           bytes(8)), "appears twice"),
    (_file({"a": {**F32_2, "dtype": "F8"}}, bytes(8)), "dtype 'F8'"),
    (_file({"a": {**F32_2, "data_offsets": [0, 12]}}, bytes(12)), "do not hold 8 bytes"),
    (_file({"a": {**F32_2, "data_offsets": [0, 16]}}, bytes(8)), "do not hold"),
    (_file({"a": {**F32_2, "shape": [-2]}}, bytes(8)), "non-negative integers"),
    (_file({"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}, bytes(20)), "a gap or an overlap"),
    (_file({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)), "a gap or an overlap"),
    (_file({"a": F32_2}, bytes(12)), "cover 8 of the 12"),
    (_file({"a": F32_2, "__metadata__": {"k": 1}}, bytes(8)), "__metadata__"),
    (_file([1, 2], bytes(8)), "not a JSON object"),
])
def test_corrupt_safetensors_files_are_rejected_with_an_error_naming_file_and_fault(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors") as info:
        load_safetensors(path)
    assert reason in str(info.value)


def test_safetensors_files_written_here_are_read_back_by_our_reader_only_when_complete(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(4)}, path)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="t.safetensors"):
        load_safetensors(truncated)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -----------------------------------------------------------------------------
# Image autoencoder: CompVis and diffusers layouts
# -----------------------------------------------------------------------------

def test_image_ae_diffusers_layout_reverses_decoder_levels_and_uses_linear_attention():
    ours = seeded(ImageAutoencoder, VAE_TINY).state_dict()
    theirs = to_diffusers_vae_keys(ours, VAE_TINY)
    assert len(theirs) == len(ours)
    # Hand-checked correspondences (diffusers decoder.up_blocks.0 = our lowest-resolution level 3).
    assert theirs["decoder.up_blocks.0.resnets.0.conv1.weight"] is ours["decoder.up.3.block.0.conv1.weight"]
    assert theirs["decoder.up_blocks.0.upsamplers.0.conv.bias"] is ours["decoder.up.3.upsample.conv.bias"]
    assert theirs["decoder.up_blocks.3.resnets.1.norm2.weight"] is ours["decoder.up.0.block.1.norm2.weight"]
    assert theirs["encoder.down_blocks.1.downsamplers.0.conv.weight"] is ours["encoder.down.1.downsample.conv.weight"]
    shortcut = "encoder.down_blocks.2.resnets.0.conv_shortcut.weight"
    assert theirs[shortcut] is ours["encoder.down.2.block.0.nin_shortcut.weight"]
    assert theirs["decoder.mid_block.resnets.1.conv2.bias"] is ours["decoder.mid.block_2.conv2.bias"]
    assert theirs["encoder.conv_norm_out.weight"] is ours["encoder.norm_out.weight"]
    assert theirs["encoder.mid_block.attentions.0.group_norm.bias"] is ours["encoder.mid.attn_1.norm.bias"]
    q = theirs["encoder.mid_block.attentions.0.to_q.weight"]
    assert q.shape == (16, 16) and torch.equal(q, ours["encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in theirs


@pytest.mark.parametrize("legacy_names", [False, True])
def test_image_ae_from_a_diffusers_folder_gives_identical_outputs(tmp_path, legacy_names):
    vae = seeded(ImageAutoencoder, VAE_TINY)
    theirs = to_diffusers_vae_keys(vae.state_dict(), VAE_TINY)
    (tmp_path / "vae").mkdir()
    if legacy_names:                                              # diffusers < 0.14 names, as a .bin pickle
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        theirs = {next((k.replace(f".{a}.", f".{b}.") for a, b in old.items() if f".{a}." in k), k): v
                  for k, v in theirs.items()}
        torch.save(theirs, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    else:
        save_safetensors(theirs, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    loaded = load_image_autoencoder(tmp_path, VAE_TINY)           # the pipeline folder
    for a, b in zip(vae_outputs(vae), vae_outputs(loaded)):
        assert torch.equal(a, b)


def test_image_ae_from_a_standalone_compvis_ckpt_ignores_its_loss_and_ema_tensors(tmp_path):
    vae = seeded(ImageAutoencoder, VAE_TINY)
    state = {**vae.state_dict(), "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "vae.ckpt")
    loaded = load_image_autoencoder(tmp_path / "vae.ckpt", VAE_TINY)
    for a, b in zip(vae_outputs(vae), vae_outputs(loaded)):
        assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# UNet: diffusers and CompVis layouts
# -----------------------------------------------------------------------------

def test_unet_compvis_names_follow_the_forward_order_of_blocks():
    ours = seeded(UNet, SD_TINY).state_dict()
    cv = to_compvis_unet_keys(ours, SD_TINY)
    assert len(cv) == len(ours)
    # Hand-checked against SD-1.x's numbering (levels of 2 layers: input_blocks 1, 2 | 3 = down | 4, 5 ...).
    pairs = {"input_blocks.0.0.weight": "conv_in.weight",
             "time_embed.2.bias": "time_embedding.linear_2.bias",
             "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
             "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
                 "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
             "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
             "input_blocks.4.0.emb_layers.1.weight": "down_blocks.1.resnets.0.time_emb_proj.weight",
             "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
             "input_blocks.8.0.out_layers.3.bias": "down_blocks.2.resnets.1.conv2.bias",
             "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
             "middle_block.2.in_layers.2.weight": "mid_block.resnets.1.conv1.weight",
             "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
             "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight":
                 "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
             "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
             "output_blocks.8.1.norm.weight": "up_blocks.2.attentions.2.norm.weight",
             "out.0.weight": "conv_norm_out.weight", "out.2.bias": "conv_out.bias"}
    for compvis, diffusers in pairs.items():
        assert cv[compvis] is ours[diffusers], compvis
    assert not any(k.startswith("output_blocks.9") or k.startswith("input_blocks.9") for k in cv)


@pytest.mark.parametrize("layout", ["diffusers", "compvis"])
def test_unet_loaded_from_either_layout_gives_identical_outputs(tmp_path, layout):
    unet = seeded(UNet, SD_TINY)
    state = unet.state_dict()
    if layout == "compvis":
        state = {"model.diffusion_model." + k: v for k, v in to_compvis_unet_keys(state, SD_TINY).items()}
        path = tmp_path / "unet.safetensors"
        save_safetensors(state, path)
    else:
        path = tmp_path / "unet"
        path.mkdir()
        save_safetensors(state, path / "diffusion_pytorch_model.safetensors")
    loaded = load_unet(path, SD_TINY)
    x, t, context = unet_inputs(SD_TINY)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), loaded(x, t, context))


def test_unet_config_is_read_from_sd_sized_weights_when_not_given():
    with torch.device("meta"):
        sd = UNet(dataclasses.replace(UNetConfig(), in_channels=4, context_dim=768))
    for state in (sd.state_dict(), to_compvis_unet_keys(sd.state_dict(), sd.config)):
        assert _infer_unet_config(state) == sd.config


def test_full_sd_ckpt_with_both_prefixes_training_state_and_extras_loads_both_parts(tmp_path, monkeypatch):
    vae, unet = seeded(ImageAutoencoder, VAE_TINY), seeded(UNet, SD_TINY, seed=1)
    state = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    state.update({"model.diffusion_model." + k: v for k, v in to_compvis_unet_keys(unet.state_dict(), SD_TINY).items()})
    state.update({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8),
                  "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5),
                  "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(8, 4, 3, 3),
                  "betas": torch.linspace(0, 1, 10), "alphas_cumprod": torch.linspace(1, 0, 10)})
    # Lightning's training state beside the weights: a callback object and numpy scalars, pickled
    # from stand-in modules that are gone again when the file is loaded.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best_model_score = np.float64(0.25)
    torch.save({"state_dict": state, "global_step": np.int64(470000), "callbacks": {ModelCheckpoint: callback}},
               tmp_path / "sd.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    loaded_vae = load_image_autoencoder(tmp_path / "sd.ckpt", VAE_TINY)
    loaded_unet = load_unet(tmp_path / "sd.ckpt", SD_TINY)
    for a, b in zip(vae_outputs(vae), vae_outputs(loaded_vae)):
        assert torch.equal(a, b)
    x, t, context = unet_inputs(SD_TINY)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), loaded_unet(x, t, context))


def test_a_full_ema_sd_ckpt_gives_its_ema_unet(tmp_path):
    """sd-v1-4-full-ema.ckpt holds the trained UNet and, under LitEma's dotless names, its EMA: the
    weights SD released. All EMA names present -> the EMA; some missing -> the trained weights."""
    trained, ema = seeded(UNet, SD_TINY, seed=1), seeded(UNet, SD_TINY, seed=2)
    cv_trained, cv_ema = (to_compvis_unet_keys(m.state_dict(), SD_TINY) for m in (trained, ema))
    state = {"model.diffusion_model." + k: v for k, v in cv_trained.items()}
    state.update({"model_ema." + ("diffusion_model" + k).replace(".", ""): v for k, v in cv_ema.items()})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)})
    save_safetensors(state, tmp_path / "full.safetensors")
    x, t, context = unet_inputs(SD_TINY)
    with torch.no_grad():
        assert torch.equal(load_unet(tmp_path / "full.safetensors", SD_TINY)(x, t, context), ema(x, t, context))
        del state["model_ema.diffusion_modelout2bias"]
        save_safetensors(state, tmp_path / "partial.safetensors")
        assert torch.equal(load_unet(tmp_path / "partial.safetensors", SD_TINY)(x, t, context), trained(x, t, context))


def test_missing_unexpected_and_misshaped_tensors_are_listed_in_one_error():
    unet = UNet(SD_TINY)
    state = dict(seeded(UNet, SD_TINY).state_dict())
    del state["conv_out.bias"]
    state["conv_in.weight"] = torch.zeros(8, 5, 3, 3)
    state.update({f"extra.{i}": torch.zeros(1) for i in range(25)})
    with pytest.raises(ValueError) as info:
        load_exact(unet, state, "file.safetensors")
    message = str(info.value)
    assert "file.safetensors" in message and "1 missing: conv_out.bias" in message
    assert "25 unexpected: extra.0" in message and "and 5 more" in message
    assert "1 with the wrong shape: conv_in.weight (8, 5, 3, 3) (model (8, 4, 3, 3))" in message


def test_cross_attention_weights_load_into_a_unet_without_it_only_when_dropped(tmp_path):
    save_safetensors(seeded(UNet, SD_TINY).state_dict(), tmp_path / "sd.safetensors")
    no_context = dataclasses.replace(SD_TINY, context_dim=None)
    with pytest.raises(ValueError, match=r"(?s)unexpected: .*attn2\.to_q\.weight.*CROSS_ATTENTION_KEYS"):
        load_unet(tmp_path / "sd.safetensors", no_context)
    model = load_unet(tmp_path / "sd.safetensors", no_context, drop=CROSS_ATTENTION_KEYS)
    assert not any("attn2" in k or "transformer_blocks.0.norm2" in k for k in model.state_dict())


# -----------------------------------------------------------------------------
# LDMSeg from Stable Diffusion  [LDMSeg brief §3.2]
# -----------------------------------------------------------------------------

def ldmseg_config(context_dim=None):
    return LDMSegConfig(unet=dataclasses.replace(SD_TINY, context_dim=context_dim),
                        mask_ae=MaskAEConfig.preset("tiny"), image_ae=VAE_TINY)


def test_widened_ldmseg_unet_equals_the_sd_unet_on_z_t_at_initialisation():
    sd = seeded(UNet, SD_TINY)
    with torch.no_grad():                                         # make cross-attention's output exactly 0, so
        for name, p in sd.named_parameters():                     # that removing it changes nothing
            if "attn2.to_out" in name:
                p.zero_()
    model = LDMSeg(ldmseg_config())
    frozen = init_ldmseg_unet_from_sd(model, to_compvis_unet_keys(sd.state_dict(), SD_TINY))
    assert frozen == ["unet.time_embedding.linear_1.weight", "unet.time_embedding.linear_1.bias",
                      "unet.time_embedding.linear_2.weight", "unet.time_embedding.linear_2.bias"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert model.unet.conv_in.weight.requires_grad
    w = model.unet.conv_in.weight
    assert w.shape[1] == 12 and torch.equal(w[:, :4], sd.conv_in.weight) and not w[:, 4:].any()
    z_t, t, context = unet_inputs(SD_TINY)
    z_image = torch.randn_like(z_t)
    with torch.no_grad():
        expected = sd(z_t, t, context)
        torch.testing.assert_close(model(z_t, t, torch.zeros_like(z_t)), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(z_t, t, z_image, torch.randn_like(z_t)), expected, rtol=0, atol=1e-6)


def test_ldmseg_init_keeps_cross_attention_when_its_unet_has_a_context():
    sd = seeded(UNet, SD_TINY)
    model = LDMSeg(ldmseg_config(context_dim=8))
    init_ldmseg_unet_from_sd(model, sd.state_dict())
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    assert torch.equal(model.unet.state_dict()[key], sd.state_dict()[key])


def test_ldmseg_init_refuses_sd_weights_of_another_shape():
    model = LDMSeg(ldmseg_config())
    other = seeded(UNet, dataclasses.replace(SD_TINY, block_out_channels=(8, 16, 32)))
    with pytest.raises(ValueError, match="wrong shape"):
        init_ldmseg_unet_from_sd(model, other.state_dict())


# -----------------------------------------------------------------------------
# Containers and their errors
# -----------------------------------------------------------------------------

class _WritesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for a checkpoint that carries code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_carrying_code_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _WritesAFile(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: refused.*Unsupported global.*open"):
        load_weights(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)                          # the payload is live: plain pickle runs it
    assert marker.exists()


def test_sharded_diffusers_weights_are_merged(tmp_path):
    unet = seeded(UNet, SD_TINY)
    state = unet.state_dict()
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_safetensors({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(tmp_path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    fp16 = tmp_path / "fp16"                       # diffusers' variant index: *.safetensors.index.fp16.json
    fp16.mkdir()
    for file in shards:
        (tmp_path / file).rename(fp16 / file)
    (fp16 / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    assert set(load_weights(fp16)) == set(state)


def test_unknown_formats_and_absent_weights_give_clear_errors(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown weight format '.onnx'"):
        load_weights(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="no such weight file"):
        load_weights(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="no diffusers weights"):
        load_weights(tmp_path, component="vae")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights(tmp_path / "junk.pt")
    (tmp_path / "text.pth").write_text("hello, not weights")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:600])        # a truncated zip
    for name in ("text.pth", "empty.ckpt", "cut.pt"):
        with pytest.raises(ValueError, match=f"{name}: (not a readable torch checkpoint|refused)"):
            load_weights(tmp_path / name)
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "renamed.ckpt")
    with pytest.raises(ValueError, match="renamed.ckpt: a safetensors file under another name"):
        load_weights(tmp_path / "renamed.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a {name: tensor} state dict"):
        load_weights(tmp_path / "list.pt")

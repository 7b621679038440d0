# SPDX-License-Identifier: MIT
"""
cogen.py -- PDM: co-generation of an image and its segmentation map from a caption.

Implements Long & Roy, "Panoptic Diffusion Models: co-generation of images and segmentation maps",
arXiv 2412.02929 (CVPR 2025 workshop; official code: a fork of U-ViT, Bao et al., arXiv 2209.12152).
Paper and official-code details are summarised in docs/papers/pdm.md ("PDM brief §x" below).
One U-ViT reads a time token, the caption's tokens, the noisy image-latent patches and the noisy
map-bit patches as one sequence, and predicts the image noise eps and the clean map bits M_0.
The two-stream PDM does the same with a trainable map stream beside a frozen, pretrained
text-to-image U-ViT (the image stream), which it controls through zero-initialised projections.

Contents (`grep -n '^# [0-9]' cogen.py`)
  1. U-ViT blocks              attention (SDPA beside the explicit softmax), MLP, pre-LN block with
                               an optional long-skip input, patchify / unpatchify  [U-ViT; brief §3.3]
  2. Maps and Multi-Scale Patching   min-pooling of category ids from a nearest-resized map; category
                               ids as analog bits (MSB first, void = id 0); optional instance bits
                               [PDM §2.1, Table 2; brief §2.4-2.5, §5]
  3. Text                      a word-level tokenizer built from the training captions, a small
                               transformer text encoder, condition dropout  [brief §2.3, §6.3]
  4. One-stream model          PDMConfig (presets tiny / shapes / coco; arch one_stream | two_stream
                               | t2i), the pieces every U-ViT here shares (block stack, heads,
                               UViTBase: text path, [time, text] tokens, init), OneStreamPDM: tokens
                               [time, text, image patches, map patches], image head (eps), map head
                               (x0 through tanh)  [PDM brief §3]
  5. Image stream and two-stream model   T2IUViT (U-ViT's text-to-image model, an eps model);
                               TwoStreamPDM: the T2IUViT frozen, a map stream copied from its
                               blocks reading [image state, map tokens] at every block, one
                               zero-initialised projection per block back into the image stream,
                               its own LayerNorm and map head; two_stream_from_t2i  [PDM §2.5.2;
                               brief §4, §8.6-8.9]
  6. Loss                      pdm_loss: one t for image and map, map noise std 2, ||eps_pred -
                               eps||^2 + ||M0_pred - M0||^2, text / map dropout  [PDM Alg. 1;
                               brief §6]; t2i_loss: the image stream's eps loss
  7. Guidance and sampling     classifier-free text and map guidance; generate(): DPM-Solver++ or
                               DDIM on the (image eps, map x0) pair; given-map mode  [brief §6.4-6.5];
                               generate_images() for the image stream alone
  8. Evaluation helpers        caption_counts (Shapes captions), connected_components (4-connected,
                               vectorised), components per category, segments per category
  9. Building and loading      build_model(config), load_pdm(checkpoint), load_image_ae(checkpoint),
                               decode_images (latents -> RGB through the checkpoint's image AE);
                               uvit_to_t2i_state_dict: U-ViT's released t2i weights
                               (mscoco_uvit_small.pth) into a T2IUViT, every mismatch named
Both PDMs have one forward signature, (x_t, m_t, t, text, drop_text, drop_map) -> (eps_pred,
m0_pred), and the attributes `config`, `schedule` and `tokenize`, which are all sections 6-9 use:
pdm_loss, generate and load_pdm serve either. A two-stream PDM starts from a trained T2IUViT
(two_stream_from_t2i); its trainer takes `trainable_parameters()` and builds its EMA after that.

Run
  python train.py --stage cogen                 train on Shapes captions (the image AE first if missing)
  python train.py --stage t2i                   the image stream alone (T2IUViT) on Shapes captions
  python train.py --stage cogen --two-stream [--init-image-stream runs/shapes/t2i | mscoco_uvit_small.pth]
                                                the two-stream PDM on it (the t2i run first if missing)
  python sample.py --task cogen --ckpt runs/shapes/cogen --prompt "two red circles and a blue square on grass"
  python sample.py --task cogen --ckpt runs/shapes/cogen --prompt "..." --map samples/00_map.png
                                                an image for a given category-id map
  python -m pytest tests/test_cogen.py tests/test_cogen_cli.py
  From Python: load_pdm(ckpt), load_image_ae(ckpt), generate, decode_images, decode_map.

Shape legend
  B batch, C latent channels (4), h,w latent, p image patch, f patch factor, H_m = f h map side,
  p_m = f p map patch, K map bit channels, N = (h/p)(w/p) tokens per modality, L text tokens,
  D width, D_txt text-feature width, T training steps, t a (B,) int64 tensor of steps in [0, T).
  Category ids are int64 with 0 = void; map bits are float32 in {-1, +1}.

Notation (PDM -> here)
  x_0, x_t -> x0_image, x_t     M_0, M_t -> m0_bits, m_t     eps_theta -> eps_pred
  M_theta -> m0_pred            epsilon_M (std 2) -> noise_scale k = map_noise_scale * N(0, I)
  PDM / U-ViT's guidance "s" -> text_scale = s + 1 (sample.py's convention: 1 = conditional).

Deviations from the paper / official code (and why)
  * DEVIATION: label maps are resized nearest, never Lanczos (the code's Lanczos invents ids at
    boundaries [brief §8.11]); the map is then min-pooled as in the code.
  * DEVIATION: Multi-Scale Patching is built as the paper describes (map patch = f x image patch,
    head output p_m^2 K); the released code never committed it [brief §5, §8.1].
  * DEVIATION: the sampler's initial map noise has std `map_noise_scale` (2), as training's M_T;
    the code and the paper's Alg. 2 start the map from std 1 [brief §8.2]. generate(map_init_std=1)
    reproduces the code.
  * DEVIATION: the returned map is the final x0 prediction (at the last model call); the code
    returns the prediction of the first call of the last solver step [brief §8.4]. The sampler's
    map update uses the image's coefficients (the code's sign error is not copied [brief §8.3]).
  * DEVIATION (unverified in the paper): classifier-free map guidance. With probability
    map_drop_prob (0.1) training replaces the map input by a null map of zeros, and sampling
    guides with the formula of section 7. The released code trains with no map dropout.
  * DEVIATION: no unused `mask_embed_0` (a second map patch embedding the code allocates and never
    calls), so the `coco` preset has 44,956,012 parameters, not the brief's 45,022,060 (44.96 M
    vs 45.02 M; the difference is exactly that layer, 66,048 parameters).
  * DEVIATION: `text_encoder="words"` (the Shapes default) replaces frozen CLIP ViT-L/14 by a
    word-level tokenizer and a small transformer trained jointly: nothing is downloaded. CLIP
    features computed elsewhere are read as `text_encoder="context"`, as the paper.
  * DEVIATION: the time token embeds the schedule index t in [0, T); PDM's code embeds n = t + 1.
    `time_offset=1` does as the code, and U-ViT's released weights need it.
  * Two-stream model (section 5 gives the reasons): DEVIATION the whole image stream is frozen --
    the code also trains its pos_embed, final LayerNorm and heads (`train_image_head=True`) [brief
    §8.6]; DEVIATION the map stream starts as a copy of the image blocks -- the released code starts
    it random (`map_stream_init="random"`), earlier commits copied [brief §8.7]; DEVIATION the map
    stream has its own final LayerNorm (the code none) and only the depth + 1 zero-projections used
    are allocated (the code 2 depth + 2), so the `coco` two-stream model has 92,481,388 parameters,
    not the brief's 95.96 M; the EMA starts from the loaded weights (the code's starts random
    [brief §8.8]).
  * DEVIATION: attention runs in the autocast dtype; U-ViT casts q, k, v to float32 before SDPA.
  * Options, off by default (the paper's behaviour): `void_aware_pooling` (void wins a pooled
    block only when the block is all void), `panoptic` (instance bits beside the category bits),
    `clean_map_prob` (train some samples on the clean map, PDM's "given maps" mode [brief §4.4]).

Left out
  Everything the code holds but the paper does not use: map self-conditioning, cross-entropy on
  bits, separate MLPs for map tokens, a UNet backbone [brief §8.15]; U-ViT's mlp_time_embed
  variant (not in U-ViT-S). Latent scale (0.23010 for COCO's SD VAE, brief §2.2) belongs to the
  image autoencoder's config (ldmseg.ImageAEConfig.scale_factor).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from data import SHAPES_COLOURS, SHAPES_THINGS, bits_to_ids, ids_to_bits, num_bits_for, remap_ids
from ldmseg import (ImageAEConfig, ImageAutoencoder, _as_tuples, _preset, _rand, _randint, _randn, attention,
                    timestep_embedding)
from sample import KnownRegion, NoiseSchedule, classifier_free_guidance, ddim_sample, dpm_solver_pp_sample

Text = Union[Tensor, Sequence[str]]   # token ids (B, L) int64, features (B, L, D_txt), or captions


# -----------------------------------------------------------------------------
# 1. U-ViT blocks                              [U-ViT, Bao et al. 2023; PDM brief §3.3]
# -----------------------------------------------------------------------------
# A U-ViT is a ViT whose every input -- time, condition, image patches -- is a token, with long
# skips from the i-th block of the first half to the i-th-from-last block of the second half (a
# UNet's skips, for transformers). Module and parameter names are U-ViT's (attn.qkv, mlp.fc1,
# skip_linear, ...), so U-ViT-S weights load by name into the image part of a model.


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, D) tokens; one qkv Linear as U-ViT (bias optional)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True          # False: the explicit softmax path (ldmseg.set_attention_backend)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        nh = self.num_heads
        # U-ViT's layout 'B N (3 nh d) -> 3 B nh N d': q, k, v outermost, then heads.
        qkv = self.qkv(x).view(B, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)   # (B, N, 3D) -> (3, B, nh, N, D/nh)
        h = attention(qkv[0], qkv[1], qkv[2], self.use_sdpa)                   # (B, nh, N, D/nh)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))                  # -> (B, N, D)


class Mlp(nn.Module):
    """fc1 (D -> r D) - GELU - fc2 (r D -> D)  [ViT; U-ViT uses timm's Mlp]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; an out-block first merges its long skip.  [U-ViT; brief §3.3]

    x <- Linear_{2D->D}([x, skip])   (out-blocks only)
    x <- x + Attn(LN(x));  x <- x + MLP(LN(x))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # PAPER: U-ViT merges a long skip by concatenation + Linear (the best of its skip variants).
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))               # (B, N, 2D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Patch embedding as a strided convolution: (B, C, H, W) -> (B, (H/p)(W/p), D)  [ViT; U-ViT]."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)         # kernel = stride = p

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                        # (B, D, H/p, W/p) -> (B, N, D)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, h, w) -> (B, N, p*p*C) tokens, each patch laid out (p1, p2, C) with C fastest.

    The models embed patches with a strided convolution; this is its linear-algebra reading (a
    test checks conv == Linear(patchify)) and the inverse of `unpatchify`.
    """
    B, C, h, w = x.shape
    x = x.view(B, C, h // p, p, w // p, p)                                    # (B, C, h/p, p1, w/p, p2)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (h // p) * (w // p), p * p * C)   # -> (B, N, p*p*C)


def unpatchify(x: Tensor, channels: int, grid: tuple[int, int]) -> Tensor:
    """(B, N, p*p*C) tokens -> (B, C, gh*p, gw*p): U-ViT's 'B (gh gw) (p1 p2 C) -> B C (gh p1) (gw p2)'."""
    B, N, P = x.shape
    gh, gw = grid
    p = int(round(math.sqrt(P // channels)))
    if gh * gw != N or p * p * channels != P:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into {channels} channels on a {grid} grid")
    x = x.view(B, gh, gw, p, p, channels)                                     # (B, gh, gw, p1, p2, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * p, gw * p)   # -> (B, C, gh p, gw p)


# -----------------------------------------------------------------------------
# 2. Maps and Multi-Scale Patching          [PDM §2.1, Table 2; PDM brief §2.4-2.5, §5]
# -----------------------------------------------------------------------------
# The map is a per-pixel *category* id (0 = void; instance identity dropped), min-pooled to
# H_m = f h and encoded as K = num_bits_for(num_categories + 1) analog bits, MSB first, void = the
# id 0 (all bits -1). Multi-Scale Patching: the map, f times the latent's side, is cut into
# patches f times the image patch, so both modalities give N tokens and the sequence length does
# not depend on f (f = 1, 2, 4: 32, 64, 128 px maps for a 32^2 latent; f = 2 is the paper's best).
#
# Min-pooling is the code's rule (skimage block_reduce with np.min). PAPER: it favours small ids,
# i.e. COCO's things (1-91) over stuff (92-200). Its side effect: void (0) wins every block that
# touches a void pixel, so void grows by up to a block at every void boundary. `void_aware=True`
# (a DEVIATION option) takes the min over the block's non-void ids and leaves void only to blocks
# that are entirely void.


def nearest_resize_ids(ids: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of an id map (pixel centres, exact for int64): (B, H, W) -> (B, *size)."""
    B, H, W = ids.shape
    h, w = size
    rows = ((torch.arange(h, device=ids.device) + 0.5) * H / h).long().clamp(max=H - 1)   # (h,)
    cols = ((torch.arange(w, device=ids.device) + 0.5) * W / w).long().clamp(max=W - 1)   # (w,)
    return ids[:, rows[:, None], cols[None, :]]                               # (B, H, W) -> (B, h, w)


def pool_category_map(category: Tensor, size: Union[int, tuple[int, int]],
                      void_aware: bool = False) -> Tensor:
    """Min-pool an id map to `size`  [PDM brief §2.4 step 4].

    category: (B, H, W) int64, 0 = void. The map is first resized nearest to the nearest multiple
    (k_h size_h, k_w size_w) of the target -- never interpolated -- then each k_h x k_w block keeps
    its smallest id (void_aware: its smallest non-void id, 0 only if the block is all void).
    Returns (B, size_h, size_w) int64.
    """
    B, H, W = category.shape
    hm, wm = (size, size) if isinstance(size, int) else size
    kh, kw = max(1, round(H / hm)), max(1, round(W / wm))
    if (H, W) != (kh * hm, kw * wm):
        category = nearest_resize_ids(category, (kh * hm, kw * wm))           # -> (B, kh hm, kw wm)
    blocks = category.view(B, hm, kh, wm, kw).permute(0, 1, 3, 2, 4)         # (B, hm, wm, kh, kw)
    blocks = blocks.reshape(B, hm, wm, kh * kw)                               # -> (B, hm, wm, kh kw)
    if not void_aware:
        return blocks.amin(dim=-1)                                            # PAPER: min over the block
    big = torch.iinfo(torch.int64).max
    nonvoid = torch.where(blocks > 0, blocks, big).amin(dim=-1)               # (B, hm, wm)
    return torch.where(nonvoid == big, 0, nonvoid)


def encode_map(category: Tensor, config: "PDMConfig", segments: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Category map (and segments) -> the diffused map bits M_0  [PDM brief §2.4-2.5].

    category: (B, H, W) int64 ids 0..num_categories (0 = void) at image resolution.
    segments: (B, H, W) int64 contiguous segment ids (the Dataset's `segments`), needed when
    config.panoptic: then each image's segments get fresh random ids in 1..2^K_inst-1 (LDMSeg's
    remap, from `generator`), the pair (category, instance) is min-pooled as one key -- the
    smallest category wins, then its smallest instance id -- and K_inst bits, LSB first, void 0
    in every plane (LDMSeg's encoding), follow the category bits on the channel axis.
    Returns (B, K, H_m, W_m) float32, K = config.num_map_bits.
    """
    if int(category.max()) > config.num_categories or int(category.min()) < 0:
        raise ValueError(f"category ids must lie in 0..{config.num_categories}")
    size, kc = (config.map_size, config.map_size), config.num_category_bits
    if not config.panoptic:
        pooled = pool_category_map(category, size, config.void_aware_pooling)  # (B, H_m, W_m)
        return ids_to_bits(pooled, kc, msb_first=True, void_zero=False)      # PAPER: MSB first, void = id 0
    if segments is None:
        raise ValueError("a panoptic map (config.panoptic) needs the segment ids")
    span = 2 ** config.instance_bits
    instance = remap_ids(segments, config.instance_bits, generator)          # (B, H, W) in 0..span-1
    key = pool_category_map(category * span + instance, size, config.void_aware_pooling)
    category_bits = ids_to_bits(key // span, kc, msb_first=True, void_zero=False)          # (B, Kc, H_m, W_m)
    instance_bits = ids_to_bits(key % span, config.instance_bits, msb_first=False, void_zero=True)
    return torch.cat([category_bits, instance_bits], dim=1)                   # -> (B, Kc + Ki, H_m, W_m)


def decode_map(bits: Tensor, config: "PDMConfig") -> tuple[Tensor, Optional[Tensor]]:
    """Map bits (B, K, H_m, W_m), any real values -> (category, instance) by thresholding at 0.

    category: (B, H_m, W_m) int64 in 0..2^Kc-1 -- values above num_categories are invalid ids the
    model can produce (PDM's MCD drops them [brief §7.1]); instance: (B, H_m, W_m) int64, or None
    when the config is not panoptic.
    """
    kc = config.num_category_bits
    category = bits_to_ids(bits[:, :kc], msb_first=True)                      # (B, Kc, ...) -> (B, H_m, W_m)
    if not config.panoptic:
        return category, None
    return category, bits_to_ids(bits[:, kc:], msb_first=False)               # LSB first, as encoded


# -----------------------------------------------------------------------------
# 3. Text                                   [PDM brief §2.3, §6.3; Transformer, Vaswani 2017]
# -----------------------------------------------------------------------------
# PDM reads 77 x 768 CLIP ViT-L/14 token features through Linear(768 -> D) ("context" mode).
# With nothing downloadable, the Shapes default ("words" mode) learns its own text features: a
# word-level tokenizer fixed by the training captions and a 2-block pre-LN transformer over token
# + position embeddings, trained with the rest. Pad tokens are not masked: as CLIP's padded
# positions they are tokens the model learns to read past. The null caption of classifier-free
# guidance is "" in both modes: the <empty> token followed by pads, or (context mode) the stored
# CLIP features of "" [brief §2.3] -- `OneStreamPDM.set_empty_context` -- zeros until then.


class WordTokenizer:
    """Lowercase, split on non-letters, look words up in a fixed vocabulary.

    vocab[0:3] are <pad>, <unk> (a word not seen in training), <empty> (the empty caption's one
    token); the rest are the training captions' words, sorted, so the vocabulary depends only on
    the set of captions, not on their order. `to_dict` / `from_dict` give a plain, JSON-safe form
    for checkpoints; PDMConfig.vocab holds the same list.
    """

    SPECIALS: ClassVar[tuple[str, ...]] = ("<pad>", "<unk>", "<empty>")
    PAD, UNK, EMPTY = 0, 1, 2

    def __init__(self, vocab: Sequence[str], length: int):
        if tuple(vocab[:3]) != self.SPECIALS:
            raise ValueError(f"a vocabulary starts with {self.SPECIALS}, got {tuple(vocab[:3])}")
        self.vocab = list(vocab)
        self.length = length                                   # L: every caption -> L tokens
        self.index = {word: i for i, word in enumerate(self.vocab)}

    @staticmethod
    def words(caption: str) -> list[str]:
        """'Two red circles, on grass!' -> ['two', 'red', 'circles', 'on', 'grass']."""
        return re.findall(r"[a-z]+", caption.lower())

    @classmethod
    def build(cls, captions: Sequence[str], length: int, min_count: int = 1) -> "WordTokenizer":
        """The tokenizer of a caption set: every word seen at least `min_count` times."""
        counts = Counter(w for c in captions for w in cls.words(c))
        return cls(list(cls.SPECIALS) + sorted(w for w, n in counts.items() if n >= min_count), length)

    def encode(self, captions: Sequence[str]) -> Tensor:
        """Captions -> (B, L) int64: word ids, truncated to L, then <pad>; '' -> <empty>, pads."""
        out = torch.full((len(captions), self.length), self.PAD, dtype=torch.long)
        for b, caption in enumerate(captions):
            ids = [self.index.get(w, self.UNK) for w in self.words(caption)] or [self.EMPTY]
            ids = ids[: self.length]
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        """(B, L) ids -> captions as normalised words (pads and <empty> dropped)."""
        skip = {self.PAD, self.EMPTY}
        return [" ".join(self.vocab[i] for i in row.tolist() if i not in skip) for row in tokens]

    def to_dict(self) -> dict:
        return {"vocab": list(self.vocab), "length": self.length}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(d["vocab"], d["length"])


class TextEncoder(nn.Module):
    """Token ids (B, L) -> text features (B, L, D_txt): embeddings + pre-LN blocks + LayerNorm."""

    def __init__(self, vocab_size: int, width: int, length: int, layers: int, heads: int,
                 mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.token_embed(tokens) + self.pos_embed                         # (B, L) -> (B, L, D_txt)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def dropout_mask(batch: int, p: float, generator: Optional[torch.Generator],
                 device: torch.device) -> Tensor:
    """(B,) bool, True with probability p: which samples lose a condition this step.

    PAPER: captions are dropped to the empty caption with p = 0.1 [brief §6.3]. One uniform draw
    per sample whatever p is, so the random stream does not depend on the probabilities.
    """
    return _rand((batch,), generator, device) < p


# -----------------------------------------------------------------------------
# 4. One-stream model                                [PDM brief §3, Appendix A]
# -----------------------------------------------------------------------------
# tokens = [time (1), text (L), image patches (N), map patches (N)] + one learned position table
# over all 1 + L + 2N tokens; depth/2 in-blocks (each output pushed on a stack), a mid-block,
# depth/2 out-blocks (each popping a skip); a final LayerNorm; then two heads on their own tokens:
#   image:  Linear(D -> p^2 C)   -> unpatchify -> Conv 3x3        = eps_pred  (B, C, h, w)
#   map:    Linear(D -> p_m^2 K) -> unpatchify -> Conv 3x3 -> tanh = m0_pred (B, K, H_m, W_m)
# PAPER: the map head predicts the clean bits M_0 (x0-prediction in (-1, 1)) "as predicting
# eps_M does not provide effective guidance for the images" [brief §6.2]; the image head eps.
# Initialisation [brief §3.5]: Linear weights trunc-normal(0.02) with zero bias, LayerNorms 1 / 0,
# positions (and token embeddings) trunc-normal(0.02), convolutions PyTorch's default.
# The pieces section 5's image stream shares with this model come first: the block stack and its
# forward (uvit_blocks, run_uvit), the heads (head_layers, eps_head, map_head), and UViTBase (the
# text path, the [time, text] tokens, the init).


@dataclass
class PDMConfig:
    """PDM's network, map encoding, diffusion and sampling defaults. Defaults = `coco` (the paper)."""

    arch: str = "one_stream"                 # one_stream [brief §3] | two_stream [brief §4] | t2i (image stream)
    map_stream_init: str = "copy"            # two_stream: map blocks copy the image's | random  [brief §8.7]
    train_image_head: bool = False           # two_stream: image pos_embed, norm, head trainable  [brief §8.6]
    latent_size: int = 32                    # h = w of the image latent  [PAPER: 256^2 / SD VAE f8]
    latent_channels: int = 4                 # C of the image latent  [PAPER: SD VAE]
    patch_size: int = 2                      # image patch p  [PAPER: U-ViT-S/2]
    patch_factor: int = 2                    # f: map side f h, map patch f p  [PAPER: 1, 2, 4; 2 best]
    num_categories: int = 200                # largest category id; bits for 0..this  [PAPER: COCO, 8 bits]
    void_aware_pooling: bool = False         # min over non-void ids only  [DEVIATION option; PAPER: False]
    panoptic: bool = False                   # also co-generate instance bits  [DEVIATION option]
    instance_bits: int = 6                   # K_inst when panoptic: up to 2^K - 1 segments per image
    dim: int = 512                           # D  [PAPER: U-ViT-S 512]
    depth: int = 12                          # U-ViT's count: depth/2 in + 1 mid + depth/2 out blocks  [PAPER: 12 -> 13]
    num_heads: int = 8                       # attention heads  [PAPER: 8, head width 64]
    mlp_ratio: float = 4.0                   # MLP hidden = mlp_ratio D  [PAPER: 4]
    qkv_bias: bool = False                   # bias of the qkv projection  [PAPER: False]
    text_encoder: str = "context"            # context: precomputed features (CLIP) | words: tokenizer + encoder
    context_dim: int = 768                   # D_txt: feature width (CLIP-L 768) or the words encoder's width
    num_text_tokens: int = 77                # L  [PAPER: CLIP's 77]
    vocab: tuple[str, ...] = ()              # words mode: WordTokenizer vocabulary (built from captions)
    text_layers: int = 2                     # words mode: transformer blocks of the text encoder
    text_heads: int = 4                      # words mode: their attention heads
    schedule: str = "scaled_linear"          # beta schedule  [PAPER: SD's sqrt-linear 0.00085 - 0.012]
    num_train_steps: int = 1000              # T  [PAPER]
    time_offset: int = 0                     # time token embeds t + this; 1: U-ViT's n = t + 1 (for its weights)
    map_noise_scale: float = 2.0             # std of the map's noise, M_t = a M_0 + 2 s eps  [PAPER: code / Alg. 1]
    map_loss_weight: float = 1.0             # weight of ||M0_pred - M_0||^2  [PAPER: 1]
    text_drop_prob: float = 0.1              # caption -> "" during training  [PAPER: 0.1]
    map_drop_prob: float = 0.1               # map input -> null map (zeros)  [DEVIATION: code 0]
    clean_map_prob: float = 0.0              # map input -> clean M_0 (given-map training)  [DEVIATION option]
    sampler: str = "dpm++"                   # generate()'s default: dpm++ | ddim  [PAPER: DPM-Solver++]
    sample_steps: int = 50                   # model calls per sample  [PAPER: 50 NFE]
    sample_order: int = 3                    # DPM-Solver++ order  [PAPER: 3]
    sample_method: str = "singlestep"        # DPM-Solver++ multistep | singlestep  [PAPER: singlestep 'fast']
    text_scale: float = 2.0                  # text guidance, 1 = none  [PAPER: U-ViT s = 1 -> 2 here]
    map_scale: float = 1.0                   # map guidance, 1 = none  [DEVIATION: not in the code]

    _PRESETS: ClassVar[dict[str, dict]] = {
        "coco": {},
        # 128^2 Shapes images -> 16^2 x 4 latents (ldmseg's `shapes` image AE, f8); map 32^2 (f = 2,
        # the 4 x 4 min-pool of PDM's 256 -> 64); 9 categories -> 4 bits; 64 + 64 patch tokens and
        # 40 word tokens (the longest Shapes captions have ~32 words). 7 blocks of width 192.
        "shapes": dict(latent_size=16, num_categories=9, instance_bits=5, dim=192, depth=6, num_heads=4,
                       text_encoder="words", context_dim=128, num_text_tokens=40, text_heads=4,
                       sample_steps=20, sample_order=2, sample_method="multistep"),
        # What the tests build: 8^2 latents, 16 tokens per modality, width 32, 3 blocks.
        "tiny": dict(latent_size=8, num_categories=9, instance_bits=4, dim=32, depth=2, num_heads=2,
                     text_encoder="words", context_dim=32, num_text_tokens=8, text_heads=2,
                     sample_steps=4, sample_order=2, sample_method="multistep"),
    }

    def __post_init__(self):
        _as_tuples(self)
        checks = {"arch must be one_stream, two_stream or t2i": self.arch in ("one_stream", "two_stream", "t2i"),
                  "map_stream_init must be copy or random": self.map_stream_init in ("copy", "random"),
                  "latent_size must be a multiple of patch_size": self.latent_size % self.patch_size == 0,
                  "patch_factor must be 1, 2 or 4 [PDM Table 2]": self.patch_factor in (1, 2, 4),
                  "dim must be a multiple of num_heads": self.dim % self.num_heads == 0,
                  "text_encoder must be context or words": self.text_encoder in ("context", "words"),
                  "sampler must be dpm++ or ddim": self.sampler in ("dpm++", "ddim")}
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)

    @classmethod
    def preset(cls, name: str) -> "PDMConfig":
        """`coco` (the paper's one-stream U-ViT-S/2), `shapes` or `tiny`."""
        return _preset(cls, cls._PRESETS, name)

    @property
    def num_category_bits(self) -> int:
        """K_cat: bits for the ids 0..num_categories (8 for COCO's 0..200)  [PAPER]."""
        return num_bits_for(self.num_categories + 1)

    @property
    def num_map_bits(self) -> int:
        """K: channels of the map M (category bits, then instance bits when panoptic)."""
        return self.num_category_bits + (self.instance_bits if self.panoptic else 0)

    @property
    def map_size(self) -> int:
        """H_m = W_m = f h  [PDM §2.1 Multi-Scale Patching]."""
        return self.patch_factor * self.latent_size

    @property
    def map_patch(self) -> int:
        """p_m = f p: the map patch, so that the map gives as many tokens as the image."""
        return self.patch_factor * self.patch_size

    @property
    def num_patches(self) -> int:
        """N tokens per modality: (h / p)^2 = (H_m / p_m)^2."""
        return (self.latent_size // self.patch_size) ** 2


def _init_weights(module: nn.Module) -> None:
    """U-ViT's init [brief §3.5]: Linear trunc-normal(0.02) / bias 0; LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)        # as the positions (not in U-ViT)


def uvit_blocks(c: PDMConfig) -> tuple[nn.ModuleList, Block, nn.ModuleList]:
    """U-ViT's stack: depth/2 in-blocks, a mid-block, depth/2 out-blocks that merge a long skip."""
    block = lambda skip: Block(c.dim, c.num_heads, c.mlp_ratio, c.qkv_bias, skip)
    return (nn.ModuleList([block(False) for _ in range(c.depth // 2)]), block(False),
            nn.ModuleList([block(True) for _ in range(c.depth // 2)]))


def run_uvit(x: Tensor, in_blocks: nn.ModuleList, mid_block: Block, out_blocks: nn.ModuleList) -> Tensor:
    """The U-ViT trunk on (B, N', D) tokens -> (B, N', D)  [U-ViT; brief §3.3].

    Each in-block's output is pushed on a stack; each out-block pops the latest as its long skip,
    so in-block i pairs with the i-th-from-last out-block, as a UNet's skips.
    """
    skips = []
    for blk in in_blocks:
        x = blk(x)
        skips.append(x)
    x = mid_block(x)
    for blk in out_blocks:
        x = blk(x, skips.pop())
    return x


def head_layers(dim: int, patch: int, channels: int) -> tuple[nn.Linear, nn.Conv2d]:
    """A head: Linear(D -> p^2 C) per token, then a 3x3 convolution once unpatchified.

    PAPER: "distinct convolutional layers to unpatchify and predict the outputs" [brief §3.4].
    """
    return nn.Linear(dim, patch ** 2 * channels), nn.Conv2d(channels, channels, 3, padding=1)


def eps_head(c: PDMConfig, linear: nn.Linear, conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """Image tokens (B, N, D), already normalised -> eps_pred (B, C, h, w)  [brief §3.4]."""
    grid = (c.latent_size // c.patch_size,) * 2
    return conv(unpatchify(linear(tokens), c.latent_channels, grid))         # (B, N, p^2 C) -> (B, C, h, w)


def map_head(c: PDMConfig, linear: nn.Linear, conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """Map tokens (B, N, D) -> m0_pred (B, K, H_m, W_m) in (-1, 1)  [brief §3.4, §5]."""
    grid = (c.latent_size // c.patch_size,) * 2                              # MSP: the image's grid
    m0 = unpatchify(linear(tokens), c.num_map_bits, grid)                    # (B, N, p_m^2 K) -> (B, K, H_m, W_m)
    # PAPER: tanh bounds the clean-bit prediction to (-1, 1) (code commit 15e1ed6).
    return torch.tanh(conv(m0))


class UViTBase(nn.Module):
    """What every U-ViT here shares: the text path (section 3), the [time, text] tokens, the init.

    Subclasses (OneStreamPDM; T2IUViT in section 5) set `config`, build `pos_embed`, their blocks
    and heads, then call `_init_uvit()`. Names are U-ViT's (context_embed, pos_embed, ...).
    """

    config: PDMConfig

    def _build_text(self, c: PDMConfig) -> None:
        """The text path: (tokenizer + encoder | nothing) and Linear(D_txt -> D); the null caption."""
        if c.text_encoder == "words":
            if len(c.vocab) <= len(WordTokenizer.SPECIALS):
                raise ValueError("words mode needs config.vocab = WordTokenizer.build(captions, L).vocab")
            self.tokenizer = WordTokenizer(c.vocab, c.num_text_tokens)
            self.text_encoder = TextEncoder(len(c.vocab), c.context_dim, c.num_text_tokens, c.text_layers,
                                            c.text_heads, c.mlp_ratio, c.qkv_bias)
            self.register_buffer("empty_text", self.tokenizer.encode([""]), persistent=False)   # (1, L)
        else:
            self.tokenizer, self.text_encoder = None, None
            # PAPER: the CLIP features of "" [brief §2.3]; saved with the weights once set.
            self.register_buffer("empty_text", torch.zeros(1, c.num_text_tokens, c.context_dim))  # (1, L, D_txt)
        self.context_embed = nn.Linear(c.context_dim, c.dim)                  # PAPER: Linear(768 -> 512)

    def _init_uvit(self) -> None:
        """U-ViT's initialisation (section comment), once every layer is built."""
        self.apply(_init_weights)
        for p in self._position_tables():
            nn.init.trunc_normal_(p, std=0.02)

    def _position_tables(self) -> list[nn.Parameter]:
        return [self.pos_embed] + ([self.text_encoder.pos_embed] if self.text_encoder is not None else [])

    def set_empty_context(self, features: Tensor) -> None:
        """Context mode: store the text features of the empty caption, (L, D_txt) or (1, L, D_txt)."""
        if self.text_encoder is not None:
            raise ValueError("words mode derives the empty caption from its tokenizer")
        self.empty_text.copy_(features.reshape(self.empty_text.shape))

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Words mode: captions -> (B, L) int64 on the model's device."""
        if self.tokenizer is None:
            raise ValueError("context mode reads precomputed text features, not captions")
        return self.tokenizer.encode(captions).to(next(self.parameters()).device)

    def embed_text(self, text: Tensor, drop: Optional[Tensor]) -> Tensor:
        """Text (B, L) ids or (B, L, D_txt) features -> (B, L, D) tokens; dropped rows read ""."""
        if drop is not None:
            shape = (-1,) + (1,) * (text.dim() - 1)
            text = torch.where(drop.view(shape), self.empty_text, text)       # (B, L[, D_txt])
        if self.text_encoder is not None:
            text = self.text_encoder(text)                                    # (B, L) -> (B, L, D_txt)
        return self.context_embed(text)                                       # -> (B, L, D)

    def time_and_text_tokens(self, t: Tensor, text: Tensor, drop_text: Optional[Tensor],
                             dtype: torch.dtype) -> Tensor:
        """U-ViT's extras: t (B,) and the text -> [time token, text tokens] (B, 1 + L, D)  [brief §3.2].

        The time token is the raw sinusoid of t + time_offset (U-ViT-S: mlp_time_embed=False).
        """
        time_token = timestep_embedding(t + self.config.time_offset, self.config.dim)[:, None].to(dtype)   # (B, 1, D)
        return torch.cat([time_token, self.embed_text(text, drop_text)], dim=1)   # (B, 1 + L, D)


class OneStreamPDM(UViTBase):
    """The one-stream PDM: forward(x_t, m_t, t, text) -> (eps_pred, m0_pred).  [PDM brief §3]

    x_t (B, C, h, w) noisy image latent; m_t (B, K, H_m, W_m) noisy map bits; t (B,) int64;
    text: token ids (B, L) int64 (words mode) or features (B, L, D_txt) (context mode).
    drop_text / drop_map: optional (B,) bool; where True the caption becomes the empty caption and
    the map input the null map (zeros) -- classifier-free dropout and the guidance branches.
    Returns eps_pred (B, C, h, w) and m0_pred (B, K, H_m, W_m) in (-1, 1).
    """

    def __init__(self, config: PDMConfig):
        super().__init__()
        self.config = c = config
        K, N, D = c.num_map_bits, c.num_patches, c.dim
        self._build_text(c)
        self.patch_embed = PatchEmbed(c.latent_channels, D, c.patch_size)
        self.map_embed = PatchEmbed(K, D, c.map_patch)                        # PAPER: kernel = stride = f p
        self.extras = 1 + c.num_text_tokens                                   # time + text tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + 2 * N, D))
        self.in_blocks, self.mid_block, self.out_blocks = uvit_blocks(c)
        self.norm = nn.LayerNorm(D)
        self.decoder_pred, self.final_layer = head_layers(D, c.patch_size, c.latent_channels)
        self.decoder_pred_map, self.final_layer_map = head_layers(D, c.map_patch, K)   # PAPER: p_m^2 K per token
        self.schedule = NoiseSchedule(c.schedule, c.num_train_steps)
        self._init_uvit()

    def forward(self, x_t: Tensor, m_t: Tensor, t: Tensor, text: Tensor,
                drop_text: Optional[Tensor] = None, drop_map: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        B, C, h, w = x_t.shape
        c, N = self.config, self.config.num_patches
        if drop_map is not None:
            m_t = torch.where(drop_map.view(B, 1, 1, 1), torch.zeros_like(m_t), m_t)   # null map
        extras = self.time_and_text_tokens(t, text, drop_text, x_t.dtype)     # (B, 1 + L, D)
        image = self.patch_embed(x_t)                                         # (B, C, h, w) -> (B, N, D)
        maps = self.map_embed(m_t)                                            # (B, K, H_m, W_m) -> (B, N, D)
        x = torch.cat([extras, image, maps], dim=1) + self.pos_embed          # (B, 1 + L + 2N, D)
        x = self.norm(run_uvit(x, self.in_blocks, self.mid_block, self.out_blocks))
        return self.heads(x[:, self.extras:self.extras + N], x[:, self.extras + N:])

    def heads(self, image_tokens: Tensor, map_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) each -> eps_pred (B, C, h, w), m0_pred (B, K, H_m, W_m)  [brief §3.4]."""
        c = self.config
        return (eps_head(c, self.decoder_pred, self.final_layer, image_tokens),
                map_head(c, self.decoder_pred_map, self.final_layer_map, map_tokens))


# -----------------------------------------------------------------------------
# 5. Image stream and two-stream model            [PDM §2.5.2, Fig. 2; brief §4, §8.6-8.9]
# -----------------------------------------------------------------------------
# The image stream, T2IUViT, is U-ViT's text-to-image model: tokens [time, text (L), image
# patches (N)] with one position table over E = 1 + L + N tokens, the blocks of section 1 and the
# eps head -- the network of PDM's pretrained U-ViT-S/2 (`mscoco_uvit_small.pth`, read by
# uvit_to_t2i_state_dict, section 9). Alone it is an ordinary eps model: t2i_loss, generate_images.
#
# The two-stream PDM puts a map stream of the same depth beside it. The map stream has no time or
# text tokens of its own [brief §4.1]: with x the image-stream state (E tokens) and m the map
# tokens (N: map_embed + their own positions), at every block i = 0..depth -- in-blocks, the
# mid-block, out-blocks -- [brief §4.2]:
#   1. mx  = [x, m]                          (E + N tokens) the map stream reads the image state anew
#   2. x'  = ImageBlock_i(x [, skip_x])      frozen
#   3. mx' = MapBlock_i(mx [, skip_mx])      trainable; attends over all E + N tokens
#   4. x   = x' + ZeroConv_i(mx'[:, :E])     control added to every image-stream token (time, text too)
#   5. m   = mx'[:, E:]                      the image part of mx' is used only in step 4
#   6. in-blocks push x (after step 4) and the whole mx' on their streams' skip stacks
# Then eps_pred = the image stream's head on x; m0_pred = tanh(map head(LayerNorm(m))).
# PAPER: "The auxiliary image feature output from the map stream is added back to the image stream
# via a zero-convolution layer ... our model employs encoder-decoder U-shaped transformers in both
# streams". The code's zero-convolution, Conv1d(D, D, 1) over the token axis, is a per-token
# Linear(D, D), written as one. Its weight and bias start at 0, so the control adds exactly 0.0 and
# the untrained two-stream model's eps_pred IS the pretrained T2I model's. Both losses reach the
# zero-convolutions and the map stream (through the frozen blocks' activations, not their weights).
#
# Frozen [brief §4.3, §8.6]: the whole image stream -- its text path (context_embed, and the
# words encoder), patch_embed, pos_embed, every block, the final LayerNorm, decoder_pred and
# final_layer. PAPER: "transformer layers of the image stream are kept frozen while the map stream
# is adjusted". Freezing the image head and positions as well is ControlNet's rule: the pretrained
# generator stays exactly as loaded and every change to the image goes through the zero-
# convolutions. DEVIATION: the code leaves pos_embed, norm, decoder_pred and final_layer trainable;
# train_image_head=True does the same. Trainable: the map stream (its blocks, map_embed,
# pos_embed_map, norm_map, map head) and the zero-convolutions.
#
# Map-stream initialisation [brief §4.3, §8.7]: a copy of the image-stream blocks (values, not
# shared storage) -- ControlNet's "trainable copy", and the code up to commit 15e1ed6: the map
# stream starts from blocks that already read [time, text, image] tokens instead of learning
# attention over them from random weights. DEVIATION: the released code (fb6eb68) starts it random
# and the paper does not say which was used; map_stream_init="random" reproduces the code.
# DEVIATION: the map stream has its own final LayerNorm before its head; the code applies none to
# m, so its head reads un-normalised residual features [brief §4.2, §8.9].
# DEVIATION: depth + 1 zero-convolutions, one per block; the code allocates 2 depth + 2 and uses
# the odd-indexed half (3.41 M unused parameters in the coco model [brief Appendix A]).
# QUIRK: the zero-convolutions have a bias (zero-initialised), as in the code; the paper says none.
#
# EMA [brief §8.8]: the official code copies its EMA network *before* loading the pretrained
# weights and never re-syncs it, so its EMA image stream starts random. Fix: the weights go in when
# the model is built (two_stream_from_t2i, which also copies them into the map stream), and the
# trainer builds its EMA from the model that returns -- train.py builds EMA(model) after
# stage.build(), so a stage's build() returns two_stream_from_t2i(...). train.py's optimiser and EMA take
# the parameters with requires_grad, which the constructor sets: frozen parameters are never
# updated nor averaged (the EMA state dict reads them from the model). trainable_parameters()
# lists the others.


class T2IUViT(UViTBase):
    """The image stream: U-ViT's text-to-image model, forward(x_t, t, text) -> eps_pred  [U-ViT; brief §4.1].

    x_t (B, C, h, w) noisy latent; t (B,) int64; text (B, L) ids or (B, L, D_txt) features;
    drop_text: optional (B,) bool, True -> the empty caption. Returns eps_pred (B, C, h, w).
    Built from a PDMConfig (arch "t2i"; the map fields are unused).
    """

    def __init__(self, config: PDMConfig):
        super().__init__()
        self.config = c = config
        self._build_text(c)
        self.patch_embed = PatchEmbed(c.latent_channels, c.dim, c.patch_size)
        self.extras = 1 + c.num_text_tokens                                   # time + text tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + c.num_patches, c.dim))   # PAPER: 1 x 334 x 512
        self.in_blocks, self.mid_block, self.out_blocks = uvit_blocks(c)
        self.norm = nn.LayerNorm(c.dim)
        self.decoder_pred, self.final_layer = head_layers(c.dim, c.patch_size, c.latent_channels)
        self.schedule = NoiseSchedule(c.schedule, c.num_train_steps)
        self._init_uvit()

    def embed(self, x_t: Tensor, t: Tensor, text: Tensor, drop_text: Optional[Tensor] = None) -> Tensor:
        """The image-stream tokens [time, text, image patches] + positions: (B, E, D), E = 1 + L + N."""
        extras = self.time_and_text_tokens(t, text, drop_text, x_t.dtype)     # (B, 1 + L, D)
        image = self.patch_embed(x_t)                                         # (B, C, h, w) -> (B, N, D)
        return torch.cat([extras, image], dim=1) + self.pos_embed             # (B, E, D)

    def head(self, x: Tensor) -> Tensor:
        """Final LayerNorm, then the eps head on the image tokens: (B, E, D) -> (B, C, h, w)."""
        return eps_head(self.config, self.decoder_pred, self.final_layer, self.norm(x[:, self.extras:]))

    def forward(self, x_t: Tensor, t: Tensor, text: Tensor, drop_text: Optional[Tensor] = None) -> Tensor:
        x = self.embed(x_t, t, text, drop_text)                               # (B, E, D)
        return self.head(run_uvit(x, self.in_blocks, self.mid_block, self.out_blocks))   # -> (B, C, h, w)


class TwoStreamPDM(nn.Module):
    """The two-stream PDM: forward(x_t, m_t, t, text) -> (eps_pred, m0_pred)  [PDM §2.5.2; brief §4].

    x_t (B, C, h, w), m_t (B, K, H_m, W_m), t (B,) int64, text (B, L) ids or (B, L, D_txt);
    drop_text / drop_map (B,) bool -> eps_pred (B, C, h, w), m0_pred (B, K, H_m, W_m) in (-1, 1):
    OneStreamPDM's inputs, outputs, `config`, `schedule` and `tokenize`, so pdm_loss, generate
    and load_pdm use it unchanged. Parts: image_stream (a T2IUViT, frozen: `frozen_modules`); the
    map stream (map_embed, pos_embed_map, in/mid/out_blocks_map, norm_map, decoder_pred_map,
    final_layer_map); zero_convs, one per block. Build it from a trained T2I model with
    `two_stream_from_t2i`; TwoStreamPDM(config) alone has a random image stream.
    """

    def __init__(self, config: PDMConfig):
        super().__init__()
        self.config = c = config
        K, N, D = c.num_map_bits, c.num_patches, c.dim
        self.image_stream = T2IUViT(c)
        self.schedule = self.image_stream.schedule
        self.map_embed = PatchEmbed(K, D, c.map_patch)                        # PAPER: kernel = stride = f p
        self.pos_embed_map = nn.Parameter(torch.zeros(1, N, D))              # PAPER: pos_embed_mask, 1 x 256 x 512
        self.in_blocks_map, self.mid_block_map, self.out_blocks_map = uvit_blocks(c)
        self.norm_map = nn.LayerNorm(D)                                       # DEVIATION: the code has none
        self.decoder_pred_map, self.final_layer_map = head_layers(D, c.map_patch, K)   # PAPER: p_m^2 K per token
        self.zero_convs = nn.ModuleList([nn.Linear(D, D) for _ in range(c.depth + 1)])   # one per block
        self._init_map_stream()
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def _init_map_stream(self) -> None:
        """U-ViT's init for the new layers, zero control, then the map blocks (section comment)."""
        for name, module in self.named_children():
            if name != "image_stream":                                        # keep the image stream as built
                module.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed_map, std=0.02)
        for zero_conv in self.zero_convs:                                     # PAPER: "zero initial weights"
            nn.init.zeros_(zero_conv.weight)
            nn.init.zeros_(zero_conv.bias)
        if self.config.map_stream_init == "copy":
            self.copy_image_blocks_to_map_stream()

    def copy_image_blocks_to_map_stream(self) -> None:
        """Map-stream blocks <- the image stream's (values copied, storage not shared)  [brief §8.7]."""
        s = self.image_stream
        for dst, src in [(self.in_blocks_map, s.in_blocks), (self.mid_block_map, s.mid_block),
                         (self.out_blocks_map, s.out_blocks)]:
            dst.load_state_dict(src.state_dict())

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen part (section comment): the image stream, or with train_image_head its text
        path, patch embedding and blocks only (the code's choice [brief §4.3])."""
        s = self.image_stream
        if not self.config.train_image_head:
            return [s]
        text = [s.text_encoder] if s.text_encoder is not None else []
        return text + [s.context_embed, s.patch_embed, s.in_blocks, s.mid_block, s.out_blocks]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside `frozen_modules()`: what an optimiser and an EMA need."""
        frozen = {id(p) for module in self.frozen_modules() for p in module.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    @property
    def tokenizer(self) -> Optional[WordTokenizer]:
        """The image stream's WordTokenizer (None in context mode), as OneStreamPDM.tokenizer."""
        return self.image_stream.tokenizer

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Words mode: captions -> (B, L) int64 (the image stream's tokenizer)."""
        return self.image_stream.tokenize(captions)

    def set_empty_context(self, features: Tensor) -> None:
        """Context mode: the text features of the empty caption (see UViTBase)."""
        self.image_stream.set_empty_context(features)

    def forward(self, x_t: Tensor, m_t: Tensor, t: Tensor, text: Tensor,
                drop_text: Optional[Tensor] = None, drop_map: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        B, C, h, w = x_t.shape
        s, half = self.image_stream, self.config.depth // 2
        E = s.extras + self.config.num_patches                                # image-stream tokens
        if drop_map is not None:
            m_t = torch.where(drop_map.view(B, 1, 1, 1), torch.zeros_like(m_t), m_t)   # null map
        x = s.embed(x_t, t, text, drop_text)                                  # (B, E, D)
        m = self.map_embed(m_t) + self.pos_embed_map                          # (B, K, H_m, W_m) -> (B, N, D)
        image_blocks = [*s.in_blocks, s.mid_block, *s.out_blocks]
        map_blocks = [*self.in_blocks_map, self.mid_block_map, *self.out_blocks_map]
        skips_x, skips_mx = [], []
        for i, (image_block, map_block, zero_conv) in enumerate(zip(image_blocks, map_blocks, self.zero_convs)):
            mx = torch.cat([x, m], dim=1)                                     # 1. (B, E + N, D)
            out_block = i > half
            x_out = image_block(x, skips_x.pop() if out_block else None)      # 2. (B, E, D)
            mx = map_block(mx, skips_mx.pop() if out_block else None)         # 3. (B, E + N, D)
            x = x_out + zero_conv(mx[:, :E])                                  # 4. (B, E, D)
            m = mx[:, E:]                                                     # 5. (B, N, D)
            if i < half:                                                      # 6. in-blocks
                skips_x.append(x)
                skips_mx.append(mx)
        m0_pred = map_head(self.config, self.decoder_pred_map, self.final_layer_map, self.norm_map(m))
        return s.head(x), m0_pred                                             # (B, C, h, w), (B, K, H_m, W_m)


def two_stream_from_t2i(t2i_state: dict[str, Tensor], config: PDMConfig) -> TwoStreamPDM:
    """A TwoStreamPDM whose image stream holds a trained T2I U-ViT  [brief §4.3].

    t2i_state: a T2IUViT state dict -- a T2I training checkpoint's "ema" (or "model"), or
    uvit_to_t2i_state_dict(...) of the released U-ViT-S. config: that model's PDMConfig with the
    map fields set for the maps to co-generate (arch becomes two_stream). With map_stream_init
    "copy" the map blocks are copied from the loaded ones. Build the trainer's EMA from the model
    this returns, never before the weights are in (the official code's bug [brief §8.8]).
    """
    model = TwoStreamPDM(replace(config, arch="two_stream"))
    model.image_stream.load_state_dict(t2i_state)
    if model.config.map_stream_init == "copy":
        model.copy_image_blocks_to_map_stream()
    return model


# -----------------------------------------------------------------------------
# 6. Loss                                            [PDM Alg. 1, Eq. 6-7; brief §6.1-6.3]
# -----------------------------------------------------------------------------
# One t ~ U{0..T-1} for both modalities ("the same noise scheduler is used to add noises to
# maps"); the map's noise has std 2 "so that it can flip the bits" (its absolute value must
# exceed 1). PAPER: loss = mean (eps_pred - eps)^2 + mean (M0_pred - M0)^2, weights 1 : 1.
# Condition dropout, per sample: the caption -> "" (p = 0.1, PAPER); the map input -> zeros
# (map_drop_prob, for map guidance; the map target is kept, so the model also learns to predict
# the map from the image and caption alone); the map input -> the clean M_0 (clean_map_prob, for
# given-map sampling: PDM's "use_ground_truth" mode, whose map loss is off as the answer is the
# input [brief §4.4]).


def pdm_loss(model: nn.Module, x0_image: Tensor, m0_bits: Tensor, text: Tensor, schedule: NoiseSchedule,
             config: PDMConfig, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """The joint objective [PDM Alg. 1]: {'loss', 'image', 'map'} (scalars; parts detached).

    model: a PDM (possibly compiled / DDP-wrapped; only its forward is used).
    x0_image: (B, C, h, w) scaled image latents; m0_bits: (B, K, H_m, W_m) from `encode_map`;
    text: (B, L) token ids or (B, L, D_txt) features. All randomness comes from `generator`.
    """
    B, device = x0_image.shape[0], x0_image.device
    # 1. One timestep for image and map [PDM Alg. 1].
    t = _randint(config.num_train_steps, (B,), generator, device)
    # 2. Forward process: x_t = a x_0 + s eps, M_t = a M_0 + 2 s eps_M [PDM Alg. 1; brief §6.1].
    eps = _randn(x0_image.shape, generator, x0_image)
    eps_map = _randn(m0_bits.shape, generator, m0_bits)
    x_t = schedule.q_sample(x0_image, t, eps)
    m_t = schedule.q_sample(m0_bits, t, eps_map, config.map_noise_scale)
    # 3. Condition dropout (see the section comment).
    drop_text = dropout_mask(B, config.text_drop_prob, generator, device)
    drop_map = dropout_mask(B, config.map_drop_prob, generator, device)
    clean = dropout_mask(B, config.clean_map_prob, generator, device) & ~drop_map
    m_in = torch.where(clean.view(B, 1, 1, 1), m0_bits, m_t)
    # 4. Predictions and the two mean squared errors.
    eps_pred, m0_pred = model(x_t, m_in, t, text, drop_text=drop_text, drop_map=drop_map)
    loss_image = (eps_pred.float() - eps).pow(2).mean()
    map_se = (m0_pred.float() - m0_bits).pow(2).flatten(1).mean(1)           # (B, K, H_m, W_m) -> (B,)
    loss_map = (map_se * (~clean).float()).mean()
    loss = loss_image + config.map_loss_weight * loss_map
    return {"loss": loss, "image": loss_image.detach(), "map": loss_map.detach()}


def t2i_loss(model: nn.Module, x0_image: Tensor, text: Tensor, schedule: NoiseSchedule,
             config: PDMConfig, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """The image stream's objective, ||eps_pred - eps||^2 [DDPM Eq. 14; U-ViT t2i]: {'loss', 'image'}.

    model: a T2IUViT; x0_image (B, C, h, w) scaled latents; text as pdm_loss. The caption is
    dropped to "" with text_drop_prob (PAPER: U-ViT's p_uncond = 0.1, as PDM [brief §6.3]).
    """
    B, device = x0_image.shape[0], x0_image.device
    t = _randint(config.num_train_steps, (B,), generator, device)
    eps = _randn(x0_image.shape, generator, x0_image)
    x_t = schedule.q_sample(x0_image, t, eps)                                 # x_t = a x_0 + s eps
    drop_text = dropout_mask(B, config.text_drop_prob, generator, device)
    loss = (model(x_t, t, text, drop_text=drop_text).float() - eps).pow(2).mean()
    return {"loss": loss, "image": loss.detach()}


# -----------------------------------------------------------------------------
# 7. Guidance and sampling                  [CFG, Ho & Salimans 2022; PDM brief §6.4-6.5, §8]
# -----------------------------------------------------------------------------
# Write e(c, M) for the model's output pair (eps_pred, m0_pred) with caption c and map input M_t,
# "" for the empty caption and 0 for the null map. Guidance, applied alike to both parts (PDM's
# code guides eps and M0 with text [brief §6.4]):
#   e~ = e(c, M) + (s_text - 1) [e(c, M) - e("", M)] + (s_map - 1) [e(c, M) - e(c, 0)]
# Each term removes one condition and keeps the other, so s_map = 1 is plain text CFG in
# sample.py's convention (e("", M) + s_text [e(c, M) - e("", M)]; PDM's s is s_text - 1), s_text = 1
# is plain map CFG, and s_text = s_map = 1 is the conditional prediction, one model call. The code
# history's commented-out three-way form, e_c + s (e_c - e("", M)/2 - e(c, 0)/2) [brief §6.4 (b)],
# is this formula with s_text = s_map = 1 + s/2. Only the branches a scale needs are evaluated, in
# one batch.
#
# Sampling integrates the pair (image eps-prediction, noise scale 1; map x0-prediction, noise
# scale 2) with sample.py's DPM-Solver++ or DDIM, one t for both. The map starts from
# N(0, map_init_std^2), map_init_std = 2 by default (see the charter), and both samplers end on
# the model's last x0 estimate. Given-map mode: the map part is a KnownRegion with clean=True and
# mask 1, so the model sees the clean given map at every step -- the image is generated *for* that
# map -- and the returned map is the given map exactly. PAPER: "when ground-truth maps are
# provided as conditions, the diffusion model will focus solely on predicting the images"; a
# co-generation model reads a clean map at high t only if trained on some (clean_map_prob).
# The image stream alone (T2IUViT) is an ordinary eps model: generate_images runs the same
# samplers on it with text guidance only, through sample.py's classifier_free_guidance.


def guided_denoiser(model: nn.Module, text: Tensor, text_scale: float = 1.0,
                    map_scale: float = 1.0) -> Callable[[tuple[Tensor, Tensor], Tensor], tuple[Tensor, Tensor]]:
    """A sampler model ((x_t, m_t), t) -> (eps, m0) with text and map guidance (section comment)."""
    branches = [(False, False)]                                 # (drop text, drop map): e(c, M)
    if text_scale != 1.0:
        branches.append((True, False))                          # e("", M)
    if map_scale != 1.0:
        branches.append((False, True))                          # e(c, 0)

    def denoise(state: tuple[Tensor, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
        x_t, m_t = state
        B, n, device = x_t.shape[0], len(branches), x_t.device
        drop_text = torch.tensor([d for d, _ in branches], device=device).repeat_interleave(B)   # (n B,)
        drop_map = torch.tensor([d for _, d in branches], device=device).repeat_interleave(B)
        out = model(torch.cat([x_t] * n), torch.cat([m_t] * n), torch.cat([t] * n), torch.cat([text] * n),
                    drop_text=drop_text, drop_map=drop_map)                                     # 2 x (n B, ...)
        guided = []
        for part in out:
            chunks = part.float().chunk(n)                                    # (n B, ...) -> n x (B, ...)
            cond, rest = chunks[0], list(chunks[1:])
            g = cond
            if text_scale != 1.0:
                g = g + (text_scale - 1.0) * (cond - rest.pop(0))
            if map_scale != 1.0:
                g = g + (map_scale - 1.0) * (cond - rest.pop(0))
            guided.append(g)
        return guided[0], guided[1]
    return denoise


def _model_text(model: nn.Module, text: Text) -> Tensor:
    """Captions -> token ids (words mode); tensors are moved to the model's device."""
    if isinstance(text, Tensor):
        return text.to(next(model.parameters()).device)
    return model.tokenize(list(text))


@torch.no_grad()
def generate(model: nn.Module, text: Text, *, sampler: Optional[str] = None, steps: Optional[int] = None,
             order: Optional[int] = None, method: Optional[str] = None, text_scale: Optional[float] = None,
             map_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
             given_map: Optional[Tensor] = None, map_init_std: Optional[float] = None,
             callback=None) -> tuple[Tensor, Tensor]:
    """Co-generate image latents and map bits for B captions  [PDM Alg. 2; brief §6.5].

    text: B captions (words mode), (B, L) token ids, or (B, L, D_txt) features. Options left at
    None take the model config's defaults (sampler, sample_steps, sample_order, sample_method,
    text_scale, map_scale; map_init_std = map_noise_scale). sampler 'dpm++' (method 'multistep'
    or 'singlestep', order 1-3) or 'ddim' (eta 0, trailing spacing from t = T-1).
    given_map: (B, K, H_m, W_m) clean bits -> the image is generated for this map (given-map mode).
    generator: the initial noise. callback: sample.py's callback(i, t, x_t, x0_pred).
    Returns x0_image (B, C, h, w) and m0_bits (B, K, H_m, W_m), float32, the final x0 estimates.
    """
    c = model.config
    text = _model_text(model, text)
    B, device = text.shape[0], text.device
    # DEVIATION: the map starts at std 2 like training's M_T, not at the code's std 1 (charter).
    map_std = c.map_noise_scale if map_init_std is None else map_init_std
    probe = torch.empty(0, device=device)
    x_T = (_randn((B, c.latent_channels, c.latent_size, c.latent_size), generator, probe),
           map_std * _randn((B, c.num_map_bits, c.map_size, c.map_size), generator, probe))
    known = None
    if given_map is not None:
        want = (B, c.num_map_bits, c.map_size, c.map_size)
        if tuple(given_map.shape) != want:
            raise ValueError(f"given_map must be (B, K, H_m, W_m) = {want} (encode_map's bits), got {tuple(given_map.shape)}")
        given = given_map.to(device, torch.float32)
        known = (None, KnownRegion(given, torch.ones_like(given), clean=True))
    denoise = guided_denoiser(model, text, c.text_scale if text_scale is None else text_scale,
                              c.map_scale if map_scale is None else map_scale)
    return _run_sampler(model, denoise, x_T, sampler=sampler, steps=steps, order=order, method=method,
                        prediction=("eps", "x0"), noise_scale=(1.0, c.map_noise_scale), known=known,
                        generator=generator, callback=callback)


def text_guided_eps(model: nn.Module, text: Tensor, text_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """A sampler model (x_t, t) -> eps for a T2IUViT: sample.py's classifier-free guidance over
    [caption, ""] in one doubled batch; text_scale = 1 is the conditional prediction, one call."""
    if text_scale == 1.0:
        return lambda x_t, t: model(x_t, t, text).float()
    B = text.shape[0]
    drop = torch.arange(2 * B, device=text.device) >= B                      # (2B,): [cond, uncond] halves
    doubled = torch.cat([text, text])                                        # (2B, L[, D_txt])
    return classifier_free_guidance(lambda x2, t2: model(x2, t2, doubled, drop_text=drop).float(), text_scale)


@torch.no_grad()
def generate_images(model: nn.Module, text: Text, *, sampler: Optional[str] = None, steps: Optional[int] = None,
                    order: Optional[int] = None, method: Optional[str] = None, text_scale: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, callback=None) -> Tensor:
    """Text-to-image with a T2IUViT, the image stream alone  [U-ViT; brief §6.5 without the map].

    Options as generate()'s (None -> the config's defaults); x_T ~ N(0, I) from `generator`.
    Returns x0_image (B, C, h, w) float32, the final x0 estimate.
    """
    c = model.config
    text = _model_text(model, text)
    probe = torch.empty(0, device=text.device)
    x_T = _randn((text.shape[0], c.latent_channels, c.latent_size, c.latent_size), generator, probe)
    denoise = text_guided_eps(model, text, c.text_scale if text_scale is None else text_scale)
    return _run_sampler(model, denoise, x_T, sampler=sampler, steps=steps, order=order, method=method,
                        prediction="eps", noise_scale=1.0, known=None, generator=generator, callback=callback)


def _run_sampler(model: nn.Module, denoise: Callable, x_T, *, sampler: Optional[str], steps: Optional[int],
                 order: Optional[int], method: Optional[str], prediction, noise_scale, known,
                 generator: Optional[torch.Generator], callback):
    """sample.py's DPM-Solver++ or DDIM on `denoise` from x_T; options left at None from model.config."""
    c = model.config
    common = dict(steps=steps or c.sample_steps, prediction=prediction, noise_scale=noise_scale,
                  known=known, generator=generator, callback=callback)
    sampler = sampler or c.sampler
    if sampler == "dpm++":
        return dpm_solver_pp_sample(denoise, x_T, model.schedule, order=order or c.sample_order,
                                    method=method or c.sample_method, **common)
    if sampler == "ddim":
        # set_alpha_to_one: the last step returns the last x0 estimate itself (as the map needs).
        return ddim_sample(denoise, x_T, model.schedule, spacing="trailing", set_alpha_to_one=True, **common)
    raise ValueError(f"unknown sampler {sampler!r}: choose dpm++ or ddim")


# -----------------------------------------------------------------------------
# 8. Evaluation helpers                      [Shapes captions (data.py §3); PDM brief §7.1]
# -----------------------------------------------------------------------------
# Does a generated map hold what the caption asks for? Shapes captions name how many things of
# each (colour, kind) an image holds; a generated category map gives, per kind, its connected
# components -- or, for a panoptic map (config.panoptic), its segments: the distinct (category,
# instance id) pairs, so touching things of one kind still count as two. All are plain functions
# so evaluate.py can count, compare and report.

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8}                 # the number words data._caption writes
_THING_PATTERN = re.compile(r"\b({})\s+({})\s+({})s?\b".format(
    "|".join(_COUNT_WORDS), "|".join(SHAPES_COLOURS), "|".join(SHAPES_THINGS)))


def caption_counts(caption: str) -> dict[tuple[str, str], int]:
    """'two red circles and an orange square on grass under a sky' ->
    {('red', 'circle'): 2, ('orange', 'square'): 1}. Stuff words are ignored."""
    counts: dict[tuple[str, str], int] = {}
    for number, colour, kind in _THING_PATTERN.findall(caption.lower()):
        counts[(colour, kind)] = counts.get((colour, kind), 0) + _COUNT_WORDS[number]
    return counts


def _edges(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Flat pixel-index pairs (a, b) of 4-neighbours with the same non-void id: (E,), (E,)."""
    H, W = ids.shape
    index = torch.arange(H * W, device=ids.device).view(H, W)
    right = (ids[:, :-1] == ids[:, 1:]) & (ids[:, :-1] != 0)                  # (H, W-1)
    down = (ids[:-1] == ids[1:]) & (ids[:-1] != 0)                            # (H-1, W)
    a = torch.cat([index[:, :-1][right], index[:-1][down]])
    b = torch.cat([index[:, 1:][right], index[1:][down]])
    return a, b


def connected_components(ids: Tensor) -> Tensor:
    """4-connected components of equal non-void ids: (H, W) int -> (H, W) int64, 1..n, void 0.

    Components are numbered in raster order of their first pixel. Vectorised label propagation
    with pointer jumping (Shiloach-Vishkin style): every pixel points at a root; each round hooks
    the root of every edge's endpoints to the smaller of the two roots, then compresses the
    pointers fully. Roots only ever decrease, so no cycle forms, and the loop ends when no edge
    joins two roots -- each component's root is then its smallest pixel index. Rounds grow with
    the logarithm of the component size for compact shapes (an adversarial spiral needs more).
    """
    ids = torch.as_tensor(ids)
    H, W = ids.shape
    a, b = _edges(ids)
    root = torch.arange(H * W, device=ids.device)                             # (H W,) pointers
    while True:
        ra, rb = root[a], root[b]
        low = torch.minimum(ra, rb)
        hooked = root.clone()
        hooked.scatter_reduce_(0, ra, low, reduce="amin")                     # a's root -> min root
        hooked.scatter_reduce_(0, rb, low, reduce="amin")
        while True:                                                          # full path compression
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, root):
            break
        root = hooked
    valid = ids.reshape(-1) != 0
    labels = torch.zeros(H * W, dtype=torch.long, device=ids.device)
    # Roots are components' first pixels, so sorted unique roots are numbered in raster order.
    labels[valid] = torch.unique(root[valid], return_inverse=True)[1] + 1
    return labels.view(H, W)


def component_counts(category: Tensor, min_area: int = 1) -> dict[int, int]:
    """Connected components of at least `min_area` pixels per category id: (H, W) -> {id: n}."""
    category = torch.as_tensor(category).long()
    labels = connected_components(category).reshape(-1)                       # (H W,) 0..n
    sizes = torch.bincount(labels)                                            # (n + 1,) pixels per label
    # Every pixel of a component has the component's category: any one write per label will do.
    cat_of = torch.zeros_like(sizes).scatter_(0, labels, category.reshape(-1))   # (n + 1,)
    kept = cat_of[1:][sizes[1:] >= min_area]
    return {int(k): int(n) for k, n in zip(*torch.unique(kept, return_counts=True))}


def instance_counts(category: Tensor, instance: Tensor, min_area: int = 1) -> dict[int, int]:
    """Segments of at least `min_area` pixels per category id of a panoptic map: (H, W) x 2 -> {id: n}.

    A segment is one (category, instance id) pair, wherever its pixels lie (an occluded thing in two
    pieces is one); instance id 0 (void instance bits) and category 0 form none.
    """
    pairs = torch.stack([torch.as_tensor(category).long().reshape(-1),
                         torch.as_tensor(instance).long().reshape(-1)])              # (2, H W)
    pairs, sizes = torch.unique(pairs, dim=1, return_counts=True)                     # (2, S), (S,)
    kept = pairs[0][(pairs[0] > 0) & (pairs[1] > 0) & (sizes >= min_area)]
    return {int(k): int(n) for k, n in zip(*torch.unique(kept, return_counts=True))}


# -----------------------------------------------------------------------------
# 9. Building and loading
# -----------------------------------------------------------------------------


def build_model(config: PDMConfig) -> nn.Module:
    """The network `config.arch` names: OneStreamPDM, TwoStreamPDM or T2IUViT (the image stream).

    A TwoStreamPDM built here has a random image stream (what load_pdm then fills); to start
    training one from a trained image stream use two_stream_from_t2i.
    """
    archs = {"one_stream": OneStreamPDM, "two_stream": TwoStreamPDM, "t2i": T2IUViT}
    if config.arch not in archs:
        raise ValueError(f"unknown arch {config.arch!r}")
    return archs[config.arch](config)


def num_parameters(model: nn.Module) -> int:
    """Total parameter count (works on the meta device: only shapes are read)."""
    return sum(p.numel() for p in model.parameters())


def load_pdm(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Rebuild a PDM from a checkpoint dict (train.load_checkpoint): config + (EMA) weights, eval mode.

    Any arch (one_stream, two_stream, t2i); a TwoStreamPDM's frozen parameters are frozen again by
    its constructor. Words mode needs nothing else: the tokenizer is rebuilt from config.vocab, which train.py's
    cogen stage built from the training captions (WordTokenizer.build) and saved in model_config.
    """
    model = build_model(PDMConfig(**ckpt["model_config"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()


def load_image_ae(ckpt: dict) -> ImageAutoencoder:
    """The frozen image autoencoder a `train.py --stage cogen` checkpoint carries, in eval mode.

    ckpt["image_ae"] = {"config": ImageAEConfig as a dict, "weights": state dict}; the config's
    scale_factor is the latent scale s the PDM was trained with (x_0 = s * latent).
    """
    if "image_ae" not in ckpt:
        raise ValueError("this checkpoint carries no image autoencoder (not a train.py --stage cogen run)")
    ae = ImageAutoencoder(ImageAEConfig(**ckpt["image_ae"]["config"]))
    ae.load_state_dict(ckpt["image_ae"]["weights"])
    return ae.requires_grad_(False).eval()


@torch.no_grad()
def decode_images(autoencoder: ImageAutoencoder, x0_image: Tensor) -> Tensor:
    """Generated latents (B, C, h, w), scaled by s -> images (B, 3, H, W) float32 in [-1, 1]."""
    z = x0_image.to(next(autoencoder.parameters()).device) / autoencoder.config.scale_factor
    return autoencoder.decode(z).float().clamp(-1, 1)


# The released U-ViT t2i checkpoint (`mscoco_uvit_small.pth`: U-ViT's libs/uvit_t2i.py `UViT` with
# mlp_time_embed=False and conv=True, saved as the plain state dict of its network) holds
#   pos_embed                               (1, 1 + L + N, D)           coco: (1, 334, 512)
#   patch_embed.proj.{weight, bias}         (D, C, p, p), (D,)
#   context_embed.{weight, bias}            (D, D_txt), (D,)
#   {in_blocks.i, mid_block, out_blocks.i}  .norm1, .attn.qkv (weight only: qkv_bias=False),
#                                           .attn.proj, .norm2, .mlp.fc1, .mlp.fc2 (weight, bias)
#   out_blocks.i.skip_linear.{weight, bias} (D, 2D), (D,)
#   norm, decoder_pred (p^2 C, D), final_layer (C, C, 3, 3)      (weight, bias)
# and no time_embed (an Identity there). T2IUViT's names are U-ViT's (section 1), so the key map is
# the identity on all of these. Ours alone: `empty_text` (U-ViT keeps CLIP("") in
# assets/contexts/empty_context.npy) and, in words mode, the text encoder -- U-ViT reads CLIP
# features, so only context mode fits its weights. U-ViT's time token embeds n = t + 1 (its steps
# run 1..1000 after a prepended beta_0 = 0, brief §3.2), so its weights need time_offset = 1.

_OURS_ONLY = ("empty_text",)          # T2IUViT state-dict keys with no U-ViT counterpart


def _key_mismatches(got: dict[str, Tensor], expected: dict[str, torch.Size]) -> list[str]:
    """One line each for the missing, unexpected and mis-shaped keys of `got` (none: [])."""
    def listed(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    misshaped = [f"{k} {tuple(got[k].shape)} (model: {tuple(expected[k])})"
                 for k in sorted(got.keys() & expected.keys()) if tuple(got[k].shape) != tuple(expected[k])]
    return [f"{what} ({len(items)}): {listed(items)}" for what, items in
            [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)] if items]


def uvit_to_t2i_state_dict(uvit_state: dict[str, Tensor], config: PDMConfig,
                           empty_context: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The released U-ViT t2i weights as a T2IUViT(config) state dict (see the comment above).

    uvit_state: torch.load("mscoco_uvit_small.pth", weights_only=True); a DDP "module." prefix is
    dropped. config: context mode, time_offset = 1, the sizes of the file (the coco preset for
    U-ViT-S/2). empty_context: (L, D_txt) CLIP features of "" (U-ViT's empty_context.npy); zeros
    when None -- set them (set_empty_context) before guided sampling.
    Raises ValueError naming every missing, unexpected and mis-shaped key. Then
    two_stream_from_t2i(state, config) builds the two-stream PDM on it.
    """
    if config.text_encoder != "context":
        raise ValueError("the released U-ViT reads CLIP features: build with text_encoder='context'")
    if config.time_offset != 1:
        raise ValueError("U-ViT's time token embeds n = t + 1: build with time_offset=1 for its weights")
    with torch.device("meta"):                                                # shapes only, no memory
        expected = {k: v.shape for k, v in T2IUViT(config).state_dict().items() if k not in _OURS_ONLY}
    state = {k.removeprefix("module."): v for k, v in uvit_state.items()}
    problems = _key_mismatches(state, expected)
    if problems:
        raise ValueError("the U-ViT state dict does not fit T2IUViT(config):\n  " + "\n  ".join(problems))
    shape = (1, config.num_text_tokens, config.context_dim)
    state["empty_text"] = torch.zeros(shape) if empty_context is None else empty_context.reshape(shape).float()
    return state


def t2i_to_uvit_state_dict(t2i_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse: a context-mode T2IUViT state dict in U-ViT's layout (empty_text left out)."""
    return {k: v for k, v in t2i_state.items() if k not in _OURS_ONLY}

# SPDX-License-Identifier: MIT
"""
cogen.py -- PDM: co-generation of an image and its segmentation map from a caption.

Implements Long & Roy, "Panoptic Diffusion Models: co-generation of images and segmentation maps",
arXiv 2412.02929 (CVPR 2025 workshop; official code: a fork of U-ViT, Bao et al., arXiv 2209.12152).
Paper and official-code details are summarised in docs/papers/pdm.md ("PDM brief §x" below).
One U-ViT reads a time token, the caption's tokens, the noisy image-latent patches and the noisy
map-bit patches as one sequence, and predicts the image noise eps and the clean map bits M_0.

Contents (`grep -n '^# [0-9]' cogen.py`)
  1. U-ViT blocks              attention (SDPA beside the explicit softmax), MLP, pre-LN block with
                               an optional long-skip input, patchify / unpatchify  [U-ViT; brief §3.3]
  2. Maps and Multi-Scale Patching   min-pooling of category ids from a nearest-resized map; category
                               ids as analog bits (MSB first, void = id 0); optional instance bits
                               [PDM §2.1, Table 2; brief §2.4-2.5, §5]
  3. Text                      a word-level tokenizer built from the training captions, a small
                               transformer text encoder, condition dropout  [brief §2.3, §6.3]
  4. One-stream model          PDMConfig (presets tiny / shapes / coco), OneStreamPDM: tokens
                               [time, text, image patches, map patches], image head (eps), map head
                               (x0 through tanh)  [PDM brief §3]
  5. Loss                      one t for image and map, map noise std 2, ||eps_pred - eps||^2 +
                               ||M0_pred - M0||^2, text / map dropout  [PDM Alg. 1; brief §6]
  6. Guidance and sampling     classifier-free text and map guidance; generate(): DPM-Solver++ or
                               DDIM on the (image eps, map x0) pair; given-map mode  [brief §6.4-6.5]
  7. Evaluation helpers        caption_counts (Shapes captions), connected_components (4-connected,
                               vectorised), components per category
  8. Building and loading      build_model(config), load_pdm(checkpoint)
The two-stream model (PDM §2.5.2, brief §4) is not written yet; it will be its own section after 4.
Sections 5-8 only use a model's forward signature, `config`, `schedule` and `tokenize`, so it
plugs in unchanged.

Run
  python -m pytest tests/test_cogen.py checks every part on tiny models. The training stage
  (train.py --stage cogen) and the sampling / evaluation commands are not written yet; until then
  the model is used from Python: build_model, pdm_loss, generate.

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
    guides with the formula of section 6. The released code trains with no map dropout.
  * DEVIATION: no unused `mask_embed_0` (a second map patch embedding the code allocates and never
    calls), so the `coco` preset has 44,956,012 parameters, not the brief's 45,022,060 (44.96 M
    vs 45.02 M; the difference is exactly that layer, 66,048 parameters).
  * DEVIATION: `text_encoder="words"` (the Shapes default) replaces frozen CLIP ViT-L/14 by a
    word-level tokenizer and a small transformer trained jointly: nothing is downloaded. CLIP
    features computed elsewhere are read as `text_encoder="context"`, as the paper.
  * DEVIATION: the time token embeds the schedule index t in [0, T); PDM's code embeds n = t + 1.
  * DEVIATION: attention runs in the autocast dtype; U-ViT casts q, k, v to float32 before SDPA.
  * Options, off by default (the paper's behaviour): `void_aware_pooling` (void wins a pooled
    block only when the block is all void), `panoptic` (instance bits beside the category bits),
    `clean_map_prob` (train some samples on the clean map, PDM's "given maps" mode [brief §4.4]).

Left out
  The two-stream model (to come); everything the code holds but the paper does not use: map
  self-conditioning, cross-entropy on bits, separate MLPs for map tokens, a UNet backbone
  [brief §8.15]. Latent scale (0.23010 for COCO's SD VAE, brief §2.2) belongs to the image
  autoencoder's config (ldmseg.ImageAEConfig.scale_factor).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from data import SHAPES_COLOURS, SHAPES_THINGS, bits_to_ids, ids_to_bits, num_bits_for, remap_ids
from ldmseg import _as_tuples, _preset, _rand, _randn, attention, timestep_embedding
from sample import KnownRegion, NoiseSchedule, ddim_sample, dpm_solver_pp_sample

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


@dataclass
class PDMConfig:
    """PDM's network, map encoding, diffusion and sampling defaults. Defaults = `coco` (the paper)."""

    arch: str = "one_stream"                 # one_stream [brief §3]; two_stream is not written yet
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
        checks = {"arch must be one_stream (the two-stream model is not written yet)": self.arch == "one_stream",
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


class OneStreamPDM(nn.Module):
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
        block = lambda skip: Block(D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip)
        self.in_blocks = nn.ModuleList([block(False) for _ in range(c.depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(True) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, c.patch_size ** 2 * c.latent_channels)
        self.final_layer = nn.Conv2d(c.latent_channels, c.latent_channels, 3, padding=1)
        self.decoder_pred_map = nn.Linear(D, c.map_patch ** 2 * K)            # PAPER: p_m^2 K per token
        self.final_layer_map = nn.Conv2d(K, K, 3, padding=1)
        self.schedule = NoiseSchedule(c.schedule, c.num_train_steps)
        self.apply(_init_weights)
        for p in self._position_tables():
            nn.init.trunc_normal_(p, std=0.02)

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

    def forward(self, x_t: Tensor, m_t: Tensor, t: Tensor, text: Tensor,
                drop_text: Optional[Tensor] = None, drop_map: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        B, C, h, w = x_t.shape
        c, N = self.config, self.config.num_patches
        if drop_map is not None:
            m_t = torch.where(drop_map.view(B, 1, 1, 1), torch.zeros_like(m_t), m_t)   # null map
        time_token = timestep_embedding(t, c.dim)[:, None].to(x_t.dtype)     # (B,) -> (B, 1, D)
        context = self.embed_text(text, drop_text)                           # (B, L, D)
        image = self.patch_embed(x_t)                                         # (B, C, h, w) -> (B, N, D)
        maps = self.map_embed(m_t)                                            # (B, K, H_m, W_m) -> (B, N, D)
        x = torch.cat([time_token, context, image, maps], dim=1) + self.pos_embed   # (B, 1 + L + 2N, D)
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.norm(x)
        return self.heads(x[:, self.extras:self.extras + N], x[:, self.extras + N:])

    def heads(self, image_tokens: Tensor, map_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) each -> eps_pred (B, C, h, w), m0_pred (B, K, H_m, W_m)  [brief §3.4]."""
        c = self.config
        grid = (c.latent_size // c.patch_size,) * 2
        eps = unpatchify(self.decoder_pred(image_tokens), c.latent_channels, grid)   # (B, N, p^2 C) -> (B, C, h, w)
        m0 = unpatchify(self.decoder_pred_map(map_tokens), c.num_map_bits, grid)      # -> (B, K, H_m, W_m)
        # PAPER: tanh bounds the clean-bit prediction to (-1, 1) (code commit 15e1ed6).
        return self.final_layer(eps), torch.tanh(self.final_layer_map(m0))


# -----------------------------------------------------------------------------
# 5. Loss                                            [PDM Alg. 1, Eq. 6-7; brief §6.1-6.3]
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
    t = torch.randint(0, config.num_train_steps, (B,), generator=generator).to(device)
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


# -----------------------------------------------------------------------------
# 6. Guidance and sampling                  [CFG, Ho & Salimans 2022; PDM brief §6.4-6.5, §8]
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
        given = given_map.to(device, torch.float32)
        known = (None, KnownRegion(given, torch.ones_like(given), clean=True))
    denoise = guided_denoiser(model, text, c.text_scale if text_scale is None else text_scale,
                              c.map_scale if map_scale is None else map_scale)
    common = dict(steps=steps or c.sample_steps, prediction=("eps", "x0"), noise_scale=(1.0, c.map_noise_scale),
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
# 7. Evaluation helpers                      [Shapes captions (data.py §3); PDM brief §7.1]
# -----------------------------------------------------------------------------
# Does a generated map hold what the caption asks for? Shapes captions name how many things of
# each (colour, kind) an image holds; a generated category map gives, per kind, its connected
# components. Both are plain functions so evaluate.py can count, compare and report.

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


# -----------------------------------------------------------------------------
# 8. Building and loading
# -----------------------------------------------------------------------------


def build_model(config: PDMConfig) -> nn.Module:
    """The network `config.arch` names (one_stream; the two-stream model will join here)."""
    if config.arch == "one_stream":
        return OneStreamPDM(config)
    raise ValueError(f"unknown arch {config.arch!r}")


def num_parameters(model: nn.Module) -> int:
    """Total parameter count (works on the meta device: only shapes are read)."""
    return sum(p.numel() for p in model.parameters())


def load_pdm(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Rebuild a PDM from a checkpoint dict (train.load_checkpoint): config + (EMA) weights, eval mode."""
    model = build_model(PDMConfig(**ckpt["model_config"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()

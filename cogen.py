# SPDX-License-Identifier: MIT
"""
cogen.py -- PDM: co-generation of an image and its segmentation map from a caption.

Implements Long & Roy, "Panoptic Diffusion Models: co-generation of images and segmentation maps",
arXiv 2412.02929 (official code: a fork of U-ViT). Paper and official-code details are summarised in
docs/papers/pdm.md ("PDM brief §x" below).

Planned contents (this file is a charter: nothing below is implemented yet, and nothing imports it)
  1. U-ViT blocks              pre-LayerNorm attention + MLP, sinusoidal time token, learned
                               positions, long skips [U-ViT; PDM brief §3]
  2. Multi-Scale Patching      map at f x the latent resolution, map patch f x the image patch, so both
                               give the same token count; min-pooling of category ids; nearest
                               resizing of label maps [PDM brief §5]
  3. One-stream model          one token sequence [time, text, image patches, map patches]; an
                               image head (eps) and a map head (x0 through tanh) [PDM brief §3]
  4. Two-stream model          a frozen pretrained image stream, a trainable map stream, one
                               zero-initialised projection per block [PDM brief §4]
  5. Text encoder              word-level tokenizer from the training captions + a small transformer,
                               or precomputed CLIP features from disk [PDM brief §2.3]
  6. Loss and guidance         ||eps_pred - eps||^2 + ||M0_pred - M0||^2 with map noise std 2;
                               classifier-free text and map guidance [PDM brief §6]

Sampling uses sample.py's DPM-Solver++ on the (image eps, map x0) pair, the official code's sign
error fixed [PDM brief §8.3].
"""

"""Tests of mask inpainting (ldmseg.py §11, sample.py --task inpaint, evaluate.py --task inpaint)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import ldmseg


@pytest.mark.parametrize("given", [0.1, 0.5, 0.9])
def test_sparse_mask_keeps_blocks_with_probability_given(given):
    g = torch.Generator().manual_seed(0)
    share = torch.stack([ldmseg.sparse_known_mask(16, 16, given, block=2, generator=g) for _ in range(200)]).mean()
    assert share.item() == pytest.approx(given, abs=0.02)


def test_sparse_masks_are_nested_across_fractions_for_one_seed():
    lo = ldmseg.sparse_known_mask(16, 16, 0.3, generator=torch.Generator().manual_seed(5))
    hi = ldmseg.sparse_known_mask(16, 16, 0.7, generator=torch.Generator().manual_seed(5))
    assert bool((hi >= lo).all()) and hi.sum() > lo.sum()


@pytest.mark.parametrize("given", [0.1, 0.5, 0.9])
def test_global_mask_hides_exactly_the_budget_in_large_regions(given):
    m = ldmseg.global_known_mask(16, 16, given, generator=torch.Generator().manual_seed(1))
    assert int((m == 0).sum()) == round((1 - given) * 256)


def test_global_mask_rectangles_are_the_official_generator_s():
    """BEiT's rectangles: target area U(4/1024, 1/8) of the grid, strictly smaller than it both ways."""
    g = torch.Generator().manual_seed(0)
    boxes = [ldmseg._block_rectangle(32, 32, 4, 128, g) for _ in range(500)]
    kept = [b for b in boxes if b is not None]
    assert len(kept) > 400
    for top, lft, rh, rw in kept:
        assert 1 <= rh < 32 and 1 <= rw < 32 and top + rh <= 32 and lft + rw <= 32
        assert rh * rw <= 1.5 * 128                                          # the target area, rounded
    assert max(rh * rw for *_, rh, rw in kept) > 64
    assert ldmseg._block_rectangle(4, 4, 16, 16, g) is None                  # the whole grid: never


def test_known_cells_need_every_pixel_known():
    px = torch.zeros(16, 16, dtype=torch.bool)
    px[:8, :8] = True
    px[8:, 8:15] = True                                                      # one column short of a full cell
    assert ldmseg.known_cells_from_pixels(px).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_too_many_given_segments_is_a_clear_error():
    with pytest.raises(ValueError, match="holds 15 ids"):
        ldmseg.codes_for_given_ids(torch.arange(20).reshape(4, 5), 4)


def test_a_raster_model_gets_its_given_segments_numbered_in_first_pixel_order():
    given = torch.tensor([[0, 0, 52, 52],
                          [8, 8, 52, 0],
                          [0, 3, 3, 3]])
    assert ldmseg.codes_for_given_ids(given, 4, order="raster") == {52: 1, 8: 2, 3: 3}
    random = ldmseg.codes_for_given_ids(given, 4, torch.Generator().manual_seed(0))
    assert sorted(random) == [3, 8, 52] and len(set(random.values())) == 3


class IdealCodec:
    """An exact 'autoencoder' for maps constant on 8x8 cells: latent = bits averaged per cell (K = 4)."""

    def encode_ids(self, ids):
        return F.avg_pool2d(data.ids_to_bits(ids, 4), 8)

    def decode_latent(self, z, size):
        codes = data.ids_to_bits(torch.arange(16).view(1, 16, 1), 4)[0, :, :, 0].T   # (16, 4) bits of each id
        logits = 20 * (torch.einsum("ck,bkhw->bchw", codes, z) - 3.0)   # > 0 only for the exact code
        return F.interpolate(logits, size=size, mode="nearest")


def test_given_ids_survive_inpainting_with_an_ideal_autoencoder(monkeypatch):
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    codec = IdealCodec()
    monkeypatch.setattr(model, "encode_ids", codec.encode_ids)
    monkeypatch.setattr(model, "decode_latent", codec.decode_latent)
    # Denoiser oracle that knows nothing: it predicts x0 = 0, i.e. eps = z_t / sigma_t.
    monkeypatch.setattr(model, "forward", lambda z_t, t, z_image, x0_self=None:
                        z_t / model.schedule.sigma(t).view(-1, 1, 1, 1))
    gt = torch.zeros(32, 32, dtype=torch.long)
    gt[:, :16], gt[:, 16:] = 1000, 77                                         # user ids, any integers
    gt[:8, 16:24] = 5
    cells = torch.tensor([[1.0, 0, 1, 1], [1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 1, 0]])
    pixel = cells.repeat_interleave(8, 0).repeat_interleave(8, 1).bool()
    out, own = ldmseg.inpaint(model, torch.zeros(1, 3, 32, 32), torch.where(pixel, gt, 0), cells, steps=5,
                              fit_steps=0, guide_steps=0, generator=torch.Generator().manual_seed(0))  # sampler alone
    assert torch.equal(own[pixel], gt[pixel])                               # the model's own output keeps them
    assert torch.equal(out[pixel], gt[pixel]) and (own[~pixel] == 0).all()    # nothing invented


def test_a_matched_model_s_given_segments_take_the_names_its_own_segmentation_draws(monkeypatch):
    """A match_ids model draws its own names (ldmseg.py section 8): here it always draws the left half as 9 and
    the right as 3. Given segments there must take those codes, or the names fight and the given ids are lost."""
    import dataclasses
    config = dataclasses.replace(ldmseg.LDMSegConfig.preset("tiny"), prediction="x0", match_ids=True)
    model = ldmseg.LDMSeg(config).eval()
    codec = IdealCodec()
    monkeypatch.setattr(model, "encode_ids", codec.encode_ids)
    monkeypatch.setattr(model, "decode_latent", codec.decode_latent)
    drawn = torch.zeros(1, 32, 32, dtype=torch.long)
    drawn[:, :, :16], drawn[:, :, 16:] = 9, 3
    monkeypatch.setattr(model, "forward", lambda z_t, t, z_image, x0_self=None: codec.encode_ids(drawn).expand_as(z_t))
    gt = torch.zeros(32, 32, dtype=torch.long)
    gt[:, :16], gt[:, 16:] = 1000, 77
    cells = torch.zeros(4, 4)
    cells[0, 0] = cells[3, 3] = 1                                           # one known cell in each half
    pixel = cells.repeat_interleave(8, 0).repeat_interleave(8, 1).bool()
    out, own = ldmseg.inpaint(model, torch.zeros(1, 3, 32, 32), torch.where(pixel, gt, 0), cells, steps=3,
                              fit_steps=0, guide_steps=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(own, gt)                                             # its names are the given segments' codes


def test_fitting_the_latent_makes_the_given_pixels_decode_to_their_codes_and_leaves_far_cells(monkeypatch):
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    assert model.config.mask_ae.num_bits == 4                               # the codec's 16 ids
    codec = IdealCodec()
    # A decoder that, like the mask AE's, reads the neighbouring cells: each cell's latent mixed with theirs.
    mix = lambda z: 0.7 * z + 0.3 * F.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    decode = lambda z, size: codec.decode_latent(mix(z), size)
    monkeypatch.setattr(model.mask_ae, "decode_full", lambda u, size: decode(u * model.latent_scale, size))
    sampled = torch.zeros(1, 32, 32, dtype=torch.long)
    sampled[0, :, :16], sampled[0, :, 16:] = 3, 6                          # what the sampler drew
    codes = torch.zeros(1, 32, 32, dtype=torch.long)
    codes[0, :8, :8] = 9                                                    # one given cell, with another code
    z0 = codec.encode_ids(sampled)                                          # (1, 4, 4, 4)
    assert ldmseg.fit_latent_to_given(model, z0, codes, steps=0) is z0     # 0 steps: untouched
    fitted = ldmseg.fit_latent_to_given(model, z0, codes, steps=60, lr=0.1)
    before, after = decode(z0, (32, 32)).argmax(1), decode(fitted, (32, 32)).argmax(1)
    assert (before[:, :8, :8] == 3).all() and (after[:, :8, :8] == 9).all()  # the given cell now decodes as given
    assert torch.equal(fitted[..., 2:, :], z0[..., 2:, :]) and torch.equal(fitted[..., 2:], z0[..., 2:])  # out of reach
    assert not torch.equal(fitted[..., :2, :2], z0[..., :2, :2])
    movable = torch.zeros(4, 4)
    movable[0, 0] = 1                                                       # one movable cell
    only = ldmseg.fit_latent_to_given(model, z0, codes, steps=60, lr=0.5, movable=movable)  # one cell: farther
    assert (decode(only, (32, 32)).argmax(1)[:, :8, :8] == 9).all()
    assert torch.equal(only * (1 - movable), z0 * (1 - movable)) and not torch.equal(only, z0)


def test_hold_keeps_the_other_pixels_as_sampled_while_the_given_cell_is_fitted(monkeypatch):
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    codec = IdealCodec()
    mix = lambda z: 0.7 * z + 0.3 * F.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    decode = lambda z, size: codec.decode_latent(mix(z), size)
    monkeypatch.setattr(model.mask_ae, "decode_full", lambda u, size: decode(u * model.latent_scale, size))
    sampled = torch.zeros(1, 32, 32, dtype=torch.long)
    sampled[0, :, :16], sampled[0, :, 16:] = 3, 6
    codes = torch.zeros(1, 32, 32, dtype=torch.long)
    codes[0, :8, :8] = 9
    z0 = codec.encode_ids(sampled)
    before = decode(z0, (32, 32)).argmax(1)
    free = decode(ldmseg.fit_latent_to_given(model, z0, codes, steps=100, lr=0.5), (32, 32)).argmax(1)
    held = decode(ldmseg.fit_latent_to_given(model, z0, codes, steps=100, lr=0.5, hold=0.3), (32, 32)).argmax(1)
    assert (free[:, :8, :8] == 9).all() and (held[:, :8, :8] == 9).all()
    assert (free != before)[codes == 0].sum() > 50                          # a hard fit redraws the neighbours
    assert torch.equal(held[codes == 0], before[codes == 0])                # held: they decode as sampled


def test_near_cells_are_the_known_cells_and_their_eight_neighbours():
    known = torch.zeros(5, 5)
    known[0, 0] = known[3, 3] = 1
    near = ldmseg.near_cells(known)
    assert near[:2, :2].eq(1).all() and near[2:, 2:].eq(1).all() and int(near.sum()) == 4 + 9


def test_sampling_steps_from_the_x0_estimate_x0_fn_returns():
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    seen = []
    fn = lambda x0: seen.append(x0.clone()) or torch.full_like(x0, 0.25)
    for sampler in ("ddim", "dpm++", "ddpm"):
        with torch.no_grad():
            z0 = ldmseg.sample_latent(model, torch.zeros(1, 4, 4, 4), sampler=sampler, steps=3, x0_fn=fn,
                                      generator=torch.Generator().manual_seed(0))
        assert torch.allclose(z0, torch.full_like(z0, 0.25), atol=1e-5), sampler   # every step saw 0.25 as x0
    assert len(seen) >= 9 and not torch.allclose(seen[0], torch.full_like(seen[0], 0.25))


def test_inpaint_fits_every_x0_estimate_on_the_known_cells_and_their_neighbours(monkeypatch):
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    calls = []
    fit = ldmseg.fit_latent_to_given
    monkeypatch.setattr(ldmseg, "fit_latent_to_given", lambda m, z, codes, steps=50, lr=0.05, movable=None, hold=0.0:
                        calls.append((steps, movable.clone(), hold)) or fit(m, z, codes, steps, lr, movable, hold))
    given = torch.zeros(32, 32, dtype=torch.long)
    given[8:16, 8:16] = 4
    cells = torch.zeros(4, 4)
    cells[1, 1] = 1
    ldmseg.inpaint(model, torch.zeros(1, 3, 32, 32), given, cells, steps=4, guide_steps=3, fit_steps=7,
                   generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == [3, 3, 3, 3, 7]                          # each of the 4 steps, then the final fit
    assert all(torch.equal(c[1], ldmseg.near_cells(cells)) for c in calls)
    assert [c[2] > 0 for c in calls] == [False] * 4 + [True]                # the final fit holds the rest


def test_unknown_pixels_near_the_given_ones_take_the_nearest_given_id():
    ids = torch.tensor([[[5, 0, 0, 0, 7, 0]]])                             # (1, 1, 6): 0 = unknown
    assert ldmseg.fill_unknown_ids(ids, 9).tolist() == [[[5, 5, 7, 7, 7, 7]]]   # tie at the middle: larger id
    assert ldmseg.fill_unknown_ids(ids, 0).tolist() == ids.tolist()
    grid = torch.zeros(1, 7, 7, dtype=torch.long)
    grid[0, 0, 0], grid[0, 6, 6] = 3, 9
    one = ldmseg.fill_unknown_ids(grid, 1)[0]                              # chessboard distance <= 1
    assert one[:2, :2].eq(3).all() and one[5:, 5:].eq(9).all() and int((one > 0).sum()) == 8
    full = ldmseg.fill_unknown_ids(grid, 7)[0]
    assert full[2, 2] == 3 and full[4, 4] == 9 and full[0, 6] == 9 and full[3, 3] == 9 and (full > 0).all()
    assert torch.equal(ldmseg.fill_unknown_ids(torch.zeros(1, 4, 4, dtype=torch.long), 3), torch.zeros(1, 4, 4))


@pytest.mark.parametrize("width", [0, 3])
def test_inpaint_encodes_the_known_latent_from_the_map_filled_fill_width_pixels_out(monkeypatch, width):
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    seen = []
    encode = model.encode_ids
    monkeypatch.setattr(model, "encode_ids", lambda ids: seen.append(ids.clone()) or encode(ids))
    given = torch.zeros(32, 32, dtype=torch.long)
    given[8:16, 8:16] = 4                                                   # one known cell, the rest unknown
    cells = torch.zeros(4, 4)
    cells[1, 1] = 1
    ldmseg.inpaint(model, torch.zeros(1, 3, 32, 32), given, cells, steps=2, fill_width=width,
                   generator=torch.Generator().manual_seed(0))
    encoded = seen[0][0]                                                    # (32, 32) codes, 0 = void
    code = int(encoded[8, 8])
    expected = torch.zeros(32, 32, dtype=torch.long)
    expected[8 - width:16 + width, 8 - width:16 + width] = code
    assert code != 0 and torch.equal(encoded, expected)


def test_new_segments_get_fresh_ids_that_never_collide_with_given_ones():
    pred = torch.tensor([[3, 3, 9], [0, 7, 7]])
    out = ldmseg.codes_to_user_ids(pred, {1000: 3, 5: 12})
    assert out[0, 0] == 1000 and out[1, 0] == 0
    assert {out[0, 2].item(), out[1, 1].item()} == {1001, 1002}
    white = 256 ** 3 - 1                                                     # a given segment painted white
    out = ldmseg.codes_to_user_ids(pred, {white: 3, 1: 12})
    assert out[0, 0] == white and {out[0, 2].item(), out[1, 1].item()} == {2, 3}   # still a valid PNG id


def test_clean_known_region_is_pasted_unchanged_at_every_step():
    import sample
    model = ldmseg.LDMSeg(ldmseg.LDMSegConfig.preset("tiny")).eval()
    z_known, mask = torch.randn(1, 4, 4, 4), (torch.rand(1, 1, 4, 4) > 0.5).float()
    seen = []
    ldmseg.sample_latent(model, torch.zeros(1, 4, 4, 4), steps=4, generator=torch.Generator().manual_seed(0),
                         known=sample.KnownRegion(z_known, mask, clean=True),
                         callback=lambda i, t, x_t, x0: seen.append(x_t.clone()))
    assert len(seen) == 4 and all(torch.equal(x[mask.expand_as(x) > 0], z_known[mask.expand_as(x) > 0]) for x in seen)


@pytest.fixture(scope="module")
def tiny_run(tiny_runs):
    return tiny_runs


def test_sample_cli_inpaint_writes_completed_map_keeping_given_ids(tiny_run, tmp_path):
    import sample
    root, shapes = tiny_run
    img = shapes / "val" / "000000000000.png"
    gt = data.read_panoptic_png(shapes / "annotations" / "panoptic_val" / "000000000000.png")
    partial = np.where(np.arange(32)[None, :] < 16, gt, 0)
    data.write_panoptic_png(tmp_path / "partial.png", partial)
    sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(img), "--known-map",
                 str(tmp_path / "partial.png"), "--steps", "3", "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    done = data.read_panoptic_png(tmp_path / "o" / "000000000000_completed.png")
    assert (done[partial > 0] == partial[partial > 0]).all()
    for name in ("_completed_color.png", "_overlay.png", "_inpaint.png"):
        assert (tmp_path / "o" / f"000000000000{name}").exists()
    data.write_panoptic_png(tmp_path / "wrong.png", partial[:16, :16])       # wrong size: resized with a notice
    sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(img), "--known-map",
                 str(tmp_path / "wrong.png"), "--steps", "2", "--out-dir", str(tmp_path / "o2"), "--device", "cpu"])
    assert (tmp_path / "o2" / "000000000000_completed.png").exists()
    # An image larger than the model's input (32^2): the given ids survive to the pixel at its own size.
    from PIL import Image
    big = np.kron(gt, np.ones((3, 3), np.int64))[:, :95]                              # 96 x 95, ragged edges
    big[40:50, 20:23] = gt.max() + 1                                                  # a thin given segment
    Image.open(img).convert("RGB").resize((95, 96)).save(tmp_path / "big.png")
    partial = np.where(np.arange(95)[None, :] < 50, big, 0)
    partial[::7, ::5] = 0                                                             # holes in the given part
    data.write_panoptic_png(tmp_path / "big_partial.png", partial)
    sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(tmp_path / "big.png"), "--known-map",
                 str(tmp_path / "big_partial.png"), "--steps", "2", "--out-dir", str(tmp_path / "o3"), "--device", "cpu"])
    done = data.read_panoptic_png(tmp_path / "o3" / "big_completed.png")
    assert done.shape == (96, 95) and (done[partial > 0] == partial[partial > 0]).all()
    for flag in ("--known-map", "--known-mask"):
        with pytest.raises(SystemExit, match=f"{flag} .*missing.png: no such file"):
            sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(img), "--known-map",
                         str(tmp_path / "partial.png"), flag, str(tmp_path / "missing.png"), "--device", "cpu"])
    Image.fromarray(np.stack([np.where(partial > 0, 200, 0), np.full_like(partial, 255)], -1).astype(np.uint8),
                    "LA").save(tmp_path / "grey_alpha.png")                           # a grey map with alpha
    sample.main(["--task", "inpaint", "--ckpt", str(root / "s2"), "--image", str(tmp_path / "big.png"), "--known-map",
                 str(tmp_path / "grey_alpha.png"), "--steps", "2", "--out-dir", str(tmp_path / "o4"), "--device", "cpu"])
    assert (tmp_path / "o4" / "big_completed.png").exists()


def test_evaluate_cli_inpaint_prints_a_table_and_writes_a_plot(tiny_run, tmp_path, capsys):
    import evaluate
    root, _ = tiny_run
    assert evaluate.main(["--ckpt", str(root / "s2"), "--task", "inpaint", "--given", "0.5", "--steps", "2",
                          "--out-dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| sparse | 0.5 |" in out and "| global | 0.0 |" in out
    assert (tmp_path / "inpainting.png").exists() and (tmp_path / "inpainting.json").exists()


@pytest.mark.parametrize("flags, message", [(["--given", "0.5,x"], "--given"), (["--given", "1.5"], "--given"),
                                            (["--given", "0.5", "--fill-width", "-1"], "--fill-width"),
                                            (["--given", "0.5", "--resample", "0"], "--resample"),
                                            (["--given", "0.5", "--fit-steps", "-1"], "--fit-steps"),
                                            (["--given", "0.5", "--guide-steps", "-1"], "--guide-steps"),
                                            (["--given", "0.5", "--sampler", "dpm++", "--resample", "2"], "--resample")])
def test_evaluate_cli_inpaint_refuses_bad_fractions_widths_and_resampling(tiny_run, tmp_path, flags, message):
    import evaluate
    root, _ = tiny_run
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--ckpt", str(root / "s2"), "--task", "inpaint", "--steps", "2", *flags,
                       "--out-dir", str(tmp_path), "--device", "cpu"])

# SPDX-License-Identifier: MIT
"""End-to-end tests of PDM's commands: train.py --stage cogen and sample.py --task cogen (tiny, CPU)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cogen
import data
import sample
import train

PROMPT = "two red circles and a blue square on grass"


def _train_args(root, shapes, out, *extra):
    return ["--stage", "cogen", "--preset", "tiny", "--data", str(shapes), "--out-dir", str(out),
            "--image-vae", str(root / "vae"), "--num-workers", "0", "--log-every", "2", "--preview-every", "0",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def cogen_run(tiny_runs, tmp_path_factory):
    """A tiny PDM trained 4 steps on the tiny Shapes, on the session's tiny image autoencoder."""
    root, shapes = tiny_runs
    out = tmp_path_factory.mktemp("cogen") / "run"
    metrics = train.main(_train_args(root, shapes, out, "--max-steps", "4"))
    return out, shapes, metrics


def _sample(run, out, *extra):
    return sample.main(["--task", "cogen", "--ckpt", str(run), "--prompt", PROMPT, "--num", "3", "--steps", "2",
                        "--out-dir", str(out), "--device", "cpu", *extra])


def test_train_cogen_writes_its_run_folder_and_caption_agreement(cogen_run):
    run, shapes, metrics = cogen_run
    assert {"ckpt.pt", "config.json", "log.txt", "metrics.json", "preview_final.png"} <= {p.name for p in run.iterdir()}
    assert 0.0 <= metrics["caption_agreement"] <= 1.0 and 0.0 <= metrics["caption_agreement_gt"] <= 1.0
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert "step 000004 | loss" in (run / "log.txt").read_text()
    num_val = len(data.shapes_dataset(shapes, "val"))                     # one row per val image, at most 4
    with Image.open(run / "preview_final.png") as im:                      # rows of 4 pictures of 32^2
        assert im.size == (4 * 32, min(num_val, 4) * 32)


def test_checkpoint_alone_rebuilds_model_tokenizer_and_image_autoencoder(cogen_run):
    run, shapes, _ = cogen_run
    ckpt = train.load_checkpoint(run, "cogen")
    model = cogen.load_pdm(ckpt)
    captions = [c for caps in data.shapes_dataset(shapes, "train").captions.values() for c in caps]
    assert list(model.config.vocab) == cogen.WordTokenizer.build(captions, model.config.num_text_tokens).vocab
    assert model.config.latent_size == 32 // 8                               # the image AE's f8 at 32^2
    # config.json (plain JSON) and the checkpoint's EMA weights give the same network.
    again = cogen.build_model(cogen.PDMConfig(**json.loads((run / "config.json").read_text())["model"]))
    again.load_state_dict(ckpt["ema"])
    c, g = model.config, torch.Generator().manual_seed(0)
    x_t = torch.randn(2, c.latent_channels, c.latent_size, c.latent_size, generator=g)
    m_t = torch.randn(2, c.num_map_bits, c.map_size, c.map_size, generator=g)
    t, text = torch.tensor([10, 900]), model.tokenize([PROMPT, ""])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x_t, m_t, t, text), again.eval()(x_t, m_t, t, text)))
    images = cogen.decode_images(cogen.load_image_ae(ckpt), torch.zeros(1, c.latent_channels, 4, 4))
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1
    assert {cat["name"] for cat in ckpt["categories"]} >= set(data.SHAPES_THINGS)


def test_sample_cogen_writes_grid_images_and_category_maps(cogen_run, tmp_path):
    run, _, _ = cogen_run
    assert _sample(run, tmp_path) == 0
    with Image.open(tmp_path / "grid.png") as im:                           # rows: images, maps, overlays
        assert im.size == (3 * 32, 3 * 32)
    for k in range(3):
        with Image.open(tmp_path / f"{k:02d}_image.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        with Image.open(tmp_path / f"{k:02d}_map.png") as im:
            assert im.size == (32, 32) and im.mode == "L" and np.asarray(im).max() <= 9
        assert (tmp_path / f"{k:02d}_map_color.png").exists()


def test_sample_cogen_given_map_mode_keeps_the_given_map(cogen_run, tmp_path, capsys):
    run, _, _ = cogen_run
    _sample(run, tmp_path / "free")
    given = tmp_path / "free" / "01_map.png"
    capsys.readouterr()
    _sample(run, tmp_path / "given", "--map", str(given), "--sampler", "ddim")
    assert "never saw a clean map" in capsys.readouterr().out                # trained with --clean-map-prob 0
    expected = np.asarray(Image.open(given))
    for k in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "given" / f"{k:02d}_map.png")), expected)


def test_sample_cogen_bad_inputs_are_one_clear_error(cogen_run, tiny_runs, tmp_path, capsys):
    run, _, _ = cogen_run
    root, _ = tiny_runs
    with pytest.raises(SystemExit, match="non-empty --prompt"):
        sample.main(["--task", "cogen", "--ckpt", str(run), "--prompt", "  ", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="stage-vae checkpoint, but stage cogen"):
        _sample(root / "vae", tmp_path)
    with pytest.raises(SystemExit, match="no such file"):
        _sample(run, tmp_path, "--map", str(tmp_path / "missing.png"))
    with pytest.raises(SystemExit, match="--save-trajectory belongs to --task panoptic"):
        _sample(run, tmp_path, "--save-trajectory")
    for flag in ("--steps", "--batch-size"):
        with pytest.raises(SystemExit) as exc:
            _sample(run, tmp_path, flag, "0")
        assert exc.value.code == 2 and "takes 1 or more" in capsys.readouterr().err     # argparse's usage error
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SystemExit, match="single-channel PNG whose pixel values are category ids"):
        _sample(run, tmp_path, "--map", str(tmp_path / "rgb.png"))
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(tmp_path / "ids.png")
    with pytest.raises(SystemExit, match="knows category ids 0..9"):
        _sample(run, tmp_path, "--map", str(tmp_path / "ids.png"))


def test_cogen_resume_continues_bit_for_bit(tiny_runs, cogen_run, tmp_path):
    root, shapes = tiny_runs
    half = tmp_path / "half"
    assert train.main(_train_args(root, shapes, half, "--max-steps", "4", "--stop-after", "2")) == {}
    train.main(_train_args(root, shapes, half, "--max-steps", "4", "--resume", str(half)))
    a, b = train.load_checkpoint(cogen_run[0]), train.load_checkpoint(half)
    assert a["model_config"] == b["model_config"]
    with pytest.raises(SystemExit, match="another model .--patch-factor 4 here, 2 there"):
        train.main(_train_args(root, shapes, half, "--max-steps", "6", "--patch-factor", "4", "--resume", str(half)))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_patch_factor_and_panoptic_map_flags_reach_the_model(tiny_runs, tmp_path):
    root, shapes = tiny_runs
    metrics = train.main(_train_args(root, shapes, tmp_path / "f4p", "--max-steps", "1", "--patch-factor", "4",
                                     "--panoptic-map", "--clean-map-prob", "0.25"))
    c = cogen.PDMConfig(**train.load_checkpoint(tmp_path / "f4p", "cogen")["model_config"])
    assert c.patch_factor == 4 and c.map_size == 4 * c.latent_size and c.panoptic and c.clean_map_prob == 0.25
    assert 0.0 <= metrics["caption_agreement"] <= 1.0
    # A panoptic PDM's samples carry their segments: a fourth grid row and a COCO panoptic folder.
    _sample(tmp_path / "f4p", tmp_path / "pan")
    with Image.open(tmp_path / "pan" / "grid.png") as im:
        assert im.size == (3 * 32, 4 * 32)
    written = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    for ann in written["annotations"]:
        ids = data.read_panoptic_png(tmp_path / "pan" / "panoptic" / ann["file_name"])
        category = np.array(Image.open(tmp_path / "pan" / ann["file_name"].replace(".png", "_map.png")))
        assert {s["id"] for s in ann["segments_info"]} == set(np.unique(ids).tolist()) - {0}
        for s in ann["segments_info"]:
            assert (category[ids == s["id"]] == s["category_id"]).all()
    # Its datasets cap the segments at what the instance bits hold (tiny: 4 bits, 15 segments).
    cfg = train.resolve(train.TrainConfig(stage="cogen", preset="tiny", data=str(shapes), panoptic_map=True))
    assert [ds.max_segments for ds in train.CogenStage(cfg, torch.device("cpu"), print).datasets()] == [15, 15]
    assert train.resolve(train.TrainConfig(stage="cogen", patch_factor=1)).out_dir.endswith("cogen_f1")
    with pytest.raises(SystemExit, match="must be 1, 2 or 4"):
        train.resolve(train.TrainConfig(stage="cogen", patch_factor=3))
    with pytest.raises(SystemExit, match="belong to --stage cogen"):
        train.resolve(train.TrainConfig(stage="2", panoptic_map=True))
    with pytest.raises(SystemExit, match="belong to --stage cogen"):
        train.resolve(train.TrainConfig(stage="2", clean_map_prob=0.5))
    with pytest.raises(SystemExit, match="takes 0..1"):
        train.resolve(train.TrainConfig(stage="cogen", clean_map_prob=1.5))

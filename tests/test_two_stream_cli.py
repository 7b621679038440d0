# SPDX-License-Identifier: MIT
"""End-to-end tests of the two-stream PDM's commands (tiny, CPU): train.py --stage t2i, then
train.py --stage cogen --two-stream from that run or from a file in U-ViT's layout, then
sample.py --task cogen on the result."""
import dataclasses

import pytest
import torch
from PIL import Image

import cogen
import data
import sample
import train
from test_cogen_cli import _train_args


def _args(root, shapes, stage, out, *extra):
    """test_cogen_cli's tiny-run arguments with the stage swapped."""
    args = _train_args(root, shapes, out, *extra)
    args[args.index("--stage") + 1] = stage
    return args


@pytest.fixture(scope="module")
def t2i_run(tiny_runs, tmp_path_factory):
    """The image stream: a tiny T2I U-ViT trained 4 steps on the tiny Shapes captions."""
    root, shapes = tiny_runs
    out = tmp_path_factory.mktemp("t2i") / "run"
    metrics = train.main(_args(root, shapes, "t2i", out, "--max-steps", "4"))
    return out, metrics, shapes


@pytest.fixture(scope="module")
def two_stream_run(tiny_runs, t2i_run, tmp_path_factory):
    """A two-stream PDM trained 3 steps on the t2i run; records each EMA's shadow and the model's
    parameters at the moment the EMA is created."""
    root, shapes = tiny_runs
    out = tmp_path_factory.mktemp("two_stream") / "run"
    created = []

    class RecordingEMA(train.EMA):
        def __init__(self, model, decay):
            super().__init__(model, decay)
            created.append(({k: v.clone() for k, v in self.shadow.items()},
                            {k: p.detach().clone() for k, p in model.named_parameters()}))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "EMA", RecordingEMA)
        train.main(_args(root, shapes, "cogen", out, "--two-stream", "--init-image-stream", str(t2i_run[0]),
                         "--max-steps", "3"))
    return out, created[0]


def test_t2i_stage_writes_a_loadable_run_with_eps_mse_and_previews(t2i_run):
    run, metrics, shapes = t2i_run
    assert {"ckpt.pt", "config.json", "log.txt", "metrics.json", "preview_final.png"} <= {p.name for p in run.iterdir()}
    assert set(metrics) == {"eps_mse", "eps_mse_t100", "eps_mse_t500", "eps_mse_t900", "eps_mse_empty"}
    assert all(0.0 < v < 10.0 for v in metrics.values())
    num_val = len(data.shapes_dataset(shapes, "val"))                      # one row per val image, at most 4
    with Image.open(run / "preview_final.png") as im:                       # rows: image | generated
        assert im.size == (2 * 32, min(num_val, 4) * 32)
    model = cogen.load_pdm(train.load_checkpoint(run, "t2i"))
    assert isinstance(model, cogen.T2IUViT) and model.config.arch == "t2i"


def test_two_stream_checkpoint_keeps_the_t2i_runs_ema_image_stream_bit_for_bit(t2i_run, two_stream_run):
    t2i = train.load_checkpoint(t2i_run[0], "t2i")
    ckpt = train.load_checkpoint(two_stream_run[0], "cogen")
    for key in ("model", "ema"):
        image_stream = {k.removeprefix("image_stream."): v for k, v in ckpt[key].items()
                        if k.startswith("image_stream.")}
        assert image_stream.keys() == t2i["ema"].keys()
        for name, value in t2i["ema"].items():
            assert torch.equal(image_stream[name], value), f"{key}: image_stream.{name} changed"
    model = cogen.load_pdm(ckpt)                                             # rebuilt from the checkpoint alone
    assert isinstance(model, cogen.TwoStreamPDM)
    assert model.config.vocab == cogen.PDMConfig(**t2i["model_config"]).vocab   # the t2i run's tokenizer
    # The optimiser holds state for the trainable parameters only.
    trainable = model.trainable_parameters()
    assert len(ckpt["optimizer"]["state"]) == len(trainable) < len(list(model.parameters()))


def test_two_stream_ema_starts_from_the_loaded_pretrained_weights(t2i_run, two_stream_run):
    """PDM's code copies its EMA before loading U-ViT's weights [PDM brief §8.8]; here it starts from them."""
    shadow, params = two_stream_run[1]
    t2i_ema = train.load_checkpoint(t2i_run[0], "t2i")["ema"]
    assert not any(k.startswith("image_stream.") for k in shadow)            # frozen: not averaged
    assert all(torch.equal(v, params[k]) for k, v in shadow.items())
    map_blocks = ("in_blocks_map", "mid_block_map", "out_blocks_map")
    copies = {k: v for k, v in shadow.items() if k.split(".")[0] in map_blocks}
    assert copies
    for k, v in copies.items():                                              # the map stream copies the t2i EMA blocks
        head, rest = k.split(".", 1)
        assert torch.equal(v, t2i_ema[head.removesuffix("_map") + "." + rest]), k
    assert all(v.abs().max() == 0 for k, v in shadow.items() if k.startswith("zero_convs."))


def test_sample_cogen_writes_its_files_for_a_two_stream_run(two_stream_run, tmp_path):
    assert sample.main(["--task", "cogen", "--ckpt", str(two_stream_run[0]), "--prompt", "a red circle on grass",
                        "--num", "2", "--steps", "2", "--out-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert {"grid.png", "00_image.png", "00_map.png", "01_map_color.png"} <= {p.name for p in tmp_path.iterdir()}


def _uvit_file(path, vae_latent_channels: int = 4) -> dict:
    """A random tiny context-mode T2I U-ViT written with U-ViT's own key names (no empty_text)."""
    cfg = dataclasses.replace(cogen.PDMConfig.preset("tiny"), arch="t2i", text_encoder="context", time_offset=1,
                              latent_size=32 // 8, latent_channels=vae_latent_channels)
    torch.manual_seed(1)
    state = cogen.t2i_to_uvit_state_dict(cogen.build_model(cfg).state_dict())
    torch.save(state, path)
    return state


def test_a_uvit_layout_file_initialises_the_image_stream(tiny_runs, tmp_path, monkeypatch):
    root, shapes = tiny_runs
    uvit = _uvit_file(tmp_path / "uvit.pth")
    train.main(_args(root, shapes, "t2i", tmp_path / "t2i", "--init-image-stream", str(tmp_path / "uvit.pth"),
                     "--max-steps", "2"))
    ckpt = train.load_checkpoint(tmp_path / "t2i", "t2i")
    assert ckpt["model_config"]["time_offset"] == 1                          # U-ViT's time token embeds t + 1
    for name, value in uvit.items():                                         # U-ViT's weights stay frozen
        assert torch.equal(ckpt["model"][name], value), name
    text_params = [k for k in ckpt["model"] if k.startswith("text_encoder.")]
    assert len(ckpt["optimizer"]["state"]) == len(text_params) > 0            # only the words encoder trains
    # --two-stream straight from the file trains that t2i run first (runs/tiny/t2i_uvit), then the PDM.
    monkeypatch.chdir(tmp_path)
    train.main(_args(root, shapes, "cogen", tmp_path / "two", "--two-stream", "--init-image-stream",
                     str(tmp_path / "uvit.pth"), "--max-steps", "2"))
    two = train.load_checkpoint(tmp_path / "two", "cogen")
    assert (tmp_path / "runs" / "tiny" / "t2i_uvit" / "ckpt.pt").exists()
    for name, value in uvit.items():
        assert torch.equal(two["ema"]["image_stream." + name], value), name


def test_a_mismatched_uvit_file_is_one_clear_error(tiny_runs, tmp_path):
    root, shapes = tiny_runs
    state = _uvit_file(tmp_path / "uvit.pth")
    state.pop("norm.weight")
    state["pos_embed"] = state["pos_embed"][:, :-1]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"missing \(1\): norm.weight[\s\S]*mis-shaped \(1\): pos_embed"):
        train.main(_args(root, shapes, "t2i", tmp_path / "t2i", "--init-image-stream", str(tmp_path / "bad.pth")))
    with pytest.raises(SystemExit, match="--init-image-stream needs --stage cogen --two-stream"):
        train.main(_args(root, shapes, "cogen", tmp_path / "one", "--init-image-stream", str(tmp_path / "uvit.pth")))

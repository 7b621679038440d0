"""Fault tests: what the user sees and what is kept when data, the process, the numbers, the files
or the disk go wrong. Every row of docs/faults.md names the test that exercises it.

CPU only; training runs are stage 1 at --preset tiny for a few steps on 32^2 Shapes (~0.5 s each).
"""
import ast
import dataclasses
import errno
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import evaluate
import sample
import train

ROOT = Path(__file__).resolve().parents[1]
FIRST = "000000000000.png"                       # train item 0 of Shapes (image id 1)


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_shapes32")
    data.write_shapes(root, size=32, num_train=12, num_val=4, seed=0, workers=1, log=lambda *_: None)
    return root


@pytest.fixture
def shapes(shapes32, tmp_path):
    """A private copy of shapes32 that the test may damage."""
    return Path(shutil.copytree(shapes32, tmp_path / "shapes"))


def _args(root, out, *extra, stage="1"):
    return ["--stage", stage, "--preset", "tiny", "--data", str(root), "--out-dir", str(out),
            "--num-workers", "0", "--log-every", "2", "--preview-every", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def straight(shapes32, tmp_path_factory):
    """Stage 1 trained 6 steps in one go: what every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    train.main(_args(shapes32, out, "--max-steps", "6"))
    return train.load_checkpoint(out, "1")


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key])


def _damage(path: Path, fault: str) -> None:
    if fault == "missing":
        path.unlink()
    elif fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:                                                       # a PNG signature, then garbage
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


# ----------------------------------------------------------------------------- bad data

@pytest.mark.parametrize("fault", ["missing", "truncated", "corrupt"])
@pytest.mark.parametrize("kind", ["image", "panoptic", "depth"])
def test_a_bad_file_is_one_error_naming_the_file_and_the_problem(shapes, kind, fault):
    folder = {"image": shapes / "train", "panoptic": shapes / "annotations" / "panoptic_train",
              "depth": shapes / "depth" / "train"}[kind]
    _damage(folder / FIRST, fault)
    ds = data.shapes_dataset(shapes, "train", size=32)
    with pytest.raises(data.PanopticFormatError) as info:
        ds[0]
    message = str(info.value)
    assert message.startswith(str(folder / FIRST))
    assert ("not found" if fault == "missing" else "cannot read") in message
    assert ds[1]["image"].shape == (3, 32, 32)                  # the other items are unaffected


def _edit_json(root: Path, edit) -> Path:
    path = root / "annotations" / "panoptic_train.json"
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    return path


@pytest.mark.parametrize("edit, problem", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: {k: v for k, v in m.items() if k != "annotations"}, "missing top-level key 'annotations'"),
    (lambda m: {**m, "images": m["images"][1:]}, "refers to image id 1, which 'images' does not list"),
    (lambda m: {**m, "annotations": [{**a, "segments_info": [{"id": s["id"]} for s in a["segments_info"]]}
                                     for a in m["annotations"]]}, "a segment without 'id' / 'category_id'"),
    (lambda m: {**m, "annotations": []}, "no images with annotated segments"),
], ids=["invalid", "no-annotations", "unknown-image", "no-category", "empty"])
def test_a_bad_panoptic_json_is_one_error_naming_it(shapes, edit, problem):
    path = _edit_json(shapes, edit)
    with pytest.raises(data.PanopticFormatError, match=problem) as info:
        data.shapes_dataset(shapes, "train", size=32)
    assert str(info.value).startswith(str(path))


def test_an_image_and_its_panoptic_png_of_different_sizes_name_both(shapes):
    Image.new("RGB", (40, 30)).save(shapes / "train" / FIRST)
    with pytest.raises(data.PanopticFormatError, match=r"panoptic_train/000000000000.png: size \(32, 32\) "
                                                      r"differs from its image 000000000000.png \(40, 30\)"):
        data.shapes_dataset(shapes, "train", size=32)[0]


def test_a_depth_png_of_another_size_or_an_unlisted_category_names_the_file(shapes):
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(shapes / "depth" / "train" / FIRST)
    with pytest.raises(data.PanopticFormatError, match=r"depth/train/000000000000.png: size \(16, 16\) differs "
                                                      r"from its panoptic map's \(32, 32\)"):
        data.shapes_dataset(shapes, "train", size=32)[0]
    _edit_json(shapes, lambda m: {**m, "categories": [c for c in m["categories"] if c["id"] != 1]})
    with pytest.raises(data.PanopticFormatError, match=r"panoptic_train.json: segments of category ids \[1\] "
                                                      r"that 'categories' does not list"):
        data.shapes_dataset(shapes, "train")


def test_an_empty_dataset_stops_training_before_it_starts_with_one_line(shapes, tmp_path):
    _edit_json(shapes, lambda m: {**m, "annotations": []})
    with pytest.raises(SystemExit, match=r"^error: .*panoptic_train.json: no images with annotated segments"):
        train.main(_args(shapes, tmp_path / "run", "--max-steps", "2"))


def test_a_one_image_dataset_trains_by_repeating_the_image(tmp_path):
    root = data.write_shapes(tmp_path / "one", size=32, num_train=1, num_val=1, workers=1, log=lambda *_: None)
    train.main(_args(root, tmp_path / "run", "--max-steps", "2"))          # batch 4 of the same image
    assert train.load_checkpoint(tmp_path / "run", "1")["step"] == 2


@pytest.mark.parametrize("mode, ext", [("1", "png"), ("I", "tif"), ("F", "tif"), ("LAB", "tif"), ("YCbCr", "jpg")])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode, ext):
    # RGB, L, LA, RGBA, P and CMYK go through the whole Dataset in
    # test_data.py::test_coco_fixture_loads_any_image_mode_and_applies_training_cleanup.
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8))
    im = grey.convert("RGB").convert(mode) if mode in ("1", "LAB", "YCbCr") else grey.convert(mode)
    im.save(tmp_path / f"x.{ext}")
    out = data.read_image(tmp_path / f"x.{ext}")
    assert out.mode == "RGB" and out.size == (30, 20)


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 65535]], np.uint16)                  # 8-bit 0, 100, 255 in 16 bits
    Image.fromarray(levels).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode == "I;16"
    assert np.asarray(data.read_image(tmp_path / "x16.png"))[0, :, 0].tolist() == [0, 100, 255]


def test_images_smaller_than_the_crop_are_resized_up_or_named(shapes):
    with pytest.raises(SystemExit, match="--crop 64 is larger than --image-size 32"):
        train.resolve(train.TrainConfig(stage="vae", preset="tiny", crop=64))
    up = data.shapes_dataset(shapes, "train", size=48, crop=40, train=True)    # 32^2 -> 48^2, then cropped
    assert up[0]["image"].shape == (3, 40, 40)
    native = data.shapes_dataset(shapes, "train", size=None, crop=40, train=True)
    with pytest.raises(data.PanopticFormatError, match=r"train/000000000000.png: 32x32, smaller than the 40px"):
        native[0]


def test_segments_over_the_id_capacity_are_dropped_counted_and_logged(shapes32, tmp_path, monkeypatch):
    ds = data.shapes_dataset(shapes32, "train", size=32, max_segments=2)
    full = data.shapes_dataset(shapes32, "train", size=32)
    for k in range(3):
        n = len(full[k]["segments_info"])
        assert ds[k]["dropped_segments"] == max(0, n - 2) and len(ds[k]["segments_info"]) == min(n, 2)
    monkeypatch.setattr(train.MaskAEStage, "max_segments", lambda self: 2)
    train.main(_args(shapes32, tmp_path / "run", "--max-steps", "2"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "the smallest segments are made void (data.cap_segments)" in log
    assert "segments dropped" in log.split("step 000002")[1].splitlines()[0]


def _batch_of(index: int, batch: int = 4) -> int:
    """The step (0-based) whose batch holds train item `index` in epoch 0 of a 12-image run."""
    return next(k for k, b in enumerate(train.epoch_batches(12, batch, train.Dist(), 0, 0)) if index in b)


def test_a_bad_sample_stops_training_naming_the_file_and_keeps_a_checkpoint(shapes, tmp_path):
    png = shapes / "annotations" / "panoptic_train" / FIRST             # stage 1 reads ids, not images
    _damage(png, "truncated")
    k = _batch_of(0)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:                              # from a DataLoader worker
        train.main(_args(shapes, out, "--max-steps", "6", "--num-workers", "1"))
    message = str(info.value.code)
    assert message.startswith(f"error: {png}: cannot read panoptic PNG")
    assert f"stopped before step {k + 1}" in message and "--skip-bad-samples" in message
    assert "Traceback" not in message and message.split("error: ")[1] in (out / "log.txt").read_text()
    if k:                                                                # the steps done are not lost
        assert train.load_checkpoint(out, "1")["step"] == k


def test_stage_1_never_reads_the_images_or_depth_it_does_not_train_on(shapes, tmp_path):
    _damage(shapes / "train" / FIRST, "corrupt")
    _damage(shapes / "depth" / "train" / FIRST, "corrupt")
    train.main(_args(shapes, tmp_path / "run", "--max-steps", "2", "--num-workers", "0"))
    assert train.load_checkpoint(tmp_path / "run", "1")["step"] == 2
    item = data.shapes_dataset(shapes, "train", size=32, load_image=False, load_depth=False)[0]
    assert "image" not in item and "depth" not in item and item["segments"].shape == (32, 32)


def test_a_bad_preview_image_stops_training_before_the_first_step_naming_it(shapes, tmp_path):
    bad = shapes / "val" / FIRST                                          # val item 0: a preview image
    _damage(bad, "corrupt")
    with pytest.raises(SystemExit) as info:
        train.main(_args(shapes, tmp_path / "run", "--max-steps", "2", "--num-workers", "0"))
    assert str(info.value.code).startswith(f"error: {bad}: cannot read image")
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    # The signal handlers are the process's own again: a process pool forked later (PQ) must still die
    # of the SIGTERM its terminate() sends, not set a training loop's stop flag and hang.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_skip_bad_samples_replaces_the_item_counts_and_logs_it(shapes, tmp_path):
    png = shapes / "annotations" / "panoptic_train" / FIRST
    _damage(png, "corrupt")
    ds = data.shapes_dataset(shapes, "train", size=32, skip_bad=True)
    item = ds[0]
    assert item["index"] == 1 and len(item["skipped"]) == 1 and FIRST in item["skipped"][0]
    assert ds[1]["skipped"] == []
    out = tmp_path / "run"
    train.main(_args(shapes, out, "--max-steps", "3", "--log-every", "3", "--num-workers", "1",
                     "--skip-bad-samples"))
    log = (out / "log.txt").read_text()
    assert f"--skip-bad-samples: {png}: cannot read panoptic PNG" in log
    assert "| 1 bad samples skipped" in log and train.load_checkpoint(out, "1")["step"] == 3


# ----------------------------------------------------------------------------- interruptions

def test_sigterm_saves_a_checkpoint_and_exits_with_143(shapes32, tmp_path):
    # A forked child process: a real signal to a real training process, without re-importing torch.
    out = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(
        target=train.main, args=(_args(shapes32, out, "--max-steps", "100000", "--log-every", "1"),))
    child.start()
    log, deadline = out / "log.txt", time.time() + 120
    while child.is_alive() and time.time() < deadline and "step 000001 |" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.02)                                                # wait for the first log line
    os.kill(child.pid, signal.SIGTERM)
    child.join(120)
    assert child.exitcode == 128 + signal.SIGTERM
    step = train.load_checkpoint(out, "1")["step"]
    assert step >= 1 and f"stopped by SIGTERM at step {step}" in log.read_text()


def test_a_signal_mid_run_then_resume_equals_an_uninterrupted_run(shapes32, tmp_path, monkeypatch, straight):
    loss, calls = train.MaskAEStage.loss, []

    def loss_then_sigint(self, model, batch, generator):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)                         # Ctrl-C in the middle of step 3
        return loss(self, model, batch, generator)

    monkeypatch.setattr(train.MaskAEStage, "loss", loss_then_sigint)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train.main(_args(shapes32, out, "--max-steps", "6"))
    assert info.value.code == 128 + signal.SIGINT and train.load_checkpoint(out)["step"] == 3
    monkeypatch.setattr(train.MaskAEStage, "loss", loss)
    train.main(_args(shapes32, out, "--max-steps", "6", "--resume", str(out)))
    assert _same_weights(straight, train.load_checkpoint(out))


def test_save_checkpoint_writes_a_temporary_file_fsyncs_it_then_renames_it(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"rename {Path(a).name} -> {Path(b).name}"),
                                                     replace(a, b))[1])
    train.save_checkpoint(tmp_path / "ckpt.pt", {"stage": "1", "step": 1})
    assert events[:2] == ["fsync", "rename ckpt.pt.tmp -> ckpt.pt"]      # then the folder's fsync
    assert train.load_checkpoint(tmp_path, "1")["step"] == 1


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, {"stage": "1", "step": 1, "w": torch.ones(3)})

    def save_then_crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a zip file")           # part of the file is written ...
        raise RuntimeError("simulated crash mid-write")                # ... when the writer dies

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.save_checkpoint(path, {"stage": "1", "step": 2, "w": torch.zeros(3)})
    ckpt = train.load_checkpoint(path, "1")
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]            # no half-written temporary file


def _full_disk_at(monkeypatch, step: int) -> None:
    """torch.save raises ENOSPC, as on a full disk, while writing the checkpoint of `step`."""
    save = torch.save

    def save_or_enospc(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_enospc)


def test_a_full_disk_at_a_periodic_checkpoint_is_logged_and_training_goes_on(shapes32, tmp_path, monkeypatch,
                                                                            straight):
    _full_disk_at(monkeypatch, 4)
    out = tmp_path / "run"
    train.main(_args(shapes32, out, "--max-steps", "6", "--ckpt-every", "2"))
    log = (out / "log.txt").read_text()
    assert (f"{out / 'ckpt.pt'}: checkpoint not written (No space left on device; " in log
            and " MiB free on " in log)
    assert "the previous checkpoint is kept; training continues and tries again at step 6" in log
    assert _same_weights(straight, train.load_checkpoint(out))          # the failed write changed nothing


def test_a_full_disk_at_the_final_checkpoint_stops_with_one_line_and_keeps_the_previous_one(
        shapes32, tmp_path, monkeypatch):
    _full_disk_at(monkeypatch, 4)                                         # the last step
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt: checkpoint not written \(No space left on device; "
                                         r"\d+ MiB free on .*\); the previous checkpoint is kept$"):
        train.main(_args(shapes32, out, "--max-steps", "4", "--ckpt-every", "2"))
    assert train.load_checkpoint(out, "1")["step"] == 2
    assert [p.name for p in out.glob("*.tmp")] == []


# ----------------------------------------------------------------------------- numerical faults

def _nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """MaskAEStage.loss is NaN at the given (1-based) steps -- and so are its gradients."""
    loss, calls = train.MaskAEStage.loss, []

    def nan_loss(self, model, batch, generator):
        calls.append(1)
        terms = loss(self, model, batch, generator)
        if len(calls) in steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train.MaskAEStage, "loss", nan_loss)


def test_a_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(shapes32, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {4})
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"step 000004: non-finite loss \(nan\) or gradient norm \(nan\): stopping"
                                         r".*Kept: .*ckpt.pt \(step 2\).*--skip-nonfinite N"):
        train.main(_args(shapes32, out, "--max-steps", "6", "--ckpt-every", "2"))
    ckpt = train.load_checkpoint(out, "1")
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "step 000004: non-finite loss" in (out / "log.txt").read_text()


def test_skip_nonfinite_skips_and_counts_steps_then_stops_past_its_budget(shapes32, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2, 4, 5})
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"step 000005: non-finite .*stopping.*no checkpoint in .* yet"):
        train.main(_args(shapes32, out, "--max-steps", "6", "--log-every", "1", "--skip-nonfinite", "2"))
    log = (out / "log.txt").read_text()
    assert "step 000002: non-finite loss (nan) or gradient norm (nan): step skipped, no update (1 of --skip-nonfinite 2)" in log
    assert "step 000004: non-finite loss (nan) or gradient norm (nan): step skipped, no update (2 of --skip-nonfinite 2)" in log
    assert "step 000002 | loss" not in log                               # a skipped step has no loss line
    assert [line.endswith("| 1 non-finite steps skipped") for line in log.splitlines() if line.startswith("step 000003 |")] == [True]


def test_the_guard_also_catches_a_nonfinite_gradient_norm_and_clears_the_gradients():
    model = nn.Linear(3, 1)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")                               # finite loss, infinite gradient
    with pytest.raises(train.NonFiniteStep, match=r"step 000008: non-finite loss \(1\) or gradient norm \(inf\)"):
        train._check_finite({"loss": torch.tensor(1.0)}, model, train.Dist(), 7)   # --grad-clip 0: norm computed
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    train._check_finite({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(2.0)}, model, train.Dist(), 7)


def test_bf16_has_the_range_of_fp32_so_no_loss_scaling_is_needed():
    assert torch.finfo(torch.bfloat16).max > 3e38 and torch.finfo(torch.float16).max < 7e4
    big = torch.tensor([1e5, 1e30])
    assert big.bfloat16().isfinite().all() and not big.half().isfinite().any()


# ----------------------------------------------------------------------------- wrong files

def test_resuming_from_another_stage_or_configuration_is_one_clear_error(shapes32, tmp_path, straight):
    train.save_checkpoint(tmp_path / "vae.pt", {"stage": "vae", "step": 1})
    with pytest.raises(SystemExit, match="a stage-vae checkpoint, but stage 1 is needed here"):
        train.main(_args(shapes32, tmp_path / "a", "--max-steps", "2", "--resume", str(tmp_path / "vae.pt")))
    model = dict(straight["model"])
    first = next(iter(model))
    del model[first]                                                     # weights with a missing tensor
    other = {**straight, "model": model, "config": {**straight["config"], "preset": "shapes"}}
    train.save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(SystemExit, match=rf"other.pt: the weights do not fit this run's model \(--preset shapes "
                                         rf"there, tiny here\).*RuntimeError: .*Missing key.*{first}"):
        train.main(_args(shapes32, tmp_path / "b", "--max-steps", "2", "--resume", str(tmp_path / "other.pt")))


def _words_pdm_config():
    """The tiny PDMConfig with a vocabulary, as train.py's cogen stage builds it from captions."""
    import cogen
    c = cogen.PDMConfig.preset("tiny")
    vocab = cogen.WordTokenizer.build(["a red circle"], c.num_text_tokens, 1).vocab
    return dataclasses.replace(c, text_encoder="words", vocab=tuple(vocab))


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory, straight):
    """junk.pt (not a checkpoint), stage1.pt (a real checkpoint of another stage), stage2.pt and
    cogen.pt (this project's format and stage, but a tensor missing from the weights)."""
    import cogen
    import ldmseg
    d = tmp_path_factory.mktemp("wrong_files")
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    train.save_checkpoint(d / "stage1.pt", straight)
    for stage, config, build in (("2", ldmseg.LDMSegConfig.preset("tiny"), ldmseg.LDMSeg),
                                 ("cogen", _words_pdm_config(), cogen.build_model)):
        state = build(config).state_dict()
        state.pop(next(iter(state)))
        train.save_checkpoint(d / f"stage{stage}.pt", {"stage": stage, "step": 1, "config": {},
                                                       "model_config": dataclasses.asdict(config),
                                                       "model": state, "ema": None})
    return d


WRONG = [("junk.pt", "not a loadable checkpoint"), ("stage1.pt", "a stage-1 checkpoint, but stage 2"),
         ("stage2.pt", "the weights do not fit the model its config describes .*Missing key")]


@pytest.mark.parametrize("name, problem", WRONG, ids=["junk", "stage1", "missing-key"])
@pytest.mark.parametrize("tool", ["sample", "evaluate"])
def test_sample_and_evaluate_refuse_a_wrong_ckpt_with_one_clear_message(wrong_files, tmp_path, tool, name, problem):
    path = wrong_files / name
    argv = ["--ckpt", str(path), "--device", "cpu", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=problem) as info:
        if tool == "sample":
            sample.main(argv + ["--image", str(tmp_path / "x.png")])
        else:
            evaluate.main(argv)
    assert str(info.value.code).startswith(str(path))


@pytest.mark.parametrize("tool", ["sample", "evaluate"])
def test_sample_and_evaluate_refuse_a_cogen_ckpt_with_missing_weights(wrong_files, tmp_path, tool):
    path = wrong_files / "stagecogen.pt"
    argv = ["--task", "cogen", "--ckpt", str(path), "--device", "cpu", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=rf"^{path}: the weights do not fit .*Missing key"):
        sample.main(argv + ["--prompt", "a red circle"]) if tool == "sample" else evaluate.main(argv)


# ----------------------------------------------------------------------------- untrusted files

def _calls(tree: ast.AST, module: str, name: str):
    """Every call module.name(...) in tree."""
    for node in ast.walk(tree):
        f = getattr(node, "func", None)
        if (isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr == name
                and isinstance(f.value, ast.Name) and f.value.id == module):
            yield node


def test_every_torch_load_in_the_sources_passes_weights_only_true():
    sources = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    loads, unsafe = 0, []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            loads += 1
            flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{path.name}:{call.lineno}")
        unsafe += [f"{path.name}:{c.lineno} pickle.{n}" for n in ("load", "loads") for c in _calls(tree, "pickle", n)]
        unsafe += [f"{path.name}:{c.lineno} allow_pickle" for c in _calls(tree, "np", "load")
                   if any(k.arg == "allow_pickle" for k in c.keywords)]
    assert loads >= 4 and unsafe == []


class _WritesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for a checkpoint that carries code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_its_code_never_runs(tmp_path):
    # The weight loaders' version: test_weights.py::test_a_pickle_carrying_code_is_refused_and_its_code_never_runs
    marker = tmp_path / "created_by_unpickling"
    torch.save({"format": train.CKPT_FORMAT, "stage": "2", "payload": _WritesAFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match=r"evil.pt: not a loadable checkpoint \(UnpicklingError"):
        train.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="not a loadable checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "evil.pt"), "--image", "x.png", "--device", "cpu"])
    assert not marker.exists()

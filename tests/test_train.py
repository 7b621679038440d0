"""Tests of train.py: the loop, checkpoints, exact resume, the CLI, DDP on CPU."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import data
import train


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes32")
    data.write_shapes(root, size=32, num_train=12, num_val=4, seed=0, workers=1, log=lambda *_: None)
    return root


def _args(root, out, stage, *extra):
    return ["--stage", stage, "--preset", "tiny", "--data", str(root), "--out-dir", str(out),
            "--num-workers", "0", "--log-every", "2", "--preview-every", "0", "--device", "cpu", *extra]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.01)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(55, cfg) == pytest.approx(0.505) and train.lr_at(100, cfg) == pytest.approx(0.01)


def test_presets_fill_only_unset_fields():
    cfg = train.resolve(train.TrainConfig(stage="vae", preset="shapes", lr=3e-4))
    assert cfg.lr == 3e-4 and cfg.max_steps > 0 and cfg.crop == 64 and cfg.out_dir.endswith("vae")
    assert train.resolve(train.TrainConfig(stage="all")).stage == "2"
    assert train.resolve(train.TrainConfig(stage="vae", crop=0)).crop == 0
    with pytest.raises(SystemExit, match=r"unknown --stage '9'; choose from .*'vae', 'all'\]"):
        train.resolve(train.TrainConfig(stage="9"))


def test_every_flag_has_help_and_a_default_in_help_text():
    parser = train.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and action.help != action.dest


def test_flags_outside_their_stage_or_range_are_refused_not_ignored():
    for kw, match in ((dict(dtype="fp16"), "--dtype takes auto, fp32 or bf16"),
                      (dict(stage="1", mask_ae="runs/x"), "--mask-ae belongs to --stage 2 / multitask, not 1"),
                      (dict(stage="vae", image_vae="sd.ckpt"), "--image-vae belongs to"),
                      (dict(stage="cogen", init_unet="sd.ckpt"), "--init-unet belongs to"),
                      (dict(stage="1", eval_steps=20), "--eval-steps belongs to --stage 2 / multitask, not 1"),
                      (dict(stage="multitask", eval_dpm_steps=20), "--eval-dpm-steps belongs to"),
                      (dict(stage="2", min_word_count=2), "--min-word-count belongs to"),
                      (dict(stage="1", image_size=100, crop=64), "multiples of 8"),
                      (dict(stage="1", crop=20), "multiples of 8"),
                      (dict(stage="1", batch_size=-1), "--batch-size takes a positive number, got -1"),
                      (dict(stage="vae", log_every=-5), "--log-every takes a positive number"),
                      (dict(stage="2", eval_steps=-3), "--eval-steps takes 0 or more"),
                      (dict(stage="1", ema_decay=1.0), "--ema-decay takes 0..1, 1 excluded"),
                      (dict(stage="1", min_lr_ratio=2.0), "--min-lr-ratio takes 0..1")):
        with pytest.raises(SystemExit, match=match):
            train.resolve(train.TrainConfig(**kw))
    assert train.resolve(train.TrainConfig(stage="all", mask_ae="runs/x", dtype="bf16")).stage == "2"
    assert train.resolve(train.TrainConfig(stage="cogen", eval_dpm_steps=5, min_word_count=2)).eval_dpm_steps == 5


def test_batch_stream_crosses_epochs_with_one_set_of_workers(shapes32):
    """The stream's items equal the dataset's own at each batch's epoch, workers forked once."""
    ds = data.shapes_dataset(shapes32, "train", train=True, load_depth=False)
    cfg = train.TrainConfig(batch_size=4, num_workers=2, seed=3)            # 3 batches per epoch
    stream = train.batch_stream(ds, cfg, train.Dist(), torch.device("cpu"), start=2)
    got = [next(stream) for _ in range(5)]                                   # steps 2..6: epochs 0, 1, 2
    for k, batch in enumerate(got):
        epoch, offset = divmod(2 + k, 3)
        index = train.epoch_batches(12, 4, train.Dist(), 3, epoch)[offset]
        ds.set_epoch(epoch)
        want = data.collate([ds[i] for i in index])
        assert batch["index"] == index and batch["flipped"] == want["flipped"]
        assert torch.equal(batch["image"], want["image"]) and torch.equal(batch["segments"], want["segments"])
    assert len({tuple(b["flipped"]) for b in got}) > 1


@pytest.mark.parametrize("stage", ["vae", "1"])
def test_cli_trains_a_tiny_stage_and_writes_its_run_folder(shapes32, tmp_path, stage):
    metrics = train.main(_args(shapes32, tmp_path / "run", stage, "--max-steps", "4"))
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"ckpt.pt", "config.json", "log.txt", "metrics.json", "preview_final.png"} <= files
    assert all(math.isfinite(v) for v in metrics.values())
    ckpt = train.load_checkpoint(tmp_path / "run", stage)
    assert ckpt["step"] == 4 and ckpt["metrics"] == metrics and metrics["scale_factor"] > 0
    assert "step 000004 | loss" in (tmp_path / "run" / "log.txt").read_text()


def test_resume_continues_bit_for_bit(shapes32, tmp_path):
    straight = tmp_path / "straight"
    train.main(_args(shapes32, straight, "1", "--max-steps", "6"))
    half = tmp_path / "half"
    assert train.main(_args(shapes32, half, "1", "--max-steps", "6", "--stop-after", "3")) == {}
    assert train.load_checkpoint(half)["step"] == 3
    train.main(_args(shapes32, half, "1", "--max-steps", "6", "--resume", str(half)))
    a, b = train.load_checkpoint(straight), train.load_checkpoint(half)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_resume_alone_continues_the_run_with_its_own_settings(shapes32, tmp_path, capsys):
    """--resume RUN and nothing else: RUN's folder, length, lr and EMA, not the preset's."""
    run = tmp_path / "run"
    train.main(_args(shapes32, run, "1", "--max-steps", "6", "--stop-after", "3", "--lr", "5e-4", "--ema-decay", "0"))
    train.main(["--resume", str(run), "--num-workers", "0", "--device", "cpu"])
    ckpt = train.load_checkpoint(run, "1")
    assert ckpt["step"] == 6 and ckpt["metrics"] and ckpt["ema"] is None
    assert ckpt["config"]["lr"] == 5e-4 and ckpt["config"]["out_dir"] == str(run)
    # A flag given beside --resume overrides the run's value, and the log says so.
    train.main(["--resume", str(run), "--max-steps", "8", "--num-workers", "0", "--device", "cpu"])
    assert train.load_checkpoint(run, "1")["step"] == 8
    assert "resuming with a changed setting: --max-steps 8 here, 6 in the run" in (run / "log.txt").read_text()


def test_a_run_folder_is_never_trained_over(shapes32, tmp_path):
    run = tmp_path / "run"
    train.main(_args(shapes32, run, "vae", "--max-steps", "2"))
    before = (run / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a finished run \(step 2\): train it longer with --resume"):
        train.main(_args(shapes32, run, "vae", "--max-steps", "1"))
    assert (run / "ckpt.pt").read_bytes() == before
    stopped = tmp_path / "stopped"
    train.main(_args(shapes32, stopped, "vae", "--max-steps", "4", "--stop-after", "1"))
    with pytest.raises(SystemExit, match=r"already holds a run stopped at step 1: continue it with --resume"):
        train.main(_args(shapes32, stopped, "vae", "--max-steps", "4"))


def test_an_ema_turned_on_at_resume_starts_from_the_loaded_weights(shapes32, tmp_path):
    run = tmp_path / "run"
    train.main(_args(shapes32, run, "1", "--max-steps", "4", "--stop-after", "2", "--ema-decay", "0"))
    loaded = train.load_checkpoint(run, "1")["model"]
    cfg = train.resolve(train.TrainConfig(stage="1", preset="tiny", data=str(shapes32), resume=str(run),
                                          ema_decay=0.5, device="cpu"))
    stage = train.STAGES["1"](cfg, torch.device("cpu"), train.Logger(None, False))
    model = stage.build()
    ema = train.EMA(model, 0.5)
    assert train._maybe_resume(cfg, model, train.make_optimizer(model, cfg, torch.device("cpu")), ema,
                               train.Logger(None, False)) == 2
    assert all(torch.equal(v, loaded[k].float()) for k, v in ema.shadow.items())


def test_step_generators_of_different_ranks_never_replay_each_other():
    draw = lambda rank, step: torch.rand(4, generator=train.step_generator(3, rank, step, torch.device("cpu")))
    assert torch.equal(draw(0, 5), torch.rand(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5)))
    assert not torch.equal(draw(1, 5), draw(0, 5 + 7_919)) and not torch.equal(draw(1, 5), draw(2, 5))
    with pytest.raises(SystemExit, match="--seed takes 0 or more, got -1"):
        train.resolve(train.TrainConfig(stage="1", seed=-1))


def test_the_coco_preset_never_writes_shapes_where_its_data_is_missing(tmp_path):
    cfg = train.resolve(train.TrainConfig(stage="1", preset="coco", data=str(tmp_path / "typo")))
    with pytest.raises(SystemExit, match="typo: no such folder, or an empty one; the coco preset trains on COCO"):
        train.STAGES["1"](cfg, torch.device("cpu"), train.Logger(None, False)).data_root()
    assert not (tmp_path / "typo").exists()


def test_a_bare_cuda_device_under_torchrun_is_the_process_s_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.pick_device("cuda") == torch.device("cuda", 1)
    assert train.pick_device("cuda:0") == torch.device("cuda", 0) and train.pick_device("cpu").type == "cpu"


def test_an_interrupted_shapes_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "_write_shapes_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        data.ensure_shapes(tmp_path / "shapes", size=32, num_train=2, num_val=1, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    root = data.ensure_shapes(tmp_path / "shapes", size=32, num_train=2, num_val=1, log=lambda *_: None)
    assert root == tmp_path / "shapes" and (root / "shapes.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_checkpoint_rebuilds_a_model_with_identical_outputs(shapes32, tmp_path):
    import ldmseg
    train.main(_args(shapes32, tmp_path / "run", "1", "--max-steps", "2"))
    ckpt = train.load_checkpoint(tmp_path / "run", "1")
    model = ldmseg.MaskAutoencoder(ldmseg.MaskAEConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    again = ldmseg.MaskAutoencoder(ldmseg.MaskAEConfig(**ckpt["model_config"]))
    again.load_state_dict(ckpt["model"])
    bits = data.ids_to_bits(torch.randint(0, 16, (2, 32, 32)), model.config.num_bits)
    assert torch.equal(model.encode(bits)[0], again.encode(bits)[0])


def test_loading_the_wrong_kind_of_file_is_one_clear_error(shapes32, tmp_path):
    train.main(_args(shapes32, tmp_path / "run", "vae", "--max-steps", "1"))
    with pytest.raises(SystemExit, match="stage-vae checkpoint, but stage 1"):
        train.load_checkpoint(tmp_path / "run", "1")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a loadable checkpoint"):
        train.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match="no checkpoint here"):
        train.load_checkpoint(tmp_path / "nowhere")


def _ddp_worker(rank, world, port, root, out, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = train.TrainConfig(stage="1", preset="tiny", data=str(root), out_dir=str(out), max_steps=3,
                            num_workers=0, log_every=1, preview_every=0, device="cpu", ema_decay=0)
    cfg = train.resolve(cfg)
    import datetime
    import time
    import torch.distributed as dist
    device = torch.device("cpu")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))      # collectives: 3 s
    d = train.init_distributed(device)
    stage = train.STAGES["1"](cfg, device, train.Logger(None, False))
    model = stage.build()
    opt = train.make_optimizer(model, cfg, device)
    train._loop(cfg, stage, model, opt, None, *stage.datasets(), device, d, out, train.Logger(None, False), 0)
    result[rank] = torch.cat([p.detach().flatten() for p in model.parameters()])
    finish = stage.finish                             # rank 0 evaluates for longer than a collective may take
    stage.finish = lambda *a: (time.sleep(5 if d.main else 0), finish(*a))[1]
    train._finish(cfg, stage, model, opt, None, stage.datasets()[1], d, out, train.Logger(None, False), 3)
    result[f"done{rank}"] = True
    dist.destroy_process_group()


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(shapes32, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, shapes32, tmp_path, result), nprocs=2, join=True)
    assert torch.equal(result[0], result[1]) and result["done0"] and result["done1"]
    init = torch.cat([p.detach().flatten() for p in train.STAGES["1"](
        train.resolve(train.TrainConfig(stage="1", preset="tiny")), torch.device("cpu"), None).build().parameters()])
    assert not torch.equal(result[0], init)                                 # they did train


def _ddp_main_worker(rank, world, port, root, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    write = data.write_shapes                         # count the writers: one line per call
    data.write_shapes = lambda *a, **kw: (open(out.parent / "writes.txt", "a").write(f"{rank}\n"), write(*a, **kw))[1]
    train.main(["--stage", "vae", "--preset", "tiny", "--data", str(root), "--out-dir", str(out), "--max-steps", "1",
                "--num-train", "8", "--num-val", "2", "--num-workers", "0", "--preview-every", "0", "--device", "cpu"])


def test_ddp_ranks_write_a_missing_shapes_folder_once(tmp_path):
    """Rank 0 writes Shapes where --data names no folder yet; the other ranks wait for it, then read it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_main_worker, args=(2, port, tmp_path / "shapes", tmp_path / "run"), nprocs=2, join=True)
    assert (tmp_path / "writes.txt").read_text() == "0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shapes", "writes.txt"]
    assert train.load_checkpoint(tmp_path / "run", "vae")["step"] == 1

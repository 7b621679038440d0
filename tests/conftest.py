"""Make the top-level modules importable however pytest is started, and run tests on one thread.

Tests use tiny models, for which one thread is faster than two (no synchronisation) and which
stay fast when the machine is busy.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Tiny Shapes (32^2) and tiny runs of every LDMSeg stage: root/{shapes, vae, s1, s2}, trained once."""
    import data
    import train
    root = tmp_path_factory.mktemp("tiny_runs")
    shapes = root / "shapes"
    data.write_shapes(shapes, size=32, num_train=8, num_val=3, seed=0, workers=1, log=lambda *_: None)
    common = ["--preset", "tiny", "--data", str(shapes), "--num-workers", "0", "--preview-every", "0",
              "--device", "cpu", "--max-steps", "3", "--log-every", "3"]
    train.main(["--stage", "vae", "--out-dir", str(root / "vae"), *common])
    train.main(["--stage", "1", "--out-dir", str(root / "s1"), *common])
    train.main(["--stage", "2", "--out-dir", str(root / "s2"), "--image-vae", str(root / "vae"),
                "--mask-ae", str(root / "s1"), *common])
    return root, shapes

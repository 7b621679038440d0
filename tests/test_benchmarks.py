# SPDX-License-Identifier: MIT
"""Smoke test of benchmarks/speed.py: it runs at the tiny preset and prints every section (no timing claims)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import speed  # noqa: E402  (benchmarks/ is not a package; its folder is put on the path just above)


def test_speed_cli_at_tiny_prints_training_sampling_and_pq_rows(capsys):
    assert speed.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                       "--samplers", "ddim:2,dpm++:2", "--pq-images", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("model"))
    for column in ("batch", "params", "img/s", "ms/step", "GFLOP/step", "GFLOP/s", "MFU", "peak MiB"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for model in speed.MODELS:
        assert float(rows[model][4]) > 0 and rows[model][8] == "-"     # img/s; no MFU without a peak on a CPU
    assert "process peak RSS" in out
    assert "ddim" in rows and "dpm++" in rows
    assert "pairs/s" in out

"""tools/paper_experiment.py end to end at toy size: real 2-rank DeepSpeed pretraining, real
fine-tunes, the table, the plot, and resuming (a rerun trains nothing). The numbers mean nothing at
this size; what is tested is that the experiment runs, counts its units and resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(out: Path, shards: Path):
    args = ["--out", out, "--shards", shards, "--methods", "reptile_k5", "--sizes", "10", "--grad-steps", "5",
            "--max-steps", "4", "--workers", "2"]
    return subprocess.run([sys.executable, ROOT / "tools" / "paper_experiment.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "MLFOUND_NO_SHM_OP": "1"})


def test_toy_run_writes_table_and_plot_and_resumes(tmp_path):
    out, shards = tmp_path / "paper", tmp_path / "shards"
    first = run(out, shards)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "12 fine-tune units, 12 to run" in first.stdout  # (none, reptile_k5) x 2 seeds x (zero-shot, 2 subsets)
    results = json.loads((out / "results.json").read_text())
    assert sorted({(r["method"], r["seed"], r["n"], r["subset"]) for r in results}) == sorted(
        (m, s, n, sub) for m in ("none", "reptile_k5") for s in (0, 1) for n, sub in ((0, 0), (10, 0), (10, 1)))
    table = (out / "table.txt").read_text()
    assert all(f"{m:<13}{n:>4}{runs:>5}" in table for m in ("none", "reptile_k5") for n, runs in ((0, 2), (10, 4)))
    assert (out / "learning_curve.png").stat().st_size > 0
    again = run(out, shards)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stdout and "pretrained" not in again.stdout

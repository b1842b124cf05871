"""Every entry point (`mlfound`, launch/*.py, tools/*.py) turns a user error into one line on stderr and exit
code 2, never a traceback: each is driven here, as a user would run it, with input it must refuse."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MISSING = "no/such/file"
pytestmark = pytest.mark.faults

# entry point -> arguments that pass argparse but name input that does not exist (or cannot be used)
BAD_INPUT = {
    "mlfound export": ["-m", "mlfound.cli", "export", MISSING, "--out", "{tmp}/x.safetensors"],
    "mlfound deploy": ["-m", "mlfound.cli", "deploy", MISSING, "--head", "h", "--out", "{tmp}/x.pt"],
    "mlfound show": ["-m", "mlfound.cli", "show", MISSING],
    "mlfound split": ["-m", "mlfound.cli", "split", MISSING, "--out", "{tmp}", "--sizes", "a=1"],
    "mlfound evaluate": ["-m", "mlfound.cli", "evaluate", MISSING, MISSING, "--head", "h"],
    "mlfound shard": ["-m", "mlfound.cli", "shard", MISSING, "--out", "{tmp}/shards"],
    "mlfound pretrain": ["-m", "mlfound.cli", "pretrain", "--config", MISSING],
    "mlfound finetune": ["-m", "mlfound.cli", "finetune", "--model", MISSING, "--head", "h", "--train", MISSING,
                         "--out", "{tmp}/x.safetensors"],
    "mlfound learning-curve": ["-m", "mlfound.cli", "learning-curve", MISSING, "--data", MISSING, "--head", "h",
                               "--out", "{tmp}/c.png"],
    "launch/pretrain.py": ["launch/pretrain.py", "--config", MISSING],
    "launch/finetune.py": ["launch/finetune.py", "--model", MISSING, "--head", "h", "--train", MISSING,
                           "--out", "{tmp}/x.safetensors"],
    "tools/bench_batched_md.py": ["tools/bench_batched_md.py", "--model", MISSING],
    "tools/bench_data.py": ["tools/bench_data.py", MISSING],
    "tools/bench_loader.py": ["tools/bench_loader.py", "--config", MISSING],
    "tools/bench_peers.py": ["tools/bench_peers.py", "--data", MISSING],
    "tools/bench_pretrain.py": ["tools/bench_pretrain.py", "--config", MISSING],
    "tools/bench_shard.py": ["tools/bench_shard.py", "--source", MISSING, "--sizes", "10", "--scratch", "{tmp}"],
    "tools/bench_zero_memory.py": ["tools/bench_zero_memory.py", "--config", MISSING],
    "tools/compare_scratch.py": ["tools/compare_scratch.py", "--target", MISSING, "--head", "h", "--out", "{tmp}/c",
                                 "--recipes", "a="],
    "tools/make_qm_dataset.py": ["tools/make_qm_dataset.py", "--recipe", "demo-target", "--out", "{file}"],
    "tools/paper_experiment.py": ["tools/paper_experiment.py", "--experiment", MISSING],
    "tools/probe_two_stage.py": ["tools/probe_two_stage.py", "--experiment", MISSING, "--record", MISSING,
                                 "--near", "h"],
    "tools/run_md.py": ["tools/run_md.py", MISSING, "--head", "h", "--structure", MISSING],
    "tools/shard_dataset.py": ["tools/shard_dataset.py", MISSING, "--out", "{tmp}/shards"],
}


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    args = [a.format(tmp=tmp_path, file=a_file) for a in args]
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1",
                               "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})


def test_the_library_names_no_script():
    """Nothing in mlfound/ names a file of tools/ or launch/, which an installed mlfound does not have: its advice
    names `mlfound` commands, and those scripts are thin wrappers of them."""
    named = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "mlfound").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\b(tools|launch)/", line)]
    assert not named


@pytest.mark.parametrize("command, script", [("shard", "tools/shard_dataset.py"), ("finetune", "launch/finetune.py"),
                                             ("pretrain", "launch/pretrain.py")])
def test_mlfound_commands_and_their_scripts_print_the_same_help(command, script):
    via_mlfound = subprocess.run([sys.executable, "-m", "mlfound.cli", command, "--help"], cwd=ROOT, text=True,
                                 capture_output=True, timeout=120)
    via_script = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, text=True, capture_output=True,
                                timeout=120)
    assert via_mlfound.returncode == via_script.returncode == 0, via_mlfound.stderr + via_script.stderr
    usage_mlfound, rest_mlfound = via_mlfound.stdout.split("\n\n", 1)
    usage_script, rest_script = via_script.stdout.split("\n\n", 1)
    assert rest_mlfound == rest_script
    # argparse wraps the usage by the program name's length
    assert usage_mlfound.replace(f"mlfound {command}", "PROG").split() == usage_script.replace(script, "PROG").split()


def test_every_entry_point_is_covered():
    scripts = {f"{p.parent.name}/{p.name}" for folder in ("launch", "tools") for p in (ROOT / folder).glob("*.py")}
    assert scripts == {name for name in BAD_INPUT if not name.startswith("mlfound ")}


@pytest.mark.parametrize("entry_point", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(entry_point, tmp_path):
    done = run(BAD_INPUT[entry_point], tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{shard_root: {tmp_path}, tasks: [a]}}\n")
    done = run(["launch/pretrain.py", "--config", str(config)], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: [Errno 17] File exists: '{tmp_path / 'run'}'"


@pytest.mark.parametrize("tool, args", [
    ("tools/make_qm_dataset.py", ["--recipe", "demo-target", "--out", "{out}"]),
    ("tools/paper_experiment.py", ["--experiment", "configs/experiments/demo.yaml", "--out", "{out}"]),
])
def test_folder_writers_refuse_a_folder_another_process_writes(tool, args, tmp_path):
    from mlfound.data.files import FolderLock

    out = tmp_path / "out"
    with FolderLock(out, "test holder"):
        done = run([tool, *(a.format(out=out) for a in args)], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{out} is in use by another test holder (host " in done.stderr and "Traceback" not in done.stderr

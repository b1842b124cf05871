"""The documentation cannot rot: the site builds with `mkdocs build --strict` (the configuration and command-line
references generated from the code), every config field has a meaning, and every shell command on the
Getting-started and How-to pages runs. Each command block carries a marker on the line above it:
``<!-- docs-test: quick -->`` (runs here), ``slow (why)`` (runs with ``pytest -m docs_slow``, a page's blocks
after its first slow one too, since they use its output) or ``skip (why)`` (what it needs that no test machine
has, and which test covers it instead)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["getting-started.md", "how-to/data.md", "how-to/pretrain.md", "how-to/multinode.md", "how-to/finetune.md",
         "how-to/uncertainty.md", "how-to/tracking.md", "how-to/simulate.md", "how-to/deploy.md"]  # in the order a reader follows them: later pages use runs/demo
MARKER = re.compile(r"<!-- docs-test: (quick|slow|skip)\b(.*?)-->")
LINKED = ["data", "configs", "launch", "tools", "models"]  # read by the commands; they write under runs/


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command_blocks(page: str) -> list[tuple[str, str, str]]:
    """(marker, why, script) of every bash or console block; a console block's commands are its `$ ` lines
    with their continuation lines and here-documents, without the output shown."""
    lines, blocks = (ROOT / "docs" / page).read_text().splitlines(), []
    i = 0
    while i < len(lines):
        fence = re.match(r"```(bash|console)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = MARKER.search(lines[i - 1]) if i else None
        assert marker, f"docs/{page}:{i + 1}: a command block without a docs-test marker on the line above it"
        body = lines[i + 1:end]
        blocks.append((marker.group(1), marker.group(2).strip(" ()"), "\n".join(
            body if fence.group(1) == "bash" else console_commands(body))))
        i = end + 1
    return blocks


def console_commands(body: list[str]) -> list[str]:
    commands, i = [], 0
    while i < len(body):
        if not body[i].startswith("$ "):
            i += 1
            continue
        command = [body[i][2:]]
        while command[-1].endswith("\\"):
            i += 1
            command.append(body[i])
        heredoc = re.search(r"<<-?'?(\w+)'?", command[0])
        if heredoc:
            while body[i] != heredoc.group(1):
                i += 1
                command.append(body[i])
        commands += command
        i += 1
    return commands


def test_every_command_block_is_marked_and_a_skip_says_why():
    for page in PAGES:
        for marker, why, script in command_blocks(page):
            assert script.strip(), f"docs/{page}: an empty command block"
            assert marker == "quick" or why, f"docs/{page}: a {marker} block must say why: {script[:80]}"


def test_every_config_field_has_a_meaning():
    empty = [row.split("|")[1].strip() for row in hooks().config_reference().splitlines()
             if row.startswith("| `") and row.rstrip().endswith("|  |")]
    assert not empty, f"fields without a description or comment in the code: {empty}"


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    config = (tmp_path / "reference" / "config" / "index.html").read_text()
    assert all(key in config for key in ("logging.wandb.project", "model.product_l_max", "mace.recipe", "ema_decay"))
    cli = (tmp_path / "reference" / "cli" / "index.html").read_text()
    assert all(f"python {command}" in cli for command in ("launch/finetune.py", "tools/compare_scratch.py"))
    assert "mlfound evaluate" in cli and "--parity" in cli


def run_pages(tmp_path: Path, with_slow: bool) -> None:
    """Every page's blocks in order, in one folder where the repository's inputs are linked and runs/ is new."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "NO_MKDOCS_2_WARNING": "1"}
    for page in PAGES:
        for marker, why, script in command_blocks(page):
            if marker == "skip":
                continue
            if marker == "slow" and not with_slow:
                break  # the page's later blocks may use what this one makes
            done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                  env=env, timeout=1800)
            assert done.returncode == 0, f"docs/{page}:\n{script}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_quick_commands_of_every_page_run(tmp_path):
    run_pages(tmp_path, with_slow=False)


@pytest.mark.docs_slow
def test_every_command_of_every_page_runs(tmp_path):
    run_pages(tmp_path, with_slow=True)

"""Two nodes × one rank on this machine, each node started by its own launcher as on a cluster (torchrun
with a static rendezvous; DeepSpeed's launcher with a hostfile and --no_ssh), streaming the shards over
HTTP through data.shard_url_template: bit-identical to one node × two ranks reading local shards
(weights, optimizer partitions, stream and RNG states, the validation table)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlfound.config import load_config
from tests.data.helpers import http_server, move_shards
from tests.distributed.test_faults import assert_identical, checkpoint_state
from tests.distributed.test_pretrain import ROOT, free_port, torchrun, write_config

STEPS = 4
PRETRAIN = str(ROOT / "launch" / "pretrain.py")


def two_node_config(tmp_path: Path, shard_root: Path, **data) -> Path:
    return write_config(tmp_path, shard_root, data=data, deepspeed={"zero_stage": 1},
                        train={"outer_steps": STEPS, "log_every": 2, "eval_every": 2, "save_every": 100})


def run_state(config: Path) -> tuple[dict, str]:
    run_dir = load_config(config).run_dir
    return checkpoint_state(run_dir, STEPS), (run_dir / "validation.jsonl").read_text()


@pytest.fixture(scope="module")
def one_node(shard_root, tmp_path_factory):
    config = two_node_config(tmp_path_factory.mktemp("one_node"), shard_root)
    torchrun(config)
    return run_state(config)


def node_command(launcher: str, node_rank: int, port: int, hostfile: Path) -> list[str]:
    """What one node runs: the commands of docs/how-to/multinode.md, with 127.0.0.1 as the first node."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port), PRETRAIN]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), PRETRAIN]


def run_two_nodes(launcher: str, config: Path, tmp_path: Path) -> None:
    """Both nodes' launchers at once; if one fails or they outlast the timeout, both are killed."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names unused with --no_ssh: --node_rank picks the line
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFOUND_NO_SHM_OP": "1", "PYTHONPATH": str(ROOT)}
    port, logs, nodes = free_port(), [tmp_path / f"node{i}.log" for i in range(2)], []
    try:
        for node_rank, log in enumerate(logs):
            with open(log, "w") as out:
                nodes.append(subprocess.Popen([*node_command(launcher, node_rank, port, hostfile), "--config",
                                               str(config)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
        deadline = time.monotonic() + 300
        while any(node.poll() is None for node in nodes) and time.monotonic() < deadline:
            if any(node.poll() not in (None, 0) for node in nodes):
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    output = "\n".join(f"--- node {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
    assert [node.returncode for node in nodes] == [0, 0], output


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_streaming_over_http_equal_one_node(shard_root, one_node, tmp_path, launcher):
    manifests, mirror = tmp_path / "manifests", tmp_path / "mirror"
    shutil.copytree(shard_root, manifests)
    move_shards(manifests, mirror)  # the nodes see only manifests locally
    with http_server(mirror) as (url, served):
        config = two_node_config(tmp_path, manifests, shard_url_template=f"{url}/{{task}}/{{name}}")
        run_two_nodes(launcher, config, tmp_path)
    served = {path.lstrip("/") for path in served}  # all validation shards, some training shards
    assert {p for p in served if "/val/" in p} == {p.relative_to(mirror).as_posix() for p in mirror.rglob("val/*.tar")}
    assert any("/val/" not in p for p in served)
    state, validation = run_state(config)
    assert_identical(state, one_node[0])
    assert validation == one_node[1] and validation.count("\n") == 2  # steps 2 and 4

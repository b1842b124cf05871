"""Shared helpers for data tests: shard a slice of the real demo corpus, serve shards over HTTP."""
import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ase.io import read, write

from mlfound.data.readers import SourceSpec
from mlfound.data.shards import ShardOptions, shard_task


def demo_slice(demo_dir: Path, task: str, num: int, out: Path) -> Path:
    """First ``num`` records of a demo task as a new extxyz file."""
    path = out / f"{task}.extxyz"
    write(path, read(demo_dir / f"{task}.extxyz", index=f":{num}"), format="extxyz")
    return path


def shard(path: Path, out: Path, task: str | None = None, **options) -> dict:
    task = task or path.stem
    return shard_task(task, [SourceSpec(path=path, task=task)], out, ShardOptions(**options), progress=False)


def move_shards(shard_root: Path, mirror: Path) -> None:
    """Move every shard under ``shard_root`` to the same path under ``mirror``; the manifests stay."""
    for tar in sorted(shard_root.rglob("*.tar")):
        (mirror / tar.relative_to(shard_root)).parent.mkdir(parents=True, exist_ok=True)
        tar.rename(mirror / tar.relative_to(shard_root))


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``python -m http.server`` serving ``root`` on a free port of 127.0.0.1 (the server picks it, so
    parallel runs cannot collide): yields its base URL and the paths it served with status 200, a list
    filled in when the server stops."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                                   "--directory", str(root)], stdout=subprocess.PIPE, stderr=log, text=True)
        served: list[str] = []
        try:
            banner = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
            assert " port " in banner, f"http.server did not start: {banner!r}"
            yield f"http://127.0.0.1:{banner.split(' port ')[1].split()[0]}", served
        finally:
            server.terminate()
            server.wait(timeout=30)
            server.stdout.close()
            log.seek(0)
            served.extend(re.findall(r'"GET (\S+) HTTP/[\d.]+" 200', log.read()))

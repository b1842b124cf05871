"""Shards streamed over HTTP (``python -m http.server``, read through webdataset's curl URLs) with the
manifests kept local: the same records as local files, and every shard still checked against its sha256."""
import shutil

import pytest

from mlfound.data import DataError
from mlfound.data.shard_format import encode
from mlfound.data.streams import TaskStream
from tests.data.helpers import demo_slice, http_server, move_shards, shard

TASK = "gfn2_xtb"
TEMPLATE = "{url}/{{task}}/{{name}}"


@pytest.fixture
def roots(demo_dir, tmp_path):
    """(local, manifests_only, mirror): 30 records in shards of 4, 20% held out; manifests_only holds the
    manifests and mirror the shards, in the local layout."""
    local, manifests_only, mirror = tmp_path / "local", tmp_path / "manifests", tmp_path / "mirror"
    shard(demo_slice(demo_dir, TASK, 30, tmp_path), local, val_fraction=0.2, records_per_shard=4)
    shutil.copytree(local, manifests_only)
    move_shards(manifests_only, mirror)
    return local, manifests_only, mirror


def encoded(records) -> list[bytes]:
    return [encode(rec) + f"{rec.source}:{rec.index}".encode() for rec in records]


def test_http_shards_give_the_local_records(roots):
    local, manifests_only, mirror = roots
    with http_server(mirror) as (url, served):
        template = TEMPLATE.format(url=url)
        for split in ("", "val"):
            for rank in range(2):
                remote = TaskStream(manifests_only / TASK / split, seed=1, rank=rank, world_size=2,
                                    shard_url_template=template)
                expected = TaskStream(local / TASK / split, seed=1, rank=rank, world_size=2)
                assert encoded(remote.rest_of_epoch()) == encoded(expected.rest_of_epoch())
    shards = sorted(path.relative_to(mirror).as_posix() for path in mirror.rglob("*.tar"))
    assert any("/val/" in name for name in shards) and len(shards) > 4
    assert {path.lstrip("/") for path in served} == set(shards)  # every shard, the validation ones from val/


def test_a_shard_the_server_changed_is_refused(roots):
    """The server's first shard is a valid shard with the right record count, but another one's bytes."""
    _, manifests_only, mirror = roots
    shutil.copy(mirror / TASK / f"{TASK}-00001.tar", mirror / TASK / f"{TASK}-00000.tar")
    with http_server(mirror) as (url, _):
        stream = TaskStream(manifests_only / TASK, seed=0, shard_url_template=TEMPLATE.format(url=url))
        with pytest.raises(DataError, match=rf"shard {url}/{TASK}/{TASK}-00000.tar: sha256 does not match "
                                            rf"{manifests_only / TASK / 'manifest.json'}"):
            stream.rest_of_epoch()


def test_missing_and_unreachable_shards_are_named(roots):
    _, manifests_only, mirror = roots
    (mirror / TASK / "val" / f"{TASK}-00000.tar").unlink()
    with http_server(mirror) as (url, _):
        missing = f"{url}/{TASK}/val/{TASK}-00000.tar"
        stream = TaskStream(manifests_only / TASK / "val", seed=0, shard_url_template=TEMPLATE.format(url=url))
        with pytest.raises(DataError, match=f"shard {missing} .*curl exit status 22: the server answered with an "
                                            "HTTP error such as 404"):
            stream.verify()
    stopped = TaskStream(manifests_only / TASK, seed=0, shard_url_template=TEMPLATE.format(url=url))
    with pytest.raises(DataError, match=f"shard {url}/{TASK}/{TASK}-0000.\\.tar .*curl exit status 7: nothing "
                                        "answers at that address and port"):
        next(stopped)


@pytest.mark.parametrize("template, message", [
    ("http://host/{task}/", "must contain {name}"),
    ("http://host/{task}/{split}/{name}", "has {split}; only {task} and {name} are filled in"),
    ("http://host/{name!r}", "without conversions or format specs"),
    ("http://host/{name", "is not a valid format string"),
])
def test_a_bad_template_is_refused(roots, template, message):
    _, manifests_only, _ = roots
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        TaskStream(manifests_only / TASK, seed=0, shard_url_template=template)

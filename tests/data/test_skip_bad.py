"""Malformed extxyz frames: each is one bad record with its true index, and reading goes on at the next frame.

Invariant checked per case: frames in the file = records kept + records rejected, and every reject names
the index of the frame it stands for (0-based, as Record.index).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from mlfound.data import DataError
from mlfound.data.readers import SourceSpec, lot_metadata, read_entries, read_source
from mlfound.data.shards import ShardOptions, shard_task
from tests.data.helpers import demo_slice, shard

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults  # pytest -m faults: the fault-injection suite
NUM_FRAMES = 12


def split_frames(path: Path) -> list[list[str]]:
    """The lines of each frame of a well-formed extxyz file."""
    lines = path.read_text().splitlines(keepends=True)
    frames, start = [], 0
    while start < len(lines):
        end = start + 2 + int(lines[start])
        frames.append(lines[start:end])
        start = end
    return frames


def break_value(frames):
    """An atom line whose x coordinate is not a number: ASE cannot parse the frame."""
    fields = frames[2][3].split()
    frames[2][3] = " ".join([fields[0], "abc", *fields[2:]]) + "\n"
    return [2]


def energy_not_a_number(frames):
    """The frame parses, but its energy is a word: a bad record naming the key, not a crash."""
    comment = frames[4][1]
    start = comment.index(" energy=") + len(" energy=")
    frames[4][1] = comment[:start] + "n/a" + comment[comment.index(" ", start):]
    return [4]


def drop_atom_line(frames):
    del frames[6][4]
    return [6]


def bad_count_line(frames):
    frames[3][0] = "five\n"
    return [3]


def extra_atom_line(frames):
    frames[5].append(frames[5][-1])
    return [5]


def truncate_last_frame(frames):
    frames[-1] = frames[-1][:4] + [frames[-1][4][:20]]
    return [NUM_FRAMES - 1]


def break_first_frame(frames):
    frames[0][0] = "five\n"
    return [0]


def two_bad_frames(frames):
    return drop_atom_line(frames) + break_value(frames)


CORRUPTIONS = [break_value, energy_not_a_number, drop_atom_line, bad_count_line, extra_atom_line, truncate_last_frame,
               two_bad_frames]


def corrupted(demo_dir, tmp_path, corrupt, num=NUM_FRAMES):
    """The first frames of the GFN2-xTB demo task with ``corrupt`` applied to their text; returns the file and
    the indices of the frames made bad."""
    path = demo_slice(demo_dir, "gfn2_xtb", num, tmp_path)
    frames = split_frames(path)
    bad = sorted(corrupt(frames))
    path.write_text("".join(line for frame in frames for line in frame))
    return path, bad


def read_rejects(task_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "rejects.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_every_frame_is_kept_or_rejected_with_its_index(demo_dir, tmp_path, corrupt):
    original = read(demo_dir / "gfn2_xtb.extxyz", index=f":{NUM_FRAMES}")
    path, bad = corrupted(demo_dir, tmp_path, corrupt)
    entries = list(read_entries(SourceSpec(path, task="t")))
    assert [e.index for e in entries] == list(range(NUM_FRAMES))
    assert [e.index for e in entries if isinstance(e, DataError)] == bad
    for rec in (e for e in entries if not isinstance(e, DataError)):
        assert rec.energy_ev == original[rec.index].get_potential_energy()
        np.testing.assert_array_equal(rec.pos_a, original[rec.index].positions)

    manifest = shard(path, tmp_path / "shards", skip_bad=True)
    rejects = read_rejects(tmp_path / "shards" / "gfn2_xtb")
    assert manifest["num_records"] + manifest["num_rejected"] == NUM_FRAMES
    assert [r["index"] for r in rejects] == bad and {r["source"] for r in rejects} == {str(path)}
    assert all(f"{path} record {r['index']}: " in r["reason"] for r in rejects)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_without_skip_bad_the_first_bad_frame_stops_the_run(demo_dir, tmp_path, corrupt):
    path, bad = corrupted(demo_dir, tmp_path, corrupt)
    with pytest.raises(DataError, match=f"{path} record {bad[0]}: .*(line|is not a number)") as info:
        shard(path, tmp_path / "shards")
    assert "--skip-bad" in str(info.value)
    assert not (tmp_path / "shards" / "gfn2_xtb" / "manifest.json").exists()


def test_bad_first_frame_of_the_second_source(demo_dir, tmp_path):
    first = demo_slice(demo_dir, "gfn2_xtb", 5, tmp_path)
    (tmp_path / "second").mkdir()
    second, _ = corrupted(demo_dir, tmp_path / "second", break_first_frame, num=5)
    sources = [SourceSpec(first, task="xtb"), SourceSpec(second, task="xtb")]
    manifest = shard_task("xtb", sources, tmp_path / "shards", ShardOptions(skip_bad=True), progress=False)
    assert manifest["num_records"] == 9 and manifest["num_rejected"] == 1
    assert manifest["lot"]["lot_method"] == "GFN2-xTB"
    [reject] = read_rejects(tmp_path / "shards" / "xtb")
    assert reject["source"] == str(second) and reject["index"] == 0


def test_lot_metadata_skips_frames_that_do_not_parse(demo_dir, tmp_path):
    path, _ = corrupted(demo_dir, tmp_path, break_first_frame, num=3)
    assert lot_metadata(SourceSpec(path, task="t"))["lot_method"] == "GFN2-xTB"
    path.write_text("five\n")
    assert lot_metadata(SourceSpec(path, task="t")) == {}


def test_all_rejected_still_writes_the_rejects_list(demo_dir, tmp_path):
    path = demo_slice(demo_dir, "gfn2_xtb", 3, tmp_path)
    frames = split_frames(path)
    for frame in frames:
        frame[3] = frame[2]  # atoms 0 and 1 on top of each other
    path.write_text("".join(line for frame in frames for line in frame))
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    with pytest.raises(DataError, match=f"no valid training records.*3 rejected.*{task_dir / 'rejects.jsonl'}"):
        shard(path, tmp_path / "shards", skip_bad=True)
    assert [r["index"] for r in read_rejects(task_dir)] == [0, 1, 2]
    assert not (task_dir / "manifest.json").exists()


@pytest.mark.parametrize("text", ["5\n", "5\nProperties=species:S:1:pos:R:3 energy=1.0\n"], ids=["count", "comment"])
def test_header_only_file_is_one_rejected_frame(tmp_path, text):
    path = tmp_path / "header.extxyz"
    path.write_text(text)
    with pytest.raises(DataError, match=f"{path} record 0: .*truncated"):
        list(read_source(SourceSpec(path, task="t")))
    with pytest.raises(DataError, match="no valid training records.*1 rejected"):
        shard(path, tmp_path / "shards", skip_bad=True)
    assert [r["index"] for r in read_rejects(tmp_path / "shards" / "header")] == [0]


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.extxyz"
    path.write_text("")
    assert list(read_source(SourceSpec(path, task="t"))) == []
    with pytest.raises(DataError, match="no valid training records"):
        shard(path, tmp_path / "shards", skip_bad=True)


def test_shard_dataset_reports_rejects(demo_dir, tmp_path):
    path, _ = corrupted(demo_dir, tmp_path, two_bad_frames)
    done = subprocess.run([sys.executable, "tools/shard_dataset.py", str(path), "--out", str(tmp_path / "shards"),
                           "--skip-bad"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"2 rejected records listed in {tmp_path / 'shards' / 'gfn2_xtb' / 'rejects.jsonl'}" in done.stdout

"""Reader -> shards -> streams -> batches on real demo data: exactness, coverage, resume."""
import numpy as np
import pytest
import torch
from ase.io import read

from mlfound.data import DataError
from mlfound.data.batching import AtomBudgetBatcher
from mlfound.data.readers import SourceSpec, read_source
from mlfound.data.streams import TaskStream
from tests.data.helpers import demo_slice, shard


def one_epoch(stream: TaskStream) -> list:
    records = []
    while stream.epoch == 0:
        records.append(next(stream))
        stream.peek()  # moves to the next epoch once this one is exhausted
    return records


@pytest.mark.parametrize("task", ["gfn2_xtb", "b3lyp_631g"])  # with forces, energy-only
def test_stream_reproduces_every_record_exactly(demo_dir, tmp_path, task):
    source = demo_slice(demo_dir, task, 60, tmp_path)
    shard(source, tmp_path / "shards", records_per_shard=17)
    expected = {r.index: r for r in read_source(SourceSpec(path=source, task=task))}
    got = one_epoch(TaskStream(tmp_path / "shards" / task, seed=3))
    assert sorted(r.index for r in got) == sorted(expected)
    for rec in got:
        ref = expected[rec.index]
        assert rec.energy_ev == ref.energy_ev  # bit-exact float64
        np.testing.assert_array_equal(rec.pos_a, ref.pos_a)
        np.testing.assert_array_equal(rec.z, ref.z)
        if ref.forces_ev_a is None:
            assert rec.forces_ev_a is None
        else:
            np.testing.assert_array_equal(rec.forces_ev_a, ref.forces_ev_a)
        assert rec.source == str(source) and rec.task == task
    # and equal to what ASE itself reads from the file
    atoms = read(source, index=5)
    assert expected[5].energy_ev == atoms.get_potential_energy()


@pytest.mark.parametrize("records_per_shard", [60, 25, 7])  # 1 shard (< ranks), 3 shards (uneven), 9 shards
def test_two_ranks_cover_an_epoch_without_duplicates(demo_dir, tmp_path, records_per_shard):
    shard(demo_slice(demo_dir, "gfn2_xtb", 60, tmp_path), tmp_path / "shards", records_per_shard=records_per_shard)
    streams = [TaskStream(tmp_path / "shards" / "gfn2_xtb", seed=0, rank=r, world_size=2) for r in range(2)]
    per_rank = [[rec.index for rec in one_epoch(s)] for s in streams]
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == list(range(60)), "each record exactly once per epoch across ranks"
    # streams never run dry: both ranks keep yielding well past an epoch
    for s in streams:
        assert all(next(s).task == "gfn2_xtb" for _ in range(150))


def test_order_is_a_function_of_seed_rank_and_epoch(demo_dir, tmp_path):
    shard(demo_slice(demo_dir, "gfn2_xtb", 60, tmp_path), tmp_path / "shards", records_per_shard=10)
    task_dir = tmp_path / "shards" / "gfn2_xtb"

    def order(seed, rank=0, n=60):
        s = TaskStream(task_dir, seed=seed, rank=rank, world_size=2)
        return [next(s).index for _ in range(n)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, rank=0) != order(1, rank=1)
    first_two_epochs = order(1)
    assert first_two_epochs[:30] != first_two_epochs[30:], "each epoch is reshuffled"


@pytest.mark.parametrize("num_batches_before", [3, 11])  # inside the first epoch; past an epoch boundary
def test_resume_yields_exactly_the_uninterrupted_batches(demo_dir, tmp_path, num_batches_before):
    shard(demo_slice(demo_dir, "gfn2_xtb", 60, tmp_path), tmp_path / "shards", records_per_shard=13)
    task_dir = tmp_path / "shards" / "gfn2_xtb"

    def batcher():
        return AtomBudgetBatcher(TaskStream(task_dir, seed=7, rank=1, world_size=2), max_atoms=40,
                                 cutoff_a=4.0, task_names=["b3lyp_631g", "gfn2_xtb"])

    uninterrupted = batcher()
    reference = [next(uninterrupted) for _ in range(num_batches_before + 6)]
    first = batcher()
    for _ in range(num_batches_before):
        next(first)
    state = first.state_dict()
    resumed = batcher()
    resumed.load_state_dict(state)
    for expected in reference[num_batches_before:]:
        got = next(resumed)
        for name in ("z", "pos_a", "edge_index", "energy_ev", "forces_ev_a", "task_index", "num_atoms"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_atom_budget_batches(demo_dir, tmp_path):
    shard(demo_slice(demo_dir, "gfn2_xtb", 60, tmp_path), tmp_path / "shards")
    batcher = AtomBudgetBatcher(TaskStream(tmp_path / "shards" / "gfn2_xtb", seed=0), max_atoms=30,
                                cutoff_a=5.0, task_names=["gfn2_xtb"])
    for _ in range(20):
        batch = next(batcher)
        assert int(batch.num_atoms.sum()) <= 30 or batch.num_graphs == 1
        assert batch.graph_index.shape == batch.z.shape
        assert int(batch.num_atoms.sum()) == len(batch.z)
        assert batch.edge_index.max() < len(batch.z)
        # no edge crosses graphs
        assert torch.equal(batch.graph_index[batch.edge_index[0]], batch.graph_index[batch.edge_index[1]])
        assert (batch.task_index == 0).all() and batch.has_forces.all()


def test_finite_batching_follows_the_stream_batching_rule(demo_dir, tmp_path):
    from mlfound.data.batching import atom_budget_batches

    shard(demo_slice(demo_dir, "gfn2_xtb", 60, tmp_path), tmp_path / "shards")
    stream = TaskStream(tmp_path / "shards" / "gfn2_xtb", seed=0)
    records = TaskStream(tmp_path / "shards" / "gfn2_xtb", seed=0).rest_of_epoch()
    batcher = AtomBudgetBatcher(stream, max_atoms=30, cutoff_a=5.0, task_names=["gfn2_xtb"], max_graphs=3)
    finite = atom_budget_batches(records, max_atoms=30, max_graphs=3)
    assert sum(len(b) for b in finite) == 60
    for batch in finite[:-1]:  # the last finite batch ends with the epoch; the stream goes on
        assert [r.index for r in batcher.next_records()] == [r.index for r in batch]


@pytest.mark.parametrize("num_records, records_per_shard, world_size", [(1, 1, 2), (4, 2, 4), (3, 5, 4)])
def test_tasks_smaller_than_the_world(demo_dir, tmp_path, num_records, records_per_shard, world_size):
    """Training: every rank reads the whole task (no rank may run dry), each in its own order.
    Validation (disjoint): every record exactly once over all ranks, some ranks get none."""
    shard(demo_slice(demo_dir, "gfn2_xtb", num_records, tmp_path), tmp_path / "shards",
          records_per_shard=records_per_shard)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    for rank in range(world_size):
        stream = TaskStream(task_dir, seed=0, rank=rank, world_size=world_size)
        assert sorted(r.index for r in one_epoch(stream)) == list(range(num_records))
        assert all(next(stream).task == "gfn2_xtb" for _ in range(3 * num_records))
    shares = [TaskStream(task_dir, seed=0, rank=rank, world_size=world_size, disjoint=True).rest_of_epoch()
              for rank in range(world_size)]
    assert sorted(r.index for share in shares for r in share) == list(range(num_records))
    assert [] in shares
    with pytest.raises(DataError, match=f"rank {world_size - 1} of {world_size} has no records"):
        next(TaskStream(task_dir, seed=0, rank=world_size - 1, world_size=world_size, disjoint=True))


def test_verify_checks_every_shard_on_every_rank(demo_dir, tmp_path):
    """A corrupt shard is found by every rank, also by those that would never read it."""
    shard(demo_slice(demo_dir, "gfn2_xtb", 20, tmp_path), tmp_path / "shards", records_per_shard=5)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    corrupt = max(task_dir.glob("*.tar"))
    corrupt.write_bytes(corrupt.read_bytes()[:-700])
    for rank in range(2):
        with pytest.raises(DataError, match=f"shard {corrupt}: sha256 does not match"):
            TaskStream(task_dir, seed=0, rank=rank, world_size=2, disjoint=True).verify()

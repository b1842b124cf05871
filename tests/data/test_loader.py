"""StepLoader on real demo shards: the loop's order with and without workers, exact resume with workers,
worker errors, and neighbour lists on the batch's device (vesin-torch) against the host path."""
import dataclasses
import functools

import numpy as np
import pytest
import torch

from mlfound.data import DataError
from mlfound.data.batching import AtomBudgetBatcher, collate, device_neighbour_lists
from mlfound.data.loader import StepLoader, assign_lanes
from mlfound.data.streams import TaskStream
from mlfound.meta.sampling import TaskSampler
from tests.data.helpers import demo_slice, shard

TASKS = ["gfn2_xtb", "hf_sto3g", "b3lyp_631g"]  # b3lyp_631g has no forces
RANK, WORLD, K, STEPS = 1, 2, 3, 12  # 12 steps x 3 batches cross two epochs of every task on this rank


@pytest.fixture(scope="module")
def shard_root(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for task in TASKS:
        shard(demo_slice(demo_dir, task, 40, root), root, records_per_shard=9)
    return root


def batchers(shard_root, with_neighbours=True) -> dict[str, AtomBudgetBatcher]:
    return {t: AtomBudgetBatcher(TaskStream(shard_root / t, seed=5, rank=RANK, world_size=WORLD), max_atoms=30,
                                 cutoff_a=4.0, task_names=TASKS, with_neighbours=with_neighbours) for t in TASKS}


SAMPLER = TaskSampler({"gfn2_xtb": 40, "hf_sto3g": 20, "b3lyp_631g": 10}, "proportional", seed=5)


def loader(shard_root, num_workers, **options) -> StepLoader:
    weights = dict(zip(SAMPLER.task_names, SAMPLER.probabilities.tolist()))
    return StepLoader(batchers(shard_root, not options.get("neighbours_on_device", False)), weights,
                      functools.partial(SAMPLER.draw, rank=RANK), K, torch.device("cpu"), num_workers, **options)


def consume(step_loader: StepLoader, steps) -> list:
    return [step_loader.next_batch(s, SAMPLER.draw(s, RANK)) for s in steps for _ in range(K)]


@pytest.fixture(scope="module")
def reference(shard_root):
    """What the loop took before the loader existed: k batches of each step's task, straight from its batcher."""
    plain = batchers(shard_root)
    batches = [next(plain[SAMPLER.draw(s, RANK)]) for s in range(STEPS) for _ in range(K)]
    return batches, {t: b.state_dict() for t, b in plain.items()}


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field.name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_the_loops_order_with_and_without_workers(shard_root, reference, num_workers):
    batches, final_states = reference
    assert len({SAMPLER.draw(s, RANK) for s in range(STEPS)}) == 3, "the seed must draw every task"
    rng = torch.get_rng_state()
    step_loader = loader(shard_root, num_workers, prefetch=4)
    assert_same_batches(consume(step_loader, range(STEPS)), batches)
    assert step_loader.state_dict() == final_states  # consumed, not prefetched
    assert torch.equal(torch.get_rng_state(), rng), "the loader drew from the global torch RNG (checkpointed)"
    step_loader.close()


@pytest.mark.parametrize("workers_before, workers_after", [(2, 2), (2, 0), (0, 1)])
def test_resume_mid_epoch_equals_the_uninterrupted_batches(shard_root, reference, workers_before, workers_after):
    """Stop after 5 steps (mid-epoch, with batches prefetched beyond), restore into a fresh loader, maybe
    with another worker count: the rest is exactly the uninterrupted sequence."""
    batches, _ = reference
    first = loader(shard_root, workers_before, prefetch=4) if workers_before else loader(shard_root, 0)
    consume(first, range(5))
    state = first.state_dict()
    first.close()
    assert any(s["epoch"] > 0 and (s["cursor"] or s["offset"]) for s in state.values()), "not mid-epoch"
    resumed = loader(shard_root, workers_after)
    resumed.load_state_dict(state)
    assert_same_batches(consume(resumed, range(5, STEPS)), batches[5 * K:])
    resumed.close()


def test_the_loop_and_the_schedule_must_agree(shard_root):
    step_loader = loader(shard_root, 0)
    step_loader.next_batch(0, SAMPLER.draw(0, RANK))
    with pytest.raises(AssertionError, match="state_dict inside step 0: save between steps"):
        step_loader.state_dict()  # resuming from it would build the step's remaining batches again
    other = next(t for t in TASKS if t != SAMPLER.draw(0, RANK))
    with pytest.raises(AssertionError, match=r"the schedule gives step and task \(0, "):
        step_loader.next_batch(0, other)


def test_lanes_balance_the_drawn_tasks():
    assert assign_lanes({"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.0}, 2) == [["a"], ["b", "c"]]
    assert assign_lanes({"a": 0.5, "b": 0.5}, 4) == [["a"], ["b"]]
    assert assign_lanes({"a": 0.6, "b": 0.4}, 1) == [["a", "b"]]


def test_more_workers_than_tasks_warns(shard_root):
    with pytest.warns(UserWarning, match="loader_workers=5, but only 3 tasks are ever drawn"):
        assert len(loader(shard_root, 5).lanes) == 3


def test_a_corrupt_shard_read_by_a_worker_names_the_shard(demo_dir, tmp_path):
    shard(demo_slice(demo_dir, "gfn2_xtb", 20, tmp_path), tmp_path / "shards", records_per_shard=5)
    task_dir = tmp_path / "shards" / "gfn2_xtb"
    corrupt = max(task_dir.glob("*.tar"))
    corrupt.write_bytes(corrupt.read_bytes()[:-700])
    plain = {"gfn2_xtb": AtomBudgetBatcher(TaskStream(task_dir, seed=0), 30, 4.0, ["gfn2_xtb"])}
    step_loader = StepLoader(plain, {"gfn2_xtb": 1.0}, lambda step: "gfn2_xtb", 1, torch.device("cpu"), 1)
    with pytest.raises(DataError, match=f"shard {corrupt}: sha256 does not match"):
        for step in range(20):
            step_loader.next_batch(step, "gfn2_xtb")
    step_loader.close()


def edge_set(batch) -> set:
    shifts = np.round(batch.edge_shift_a.numpy(), 6)
    return {(int(i), int(j), *s) for (i, j), s in zip(batch.edge_index.T.tolist(), shifts.tolist())}


def test_neighbour_lists_on_the_device_equal_the_host_ones(shard_root, reference, tmp_path):
    from ase.build import bulk

    from mlfound.data.readers import SourceSpec, read_source

    path = tmp_path / "cu.extxyz"
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    atoms.info["energy"] = -1.0
    atoms.write(path)
    periodic = list(read_source(SourceSpec(path=path, task="cu")))
    molecules = TaskStream(shard_root / "gfn2_xtb", seed=0).rest_of_epoch()[:4]
    for records, tasks in [(molecules, ["gfn2_xtb"]), (periodic + periodic, ["cu"])]:
        host = collate(records, 4.0, tasks)
        bare = collate(records, 4.0, tasks, with_neighbours=False)
        assert bare.edge_index.shape == (2, 0)
        device = device_neighbour_lists(bare, bare.num_atoms.tolist(), 4.0)
        assert host.edge_index.shape == device.edge_index.shape and edge_set(device) == edge_set(host)
        assert device.cell_a is None and device.pbc is None
    batches, _ = reference  # and through the loader
    on_device = consume(loader(shard_root, 0, neighbours_on_device=True), range(3))
    assert [edge_set(b) for b in on_device] == [edge_set(b) for b in batches[:3 * K]]

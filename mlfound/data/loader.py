"""Training batches built ahead in background workers, in exactly the order the training loop takes them.

The loop's order is known in advance: at outer step s a rank takes ``batches_per_step`` batches of task
``task_of_step(s)``, a pure function of (seed, step, rank). ``StepLoader`` serves that order. Every batch
travels with its task stream's state after it, and ``state_dict`` holds the state of the batches the loop
*consumed*, not of those prefetched: resume is exact with any number of workers (also one different from the
run that saved it), and the checkpoint keeps the per-task stream states it always held.

Workers are torch DataLoader processes, each owning whole tasks (a "lane"): a lane builds only its tasks'
steps (read, decode, batch, neighbour lists), in step order, ``prefetch`` steps ahead, so no record is read
twice. Tasks go to lanes by expected load (their sampling probability). torchdata's StatefulDataLoader also resumes
exactly (checked: 1-3 workers), but its workers take turns (batch i from worker i mod W); a task's batch
boundaries depend on the batch before, so every one of its workers would read and batch every record, and its
saved state fits one worker count only.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from mlfound.data.batching import AtomBudgetBatcher, GraphBatch, device_neighbour_lists
from mlfound.data.record import DataError


@dataclasses.dataclass
class ScheduledStep:
    """One step's batches of one task, each with the task stream's state after it. A step, not a batch, is
    what a worker hands over: one transfer per step keeps the training process's share small."""
    step: int
    task: str
    batches: list[GraphBatch]
    stream_states: list[dict]

    def pin_memory(self) -> "ScheduledStep":  # called by the DataLoader's pin-memory thread
        return dataclasses.replace(self, batches=[b.pin_memory() for b in self.batches])

    def __getstate__(self) -> dict:
        """From a worker as numpy arrays, by value: for batches this small, torch's shared-memory tensor
        passing (a file descriptor per tensor) cost the training process more than building the batch."""
        batches = [{f.name: v.numpy() if isinstance(v := getattr(b, f.name), torch.Tensor) else v
                    for f in dataclasses.fields(b)} for b in self.batches]
        return {**self.__dict__, "batches": batches}

    def __setstate__(self, state: dict) -> None:
        batches = [GraphBatch(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in b.items()})
                   for b in state["batches"]]
        self.__dict__.update({**state, "batches": batches})


class ScheduledSteps(IterableDataset):
    """The steps of ``batchers``' tasks in the loop's order from ``start_step``, each with
    ``batches_per_step`` batches; steps of other tasks are skipped."""

    def __init__(self, batchers: dict[str, AtomBudgetBatcher], task_of_step: Callable[[int], str],
                 batches_per_step: int, start_step: int):
        self.batchers, self.task_of_step = batchers, task_of_step
        self.batches_per_step, self.start_step = batches_per_step, start_step

    def __iter__(self) -> Iterator[ScheduledStep]:
        for step in itertools.count(self.start_step):
            task = self.task_of_step(step)
            batcher = self.batchers.get(task)
            if batcher is not None:
                batches, states = [], []
                for _ in range(self.batches_per_step):
                    batches.append(next(batcher))
                    states.append(batcher.state_dict())
                yield ScheduledStep(step, task, batches, states)


def assign_lanes(task_weights: dict[str, float], num_lanes: int) -> list[list[str]]:
    """Tasks with weight > 0 split into at most ``num_lanes`` groups of near-equal total weight (greedy,
    heaviest first): each lane's worker then builds about the same share of the batches."""
    drawn = sorted((t for t, w in task_weights.items() if w > 0), key=lambda t: (-task_weights[t], t))
    lanes: list[list[str]] = [[] for _ in range(min(num_lanes, len(drawn)))]
    loads = [0.0] * len(lanes)
    for task in drawn:
        lightest = loads.index(min(loads))
        lanes[lightest].append(task)
        loads[lightest] += task_weights[task]
    return lanes


class StepLoader:
    """``next_batch(step, task)`` in the loop's order, on ``device``; ``state_dict()`` is what was consumed.

    ``num_workers`` 0 builds every batch in this process when asked (what the loop did before there were
    workers); otherwise up to ``num_workers`` lanes build ahead. Batches are pinned for a CUDA device and
    copied with ``non_blocking=True``. ``neighbours_on_device`` leaves the neighbour lists to vesin-torch on
    ``device`` after the copy (the batchers must then collate without them)."""

    def __init__(self, batchers: dict[str, AtomBudgetBatcher], task_weights: dict[str, float],
                 task_of_step: Callable[[int], str], batches_per_step: int, device: torch.device,
                 num_workers: int = 0, prefetch: int = 2, neighbours_on_device: bool = False):
        self.batchers, self.task_of_step, self.batches_per_step = batchers, task_of_step, batches_per_step
        self.device, self.neighbours_on_device = torch.device(device), neighbours_on_device
        self.num_workers, self.prefetch = num_workers, prefetch
        self.lanes = assign_lanes(task_weights, max(num_workers, 1))
        if num_workers > len(self.lanes):
            warnings.warn(f"data.loader_workers={num_workers}, but only {len(self.lanes)} tasks are ever drawn "
                          f"on this rank: a worker builds whole tasks, so {len(self.lanes)} start", stacklevel=2)
        self.lane_of = {task: lane for lane, tasks in enumerate(self.lanes) for task in tasks}
        self._states = {task: b.state_dict() for task, b in batchers.items()}
        self._iterators: list[Iterator[ScheduledStep]] | None = None  # started by the first next_batch
        self._pending: collections.deque[tuple[GraphBatch, dict]] = collections.deque()  # this step's rest
        self._pending_step: tuple[int, str] | None = None

    def next_batch(self, step: int, task: str) -> GraphBatch:
        if self._iterators is None:
            self._start(step)
        if not self._pending:
            try:
                item = next(self._iterators[self.lane_of[task]])
            except DataError as err:  # from a worker, torch prefixes the worker's traceback: keep the message
                raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
            self._pending_step = (item.step, item.task)
            self._pending.extend(zip(item.batches, item.stream_states))
        assert self._pending_step == (step, task), \
            f"the loop asked for step {step} task {task!r}; the schedule gives step and task {self._pending_step}"
        host, self._states[task] = self._pending.popleft()
        batch = host.to(self.device, non_blocking=True)
        if self.neighbours_on_device:
            batch = device_neighbour_lists(batch, host.num_atoms.tolist(), self.batchers[task].cutoff_a)
        return batch

    def state_dict(self) -> dict[str, dict]:
        """Per task, the stream state after the last batch the loop took (prefetched ones do not count).
        Taken between steps: a step's remaining batches would be built again from it."""
        assert not self._pending, f"state_dict inside step {self._pending_step[0]}: save between steps"
        return dict(self._states)

    def load_state_dict(self, states: dict[str, dict]) -> None:
        if self._iterators is not None:
            raise RuntimeError("load_state_dict after the first batch: restore before training starts")
        self._states = {**self._states, **states}

    def close(self) -> None:
        """Stop the workers (a DataLoader iterator shuts its worker down when dropped); a later next_batch
        starts afresh from the consumed state."""
        self._iterators, self._pending = None, collections.deque()

    def _start(self, step: int) -> None:
        for task, batcher in self.batchers.items():
            batcher.load_state_dict(self._states[task])
        datasets = [ScheduledSteps({t: self.batchers[t] for t in tasks}, self.task_of_step,
                                   self.batches_per_step, step) for tasks in self.lanes]
        if self.num_workers == 0:
            self._iterators = [iter(d) for d in datasets]
            return
        # each DataLoader gets its own generator: by default it draws its workers' seed from the global torch
        # RNG, which the checkpoint holds, and the training would then depend on the worker count
        pin = self.device.type == "cuda"
        self._iterators = [iter(DataLoader(d, batch_size=None, num_workers=1, prefetch_factor=self.prefetch,
                                           pin_memory=pin, generator=torch.Generator())) for d in datasets]

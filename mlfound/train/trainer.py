"""The pretraining loop: per outer step, each rank draws its task, then Reptile (k inner steps on a
plain copy, pseudo-gradient through the engine), joint (one gradient step on its own task's batch,
averaged over ranks) or single (one task everywhere)."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from mlfound.config import RunConfig
from mlfound.data.files import atomic_write_bytes
from mlfound.data.loader import StepLoader
from mlfound.meta.loss import LossWeights, potential_loss
from mlfound.meta.reptile import inner_loop, scale_task_heads, surrogate_loss
from mlfound.metrics import error_table, format_error_table
from mlfound.train import checkpoint
from mlfound.train.build import (
    build_loader,
    build_potential,
    build_sampler,
    load_manifests,
    manifest_provenance,
    validation_dirs,
    with_data_normalisers,
)
from mlfound.train.engine import build_engine, init_distributed
from mlfound.train.validation import validation_batches

HEAD_PREFIX = "heads.heads."
VALIDATION_LOG = "validation.jsonl"


class _TimedBatches:
    """One step's batches from the loader, counting atoms and the seconds spent waiting for data."""

    def __init__(self, loader: StepLoader, step: int, task: str, clock: dict):
        self.loader, self.step, self.task, self.clock = loader, step, task, clock

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = self.loader.next_batch(self.step, self.task)
        self.clock["data_s"] += time.perf_counter() - start
        self.clock["atoms"] += len(batch.z)
        return batch


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.rank, self.world_size = init_distributed()
        torch.manual_seed(cfg.seed)
        self.manifests = load_manifests(cfg)
        self.cfg = cfg = with_data_normalisers(cfg, self.manifests)
        model = build_potential(cfg, self.manifests)
        self.work = copy.deepcopy(model)  # the plain per-rank inner copy: no DeepSpeed hooks
        self.engine = build_engine(cfg, model)
        self.device = self.engine.device  # CPU, or this rank's GPU
        self.work.to(self.device)
        self.param_names = [n for n, _ in self.engine.module.named_parameters()]
        self.sampler = build_sampler(cfg, self.manifests)
        self.loader = build_loader(cfg, self.rank, self.world_size, self.sampler, self.device)
        self.weights = LossWeights(cfg.loss.energy_weight, cfg.loss.forces_weight, cfg.loss.stress_weight)
        self.step = 0
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._window = self._new_window()
        self._validation_batches = validation_batches(  # now: a bad validation shard fails before training
            validation_dirs(cfg), cfg.data.tasks, cfg.model.cutoff_a, cfg.data.max_atoms_per_batch,
            self.rank, self.world_size, cfg.data.shard_url_template)
        self._evaluation: tuple[int | None, dict] = (None, {})  # (step, table) of the latest evaluation

    def train(self, resume: str | None = None) -> dict:
        """Run to ``train.outer_steps``; returns the final validation table (per task). A step is saved
        before it is evaluated, so a failing evaluation never costs that step's checkpoint."""
        if resume:
            self.restore(resume)
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(self.cfg.model_dump_json(indent=1))
        last_step = min(self.cfg.train.outer_steps, self.cfg.train.stop_after_steps or self.cfg.train.outer_steps)
        try:
            while self.step < last_step:
                tasks = self.tasks_of_step(self.step)
                self.outer_step(tasks)
                self.step += 1
                if self.step % self.cfg.train.log_every == 0:
                    self.log()
                if self.step % self.cfg.train.save_every == 0:
                    self.save()
                if self.step % self.cfg.train.eval_every == 0:
                    self.evaluate()
        finally:
            self.loader.close()  # stops the loader's workers, also when a step fails
        if self.step % self.cfg.train.save_every != 0:
            self.save()  # the final state is always checkpointed
        results = self.evaluate()
        if self.rank == 0:
            print(format_error_table(results), flush=True)
        return results

    def tasks_of_step(self, step: int) -> list[str]:
        """Every rank's task at ``step``: a pure function of (seed, step, rank), so no communication."""
        return [self.sampler.draw(step, r) for r in range(self.world_size)]

    def outer_step(self, tasks: list[str]) -> None:
        task = tasks[self.rank]
        batches = _TimedBatches(self.loader, self.step, task, self._window)
        parts: list[dict] = []

        def loss_fn(model, batch):
            loss, part = potential_loss(model, batch, self.weights)
            parts.append(part)
            return loss

        if self.cfg.meta.mode == "reptile":
            theta0 = [p.detach().clone() for p in self.engine.module.parameters()]
            inner = torch.optim.Adam(self.work.parameters(), lr=self.cfg.meta.inner_lr, betas=(0.0, 0.999))
            delta = inner_loop(self.work, theta0, batches, self.cfg.meta.inner_steps, inner, loss_fn)
            scale_task_heads(delta, self.param_names, HEAD_PREFIX, task, self.world_size / tasks.count(task))
            loss = surrogate_loss(list(self.engine.module.parameters()), delta)
        else:
            loss = loss_fn(self.engine.module, next(batches))
        self.engine.backward(loss)
        self.engine.step()
        self._window["tasks"].extend(tasks)  # every rank's task: known here without communication
        position = self.cfg.data.tasks.index(task)  # losses stay on the device until a log step: no sync here
        self._window["loss_sum"][position] += sum(p["energy_mse"] + p.get("forces_mse", 0.0) + p.get("stress_mse", 0.0)
                                                  for p in parts)
        self._window["loss_count"][position] += len(parts)

    # -- logging, evaluation, checkpoints ---------------------------------------------------------
    def _new_window(self) -> dict:
        num_tasks = len(self.cfg.data.tasks)
        return {"start": time.perf_counter(), "data_s": 0.0, "atoms": 0, "tasks": [], "loss_count": [0] * num_tasks,
                "loss_sum": torch.zeros(num_tasks, dtype=torch.float64, device=self.device)}

    def take_window(self) -> dict:
        """The counters since the last call (time, data wait, atoms, tasks, losses), restarting them."""
        window, self._window = self._window, self._new_window()
        return window

    def log(self) -> None:
        """Per-task losses averaged over all ranks (one small all-reduce), the realised task mixture over
        all ranks, and this rank's speed and data-wait fraction."""
        w = self.take_window()
        seconds = time.perf_counter() - w["start"]
        count = torch.tensor(w["loss_count"], dtype=torch.float64, device=self.device)
        loss_sum_count = torch.stack([w["loss_sum"], count], dim=1)  # on the device: nccl reduces GPU tensors only
        torch.distributed.all_reduce(loss_sum_count)
        loss_sum_count = loss_sum_count.cpu()
        num_steps = len(w["tasks"]) // self.world_size
        record = {
            "step": self.step, "rank": self.rank, "lr": self.engine.get_lr()[0],
            "seconds_per_step": seconds / max(num_steps, 1), "atoms_per_s": w["atoms"] / seconds,
            "data_wait_fraction": w["data_s"] / seconds,
            "task_mixture": {t: w["tasks"].count(t) / len(w["tasks"]) for t in self.cfg.data.tasks},
            "loss": {t: (s / n).item() for t, (s, n) in zip(self.cfg.data.tasks, loss_sum_count) if n > 0},
        }
        with open(self.run_dir / f"metrics_rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(f"train/loss/{t}", v, self.step) for t, v in record["loss"].items()])
        if self.rank == 0:
            losses = " ".join(f"{t}={v:.4g}" for t, v in record["loss"].items())
            mixture = " ".join(f"{t}={v:.2f}" for t, v in record["task_mixture"].items())
            print(f"step {self.step:>6}  lr {record['lr']:.3g}  {record['seconds_per_step']:.2f} s/step  "
                  f"{record['atoms_per_s']:.0f} atoms/s/rank  data wait {100 * record['data_wait_fraction']:.0f}%\n"
                  f"    loss {losses}\n    mixture {mixture}", flush=True)

    def evaluate(self) -> dict:
        """This step's validation table, computed and logged once per step: the final evaluation may fall
        on a periodic one, or on the step a resumed run restored (its table is in the log already)."""
        step, results = self._evaluation
        if step != self.step:
            results = error_table(self.engine.module, self._validation_batches, self.device)
            self._evaluation = (self.step, results)
            if self.rank == 0 and results:
                with open(self.run_dir / VALIDATION_LOG, "a") as f:
                    f.write(json.dumps({"step": self.step, "tasks": results}) + "\n")
        return results

    def save(self) -> Path:
        client_state = {"step": self.step, "config": self.cfg.model_dump(mode="json"),
                        "manifest_fingerprints": {t: m["fingerprint"] for t, m in self.manifests.items()}}
        rank_state = {"streams": self.loader.state_dict(),  # of the batches consumed, not prefetched
                      "torch_rng": torch.get_rng_state()}
        return checkpoint.save(self.engine, self.run_dir, self.step, client_state, rank_state, self.rank,
                               self.model_info())

    def model_info(self) -> dict:
        """What a release needs besides the weights; see mlfound/train/export.py."""
        module = self.engine.module
        return {"step": self.step, "elements": module.elements, "tasks": module.task_names,
                "config": self.cfg.model_dump(mode="json"),
                "heads": {task: {"lot": m["lot"], "data": manifest_provenance(m)}
                          for task, m in self.manifests.items()}}

    def restore(self, resume: str) -> None:
        tag = checkpoint.latest_tag(self.run_dir) if resume == "auto" else resume
        if tag is None:
            if self.rank == 0:
                print(f"no checkpoint in {checkpoint.checkpoint_dir(self.run_dir)}; starting fresh", flush=True)
            return
        client_state, rank_state = checkpoint.restore(self.engine, self.run_dir, tag, self.rank)
        changed = [t for t, m in self.manifests.items()
                   if client_state["manifest_fingerprints"].get(t) != m["fingerprint"]]
        if changed:
            raise ValueError(f"the shards of tasks {changed} changed since checkpoint {tag}; exact resume is "
                             "impossible. Re-shard the original sources or start a new run_dir")
        self.step = client_state["step"]
        self.loader.load_state_dict(rank_state["streams"])
        torch.set_rng_state(rank_state["torch_rng"])
        self._forget_logs_after_step()
        if self.rank == 0:
            print(f"resumed from {checkpoint.checkpoint_dir(self.run_dir) / tag} (step {self.step})", flush=True)

    def _forget_logs_after_step(self) -> None:
        """Drop what the logs hold beyond the restored step (a job killed after logging steps it did not
        checkpoint), so the resumed run logs no step twice. Every rank reads the validation log (rank 0
        rewrites it) and reuses a table of the restored step, so all ranks skip that evaluation alike."""
        drop_lines_after(self.run_dir / f"metrics_rank{self.rank}.jsonl", self.step)
        validation = self.run_dir / VALIDATION_LOG
        kept = drop_lines_after(validation, self.step) if self.rank == 0 else read_jsonl(validation, self.step)
        if kept and kept[-1]["step"] == self.step:
            self._evaluation = (self.step, kept[-1]["tasks"])


def read_jsonl(path: Path, last_step: int) -> list[dict]:
    """The records of a JSONL log up to ``last_step``; a line cut short by a killed job is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if r["step"] <= last_step]


def drop_lines_after(path: Path, last_step: int) -> list[dict]:
    """Rewrite a JSONL log (atomically) with only its records up to ``last_step``; returns them."""
    kept = read_jsonl(path, last_step)
    if path.exists():
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept

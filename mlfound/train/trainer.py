"""The pretraining loop: per outer step, each rank draws its task, takes k inner steps on a plain copy and
hands the pseudo-gradient to the engine's outer optimizer; Reptile, joint and single are points of this one
step (mlfound/meta/methods.py)."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from mlfound.config import RunConfig
from mlfound.data.files import FolderInUseError, FolderLock, atomic_write_bytes
from mlfound.data.loader import StepLoader
from mlfound.meta.loss import potential_loss
from mlfound.meta.outer_step import inner_loop, inner_optimizer, pseudo_gradient, scale_task_heads, surrogate_loss
from mlfound.metrics import error_table, format_error_table
from mlfound.model import Potential
from mlfound.tracking import Tracker, open_tracker
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
from mlfound.train.guards import TrainingError, all_finite, non_finite_ranks, resume_changes, weights_digest
from mlfound.train.validation import validation_batches

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
    """One pretraining run in ``cfg.run_dir``, which it owns (a lock held by rank 0 until ``close``).
    ``resume`` ('auto' or a checkpoint tag) continues a checkpoint of the same run: its config must agree with
    ``cfg`` in everything that shapes the model and the data (mlfound/train/guards.py)."""

    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.rank, self.world_size = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self.tracker = Tracker()  # rank 0 opens TensorBoard / W&B when training starts (``train``)
        self._lock = self._lock_run_dir()  # before anything in run_dir is read or written
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: RunConfig, resume: str | None) -> None:
        torch.manual_seed(cfg.seed)
        self.resume_tag = checkpoint.latest_tag(self.run_dir) if resume == "auto" else resume
        if resume == "auto" and self.resume_tag is None and self.rank == 0:
            print(f"no checkpoint in {checkpoint.checkpoint_dir(self.run_dir)}; starting fresh", flush=True)
        manifests = load_manifests(cfg)  # every local shard checked against its manifest
        cfg = with_data_normalisers(cfg, manifests)
        if self.resume_tag is not None:
            cfg = self._config_to_resume(cfg)
        self.cfg, self.manifests = cfg, {task: manifests[task] for task in cfg.data.tasks}
        model = build_potential(cfg, self.manifests)
        model.compiled_forces = cfg.train.compile_forces
        self.work = copy.deepcopy(model)  # the plain per-rank inner copy: no DeepSpeed hooks
        self.engine = build_engine(cfg, model)
        self.device = self.engine.device  # CPU, or this rank's GPU
        self.work.to(self.device)
        # meta.inner.persist: one inner optimizer for the run, its state in each rank's checkpoint file
        self.inner_optimizer = (inner_optimizer(cfg.meta.inner, self.work.parameters()) if cfg.meta.inner.persist
                                else None)
        self.param_names = [n for n, _ in self.engine.module.named_parameters()]
        self.initial_weights = weights_digest(self.engine.module)  # export refuses a run that never moved them
        self.sampler = build_sampler(cfg, self.manifests)
        self.loader = build_loader(cfg, self.rank, self.world_size, self.sampler, self.device)
        self.loss_weights = cfg.loss
        self.step = 0
        self._skipped_steps = 0
        self._window = self._new_window()
        self._validation_batches = validation_batches(  # now: a bad validation shard fails before training
            validation_dirs(cfg), cfg.data.tasks, cfg.model.cutoff_a, cfg.data.max_atoms_per_batch,
            self.rank, self.world_size, cfg.data.shard_url_template)
        self._evaluation: tuple[int | None, dict] = (None, {})  # (step, table) of the latest evaluation

    def _lock_run_dir(self) -> FolderLock | None:
        """Rank 0 locks run_dir; every rank learns the verdict (one tiny all-reduce), so all stop together."""
        lock, refused = None, None
        if self.rank == 0:
            try:
                lock = FolderLock(self.run_dir, "pretraining run").acquire()
            except FolderInUseError as err:
                refused = err
        flag = torch.tensor([refused is not None], dtype=torch.float32, device=_collective_device())
        if self.world_size > 1:
            torch.distributed.all_reduce(flag)
        if refused is not None:
            raise refused
        if flag.item():
            raise FolderInUseError(f"{self.run_dir} is in use by another pretraining run (rank 0 says which)")
        if lock is not None and lock.stale_note():
            print(lock.stale_note(), flush=True)
        return lock

    def _config_to_resume(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` checked against the checkpoint's config, in the checkpoint's task order; what may change on
        resume (learning rates, steps, cadence, task order) is listed, anything else stops the run."""
        saved = checkpoint.saved_config(self.run_dir, self.resume_tag)
        changes = resume_changes(saved, cfg.model_dump(mode="json"), self.resume_tag)
        if self.rank == 0 and changes:
            print(f"resume: changed since checkpoint {self.resume_tag}: {'; '.join(changes)}", flush=True)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tasks": saved["data"]["tasks"]})})

    def close(self) -> None:
        """Release run_dir and the tracker (the launcher calls this in ``finally``)."""
        self.tracker.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def train(self) -> dict:
        """Run to ``train.outer_steps``; returns the final validation table (per task). A step is saved
        before it is evaluated, so a failing evaluation never costs that step's checkpoint."""
        if self.resume_tag is not None:
            self.restore(self.resume_tag)
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(self.cfg.model_dump_json(indent=1))
            metadata = {"config": self.cfg.model_dump(mode="json"),
                        "data": {task: manifest_provenance(m) for task, m in self.manifests.items()}}
            self.tracker = open_tracker(self.run_dir, self.cfg.logging, metadata, start_step=self.step)
        last_step = min(self.cfg.train.outer_steps, self.cfg.train.stop_after_steps or self.cfg.train.outer_steps)
        try:
            while self.step < last_step:
                tasks = self.tasks_of_step(self.step)
                self.outer_step(tasks)
                self.step += 1
                if _due(self.step, self.cfg.train.log_every):
                    self.log()
                if self.step % self.cfg.train.save_every == 0:
                    self.save()
                if _due(self.step, self.cfg.train.eval_every):
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
        losses: list[torch.Tensor] = []  # the loss each inner step optimises, kept on the device

        def loss_fn(model, batch):
            loss, _ = potential_loss(model, batch, self.loss_weights)
            losses.append(loss.detach())
            return loss

        meta = self.cfg.meta
        theta0 = [p.detach().clone() for p in self.engine.module.parameters()]
        inner = self.inner_optimizer or inner_optimizer(meta.inner, self.work.parameters())
        displacement = inner_loop(self.work, theta0, batches, meta.inner_steps, inner, loss_fn)
        self._stop_unless_finite(all_finite(displacement), tasks)
        handed = pseudo_gradient(displacement, meta.inner.lr, meta.outer.name)
        if meta.rescale_heads:
            scale_task_heads(handed, self.param_names, Potential.head_prefix(task), self.world_size / tasks.count(task))
        self.engine.backward(surrogate_loss(list(self.engine.module.parameters()), handed))
        logged = _due(self.step + 1, self.cfg.train.log_every)
        grad_norm = _local_grad_norm(self.engine.module) if logged else None
        self.engine.step()
        if logged:  # ZeRO's optimizers hold the (partitioned) gradients and compute the norm themselves
            zero_norm = self.engine.get_global_grad_norm()
            if zero_norm is not None or grad_norm is not None:
                self._window["grad_norm"] = float(zero_norm if zero_norm is not None else grad_norm)
        self._check_update()
        self._window["tasks"].extend(tasks)  # every rank's task: known here without communication
        position = self.cfg.data.tasks.index(task)  # losses stay on the device until a log step
        self._window["loss_sum"][position] += sum(losses)
        self._window["loss_count"][position] += len(losses)

    def _stop_unless_finite(self, finite: torch.Tensor, tasks: list[str]) -> None:
        """Before the update: a non-finite loss or pseudo-gradient on any rank stops every rank at this step."""
        ranks = non_finite_ranks(finite, self.rank, self.world_size)
        if ranks:
            where = ", ".join(f"rank {r} (task {tasks[r]})" for r in ranks)
            self._stop(f"non-finite loss or gradient on {where}; stopped before applying it", "meta.inner.lr or "
                       "meta.outer.lr, or check that task's data")

    def _check_update(self) -> None:
        """No overflow step is tolerated: mlfound trains in fp32 or bf16 (fp16 is refused), which need no loss
        scaling, so a step DeepSpeed skips as an overflow means the run diverged (DeepSpeed agrees on it across
        ranks). Weights that an update made non-finite give a non-finite loss at the next step, and ``save``
        checks them too."""
        if self.engine.skipped_steps != self._skipped_steps:
            self._stop("DeepSpeed skipped the update as an overflow", "meta.outer.lr, or set "
                       "deepspeed.gradient_clipping")

    def _stop(self, what: str, lower: str, step: int | None = None) -> None:
        raise TrainingError(f"step {self.step + 1 if step is None else step}: {what}; nothing saved past the last good "
                            f"checkpoint ({checkpoint.latest_tag(self.run_dir) or 'none yet'}). Lower {lower}")

    # -- logging, evaluation, checkpoints ---------------------------------------------------------
    def _new_window(self) -> dict:
        num_tasks = len(self.cfg.data.tasks)
        return {"start": time.perf_counter(), "data_s": 0.0, "atoms": 0, "tasks": [], "grad_norm": float("nan"),
                "loss_count": [0] * num_tasks,
                "loss_sum": torch.zeros(num_tasks, dtype=torch.float64, device=self.device)}

    def take_window(self) -> dict:
        """The counters since the last call (time, data wait, atoms, tasks, losses), restarting them."""
        window, self._window = self._window, self._new_window()
        return window

    def log(self) -> None:
        """Per-task losses averaged over all ranks (one small all-reduce), the realised task mixture over
        all ranks, the norm of the last step's update direction (Reptile: the pseudo-gradient), and this rank's
        speed and data-wait fraction; to the JSONL log and the tracker (rank 0's)."""
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
            "data_wait_fraction": w["data_s"] / seconds, "grad_norm": w["grad_norm"],
            "task_mixture": {t: w["tasks"].count(t) / len(w["tasks"]) for t in self.cfg.data.tasks},
            "loss": {t: (s / n).item() for t, (s, n) in zip(self.cfg.data.tasks, loss_sum_count) if n > 0},
        }
        with open(self.run_dir / f"metrics_rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.scalars(self.step, {
            **{f"train/loss/{t}": v for t, v in record["loss"].items()},
            **{f"train/mixture/{t}": v for t, v in record["task_mixture"].items()},
            **{f"train/{key}": record[key] for key in ("lr", "seconds_per_step", "atoms_per_s", "data_wait_fraction",
                                                        "grad_norm")}})
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
                self.tracker.scalars(self.step, {f"val/{task}/{metric}": value for task, errors in results.items()
                                                 for metric, value in errors.items()})
        return results

    def save(self) -> Path:
        if not all_finite(self.engine.module.parameters()).item():  # identical on every rank: all stop here
            self._stop("the weights are not finite; not saved", "meta.outer.lr", step=self.step)
        client_state = {"step": self.step, "config": self.cfg.model_dump(mode="json"),
                        "initial_weights_sha256": self.initial_weights,
                        "manifest_fingerprints": {t: m["fingerprint"] for t, m in self.manifests.items()}}
        rank_state = {"streams": self.loader.state_dict(),  # of the batches consumed, not prefetched
                      "torch_rng": torch.get_rng_state()}
        if self.inner_optimizer is not None:
            rank_state["inner_optimizer"] = self.inner_optimizer.state_dict()
        return checkpoint.save(self.engine, self.run_dir, self.step, client_state, rank_state, self.rank,
                               self.model_info())

    def model_info(self) -> dict:
        """What a release needs besides the weights; see mlfound/train/export.py."""
        module = self.engine.module
        return {"step": self.step, "elements": module.elements, "tasks": module.task_names,
                "config": self.cfg.model_dump(mode="json"), "initial_weights_sha256": self.initial_weights,
                "heads": {task: {"lot": m["lot"], "data": manifest_provenance(m)}
                          for task, m in self.manifests.items()}}

    def restore(self, tag: str) -> None:
        client_state, rank_state = checkpoint.restore(self.engine, self.run_dir, tag, self.rank)
        changed = [t for t, m in self.manifests.items()
                   if client_state["manifest_fingerprints"].get(t) != m["fingerprint"]]
        if changed:
            raise TrainingError(f"the shards of tasks {changed} changed since checkpoint {tag}; exact resume is "
                                "impossible. Re-shard the original sources or start a new run_dir")
        self.step = client_state["step"]
        self._skipped_steps = self.engine.skipped_steps
        self.initial_weights = client_state.get("initial_weights_sha256", self.initial_weights)
        self.loader.load_state_dict(rank_state["streams"])
        torch.set_rng_state(rank_state["torch_rng"])
        if self.inner_optimizer is not None:  # meta.inner.persist cannot change on resume (resume_changes)
            self.inner_optimizer.load_state_dict(rank_state["inner_optimizer"])
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


def _local_grad_norm(model: torch.nn.Module) -> float | None:
    """The 2-norm of the gradients ``model`` holds after ``engine.backward`` (ZeRO 0: every rank holds the
    all-reduced whole); None when a ZeRO optimizer holds them instead."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads \
        else None


def _collective_device() -> torch.device:
    """Where this rank's collectives live before the engine exists: its accelerator, or the CPU (gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


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


def _due(step: int, every: int | None) -> bool:
    """Whether a periodic action (a log line, a validation) falls on ``step``; ``every`` None: never."""
    return every is not None and step % every == 0

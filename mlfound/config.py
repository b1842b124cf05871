"""Typed run configuration: defaults < YAML < dotted CLI overrides; unknown keys are errors.

    cfg = load_config("configs/demo.yaml", ["meta.inner_steps=5", "deepspeed.zero_stage=2"])
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlfound.data.urls import check_url_template
from mlfound.meta.methods import from_older_form, method_fields
from mlfound.model.config import ModelConfig

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


LOADER_PREFETCH = 2


class DataConfig(_Strict):
    shard_root: Path  # <shard_root>/<task>/ as `mlfound shard` writes it
    tasks: list[str] = Field(min_length=1)  # pretraining tasks: <shard_root>/<task>/manifest.json
    max_atoms_per_batch: int = Field(128, ge=1)  # atom budget of one batch: graphs are added while they fit
    max_graphs_per_batch: int | None = Field(None, ge=1)  # cap on graphs per batch as well; None: the atom budget alone
    shard_url_template: str | None = None  # stream shards from a mirror of shard_root: mlfound/data/urls.py

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[str]) -> list[str]:
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"tasks {repeated} are listed more than once; each task has one head")
        return tasks

    @field_validator("shard_url_template")
    @classmethod
    def _url_template(cls, template: str | None) -> str | None:
        if template is not None:
            check_url_template(template)
        return template
    loader_workers: int = Field(1, ge=0, description="background processes building batches ahead, each "
                                "owning whole tasks; 0 builds them in the training process (docs/benchmarks.md §4)")
    loader_prefetch: int = Field(LOADER_PREFETCH, ge=1,
                                 description="steps (k batches in reptile, else 1) each loader worker keeps ready")
    neighbours_on_device: bool = Field(False, description="build neighbour lists with vesin-torch on the "
                                       "training device after the copy (for GPUs), not in the loader")

    @model_validator(mode="after")
    def _warn_idle(self):
        if self.loader_workers == 0 and self.loader_prefetch != LOADER_PREFETCH:  # reloaded configs set every field
            warnings.warn("data.loader_prefetch does nothing with data.loader_workers=0", stacklevel=2)
        return self


class SamplingConfig(_Strict):
    # task draw probability: uniform, proportional to task size, or size^(1/temperature)
    strategy: Literal["uniform", "proportional", "temperature"] = "temperature"
    temperature: float = Field(2.0, gt=0)  # of the temperature strategy: 1 proportional, large values approach uniform


# Fields with no default of their own: the method (meta.method) sets them; the reference says so.
BY_METHOD = {"set_by": "meta.method"}


class InnerOptimizerConfig(_Strict):
    name: Literal["sgd", "adam"] = Field(json_schema_extra=BY_METHOD,
                                         description="optimizer of the k inner steps on each rank's copy")
    lr: float = Field(gt=0, json_schema_extra=BY_METHOD,
                      description="its learning rate; the pseudo-gradient is (θ0 − θk) / lr")
    betas: tuple[float, float] = Field((0.0, 0.999), description="Adam's (beta1, beta2); beta1 0: no momentum "
                                       "within the k steps")
    persist: bool = Field(False, description="keep its state (Adam's moments) from one outer step to the next, "
                          "per rank (checkpointed); false: a fresh optimizer each outer step")


class OuterOptimizerConfig(_Strict):
    name: Literal["interpolation", "sgd", "nesterov", "adam"] = Field(
        json_schema_extra=BY_METHOD,
        description="interpolation: θ ← θ0 + lr·mean(θk − θ0) (Reptile's ε); sgd, nesterov (SGD with Nesterov "
                    "momentum) and adam step on the pseudo-gradient averaged over ranks")
    lr: float = Field(gt=0, json_schema_extra=BY_METHOD,
                      description="its learning rate (ε for interpolation), annealed linearly to lr_final")
    lr_final: float = Field(ge=0, json_schema_extra=BY_METHOD, description="the outer lr at train.outer_steps")
    momentum: float = Field(0.9, ge=0, lt=1, description="nesterov's momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam's (beta1, beta2)")


class MetaConfig(_Strict):
    """One outer step for every method (mlfound/meta/methods.py): ``method`` names a point, whose fields are
    the defaults of the ones below; any field set here wins."""
    method: str = Field("reptile_k5", description="a name of mlfound/meta/methods.py: joint, single, "
                        "reptile_k1/5/20, adam_outer_k1/5/20")
    inner_steps: int = Field(json_schema_extra=BY_METHOD, description="k: inner optimizer steps per outer step")
    inner: InnerOptimizerConfig
    outer: OuterOptimizerConfig
    rescale_heads: bool = Field(json_schema_extra=BY_METHOD,
                                description="scale a head's update by R / n (ranks / ranks that trained its task), "
                                            "so its step does not shrink with the cluster")
    single_task: str | None = Field(None, description="train this task alone on every rank (method single)")
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = from_older_form(data)
        method = data.get("method", cls.model_fields["method"].default)
        point = method_fields(method)  # ValueError naming the known methods
        return {**point, **data, **{key: {**point[key], **data[key]} for key in ("inner", "outer")
                                    if isinstance(data.get(key), dict)}}

    @model_validator(mode="after")
    def _check(self):
        if self.inner_steps < 1:
            raise ValueError(f"meta.inner_steps (k) must be >= 1, got {self.inner_steps}")
        if self.method == "single" and self.single_task is None:
            raise ValueError("meta.method 'single' needs meta.single_task")
        return self


class LossConfig(_Strict):
    energy_weight: float = Field(10.0, ge=0)  # weight of the MSE of energy per atom, in units of the task's scale σ
    forces_weight: float = Field(1.0, ge=0)  # weight of the MSE of force components, in σ per Å
    stress_weight: float = Field(1.0, ge=0)  # virial per atom, in σ units like the energy; where labels have it


_PRECISION = "the typed field deepspeed.bf16 (fp16 and amp are not supported)"
_OUTER_OPTIMIZER = ("the outer optimizer and its lr schedule come from meta.method and meta.outer "
                    "(mlfound/meta/methods.py)")
_BATCHES = "batches are atom-budget graphs: use data.max_atoms_per_batch and data.max_graphs_per_batch"
# DeepSpeed keys the typed config sets (mlfound/train/engine.py::deepspeed_config) or must not be changed
# behind its back, each with what to use instead: an override in deepspeed.extra would train differently
# from what config.json records (bf16 weights exported as fp32, ZeRO-3 crashing every rank).
OWNED_DEEPSPEED_KEYS = {
    "zero_optimization": "set deepspeed.zero_stage instead",
    "bf16": f"set {_PRECISION} instead",
    "bfloat16": f"set {_PRECISION} instead",
    "fp16": f"precision comes from {_PRECISION}",
    "amp": f"precision comes from {_PRECISION}",
    "torch_autocast": f"precision comes from {_PRECISION}",
    "gradient_clipping": "set deepspeed.gradient_clipping instead",
    "optimizer": _OUTER_OPTIMIZER,
    "scheduler": _OUTER_OPTIMIZER,
    "train_batch_size": _BATCHES,
    "train_micro_batch_size_per_gpu": _BATCHES,
    "gradient_accumulation_steps": f"{_BATCHES}; one outer step is one DeepSpeed step",
    "zero_allow_untested_optimizer": "always true: mlfound passes its own torch optimizer",
    "steps_per_print": "mlfound logs itself: set train.log_every instead",
}


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(0, ge=0)  # ZeRO stage 0, 1 or 2 (optimizer state, then gradients partitioned over ranks)
    gradient_clipping: float = Field(0.0, ge=0, description="0 disables; DeepSpeed's own default is 1.0")
    bf16: bool = False  # bfloat16 weights and compute on GPUs; references and the energy sum stay float64
    extra: dict[str, Any] = {}  # passed through to DeepSpeed's config (monitors, comms logging, ...)

    @field_validator("extra")
    @classmethod
    def _not_owned(cls, extra: dict[str, Any]) -> dict[str, Any]:
        owned = [f"deepspeed.extra.{key}: {OWNED_DEEPSPEED_KEYS[key]}" for key in extra if key in OWNED_DEEPSPEED_KEYS]
        if owned:
            raise ValueError("; ".join(owned))
        return extra

    @model_validator(mode="after")
    def _check(self):
        if self.zero_stage == 3:
            raise ValueError("deepspeed.zero_stage 3 is not supported: it partitions parameters, which the "
                             "per-rank Reptile inner copy cannot see; use stage 0, 1 or 2")
        if self.zero_stage > 3:
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        return self


class TrainConfig(_Strict):
    outer_steps: int = Field(100, ge=0)  # outer steps per rank: the schedule's length
    stop_after_steps: int | None = Field(None, ge=0, description="stop early (job time limit); "
                                         "the schedule still spans outer_steps, resume continues it")
    log_every: int | None = Field(10, ge=1)  # steps between lines of the JSONL metrics log (and tracker); None: none
    # steps between validations on every task's val split; None: only the final one (after the last step)
    eval_every: int | None = Field(50, ge=1)
    save_every: int = Field(50, ge=1)  # steps between checkpoints (the final step is always saved)
    compile_forces: bool = Field(False, description="energy, forces and stress from one graph torch.compile fuses "
                                 "(mlfound.model.compiled): ~3x faster steps on CPU after a compile of minutes")


class WandbConfig(_Strict):
    project: str  # the W&B project the run logs to
    entity: str | None = None  # the W&B team or user; None: your default
    name: str | None = None  # the run's display name; W&B's own when unset
    mode: Literal["online", "offline"] = Field("online", description="offline: written under the log folder, "
                                               "uploaded later with `wandb sync` (clusters without internet)")


class LoggingConfig(_Strict):
    """Where scalars go besides the JSONL logs (the source of truth): mlfound/tracking.py."""
    tensorboard: bool | None = Field(None, description="None: when the tensorboard package is installed "
                                     "(`pip install mlfound[tracking]`); true: required; false: off")
    wandb: WandbConfig | None = None  # Weights & Biases when set (needs the wandb package)


class RunConfig(_Strict):
    run_dir: Path  # checkpoints, config.json, the JSONL logs and TensorBoard files; one run owns it (a lock)
    seed: int = 0  # model initialisation, task draws and stream order: a run is a pure function of it and the data
    data: DataConfig
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    loss: LossConfig = LossConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.meta.single_task is not None and self.meta.single_task not in self.data.tasks:
            raise ValueError(f"meta.single_task {self.meta.single_task!r} is not among data.tasks {self.data.tasks}")
        return self


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def load_config(path: Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    return load_validated(RunConfig, path, overrides, base)


def load_validated(model: type[M], path: Path | None, overrides: list[str] = (), base: dict | None = None,
                   what: str = "config") -> M:
    """``model`` from ``base`` < the YAML file ``path`` < dotted ``overrides``; a ConfigError names the file,
    the override or the key. Any typed YAML file of the project (run configs, experiments) loads this way."""
    raw = dict(base or {})
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"{what} file {path} does not exist")
        raw = _merge(raw, _parse_file(Path(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key, _parse_override(item, value))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid {what}{f' {path}' if path else ''}: {describe(err)}") from None


def describe(err: ValidationError, prefix: str = "") -> str:
    """Every problem of a pydantic error as ``prefix.key: message``, joined by "; "."""
    return "; ".join(f"{prefix}{_problem(e)}" for e in err.errors())


def _parse_file(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}{_position(err, 0, line=True)}: invalid YAML: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict | None):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, not {type(raw).__name__}")
    return raw or {}


def _parse_override(item: str, value: str):
    """The YAML ``value`` of the override ``item``; an error names the override and the column inside it."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        position = _position(err, len(item) - len(value), line=False)
        raise ConfigError(f"override {item!r}{position}: invalid YAML value: "
                          f"{getattr(err, 'problem', None) or err}") from None


def _position(err: yaml.YAMLError, column_offset: int, line: bool) -> str:
    """Where PyYAML found the problem, 1-based (its marks count from 0); empty when it does not say."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    column = mark.column + 1 + column_offset
    return f", line {mark.line + 1}, column {column}" if line else f", column {column}"


def _problem(error: dict) -> str:
    """One pydantic error as ``key: message``, unless the message already names a key below ``key``."""
    key, message = ".".join(map(str, error["loc"])) or "(top)", error["msg"].removeprefix("Value error, ")
    return message if message.startswith(f"{key}.") else f"{key}: {message}"


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value

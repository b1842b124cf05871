"""Released models: one safetensors file whose header carries the JSON metadata.

A release holds everything needed to rebuild the Potential and nothing that needs unpickling:
the weights (float32 parameters, float64 references and scales as buffers) and, in the header
under ``"mlfound"``, the format version, model config, elements, heads with their LoT metadata,
references (float64, exact through JSON) and scales, the training config, data manifest hashes and
the code version. Loading checks that the header's references equal the weight buffers bit for bit,
so a release whose two halves disagree is refused instead of giving wrong absolute energies.

Releases are found by path or by name through ``models/registry.json`` (name -> file, sha256, LoTs).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from mlfound.data.files import atomic_write_bytes, json_text, sha256_file
from mlfound.data.readers import lot_label
from mlfound.model import ModelConfig, Potential

FORMAT_VERSION = 2
# How to read older formats: each step fills in what its successor added, with the old behaviour.
MIGRATIONS = {
    # format 2: last layer scalars-only and one radial hidden layer became the defaults (2.5-4x faster)
    1: lambda meta: {**meta, "format_version": 2,
                     "model_config": {"scalar_last_layer": False, "radial_layers": 2, **meta["model_config"]}},
}
METADATA_KEY = "mlfound"
REGISTRY_DIR = Path(os.environ.get("MLFOUND_MODELS", Path(__file__).resolve().parents[1] / "models"))
REGISTRY_NAME = "registry.json"


class ReleaseError(ValueError):
    """A file offered as a model is not a usable mlfound release; the message says why and what to do."""


@dataclasses.dataclass
class Release:
    model: Potential
    metadata: dict
    path: Path | None = None

    @property
    def heads(self) -> list[str]:
        return list(self.metadata["heads"])

    def check_head(self, head: str) -> None:
        if head not in self.metadata["heads"]:
            raise ReleaseError(f"model {self.path or ''} has no head {head!r}; available heads: {self.heads}")


def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    version = importlib.metadata.version("mlfound")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return f"{version}+g{commit}" if commit else version


def release_metadata(model: Potential, heads: dict[str, dict], training: dict | None = None,
                     history: list[dict] | None = None) -> dict:
    """The header of a release. ``heads`` maps each head to its LoT metadata and data provenance;
    references and scales are taken from the model's buffers."""
    return {
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_config": model.config.model_dump(),
        "elements": model.elements,
        "cutoff_a": model.config.cutoff_a,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "heads": {task: {**heads.get(task, {}),
                         "references_ev": {str(z): e for z, e in zip(model.elements, model.references_ev[t].tolist())
                                           if e == e},  # NaN: the head's data never had this element
                         "scale_ev": float(model.scales_ev[t])}
                  for t, task in enumerate(model.task_names)},
        "training": training or {},
        "history": history or [],  # one entry per training stage: pretraining, fine-tunes
    }


def save_release(model: Potential, metadata: dict, path: Path) -> Path:
    """Write ``model`` and ``metadata`` as one safetensors file, atomically (temporary name, then rename)."""
    path = Path(path)
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    tensors = {name: value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
               for name, value in tensors.items()}
    payload = safetensors_bytes(tensors, metadata={METADATA_KEY: json_text(metadata, indent=None)})
    return atomic_write_bytes(path, payload)


def read_metadata(path: Path | str) -> dict:
    """The JSON header of a release, without loading its weights."""
    path = resolve(path)
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:
        raise ReleaseError(f"{path}: not a safetensors file ({err}); "
                           "mlfound models are made by `mlfound export`") from err
    if METADATA_KEY not in header:
        raise ReleaseError(f"{path}: a safetensors file without mlfound metadata (made by another tool?); "
                           "mlfound models are made by `mlfound export`")
    metadata = json.loads(header[METADATA_KEY])
    while metadata.get("format_version") in MIGRATIONS:
        metadata = MIGRATIONS[metadata["format_version"]](metadata)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        advice = "upgrade mlfound" if (version or 0) > FORMAT_VERSION else "re-export it"
        raise ReleaseError(f"{path}: release format {version} but this mlfound ({code_version()}) reads format "
                           f"{FORMAT_VERSION}; {advice}")
    return metadata


def load(path: Path | str, device: torch.device | str = "cpu") -> Release:
    """Load a release by path or registry name. No pickle is involved."""
    path = resolve(path)
    metadata = read_metadata(path)
    heads = metadata["heads"]
    model = Potential(ModelConfig(**metadata["model_config"]), metadata["elements"], list(heads),
                      {t: {int(z): e for z, e in h["references_ev"].items()} for t, h in heads.items()},
                      {t: h["scale_ev"] for t, h in heads.items()})
    described = {"references_ev": model.references_ev.clone(), "scales_ev": model.scales_ev.clone()}
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ReleaseError(f"{path}: weights do not match the model described in its metadata ({err})") from err
    for name, value in described.items():
        loaded = getattr(model, name)
        if not ((loaded == value) | (loaded.isnan() & value.isnan())).all():  # bit-equal, NaN where undefined
            raise ReleaseError(f"{path}: {name} in the metadata and in the weights differ; "
                               "the file was edited or corrupted, re-export it")
    return Release(model.to(device).eval(), metadata, path)


def resolve(name_or_path: Path | str) -> Path:
    """A path that exists, or a name from the registry whose file matches its recorded sha256."""
    path = Path(name_or_path)
    if path.exists():
        return path
    registry_path = REGISTRY_DIR / REGISTRY_NAME
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {}
    if str(name_or_path) not in registry:
        raise ReleaseError(f"{name_or_path}: no such file, and no model of that name in {registry_path} "
                           f"(known: {sorted(registry)})")
    entry = registry[str(name_or_path)]
    path = REGISTRY_DIR / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ReleaseError(f"{path}: sha256 {digest} does not match {registry_path} ({entry['sha256']}); "
                           "the file is corrupted or was replaced")
    return path


def register(name: str, path: Path, description: str = "") -> dict:
    """Add or replace registry entry ``name`` for the release at ``path`` (which must lie in the registry folder)."""
    path = Path(path).resolve()
    if path.parent != REGISTRY_DIR.resolve():
        raise ReleaseError(f"{path}: a registered release must lie in the registry folder {REGISTRY_DIR}")
    heads = read_metadata(path)["heads"]
    entry = {"file": path.name, "sha256": sha256_file(path), "description": description,
             "lots": {h: lot_label(d.get("lot", {})) for h, d in heads.items()}}
    registry_path = REGISTRY_DIR / REGISTRY_NAME
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {}
    registry[name] = entry
    atomic_write_bytes(registry_path, (json.dumps(registry, indent=1) + "\n").encode())
    return entry


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        start = f.read(4)
    if start.startswith(b"PK\x03\x04") or start[:1] == b"\x80":
        raise ReleaseError(
            f"{path} is a pickled torch file (torch.save); mlfound loads only releases written by `mlfound export`, "
            "because unpickling a file can run arbitrary code. For a training run, export it first: "
            "mlfound export RUN_DIR --out model.safetensors")

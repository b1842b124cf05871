"""Released models: one safetensors file whose header carries the JSON metadata.

A release holds everything needed to rebuild the Potential and nothing that needs unpickling:
the weights (float32 parameters, float64 references and scales as buffers) and, in the header
under ``"mlfound"``, the format version, model config, elements, heads with their LoT metadata,
references (float64, exact through JSON) and scales, the training config, data manifest hashes and
the code version. Loading checks that the header's references equal the weight buffers bit for bit,
so a release whose two halves disagree is refused instead of giving wrong absolute energies.

Since format 3 the header also carries, under ``"mlfound_integrity"``, a sha256 of every tensor (dtype,
shape and bytes) and of every top-level metadata entry, written at export and verified on every load
and by ``mlfound show``: one flipped bit in a weight, or an edited cutoff, is an error naming what
changed, never a silently different model.

Releases are found by path or by name through ``models/registry.json`` (name -> file, sha256, LoTs);
the name ``default`` is the entry marked ``"default": true``, the release the user path of
docs/getting-started.md starts from.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import struct
import subprocess
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from mlfound.data.files import FolderLock, atomic_write_bytes, json_text, sha256_file
from mlfound.data.readers import lot_label
from mlfound.model import ModelConfig, Potential

FORMAT_VERSION = 6
# How to read older formats: each step fills in what its successor added, with the old behaviour.
MIGRATIONS = {
    # format 2: last layer scalars-only and one radial hidden layer became the defaults (2.5-4x faster)
    1: lambda meta: {**meta, "format_version": 2,
                     "model_config": {"scalar_last_layer": False, "radial_layers": 2, **meta["model_config"]}},
    # format 3: content hashes in the header (nothing in the metadata changed)
    2: lambda meta: {**meta, "format_version": 3},
    # format 4: with the product basis, the last layer's messages keep every l (its products see vectors)
    3: lambda meta: {**meta, "format_version": 4,
                     "model_config": {"product_messages_all_l": False, **meta["model_config"]}},
    # format 5: avg_num_neighbors counted from the training data; before, a fixed 10.0
    4: lambda meta: {**meta, "format_version": 5, "model_config": {"avg_num_neighbors": 10.0, **meta["model_config"]}},
    5: lambda meta: {**meta, "format_version": 6},  # product_l_max (None, as every older model) became a field
}
FIRST_HASHED_FORMAT = 3
METADATA_KEY = "mlfound"
INTEGRITY_KEY = "mlfound_integrity"
REEXPORT_ADVICE = ("re-export it from its training checkpoint (mlfound export RUN_DIR --out FILE) or fine-tune "
                   "output, or restore the original file")
REGISTRY_DIR = Path(os.environ.get("MLFOUND_MODELS", Path(__file__).resolve().parents[1] / "models"))
REGISTRY_NAME = "registry.json"
DEFAULT_NAME = "default"  # resolves to the registry entry marked "default": true


class ReleaseError(ValueError):
    """A file offered as a model is not a usable mlfound release; the message says why and what to do."""


@dataclasses.dataclass
class Release:
    model: Potential
    metadata: dict
    path: Path | None = None
    verified: bool = True  # content hashes checked; False only for releases older than format 3

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
    diverged = non_finite_parameters(model)
    if diverged:
        raise ReleaseError(f"refusing to write {path}: parameters {diverged} hold NaN or inf (the training "
                           "diverged); a release must predict finite energies")
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    tensors = {name: value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
               for name, value in tensors.items()}
    metadata_text = json_text({**metadata, "format_version": FORMAT_VERSION}, indent=None)
    integrity = content_hashes(tensors, json.loads(metadata_text))
    payload = safetensors_bytes(tensors, metadata={METADATA_KEY: metadata_text,
                                                   INTEGRITY_KEY: json.dumps(integrity, sort_keys=True)})
    return atomic_write_bytes(path, payload)


def non_finite_parameters(model: Potential, shown: int = 5) -> list[str]:
    """Names of (up to ``shown``) parameters holding NaN or inf; references may be NaN by design, weights never."""
    return [name for name, value in model.named_parameters() if not torch.isfinite(value).all()][:shown]


def content_hashes(tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
    """sha256 of each tensor (dtype, shape, bytes) and of each top-level metadata entry, so a mismatch
    can name the part that changed."""
    def tensor_digest(value: torch.Tensor) -> str:
        digest = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    return {"tensors": {name: tensor_digest(value) for name, value in sorted(tensors.items())},
            "metadata": {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
                         for key, value in sorted(metadata.items())}}


def stored_format_version(path: Path | str):
    """The format a release file was written in (``load`` migrates older ones to ``FORMAT_VERSION``)."""
    with safe_open(str(resolve(path)), framework="pt") as f:
        return json.loads((f.metadata() or {})[METADATA_KEY]).get("format_version")


def read_metadata(path: Path | str) -> dict:
    """The JSON header of a release, after checking the content hashes of its weights and metadata."""
    return _read_verified(resolve(path))[0]


def _read_verified(path: Path) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """(metadata migrated to the current format, tensors, whether hashes were checked) of a release
    whose content hashes hold."""
    _check_framing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:
        raise ReleaseError(f"{path}: not a readable safetensors file ({err}); "
                           "mlfound models are made by `mlfound export`") from err
    if METADATA_KEY not in header:
        raise ReleaseError(f"{path}: a safetensors file without mlfound metadata (made by another tool?); "
                           "mlfound models are made by `mlfound export`")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ReleaseError(f"{path}: the mlfound metadata is not valid JSON ({err}); the file is corrupted; "
                           f"{REEXPORT_ADVICE}") from None
    version = metadata.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ReleaseError(f"{path}: release format {version} but this mlfound ({code_version()}) reads format "
                           f"{FORMAT_VERSION}; upgrade mlfound")
    verified = _check_integrity(path, header.get(INTEGRITY_KEY), tensors, metadata)
    while metadata.get("format_version") in MIGRATIONS:
        metadata = MIGRATIONS[metadata["format_version"]](metadata)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ReleaseError(f"{path}: release format {version} is unknown to this mlfound ({code_version()}, "
                           f"format {FORMAT_VERSION}); {REEXPORT_ADVICE}")
    return metadata, tensors, verified


def _check_integrity(path: Path, stored_text: str | None, tensors: dict[str, torch.Tensor], metadata: dict) -> bool:
    """Compare the content hashes written at export with the file's content; name every part that differs.
    False for a release older than format 3, which has no hashes to check (with a warning)."""
    version = metadata.get("format_version")
    if stored_text is None:
        if isinstance(version, int) and version < FIRST_HASHED_FORMAT:
            warnings.warn(f"{path}: release format {version} has no content hashes, so its integrity cannot be "
                          f"checked; `mlfound export {path} --out NEW` rewrites it with them", stacklevel=3)
            return False
        raise ReleaseError(f"{path}: the content hashes ({INTEGRITY_KEY}) are missing from the header; the file "
                           f"was edited or corrupted; {REEXPORT_ADVICE}")
    try:
        stored = json.loads(stored_text)
        stored_tensors, stored_metadata = dict(stored["tensors"]), dict(stored["metadata"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ReleaseError(f"{path}: the content hashes ({INTEGRITY_KEY}) are unreadable; the file is corrupted; "
                           f"{REEXPORT_ADVICE}") from None
    actual = content_hashes(tensors, metadata)
    differ = [f"tensor {n!r}" for n in sorted(set(stored_tensors) | set(actual["tensors"]))
              if stored_tensors.get(n) != actual["tensors"].get(n)]
    differ += [f"metadata {k!r}" for k in sorted(set(stored_metadata) | set(actual["metadata"]))
               if stored_metadata.get(k) != actual["metadata"].get(k)]
    if differ:
        raise ReleaseError(f"{path}: content differs from the hashes written at export: {', '.join(differ)}; "
                           f"the file was edited or corrupted; {REEXPORT_ADVICE}")
    return True


def load(path: Path | str, device: torch.device | str = "cpu") -> Release:
    """Load a release by path or registry name. No pickle is involved."""
    path = resolve(path)
    metadata, tensors, verified = _read_verified(path)
    heads = metadata["heads"]
    model = Potential(ModelConfig(**metadata["model_config"]), metadata["elements"], list(heads),
                      {t: {int(z): e for z, e in h["references_ev"].items()} for t, h in heads.items()},
                      {t: h["scale_ev"] for t, h in heads.items()})
    described = {"references_ev": model.references_ev.clone(), "scales_ev": model.scales_ev.clone()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ReleaseError(f"{path}: weights do not match the model described in its metadata ({err})") from err
    for name, value in described.items():
        loaded = getattr(model, name)
        if not ((loaded == value) | (loaded.isnan() & value.isnan())).all():  # bit-equal, NaN where undefined
            raise ReleaseError(f"{path}: {name} in the metadata and in the weights differ; "
                               "the file was edited or corrupted, re-export it")
    diverged = non_finite_parameters(model)
    if diverged:
        raise ReleaseError(f"{path}: parameters {diverged} hold NaN or inf; the model is from a diverged run "
                           "and would predict nothing finite")
    return Release(model.to(device).eval(), metadata, path, verified)


def resolve(name_or_path: Path | str) -> Path:
    """A path that exists, or a name from the registry (``default``: the entry marked default) whose file
    matches its recorded sha256."""
    path = Path(name_or_path)
    if path.exists():
        return path
    registry_path = REGISTRY_DIR / REGISTRY_NAME
    registry = _read_registry()
    name = str(name_or_path)
    if name == DEFAULT_NAME:
        marked = [n for n, entry in registry.items() if entry.get("default")]
        if not marked:
            raise ReleaseError(f"no release in {registry_path} is marked default; mark one with "
                               "mlfound export MODEL --out FILE --register NAME --default")
        name = marked[0]
    if name not in registry:
        raise ReleaseError(f"{name_or_path}: no such file, and no model of that name in {registry_path} "
                           f"(known: {sorted(registry)})")
    entry = registry[name]
    path = REGISTRY_DIR / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ReleaseError(f"{path}: sha256 {digest} does not match {registry_path} ({entry['sha256']}); "
                           "the file is corrupted or was replaced")
    return path


def register(name: str, path: Path, description: str | None = None, default: bool = False) -> dict:
    """Add or replace registry entry ``name`` for the release at ``path`` (which must lie in the registry folder);
    ``default`` makes it the one release marked default. Re-registering a name (a re-exported release) keeps its
    description unless a new one is given."""
    path = Path(path).resolve()
    if name == DEFAULT_NAME:
        raise ReleaseError(f"{name!r} is reserved for the release marked default; register under another name "
                           "and pass --default")
    if path.parent != REGISTRY_DIR.resolve():
        raise ReleaseError(f"{path}: a registered release must lie in the registry folder {REGISTRY_DIR}")
    heads = read_metadata(path)["heads"]
    with FolderLock(REGISTRY_DIR, "registry update"):  # read, change, write: two at once would lose one
        registry = _read_registry()
        if description is None:
            description = registry.get(name, {}).get("description", "")
        entry = {"file": path.name, "sha256": sha256_file(path), "description": description,
                 "lots": {h: lot_label(d.get("lot", {})) for h, d in heads.items()}}
        if default:
            registry = {n: {k: v for k, v in e.items() if k != "default"} for n, e in registry.items()}
            entry["default"] = True
        elif registry.get(name, {}).get("default"):
            entry["default"] = True  # re-registering the default keeps it the default
        registry[name] = entry
        atomic_write_bytes(REGISTRY_DIR / REGISTRY_NAME, (json.dumps(registry, indent=1) + "\n").encode())
    return entry


def _read_registry() -> dict:
    registry_path = REGISTRY_DIR / REGISTRY_NAME
    if not registry_path.exists():
        return {}
    try:
        registry = json.loads(registry_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReleaseError(f"{registry_path} is not readable JSON ({err}); restore it from git "
                           "(git checkout -- models/registry.json) or give the release's path") from None
    if not isinstance(registry, dict) or not all(isinstance(e, dict) and "file" in e and "sha256" in e
                                                 for e in registry.values()):
        raise ReleaseError(f"{registry_path}: every entry must map a name to its file and sha256; restore it from "
                           "git (git checkout -- models/registry.json)")
    return registry


def _check_framing(path: Path) -> None:
    """A safetensors file starts with its header length (little-endian u64), then the JSON header's ``{``.
    Only a file without that framing is examined for pickle or zip signatures: the first byte of a valid
    release is 0x80 whenever its header length is 128 mod 256, which is also pickle's PROTO opcode."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) == 9:
        header_length = struct.unpack("<Q", start[:8])[0]
        if start[8:9] == b"{" and 0 < header_length <= size - 8:
            return
    if start.startswith(b"PK\x03\x04") or start[:1] == b"\x80":
        raise ReleaseError(
            f"{path} is a pickled torch file (torch.save); mlfound loads only releases written by `mlfound export`, "
            "because unpickling a file can run arbitrary code. For a training run, export it first: "
            "mlfound export RUN_DIR --out model.safetensors")
    raise ReleaseError(f"{path}: not a safetensors file ({size} bytes, no safetensors header); "
                       "mlfound models are made by `mlfound export`")

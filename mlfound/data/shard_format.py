"""How one record is packed into one webdataset tar member (msgpack), and back.

One member per record halves the size against one member per array (platform-notes.md §6).
msgpack with raw little-endian array bytes decodes ~10x faster than an npz per record, whose
per-array header parsing dominated the input pipeline. Arrays keep their float64 values exactly.
"""
from __future__ import annotations

import msgpack
import numpy as np

from mlfound.data.record import Record

MEMBER_EXT = "msgpack"


def encode(rec: Record) -> bytes:
    fields = {"z": _pack(rec.z, "<i8"), "pos": _pack(rec.pos_a, "<f8"), "energy": float(rec.energy_ev),
              "source": rec.source, "index": int(rec.index)}
    if rec.forces_ev_a is not None:
        fields["forces"] = _pack(rec.forces_ev_a, "<f8")
    if rec.cell_a is not None:
        fields["cell"] = _pack(rec.cell_a, "<f8")
        fields["pbc"] = [bool(p) for p in rec.pbc]
    if rec.provenance:
        fields["provenance"] = rec.provenance
    return msgpack.packb(fields)


def decode(data: bytes, task: str) -> Record:
    fields = msgpack.unpackb(data)
    z = np.frombuffer(fields["z"], "<i8")
    n = len(z)
    return Record(
        z=z, pos_a=_unpack(fields["pos"], (n, 3)), energy_ev=fields["energy"],
        forces_ev_a=_unpack(fields["forces"], (n, 3)) if "forces" in fields else None,
        cell_a=_unpack(fields["cell"], (3, 3)) if "cell" in fields else None,
        pbc=np.array(fields["pbc"], bool) if "pbc" in fields else None,
        task=task, source=fields["source"], index=fields["index"], provenance=fields.get("provenance", {}))


def _pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _unpack(raw: bytes, shape: tuple) -> np.ndarray:
    return np.frombuffer(raw, "<f8").reshape(shape)

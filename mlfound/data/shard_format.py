"""How one record is packed into one webdataset tar member (msgpack), and back.

One member per record halves the size against one member per array (each tar member costs a 512-byte header
and padding: 5,000 small records took 51 MB as five arrays each, 26.5 MB as one npz each).
msgpack with raw little-endian array bytes decodes ~10x faster than an npz per record, whose
per-array header parsing dominated the input pipeline. Arrays keep their float64 values exactly.

Reading a shard back goes through ``payloads``: Python's tarfile spent ~70 µs per member parsing headers,
more than decoding and batching the record (docs/benchmarks.md §4), so the plain ustar members that
``mlfound shard`` writes are sliced straight out of the shard's bytes; anything else (PAX headers of
older shards, other members) is read by webdataset and tarfile as before.
"""
from __future__ import annotations

import io

import msgpack
import numpy as np
import webdataset as wds

from mlfound.data.record import Record

MEMBER_EXT = "msgpack"
BLOCK = 512  # tar's block: a member is a header block, then its bytes padded to whole blocks


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
    if rec.stress_ev_a3 is not None:
        fields["stress"] = _pack(rec.stress_ev_a3, "<f8")
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
        task=task, source=fields["source"], index=fields["index"], provenance=fields.get("provenance", {}),
        stress_ev_a3=_unpack(fields["stress"], (3, 3)) if "stress" in fields else None)


def _pack(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _unpack(raw: bytes, shape: tuple) -> np.ndarray:
    return np.frombuffer(raw, "<f8").reshape(shape)


def payloads(data: bytes, location: str) -> list[bytes]:
    """The encoded records of a shard's bytes, in order (``location`` only names it to webdataset)."""
    fast = _ustar_payloads(data)
    if fast is not None:
        return fast
    opened = [{"url": location, "stream": io.BytesIO(data)}]
    return [sample[MEMBER_EXT] for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(opened))]


def _ustar_payloads(data: bytes) -> list[bytes] | None:
    """Each member's bytes, when every member is a regular file named ``*.msgpack`` under a plain ustar header;
    else None. Only the name, type and size fields are read: the caller has checked the shard's sha256."""
    found, offset = [], 0
    suffix = f".{MEMBER_EXT}".encode()
    while offset + BLOCK <= len(data):
        header = data[offset:offset + BLOCK]
        if header == bytes(BLOCK):  # the end-of-archive blocks
            return found
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or header[345] != 0:
            return None  # a PAX/GNU header, a link or directory, or a name split into prefix and name
        if not header[:100].rstrip(b"\0").endswith(suffix):
            return None
        try:
            size = int(header[124:136].rstrip(b"\0 "), 8)
        except ValueError:
            return None
        start = offset + BLOCK
        if start + size > len(data):
            return None  # truncated: let tarfile say so
        found.append(data[start:start + size])
        offset = start + -(-size // BLOCK) * BLOCK
    return None

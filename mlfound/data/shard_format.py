"""How one record is packed into one webdataset tar member (an npz), and back.

One member per record halves the size against one member per array (platform-notes.md §6).
"""
from __future__ import annotations

import io

import numpy as np

from mlfound.data.record import Record

MEMBER_EXT = "npz"


def encode(rec: Record) -> bytes:
    arrays = {"z": rec.z.astype(np.int64), "pos": rec.pos_a.astype(np.float64),
              "energy": np.float64(rec.energy_ev), "source": np.str_(rec.source), "index": np.int64(rec.index)}
    if rec.forces_ev_a is not None:
        arrays["forces"] = rec.forces_ev_a.astype(np.float64)
    if rec.cell_a is not None:
        arrays["cell"] = rec.cell_a.astype(np.float64)
        arrays["pbc"] = np.asarray(rec.pbc, bool)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(data: bytes, task: str) -> Record:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return Record(
            z=arrays["z"], pos_a=arrays["pos"], energy_ev=float(arrays["energy"]),
            forces_ev_a=arrays["forces"] if "forces" in arrays else None,
            cell_a=arrays["cell"] if "cell" in arrays else None,
            pbc=arrays["pbc"] if "pbc" in arrays else None,
            task=task, source=str(arrays["source"]), index=int(arrays["index"]))

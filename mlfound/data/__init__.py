"""Data: records, readers, webdataset shards with manifests, per-task streams, graph batches.

Imports nothing else of mlfound.
"""
from mlfound.data.record import DataError, Record, validate_record

__all__ = ["DataError", "Record", "validate_record"]

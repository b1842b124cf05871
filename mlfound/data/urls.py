"""Where a shard is read from when ``data.shard_url_template`` names a mirror of ``shard_root``.

The template is any URL webdataset opens (``http(s)://`` through curl, ``pipe:COMMAND``, ...) with two
fields: ``{task}``, the task name, and ``{name}``, the shard's path inside its task directory:
``gfn2_xtb-00000.tar`` for training, ``val/gfn2_xtb-00000.tar`` for the validation split. So one
template serves both splits of a server or bucket that mirrors the local layout, e.g.
``http://host/corpus/{task}/{name}`` or ``pipe:aws s3 cp s3://bucket/corpus/{task}/{name} -``.
Manifests stay local and hold each shard's sha256, which is checked on every read.
"""
from __future__ import annotations

import string

from mlfound.data.record import DataError

FIELDS = ("task", "name")


def check_url_template(template: str) -> None:
    """Raise ValueError unless ``template`` fills only ``{task}`` and ``{name}``, and has ``{name}``."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DataError(f"shard URL template {template!r} is not a valid format string ({err}); "
                         "write literal braces as {{ and }}") from None
    fields = {field for _, field, _, _ in parts if field is not None}
    if fields - set(FIELDS):
        unknown = ", ".join(f"{{{field}}}" for field in sorted(fields - set(FIELDS)))
        raise DataError(f"shard URL template {template!r} has {unknown}; only {{task}} and {{name}} are filled in")
    if any(spec or conversion for _, field, spec, conversion in parts if field is not None):
        raise DataError(f"shard URL template {template!r}: write the fields plainly as {{task}} and {{name}}, "
                         "without conversions or format specs")
    if "name" not in fields:
        raise DataError(f"shard URL template {template!r} must contain {{name}}, the shard's path inside its "
                         "task directory; without it every shard would be read from the same URL")


def shard_url(template: str, task: str, name: str) -> str:
    return template.format(task=task, name=name)


# Why curl failed, by exit status: webdataset opens http(s) URLs with ``curl -f -s`` (silent).
CURL_EXIT_REASONS = {6: "the host name does not resolve", 7: "nothing answers at that address and port",
                     22: "the server answered with an HTTP error such as 404, no such file", 28: "it timed out"}


def describe_exit(location: str, status: int) -> str:
    if location.startswith(("http://", "https://")):
        return f"curl exit status {status}: {CURL_EXIT_REASONS.get(status, 'see man curl, EXIT CODES')}"
    return f"the command exited with status {status}"

"""Atomic file writes: a reader never sees a half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "compact_json", "write_json_in_batches"]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, mode, **kwargs) as f:  # type: ignore[call-overload]
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def compact_json(value: Any) -> str:
    """``value`` as compact JSON, the encoding of every JSON output (NaN or
    infinity is an error). ``json.dumps`` uses the C encoder; ``json.dump``
    to a stream does not (5x slower)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def write_json_in_batches(
    path: str | os.PathLike[str],
    head: dict[str, Any],
    key: str,
    batches: Iterable[list[Any]],
    tail: dict[str, Any],
) -> None:
    """Write ``{**head, key: [the items of all batches], **tail}`` as compact
    JSON, atomically, with one batch of items in memory at a time.

    The bytes are those of ``json.dumps(document, separators=(",", ":"),
    allow_nan=False)`` (NaN or infinity is an error, and nothing is written).
    A whole slide's annotation holds ~3 KB of Python objects a nucleus, so
    building it whole costs gigabytes for a million nuclei.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "doc.json"
    >>> write_json_in_batches(p, {"name": "n"}, "elements", iter([[1, 2], [], [3]]), {"a": None})
    >>> p.read_text()
    '{"name":"n","elements":[1,2,3],"a":null}'
    """
    with atomic_write(path, "w", encoding="utf-8") as f:
        opening = compact_json(head)[1:-1]
        f.write("{" + opening + ("," if opening else "") + compact_json(key) + ":[")
        first = True
        for batch in batches:
            if not batch:
                continue
            if not first:
                f.write(",")
            f.write(compact_json(batch)[1:-1])
            first = False
        closing = compact_json(tail)[1:-1]
        f.write("]" + ("," if closing else "") + closing + "}")

"""Push annotation documents to Girder items; replace, never duplicate.

Every document we push carries ``attributes["nucleus_models"]`` with its
``analysis_key`` (which analysis made it) and a unique ``push_id``. A push:

1. checks the elements locally (a bad element is named before any upload);
2. POSTs the whole document in one request to ``annotation?itemId=``: the
   server validates everything before it stores anything, so a rejected
   document leaves nothing on the item. A :class:`BatchedDocument` (a whole
   slide's nuclei) is written to a temporary file a batch of elements at a
   time and uploaded from it, so the push never holds it in memory. If the
   answer is lost (time-out, dropped connection, 5xx), the item is searched
   for the ``push_id`` before the POST is retried, so a retry never stores a
   second copy;
3. finds the new annotation by its ``push_id`` (the POST's answer, the whole
   document again with element ids, is not read) and checks its element
   count;
4. only then deletes the item's older annotations with the same analysis key
   (and any stray copy of this push).

A crash at any point leaves either the old annotation, or the old and the new
one (removed by the next push or :func:`dedupe`), never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from ..io.atomic import compact_json, write_json_in_batches
from .client import DSAClient, DSAError, GirderRequestError, GirderUnavailable

__all__ = [
    "ATTR_NS",
    "AnnotationRejected",
    "BatchedDocument",
    "PushResult",
    "check_elements",
    "delete_annotation",
    "dedupe",
    "find_annotations",
    "list_annotations",
    "push_annotation",
]

log = logging.getLogger(__name__)

#: Key of our record inside an annotation's ``attributes``.
ATTR_NS = "nucleus_models"
_COORD_FIELDS = {"point": ("center",), "rectangle": ("center",), "circle": ("center",)}
_KNOWN_TYPES = {
    "arrow",
    "circle",
    "ellipse",
    "griddata",
    "heatmap",
    "point",
    "polyline",
    "rectangle",
    "rectanglegrid",
    "image",
    "pixelmap",
}


class AnnotationRejected(DSAError):
    """The document is invalid (the message names the element); nothing was stored."""


@dataclass(frozen=True)
class BatchedDocument:
    """An annotation document whose elements are made a batch at a time.

    ``batches`` returns a fresh iterable of element lists each time it is
    called (a push reads them once to write its body, and again only to name
    a bad element when the server rejects the document). A whole slide's
    million nuclei take ~3 GB as one document of Python objects; pushed as a
    ``BatchedDocument`` they take one batch.
    """

    name: str
    batches: Callable[[], Iterable[list[dict[str, Any]]]]
    description: str = ""
    attributes: dict[str, Any] | None = None

    def elements(self) -> Iterator[dict[str, Any]]:
        """Every element, in order."""
        for batch in self.batches():
            yield from batch

    def tail(self, attributes: dict[str, Any] | None) -> dict[str, Any]:
        """The keys after ``elements``: description (when set), then ``attributes``."""
        out: dict[str, Any] = {"description": self.description} if self.description else {}
        return {**out, "attributes": attributes} if attributes is not None else out

    @classmethod
    def from_document(cls, doc: dict[str, Any], batch: int) -> BatchedDocument:
        """A built document's elements served ``batch`` at a time (tests, benchmarks).

        >>> d = BatchedDocument.from_document({"name": "n", "elements": [1, 2, 3]}, 2)
        >>> d.name, list(d.batches()), d.tail(None)
        ('n', [[1, 2], [3]], {})
        """
        els = doc.get("elements") or []
        return cls(
            name=doc["name"],
            batches=lambda: (els[a : a + batch] for a in range(0, len(els), batch)),
            description=doc.get("description", ""),
            attributes=doc.get("attributes"),
        )


Document = dict[str, Any] | BatchedDocument


@dataclass
class PushResult:
    """What a push stored and what it replaced."""

    annotation_id: str
    element_count: int
    replaced: list[str] = field(default_factory=list)
    seconds: float = 0.0
    upload_bytes: int = 0
    attempts: int = 1


def _finite_xy(value: Any, size: int = 3) -> bool:
    return (
        isinstance(value, list | tuple)
        and 2 <= len(value) <= size
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )


def check_elements(elements: Sequence[Any], start: int = 0) -> None:
    """Cheap local checks of the elements' geometry (``start``: the index of
    the first one in its document, for the message).

    Raises
    ------
    AnnotationRejected
        Naming the first bad element (index, type, field).
    """
    for i, el in enumerate(elements, start):
        if not isinstance(el, dict):
            raise AnnotationRejected(f"element {i} is a {type(el).__name__}, not an object")
        kind = el.get("type")
        if kind not in _KNOWN_TYPES:
            raise AnnotationRejected(f"element {i} has unknown type {kind!r}")
        for key in _COORD_FIELDS.get(kind, ()):
            if not _finite_xy(el.get(key)):
                raise AnnotationRejected(
                    f"element {i} ({kind}): {key} must be 2-3 finite numbers, got {el.get(key)!r}"
                )
        if kind == "polyline":
            pts = el.get("points")
            if not isinstance(pts, list) or len(pts) < 2:
                raise AnnotationRejected(f"element {i} (polyline): needs at least 2 points")
            for j, p in enumerate(pts):
                if not _finite_xy(p):
                    raise AnnotationRejected(
                        f"element {i} (polyline): point {j} must be 2-3 finite numbers, got {p!r}"
                    )


def list_annotations(client: DSAClient, item_id: str) -> list[dict[str, Any]]:
    """The item's annotations without elements (name, attributes, ``_elementCount``)."""
    return list(client.get("annotation", {"itemId": item_id, "limit": 0, "sort": "_id"}))


def _record(ann: dict[str, Any]) -> dict[str, Any]:
    attrs = ann.get("annotation", {}).get("attributes") or {}
    rec = attrs.get(ATTR_NS) if isinstance(attrs, dict) else None
    return rec if isinstance(rec, dict) else {}


def _matches(ann: dict[str, Any], analysis_key: str, legacy_name: str | None) -> bool:
    rec = _record(ann)
    if rec:
        return rec.get("analysis_key") == analysis_key
    # documents from the NucleusDetection CLI (.anot ingested by DSA) carry our
    # provenance but no key: the same name from our software is the same analysis
    attrs = ann.get("annotation", {}).get("attributes") or {}
    return (
        legacy_name is not None
        and isinstance(attrs, dict)
        and attrs.get("software") == "nucleus-models"
        and ann.get("annotation", {}).get("name") == legacy_name
    )


def find_annotations(
    client: DSAClient, item_id: str, analysis_key: str, *, legacy_name: str | None = None
) -> list[dict[str, Any]]:
    """The item's annotations made by ``analysis_key`` (oldest first)."""
    return [a for a in list_annotations(client, item_id) if _matches(a, analysis_key, legacy_name)]


def delete_annotation(client: DSAClient, annotation_id: str) -> None:
    """Delete an annotation; one that is already gone is fine (retries are idempotent)."""
    try:
        client.sendRestRequest("DELETE", f"annotation/{annotation_id}")
    except GirderRequestError as exc:
        if exc.status not in (400, 404):
            raise


def dedupe(
    client: DSAClient,
    item_id: str,
    analysis_key: str,
    keep_id: str,
    *,
    legacy_name: str | None = None,
    found: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Delete every annotation of ``analysis_key`` on the item except ``keep_id``.

    ``found``: the item's annotations of that key, when the caller has just
    listed them (:func:`find_annotations`); otherwise they are listed here.
    """
    if found is None:
        found = find_annotations(client, item_id, analysis_key, legacy_name=legacy_name)
    removed = []
    for ann in found:
        if ann["_id"] != keep_id:
            delete_annotation(client, ann["_id"])
            removed.append(ann["_id"])
    if removed:
        log.info("item %s: removed %d older %s annotation(s)", item_id, len(removed), analysis_key)
    return removed


def _find_push(client: DSAClient, item_id: str, push_id: str) -> list[dict[str, Any]]:
    return [a for a in list_annotations(client, item_id) if _record(a).get("push_id") == push_id]


#: The longest a push interrupted while its POST is unanswered waits for the
#: server to store the document, to take it back (a cancelled job has ~10 s
#: before docker kills it).
LANDING_WAIT_S = 5.0


def _push_timeout(client: DSAClient, nbytes: int) -> tuple[float, float]:
    # the test server parses, validates and stores ~1 MB/s of elements: allow 5 s per MB
    connect, read = client.retry.timeout
    return connect, read + nbytes / 200_000


def push_annotation(
    client: DSAClient,
    item_id: str,
    doc: Document,
    *,
    analysis_key: str,
    record: dict[str, Any] | None = None,
    replace: bool = True,
    legacy: bool = True,
    workdir: str | None = None,
) -> PushResult:
    """Store ``doc`` on the item and replace the previous one of the same analysis.

    Parameters
    ----------
    doc : dict or BatchedDocument
        A large_image annotation document (``name``, ``elements``, ``attributes``),
        or one whose elements are made a batch at a time (uploaded from a
        temporary file, never whole in memory). It is not modified.
    analysis_key : str
        Identity of the analysis; older annotations with this key are deleted
        once the new one is stored and verified.
    record : dict, optional
        Extra entries for ``attributes["nucleus_models"]`` (e.g. ``params_hash``).
    legacy : bool, default True
        Also replace an annotation of the same name that NucleusDetection wrote
        from HistomicsUI (no key). Off for a named key, which keeps them.
    workdir : str, optional
        Where a :class:`BatchedDocument`'s body is written (default: the
        system's temporary folder); removed after the push.

    Raises
    ------
    AnnotationRejected
        The document is invalid; the message names the element. Nothing is stored.
    GirderUnavailable
        The server kept failing; the item keeps its previous annotation.
    """
    t0 = time.perf_counter()
    push_id = uuid.uuid4().hex
    attrs = dict(_attributes(doc) or {})
    attrs[ATTR_NS] = {**(record or {}), "analysis_key": analysis_key, "push_id": push_id}
    sent = _Sent()
    with _undone_if_interrupted(client, item_id, push_id, sent):
        with _body(doc, attrs, workdir) as (body, nbytes, n_elements):
            attempt = _post(client, item_id, doc, body, nbytes, n_elements, push_id, sent)
        stored = _find_push(client, item_id, push_id)
        if not stored:
            raise DSAError(f"item {item_id}: Girder accepted the annotation but does not list it")
        ann_id = stored[0]["_id"]
        for copy in stored[1:]:  # a retried POST that landed twice: identical copies
            delete_annotation(client, copy["_id"])
        count = int(stored[0].get("_elementCount", -1))
        if count != n_elements:
            delete_annotation(client, ann_id)
            raise DSAError(
                f"item {item_id}: Girder stored {count} of {n_elements} elements; push undone"
            )
        replaced: list[str] = []
        if replace:
            try:
                legacy_name = _name(doc) if legacy else None
                replaced = dedupe(client, item_id, analysis_key, ann_id, legacy_name=legacy_name)
            except DSAError:
                # the older one could not be removed (e.g. 403: not ours to delete):
                # take the new one back, so a failed replacement never leaves two
                with contextlib.suppress(DSAError):
                    delete_annotation(client, ann_id)
                raise
        if attempt:  # a POST whose answer was lost may still land late: look once more
            client._sleep(max(client.retry.backoff, 0.5))
            for stray in _find_push(client, item_id, push_id):
                if stray["_id"] != ann_id:
                    delete_annotation(client, stray["_id"])
                    replaced.append(stray["_id"])
    return PushResult(
        annotation_id=ann_id,
        element_count=count,
        replaced=replaced,
        seconds=time.perf_counter() - t0,
        upload_bytes=nbytes,
        attempts=attempt + 1,
    )


class _Sent:
    """Whether a POST's whole body went out unanswered: the server may then
    store the document although this side never reads the answer."""

    def __init__(self) -> None:
        self.unanswered = False


class _Reader:
    """A body file that marks ``sent`` when ``requests`` has read all of it."""

    def __init__(self, f: IO[bytes], sent: _Sent):
        self._f, self._sent = f, sent

    def read(self, n: int = -1) -> bytes:
        block = self._f.read(n)
        if not block:
            self._sent.unanswered = True
        return block

    def __getattr__(self, name: str) -> Any:  # fileno, seek, tell, mode: the file's
        return getattr(self._f, name)


@contextlib.contextmanager
def _undone_if_interrupted(
    client: DSAClient, item_id: str, push_id: str, sent: _Sent
) -> Iterator[None]:
    """A push interrupted by SIGTERM (a cancelled job) or Ctrl-C takes back
    what landed of it; an error (an ``Exception``) is the push's to handle.

    Interrupted while its POST's answer is awaited, the server goes on
    storing the document (elements first, the annotation last): it is
    waited for, up to :data:`LANDING_WAIT_S`, and taken back, not left beside
    the older one. One that lands later still is removed by the next run."""
    try:
        yield
    except Exception:
        raise
    except BaseException:
        deadline = time.monotonic() + (LANDING_WAIT_S if sent.unanswered else 0.0)
        with contextlib.suppress(Exception):
            while True:
                stored = _find_push(client, item_id, push_id)
                for ann in stored:
                    delete_annotation(client, ann["_id"])
                if stored or time.monotonic() >= deadline:
                    break
                time.sleep(0.25)
        raise


def _name(doc: Document) -> str | None:
    return doc.name if isinstance(doc, BatchedDocument) else doc.get("name")


def _attributes(doc: Document) -> dict[str, Any] | None:
    return doc.attributes if isinstance(doc, BatchedDocument) else doc.get("attributes")


def _elements_of(doc: Document) -> Iterable[Any]:
    return doc.elements() if isinstance(doc, BatchedDocument) else doc.get("elements") or []


@contextlib.contextmanager
def _body(
    doc: Document, attrs: dict[str, Any], workdir: str | None
) -> Iterator[tuple[bytes | IO[bytes], int, int]]:
    """The POST body of ``doc`` with ``attrs`` (bytes, or an open temporary
    file for a :class:`BatchedDocument`), its size and its element count; the
    elements are checked first."""
    if not isinstance(doc, BatchedDocument):
        elements = doc.get("elements") or []
        check_elements(elements)
        body = compact_json({**doc, "attributes": attrs}).encode()
        yield body, len(body), len(elements)
        return
    count = 0

    def checked() -> Iterator[list[dict[str, Any]]]:
        nonlocal count
        for batch in doc.batches():
            check_elements(batch, count)
            count += len(batch)
            yield batch

    with tempfile.TemporaryDirectory(prefix="nm-push-", dir=workdir) as tmp:
        path = os.path.join(tmp, "annotation.json")
        write_json_in_batches(path, {"name": doc.name}, "elements", checked(), doc.tail(attrs))
        with open(path, "rb") as f:
            yield f, os.path.getsize(path), count


def _post(
    client: DSAClient,
    item_id: str,
    doc: Document,
    body: bytes | IO[bytes],
    nbytes: int,
    n_elements: int,
    push_id: str,
    sent: _Sent | None = None,
) -> int:
    """POST the body (retried; after a lost answer the item is searched for
    ``push_id`` first); return the index of the attempt that stored it.

    The server answers with the whole stored document, elements and their
    new ids included (~100 bytes a point, more than the upload); that answer
    is not read: the new annotation is found by its ``push_id``."""
    timeout = _push_timeout(client, nbytes)
    attempts = max(1, client.retry.attempts)
    sent = sent or _Sent()
    for attempt in range(attempts):
        if not isinstance(body, bytes):
            body.seek(0)
        sent.unanswered |= isinstance(body, bytes)  # a file: once read to its end
        try:
            answer = client.sendRestRequest(
                "POST",
                "annotation",
                {"itemId": item_id},
                data=body if isinstance(body, bytes) else _Reader(body, sent),
                headers={"Content-Type": "application/json"},
                jsonResp=False,
                stream=True,
                attempts=1,
                timeout=timeout,
            )
            sent.unanswered = False  # answered: stored, and found by its push_id
            answer.close()
            return attempt
        except GirderRequestError as exc:
            sent.unanswered = False  # answered: nothing was stored
            if exc.status == 400 and "Validation" in exc.text:
                _remove_stray(client, item_id, push_id)
                raise AnnotationRejected(
                    f"Girder rejected annotation {_name(doc)!r}: " + diagnose(client, doc, exc.text)
                ) from None
            raise
        except GirderUnavailable as exc:
            if _lookup_after_failure(client, item_id, push_id):
                log.info("item %s: the push arrived although its answer was lost", item_id)
                return attempt
            if attempt + 1 >= attempts:
                raise GirderUnavailable(
                    f"push of {n_elements} elements to item {item_id} failed: {exc}"
                ) from None
            wait = client.retry.delay(attempt)
            log.warning("push to item %s: %s; retry in %.1f s", item_id, exc, wait)
            client._sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _lookup_after_failure(client: DSAClient, item_id: str, push_id: str) -> list[dict[str, Any]]:
    try:
        return _find_push(client, item_id, push_id)
    except GirderUnavailable:
        return []


def _remove_stray(client: DSAClient, item_id: str, push_id: str) -> None:
    for ann in _find_push(client, item_id, push_id):
        delete_annotation(client, ann["_id"])


def diagnose(client: DSAClient, doc: Document, server_message: str) -> str:
    """Name the element the server's schema rejects (the server only says why)."""
    import jsonschema

    try:
        schema = client.get("annotation/schema")
    except DSAError:
        schema = None
    if schema:
        if isinstance(doc, BatchedDocument):
            top = {"name": doc.name, "elements": [], **doc.tail(doc.attributes)}
        else:
            top = {**doc, "elements": []}
        err = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(top))
        if err is not None:
            return f"{_where(err)}: {err.message}"
        by_type = {
            s.get("properties", {}).get("type", {}).get("enum", [None])[0]: s
            for s in schema["properties"]["elements"]["items"].get("anyOf", [])
        }
        validators = {k: jsonschema.Draft7Validator(v) for k, v in by_type.items() if k}
        for i, el in enumerate(_elements_of(doc)):
            kind = el.get("type") if isinstance(el, dict) else None
            v = validators.get(kind)
            if v is None:
                return f"element {i} has unknown type {kind!r}"
            err = jsonschema.exceptions.best_match(v.iter_errors(el))
            if err is not None:
                return f"element {i} ({kind}): {_where(err)}: {err.message}"
    try:
        return " ".join(str(json.loads(server_message).get("message")).split())[:500]
    except (ValueError, AttributeError):
        return server_message[:500]


def _where(err: Any) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return path.lstrip(".") or "document"

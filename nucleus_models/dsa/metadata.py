"""Scores and provenance in Girder item metadata, under one namespaced key.

``item["meta"]["nucleus_models"]`` is ``{analysis_key: record}``; a record
holds the status (``done`` / ``failed``), the parameters hash, the annotation
id, the scores and the provenance. Writes are read-modify-write of our
namespace only, so other keys of the item's metadata are never touched.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from .client import DSAClient

__all__ = ["META_NS", "read_records", "read_record", "write_record", "clean_for_mongo"]

#: The item metadata key that holds every record of this package.
META_NS = "nucleus_models"


def clean_for_mongo(value: Any) -> Any:
    """``value`` with keys Mongo refuses (``.``, leading ``$``) and non-finite floats fixed."""
    if isinstance(value, dict):
        return {
            str(k).replace(".", "_").lstrip("$") or "_": clean_for_mongo(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [clean_for_mongo(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_records(client: DSAClient, item_id: str) -> dict[str, Any]:
    """Every record of our namespace on the item (``{}`` when none)."""
    item = client.get(f"item/{item_id}")
    ns = (item.get("meta") or {}).get(META_NS)
    return ns if isinstance(ns, dict) else {}


def read_record(client: DSAClient, item_id: str, analysis_key: str) -> dict[str, Any] | None:
    """The record of ``analysis_key`` on the item, or None."""
    rec = read_records(client, item_id).get(analysis_key)
    return rec if isinstance(rec, dict) else None


def write_record(
    client: DSAClient, item_id: str, analysis_key: str, record: dict[str, Any]
) -> dict[str, Any]:
    """Set ``meta.nucleus_models[analysis_key] = record`` (with an ``updated`` time).

    Returns the whole namespace as written. The PUT is idempotent, so it is
    safe to retry.
    """
    ns = dict(read_records(client, item_id))
    ns[analysis_key] = clean_for_mongo(
        {**record, "updated": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    )
    client.sendRestRequest("PUT", f"item/{item_id}/metadata", json={META_NS: ns})
    return ns

"""Girder / Digital Slide Archive: push annotations and scores, folder jobs.

The only part of the package that imports ``girder_client``:

- :mod:`.client`: :func:`connect` (token from the argument or ``$GIRDER_TOKEN``),
  retries with backoff on 5xx / time-outs / dropped connections, token redaction;
- :mod:`.annotations`: :func:`push_annotation` (one POST, verified, then the
  previous annotation of the same analysis key is deleted: never duplicates;
  a :class:`BatchedDocument` is uploaded from a file written a batch at a time);
- :mod:`.metadata`: scores and provenance under ``item.meta["nucleus_models"]``;
- :mod:`.folder_job`: :func:`run_folder_job`, every large image of a folder,
  resumable, with a summary CSV uploaded to the folder;
- :mod:`.lease`: one run per folder and analysis key at a time (a lease with a
  heartbeat in the folder's metadata).

``python -m nucleus_models.dsa folder-job --api-url URL --folder ID`` runs the
folder job from cron.
"""

from .annotations import (
    ATTR_NS,
    AnnotationRejected,
    BatchedDocument,
    PushResult,
    dedupe,
    find_annotations,
    list_annotations,
    push_annotation,
)
from .client import (
    API_KEY_ENV,
    TOKEN_ENV,
    AuthenticationError,
    DSAClient,
    DSAError,
    GirderRequestError,
    GirderUnavailable,
    RetryPolicy,
    connect,
    install_log_redaction,
    redact,
)
from .folder_job import ANALYSES, FolderJobParams, ItemOutcome, run_folder_job, summary_name
from .metadata import META_NS, read_record, read_records, write_record

__all__ = [
    "ANALYSES",
    "ATTR_NS",
    "META_NS",
    "TOKEN_ENV",
    "API_KEY_ENV",
    "AnnotationRejected",
    "AuthenticationError",
    "BatchedDocument",
    "DSAClient",
    "DSAError",
    "FolderJobParams",
    "GirderRequestError",
    "GirderUnavailable",
    "ItemOutcome",
    "PushResult",
    "RetryPolicy",
    "connect",
    "dedupe",
    "find_annotations",
    "install_log_redaction",
    "list_annotations",
    "push_annotation",
    "read_record",
    "read_records",
    "redact",
    "run_folder_job",
    "summary_name",
    "write_record",
]

"""A real Girder 5 server (large_image + annotation plugins) for integration tests.

Runs inside ``.venv-girder`` (``scripts/setup_girder_venv.sh``). There is no
MongoDB here, so ``pymongo.MongoClient`` is replaced by a ``mongomock``
client (the database lives in this process's memory and dies with it); see
``../shared/docs/ENVIRONMENT.md``. Listens on 127.0.0.1 only and prints one
line ``GIRDER READY http://127.0.0.1:PORT/api/v1`` on stdout once the API
answers. With ``--parent-pid`` it exits by itself when that process is gone,
so a killed test run never leaves a server behind.

Usage::

    .venv-girder/bin/python scripts/girder_test_server.py --port 8123 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import urllib.request

log = logging.getLogger("girder_test_server")

_DROP_OPTIONS = ("readpreference", "replicaset", "w")


def patch_mongo() -> None:
    """Make Girder run on mongomock (in-memory MongoDB)."""
    import mongomock
    import mongomock.codec_options
    import pymongo
    import pymongo.synchronous.mongo_client

    class MockClient(mongomock.MongoClient):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            kwargs = {
                k: v
                for k, v in kwargs.items()
                if k.lower() not in _DROP_OPTIONS and not k.lower().endswith("timeoutms")
            }
            super().__init__(*args, **kwargs)

        def server_info(self) -> dict:
            return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1.0}

    pymongo.MongoClient = MockClient
    pymongo.synchronous.mongo_client.MongoClient = MockClient

    original = mongomock.codec_options.is_supported

    def is_supported(opts):  # noqa: ANN001, ANN202
        try:
            return original(opts)
        except (NotImplementedError, TypeError):
            return None

    mongomock.codec_options.is_supported = is_supported

    def _count(self, with_limit_and_skip: bool = False) -> int:  # noqa: ANN001
        return len(self._compute_results(with_limit_and_skip=with_limit_and_skip))

    if not hasattr(mongomock.collection.Cursor, "count"):
        mongomock.collection.Cursor.count = _count

    def _next(self):  # noqa: ANN001, ANN202
        # mongomock copies the whole result list on every next(): O(n^2) for
        # the 100k-element annotations HistomicsUI reads. Index it instead.
        if self._limit and self._emitted >= abs(self._limit):
            raise StopIteration
        results = self._compute_results(with_limit_and_skip=False)
        index = (self._skip or 0) + self._emitted
        if index >= len(results):
            raise StopIteration
        self._emitted += 1
        return results[index]

    mongomock.collection.Cursor.__next__ = _next
    mongomock.collection.Cursor.next = _next

    import girder.api.rest as rest

    rest._MONGO_CURSOR_TYPES = (
        *rest._MONGO_CURSOR_TYPES,
        mongomock.collection.Cursor,
        mongomock.command_cursor.CommandCursor,
    )


def _announce_when_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/system/version", timeout=2) as r:
                if r.status == 200:
                    sys.stdout.write(f"GIRDER READY {url}\n")
                    sys.stdout.flush()
                    return
        except OSError:
            pass
        time.sleep(0.2)
    log.error("the server did not answer within %.0f s", timeout)
    os._exit(3)


def _watch_parent(pid: int) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        if os.getppid() == 1 and pid != 1:
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, patch the database layer and serve Girder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("GIRDER_MONGO_URI", "mongodb://localhost:27017/girder")
    patch_mongo()
    import uvicorn

    url = f"http://127.0.0.1:{args.port}/api/v1"
    threading.Thread(target=_announce_when_ready, args=(url,), daemon=True).start()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    uvicorn.run(
        "girder.asgi:app",
        host="127.0.0.1",
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()

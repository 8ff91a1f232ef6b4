"""nucleus_models.dsa without Girder: retries with backoff, time-outs, dropped
connections and token redaction, against a tiny HTTP server on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nucleus_models.dsa import (
    AnnotationRejected,
    AuthenticationError,
    DSAClient,
    DSAError,
    FolderJobParams,
    GirderRequestError,
    GirderUnavailable,
    RetryPolicy,
    connect,
    install_log_redaction,
    redact,
)
from nucleus_models.dsa.annotations import check_elements

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok3nSECRETvalue0123456789abcdef"


#: a slide's bytes, and where a dropped download of it breaks off
SLIDE = bytes(range(256)) * 1200
CUT_AT = 100_000


class _JSONHandler(BaseHTTPRequestHandler):
    """A fake server's handler: quiet, answering JSON."""

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Handler(_JSONHandler):
    counts: Counter[str] = Counter()
    bodies: dict[str, list[bytes]] = {}
    annotations: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].removeprefix("/api/v1/")
        n = self.counts[path] = self.counts[path] + 1
        token = self.headers.get("Girder-Token", "")
        if path == "user/me":
            if token == TOKEN:
                self._send(200, {"login": "ada"})
            elif token:
                self._send(401, {"message": f"Invalid token {token}", "type": "access"})
            else:
                self._send(200, None)
        elif path == "flaky":  # two 5xx, then fine
            self._send(503 if n <= 2 else 200, {"n": n})
        elif path == "ratelimited":  # a proxy's rate limit, then fine
            self._send(429 if n == 1 else 200, {"n": n})
        elif path == "always500":
            self._send(500, {"message": "boom"})
        elif path == "slow":  # the first answer comes too late
            time.sleep(1.5 if n == 1 else 0)
            self._send(200, {"n": n})
        elif path == "drop":  # the first connection is closed without an answer
            if n == 1:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(200, {"n": n})
        elif path == "echo400":
            self._send(400, {"message": f"bad request with token={token}", "type": "validation"})
        elif path == "cutjson":  # the first answer is cut off mid-body
            if n == 1:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "40")
                self.end_headers()
                self.wfile.write(b'{"n": 1, "pad')
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(200, {"n": n})
        elif path.startswith("file/") and path.endswith("/download"):
            self._download(path.split("/")[1], n)
        elif path.startswith("file/"):
            self._send(200, {"_id": path[5:], "name": "case 1.svs", "size": len(SLIDE)})
        elif path == "annotation":
            self._send(200, self.annotations)
        elif path.startswith("item/") and path.endswith("/files"):
            self._send(200, [])
        else:
            self._send(404, {"message": "no such route"})

    def _download(self, file_id: str, n: int) -> None:
        """``cut<k>``: the first k answers drop the connection after
        :data:`CUT_AT` bytes of their Content-Length; ``nolength<k>``: the
        same without a Content-Length (the end of the answer is the close);
        ``cutall``: every answer drops."""
        cuts = (
            10**9
            if file_id == "cutall"
            else int(file_id.removeprefix("cut").removeprefix("nolength"))
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if not file_id.startswith("nolength"):
            self.send_header("Content-Length", str(len(SLIDE)))
        self.end_headers()
        self.wfile.write(SLIDE[:CUT_AT] if n <= cuts else SLIDE)
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:  # noqa: N802
        self._write_request()

    def do_PUT(self) -> None:  # noqa: N802
        self._write_request()

    def _write_request(self) -> None:
        """A write whose first try gets a 503 after its body was read: the
        bodies each try sent are kept in ``bodies``."""
        path = self.path.split("?")[0].removeprefix("/api/v1/")
        n = self.counts[path] = self.counts[path] + 1
        body = self._body()
        self.bodies.setdefault(path, []).append(body)
        if path == "file":  # girder_client's upload: the upload, then its chunks
            self._send(200, {"_id": "upload1"})
        elif n == 1:
            self._send(503, {"message": "busy"})
        elif path == "annotation":  # stored (as Girder lists it) when it parses
            try:
                doc = json.loads(body)
            except ValueError:
                self._send(400, {"message": "Invalid JSON", "type": "rest"})
                return
            els = doc.pop("elements")
            self.annotations.append({"_id": f"A{n}", "annotation": doc, "_elementCount": len(els)})
            self._send(200, {"_id": f"A{n}"})
        else:
            self._send(200, {"_id": "file1", "size": len(body)})

    def do_DELETE(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].removeprefix("/api/v1/")
        n = self.counts[path] = self.counts[path] + 1
        if path == "annotation/lost" and n == 1:  # deleted, but the answer is lost
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(400, {"message": "Invalid annotation id", "type": "rest"})


def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port; yield its API root URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/api/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.counts = Counter()
    _Handler.bodies, _Handler.annotations = {}, []
    yield from _serving(_Handler)


def _client(url: str, sleeps: list[float], **policy: float) -> DSAClient:
    kw = {"attempts": 4, "backoff": 0.2, "read_timeout": 5.0, **policy}
    return DSAClient(url, TOKEN, retry=RetryPolicy(**kw), sleep=sleeps.append)  # type: ignore[arg-type]


def test_5xx_is_retried_with_growing_backoff(server: str) -> None:
    sleeps: list[float] = []
    assert _client(server, sleeps).get("flaky") == {"n": 3}
    assert _Handler.counts["flaky"] == 3
    assert len(sleeps) == 2
    assert 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4  # 0.2 * 2**k, jitter in [0.5, 1]


def test_gives_up_after_the_attempts_with_one_line_error(server: str) -> None:
    sleeps: list[float] = []
    with pytest.raises(GirderUnavailable) as info:
        _client(server, sleeps, attempts=3).get("always500")
    assert _Handler.counts["always500"] == 3 and len(sleeps) == 2
    msg = str(info.value)
    assert "failed 3 time(s)" in msg and "HTTP 500" in msg and "\n" not in msg
    assert TOKEN not in msg


def test_time_out_is_retried(server: str) -> None:
    sleeps: list[float] = []
    t0 = time.monotonic()
    assert _client(server, sleeps, read_timeout=0.3).get("slow") == {"n": 2}
    assert time.monotonic() - t0 < 1.4 and len(sleeps) == 1


def test_dropped_connection_is_retried(server: str) -> None:
    sleeps: list[float] = []
    assert _client(server, sleeps).get("drop") == {"n": 2}
    assert len(sleeps) == 1


def test_delete_retried_after_a_lost_answer_is_idempotent(server: str) -> None:
    sleeps: list[float] = []
    client = _client(server, sleeps)
    assert client.sendRestRequest("DELETE", "annotation/lost") is None  # 2nd try: 400 = gone
    assert _Handler.counts["annotation/lost"] == 2
    with pytest.raises(GirderRequestError):  # a first-try 400 is a real error
        client.sendRestRequest("DELETE", "annotation/other")


def test_4xx_is_not_retried_and_the_token_is_redacted(server: str) -> None:
    sleeps: list[float] = []
    with pytest.raises(GirderRequestError) as info:
        _client(server, sleeps).get("echo400")
    assert info.value.status == 400 and _Handler.counts["echo400"] == 1 and not sleeps
    assert TOKEN not in str(info.value) and TOKEN not in info.value.text
    assert "token=***" in str(info.value)


def test_connect_checks_the_token(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GIRDER_TOKEN", raising=False)
    with pytest.raises(AuthenticationError, match="GIRDER_TOKEN"):
        connect(server)
    with pytest.raises(AuthenticationError, match="not accepted") as info:
        connect(server, "wrong-token-0123456789")
    assert "wrong-token-0123456789" not in str(info.value)
    monkeypatch.setenv("GIRDER_TOKEN", TOKEN)
    assert connect(server).token == TOKEN


def test_a_missing_api_url_is_called_missing() -> None:
    """``python -m cli NucleusFolderJob FOLDER`` from a shell (HistomicsUI
    fills the URL in) said "must start with http:// or https://, got ''"."""
    with pytest.raises(DSAError, match=r"^no Girder API URL was given \(--api-url"):
        connect("", TOKEN)
    with pytest.raises(DSAError, match="must start with http:// or https://, got 'x.org'"):
        connect("x.org", TOKEN)


def test_unreachable_server_fails_fast() -> None:
    from girder_server import free_port

    url = f"http://127.0.0.1:{free_port()}/api/v1"
    t0 = time.monotonic()
    with pytest.raises(GirderUnavailable, match="connection failed"):
        connect(url, TOKEN, retry=RetryPolicy(backoff=0.05))
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(("attempts", "tries"), [(1, 1), (2, 2), (5, 3)])
def test_the_first_call_tries_no_more_than_the_policy(attempts: int, tries: int) -> None:
    """``folder-job --retries 0`` said "failed 3 time(s) on GET user/me": the
    token check tried three times whatever the policy; now at most the
    policy's tries (and still at most three, to fail fast)."""
    from girder_server import free_port

    url = f"http://127.0.0.1:{free_port()}/api/v1"
    with pytest.raises(GirderUnavailable, match=f"failed {tries} time\\(s\\)"):
        connect(url, TOKEN, retry=RetryPolicy(attempts=attempts, backoff=0.01))


def test_redact_removes_tokens_everywhere() -> None:
    DSAClient("http://127.0.0.1:1/api/v1", TOKEN)  # registers the token
    text = f"GET /x?token={TOKEN}&a=1 Girder-Token: {TOKEN} {{'girderToken': '{TOKEN}'}}"
    assert TOKEN not in redact(text) and redact(text).count("***") >= 3
    assert redact("token=abcdef123456&x=1") == "token=***&x=1"
    assert redact("--girderToken abcdefgh12345") == "--girderToken ***"


def test_log_handlers_redact_every_logger() -> None:
    DSAClient("http://127.0.0.1:1/api/v1", TOKEN)
    buf = io.StringIO()
    root = logging.getLogger("test_dsa_unit_redaction")
    handler = logging.StreamHandler(buf)
    root.addHandler(handler)
    root.propagate = False
    try:
        install_log_redaction(root)
        root.warning("request with %s failed", TOKEN)
        logging.getLogger("test_dsa_unit_redaction.child").warning("url ?token=%s", TOKEN)
    finally:
        root.removeHandler(handler)
    out = buf.getvalue()
    assert TOKEN not in out and out.count("***") == 2


def test_check_elements_names_the_bad_element() -> None:
    good = {"type": "point", "center": [1.0, 2.0, 0]}
    check_elements([good, {"type": "polyline", "points": [[0, 0, 0], [1, 1, 0]]}])
    with pytest.raises(AnnotationRejected, match=r"element 2 \(point\): center"):
        check_elements([good, good, {"type": "point", "center": [1.0, float("nan"), 0]}])
    with pytest.raises(AnnotationRejected, match=r"element 1 \(polyline\): point 1"):
        check_elements([good, {"type": "polyline", "points": [[0, 0, 0], [1, "a", 0]]}])
    with pytest.raises(AnnotationRejected, match="element 0 has unknown type 'blob'"):
        check_elements([{"type": "blob"}])


def test_records_are_made_fit_for_mongo() -> None:
    """Item metadata is stored by Mongo, which refuses keys with a dot or a
    leading ``$`` and has no NaN or infinity: such keys are renamed (nested
    too) and such numbers become null; everything else is kept."""
    from nucleus_models.dsa.metadata import clean_for_mongo

    rec = {"scores": {"f1.5": 0.5, "$where": [1.0, float("nan")], "n": 3}, "$": float("inf")}
    assert clean_for_mongo(rec) == {
        "scores": {"f1_5": 0.5, "where": [1.0, None], "n": 3},
        "_": None,
    }


def test_params_hash_and_token_never_in_provenance() -> None:
    a = FolderJobParams(inputFolder="f", girderToken=TOKEN)
    assert a.params_hash() == FolderJobParams(inputFolder="g").params_hash()  # not the folder
    assert a.params_hash() != FolderJobParams(inputFolder="f", min_radius=3).params_hash()
    assert (
        a.params_hash()
        != FolderJobParams(inputFolder="f", model="histomicstk-kofahi").params_hash()
    )
    assert TOKEN not in repr(a) and TOKEN not in json.dumps(a.public())


def test_test_time_flips_change_the_hash_only_when_set() -> None:
    """Results stored before the option existed keep their hash (they are not
    redone); with flips the hash differs (they are). The cron flag sets it."""
    import hashlib

    from nucleus_models.dsa.__main__ import build_parser
    from nucleus_models.models import get_spec

    plain = FolderJobParams(inputFolder="f", min_radius=3)
    before = ["model", "analysis_roi", "input_mpp", "nuclei_annotation_format"]
    before += ["annotation_name", "analysis_tile_size", "analysis_tile_overlap", "min_fgnd_frac"]
    before += ["foreground_threshold", "min_radius", "max_radius", "local_max_search_radius"]
    before += ["min_nucleus_area"]
    old = {"analysis": plain.analysis, "model_sha256": get_spec(plain.model).sha256}
    old.update({k: getattr(plain, k) for k in before})
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert plain.params_hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    flips = FolderJobParams(inputFolder="f", min_radius=3, test_time_flips=True)
    assert flips.settings()["test_time_flips"] is True
    assert flips.params_hash() != plain.params_hash()
    ns = build_parser().parse_args(
        ["folder-job", "--api-url", "http://x/api/v1", "--folder", "f", "--test-time-flips"]
    )
    assert FolderJobParams.from_namespace(ns).test_time_flips is True


def test_items_named_like_slides_that_are_not_large_images() -> None:
    from nucleus_models.dsa.folder_job import not_analysed_reason

    def item(name: str, large: dict[str, object] | None = None) -> dict[str, object]:
        return {"_id": "i", "name": name, **({"largeImage": large} if large is not None else {})}

    assert not_analysed_reason(item("a.svs", {"fileId": "f"})) is None  # a large image
    assert "not a large image" in str(not_analysed_reason(item("Case 1.NDPI")))
    converting = item("b.tiff", {"expected": True, "jobId": "j", "originalId": "f"})
    assert "conversion job running" in str(not_analysed_reason(converting))
    job_only = item("b.tiff", {"jobId": "j", "originalId": "f"})
    assert "conversion job running" in str(not_analysed_reason(job_only))
    assert "has no file" in str(not_analysed_reason(item("c.svs", {"originalId": "f"})))
    for other in ("notes.txt", "nucleus_models_summary_NucleusDetection.csv", "report.pdf"):
        assert not_analysed_reason(item(other)) is None


def test_a_lease_is_dead_only_when_its_process_is_gone_from_this_host() -> None:
    """A lease from another host, or from a container that shares the host's
    name but not its PID namespace, is never judged by a local PID."""
    import socket

    from nucleus_models.dsa.lease import _boot_id, _dead_here, _pid_namespace

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace()}
    assert here["pidns"] and here["boot"]  # Linux
    assert _dead_here({**here, "pid": gone.pid})
    assert not _dead_here({**here, "pid": os.getpid()})
    assert not _dead_here({**here, "pidns": "4026531836x", "pid": gone.pid})
    assert not _dead_here({**here, "host": "elsewhere", "pid": gone.pid})
    # a VM cloned from this one (same name, same initial PID namespace), or this
    # host before a reboot: its PIDs are not this boot's
    assert not _dead_here({**here, "boot": "0" * 8 + here["boot"][8:], "pid": gone.pid})
    assert not _dead_here({"host": here["host"], "pid": gone.pid})  # written without pidns
    assert not _dead_here({k: here[k] for k in ("host", "pidns")} | {"pid": gone.pid})


class _FolderMeta:
    """A Girder stand-in holding one folder's metadata; ``fail`` maps a call
    number (1-based, GETs and PUTs together) to the exception it raises."""

    def __init__(self, fail: dict[int, BaseException] | None = None):
        self.meta: dict[str, Any] = {}
        self.calls = 0
        self.fail = fail or {}

    def _call(self) -> None:
        self.calls += 1
        if self.calls in self.fail:
            raise self.fail[self.calls]

    def get(self, path: str) -> dict[str, Any]:
        self._call()
        return {"_id": "f1", "name": "cases", "meta": dict(self.meta)}

    def sendRestRequest(self, method: str, path: str, json: dict[str, Any]) -> None:  # noqa: N802
        self._call()
        for k, v in json.items():
            if v is None:
                self.meta.pop(k, None)
            else:
                self.meta[k] = v


def test_a_lease_whose_read_back_fails_is_not_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dropping the read-back after the lease was written (or a
    SIGTERM in that moment) removes it again: other runs are not kept out
    for the stale time by a run that never started."""
    from nucleus_models.dsa import lease
    from nucleus_models.dsa.client import DSAError

    monkeypatch.setattr(lease, "SETTLE_S", 0.0)
    folder = {"_id": "f1", "name": "cases"}
    for exc in (DSAError("GET folder/f1: 502 Bad Gateway"), KeyboardInterrupt()):
        girder = _FolderMeta(fail={3: exc})  # 1 GET, 2 PUT (written), 3 GET (read back)
        with pytest.raises(type(exc)):
            lease.FolderLease.acquire(girder, folder, "NucleusDetection")  # type: ignore[arg-type]
        assert girder.meta == {} and girder.calls == 5  # read again, then removed
    girder = _FolderMeta()
    held = lease.FolderLease.acquire(girder, folder, "NucleusDetection")  # type: ignore[arg-type]
    assert set(girder.meta) == {lease.lease_field("NucleusDetection")}
    held.release()
    assert girder.meta == {}


def test_a_heartbeat_that_errs_keeps_beating_and_a_removed_lease_is_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nucleus_models.dsa import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.0)
    girder = _FolderMeta()
    held = lease.FolderLease.acquire(girder, {"_id": "f1"}, "k")  # type: ignore[arg-type]
    held._stop.set()  # no thread: the test beats by hand
    held._thread.join()  # type: ignore[union-attr]
    held._stop.clear()
    field = lease.lease_field("k")
    girder.fail = {girder.calls + 1: ValueError("Expecting value: line 1 column 1 (char 0)")}
    held.beat()  # a garbled answer (not a DSAError) is logged, not raised
    before = girder.meta[field]["heartbeat_epoch"]
    time.sleep(0.01)
    held.beat()
    assert girder.meta[field]["heartbeat_epoch"] > before and not held.lost
    started = girder.meta[field]["started"]
    girder.meta.clear()  # someone removed the metadata key by hand
    assert not held.check() and girder.meta[field]["run"] == held.run_id
    assert girder.meta[field]["started"] == started
    girder.fail = {girder.calls + 1: ValueError("Expecting value: line 1 column 1 (char 0)")}
    assert not held.check()  # an odd answer is logged; the job goes on
    girder.meta[field] = {**girder.meta[field], "run": "newer"}
    assert held.check() and held.lost
    held.beat()  # never takes the lease back from the newer run
    assert girder.meta[field]["run"] == "newer"
    girder.meta.clear()  # the newer run ended
    held.beat()  # nor writes this lost run's lease back
    assert girder.meta == {}


def test_release_does_not_wait_for_a_heartbeat_stuck_on_the_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled job (docker kills it ~10 s after SIGTERM) is not held up
    by a heartbeat retrying an unanswered server: the lease goes stale."""
    from nucleus_models.dsa import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.0)
    monkeypatch.setattr(lease, "RELEASE_WAIT_S", 0.2)
    girder = _FolderMeta()
    held = lease.FolderLease.acquire(girder, {"_id": "f1"}, "k")  # type: ignore[arg-type]
    stuck, go_on = threading.Event(), threading.Event()

    def hang(path: str) -> dict[str, Any]:
        stuck.set()
        go_on.wait(30)
        return {"meta": dict(girder.meta)}

    monkeypatch.setattr(girder, "get", hang)
    beat = threading.Thread(target=held.beat)
    beat.start()
    assert stuck.wait(10)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        held.release()
    assert time.monotonic() - t0 < 2 and "left to go stale" in caplog.text
    go_on.set()
    beat.join(10)


def test_a_lease_write_undone_by_another_metadata_write_is_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Girder's metadata PUT rewrites the whole folder document: a
    simultaneous write of another key can undo this lease's write. That is
    not another run of the key winning: the lease is written again."""
    from nucleus_models.dsa import lease

    monkeypatch.setattr(lease, "SETTLE_S", 0.0)

    class Undone(_FolderMeta):
        def sendRestRequest(self, method: str, path: str, json: dict[str, Any]) -> None:  # noqa: N802
            super().sendRestRequest(method, path, json)
            if self.calls == 2:
                self.meta.clear()

    girder = Undone()
    held = lease.FolderLease.acquire(girder, {"_id": "f1"}, "k")  # type: ignore[arg-type]
    assert girder.meta[lease.lease_field("k")]["run"] == held.run_id
    held.release()


def _cron(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GIRDER_TOKEN"}
    if token:
        env["GIRDER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "nucleus_models.dsa", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "case",
    ["unreachable", "bad token", "no token", "bad url", "missing folder arg", "roi as cron has it"],
)
def test_cron_bad_input_one_line_error(case: str, server: str) -> None:
    from girder_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/api/v1"
    args, token, expected = {
        "unreachable": (["--api-url", dead, "--folder", "x", "--retries", "1"], TOKEN, "failed"),
        "bad token": (["--api-url", server, "--folder", "x"], "nope-0123456789", "not accepted"),
        "no token": (["--api-url", server, "--folder", "x"], None, "GIRDER_TOKEN"),
        "bad url": (["--api-url", "ftp://x", "--folder", "x"], TOKEN, "http://"),
        "missing folder arg": (["--api-url", server], TOKEN, "--folder"),
        # the whole slide written without "=" parses (the URL is what is wrong)
        "roi as cron has it": (
            ["--api-url", "ftp://x", "--folder", "x", "--analysis-roi", "-1,-1,-1,-1"],
            TOKEN,
            "http://",
        ),
    }[case]
    res = _cron("folder-job", *args, token=token)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert res.stdout == ""
    if case == "no token":  # its hint was once taken for a secret and starred out
        assert "***" not in res.stderr and "--girder-token" in res.stderr
    assert TOKEN not in res.stderr


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_a_timeout_of_no_time_is_refused_before_any_request(timeout: str) -> None:
    """requests refused 0 and negative time-outs in a traceback at the first
    request; NaN and infinity are no time-outs either."""
    res = _cron(
        "folder-job", "--api-url", "http://127.0.0.1:9/api/v1", "--folder", "x",
        "--retries", "1", "--timeout", timeout,
    )  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "--timeout" in lines[0], lines[0]
    assert "positive number of seconds" in lines[0], lines[0]


def test_the_cron_takes_every_parameter_of_the_folder_job_in_either_spelling() -> None:
    """What a HistomicsUI run was given can be given to the cron: each
    FolderJobParams field (the token comes from $GIRDER_TOKEN) has a flag,
    and --input_mpp, the spelling the error messages use, works too."""
    import dataclasses

    from nucleus_models.dsa.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    fj = sub.choices["folder-job"]  # type: ignore[attr-defined]
    fields = {f.name for f in dataclasses.fields(FolderJobParams)} - {"girderToken"}
    assert fields <= {a.dest for a in fj._actions}
    ns = build_parser().parse_args(
        ["folder-job", "--api-url", "u", "--folder", "f", "--min_radius", "3",
         "--input_mpp", "0.5", "--foreground-threshold", "80",
         "--analysis_tile_size", "512", "--nuclei_annotation_format", "point"]
    )  # fmt: skip
    params = FolderJobParams.from_namespace(ns)
    assert (params.min_radius, params.input_mpp, params.foreground_threshold) == (3, 0.5, 80)
    assert (params.analysis_tile_size, params.nuclei_annotation_format) == (512, "point")


def test_the_crons_help_explains_every_flag_with_the_xmls_default() -> None:
    """README: the cron flags are NucleusFolderJob's parameters, "--help lists
    them"; it listed most bare (``--model MODEL``, no default, no choices), and
    ``--analysis-key`` said "default: analysis". Each flag now says what it is
    and its default, the default being the CLI XML's."""
    from ctk_cli import CLIModule
    from slicer_cli_web import CLIArgumentParser  # noqa: F401  (its ctk_cli adjustments)

    from nucleus_models.dsa.__main__ import build_parser, shown_default

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    fj = sub.choices["folder-job"]  # type: ignore[attr-defined]
    text = " ".join(fj.format_help().split())
    for action in fj._actions:
        assert action.help, f"{action.option_strings} has no help"
    xml = Path(__file__).resolve().parents[1] / "cli" / "NucleusFolderJob" / "NucleusFolderJob.xml"
    by_dest = {a.dest: a for a in fj._actions}
    for p in CLIModule(str(xml)).parameters():
        if p.name in ("inputFolder", "girderApiUrl", "girderToken"):
            continue
        action = by_dest[p.name]
        want = p.default if p.default is not None else ""
        assert action.default == want, (p.name, action.default, want)
        if shown := shown_default(want):
            assert f"(default: {shown})" in " ".join(action.help.split()), (p.name, shown)
    assert "default: analysis" not in text and "default: the --analysis name" in text
    assert "unet-monuseg-fast, unet-monuseg-reinhard" in by_dest["model"].help  # the choices


def test_a_workdir_that_cannot_be_written_is_refused_before_any_request(tmp_path: Path) -> None:
    from nucleus_models.dsa import run_folder_job
    from nucleus_models.errors import NucleusModelsError

    class NoServer:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the server was asked ({name})")

    params = FolderJobParams(inputFolder="f")
    for workdir in (tmp_path / "missing", tmp_path / "file"):
        (tmp_path / "file").write_text("")
        with pytest.raises(NucleusModelsError, match="not a folder this job can write to"):
            run_folder_job(NoServer(), params, workdir=str(workdir))  # type: ignore[arg-type]


def test_the_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleus_models.cli_support import log_level

    monkeypatch.setenv("NUCLEUS_LOG_LEVEL", "debug")
    assert log_level() == "DEBUG"
    monkeypatch.delenv("NUCLEUS_LOG_LEVEL")
    assert log_level("INFO") == "INFO"
    monkeypatch.setenv("NUCLEUS_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as exc:
        log_level()
    assert exc.value.code == 2


@pytest.mark.parametrize("retries", ["-1", "-5", "two"])
def test_a_negative_number_of_retries_is_refused(retries: str) -> None:
    """--retries -1 was taken as one try, silently (max(1, n))."""
    res = _cron(
        "folder-job", "--api-url", "http://127.0.0.1:9/api/v1", "--folder", "x",
        "--retries", retries,
    )  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "--retries" in lines[0], lines[0]
    assert "0 or more" in lines[0], lines[0]


@pytest.mark.parametrize(
    ("retries", "tries"), [(["--retries", "0"], 1), (["--retries", "2"], 3), ([], 5)]
)
def test_retries_are_after_the_first_try(
    retries: list[str], tries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--retries 0 tries each request once, as curl's --retry 0; --retries 1
    was one try too (the value was the number of tries, clamped to 1)."""
    from nucleus_models.dsa import __main__ as cron
    from nucleus_models.dsa import client
    from nucleus_models.errors import NucleusModelsError

    seen = []

    def refuse(url: str, token: str | None, *, retry: Any) -> None:
        seen.append(retry.attempts)
        raise NucleusModelsError("stop here")

    monkeypatch.setattr(client, "connect", refuse)
    monkeypatch.setenv("GIRDER_TOKEN", TOKEN)
    argv = ["folder-job", "--api-url", "http://127.0.0.1:9/api/v1", "--folder", "x", *retries]
    with pytest.raises(SystemExit):
        cron.main(argv)
    assert seen == [tries]


def test_a_rate_limited_request_429_is_retried(server: str) -> None:
    """A proxy in front of DSA answering 429 (too many requests) is waited
    out, not taken for a failed slide."""
    sleeps: list[float] = []
    assert _client(server, sleeps).get("ratelimited") == {"n": 2}
    assert len(sleeps) == 1


class _Items:
    """A client whose folder lists ``items`` (the folder job's unit fakes)."""

    def __init__(self, items: list[dict[str, Any]], access: int = 2):
        self.items, self.access = items, access

    def listItem(self, folder_id: str) -> list[dict[str, Any]]:  # noqa: N802
        return self.items

    def get(self, path: str) -> dict[str, Any]:
        return {"_id": "F", "name": "slides", "_accessLevel": self.access}


def test_an_item_still_being_converted_is_not_analysed_and_no_slide_is_skipped_wrongly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An item whose conversion to a large image is running is listed as not
    analysed (not a failed slide); a slide is skipped only when its record is
    done with these parameters, and a second annotation of the key is removed."""
    from nucleus_models.dsa import folder_job

    items = [
        {"_id": "b", "name": "b.svs", "largeImage": {"fileId": "f2"}},
        {"_id": "a", "name": "a.svs", "largeImage": {"jobId": "j", "originalId": "f1"}},
    ]
    large, others = folder_job._large_images(_Items(items), "F")  # type: ignore[arg-type]
    assert [i["_id"] for i in large] == ["b"]
    assert [(o.item_id, o.status) for o in others] == [("a", "not_analysed")]
    records: dict[str, Any] = {}
    anns = [{"_id": "A1"}, {"_id": "A2"}]
    deduped: list[str] = []
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: records.get(i))
    monkeypatch.setattr(folder_job, "find_annotations", lambda c, i, k: anns)
    monkeypatch.setattr(folder_job, "dedupe", lambda c, i, k, keep: deduped.append(keep))
    item = large[0]
    records["b"] = {"status": "failed", "params_hash": "h", "annotation_id": "A2"}
    assert folder_job._done_record(None, item, "K", "h") is None  # type: ignore[arg-type]
    records["b"] = {"status": "done", "params_hash": "h", "annotation_id": "A2"}
    assert folder_job._done_record(None, item, "K", "other") is None  # type: ignore[arg-type]
    assert folder_job._done_record(None, item, "K", "h") == records["b"]  # type: ignore[arg-type]
    assert deduped == ["A2"]  # the stray copy A1 goes, the recorded one stays


def test_a_failure_keeps_the_done_record_and_the_summary_shows_zero_nuclei(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A later failure of a done slide is noted beside its result (the result
    and its annotation stay named); a slide with no nuclei shows 0, not blank."""
    from nucleus_models.dsa import folder_job

    done = {"status": "done", "annotation_id": "A", "params_hash": "h"}
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: done)
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: written.append(r))
    item = {"_id": "i", "name": "a.svs"}
    rec = folder_job._record_failure(None, item, "K", "h2", "boom")  # type: ignore[arg-type]
    assert rec == written[0] and rec is not None
    assert rec["status"] == "done" and rec["annotation_id"] == "A"
    assert rec["last_failure"]["error"] == "boom"
    params = FolderJobParams(inputFolder="F")
    outcomes = [folder_job.ItemOutcome("i", "white.svs", "done", nuclei_count=0)]
    rows = list(
        csv.DictReader(io.StringIO(folder_job._summary_csv(outcomes, params, "h").decode()))
    )
    assert rows[0]["nuclei_count"] == "0"


def test_few_nuclei_in_a_large_region_are_not_written_as_zero_per_mm2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nuclei_per_mm2 was rounded to 2 decimals: 1 nucleus in a 400 mm^2
    region (20000 x 20000 px at 1 um/px) read 0.0 in the scores and the
    summary CSV; it keeps 4 significant figures, and no nuclei stay 0."""
    from types import SimpleNamespace

    from nucleus_models import detection
    from nucleus_models.dsa import folder_job

    def fake_result(count: int) -> Any:
        prov = {"nuclei_count": count, "class_counts": {"nucleus": count}}
        return SimpleNamespace(
            provenance=lambda: prov, region=(0, 0, 20000, 20000), slide={"mpp": 1.0}
        )

    monkeypatch.setattr(detection, "annotation_options", lambda r: {"name": "N", "description": ""})
    params = FolderJobParams(inputFolder="F")
    rates = []
    for count in (1, 0, 123456):
        monkeypatch.setattr(detection, "detect_nuclei", lambda *a, n=count, **k: fake_result(n))
        out = folder_job._run_detection(params, "s.svs", "/nonexistent", lambda f: None, print)
        rates.append(out.scores["nuclei_per_mm2"])
    assert rates == [0.0025, 0.0, 308.64]
    outcomes = [
        folder_job.ItemOutcome("i", "big.svs", "done", nuclei_count=1, scores={"nuclei_per_mm2": r})
        for r in rates
    ]
    rows = list(
        csv.DictReader(io.StringIO(folder_job._summary_csv(outcomes, params, "h").decode()))
    )
    assert [float(r["nuclei_per_mm2"]) for r in rows] == rates


def test_a_read_only_token_is_refused_before_any_slide(monkeypatch: pytest.MonkeyPatch) -> None:
    from nucleus_models.dsa import folder_job

    client = _Items([{"_id": "b", "name": "b.svs", "largeImage": {"fileId": "f"}}], access=0)
    with pytest.raises(folder_job.DSAError, match="read access only"):
        folder_job.run_folder_job(client, FolderJobParams(inputFolder="F"))  # type: ignore[arg-type]


class _NoLease:
    def check(self) -> bool:
        return False


def test_bad_slides_do_not_stop_the_job_and_force_redoes_done_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slides that fail for themselves (not an unanswered server) never stop
    the job, however many in a row; --force redoes a slide that is done."""
    from nucleus_models.dsa import folder_job
    from nucleus_models.errors import NucleusModelsError

    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: None)
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: r)
    monkeypatch.setattr(folder_job, "find_annotations", lambda c, i, k: [])
    monkeypatch.setattr(folder_job, "dedupe", lambda *a, **k: [])
    done = {"status": "done", "annotation_id": "A"}
    monkeypatch.setattr(folder_job, "_done_record", lambda c, i, k, h: done)

    def bad(client: Any, params: Any, item: dict[str, Any], *rest: Any) -> Any:
        raise NucleusModelsError(f"{item['name']}: cannot be read")

    monkeypatch.setattr(folder_job, "_process", bad)
    items = [{"_id": str(i), "name": f"{i}.svs"} for i in range(4)]
    force = FolderJobParams(inputFolder="F", force=True)
    folder = {"name": "slides"}
    out = folder_job._run_items(None, force, folder, items, _NoLease(), None, None)  # type: ignore[arg-type]
    assert [o.status for o in out] == ["failed"] * 4


def test_the_cron_exits_1_for_failed_slides_only_with_strict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nucleus_models.dsa import __main__ as cron
    from nucleus_models.dsa import client, folder_job

    failed = [folder_job.ItemOutcome("i", "a.svs", "failed", error="boom")]
    monkeypatch.setattr(client, "connect", lambda *a, **k: None)
    monkeypatch.setattr(folder_job, "run_folder_job", lambda *a, **k: failed)
    args = ["folder-job", "--api-url", "http://127.0.0.1:9/api/v1", "--folder", "F"]
    assert cron.main(args) == 0
    assert cron.main([*args, "--strict"]) == 1


def test_a_live_lease_is_renewed_well_before_it_goes_stale() -> None:
    """A run whose heartbeat came less often than a lease goes stale would
    be taken over while alive, and its slides analysed twice at once."""
    from nucleus_models.dsa import lease

    assert lease.HEARTBEAT_EVERY_S * 3 <= lease.STALE_AFTER_S


def test_a_download_cut_off_mid_transfer_is_retried_whole(
    server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide's download whose connection drops mid-transfer is tried again
    from the start under the retry policy, saying so; what ends in place is
    the whole file, and no partial one stays beside it."""
    sleeps: list[float] = []
    dest = tmp_path / "slide.svs"
    with caplog.at_level(logging.WARNING, logger="nucleus_models.dsa.client"):
        assert _client(server, sleeps).download_file("cut2", str(dest)) == str(dest)
    assert dest.read_bytes() == SLIDE and list(tmp_path.iterdir()) == [dest]
    assert _Handler.counts["file/cut2/download"] == 3 and len(sleeps) == 2
    retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retried) == 2, retried
    assert f"the connection dropped mid-download, after {CUT_AT} bytes; retry 1/3" in retried[0]


def test_a_download_without_a_length_is_checked_against_the_file_size(
    server: str, tmp_path: Path
) -> None:
    """An answer without a Content-Length ends where the connection closes:
    cut off, it looked complete, and the slide was analysed from a truncated
    file. Checked against the file's size in Girder, it is retried."""
    sleeps: list[float] = []
    dest = tmp_path / "slide.svs"
    _client(server, sleeps).download_file("nolength1", str(dest), size=len(SLIDE))
    assert dest.read_bytes() == SLIDE and len(sleeps) == 1
    assert list(tmp_path.iterdir()) == [dest]


def test_a_download_that_keeps_failing_leaves_no_partial_file(server: str, tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(GirderUnavailable) as info:
        _client(server, sleeps, attempts=3).download_file(
            "cutall", str(tmp_path / "slide.svs"), size=len(SLIDE)
        )
    assert _Handler.counts["file/cutall/download"] == 3 and len(sleeps) == 2
    msg = str(info.value)
    assert "\n" not in msg and "failed 3 time(s) on GET file/cutall/download" in msg
    assert f"dropped mid-download, after {CUT_AT} of {len(SLIDE)} bytes" in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_a_download_longer_than_the_file_is_not_taken(server: str, tmp_path: Path) -> None:
    """An answer longer than the file's size in Girder (the file replaced
    under the job) is not analysed as that file: retried, then one line."""
    sleeps: list[float] = []
    with pytest.raises(GirderUnavailable) as info:
        _client(server, sleeps, attempts=2).download_file(
            "cut0", str(tmp_path / "slide.svs"), size=len(SLIDE) - 1
        )
    assert f"the download gave {len(SLIDE)} bytes, the file has {len(SLIDE) - 1}" in str(info.value)
    assert list(tmp_path.iterdir()) == [] and len(sleeps) == 1


def test_a_download_that_timed_out_midway_says_so() -> None:
    """requests reports a read time-out mid-body as a ConnectionError
    wrapping urllib3's ReadTimeoutError: the message says it timed out, not
    that the connection dropped (a slow server, not a broken network)."""
    import requests
    import urllib3

    from nucleus_models.dsa.client import IncompleteDownload

    slow = requests.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/x", "timed out"))
    assert str(IncompleteDownload(5, 10, slow)) == "timed out mid-download, after 5 of 10 bytes"
    dropped = requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection broken"))
    assert "the connection dropped mid-download, after 5 bytes" in str(
        IncompleteDownload(5, None, dropped)
    )


def test_an_answer_cut_off_mid_body_is_retried(server: str) -> None:
    """A JSON answer whose connection drops mid-body was a one-line error at
    once (requests' ChunkedEncodingError was not taken for a dropped connection)."""
    sleeps: list[float] = []
    assert _client(server, sleeps).get("cutjson") == {"n": 2}
    assert len(sleeps) == 1


def _analysis_stub(seen: list[bytes]) -> Any:
    """An analysis that keeps the bytes of the slide it is given."""
    from nucleus_models.dsa.annotations import BatchedDocument
    from nucleus_models.dsa.folder_job import AnalysisOutput

    def run(params: Any, slide: str, workdir: str, *rest: Any) -> AnalysisOutput:
        seen.append(Path(slide).read_bytes())
        doc = BatchedDocument(name="Nuclei (stub)", batches=lambda: [])
        return AnalysisOutput(document=doc, scores={"nuclei_count": 0}, provenance={})

    return run


def _quiet_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder job's records and pushes stubbed out (every push stores "NEW")."""
    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.annotations import PushResult

    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: None)
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: None)
    monkeypatch.setattr(folder_job, "push_annotation", lambda *a, **k: PushResult("NEW", 0))


def test_the_folder_job_analyses_whole_downloads_only(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slides whose downloads drop mid-transfer (with or without a
    Content-Length) are analysed from the whole file; one that keeps
    dropping fails with a one-line reason, is never analysed, and leaves
    nothing in the workdir."""
    from nucleus_models.dsa import folder_job

    _quiet_ledger(monkeypatch)
    monkeypatch.setattr(folder_job, "find_annotations", lambda *a, **k: [])
    seen: list[bytes] = []
    monkeypatch.setitem(folder_job.ANALYSES, "NucleusDetection", _analysis_stub(seen))
    items = [
        {"_id": f"i{k}", "name": f"{k}.svs", "folderId": "F", "largeImage": {"fileId": fid}}
        for k, fid in enumerate(["cut1", "nolength2", "cutall"])
    ]
    work = tmp_path / "work"
    work.mkdir()
    client = _client(server, [], attempts=3)
    params = FolderJobParams(inputFolder="F")
    out = folder_job._run_items(client, params, {"name": "F"}, items, _NoLease(), None, str(work))  # type: ignore[arg-type]
    assert seen == [SLIDE, SLIDE]
    assert [o.status for o in out] == ["done", "done", "failed"]
    assert "\n" not in out[2].error and "mid-download" in out[2].error, out[2].error
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_a_retried_write_sends_its_whole_body_again(server: str, method: str) -> None:
    """A body read to its end by the try that got a 503 is rewound: the
    retry does not send an empty one."""
    payload = b"x" * 5000 + b"end"
    _client(server, []).sendRestRequest(method, "thing", data=io.BytesIO(payload))
    assert _Handler.bodies["thing"] == [payload, payload]


def test_a_retried_upload_chunk_is_sent_whole_again(server: str) -> None:
    """A chunked upload (a payload over ``MAX_CHUNK_SIZE``) POSTs each chunk
    from a BytesIO; its retry after a 503 sends the chunk again, not nothing."""
    payload = b"item_id,status\n" + b"i,done\n" * 500
    client = _client(server, [])
    client.MAX_CHUNK_SIZE = len(payload) - 7
    client.upload_bytes_to_item("I", "summary.csv", payload, "text/csv")
    first = payload[: client.MAX_CHUNK_SIZE]
    assert _Handler.bodies["file/chunk"] == [first, first, payload[-7:]]


class _Uploads(_JSONHandler):
    """Girder's chunked upload, as Girder does it: ``POST file`` starts an
    upload, ``POST file/chunk`` must give the offset Girder has, the last
    chunk makes the file (and ends the upload), ``GET file/offset`` and
    ``DELETE file/upload/{id}``. ``faults`` says what the successive chunk
    POSTs get: ``503``, ``408``, ``429`` (nothing stored), ``403``, ``lost``
    (stored, the answer lost), ``ok``; ``init403``: the upload is refused."""

    faults: list[str] = []
    uploads: dict[str, dict[str, Any]] = {}
    files: list[dict[str, Any]] = []
    calls: list[str] = []
    #: what the successive ``POST file`` get: ``lost`` (acted on, the answer
    #: lost), ``500`` or ``504`` (the upload started, then Girder failed or
    #: the proxy stopped waiting), ``ok``
    starts: list[str] = []
    admin = True  # whether the token may list and clear system/uploads

    def _route(self) -> tuple[str, dict[str, str]]:
        from urllib.parse import parse_qsl, urlsplit

        url = urlsplit(self.path)
        path = url.path.removeprefix("/api/v1/")
        self.calls.append(f"{self.command} {path}")
        return path, dict(parse_qsl(url.query))

    def do_POST(self) -> None:  # noqa: N802
        path, q = self._route()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "file":
            if "init403" in self.faults:
                self._send(403, {"message": "Write access denied for folder.", "type": "access"})
                return
            uid = f"u{len(self.calls)}"
            self.uploads[uid] = {"_id": uid, "received": 0, "size": int(q["size"]), "data": b""}
            self.uploads[uid].update(
                name=q["name"],
                created=f"2030-01-01T00:00:{len(self.calls):02d}.123456+00:00",
                userId="me",
                parentId=q["parentId"],
            )
            start = self.starts.pop(0) if self.starts else "ok"
            if start in ("500", "504"):  # (504: a proxy gave up waiting on Girder)
                self._send(int(start), {"message": "injected", "type": "internal"})
                return
            if body and self.headers.get("Content-Type") == "application/octet-stream":
                # Girder takes a body that is not a form as the upload's first chunk
                answer = self._chunk(self.uploads[uid], body)
            else:
                answer = {k: v for k, v in self.uploads[uid].items() if k != "data"}
            if start == "lost":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(200, answer)
            return
        up = self.uploads.get(q["uploadId"])
        if up is None:
            self._send(400, {"message": f"Invalid upload id ({q['uploadId']}).", "type": "rest"})
            return
        if up["received"] != int(q["offset"]):
            msg = (
                f"Server has received {up['received']} bytes, but client sent offset {q['offset']}."
            )
            self._send(400, {"message": msg, "type": "rest"})
            return
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault in ("503", "403", "408", "429"):
            self._send(int(fault), {"message": "injected", "type": "rest"})
            return
        answer = self._chunk(up, body)
        if fault == "lost":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(200, answer)

    def _chunk(self, up: dict[str, Any], body: bytes) -> dict[str, Any]:
        """Girder's handling of a chunk: the upload, or the file it made."""
        up["data"] += body
        up["received"] += len(body)
        answer = {k: v for k, v in up.items() if k != "data"}
        if up["received"] == up["size"]:  # the last chunk: the file is made
            del self.uploads[up["_id"]]
            n = len(self.files)
            answer = {"_id": f"f{n}", "name": up["name"], "size": up["size"], "data": up["data"]}
            # (Girder's clock: the same second as the upload's start, later, in ms)
            answer["created"] = up["created"][:20] + f"{900 + n:03d}000+00:00"
            self.files.append(answer)
            answer = {k: v for k, v in answer.items() if k != "data"}
        return answer

    def do_GET(self) -> None:  # noqa: N802
        path, q = self._route()
        if path == "file/offset" and q["uploadId"] in self.uploads:
            self._send(200, {"offset": self.uploads[q["uploadId"]]["received"]})
        elif path == "item/I/files":
            self._send(200, [{k: v for k, v in f.items() if k != "data"} for f in self.files])
        elif path == "user/me":
            self._send(200, {"_id": "me", "login": "ada", "admin": self.admin})
        elif path == "system/uploads" and not self.admin:
            self._send(403, {"message": "Administrator access required.", "type": "access"})
        elif path == "system/uploads":
            ups = [
                {k: v for k, v in u.items() if k != "data"}
                for u in self.uploads.values()
                if (u["parentId"], u["userId"]) == (q.get("parentId"), q.get("userId"))
            ]
            self._send(200, ups)
        else:
            self._send(400, {"message": "Invalid upload id.", "type": "rest"})

    def do_DELETE(self) -> None:  # noqa: N802
        path, _ = self._route()
        if self.uploads.pop(path.removeprefix("file/upload/"), None) is None:
            self._send(400, {"message": "Invalid upload id.", "type": "rest"})
        else:
            self._send(200, {"message": "Upload canceled."})


@pytest.fixture()
def uploads() -> Iterator[str]:
    _Uploads.faults, _Uploads.uploads, _Uploads.files, _Uploads.calls = [], {}, [], []
    _Uploads.starts, _Uploads.admin = [], True
    yield from _serving(_Uploads)


#: three chunks of 1000 bytes and one of 500 (``MAX_CHUNK_SIZE`` 1000)
PAYLOAD = bytes(range(250)) * 14


def _upload(url: str, sleeps: list[float], faults: list[str]) -> Any:
    _Uploads.faults = faults
    client = _client(url, sleeps)
    client.MAX_CHUNK_SIZE = 1000
    return client.upload_bytes_to_item("I", "summary.csv", PAYLOAD, "text/csv")


@pytest.mark.parametrize("where", ["upload", "chunk"])
def test_an_upload_refused_fails_at_once_and_is_cancelled(uploads: str, where: str) -> None:
    """A 403 (starting the upload, or on a chunk) cannot succeed: one try,
    no back-off, the one-line error; a started upload is cancelled."""
    sleeps: list[float] = []
    faults = ["init403"] if where == "upload" else ["ok", "403"]
    with pytest.raises(GirderRequestError, match="HTTP 403") as info:
        _upload(uploads, sleeps, faults)
    assert info.value.status == 403 and "\n" not in str(info.value) and not sleeps
    assert _Uploads.calls.count("POST file") == 1 and not _Uploads.uploads and not _Uploads.files
    assert _Uploads.calls.count("POST file/chunk") == (0 if where == "upload" else 2)


def test_an_upload_chunk_failing_with_5xx_is_tried_under_the_policy_once(uploads: str) -> None:
    """A chunk that keeps getting a 503 is sent ``attempts`` times in all
    (not attempts squared, the whole upload again each time), then the
    upload is cancelled in Girder and the error is one line."""
    sleeps: list[float] = []
    with pytest.raises(GirderUnavailable, match="failed 4 time") as info:
        _upload(uploads, sleeps, ["ok"] + ["503"] * 50)
    assert "\n" not in str(info.value) and len(sleeps) == 3
    assert _Uploads.calls.count("POST file") == 1
    assert _Uploads.calls.count("POST file/chunk") == 1 + 4
    assert not _Uploads.uploads and not _Uploads.files  # cancelled: nothing left behind


@pytest.mark.parametrize("lost", [0, 1, 3], ids=["first", "middle", "last"])
def test_an_upload_chunk_whose_answer_was_lost_is_resumed(uploads: str, lost: int) -> None:
    """Girder stored the chunk but its answer was lost, so the chunk's retry
    is refused (wrong offset): the upload goes on from Girder's offset, or,
    after the last chunk, gives the file Girder made. One upload, one file
    with the payload, nothing left unfinished."""
    sleeps: list[float] = []
    old = {"_id": "old", "name": "summary.csv", "size": len(PAYLOAD), "data": b"x" * len(PAYLOAD)}
    _Uploads.files.append({**old, "created": "2029-12-31T23:59:59.999000+00:00"})
    new = _upload(uploads, sleeps, ["ok"] * lost + ["lost"])
    assert _Uploads.calls.count("POST file") == 1
    (f,) = _Uploads.files[1:]  # not the item's older file of that name and size
    assert f["data"] == PAYLOAD and new["_id"] == f["_id"] and new["size"] == len(PAYLOAD)
    assert not _Uploads.uploads
    assert _Uploads.calls.count("POST file/chunk") == 4 + 1  # the lost one's retry, refused


@pytest.mark.parametrize("start", ["lost", "500"])
def test_an_upload_whose_start_went_unanswered_leaves_no_unfinished_upload(
    uploads: str, start: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The summary CSV (a payload of one chunk) whose ``POST file`` was acted
    on by Girder but answered with nothing (``lost``) or a 500 once the upload
    had started: it used to be started again, the first upload left
    unfinished in Girder for an admin to clear. One file with the payload,
    no unfinished upload, no second file, no warning of one."""
    _Uploads.starts = [start]
    client = _client(uploads, [])
    with caplog.at_level(logging.WARNING):
        new = client.upload_bytes_to_item("I", "summary.csv", PAYLOAD, "text/csv")
    (f,) = _Uploads.files
    assert f["data"] == PAYLOAD and new["_id"] == f["_id"] and not _Uploads.uploads
    assert _Uploads.calls.count("POST file") == (1 if start == "lost" else 2)
    assert not [r for r in caplog.records if "unfinished" in r.getMessage()]


@pytest.mark.parametrize("start", ["lost", "500", "504"])
def test_an_unanswered_upload_start_is_not_taken_for_the_items_older_file(
    uploads: str, start: str
) -> None:
    """The folder job's summary item holds the last run's CSV, of the same
    name and (all slides skipped) the same size. A lost answer or a 500 or
    504 to the new one's ``POST file``: the file looked for before trying
    again is one the item did not hold before (the older one taken: the
    upload "done", the stale summary kept and the new one never sent); the
    upload a 500 or 504 left started is cancelled."""
    old = {"_id": "old", "name": "summary.csv", "size": len(PAYLOAD), "data": b"x" * len(PAYLOAD)}
    _Uploads.files.append({**old, "created": "2029-12-31T23:59:59.999000+00:00"})
    _Uploads.starts = [start]
    new = _client(uploads, []).upload_bytes_to_item("I", "summary.csv", PAYLOAD, "text/csv")
    older, f = _Uploads.files
    assert older["_id"] == "old" and f["data"] == PAYLOAD and new["_id"] == f["_id"]
    assert not _Uploads.uploads


def test_a_lost_answer_to_a_file_made_warns_of_no_unfinished_upload(
    uploads: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The summary CSV's ``POST file`` made the file, its answer lost, under
    a token that may not list unfinished uploads: the file found made ended
    its upload, so there is nothing an admin may have to clear and no
    warning says there may be."""
    _Uploads.starts, _Uploads.admin = ["lost"], False
    with caplog.at_level(logging.WARNING):
        new = _client(uploads, []).upload_bytes_to_item("I", "summary.csv", PAYLOAD, "text/csv")
    (f,) = _Uploads.files
    assert new["_id"] == f["_id"] and f["data"] == PAYLOAD and not _Uploads.uploads
    assert not [r for r in caplog.records if "unfinished" in r.getMessage()]


@pytest.mark.parametrize("admin", [True, False], ids=["admin", "user"])
def test_a_chunked_upload_whose_start_went_unanswered_is_cleared_or_named(
    uploads: str, admin: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked upload whose first ``POST file`` started an upload in Girder
    but its answer was lost: the retry starts another and completes it; the
    first, whose id this side never learnt, is found among this user's
    unfinished uploads to the item and cancelled (an admin's token), or one
    warning line says what an admin may have to clear."""
    _Uploads.starts, _Uploads.admin = ["lost"], admin
    with caplog.at_level(logging.WARNING):
        new = _upload(uploads, [], [])
    assert [f["_id"] for f in _Uploads.files] == [new["_id"]]
    assert _Uploads.files[0]["data"] == PAYLOAD and _Uploads.calls.count("POST file") == 2
    warned = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    if admin:
        assert not _Uploads.uploads and not warned
    else:
        (orphan,) = _Uploads.uploads  # listing it needs an admin: said in one line
        (line,) = warned
        assert "unfinished upload of summary.csv in item I" in line and "\n" not in line
        assert "needs an admin" in line and "DELETE system/uploads?parentId=I" in line


@pytest.mark.parametrize("status", ["408", "429"])
def test_an_upload_chunk_timed_out_or_rate_limited_is_retried(uploads: str, status: str) -> None:
    """408 (a proxy's request time-out) and 429 say "try again", unlike the
    rest of 4xx: the chunk is sent again after a back-off and the upload
    completes."""
    sleeps: list[float] = []
    new = _upload(uploads, sleeps, ["ok", status])
    (f,) = _Uploads.files
    assert f["data"] == PAYLOAD and new["_id"] == f["_id"] and len(sleeps) == 1
    assert _Uploads.calls.count("POST file/chunk") == 4 + 1


def test_a_retried_push_uploads_its_whole_document_again(server: str, tmp_path: Path) -> None:
    """A push of a document written to a file (a slide's nuclei, a batch at
    a time) whose first POST got a 503 sends the whole file again."""
    from nucleus_models.dsa import BatchedDocument, push_annotation

    els = [{"type": "point", "center": [float(i), 2.0, 0]} for i in range(300)]
    doc = BatchedDocument.from_document({"name": "Nuclei (test)", "elements": els}, 50)
    res = push_annotation(_client(server, []), "I", doc, analysis_key="K", workdir=str(tmp_path))
    first, second = _Handler.bodies["annotation"]
    assert first == second and len(first) == res.upload_bytes > 5000
    assert res.element_count == 300 and res.attempts == 2


class _Annotations:
    """A client holding an item's annotations (listed, deleted) and a slide."""

    def __init__(self, anns: list[dict[str, Any]]):
        self.anns, self.deleted = anns, []

    def get(self, path: str, parameters: Any = None) -> Any:
        if path == "annotation":
            return [a for a in self.anns if a["_id"] not in self.deleted]
        return {"_id": path, "name": "case 1.svs", "size": 4}

    def sendRestRequest(self, method: str, path: str, *a: Any, **k: Any) -> None:  # noqa: N802
        assert method == "DELETE" and path.startswith("annotation/")
        self.deleted.append(path.removeprefix("annotation/"))

    def download_file(self, file_id: str, dest: str, *, size: int | None = None) -> str:
        Path(dest).write_bytes(b"tiff")
        return dest


def _ann(ann_id: str, name: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {"_id": ann_id, "annotation": {"name": name, "attributes": attributes}}


_CLI_MADE = {"software": "nucleus-models", "params": {}}  # NucleusDetection's .anot: no key


def test_legacy_annotations_are_found_by_name_and_software_only() -> None:
    """An annotation NucleusDetection wrote (our software, no key) is the
    analysis's own when it has the same name; no other is."""
    from nucleus_models.dsa.annotations import find_annotations

    client = _Annotations(
        [
            _ann("cli", "Nuclei (stub)", _CLI_MADE),
            _ann("other-model", "Nuclei (classical-he)", _CLI_MADE),
            _ann("by-hand", "Nuclei (stub)", {}),
            _ann("someone-else", "Nuclei (stub)", {"software": "qupath"}),
            _ann("keyed", "Nuclei (stub)", {**_CLI_MADE, "nucleus_models": {"analysis_key": "X"}}),
            _ann("ours", "Other", {**_CLI_MADE, "nucleus_models": {"analysis_key": "K"}}),
            {"_id": "nameless", "annotation": {"attributes": _CLI_MADE}},
        ]
    )
    ids = [a["_id"] for a in find_annotations(client, "I", "K", legacy_name="Nuclei (stub)")]  # type: ignore[arg-type]
    assert ids == ["cli", "ours"]
    assert [a["_id"] for a in find_annotations(client, "I", "K")] == ["ours"]  # type: ignore[arg-type]


def _run_one(client: Any, params: FolderJobParams, item: dict[str, Any], work: Path) -> Any:
    """The folder job on one item of folder "F", its lease held: its outcome."""
    from nucleus_models.dsa import folder_job

    (outcome,) = folder_job._run_items(
        client, params, {"name": "F"}, [item], _NoLease(), None, str(work)
    )  # type: ignore[arg-type]
    return outcome


@pytest.mark.parametrize("analysis_key", ["", "batch-2026"])
def test_the_folder_job_replaces_the_cli_made_annotation_of_its_name_under_the_default_key(
    analysis_key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the default key, the annotation NucleusDetection made from
    HistomicsUI under the same name is replaced (removed once the new one is
    recorded); a key of the user's own keeps it. Others are kept either way."""
    from nucleus_models.dsa import folder_job

    _quiet_ledger(monkeypatch)
    monkeypatch.setitem(folder_job.ANALYSES, "NucleusDetection", _analysis_stub([]))
    client = _Annotations(
        [
            _ann("cli", "Nuclei (stub)", _CLI_MADE),
            _ann("other-model", "Nuclei (classical-he)", _CLI_MADE),
            _ann("by-hand", "Nuclei (stub)", {}),
        ]
    )
    item = {"_id": "I", "name": "case 1.svs", "folderId": "F", "largeImage": {"fileId": "f"}}
    params = FolderJobParams(inputFolder="F", analysis_key=analysis_key)
    outcome = _run_one(client, params, item, tmp_path)
    assert outcome.status == "done" and outcome.annotation_id == "NEW"
    assert client.deleted == ([] if analysis_key else ["cli"])


def test_an_older_annotation_that_cannot_be_removed_leaves_the_item_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The new annotation is recorded, then the older one cannot be removed
    (HTTP 403: another user's): the item's record is written back as it was,
    naming the older one, and the new annotation is taken back, so the item
    never holds two; the slide fails with the reason."""
    from nucleus_models.dsa import folder_job

    _quiet_ledger(monkeypatch)
    monkeypatch.setitem(folder_job.ANALYSES, "NucleusDetection", _analysis_stub([]))
    before = {"status": "done", "annotation_id": "OLD", "params_hash": "h0"}
    records: list[dict[str, Any]] = []
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: dict(before))
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: records.append(r))

    def refused(*args: Any, **kwargs: Any) -> list[str]:
        raise GirderRequestError("DELETE annotation/OLD failed: HTTP 403", status=403)

    monkeypatch.setattr(folder_job, "dedupe", refused)
    client = _Annotations([_ann("OLD", "Nuclei (stub)", _CLI_MADE)])
    item = {"_id": "I", "name": "case 1.svs", "folderId": "F", "largeImage": {"fileId": "f"}}
    params = FolderJobParams(inputFolder="F", force=True)
    outcome = _run_one(client, params, item, tmp_path)
    assert outcome.status == "failed" and "403" in outcome.error
    assert records[0]["annotation_id"] == "NEW" and records[1] == before
    assert all(r.get("annotation_id") == "OLD" for r in records[1:]), records  # (+ last_failure)
    assert client.deleted == ["NEW"]


class _FlatSlide(_Annotations):
    """A client whose slide is ``path`` (one level, no pyramid)."""

    def __init__(self, path: Path):
        super().__init__([])
        self.path = path

    def download_file(self, file_id: str, dest: str, *, size: int | None = None) -> str:
        Path(dest).write_bytes(self.path.read_bytes())
        return dest


@pytest.mark.parametrize("logs_as", ["NucleusFolderJob", "cron"])
def test_the_folder_job_log_says_when_it_reads_an_overview_tile_by_tile(
    logs_as: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ~20 s a slide without a pyramid takes before its first tile is
    said in the job's log, naming the slide: the NucleusFolderJob CLI logs
    nucleus_models.dsa at INFO and the rest at WARNING (detection's line,
    logged on its own logger at INFO, was not shown), the cron all at INFO."""
    import tifffile
    from conftest import disk_centres, draw_disks

    from nucleus_models import detection

    monkeypatch.setattr(detection, "OVERVIEW_PX", 256)  # (a 1024 px slide, not 30000)
    img = draw_disks(1024, 1024, disk_centres(1024, 1024, (128,), radius=6.0), 6.0)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, img, tile=(128, 128), photometric="rgb")
    _quiet_ledger(monkeypatch)
    item = {"_id": "I", "name": "flat.tif", "folderId": "F", "largeImage": {"fileId": "f"}}
    params = FolderJobParams(
        inputFolder="F", model="classical-he", input_mpp=0.5, nuclei_annotation_format="point"
    )
    root, dsa = logging.getLogger(), logging.getLogger("nucleus_models.dsa")
    before = root.level, dsa.level
    root.setLevel(logging.INFO if logs_as == "cron" else logging.WARNING)
    dsa.setLevel(logging.NOTSET if logs_as == "cron" else logging.INFO)
    try:
        outcome = _run_one(_FlatSlide(flat), params, item, tmp_path)
    finally:
        root.setLevel(before[0])
        dsa.setLevel(before[1])
    assert outcome.status == "done", outcome.error
    said = [r.getMessage() for r in caplog.records if "overview" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith(
        "item 1/1 'flat.tif': reading the tissue overview from 1024 x 1024 px of the slide"
    )
    assert said[1].startswith("item 1/1 'flat.tif': overview read in ")


class _Girder(_JSONHandler):
    """Girder's annotation routes for one item: ``POST annotation`` stores
    the document (listed without its elements, with ``_elementCount``),
    ``GET annotation`` lists them, ``DELETE annotation/{id}`` removes one (a
    400 for one already gone, as Girder answers; a 403 for one in
    ``refused``). ``plan`` says what the successive POSTs do: ``ok``;
    ``short`` (one element fewer stored); ``lost`` (read, the connection
    dropped unanswered, stored only when :meth:`land` is called); ``slow``
    (stored and answered after ``slow_s``)."""

    anns: list[dict[str, Any]] = []
    plan: list[str] = []
    pending: list[dict[str, Any]] = []
    refused: set[str] = set()
    posts = 0
    slow_s = 0.0

    @classmethod
    def store(cls, doc: dict[str, Any], count: int) -> str:
        ann_id = f"A{len(cls.anns) + 1}-{count}"
        cls.anns.append({"_id": ann_id, "annotation": doc, "_elementCount": count})
        return ann_id

    @classmethod
    def land(cls) -> None:
        """The documents of POSTs whose answers were lost are stored now."""
        while cls.pending:
            doc = cls.pending.pop(0)
            cls.store(doc, len(doc.pop("elements")))

    def do_POST(self) -> None:  # noqa: N802
        type(self).posts += 1
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "lost":
            self.pending.append(doc)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if step == "slow":
            time.sleep(self.slow_s)
        n = len(doc.pop("elements"))
        self._send(200, {"_id": self.store(doc, n - 1 if step == "short" else n)})

    def do_GET(self) -> None:  # noqa: N802
        self._send(200, self.anns)

    def do_DELETE(self) -> None:  # noqa: N802
        ann_id = self.path.split("?")[0].rsplit("/", 1)[1]
        if ann_id in self.refused:
            self._send(403, {"message": "Access denied", "type": "access"})
        elif ann_id not in [a["_id"] for a in self.anns]:
            self._send(400, {"message": f"Invalid annotation id ({ann_id}).", "type": "rest"})
        else:
            type(self).anns = [a for a in self.anns if a["_id"] != ann_id]
            self._send(200, {"message": "Deleted annotation."})


@pytest.fixture()
def girder() -> Iterator[str]:
    _Girder.anns, _Girder.plan, _Girder.pending, _Girder.refused = [], [], [], set()
    _Girder.posts, _Girder.slow_s = 0, 0.0
    yield from _serving(_Girder)


def _points(n: int) -> dict[str, Any]:
    els = [{"type": "point", "center": [float(i), 2.0, 0]} for i in range(n)]
    return {"name": "Nuclei (test)", "elements": els}


def _ids() -> list[str]:
    return [a["_id"] for a in _Girder.anns]


def test_a_push_stored_short_of_its_elements_is_undone(girder: str) -> None:
    """Girder listing fewer elements than were sent (a document cut short on
    the way) is not taken for the analysis: the push is undone and fails."""
    from nucleus_models.dsa import push_annotation

    _Girder.plan = ["short"]
    with pytest.raises(DSAError, match="Girder stored 2 of 3 elements; push undone"):
        push_annotation(_client(girder, []), "I", _points(3), analysis_key="K")
    assert _Girder.anns == []


def test_a_retried_push_stored_twice_leaves_no_copy_when_the_older_cannot_go(
    girder: str,
) -> None:
    """The first POST's answer was lost and its document landed with the
    retry's: two copies. The older annotation of the key is not ours to
    delete (403): the push fails and takes back both copies, leaving the
    item with its older annotation alone, not with a stray copy beside it."""
    from nucleus_models.dsa import push_annotation

    old = {"name": "Nuclei (test)", "attributes": {"nucleus_models": {"analysis_key": "K"}}}
    _Girder.store(old, 3)
    _Girder.refused = {_ids()[0]}
    _Girder.plan = ["lost"]
    client = DSAClient(
        girder, TOKEN, retry=RetryPolicy(attempts=4, backoff=0.2), sleep=lambda s: _Girder.land()
    )
    with pytest.raises(GirderRequestError, match="403"):
        push_annotation(client, "I", _points(3), analysis_key="K")
    assert _Girder.posts == 2 and _ids() == ["A1-3"]


def test_a_lost_post_landing_after_the_push_is_removed_by_it(girder: str) -> None:
    """A POST whose answer was lost lands only after its retry was stored
    and checked: the push looks once more and removes that late copy."""
    from nucleus_models.dsa import push_annotation

    _Girder.plan = ["lost"]
    sleeps: list[float] = []

    def sleep(s: float) -> None:  # the late look: the lost POST lands just before it
        sleeps.append(s)
        if _Girder.anns:
            _Girder.land()

    client = DSAClient(girder, TOKEN, retry=RetryPolicy(attempts=4, backoff=0.2), sleep=sleep)
    res = push_annotation(client, "I", _points(3), analysis_key="K")
    assert res.attempts == 2 and len(sleeps) == 2 and not _Girder.pending
    assert _ids() == [res.annotation_id] and len(res.replaced) == 1


def test_removing_an_annotation_already_gone_is_fine(girder: str) -> None:
    """Two runs sweeping an item at once: the annotation one lists may be
    gone when it deletes it (Girder answers 400); that is done, not an error.
    Any other refusal is."""
    from nucleus_models.dsa.annotations import dedupe, find_annotations

    rec = {"name": "N", "attributes": {"nucleus_models": {"analysis_key": "K"}}}
    keep, gone, other = (_Girder.store(rec, 1) for _ in range(3))
    client = _client(girder, [])
    found = find_annotations(client, "I", "K")
    _Girder.anns = [a for a in _Girder.anns if a["_id"] != gone]  # the other run's delete
    assert dedupe(client, "I", "K", keep, found=found) == [gone, other]
    assert _ids() == [keep]
    _Girder.refused = {keep}
    with pytest.raises(GirderRequestError, match="403"):
        dedupe(client, "I", "K", "none")


def test_a_large_push_is_given_time_in_proportion_to_its_size(girder: str) -> None:
    """Girder validates a document before it answers (~1 MB/s): a 300 kB
    push answered after longer than the read time-out is waited for, not
    timed out and sent again."""
    from nucleus_models.dsa import push_annotation

    _Girder.plan, _Girder.slow_s = ["slow"], 0.8
    res = push_annotation(
        _client(girder, [], read_timeout=0.3), "I", _points(8000), analysis_key="K"
    )
    assert res.upload_bytes > 300_000 and res.attempts == 1
    assert _Girder.posts == 1 and _ids() == [res.annotation_id]


def _sweep_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, at_end: Any, *, fails: bool = False, **kw: Any
) -> tuple[Any, _Annotations, dict[str, Any]]:
    """The folder job on item "I" (its records in the dict returned, its push
    storing "NEW"); ``at_end(client, records)`` is what happens on the
    server once the item is done, before the job's final sweep."""
    from nucleus_models.dsa import folder_job

    _quiet_ledger(monkeypatch)
    params = FolderJobParams(inputFolder="F", **kw)
    mine = {"nucleus_models": {"analysis_key": params.key()}}
    records: dict[str, Any] = {}
    client = _Annotations([])

    item = _stub_one_slide(monkeypatch, client, records, mine, fails)

    def progress(frac: float) -> None:
        if frac == 1.0:
            at_end(client, records, mine)

    (outcome,) = folder_job._run_items(
        client, params, {"name": "F"}, [item], _NoLease(), progress, str(tmp_path)
    )  # type: ignore[arg-type]
    return outcome, client, records


@pytest.mark.parametrize("status", ["done", "skipped"])
def test_the_final_sweep_removes_a_late_copy_of_the_items_annotation(
    status: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A copy of the key's annotation landing after the item was done (a
    push's lost POST, late) is removed by the job's final sweep, for a
    slide analysed and for one skipped as done alike; the recorded one stays."""
    from nucleus_models.dsa import folder_job

    def land(client: _Annotations, records: dict[str, Any], mine: dict[str, Any]) -> None:
        client.anns.append(_ann("LATE", "Nuclei (stub)", mine))

    if status == "skipped":  # done before with these parameters: its annotation is "NEW"
        phash = FolderJobParams(inputFolder="F").params_hash()
        before = {"status": "done", "params_hash": phash, "annotation_id": "NEW"}
        monkeypatch.setattr(folder_job, "_done_record", lambda c, i, k, h: before)
    outcome, client, _ = _sweep_job(monkeypatch, tmp_path, land)
    assert outcome.status == status and outcome.annotation_id == "NEW"
    assert client.deleted == ["LATE"]


def test_the_final_sweep_keeps_the_annotation_a_later_run_recorded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another run of the same key finished the item after this one and
    recorded its own annotation: the sweep keeps that one (and reports it),
    removing this run's, never the one the item's record names."""

    def newer(client: _Annotations, records: dict[str, Any], mine: dict[str, Any]) -> None:
        client.anns.append(_ann("OTHER", "Nuclei (stub)", mine))
        records["I"] = {**records["I"], "annotation_id": "OTHER"}

    outcome, client, records = _sweep_job(monkeypatch, tmp_path, newer)
    assert outcome.annotation_id == "OTHER" == records["I"]["annotation_id"]
    assert client.deleted == ["NEW"]


@pytest.mark.parametrize("fails", [False, True], ids=["done", "failed"])
def test_the_final_sweep_writes_back_a_record_another_write_undid(
    fails: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another job's write of the item's metadata undid this run's record
    (Girder's PUT rewrites the whole document): the sweep writes it again,
    for a slide done and for a slide's failure; an intact one is left alone."""
    written: list[dict[str, Any]] = []

    def undo(client: _Annotations, records: dict[str, Any], mine: dict[str, Any]) -> None:
        written.append(records.pop("I"))

    outcome, client, records = _sweep_job(monkeypatch, tmp_path, undo, fails=fails)
    assert outcome.status == ("failed" if fails else "done")
    assert records["I"] == written[0] and client.deleted == []
    assert records["I"]["status"] == outcome.status
    if fails:
        assert records["I"]["error"] == "case 1.svs: cannot be read"
    else:
        assert records["I"]["annotation_id"] == "NEW"

    def keep(client: _Annotations, records: dict[str, Any], mine: dict[str, Any]) -> None:
        records["I"] = {**records["I"], "seen": True}  # kept by another key's write: intact

    _, _, records = _sweep_job(monkeypatch, tmp_path, keep, fails=fails)
    assert records["I"].get("seen") is True


def _rerun(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ann_ids: list[str],
    record: dict[str, Any] | None,
    *,
    fails: bool = False,
    **kw: Any,
) -> tuple[Any, list[str]]:
    """The folder job run again on item "I", which holds annotations of the
    key ``ann_ids`` (a killed run's pushes among them) and ``record`` (None:
    none); its push stores "NEW". The outcome, and the key's annotations left."""
    from nucleus_models.dsa.annotations import find_annotations

    _quiet_ledger(monkeypatch)
    params = FolderJobParams(inputFolder="F", **kw)
    mine = {"nucleus_models": {"analysis_key": params.key(), "push_id": "p"}}
    client = _Annotations([_ann(a, "Nuclei (stub)", mine) for a in ann_ids])
    records = {"I": record} if record else {}

    item = _stub_one_slide(monkeypatch, client, records, mine, fails)
    outcome = _run_one(client, params, item, tmp_path)
    left = [a["_id"] for a in find_annotations(client, "I", params.key())]  # type: ignore[arg-type]
    return outcome, left


def _done(**kw: Any) -> dict[str, Any]:
    """A done record of "I" naming annotation "OLD", made with ``kw``'s parameters."""
    phash = FolderJobParams(inputFolder="F", **kw).params_hash()
    prov = {"girder": {"file_id": "f"}}
    return {"status": "done", "params_hash": phash, "annotation_id": "OLD", "provenance": prov}


@pytest.mark.parametrize("strays", [1, 2])
def test_the_next_run_removes_a_killed_runs_unrecorded_annotation(
    strays: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run killed (SIGKILL) between a slide's annotation POST and its
    record, or a server that stored a cancelled push after the push stopped
    waiting (> 5 s): the item holds its recorded annotation and one or more
    of the key no record names. The next run with the same parameters skips
    the slide and leaves the recorded one alone."""
    late = [f"LATE{i}" for i in range(strays)]
    outcome, left = _rerun(monkeypatch, tmp_path, ["OLD", *late], _done())
    assert outcome.status == "skipped" and outcome.annotation_id == "OLD"
    assert left == ["OLD"]


@pytest.mark.parametrize("record", ["none", "failed", "other-params"])
def test_the_next_run_leaves_one_annotation_where_none_is_recorded(
    record: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two annotations of the key on an item whose record names neither
    (no record: two runs killed before theirs; a failure recorded; a record
    of other parameters naming one since deleted): the slide is analysed
    again and the run leaves exactly its own."""
    rec = {
        "none": None,
        "failed": {"status": "failed", "error": "x", "params_hash": "h"},
        "other-params": {**_done(model="classical-he"), "annotation_id": "GONE"},
    }[record]
    outcome, left = _rerun(monkeypatch, tmp_path, ["A", "B"], rec)
    assert outcome.status == "done" and outcome.annotation_id == "NEW"
    assert left == ["NEW"]


@pytest.mark.parametrize("how", ["force", "other-params"])
def test_a_slide_failing_again_keeps_only_its_recorded_annotation(
    how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A killed run's unrecorded annotation beside the recorded one, and the
    slide is redone (``force``, or other parameters) but fails this time: the
    item keeps the annotation its record names, alone, not the stray copy
    "until the next run" that succeeds."""
    kw: dict[str, Any] = {"force": True} if how == "force" else {"model": "classical-he"}
    outcome, left = _rerun(monkeypatch, tmp_path, ["OLD", "LATE"], _done(), fails=True, **kw)
    assert outcome.status == "failed" and "cannot be read" in outcome.error
    assert left == ["OLD"]


def test_a_slide_failing_again_whose_recorded_annotation_is_gone_keeps_its_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The record names an annotation since deleted (in HistomicsUI), and the
    slide redone fails: the annotations of the key that are left (a killed
    run's copy) are the slide's only results and stay, not all deleted for
    the sake of one that is not there."""
    record = {**_done(), "annotation_id": "GONE"}
    outcome, left = _rerun(monkeypatch, tmp_path, ["LATE"], record, fails=True, force=True)
    assert outcome.status == "failed" and "cannot be read" in outcome.error
    assert left == ["LATE"]


def test_a_slide_failing_again_whose_failure_went_unrecorded_keeps_its_recorded_annotation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The slide redone fails and its failure cannot be noted (Girder
    refused the metadata write): the final sweep still leaves the
    annotation its done record names alone, the killed run's copy gone."""
    from nucleus_models.dsa import folder_job

    monkeypatch.setattr(folder_job, "_record_failure", lambda *a: None)  # (could not be written)
    outcome, left = _rerun(monkeypatch, tmp_path, ["OLD", "LATE"], _done(), fails=True, force=True)
    assert outcome.status == "failed" and "cannot be read" in outcome.error
    assert left == ["OLD"]


def _stub_one_slide(
    monkeypatch: pytest.MonkeyPatch,
    client: Any,
    records: dict[str, Any],
    mine: dict[str, Any],
    fails: bool,
) -> dict[str, Any]:
    """Stub a folder job's push, records and analysis for one slide, item
    ``I`` (``case 1.svs``): the push adds annotation ``NEW`` with ``mine``
    to ``client.anns``; the analysis raises one line where ``fails``."""
    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.annotations import PushResult
    from nucleus_models.errors import NucleusModelsError

    def push(*a: Any, **k: Any) -> PushResult:
        client.anns.append(_ann("NEW", "Nuclei (stub)", mine))
        return PushResult("NEW", 0)

    def broken(*a: Any) -> Any:
        raise NucleusModelsError("case 1.svs: cannot be read")

    monkeypatch.setattr(folder_job, "push_annotation", push)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: records.get(i))
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: records.update({i: r}))
    analysis = broken if fails else _analysis_stub([])
    monkeypatch.setitem(folder_job.ANALYSES, "NucleusDetection", analysis)
    return {"_id": "I", "name": "case 1.svs", "folderId": "F", "largeImage": {"fileId": "f"}}

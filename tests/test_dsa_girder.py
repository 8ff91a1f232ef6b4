"""nucleus_models.dsa against a real Girder 5 server (large_image + annotation plugins).

The server runs from ``.venv-girder`` (``make setup-girder``; missing = failure)
on 127.0.0.1. Pushes are read back and compared; faults: 500 and lost answers
mid-push, a server that hangs (SIGSTOP/SIGCONT) mid-push and mid-folder-job,
dropped connections, the folder job killed and re-run, a rejected document.
Afterwards every item must hold exactly one annotation per analysis, with
metadata that names it.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import requests
from conftest import disk_centres, draw_disks, write_pyramidal_tiff
from girder_server import (
    GirderServer,
    assert_consistent,
    create_folder,
    summary_rows,
    upload_slide,
)
from PIL import Image

from nucleus_models.dsa import (
    AnnotationRejected,
    BatchedDocument,
    FolderJobParams,
    GirderUnavailable,
    RetryPolicy,
    connect,
    find_annotations,
    push_annotation,
    read_record,
    run_folder_job,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
KEY = "NucleusDetection"
DONE2 = [("cmu.tif", "done"), ("disks0.tif", "done")]


@pytest.fixture(scope="module")
def girder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GirderServer]:
    server = GirderServer(tmp_path_factory.mktemp("girder"))
    try:
        server.start()
        server.setup_admin()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dsa-slides")
    out = {"cmu": SAMPLE}
    for i in range(3):
        c = disk_centres(400, 320, (128,), radius=6.0) + i
        out[f"disks{i}"] = write_pyramidal_tiff(
            root / f"disks{i}.tif", draw_disks(400, 320, c, 6.0), mpp=0.5
        )
    out["white"] = write_pyramidal_tiff(
        root / "white.tif", np.full((256, 256, 3), 250, np.uint8), mpp=0.5
    )
    # bright disks on a dark background: looks like fluorescence
    c = disk_centres(400, 320, (128,), radius=6.0)
    out["dark"] = write_pyramidal_tiff(
        root / "dark.tif", 255 - draw_disks(400, 320, c, 6.0), mpp=0.5
    )
    return out


def _client(girder: GirderServer, **policy: Any) -> Any:
    return connect(girder.api_url, girder.token, retry=RetryPolicy(**policy) if policy else None)


def _folder(
    girder: GirderServer, slides: dict[str, Path], names: list[str], label: str
) -> dict[str, Any]:
    gc = girder.client()
    folder = create_folder(gc, f"{label}-{time.monotonic_ns()}")
    for n in names:
        upload_slide(gc, folder["_id"], slides[n], name=f"{n}.tif")
    return folder


def _item(girder: GirderServer, label: str) -> str:
    folder = _folder(girder, {"cmu": SAMPLE}, ["cmu"], label)
    return str(next(iter(girder.client().listItem(folder["_id"])))["_id"])


def _detect(tmp: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cli", "NucleusDetection", str(SAMPLE), str(tmp / "n.anot")]
    res = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads((tmp / "n.anot").read_text())


# ------------------------------------------------------------------- push
def test_nucleus_detection_pushed_and_read_back(girder: GirderServer, tmp_path: Path) -> None:
    item_id = _item(girder, "readback")
    doc = _detect(tmp_path, "--analysis_roi", "0,0,512,512")
    client = _client(girder)
    res = push_annotation(client, item_id, doc, analysis_key=KEY)
    assert res.element_count == len(doc["elements"]) > 50
    back = client.get(f"annotation/{res.annotation_id}")["annotation"]
    assert back["name"] == doc["name"] and len(back["elements"]) == len(doc["elements"])
    for mine, theirs in zip(doc["elements"], back["elements"], strict=True):
        assert theirs.pop("id")
        assert np.allclose(np.array(theirs.pop("points")), np.array(mine["points"]))
        assert theirs == {k: v for k, v in mine.items() if k != "points"}
    rec = back["attributes"].pop("nucleus_models")
    assert rec["analysis_key"] == KEY and rec["push_id"]
    assert back["attributes"] == doc["attributes"]
    # a HistomicsUI region query returns the elements whose box meets the region
    region = {"left": 100, "top": 100, "right": 300, "bottom": 250}
    got = client.get(f"annotation/{res.annotation_id}", region)["annotation"]["elements"]
    boxes = [np.array(e["points"])[:, :2] for e in doc["elements"]]
    inside = [b for b in boxes if b[:, 0].min() >= 100 and b[:, 0].max() < 300]
    inside = [b for b in inside if b[:, 1].min() >= 100 and b[:, 1].max() < 250]
    assert len(inside) <= len(got) < len(doc["elements"])
    for e in got:
        p = np.array(e["points"])
        assert p[:, 0].max() >= 100 and p[:, 0].min() <= 300
        assert p[:, 1].max() >= 100 and p[:, 1].min() <= 250


def test_fields_read_from_the_server_equal_those_from_files(
    girder: GirderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`nucleus-bench fields --api-url`: a corrected annotation on the server
    gives the same fields, pixel for pixel, as the slide file and the
    annotation downloaded."""
    from test_fields import _document, _labels

    from benchmark.__main__ import main as bench

    item_id = _item(girder, "fields")
    doc = _document(_labels(seed=3))
    gc = girder.client()
    ann = gc.post("annotation", parameters={"itemId": item_id}, json=doc)
    monkeypatch.setenv("GIRDER_TOKEN", girder.token)
    args = ["fields", "--api-url", girder.api_url, "--annotation_id", ann["_id"]]
    assert bench([*args, "--out", str(tmp_path / "server")]) == 0
    assert "1 field(s)" in capsys.readouterr().out
    (tmp_path / "ann.json").write_text(json.dumps(gc.get(f"annotation/{ann['_id']}")))
    files = ["fields", "--slide", str(SAMPLE), "--annotation", str(tmp_path / "ann.json")]
    assert bench([*files, "--out", str(tmp_path / "files")]) == 0
    for sub in ("images", "masks"):
        (a,) = sorted((tmp_path / "server" / sub).iterdir())
        (b,) = sorted((tmp_path / "files" / sub).iterdir())
        assert a.name == b.name.replace("CMU-1-Small-Region-crop", "cmu")
        with Image.open(a) as ia, Image.open(b) as ib:
            assert np.array_equal(np.asarray(ia), np.asarray(ib)), sub
    rec = json.loads((tmp_path / "server" / "fields.json").read_text())["fields"]
    assert [r["slide"] for r in rec.values()] == [f"{girder.api_url}/item/{item_id} (cmu.tif)"]
    assert (tmp_path / "server" / "mpp.txt").read_text().strip() == "0.499"
    # an unknown annotation, and both sources at once: one line, status 2
    assert bench([*args[:3], "--annotation_id", "0" * 24, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "annotation/" in err
    assert bench([*args, *files[1:], "--out", str(tmp_path / "x")]) == 2
    assert "either" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _point_doc(n: int, name: str = "Nuclei (test)", seed: int = 0) -> dict[str, Any]:
    xy = np.random.default_rng(seed).uniform(0, 1000, (n, 2)).round(1).tolist()
    els = [{"type": "point", "center": [x, y, 0], "group": "nucleus"} for x, y in xy]
    return {"name": name, "elements": els, "attributes": {"software": "nucleus-models"}}


def _stored(client: Any, annotation_id: str) -> dict[str, Any]:
    ann = client.get(f"annotation/{annotation_id}")["annotation"]
    for el in ann["elements"]:
        assert el.pop("id")
    assert ann["attributes"]["nucleus_models"].pop("push_id")
    return dict(ann)


def test_batched_document_is_stored_as_the_whole_one(girder: GirderServer, tmp_path: Path) -> None:
    client = _client(girder)
    doc = _point_doc(53, seed=5)
    whole = push_annotation(client, _item(girder, "whole"), doc, analysis_key=KEY)
    batched = push_annotation(
        client,
        _item(girder, "batched"),
        BatchedDocument.from_document(doc, 10),
        analysis_key=KEY,
        workdir=tmp_path,
    )
    assert whole.element_count == batched.element_count == 53
    assert whole.upload_bytes == batched.upload_bytes  # the same body, push ids aside
    assert _stored(client, whole.annotation_id) == _stored(client, batched.annotation_id)
    assert list(tmp_path.iterdir()) == []  # the body file is gone


def test_batched_push_holds_one_batch_in_memory(girder: GirderServer) -> None:
    import tracemalloc

    client = _client(girder)
    n, size = 30_000, 500
    xy = np.random.default_rng(0).uniform(0, 1000, (n, 2)).round(1).tolist()

    def batches() -> Iterator[list[dict[str, Any]]]:
        for a in range(0, n, size):
            yield [{"type": "point", "center": [x, y, 0]} for x, y in xy[a : a + size]]

    doc = BatchedDocument(name="Nuclei (memory)", batches=batches)
    item_id = _item(girder, "memory")
    tracemalloc.start()
    try:
        res = push_annotation(client, item_id, doc, analysis_key=KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a dict push holds the body (upload_bytes) twice, as text and bytes, and the
    # server's answer, every element again with its id, as Python objects (~15x)
    assert res.element_count == n and res.upload_bytes > 1_000_000
    assert peak < res.upload_bytes / 2, (peak, res.upload_bytes)


def test_push_replaces_without_duplicates(girder: GirderServer) -> None:
    item_id = _item(girder, "replace")
    client = _client(girder)
    hand = client.post(
        "annotation", {"itemId": item_id}, json=_point_doc(2, "Nuclei (test)") | {"attributes": {}}
    )
    legacy = client.post(
        "annotation", {"itemId": item_id}, json=_point_doc(3)
    )  # .anot from the CLI
    first = push_annotation(client, item_id, _point_doc(10), analysis_key=KEY)
    assert first.replaced == [legacy["_id"]]
    second = push_annotation(client, item_id, _point_doc(20, seed=1), analysis_key=KEY)
    other = push_annotation(client, item_id, _point_doc(5), analysis_key="Other")
    assert second.replaced == [first.annotation_id] and other.replaced == []
    ids = {a["_id"]: a["_elementCount"] for a in client.get("annotation", {"itemId": item_id})}
    assert ids == {hand["_id"]: 2, second.annotation_id: 20, other.annotation_id: 5}


def test_a_named_key_keeps_the_annotation_nucleus_detection_made(girder: GirderServer) -> None:
    """An annotation NucleusDetection wrote from HistomicsUI (same name, no key)
    is replaced by the default analysis only; a key of the user's own keeps it."""
    item_id = _item(girder, "named-key")
    client = _client(girder)
    by_hand = client.post("annotation", {"itemId": item_id}, json=_point_doc(3))
    batch = push_annotation(
        client, item_id, _point_doc(10), analysis_key="batch-2026", legacy=False
    )
    assert batch.replaced == []
    ids = {a["_id"] for a in client.get("annotation", {"itemId": item_id})}
    assert ids == {by_hand["_id"], batch.annotation_id}


def test_a_replacement_that_fails_takes_the_new_annotation_back(
    girder: GirderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older annotation cannot be removed (e.g. HTTP 403, not ours to delete):
    the push raises and the item keeps only what it had, never two."""
    from nucleus_models.dsa import annotations
    from nucleus_models.dsa.client import GirderRequestError

    item_id = _item(girder, "undo")
    client = _client(girder)
    first = push_annotation(client, item_id, _point_doc(4), analysis_key=KEY)

    def refused(*args: Any, **kwargs: Any) -> list[str]:
        raise GirderRequestError("DELETE annotation failed: HTTP 403", status=403)

    monkeypatch.setattr(annotations, "dedupe", refused)
    with pytest.raises(GirderRequestError, match="403"):
        push_annotation(client, item_id, _point_doc(9), analysis_key=KEY)
    ids = [a["_id"] for a in client.get("annotation", {"itemId": item_id})]
    assert ids == [first.annotation_id]


def test_metadata_is_namespaced(girder: GirderServer) -> None:
    item_id = _item(girder, "meta")
    client = _client(girder)
    client.addMetadataToItem(item_id, {"stain": "HE"})
    write_record(
        client, item_id, KEY, {"status": "done", "scores": {"a.b": 1.0, "nan": float("nan")}}
    )
    write_record(client, item_id, "Other", {"status": "done"})
    meta = client.getItem(item_id)["meta"]
    assert meta["stain"] == "HE" and set(meta["nucleus_models"]) == {KEY, "Other"}
    assert meta["nucleus_models"][KEY]["scores"] == {"a_b": 1.0, "nan": None}


@pytest.mark.parametrize("batched", [False, True], ids=["whole", "batched"])
def test_5xx_and_lost_answers_mid_push_leave_one_annotation(
    girder: GirderServer, batched: bool
) -> None:
    item_id = _item(girder, "faults")
    client = _client(girder, attempts=4, backoff=0.05)
    real_post = client._session.post
    calls: list[str] = []

    def flaky(mode: str) -> Any:
        def post(url: str, *args: Any, **kwargs: Any) -> Any:
            if url.endswith("/annotation") and not calls:
                calls.append(mode)
                if mode.startswith("500"):  # the server fails before storing anything
                    body = kwargs.get("data")
                    if mode == "500 after reading" and hasattr(body, "read"):
                        body.read()  # a retry must send the body again from its start
                    resp = requests.Response()
                    resp.status_code, resp.url = 500, url
                    resp._content = b'{"message": "injected failure", "type": "internal"}'
                    return resp
                real_post(url, *args, **kwargs)  # stored, but the answer is lost
                raise requests.ConnectionError("connection dropped after the request was sent")
            return real_post(url, *args, **kwargs)

        return post

    for mode in ("500", "500 after reading", "lost answer"):
        calls.clear()
        client._session.post = flaky(mode)
        doc = _point_doc(50, seed=len(mode))
        res = push_annotation(
            client,
            item_id,
            BatchedDocument.from_document(doc, 7) if batched else doc,
            analysis_key=KEY,
        )
        assert calls == [mode] and res.element_count == 50
        anns = find_annotations(client, item_id, KEY)
        assert [a["_id"] for a in anns] == [res.annotation_id], mode
    client._session.post = real_post


def test_an_upload_with_lost_answers_or_failing_chunks_leaves_no_unfinished_upload(
    girder: GirderServer, request: pytest.FixtureRequest
) -> None:
    """The summary CSV's upload against Girder itself, in chunks: chunks
    stored whose answers are lost (one mid-upload, the last) make one file
    with the payload; a chunk that keeps failing with 500 fails the upload,
    which is cancelled; a lost answer to the upload's start makes one file.
    Girder is left with no unfinished upload."""
    item_id = _item(girder, "upload")
    client = _client(girder, attempts=3, backoff=0.05)
    client.MAX_CHUNK_SIZE = 1000
    real_post = client._session.post
    payload = b"item_id,status\n" + b"".join(b"i%04d,done\n" % i for i in range(300))  # 3315 B
    faults: dict[str, str] = {}  # chunk offset: what it gets

    def post(url: str, *args: Any, **kwargs: Any) -> Any:
        query = dict(parse_qsl(urlsplit(url).query), **(kwargs.get("params") or {}))
        offset = str(query.get("offset", ""))
        if url.endswith("/file") and faults.get("start") == "lost":
            del faults["start"]
            real_post(url, *args, **kwargs)  # the upload started (or made), the answer lost
            raise requests.ConnectionError("connection dropped after the request was sent")
        if "/file/chunk" in url and faults.get(offset) == "lost":
            del faults[offset]
            real_post(url, *args, **kwargs)  # stored, but the answer is lost
            raise requests.ConnectionError("connection dropped after the request was sent")
        if "/file/chunk" in url and faults.get(offset) == "500":
            resp = requests.Response()
            resp.status_code, resp.url = 500, url
            resp._content = b'{"message": "injected failure", "type": "internal"}'
            return resp
        return real_post(url, *args, **kwargs)

    client._session.post = post
    gc = girder.client()
    min_chunk = {"key": "core.upload_minimum_chunk_size"}
    gc.put("system/setting", parameters={**min_chunk, "value": 0})  # (default: 5 MB)
    request.addfinalizer(lambda: gc.delete("system/setting", parameters=min_chunk))
    for lost in ("1000", "3000"):  # a middle chunk, the last one
        faults.update({lost: "lost"})
        new = client.upload_bytes_to_item(item_id, f"s{lost}.csv", payload, "text/csv")
        assert not faults and new["size"] == len(payload)
        buf = io.BytesIO()
        gc.downloadFile(new["_id"], buf)
        assert buf.getvalue() == payload
    faults.update({"2000": "500"})
    with pytest.raises(GirderUnavailable, match="failed 3 time"):
        client.upload_bytes_to_item(item_id, "s500.csv", payload, "text/csv")
    # the start's answer lost: chunked (an admin's token clears the first
    # upload), and in one request (Girder made the file before answering)
    faults.clear()
    for name, chunk in (("start-chunked.csv", 1000), ("start-whole.csv", 1 << 20)):
        client.MAX_CHUNK_SIZE = chunk
        faults.update({"start": "lost"})
        new = client.upload_bytes_to_item(item_id, name, payload, "text/csv")
        assert not faults and new["size"] == len(payload)
        buf = io.BytesIO()
        gc.downloadFile(new["_id"], buf)
        assert buf.getvalue() == payload
    client._session.post = real_post
    csvs = sorted(f["name"] for f in gc.listFile(item_id) if f["name"].endswith(".csv"))
    assert csvs == ["s1000.csv", "s3000.csv", "start-chunked.csv", "start-whole.csv"]
    assert [u for u in gc.get("system/uploads") if u.get("parentId") == item_id] == []


def test_server_hanging_mid_push(girder: GirderServer) -> None:
    item_id = _item(girder, "hang")
    client = _client(girder, attempts=8, backoff=0.3, read_timeout=1.0, connect_timeout=1.0)
    girder.pause()
    timer = threading.Timer(3.0, girder.resume)
    timer.start()
    try:
        res = push_annotation(client, item_id, _point_doc(200), analysis_key=KEY)
    finally:
        timer.join()
        girder.resume()
    time.sleep(1.0)
    assert res.seconds > 2.5  # it waited the pause out
    assert [a["_id"] for a in find_annotations(client, item_id, KEY)] == [res.annotation_id]


def test_rejected_document_names_the_element_and_stores_nothing(girder: GirderServer) -> None:
    item_id = _item(girder, "reject")
    client = _client(girder)
    good = push_annotation(client, item_id, _point_doc(10), analysis_key=KEY)
    bad = _point_doc(10, seed=3)
    bad["elements"][3]["lineColor"] = "not-a-colour"
    with pytest.raises(AnnotationRejected) as info:
        push_annotation(client, item_id, bad, analysis_key=KEY)
    msg = str(info.value)
    assert "element 3 (point)" in msg and "lineColor" in msg and "not-a-colour" in msg, msg
    with pytest.raises(AnnotationRejected, match=r"element 3 \(point\): lineColor"):
        push_annotation(
            client, item_id, BatchedDocument.from_document(bad, 2), analysis_key=KEY
        )  # 2nd batch
    bad["elements"][3] = {"type": "point", "center": [1, float("inf"), 0]}
    with pytest.raises(AnnotationRejected, match=r"element 3 \(point\): center"):
        push_annotation(client, item_id, bad, analysis_key=KEY)
    with pytest.raises(AnnotationRejected, match=r"element 3 \(point\): center"):
        push_annotation(client, item_id, BatchedDocument.from_document(bad, 2), analysis_key=KEY)
    anns = client.get("annotation", {"itemId": item_id})
    assert [(a["_id"], a["_elementCount"]) for a in anns] == [(good.annotation_id, 10)]


# ------------------------------------------------------------- folder job
def test_folder_job_runs_skips_replaces_and_records_failures(
    girder: GirderServer, slides: dict[str, Path], tmp_path: Path
) -> None:
    folder = _folder(girder, slides, ["disks0", "white", "cmu"], "job")
    client = _client(girder)
    fractions: list[float] = []
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    out = {o.item_name: o for o in run_folder_job(client, params, progress=fractions.append)}
    assert [(k, o.status) for k, o in out.items()] == [*DONE2, ("white.tif", "failed")]
    assert "no tissue" in out["white.tif"].error and fractions[-1] == 1.0
    # named by the slide's file, not the short name it was downloaded as
    assert out["white.tif"].error.startswith("white.tif: no tissue")
    assert fractions == sorted(fractions)
    recs = assert_consistent(client, folder["_id"])
    assert recs["white.tif"]["status"] == "failed" and "no tissue" in recs["white.tif"]["error"]
    assert recs["cmu.tif"]["provenance"]["params"]["inputImageFile"] == SAMPLE.name
    rows = summary_rows(client, folder["_id"])
    assert [(r["item_name"], r["status"]) for r in rows] == [*DONE2, ("white.tif", "failed")]
    assert int(rows[0]["nuclei_count"]) == recs["cmu.tif"]["element_count"] > 100
    assert [r["warnings"] for r in rows] == ["", "", ""]
    # the pushed document (made a batch at a time) is the one the CLI writes
    cli_doc = _detect(tmp_path, "--nuclei_annotation_format", "point")
    pushed = _stored(client, recs["cmu.tif"]["annotation_id"])
    assert (pushed["name"], pushed["description"]) == (cli_doc["name"], cli_doc["description"])
    assert pushed["elements"] == cli_doc["elements"]
    assert pushed["attributes"]["slide"]["file"] == SAMPLE.name
    assert recs["cmu.tif"]["provenance"]["slide"]["file"] == SAMPLE.name
    # same analysis, model and parameters: skipped; the failure is tried again
    again = {o.item_name: o.status for o in run_folder_job(client, params)}
    assert again == {"cmu.tif": "skipped", "disks0.tif": "skipped", "white.tif": "failed"}
    rows = summary_rows(client, folder["_id"])
    assert [r["status"] for r in rows] == ["skipped", "skipped", "failed"]
    # other parameters: redone, and the annotations are replaced, not added
    changed = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="box")
    assert [o.status for o in run_folder_job(client, changed)] == ["done", "done", "failed"]
    recs2 = assert_consistent(client, folder["_id"])
    assert recs2["cmu.tif"]["annotation_id"] != recs["cmu.tif"]["annotation_id"]
    assert recs2["cmu.tif"]["params_hash"] != recs["cmu.tif"]["params_hash"]


def test_folder_job_reports_an_analysis_warnings(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    """A slide that looks like fluorescence, given the default H&E model: done,
    and the warning reaches the outcome, the item's record and the summary."""
    folder = _folder(girder, slides, ["dark"], "warn")
    client = _client(girder)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    (first,) = run_folder_job(client, params)
    assert first.status == "done" and len(first.warnings) == 1
    assert "looks like fluorescence" in first.warnings[0]
    rec = read_record(client, first.item_id, KEY)
    assert rec is not None and rec["provenance"]["warnings"] == first.warnings
    (again,) = run_folder_job(client, params)
    assert again.status == "skipped" and again.warnings == first.warnings
    (row,) = summary_rows(client, folder["_id"])
    assert row["status"] == "skipped" and row["warnings"] == first.warnings[0]


def test_folder_job_survives_a_paused_server_and_dropped_connections(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    folder = _folder(girder, slides, ["disks0", "disks1", "disks2"], "pause")
    client = _client(girder, attempts=10, backoff=0.2, read_timeout=1.5, connect_timeout=1.5)
    paused = threading.Event()

    def progress(frac: float) -> None:  # pause the server for 4 s once the first slide is in
        if frac >= 1 / 3 and not paused.is_set():
            paused.set()
            girder.pause()
            threading.Timer(4.0, girder.resume).start()

    real = client._session.request
    count = iter(range(10_000))
    dropped: list[str] = []

    def dropping(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        resp = real(method, url, *args, **kwargs)
        if next(count) % 7 == 6:  # every 7th answer is lost after the server acted
            dropped.append(f"{method} {url.split('/api/v1/')[-1]}")
            raise requests.ConnectionError("connection dropped")
        return resp

    for verb in ("get", "post", "put", "delete"):
        setattr(client._session, verb, lambda url, _v=verb, **kw: dropping(_v.upper(), url, **kw))
    try:
        params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
        outcomes = run_folder_job(client, params, progress=progress)
    finally:
        girder.resume()
        for verb in ("get", "post", "put", "delete"):
            client._session.__dict__.pop(verb, None)
    assert paused.is_set() and [o.status for o in outcomes] == ["done"] * 3
    assert any(d.startswith("POST annotation") for d in dropped) or len(dropped) >= 5, dropped
    time.sleep(1.0)
    assert_consistent(_client(girder), folder["_id"])
    assert len(summary_rows(_client(girder), folder["_id"])) == 3


def _cron(girder: GirderServer, folder_id: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GIRDER_TOKEN": girder.token, "NUCLEUS_LOG_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "nucleus_models.dsa", "folder-job", "--api-url", girder.api_url]
    cmd += ["--folder", folder_id, "--format", "point", *extra]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=pipe, stderr=pipe, text=True)


def test_folder_job_killed_and_rerun(girder: GirderServer, slides: dict[str, Path]) -> None:
    folder = _folder(girder, slides, ["disks0", "disks1", "disks2", "cmu"], "kill")
    proc = _cron(girder, folder["_id"])
    pushed = 0
    log: list[str] = []
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # kill it right after the second slide's push
            log.append(line)
            pushed += "pushed" in line
            if pushed == 2:
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=30)
    assert pushed == 2, "".join(log)
    client = _client(girder)
    cmu = next(i for i in client.listItem(folder["_id"]) if i["name"] == "cmu.tif")
    first = read_record(client, cmu["_id"], KEY)
    assert first and first["status"] == "done"
    assert [a["_id"] for a in find_annotations(client, cmu["_id"], KEY)] == [first["annotation_id"]]
    rerun = _cron(girder, folder["_id"], "--strict")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert out == "" and "0 failed" in err, err
    # the killed run's lease named a process of this host that is gone
    assert "taking over the lease" in err and _lease_of(client, folder["_id"]) is None
    after = assert_consistent(client, folder["_id"])
    assert after["cmu.tif"]["annotation_id"] == first["annotation_id"]
    assert all(r and r["status"] == "done" for r in after.values())
    assert {r["status"] for r in summary_rows(client, folder["_id"])} == {"done", "skipped"}


def test_a_cancelled_cron_job_cleans_up(
    girder: GirderServer, slides: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM (a job cancelled in HistomicsUI, ``docker stop``) mid-job: one
    error line, exit 143, the downloaded slide removed and the folder's lease
    given back, so the next run starts at once."""
    import signal

    folder = _folder(girder, slides, ["disks0", "disks1", "disks2", "cmu"], "cancel")
    work = tmp_path / "work"
    work.mkdir()
    proc = _cron(girder, folder["_id"], "--workdir", str(work))
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        assert proc.stderr is not None
        log = []
        for line in proc.stderr:  # stop it after the first slide's push
            log.append(line)
            if "pushed" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 143, "".join(log) + rest
    assert rest.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert list(work.iterdir()) == []  # no slide left behind
    assert _lease_of(_client(girder), folder["_id"]) is None


def test_a_job_cancelled_mid_push_or_before_the_record_leaves_no_stray_annotation(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM once a slide's new annotation is stored but before the item's
    record names it: the new annotation is taken back and the older one, which
    the record still names, stays (not two of one key, nor one no record names,
    nor none); once the record names the new one, the older one goes."""
    from nucleus_models.cli_support import Terminated
    from nucleus_models.dsa import annotations, folder_job

    def cancelled(*args: Any, **kwargs: Any) -> Any:
        raise Terminated()

    folder = _folder(girder, slides, ["disks0"], "cancel-push")
    client = _client(girder)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    (first,) = run_folder_job(client, params)
    other = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="box")
    find_push, finds = annotations._find_push, []

    def found_then_cancelled(*args: Any, **kwargs: Any) -> Any:  # mid-push, once stored
        finds.append(1)
        if len(finds) == 1:
            raise Terminated()
        return find_push(*args, **kwargs)

    monkeypatch.setattr(annotations, "_find_push", found_then_cancelled)
    with pytest.raises(Terminated):
        run_folder_job(client, other)
    monkeypatch.undo()
    recs = assert_consistent(client, folder["_id"])
    assert recs["disks0.tif"]["annotation_id"] == first.annotation_id
    monkeypatch.setattr(folder_job, "write_record", cancelled)  # pushed, not recorded
    with pytest.raises(Terminated):
        run_folder_job(client, other)
    monkeypatch.undo()
    # the new one is taken back; the older one, which the record names, stays
    recs = assert_consistent(client, folder["_id"])
    assert recs["disks0.tif"]["annotation_id"] == first.annotation_id
    assert _lease_of(client, folder["_id"]) is None
    dedupe, calls = folder_job.dedupe, []

    def cancelled_once(*args: Any, **kwargs: Any) -> Any:  # recorded, older one not yet removed
        calls.append(1)
        if len(calls) == 1:
            raise Terminated()
        return dedupe(*args, **kwargs)

    monkeypatch.setattr(folder_job, "dedupe", cancelled_once)
    with pytest.raises(Terminated):
        run_folder_job(client, other)
    monkeypatch.undo()
    recs = assert_consistent(client, folder["_id"])
    assert recs["disks0.tif"]["params_hash"] == other.params_hash()
    other = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="polygon")
    write = folder_job.write_record

    def landed_then_cancelled(*args: Any, **kwargs: Any) -> Any:
        write(*args, **kwargs)
        raise Terminated()

    monkeypatch.setattr(folder_job, "write_record", landed_then_cancelled)  # recorded: kept
    with pytest.raises(Terminated):
        run_folder_job(client, other)
    monkeypatch.undo()
    recs = assert_consistent(client, folder["_id"])
    assert recs["disks0.tif"]["params_hash"] == other.params_hash()
    assert [o.status for o in run_folder_job(client, other)] == ["skipped"]


def test_a_push_cancelled_while_its_post_is_unanswered_is_taken_back_when_it_lands(
    girder: GirderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM once the whole body is sent, before the answer: the server goes
    on storing the document (it lands a moment later); the push waits for it
    and takes it back, so the item keeps its older annotation alone."""
    from nucleus_models.cli_support import Terminated

    item_id = _item(girder, "cancel-in-flight")
    client = _client(girder)
    first = push_annotation(client, item_id, _point_doc(4), analysis_key=KEY)
    send = client.sendRestRequest
    landed: list[threading.Thread] = []

    def post_lands_later(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        if method != "POST" or path != "annotation":
            return send(method, path, *args, **kwargs)
        data = kwargs["data"]
        body = data if isinstance(data, bytes) else b"".join(iter(lambda: data.read(1 << 16), b""))

        def post() -> None:  # the server, still storing what it was sent
            time.sleep(1.0)
            kwargs["data"] = body
            send(method, path, *args, **kwargs).close()

        landed.append(threading.Thread(target=post))
        landed[0].start()
        raise Terminated()  # the signal, while the answer is awaited

    monkeypatch.setattr(client, "sendRestRequest", post_lands_later)
    big = BatchedDocument.from_document(_point_doc(300, seed=2), 100)
    with pytest.raises(Terminated):
        push_annotation(client, item_id, big, analysis_key=KEY)
    landed[0].join(timeout=30)
    monkeypatch.undo()
    time.sleep(0.5)
    assert [a["_id"] for a in find_annotations(client, item_id, KEY)] == [first.annotation_id]


def _slicer(girder: GirderServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "NucleusFolderJob", *args, "--api-url", girder.api_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_slicer_cli_folder_job_reports_progress_and_never_shows_the_token(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    folder = _folder(girder, slides, ["disks1", "white"], "slicer")
    gc = girder.client()
    for name, data in (("broken.svs", b"not a slide" * 100), ("notes.txt", b"stain: H&E")):
        gc.uploadFile(folder["_id"], io.BytesIO(data), name, len(data), parentType="folder")
    res = _slicer(
        girder, folder["_id"], "--girder-token", girder.token, "--analysis_roi", "0,0,300,300"
    )
    # a failed slide fails the job (HistomicsUI shows it), after the rest is saved
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: 1 of 2 slide(s) failed (first: white.tif: ") and "no tissue" in last
    )
    assert "nucleus_models_summary_NucleusDetection.csv" in last
    # the job log says what became of each slide and the totals (it showed
    # only warnings: the outcomes were INFO lines under a WARNING level)
    assert re.search(r"item \d/\d 'disks1\.tif': done \d+", res.stderr), res.stderr
    assert "done 1, skipped 0, failed 1, not_analysed 1" in res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("<filter-start>") and lines[-1].startswith("<filter-end>")
    assert "<filter-progress>1.0000</filter-progress>" in lines
    assert all(ln.startswith("<filter-") for ln in lines)
    client = _client(girder)
    recs = assert_consistent(client, folder["_id"])
    assert recs["disks1.tif"]["status"] == "done" and recs["white.tif"]["status"] == "failed"
    everything = [res.stdout, res.stderr, json.dumps(recs)]
    for item in client.listItem(folder["_id"]):
        everything += [json.dumps(a) for a in client.get("annotation", {"itemId": item["_id"]})]
    rows = summary_rows(client, folder["_id"])
    # the item named like a slide that is not a large image is listed, the text file not
    assert [(r["item_name"], r["status"]) for r in rows] == [
        ("disks1.tif", "done"),
        ("white.tif", "failed"),
        ("broken.svs", "not_analysed"),
    ]
    assert "not a large image" in rows[2]["error"] and "broken.svs" in res.stderr
    everything.append(json.dumps(rows))
    assert not any(girder.token in text for text in everything)


def test_folder_job_stops_when_the_token_is_refused(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that expires mid-job stops it at that slide: the later slides are
    not analysed only to fail one by one."""
    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.client import AuthenticationError

    folder = _folder(girder, slides, ["disks0", "disks1"], "expired")
    tried: list[str] = []

    def expired(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        tried.append(item["name"])
        raise AuthenticationError("the Girder token was not accepted (POST annotation)")

    monkeypatch.setattr(folder_job, "_process", expired)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    with pytest.raises(AuthenticationError, match="not accepted"):
        run_folder_job(_client(girder), params)
    assert tried == ["disks0.tif"]


def test_overlapping_runs_leave_the_recorded_annotation(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run of the same key (a cron run outlasting its interval) pushes
    and records a newer annotation after this run's push: this run's final sweep
    keeps the recorded one, so the item never ends with none."""
    from nucleus_models.dsa import folder_job

    folder = _folder(girder, slides, ["disks0"], "overlap")
    client = _client(girder)
    real = folder_job._process
    later: dict[str, str] = {}

    def then_another_run(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        out = real(client, params, item, *args)
        other = push_annotation(client, item["_id"], _point_doc(7), analysis_key=KEY)
        rec = read_record(client, item["_id"], KEY) or {}
        write_record(client, item["_id"], KEY, {**rec, "annotation_id": other.annotation_id})
        later["id"] = other.annotation_id
        return out

    monkeypatch.setattr(folder_job, "_process", then_another_run)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    (outcome,) = run_folder_job(client, params)
    ids = [a["_id"] for a in find_annotations(client, outcome.item_id, KEY)]
    assert ids == [later["id"]] == [outcome.annotation_id]
    assert (read_record(client, outcome.item_id, KEY) or {})["annotation_id"] == later["id"]


def test_a_record_undone_by_another_analysis_job_is_written_again(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another analysis's job over the same folder read an item's metadata just
    before this run recorded the slide and wrote its own record just after
    (Girder's PUT replaces the whole metadata key): this run's record is
    written again by its final sweep, and the other's is kept."""
    from nucleus_models.dsa import META_NS, folder_job, metadata

    folder = _folder(girder, slides, ["disks0", "disks1", "white"], "undone")
    client = _client(girder)
    real = folder_job.write_record
    other = {"status": "done", "annotation_id": "0" * 24, "analysis": "other"}

    def raced(client: Any, item_id: str, key: str, record: dict[str, Any]) -> Any:
        stale = metadata.read_records(client, item_id)  # the other job's read
        out = real(client, item_id, key, record)
        if "OtherJob" not in stale:  # its write, from what it read: ours is gone
            client.sendRestRequest(
                "PUT", f"item/{item_id}/metadata", json={META_NS: {**stale, "OtherJob": other}}
            )
        return out

    monkeypatch.setattr(folder_job, "write_record", raced)
    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    outcomes = run_folder_job(client, params)
    assert [o.status for o in outcomes] == ["done", "done", "failed"]  # white: no tissue
    for o in outcomes:
        records = metadata.read_records(client, o.item_id)
        assert set(records) == {KEY, "OtherJob"}
        if o.status == "failed":  # a failure's record is written again too
            assert records[KEY]["status"] == "failed" and "no tissue" in records[KEY]["error"]
            continue
        assert records[KEY]["annotation_id"] == o.annotation_id
        assert [a["_id"] for a in find_annotations(client, o.item_id, KEY)] == [o.annotation_id]
    monkeypatch.undo()
    assert [o.status for o in run_folder_job(client, params)] == ["skipped", "skipped", "failed"]


def test_a_slide_put_in_an_item_since_or_named_past_the_file_system_limit(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    """An item whose record names another file than its large image now (the
    slide was replaced) is analysed again, not skipped with the old slide's
    results; a file name longer than a file system takes (268 bytes) is
    downloaded under a short one."""
    folder = _folder(girder, slides, ["disks0"], "replaced")
    gc, client = girder.client(), _client(girder)
    long_name = "病理標本" * 22 + ".tif"
    item = gc.createItem(folder["_id"], "long", reuseExisting=False)
    data = slides["disks1"].read_bytes()
    gc.uploadFile(item["_id"], io.BytesIO(data), long_name, len(data), parentType="item")
    deadline = time.monotonic() + 60
    while "largeImage" not in gc.getItem(item["_id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    first = run_folder_job(client, params)
    assert [(o.item_name, o.status) for o in first] == [("disks0.tif", "done"), ("long", "done")]
    rec = read_record(client, first[0].item_id, KEY) or {}
    assert rec["provenance"]["params"]["inputImageFile"] == "disks0.tif"
    prov = {**rec["provenance"], "girder": {**rec["provenance"]["girder"], "file_id": "0" * 24}}
    write_record(client, first[0].item_id, KEY, {**rec, "provenance": prov})  # another file's
    again = {o.item_name: o.status for o in run_folder_job(client, params)}
    assert again == {"disks0.tif": "done", "long": "skipped"}
    assert [a["_id"] for a in find_annotations(client, first[0].item_id, KEY)] == [
        (read_record(client, first[0].item_id, KEY) or {})["annotation_id"]
    ]


def test_a_slide_whose_recorded_annotation_was_deleted_is_analysed_again(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    """Its record says done, but the annotation it names is gone (deleted in
    DSA): analysed again, not skipped, also where another annotation of the
    key is left on the item (a copy of it, or a crashed push's)."""
    folder = _folder(girder, slides, ["disks0"], "deleted")
    gc, client = girder.client(), _client(girder)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    (first,) = run_folder_job(client, params)
    assert first.status == "done"
    gc.delete(f"annotation/{first.annotation_id}")
    assert [o.status for o in run_folder_job(client, params)] == ["done"]
    rec = assert_consistent(client, folder["_id"])["disks0.tif"]
    # a copy left beside the recorded one, which is then deleted
    doc = client.get(f"annotation/{rec['annotation_id']}")["annotation"]
    copy = gc.post("annotation", parameters={"itemId": first.item_id}, json=doc)
    gc.delete(f"annotation/{rec['annotation_id']}")
    assert [a["_id"] for a in find_annotations(client, first.item_id, KEY)] == [copy["_id"]]
    assert [o.status for o in run_folder_job(client, params)] == ["done"]
    assert assert_consistent(client, folder["_id"])["disks0.tif"]["annotation_id"] != copy["_id"]


def test_a_server_that_stops_answering_stops_the_job(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests unanswered after every retry for three slides in a row stop the
    job (each later slide would spend its retries too: hours over a large
    folder); one slide whose file the server fails on does not."""
    from nucleus_models.dsa import GirderUnavailable, folder_job

    folder = _folder(girder, slides, ["disks0", "disks1", "disks2", "cmu"], "down")
    client = _client(girder)
    real = folder_job._process
    down: set[str] = set()

    def maybe_down(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        if item["name"] in down or "*" in down:
            raise GirderUnavailable(f"GET file/{item['_id']}/download: 502 Bad Gateway")
        return real(client, params, item, *args)

    monkeypatch.setattr(folder_job, "_process", maybe_down)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    down.add("cmu.tif")  # the first slide
    assert [o.status for o in run_folder_job(client, params)] == ["failed", *["done"] * 3]
    down.add("*")
    with pytest.raises(GirderUnavailable, match=r"3 slides in a row; stopped at item 3/4"):
        run_folder_job(client, FolderJobParams(**{**params.public(), "force": True}))


def test_slicer_cli_folder_without_slides(girder: GirderServer) -> None:
    """Slides only in sub-folders: a one-line error naming them, not an empty
    summary and a job that looks successful."""
    gc = girder.client()
    parent = create_folder(gc, f"cases-{time.monotonic_ns()}")
    gc.createFolder(parent["_id"], "case1")
    gc.uploadFile(parent["_id"], io.BytesIO(b"x" * 64), "scan.ndpi", 64, parentType="folder")
    res = _slicer(girder, parent["_id"], "--girder-token", girder.token)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "holds no large image" in lines[0] and "case1" in lines[0]
    assert "'scan.ndpi': not a large image" in lines[0]
    assert [i["name"] for i in gc.listItem(parent["_id"])] == ["scan.ndpi"]  # no summary


@pytest.mark.parametrize("case", ["unknown folder", "bad token"])
def test_slicer_cli_bad_input(girder: GirderServer, case: str) -> None:
    args, expected = {
        "unknown folder": (
            ["0123456789abcdef01234567", "--girder-token", girder.token],
            "not found",
        ),
        "bad token": (
            ["0123456789abcdef01234567", "--girder-token", "nope-0123456789"],
            "not accepted",
        ),
    }[case]
    res = _slicer(girder, *args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert girder.token not in res.stderr + res.stdout


def test_a_cron_job_can_give_an_api_key(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$GIRDER_API_KEY (long-lived, unlike a session token) is exchanged for a
    token; a key the server does not know is one line naming the variable,
    and neither the key nor the token reaches the output."""
    gc = girder.client()
    key = gc.post("api_key", parameters={"name": f"cron-{time.monotonic_ns()}"})["key"]
    # the scopes the README names
    scopes = json.dumps(["core.user_info.read", "core.data.read", "core.data.write"])
    scoped = gc.post("api_key", parameters={"name": "cron-scoped", "scope": scopes})["key"]
    folder = _folder(girder, slides, ["disks0"], "apikey")
    env = {k: v for k, v in os.environ.items() if k != "GIRDER_TOKEN"}
    cmd = [sys.executable, "-m", "nucleus_models.dsa", "folder-job", "--api-url"]
    cmd += [girder.api_url, "--folder", folder["_id"], "--format", "point", "--strict"]
    for given, rc, more in ((key, 0, []), (scoped, 0, ["--force"]), ("k" * 40, 2, [])):
        res = subprocess.run(
            [*cmd, *more], cwd=REPO, capture_output=True, text=True, timeout=300,
            env={**env, "GIRDER_API_KEY": given},
        )  # fmt: skip
        assert res.returncode == rc, res.stderr
        assert given not in res.stderr + res.stdout
    assert "GIRDER_API_KEY was not accepted" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1
    (item,) = gc.listItem(folder["_id"], name="disks0.tif")
    assert (read_record(_client(girder), item["_id"], KEY) or {})["status"] == "done"


# ------------------------------------------------------------------ lease
def _lease_of(client: Any, folder_id: str, key: str = KEY) -> Any:
    from nucleus_models.dsa.lease import lease_field

    return (client.get(f"folder/{folder_id}").get("meta") or {}).get(lease_field(key))


def _set_lease(client: Any, folder_id: str, **fields: Any) -> None:
    from nucleus_models.dsa.lease import lease_field

    lease = {"run": "other", "host": "dsa-worker-7", "pid": 1, "started": "2026-12-05T10:00:00"}
    lease.update({"heartbeat_epoch": time.time(), **fields})
    client.sendRestRequest("PUT", f"folder/{folder_id}/metadata", json={lease_field(KEY): lease})


def test_a_second_run_of_the_same_key_waits_for_the_first(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run of the key while the first analyses (a cron run outlasting
    its interval, a second click) analyses nothing; another key runs; the
    lease is gone when the first run ends."""
    import dataclasses
    import socket

    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.lease import FolderBusy

    folder = _folder(girder, slides, ["disks0", "disks1"], "lease")
    client = _client(girder)
    real = folder_job._process
    seen: dict[str, Any] = {}

    def with_more_runs(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        if "busy" not in seen:
            seen["lease"] = _lease_of(client, folder["_id"])
            with pytest.raises(FolderBusy) as busy:
                run_folder_job(client, params)
            seen["busy"] = str(busy.value)
            other = dataclasses.replace(params, analysis_key="second-opinion")
            seen["other"] = [o.status for o in run_folder_job(client, other)]
        return real(client, params, item, *args)

    monkeypatch.setattr(folder_job, "_process", with_more_runs)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    assert [o.status for o in run_folder_job(client, params)] == ["done", "done"]
    assert "another run of NucleusDetection is in progress" in seen["busy"]
    assert (seen["lease"]["host"], seen["lease"]["pid"]) == (socket.gethostname(), os.getpid())
    assert seen["other"] == ["done", "done"]
    assert _lease_of(client, folder["_id"]) is None
    assert _lease_of(client, folder["_id"], "second-opinion") is None
    recs = assert_consistent(client, folder["_id"])
    assert all(r["status"] == "done" for r in recs.values())


def test_a_stale_lease_is_taken_over_and_a_live_one_renewed(
    girder: GirderServer, slides: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nucleus_models.dsa import folder_job, lease

    folder = _folder(girder, slides, ["disks2"], "stale")
    client = _client(girder)
    _set_lease(client, folder["_id"], heartbeat_epoch=time.time() - lease.STALE_AFTER_S - 5)
    monkeypatch.setattr(lease, "HEARTBEAT_EVERY_S", 0.2)
    real = folder_job._process
    beats: list[float] = []

    def slow(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        beats.append(_lease_of(client, folder["_id"])["heartbeat_epoch"])
        time.sleep(1.5)  # a long download: the heartbeat goes on without progress
        beats.append(_lease_of(client, folder["_id"])["heartbeat_epoch"])
        return real(client, params, item, *args)

    monkeypatch.setattr(folder_job, "_process", slow)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    assert [o.status for o in run_folder_job(client, params)] == ["done"]
    assert beats[1] > beats[0] > time.time() - 60
    assert _lease_of(client, folder["_id"]) is None


@pytest.mark.parametrize("heartbeat_s", [0.2, None], ids=["heartbeat", "read_back"])
def test_a_run_whose_lease_was_taken_stops_before_the_next_slide(
    girder: GirderServer,
    slides: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    heartbeat_s: float | None,
) -> None:
    """A run whose lease another run took over stops at the next slide and
    leaves that lease, whether its heartbeat saw it first (a run silent too
    long: a hung mount, a paused VM) or its read-back before the slide did
    (two runs that both read their own write back on a slow server: the
    heartbeat, 30 s away, does not settle it)."""
    from nucleus_models.dsa import folder_job, lease

    folder = _folder(girder, slides, ["disks0", "disks1"], f"taken-{heartbeat_s}")
    client = _client(girder)
    if heartbeat_s is not None:
        monkeypatch.setattr(lease, "HEARTBEAT_EVERY_S", heartbeat_s)
    real = folder_job._process
    tried: list[str] = []

    def taken_over(client: Any, params: Any, item: dict[str, Any], *args: Any) -> Any:
        tried.append(item["name"])
        _set_lease(client, folder["_id"], run="newer")
        if heartbeat_s is not None:
            time.sleep(5 * heartbeat_s)
        return real(client, params, item, *args)

    monkeypatch.setattr(folder_job, "_process", taken_over)
    params = FolderJobParams(inputFolder=folder["_id"], nuclei_annotation_format="point")
    with pytest.raises(lease.FolderBusy, match="took the folder over .* before item 2/2"):
        run_folder_job(client, params)
    assert tried == ["disks0.tif"] and _lease_of(client, folder["_id"])["run"] == "newer"


def test_cron_and_slicer_cli_while_another_run_holds_the_folder(
    girder: GirderServer, slides: dict[str, Path]
) -> None:
    """cron: a warning and exit 0 (the other run does the work); HistomicsUI:
    one error line. Neither analyses nor writes anything."""
    folder = _folder(girder, slides, ["disks0"], "busy")
    client = _client(girder)
    _set_lease(client, folder["_id"])
    proc = _cron(girder, folder["_id"], "--strict")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "another run of NucleusDetection is in progress" in err and "dsa-worker-7" in err
    res = _slicer(girder, folder["_id"], "--girder-token", girder.token)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "is in progress" in lines[0]
    (item,) = client.listItem(folder["_id"])  # no summary
    assert read_record(client, item["_id"], KEY) is None
    assert find_annotations(client, item["_id"], KEY) == []
    assert _lease_of(client, folder["_id"])["run"] == "other"

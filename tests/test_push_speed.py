"""``python -m benchmark.push_speed``: bad input is one line, and the synthetic
annotation it pushes to a user's slide is removed even when a query fails."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sizes", "0"], "--sizes: each at least 1"),
        (["--api-url", "http://127.0.0.1:9/api/v1"], "--api-url needs --item"),
        (["--out", "."], "is a folder, not a file"),
    ],
)
def test_bad_input_is_one_line_before_any_server(args: list[str], words: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "benchmark.push_speed", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and words in lines[0], res.stderr


def test_the_pushed_annotation_is_removed_from_a_users_slide_when_a_query_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmark import push_speed
    from nucleus_models.dsa import annotations

    removed: list[str] = []
    monkeypatch.setattr(push_speed, "_server_and_item", lambda args, tmp: (None, object(), "i"))
    monkeypatch.setattr(
        push_speed, "time_push", lambda *a, **k: {"annotation_id": "a1", "elements_per_s": 1.0}
    )

    def failing(*args: Any) -> None:
        raise RuntimeError("query timed out")

    monkeypatch.setattr(push_speed, "time_queries", failing)
    monkeypatch.setattr(annotations, "delete_annotation", lambda c, aid: removed.append(aid))
    args = argparse.Namespace(api_url="http://x/api/v1", item="i", batched=0, memory=False)
    with pytest.raises(RuntimeError, match="query timed out"):
        push_speed._measure(args, "point", 10)
    assert removed == ["a1"]


def test_the_json_records_its_rows_and_provenance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    from benchmark import push_speed
    from nucleus_models import __version__

    def measured(args: argparse.Namespace, form: str, n: int) -> dict[str, Any]:
        return {"form": form, "n": n, "elements_per_s": 100.0, "queries": {}}

    monkeypatch.setattr(push_speed, "_measure", measured)
    monkeypatch.setattr(push_speed, "_print_table", lambda rows: None)
    out = tmp_path / "push.json"
    push_speed.main(["--sizes", "10", "--forms", "point", "--batched", "5", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["rows"] == [measured(argparse.Namespace(), "point", 10)]
    prov = record["provenance"]
    assert prov["package_version"] == __version__ and prov["libraries"]["girder_client"]
    assert prov["params"]["batched"] == 5 and prov["params"]["sizes"] == [10]
    assert prov["server"].startswith("test server") and prov["created"]
    # the command it was given, not the process's (pytest's) arguments
    assert prov["command"].endswith(
        "-m benchmark.push_speed --sizes 10 --forms point --batched 5 --out " + str(out)
    )

"""A real Girder 5 server for the integration tests, as a subprocess.

``.venv-girder/bin/python scripts/girder_test_server.py --port P`` serves
Girder 5 with the large_image and annotation plugins on 127.0.0.1 (in-memory
mongomock database). :class:`GirderServer` starts it, waits for its ready line,
creates an admin user and a filesystem assetstore in a temporary folder, and
always stops it (``stop``, ``atexit``, and the server's own parent watch).
A missing ``.venv-girder`` is a test failure, never a skip.
"""

from __future__ import annotations

import atexit
import csv
import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIRDER_VENV = Path(os.environ.get("GIRDER_VENV", REPO / ".venv-girder"))
GIRDER_PYTHON = GIRDER_VENV / "bin" / "python"
SERVER_SCRIPT = REPO / "scripts" / "girder_test_server.py"
ADMIN = {"login": "admin", "password": "adminpassword1", "email": "admin@example.com"}


def require_girder_venv() -> Path:
    """The Girder venv's python; fail (never skip) when it is missing."""
    if not GIRDER_PYTHON.is_file():
        msg = (
            f"Girder test venv not found at {GIRDER_VENV}: run `make setup-girder` "
            "(scripts/setup_girder_venv.sh) first; `make test` does it"
        )
        if "pytest" in sys.modules:
            import pytest

            pytest.fail(msg, pytrace=False)
        raise RuntimeError(msg)
    return GIRDER_PYTHON


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GirderServer:
    """One Girder 5 process on 127.0.0.1 with an admin user and an assetstore.

    Parameters
    ----------
    workdir : Path
        Holds the assetstore and the server log.
    startup_timeout : float
        Seconds to wait for the ready line.
    """

    def __init__(self, workdir: Path, *, startup_timeout: float = 180.0):
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.api_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.token = ""
        self.log_path = self.workdir / "girder-server.log"

    # ------------------------------------------------------------- lifecycle
    def start(self) -> GirderServer:
        """Start the server and wait until its API answers."""
        python = require_girder_venv()
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(3):  # a port taken between free_port() and bind: try another
            self.port = free_port()
            log = self.log_path.open("a")
            env = {**os.environ, "GIRDER_MONGO_URI": "mongodb://localhost:27017/girder"}
            env.pop("GIRDER_TOKEN", None)
            self.proc = subprocess.Popen(
                [str(python), str(SERVER_SCRIPT), "--port", str(self.port)]
                + ["--parent-pid", str(os.getpid())],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=self.workdir,
                env=env,
            )
            log.close()
            atexit.register(self.stop)
            line = self._wait_ready()
            if line:
                self.api_url = line.split()[-1]
                return self
            last_error = self.log_tail()
            self.stop()
        raise RuntimeError(f"Girder did not start; log tail:\n{last_error}")

    def _wait_ready(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout

        def pump() -> None:
            for ln in stdout:
                lines.put(ln)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                ln = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    return ""
                continue
            if ln.startswith("GIRDER READY"):
                return ln.strip()
        return ""

    def stop(self) -> None:
        """Terminate the server (resuming it first if it was paused); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def pause(self) -> None:
        """SIGSTOP the server (it accepts connections but answers nothing)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server."""
        os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, n: int = 4000) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ data
    def setup_admin(self) -> Any:
        """Create the admin user (the first user is admin) and a filesystem assetstore.

        Returns
        -------
        girder_client.GirderClient
            Authenticated as the admin.
        """
        import girder_client

        gc = girder_client.GirderClient(apiUrl=self.api_url)
        gc.post(
            "user",
            parameters={**ADMIN, "firstName": "Ada", "lastName": "Admin", "admin": "true"},
        )
        gc.authenticate(ADMIN["login"], ADMIN["password"])
        self.token = gc.token
        root = self.workdir / "assetstore"
        root.mkdir(exist_ok=True)
        gc.post("assetstore", parameters={"name": "test", "type": 0, "root": str(root)})
        return gc

    def client(self) -> Any:
        """A new admin client (token already issued)."""
        import girder_client

        gc = girder_client.GirderClient(apiUrl=self.api_url)
        gc.setToken(self.token)
        return gc


def create_folder(gc: Any, name: str) -> dict[str, Any]:
    """A folder ``name`` in a collection ``slides`` (created once)."""
    coll = next(iter(gc.listCollection()), None) if hasattr(gc, "listCollection") else None
    if coll is None:
        coll = gc.createCollection("slides", public=True)
    return gc.createFolder(coll["_id"], name, parentType="collection", reuseExisting=True)


def upload_slide(gc: Any, folder_id: str, path: Path, *, name: str | None = None) -> dict[str, Any]:
    """Upload ``path`` as a new item of ``folder_id``; returns the item (a large image)."""
    item = gc.createItem(folder_id, name or path.name, reuseExisting=False)
    gc.uploadFileToItem(item["_id"], str(path))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        item = gc.getItem(item["_id"])
        if "largeImage" in item:
            return item
        time.sleep(0.2)
    raise RuntimeError(f"{path.name} did not become a large image")


def assert_consistent(client: Any, folder_id: str, key: str = "NucleusDetection") -> dict[str, Any]:
    """Every large image: exactly one annotation of ``key``, and its record names it."""
    from nucleus_models.dsa import find_annotations, read_record

    records = {}
    for item in client.listItem(folder_id):
        if "largeImage" not in item:
            continue
        rec = read_record(client, item["_id"], key)
        anns = find_annotations(client, item["_id"], key)
        if rec and rec.get("status") == "done":
            assert [a["_id"] for a in anns] == [rec["annotation_id"]], (item["name"], anns, rec)
            assert anns[0]["_elementCount"] == rec["element_count"] == rec["scores"]["nuclei_count"]
        else:
            assert anns == [], (item["name"], anns)
        records[item["name"]] = rec
    return records


def summary_rows(
    client: Any, folder_id: str, key: str = "NucleusDetection"
) -> list[dict[str, str]]:
    """The rows of the folder's summary CSV (which must be its item's only file)."""
    from nucleus_models.dsa import summary_name

    items = list(client.listItem(folder_id, name=summary_name(key)))
    assert len(items) == 1
    files = list(client.listFile(items[0]["_id"]))
    assert len(files) == 1
    buf = io.BytesIO()
    client.downloadFile(files[0]["_id"], buf)
    return list(csv.DictReader(io.StringIO(buf.getvalue().decode())))

"""One folder job per folder and analysis key at a time: a lease in folder metadata.

A cron run that outlasts its interval, or a second click in HistomicsUI,
would otherwise analyse every slide the first run has not finished yet a
second time, in lockstep with it. :meth:`FolderLease.acquire` writes
``folder.meta["nucleus_models_run_<analysis_key>"]`` (run id, host, boot,
PID, start and heartbeat times) and refuses with :class:`FolderBusy` while
another run's heartbeat is fresh. A thread of the run renews it every
:data:`HEARTBEAT_EVERY_S` (downloads and pushes included), the run reads it
back before each slide (:meth:`FolderLease.check`) and stops if another run
holds it, and it removes the lease at the end.

A run that died leaves a lease that goes stale after :data:`STALE_AFTER_S`
without a heartbeat and is then taken over; a lease written from this host,
boot and PID namespace (containers with the host's name have their own
namespace, a cloned VM its own boot id) whose process is gone is taken over
at once.

Limits: hosts' clocks are compared, so they should agree to within a minute.
Two runs that start within the same moment both write and read back; the one
whose write landed last keeps the lease, the other gives way (before its
next slide, if it had started). Girder's metadata PUT reads and rewrites the whole
folder document, so two writes to one folder's metadata within the same
instant (another key's lease, a person editing metadata) can undo one of them:
a lost heartbeat is repaired by the next one, and a lease whose removal was
undone goes stale and is taken over.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .client import DSAClient, DSAError
from .metadata import clean_for_mongo

__all__ = ["LEASE_PREFIX", "STALE_AFTER_S", "FolderBusy", "FolderLease", "lease_field"]

log = logging.getLogger(__name__)

#: The folder metadata key of a running job's lease is this plus its analysis key.
LEASE_PREFIX = "nucleus_models_run_"
#: A lease without a heartbeat for this long belongs to a run that died.
STALE_AFTER_S = 150.0
#: Time between two heartbeats.
HEARTBEAT_EVERY_S = 30.0
#: The longest :meth:`FolderLease.release` waits for a heartbeat in progress.
RELEASE_WAIT_S = 3.0
#: Wait between writing a lease and reading it back (a simultaneous start's write lands).
SETTLE_S = 0.5


class FolderBusy(DSAError):
    """Another run of the same analysis key holds the folder."""


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def lease_field(key: str) -> str:
    """The folder metadata key of ``key``'s lease."""
    return next(iter(clean_for_mongo({LEASE_PREFIX + key: 0})))


def _pid_namespace() -> str:
    """This process's PID namespace (containers sharing a host name have their own)."""
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _boot_id() -> str:
    """This boot of this machine (a cloned VM or image keeps the host name, not this)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _dead_here(lease: dict[str, Any]) -> bool:
    """The lease names a process of this host, boot and PID namespace that no longer runs."""
    here = (socket.gethostname(), _boot_id(), _pid_namespace())
    if (lease.get("host"), lease.get("boot"), lease.get("pidns")) != here or not all(here):
        return False
    if not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, as another user's
        return False
    return False


def _lease(client: DSAClient, folder_id: str, key: str) -> dict[str, Any]:
    value = (client.get(f"folder/{folder_id}").get("meta") or {}).get(lease_field(key))
    return dict(value) if isinstance(value, dict) else {}


def _put(client: DSAClient, folder_id: str, key: str, value: dict[str, Any] | None) -> None:
    # a null value removes the key (Girder's metadata PUT without allowNull)
    body = {lease_field(key): clean_for_mongo(value) if value else None}
    client.sendRestRequest("PUT", f"folder/{folder_id}/metadata", json=body)


class FolderLease:
    """This run's hold on ``(folder, analysis key)``; see the module's docstring."""

    def __init__(self, client: DSAClient, folder_id: str, key: str, run_id: str, *, started: float):
        self.client, self.folder_id, self.key, self.run_id = client, folder_id, key, run_id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: another run took the lease over (this one was silent too long): stop
        self.lost = False
        self.started = started

    @classmethod
    def acquire(cls, client: DSAClient, folder: dict[str, Any], key: str) -> FolderLease:
        """Take the lease, or raise :class:`FolderBusy` naming the run that holds it."""
        fid, name = str(folder["_id"]), folder.get("name", folder["_id"])
        other = _lease(client, fid, key)
        now = time.time()
        if other:
            age = now - float(other.get("heartbeat_epoch") or 0)
            if age < STALE_AFTER_S and not _dead_here(other):
                raise FolderBusy(
                    f"folder {name!r}: another run of {key} is in progress (started "
                    f"{other.get('started', '?')} on {other.get('host', '?')}, last heard "
                    f"{max(age, 0):.0f} s ago); it is not started twice. Wait for it, or "
                    f"use another analysis key; a run that died frees the folder "
                    f"{STALE_AFTER_S:.0f} s after its last heartbeat"
                )
            log.warning(
                "folder %s: taking over the lease of run %s (its process is gone, or no"
                " heartbeat for %.0f s)",
                name,
                other.get("run"),
                age,
            )
        lease = cls(client, fid, key, uuid.uuid4().hex, started=now)
        try:
            for _ in range(3):
                lease._write(now, fresh=True)
                time.sleep(SETTLE_S)
                held = _lease(client, fid, key)
                if held:  # else another metadata write undid this one: write again
                    break
        except BaseException:  # the server went away, or a SIGTERM: leave no lease behind
            lease.release()
            raise
        if held.get("run") != lease.run_id:  # a run that started at the same moment won
            raise FolderBusy(
                f"folder {name!r}: another run of {key} started at the same moment "
                f"(on {held.get('host', '?')}); this one gives way"
            )
        lease._thread = threading.Thread(target=lease._beat_loop, name="lease", daemon=True)
        lease._thread.start()
        return lease

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S) and not self.lost:
            self.beat()

    def _write(self, now: float, *, fresh: bool = False) -> None:
        """Write this run's lease; unless ``fresh`` (nothing there to keep),
        read it first and set :attr:`lost` instead if another run holds it."""
        mine = {} if fresh else _lease(self.client, self.folder_id, self.key)
        if not fresh and mine and mine.get("run") != self.run_id:
            # taken over: this run went without a heartbeat for too long
            self.lost = True
            return
        mine.update(
            run=self.run_id,
            host=socket.gethostname(),
            boot=_boot_id(),
            pid=os.getpid(),
            pidns=_pid_namespace(),
            started=_iso(self.started),
            heartbeat=_iso(now),
            heartbeat_epoch=now,
        )
        _put(self.client, self.folder_id, self.key, mine)

    def beat(self) -> None:
        """Renew the heartbeat (sets :attr:`lost` if another run has taken
        the lease); never raises (logs instead: a heartbeat thread that died
        would let the lease go stale unnoticed)."""
        with self._lock:
            if self._stop.is_set() or self.lost:  # never written back once lost
                return
            try:
                self._write(time.time())
            except Exception as exc:  # any error: the thread must go on beating
                log.warning("folder %s: could not renew the lease: %s", self.folder_id, exc)

    def check(self) -> bool:
        """Read the lease now; True (and :attr:`lost` set) when another run holds
        it. A read that fails keeps the last answer (the heartbeat goes on)."""
        with self._lock:
            if not self.lost:
                try:
                    held = _lease(self.client, self.folder_id, self.key)
                    if not held:  # removed meanwhile (a metadata edit): written again
                        self._write(time.time(), fresh=True)
                    self.lost = bool(held) and held.get("run") != self.run_id
                except Exception as exc:  # an odd answer must not end the whole job
                    log.warning("folder %s: could not read the lease: %s", self.folder_id, exc)
        return self.lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's;
        never raises (logs instead). A heartbeat still retrying an unanswered
        server is not waited for beyond :data:`RELEASE_WAIT_S` (a cancelled
        job has ~10 s before docker kills it): the lease then goes stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RELEASE_WAIT_S)
        if not self._lock.acquire(timeout=RELEASE_WAIT_S):
            log.warning(
                "folder %s: the lease is left to go stale (%.0f s): its heartbeat is still"
                " waiting for the server",
                self.folder_id,
                STALE_AFTER_S,
            )
            return
        try:
            if _lease(self.client, self.folder_id, self.key).get("run") == self.run_id:
                _put(self.client, self.folder_id, self.key, None)
        except Exception as exc:  # never hides the run's own error
            log.warning("folder %s: could not remove the lease: %s", self.folder_id, exc)
        finally:
            self._lock.release()

"""A girder-client connection that retries, times out and never leaks its token.

:func:`connect` checks the server and the token once and returns a
:class:`DSAClient`: a ``girder_client.GirderClient`` whose every REST call has
a timeout, is retried with exponential backoff (and jitter) on 5xx answers,
429, 408, time-outs and dropped connections, and fails with a one-line
:class:`DSAError` whose text has the token redacted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import girder_client
import requests
import urllib3

from ..errors import NucleusModelsError

__all__ = [
    "TOKEN_ENV",
    "API_KEY_ENV",
    "DSAError",
    "GirderUnavailable",
    "GirderRequestError",
    "AuthenticationError",
    "RetryPolicy",
    "DSAClient",
    "connect",
    "redact",
    "install_log_redaction",
]

log = logging.getLogger(__name__)

#: Environment variable holding the Girder token for scripted / cron use.
TOKEN_ENV = "GIRDER_TOKEN"
#: or a Girder API key (long-lived, for cron), exchanged for a token at the start
API_KEY_ENV = "GIRDER_API_KEY"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SECRET_PATTERNS = (
    re.compile(r"(?i)((?:girder[-_]?)?token['\"]?\s*[=:]\s*['\"]?)([^&\s'\",}]+)"),
    re.compile(r"(?i)(girderToken\s+)(\S+)"),
)
_KNOWN_SECRETS: set[str] = set()


class DSAError(NucleusModelsError):
    """A Girder problem the user can act on (one line, token redacted)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class GirderUnavailable(DSAError):
    """The server did not answer (refused, time-out, 5xx) after every retry."""


class AuthenticationError(DSAError):
    """The token is missing or the server did not accept it."""


class GirderRequestError(DSAError):
    """The server answered with a non-retryable error status (4xx)."""

    def __init__(self, message: str, *, status: int, text: str = ""):
        super().__init__(message)
        self.status = status
        self.text = redact(text)


def register_secret(secret: str | None) -> None:
    """Remember a secret (a token) so that :func:`redact` removes it anywhere."""
    if secret and len(secret) >= 8:
        _KNOWN_SECRETS.add(secret)


def redact(text: object) -> str:
    """``text`` with every known token and every ``token=...`` value replaced by ``***``."""
    s = str(text)
    for secret in _KNOWN_SECRETS:
        s = s.replace(secret, "***")
    for pat in _SECRET_PATTERNS:
        s = pat.sub(r"\1***", s)
    return s


class RedactFilter(logging.Filter):
    """Redact tokens from log records (message and arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _KNOWN_SECRETS or "oken" in str(record.msg):
            record.msg = redact(record.getMessage())
            record.args = None
        return True


_FILTER = RedactFilter()
# a logger's filter sees only the records made on that very logger: list them
_LOGGERS = ("annotations", "metadata", "folder_job", "__main__")
for _name in (
    __name__,
    *(f"nucleus_models.dsa.{m}" for m in _LOGGERS),
    "urllib3.connectionpool",
    "girder_client",
):
    logging.getLogger(_name).addFilter(_FILTER)


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add the token filter to every handler of ``logger`` (default: root).

    Handler filters see records from every logger, so after this no token
    reaches a log output, whoever logs it.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


@dataclass(frozen=True)
class RetryPolicy:
    """How REST calls are retried.

    Parameters
    ----------
    attempts : int
        Tries in all (1 = no retry).
    backoff : float
        First delay in seconds; it doubles on each retry, up to ``max_delay``,
        and is scaled by a random factor in [0.5, 1] (jitter).
    connect_timeout, read_timeout : float
        Seconds to connect and to wait for an answer.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_delay: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.max_delay, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    @property
    def timeout(self) -> tuple[float, float]:
        """``requests``' (connect, read) timeout."""
        return (self.connect_timeout, self.read_timeout)


class IncompleteDownload(requests.ConnectionError):
    """A download that ended short of the file: the connection dropped or
    timed out mid-transfer, or the answer was shorter than the file's size."""

    def __init__(self, got: int, size: int | None, cause: BaseException | None = None):
        of = f" of {size}" if size is not None else ""
        if size is not None and got > size:
            text = f"the download gave {got} bytes, the file has {size}"
        elif cause is None:  # (an answer without a length, closed early)
            text = f"the download ended after {got}{of} bytes"
        else:
            timed_out = any(isinstance(a, urllib3.exceptions.TimeoutError) for a in cause.args)
            how = "timed out" if timed_out else "the connection dropped"
            text = f"{how} mid-download, after {got}{of} bytes"
        super().__init__(text)
        self.got, self.size = got, size


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a retry: time-out, dropped connection (also
    mid-answer), 5xx, 429 (too many requests) or 408 (a proxy's request time-out)."""
    if isinstance(exc, girder_client.HttpError):
        return exc.status in RETRY_STATUS
    return isinstance(
        exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError
    )


def describe(exc: BaseException) -> str:
    """One line for ``exc`` (no response bodies, no token)."""
    if isinstance(exc, girder_client.HttpError):
        return f"HTTP {exc.status} on {exc.method} {_path(exc.url)}: {_message(exc.responseText)}"
    if isinstance(exc, IncompleteDownload):
        return str(exc)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection dropped mid-answer ({type(exc).__name__})"
    if isinstance(exc, requests.Timeout):
        return f"time-out ({type(exc).__name__})"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _path(url: str) -> str:
    return redact(url).split("?", 1)[0]


def _message(text: str) -> str:
    import json

    try:
        msg = json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        msg = text
    return " ".join(redact(msg).split())[:500]


class DSAClient(girder_client.GirderClient):  # type: ignore[misc]
    """``GirderClient`` with time-outs, retries with backoff, and token redaction.

    Parameters
    ----------
    api_url : str
        E.g. ``http://127.0.0.1:8080/api/v1``.
    token : str
        A Girder token (never logged).
    retry : RetryPolicy
        Attempts, backoff and time-outs of every call.
    sleep : callable
        Waits between retries (injectable for tests).
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__(apiUrl=api_url.rstrip("/") + "/")
        register_secret(token)
        self.setToken(token)
        self.api_url = api_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._session = requests.Session()  # persistent connections

    def __repr__(self) -> str:
        return f"DSAClient({self.api_url!r})"

    def sendRestRequest(  # noqa: N802 (girder_client's name)
        self,
        method: str,
        path: str,
        parameters: dict[str, Any] | None = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        jsonResp: bool = True,  # noqa: N803
        *,
        attempts: int | None = None,
        retry_log_level: int = logging.WARNING,
        **kwargs: Any,
    ) -> Any:
        """girder_client's request, with a timeout and retries on transient errors.

        Raises
        ------
        GirderUnavailable
            Still failing after ``attempts`` tries.
        GirderRequestError
            A non-retryable error status (the token is redacted from it).
        """
        kwargs.setdefault("timeout", self.retry.timeout)
        send = super().sendRestRequest

        def once(attempt: int) -> Any:
            if attempt and hasattr(data, "seek"):
                data.seek(0)  # a retried POST/PUT sends its whole body again
            return send(method, path, parameters, data, files, json, headers, jsonResp, **kwargs)

        return self._retrying(
            method, path, once, attempts=attempts, retry_log_level=retry_log_level
        )

    def _retrying(
        self,
        method: str,
        path: str,
        once: Callable[[int], Any],
        *,
        attempts: int | None = None,
        retry_log_level: int = logging.WARNING,
    ) -> Any:
        """``once(attempt)`` until it returns, retried on transient errors
        under :attr:`retry` (see :meth:`sendRestRequest`)."""
        n = max(1, attempts if attempts is not None else self.retry.attempts)
        for attempt in range(n):
            try:
                return once(attempt)
            except (girder_client.HttpError, requests.RequestException) as exc:
                if attempt and method.upper() == "DELETE" and _gone(exc):
                    return None  # an earlier try did delete it: its answer was lost
                if not is_transient(exc):
                    raise _as_error(exc, method, path) from None
                if attempt + 1 >= n:
                    raise GirderUnavailable(
                        f"Girder at {self.api_url} failed {n} time(s) on {method} {path}: "
                        f"{describe(exc)}"
                    ) from None
                wait = self.retry.delay(attempt)
                log.log(
                    retry_log_level,
                    "%s %s: %s; retry %d/%d in %.1f s",
                    method,
                    path,
                    describe(exc),
                    attempt + 1,
                    n - 1,
                    wait,
                )
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def download_file(
        self, file_id: str, dest: str, *, size: int | None = None, chunk: int = 1 << 22
    ) -> str:
        """Download a Girder file to ``dest``, whole or not at all.

        It is written to ``dest + ".part"`` and renamed ``dest`` once
        complete. A transfer that breaks off (the connection dropped or timed
        out mid-transfer, an answer shorter than its Content-Length, or than
        ``size``, the file's size in Girder, which also catches a dropped
        answer that had no length) is retried from the start under
        :attr:`retry`, as every request is; the partial file is removed,
        also when every try fails.

        Raises
        ------
        GirderUnavailable
            Still failing after the policy's attempts (one line).
        GirderRequestError
            A non-retryable error status (e.g. 404: no such file).
        """
        tmp = dest + ".part"
        path = f"file/{file_id}/download"
        send = super().sendRestRequest

        def once(attempt: int) -> str:
            resp = send("GET", path, jsonResp=False, stream=True, timeout=self.retry.timeout)
            got = 0
            with resp, open(tmp, "wb") as f:
                try:
                    for block in resp.iter_content(chunk):
                        f.write(block)
                        got += len(block)
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                    # (bytes that came before the drop in a block never written count too)
                    got = max(got, int(getattr(resp.raw, "tell", lambda: 0)() or 0))
                    raise IncompleteDownload(got, size, exc) from None
            if size is not None and got != size:
                raise IncompleteDownload(got, size)
            os.replace(tmp, dest)
            return dest

        try:
            return str(self._retrying("GET", path, once))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)  # a partial download never stays behind

    def upload_bytes_to_item(self, item_id: str, name: str, payload: bytes, mime: str) -> Any:
        """Upload ``payload`` as a new file of ``item_id``; returns the file.

        Up to :attr:`MAX_CHUNK_SIZE` (the summary CSV), in one request: the
        payload is the body of ``POST file``, which Girder answers only once
        it has made the file and ended the upload. A try whose answer is lost
        is not sent again blindly: the item is first searched for a file of
        that name and size it did not hold before, so a lost answer leaves
        neither a second file nor an unfinished upload.

        Larger, Girder's chunked upload (``POST file``, then ``POST
        file/chunk`` per :attr:`MAX_CHUNK_SIZE`), each request retried on
        transient errors under :attr:`retry` (by :meth:`sendRestRequest`, not
        again around it). A chunk whose retry is refused with a wrong offset
        (Girder stored it but its answer was lost) resumes from the offset
        Girder reports (``GET file/offset``); if that was the last chunk,
        Girder finished the file and it is returned. An upload that fails is
        cancelled in Girder (``DELETE file/upload/{id}``) where it can be.

        A ``POST file`` try that may have reached Girder unanswered (time-out,
        dropped connection, 500, 504) may have started an upload whose id
        this side never learnt: this user's unfinished uploads of that name
        and size to the item are cancelled (listing them, ``GET
        system/uploads``, needs an admin's token; without one, one warning
        line says what an admin may have to clear).

        Raises
        ------
        GirderUnavailable
            A request still failing after the policy's attempts.
        GirderRequestError
            A non-retryable error status (e.g. 403), at once.
        """
        size = len(payload)
        params = {
            "parentType": "item",
            "parentId": item_id,
            "name": name,
            "size": size,
            "mimeType": mime,
        }
        if 0 < size <= self.MAX_CHUNK_SIZE:
            return self._upload_whole(item_id, params, payload)
        missed: list[BaseException] = []  # tries of POST file that may have reached Girder
        upload_id = None
        try:
            upload = self._retrying("POST", "file", lambda _: self._post_file(params, missed))
            if size == 0:
                return upload  # Girder made the (empty) file at once
            upload_id = upload["_id"]
            return self._upload_chunks(item_id, name, payload, upload)
        except BaseException:
            if upload_id is not None:
                with contextlib.suppress(DSAError):  # best effort: the server may be gone
                    self.sendRestRequest(
                        "DELETE",
                        f"file/upload/{upload_id}",
                        attempts=2,
                        retry_log_level=logging.DEBUG,
                    )
            raise
        finally:
            if missed:
                self._clear_unfinished(item_id, name, size, keep=upload_id, cause=missed[-1])

    def _upload_whole(self, item_id: str, params: dict[str, Any], payload: bytes) -> Any:
        """``payload`` as the body of ``POST file`` (see :meth:`upload_bytes_to_item`)."""
        name, size = params["name"], params["size"]
        missed: list[BaseException] = []  # tries that may have reached Girder
        before = {f["_id"] for f in self._files(item_id)}
        made: list[Any] = []

        def once(attempt: int) -> Any:
            if missed:  # an earlier try may have made the file, its answer lost
                with contextlib.suppress(DSAError):
                    made.extend(
                        f
                        for f in self._files(item_id, attempts=1)
                        if f["_id"] not in before and (f.get("name"), f.get("size")) == (name, size)
                    )
                if made:
                    log.info(
                        "upload of %s to item %s: made although its answer was lost", name, item_id
                    )
                    return max(made, key=lambda f: str(f.get("created", "")))
            return self._post_file(
                params, missed, data=payload, headers={"Content-Type": "application/octet-stream"}
            )

        try:
            return self._retrying("POST", "file", once)
        finally:
            if missed and not made:  # (a file made ended its upload: none is left)
                self._clear_unfinished(item_id, name, size, cause=missed[-1])

    def _post_file(self, params: dict[str, Any], missed: list[BaseException], **kwargs: Any) -> Any:
        """One try of ``POST file`` (:meth:`_retrying` retries it), a failure
        that may have reached Girder (:func:`_may_have_landed`) noted in ``missed``."""
        try:
            return super().sendRestRequest(
                "POST", "file", params, timeout=self.retry.timeout, **kwargs
            )
        except (girder_client.HttpError, requests.RequestException) as exc:
            if _may_have_landed(exc):
                missed.append(exc)
            raise

    def _files(self, item_id: str, attempts: int | None = None) -> list[dict[str, Any]]:
        """The item's files (all of them: ``limit=0``)."""
        return list(
            self.sendRestRequest(
                "GET", f"item/{item_id}/files", parameters={"limit": 0}, attempts=attempts
            )
            or []
        )

    def _clear_unfinished(
        self, item_id: str, name: str, size: int, *, cause: BaseException, keep: str | None = None
    ) -> None:
        """Cancel this user's unfinished uploads of ``name`` (``size`` bytes)
        to ``item_id`` but ``keep``: ones a ``POST file`` whose answer was lost
        may have started. Girder lists them to admins only; for anyone else
        one warning line says what an admin may have to clear."""
        try:
            me = self.sendRestRequest("GET", "user/me", attempts=2, retry_log_level=logging.DEBUG)
            started = self.sendRestRequest(
                "GET",
                "system/uploads",
                parameters={
                    "parentId": item_id,
                    "userId": (me or {}).get("_id", ""),
                    "includeUntracked": "false",
                    "limit": 0,
                },
                attempts=2,
                retry_log_level=logging.DEBUG,
            )
            for up in started or []:
                if up.get("_id") != keep and (up.get("name"), up.get("size")) == (name, size):
                    self.sendRestRequest(
                        "DELETE", f"file/upload/{up['_id']}", retry_log_level=logging.DEBUG
                    )
                    log.info("cancelled the unfinished upload %s of %s", up["_id"], name)
        except DSAError as exc:
            refused = isinstance(exc, GirderRequestError) and exc.status in (401, 403)
            why = "listing unfinished uploads needs an admin" if refused else str(exc)
            log.warning(
                "Girder may keep an unfinished upload of %s in item %s (a request to start it "
                "went unanswered: %s; %s): an admin can clear it with DELETE "
                "system/uploads?parentId=%s",
                name,
                item_id,
                describe(cause),
                why,
                item_id,
            )

    def _upload_chunks(
        self, item_id: str, name: str, payload: bytes, upload: dict[str, Any]
    ) -> Any:
        """Send ``payload`` to the started ``upload`` a chunk at a time (see
        :meth:`upload_bytes_to_item`); returns the file made."""
        size = len(payload)
        upload_id = upload["_id"]
        offset, resumes = 0, 0
        while True:
            chunk = payload[offset : offset + self.MAX_CHUNK_SIZE]
            path = f"file/chunk?offset={offset}&uploadId={upload_id}"  # (logged so)
            try:
                answer = self.sendRestRequest("POST", path, data=io.BytesIO(chunk))
            except GirderRequestError as exc:
                if exc.status != 400 or resumes >= self.retry.attempts:
                    raise
                resumes += 1
                try:  # a lost answer: the retry was refused as Girder has the chunk
                    server = int(
                        self.get("file/offset", parameters={"uploadId": upload_id})["offset"]
                    )
                except GirderRequestError:  # no such upload (any more)
                    if offset + len(chunk) < size:
                        raise exc from None
                    answer = self._finished_file(
                        item_id, name, size, str(upload.get("created", ""))
                    )
                    if answer is None:
                        raise exc from None
                    return answer
                if server == offset or not 0 <= server < size:
                    raise exc from None
                log.info(
                    "upload %s of %s: Girder has %d bytes, resuming there",
                    upload_id,
                    name,
                    server,
                )
                offset = server
                continue
            offset += len(chunk)
            if offset >= size:
                return answer

    def _finished_file(
        self, item_id: str, name: str, size: int, since: str
    ) -> dict[str, Any] | None:
        """The newest file of ``item_id`` named ``name`` of ``size`` bytes made
        since ``since`` (the upload's start): the file an upload whose last
        chunk's answer was lost made."""
        # (compared to the second: the upload's answer has microseconds, Mongo keeps ms)
        files = [
            f
            for f in self.listFile(item_id)
            if (f.get("name"), f.get("size")) == (name, size)
            and str(f.get("created", ""))[:19] >= since[:19]
        ]
        return max(files, key=lambda f: str(f.get("created", "")), default=None)


def _may_have_landed(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` may have reached Girder and
    been acted on: its answer timed out or was cut off, or Girder (or the proxy
    waiting on it) failed midway; not a refused connection, nor a 502/503/429."""
    if isinstance(exc, girder_client.HttpError):
        return exc.status in (500, 504)
    if isinstance(exc, requests.ConnectTimeout):
        return False
    if isinstance(exc, requests.ConnectionError):
        return "NewConnectionError" not in repr(exc.args) and "refused" not in str(exc)
    return isinstance(exc, requests.Timeout | requests.exceptions.ChunkedEncodingError)


def _gone(exc: BaseException) -> bool:
    return isinstance(exc, girder_client.HttpError) and exc.status in (400, 404)


def _as_error(exc: BaseException, method: str, path: str) -> DSAError:
    if isinstance(exc, girder_client.HttpError):
        if exc.status == 401:
            return AuthenticationError(
                f"the Girder token was not accepted ({method} {path}: {_message(exc.responseText)})"
            )
        return GirderRequestError(
            f"{method} {path} failed: HTTP {exc.status}: {_message(exc.responseText)}",
            status=exc.status,
            text=exc.responseText,
        )
    return DSAError(f"{method} {path} failed: {describe(exc)}")


def connect(
    api_url: str,
    token: str | None = None,
    *,
    retry: RetryPolicy | None = None,
    connect_attempts: int = 3,
) -> DSAClient:
    """Connect to Girder and check the token.

    Parameters
    ----------
    api_url : str
        The API root, e.g. ``http://127.0.0.1:8080/api/v1``.
    token : str, optional
        A Girder token; default: the ``GIRDER_TOKEN`` environment variable.
    connect_attempts : int
        Tries for the first call (an unreachable server fails quickly, and
        quietly: the caller reports the one-line error), and no more than
        ``retry``'s (``--retries 0``: one).

    Raises
    ------
    AuthenticationError
        No token, or the server does not accept it.
    GirderUnavailable
        The server cannot be reached.
    """
    token = token or os.environ.get(TOKEN_ENV, "")
    api_key = "" if token else os.environ.get(API_KEY_ENV, "").strip()
    if not api_url:  # HistomicsUI fills it in; from a shell it is easily left out
        raise DSAError(
            "no Girder API URL was given (--api-url, e.g. https://dsa.example.org/api/v1)"
        )
    if not api_url.startswith(("http://", "https://")):
        raise DSAError(f"the Girder API URL must start with http:// or https://, got {api_url!r}")
    if not token and not api_key:
        raise AuthenticationError(
            f"no Girder token was given (the CLI's --girder-token, or ${TOKEN_ENV} or "
            f"${API_KEY_ENV} from cron)"
        )
    client = DSAClient(api_url, token, retry=retry)
    connect_attempts = min(connect_attempts, client.retry.attempts)
    try:
        if api_key:  # a long-lived key (cron): exchanged for a token of its scope
            register_secret(api_key)
            try:
                answer = client.sendRestRequest(
                    "POST",
                    "api_key/token",
                    parameters={"key": api_key},
                    attempts=connect_attempts,
                    retry_log_level=logging.DEBUG,
                )
            except GirderRequestError as exc:
                if exc.status != 400:
                    raise
                raise AuthenticationError(
                    f"the Girder API key in ${API_KEY_ENV} was not accepted by {api_url} "
                    f"(unknown, inactive or expired): {_message(exc.text)}"
                ) from None
            token = str(answer["authToken"]["token"])
            register_secret(token)
            client.setToken(token)
        me = client.sendRestRequest(
            "GET", "user/me", attempts=connect_attempts, retry_log_level=logging.DEBUG
        )
    except GirderRequestError as exc:
        raise DSAError(f"{api_url} does not look like a Girder API: {exc}") from None
    if not me:
        raise AuthenticationError(
            f"the Girder token was not accepted by {api_url}: unknown or expired, or made from "
            "an API key whose scopes leave out reading the user (the job needs read and write "
            f"access to the data; a cron job can give the API key itself in ${API_KEY_ENV})"
        )
    log.debug("connected to %s as %s", client.api_url, me.get("login"))
    return client

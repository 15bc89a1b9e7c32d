"""The HTTP client of the client commands: `RUNNER_URL` with the bearer `RUNNER_TOKEN`.

Every failure becomes a `CliError` whose line a person can act on: the API's `detail (code)`, or
what to check when the runner cannot be reached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from codex_runner import __version__
from codex_runner.cli.common import CliError
from codex_runner.config import Settings

T = TypeVar("T")

REQUEST_TIMEOUT_SECONDS = 30.0
# How long a wait or a follow keeps retrying while the runner is unreachable (e.g. restarting).
UNREACHABLE_GRACE_SECONDS = 30.0


# Answers that say "not now" rather than "no": the database did not answer (503 `unavailable`), or a
# proxy in front of a restarting runner could not reach it (502, 504).
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class RunnerUnreachable(CliError):
    """The runner did not answer at all; waits retry these for a while."""


class RunnerBusy(CliError):
    """The runner, or a proxy in front of it, answered but cannot serve now (502, 503, 504, or 429
    with `Retry-After`); waits and follows retry these for a while, as they do `RunnerUnreachable`."""

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


def display_url(url: str) -> str:
    """The URL without user information, fit for an error line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RunnerClient:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        # Blanks around it are no part of a token (the server ignores them too); a trailing one,
        # pasted or read from a file, made httpx refuse to send the header at all.
        token = token.strip(" \t") if token else token
        if not token:
            raise CliError(
                "RUNNER_TOKEN is not set; create a token with `codex-runner tokens create --user NAME` "
                "and export it as RUNNER_TOKEN"
            )
        if not token.isascii() or not token.isprintable():
            raise CliError("RUNNER_TOKEN: must be printable ASCII")
        try:
            parsed = urlsplit(url)
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            # Not repeated: it may hold a password (refused below, once it parses).
            raise CliError("RUNNER_URL is not a valid URL (check its host and port)") from None
        if parsed.scheme not in {"http", "https"} or not parsed.hostname:
            raise CliError(f"RUNNER_URL: expected an http:// or https:// URL, got {display_url(url)!r}")
        if parsed.query or parsed.fragment:
            # httpx replaces a base URL's query with the request's, and its path with it: every
            # request went to the wrong route and came back 404 `Not Found`.
            raise CliError(
                f"RUNNER_URL: must not have a query (?…) or fragment (#…), got {display_url(url)!r}"
            )
        if parsed.username is not None or parsed.password is not None:
            # httpx would send them as Basic auth in place of the bearer token.
            raise CliError(
                "RUNNER_URL: must not hold a user name or password; the token goes in RUNNER_TOKEN"
            )
        self.url = display_url(url)
        self.hint = ""  # appended to "cannot reach": see `_serve_url_hint`
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"codex-runner-cli/{__version__}"},
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerClient:
        client = cls(settings.url, settings.token)
        client.hint = _serve_url_hint(settings)
        return client

    def __enter__(self) -> RunnerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body) of a 2xx answer; anything else raises `CliError`."""
        try:
            response = self._http.request(method, path, params=params, json=json, headers=headers)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.is_success:
            try:
                return response.status_code, response.json()
            except ValueError:
                raise CliError(f"the runner at {self.url} answered something that is not JSON") from None
        raise _api_error(response)

    @contextlib.contextmanager
    def stream(
        self,
        path: str,
        *,
        params: Any = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        """A streamed GET: the 2xx response with its body still to read. A non-2xx answer raises
        `CliError` like `request`; a transport failure, also while reading the body, raises
        `RunnerUnreachable`."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            with self._http.stream("GET", path, params=params, headers=headers, **extra) as response:
                if not response.is_success:
                    response.read()
                    raise _api_error(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: httpx.TransportError) -> RunnerUnreachable:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RunnerUnreachable(
                f"cannot reach the runner at {self.url}: is `codex-runner serve` running?{self.hint}"
            )
        if isinstance(exc, httpx.TimeoutException):
            return RunnerUnreachable(f"the runner at {self.url} did not answer in time")
        return RunnerUnreachable(f"request to the runner at {self.url} failed ({type(exc).__name__})")

    def get(self, path: str, params: Any = None) -> Any:
        return self.request("GET", path, params=params)[1]

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return self.request("POST", path, json=body, headers=headers)


def _api_error(response: httpx.Response) -> CliError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
        message, code = f"the runner answered HTTP {response.status_code}", f"http_{response.status_code}"
        if response.status_code in TRANSIENT_STATUSES:
            return RunnerBusy(message, code=code, retry_after=_retry_after(response))
        return CliError(message, code=code)
    detail: str = body["detail"]
    # Validation errors carry the specifics in `errors`; add them unless the detail already says it.
    items = body.get("errors")
    if not isinstance(items, list):
        items = []
    specifics = [
        f"{'.'.join(str(p) for p in item.get('loc', []) if p != 'body')}: {item.get('msg')}"
        for item in items
        if isinstance(item, dict) and str(item.get("msg")) not in detail
    ]
    if specifics:
        detail = f"{detail}: {'; '.join(specifics)}"
    if response.status_code == 404 and detail.startswith("no route "):
        detail = f"{detail}: is RUNNER_URL right?"  # the runner answered, but not on that path
    if response.status_code == 401:
        # The CLI's token comes from one place; say which, and where another one comes from.
        detail = f"{detail}: check RUNNER_TOKEN (`codex-runner tokens create` makes one)"
    if response.status_code == 429 and (retry := response.headers.get("Retry-After")):
        detail = f"{detail} (retry after {retry} s)"
    api_code = body.get("code")
    code = api_code if isinstance(api_code, str) else f"http_{response.status_code}"
    retry_after = _retry_after(response)
    if response.status_code in TRANSIENT_STATUSES or (
        response.status_code == 429 and retry_after is not None
    ):
        # A 429 with `Retry-After` (`too_many_streams`, `queue_full`) frees up by itself.
        return RunnerBusy(detail, code=code, retry_after=retry_after)
    return CliError(detail, code=code)


def _retry_after(response: httpx.Response) -> float | None:
    """A `Retry-After` in seconds (the HTTP-date form is not used by the runner: ignored)."""
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


def patiently(
    call: Callable[[], T],
    *,
    grace: float = UNREACHABLE_GRACE_SECONDS,
    pause: float = 1.0,
    notice: Callable[[str], None] | None = None,
) -> T:
    """`call()`, retried while the runner is unreachable or answers "not now" (502, 503, 504) for up
    to `grace` seconds: a wait of many minutes should survive a runner restart, also behind a
    proxy, and a database that does not answer for a moment. `notice` hears each retry (a line for
    a person: a long wait shows progress, SPEC §11)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            return call()
        except (RunnerUnreachable, RunnerBusy) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            wait = min(max(pause, getattr(exc, "retry_after", None) or 0.0), left)
            if notice is not None:
                notice(f"{exc.reason()}; trying again in {wait:.0f} s ({left:.0f} s left)")
            time.sleep(wait)


def _serve_url_hint(settings: Settings) -> str:
    """RUNNER_URL left at its default while these settings put `serve` on another port (`port =`
    in runner.toml, RUNNER_PORT): the client went to 8787 and asked whether `serve` ran. Say
    where it listens instead."""
    if settings.url != Settings.url or settings.port == Settings.port:
        return ""
    host = "127.0.0.1" if settings.host in {"0.0.0.0", "::", "localhost"} else settings.host
    host = f"[{host}]" if ":" in host else host
    return f" `serve` listens on port {settings.port} here (RUNNER_PORT): set RUNNER_URL=http://{host}:{settings.port}"

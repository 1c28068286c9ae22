"""Bounded Hub traffic: a timeout on every request, bounded retries of idempotent ones, backoff.

huggingface_hub 2.4's shared ``httpx2.Client`` has no timeout (``timeout=None``) and most
``HfApi`` calls pass ``timeout=None`` explicitly, so a server that accepts a connection and then
says nothing hangs ``repo_info`` forever; its own downloader resets its retry budget whenever a
byte arrives, so a server that trickles and stalls is retried without end. We install, once per
policy, a client whose request hook fills every missing timeout with ours (a hook, not a
transport, so proxy transports get it too) and that follows at most ``MAX_REDIRECTS`` redirects.
Retries of our own requests (``with_retries``) are for GET and HEAD only, on the failures that a
second try can cure: timeouts, refused or dropped connections, 408, 429 and 5xx answers.

==========================  =======  =====================================================
environment variable        default  meaning
==========================  =======  =====================================================
LORATOOL_HUB_TIMEOUT        30       seconds a request may wait for a connection or a byte
                                     (``pull --timeout`` overrides it)
LORATOOL_HUB_RETRIES        3        further tries of a failed idempotent request
LORATOOL_HUB_BACKOFF        1.0      seconds before the first retry, doubled each time (≤ 8)
==========================  =======  =====================================================
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import UsageError

MAX_REDIRECTS = 10  # the Hub needs one or two (resolve -> CDN); a loop fails fast
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_WAIT = 8.0
T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """How long to wait and how often to try again."""

    timeout: float  # seconds without a connection or a byte before a request is given up
    retries: int  # further attempts after the first
    backoff: float  # first wait between attempts; doubled each time, at most _MAX_WAIT

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before attempt ``attempt + 1`` (``attempt`` counts from 0)."""
        base = min(_MAX_WAIT, self.backoff * (2**attempt))
        # A server's Retry-After is honoured, within reason: it must not stall us past the bound.
        return max(base, min(retry_after or 0.0, _MAX_WAIT))


def _number(name: str, default: float, *, cast: type = float, minimum: float = 0.0) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or value != value:  # NaN
        raise UsageError(f"{name}={raw!r} is not a number ≥ {minimum:g}", code="bad-setting")
    return value


def policy(timeout: float | None = None) -> Policy:
    """The policy from the environment, with an explicit ``timeout`` (``--timeout``) first."""
    t = timeout if timeout is not None else _number("LORATOOL_HUB_TIMEOUT", 30.0, minimum=0.01)
    if not t > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {t!r}")
    return Policy(
        timeout=float(t),
        retries=_number("LORATOOL_HUB_RETRIES", 3, cast=int),
        backoff=_number("LORATOOL_HUB_BACKOFF", 1.0),
    )


_installed: Policy | None = None


def install(p: Policy) -> None:
    """Make huggingface_hub's shared client use ``p``'s timeout and our redirect bound."""
    global _installed
    if _installed == p:
        return
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    seconds = p.timeout

    def bound(request: Any) -> None:
        # httpx2 reads the timeout from the request's extensions, where None means "forever".
        # Ours replaces the client's own defaults too (10 s for metadata and downloads), so
        # --timeout 120 on a slow link means 120.
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), seconds)

    def factory() -> Any:
        client = default_client_factory()
        client.event_hooks["request"].append(bound)
        client.max_redirects = MAX_REDIRECTS
        return client

    set_client_factory(factory)
    _installed = p


def retryable(e: BaseException) -> bool:
    """A failure a second identical GET or HEAD may not meet."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, httpx2.TransportError) and not isinstance(e, httpx2.UnsupportedProtocol):
        return True  # timeouts, refused and dropped connections, broken reads
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return e.response.status_code in RETRY_STATUSES
    return False


def retry_after(e: BaseException) -> float | None:
    resp = getattr(e, "response", None)
    try:
        return float(resp.headers.get("Retry-After")) if resp is not None else None
    except (TypeError, ValueError):
        return None


def with_retries(p: Policy, call: Callable[[], T]) -> T:
    """``call()``, tried again up to ``p.retries`` times after a retryable failure."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            if attempt >= p.retries or not retryable(e):
                raise
            time.sleep(p.wait(attempt, retry_after(e)))
            attempt += 1

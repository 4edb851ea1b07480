"""Counters for the policy server and their Prometheus text exposition.

`PolicyMetrics` is a plain in-process counter set: the asyncio server updates it from one event
loop thread, so no locking is needed.  `PolicyMetrics.render_prometheus` produces the Prometheus
text format (version 0.0.4); `MetricsEndpoint` serves it over a tiny HTTP/1.0 server that only
binds to loopback addresses.

Label sets are bounded on purpose: actions are counted per *class* (``dunno``, ``ok``,
``reject``, ``5xx``, ``4xx`` ... ``other``), never per action text, and malformed requests per
parser reason code, so a hostile peer cannot grow the exposition without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import itertools
import logging
from collections.abc import Callable
from typing import Final

from domainpolicy._errors import InvalidConfiguration, shown

__all__ = [
    "ACTION_CLASSES",
    "LATENCY_BUCKETS",
    "MetricsEndpoint",
    "PolicyMetrics",
    "action_class",
]

LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds (seconds) of the request latency histogram; ``+Inf`` is implied."""

_KEYWORDS: Final = frozenset(
    {
        "OK",
        "DUNNO",
        "REJECT",
        "DEFER",
        "DEFER_IF_REJECT",
        "DEFER_IF_PERMIT",
        "HOLD",
        "DISCARD",
        "FILTER",
        "REDIRECT",
        "BCC",
        "PREPEND",
        "WARN",
        "INFO",
        "SHUTDOWN",
    }
)
ACTION_CLASSES: Final = (
    *sorted(k.lower() for k in _KEYWORDS),
    "2xx",
    "4xx",
    "5xx",
    "other",
)
"""Every value `action_class` can return (the label values of the action counter)."""

_PREFIX: Final = "domainpolicy_policy"
_log = logging.getLogger("domainpolicy.integrations.metrics")


def action_class(action: str) -> str:
    """Classify a Postfix action text into one of `ACTION_CLASSES`.

    ``550 5.7.750 ...`` is ``5xx``, ``451 4.3.0 ...`` is ``4xx``, ``DUNNO`` is ``dunno``, a
    keyword followed by text (``REJECT no thanks``) counts as its keyword; anything else is
    ``other``.
    """
    word = action.split(None, 1)[0] if action.strip() else ""
    if len(word) == 3 and word.isascii() and word.isdigit() and word[0] in "245":
        return f"{word[0]}xx"
    upper = word.upper()
    if upper in _KEYWORDS:
        return upper.lower()
    return "other"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class PolicyMetrics:
    """Counters of one policy server: requests, actions by class, problems and latency.

    All methods are cheap and synchronous; call them from the event loop thread only.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        """Create zeroed counters with the given latency histogram *buckets* (seconds).

        Raises:
            InvalidConfiguration: *buckets* is empty or not strictly increasing.
        """
        if not buckets or any(b <= a for a, b in itertools.pairwise(buckets)):
            raise InvalidConfiguration(
                [f"latency buckets must be strictly increasing, got {shown(buckets)}"]
            )
        self.buckets: tuple[float, ...] = tuple(buckets)
        self.requests = 0
        self.actions: dict[str, int] = dict.fromkeys(ACTION_CLASSES, 0)
        self.malformed: dict[str, int] = {}
        self.timeouts = 0
        self.handler_errors = 0
        self.sanitised = 0
        self.connections = 0
        self.connections_active = 0
        self.connections_refused = 0
        self.reloads = 0
        self.reload_failures = 0
        self._bucket_counts = [0] * (len(self.buckets) + 1)
        self.latency_sum = 0.0
        # The tenant registry the decisions follow: () -> (version, stale seconds); None when
        # the policy follows no registry (then the two gauges are not exported).
        self.registry: Callable[[], tuple[int | None, float]] | None = None

    def observe(self, action: str, seconds: float) -> None:
        """Count one answered request with its *action* text and handling latency."""
        self.requests += 1
        self.actions[action_class(action)] += 1
        self._bucket_counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.latency_sum += seconds

    def count_malformed(self, reason: str) -> None:
        """Count one malformed request, by parser reason code."""
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    def latency_counts(self) -> list[tuple[float, int]]:
        """Cumulative histogram: ``(upper bound, requests at or below it)``, ``inf`` last."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*self.buckets, float("inf")), self._bucket_counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    def snapshot(self) -> dict[str, object]:
        """All counters as a JSON-friendly dictionary (for ``--json`` dumps and tests)."""
        return {
            "requests": self.requests,
            "actions": {k: v for k, v in self.actions.items() if v},
            "malformed": dict(self.malformed),
            "timeouts": self.timeouts,
            "handler_errors": self.handler_errors,
            "sanitised": self.sanitised,
            "connections": self.connections,
            "connections_active": self.connections_active,
            "connections_refused": self.connections_refused,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "latency_sum_seconds": self.latency_sum,
            "latency_buckets": [[b, c] for b, c in self.latency_counts()],
        }

    def render_prometheus(self) -> str:
        """Render every counter in the Prometheus text exposition format 0.0.4."""
        p = _PREFIX
        lines: list[str] = []

        def scalar(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP {p}_{name} {help_text}")
            lines.append(f"# TYPE {p}_{name} {kind}")
            lines.append(f"{p}_{name} {_number(value)}")

        scalar("requests_total", "counter", "Policy requests answered.", self.requests)
        lines.append(f"# HELP {p}_actions_total Answers by action class.")
        lines.append(f"# TYPE {p}_actions_total counter")
        for name in ACTION_CLASSES:
            lines.append(f'{p}_actions_total{{class="{name}"}} {self.actions[name]}')
        lines.append(f"# HELP {p}_malformed_total Malformed requests (no reply, disconnect).")
        lines.append(f"# TYPE {p}_malformed_total counter")
        for reason in sorted(self.malformed):
            count = self.malformed[reason]
            lines.append(f'{p}_malformed_total{{reason="{_escape_label(reason)}"}} {count}')
        scalar(
            "timeouts_total",
            "counter",
            "Requests answered with the fallback action because the handler timed out.",
            self.timeouts,
        )
        scalar(
            "handler_errors_total",
            "counter",
            "Requests answered with the fallback action because the handler failed.",
            self.handler_errors,
        )
        scalar(
            "sanitised_actions_total",
            "counter",
            "Handler action texts that had to be sanitised (handler bug).",
            self.sanitised,
        )
        scalar("connections_total", "counter", "Connections accepted.", self.connections)
        scalar("connections_active", "gauge", "Connections open now.", self.connections_active)
        scalar(
            "connections_refused_total",
            "counter",
            "Connections closed at once because the connection limit was reached.",
            self.connections_refused,
        )
        if self.registry is not None:
            version, stale = self.registry()
            if version is not None:
                scalar(
                    "registry_version",
                    "gauge",
                    "Version of the tenant registry decisions are made with.",
                    version,
                )
                scalar(
                    "registry_stale_seconds",
                    "gauge",
                    "Seconds the tenant registry has not been refreshed because the store "
                    "failed (0: fresh).",
                    stale,
                )
        scalar("reloads_total", "counter", "Successful reloads.", self.reloads)
        scalar("reload_failures_total", "counter", "Failed reloads.", self.reload_failures)
        lines.append(f"# HELP {p}_request_duration_seconds Time to answer a request.")
        lines.append(f"# TYPE {p}_request_duration_seconds histogram")
        for bound, count in self.latency_counts():
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{p}_request_duration_seconds_bucket{{le="{le}"}} {count}')
        lines.append(f"{p}_request_duration_seconds_sum {self.latency_sum!r}")
        lines.append(f"{p}_request_duration_seconds_count {self.requests}")
        return "\n".join(lines) + "\n"


_HEAD_LIMIT: Final = 8192
_HEAD_TIMEOUT: Final = 5.0


class MetricsEndpoint:
    """A tiny HTTP/1.0 server on loopback answering ``GET /metrics`` with the exposition.

    Anything else gets 404 (unknown path), 405 (method other than GET/HEAD) or 400, and every
    response closes the connection.  It is meant for a local Prometheus agent or ``curl``.
    """

    def __init__(self, render: Callable[[], str]) -> None:
        """Serve the text returned by *render* (called once per scrape)."""
        self._render = render
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful after binding port 0).

        Raises:
            RuntimeError: the endpoint is not started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics endpoint is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind *host*:*port* (port 0 picks a free port) and start serving.

        Raises:
            InvalidConfiguration: *host* is not a loopback IP address.
            OSError: the address could not be bound.
        """
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError as exc:
            raise InvalidConfiguration(
                [f"metrics host {shown(host)} is not an IP address"]
            ) from exc
        if not loopback:
            raise InvalidConfiguration(
                [f"metrics host {shown(host)} is not a loopback address; it must not be exposed"]
            )
        self._server = await asyncio.start_server(self._serve, host, port)

    async def close(self) -> None:
        """Stop listening and wait until the listening socket is closed."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await self._respond(writer, 400, "bad request\n", head_only=False)
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, "bad request\n", head_only=False)
                return
            method, target = parts[0], parts[1]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "method not allowed\n", head_only=False)
                return
            if target.split("?", 1)[0] != "/metrics":
                await self._respond(writer, 404, "not found\n", head_only=method == "HEAD")
                return
            await self._respond(writer, 200, self._render(), head_only=method == "HEAD")
        except (ConnectionError, OSError) as exc:
            _log.debug("metrics client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, body: str, *, head_only: bool
    ) -> None:
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        payload = body.encode("utf-8")
        content_type = "text/plain; version=0.0.4; charset=utf-8" if status == 200 else "text/plain"
        head = (
            f"HTTP/1.0 {status} {reasons[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        writer.write(head if head_only else head + payload)
        await writer.drain()

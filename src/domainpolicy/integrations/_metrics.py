"""Counters for the policy server, exposed to Prometheus with ``prometheus_client``.

`PolicyMetrics` is a plain in-process counter set: the asyncio server updates it from one event
loop thread, so no locking is needed and the hot path pays a few integer additions.  Its
exposition goes through ``prometheus_client`` (the optional ``metrics`` extra,
``pip install 'domainpolicy[metrics]'``): a custom collector reads the counters at scrape time
into a `prometheus_client.CollectorRegistry` of its own (`PolicyMetrics.registry`; never the
global default registry, so tests and several servers in one process do not collide), which
renders the Prometheus text format (`PolicyMetrics.render_prometheus`) or OpenMetrics, chosen
by the scraper's ``Accept`` header at `MetricsEndpoint`, ``prometheus_client``'s threaded HTTP
server, bound to loopback addresses only.  Without the extra the counters still count
(`PolicyMetrics.snapshot`); only the exposition raises `InvalidConfiguration` naming the
extra.

Label sets are bounded on purpose: actions are counted per *class* (``dunno``, ``ok``,
``reject``, ``5xx``, ``4xx`` ... ``other``), never per action text, and malformed requests per
parser reason code, so a hostile peer cannot grow the exposition without bound.

`SummedMetrics` is the multi-process mode (``serve --workers N``): each worker process writes
its `PolicyMetrics.snapshot` atomically to a file of its own in one private directory
(`write_snapshot`), and one endpoint exposes the sum over the files at scrape time.  A dead
worker's file is kept (`retire_snapshot`), so the sums never go backwards; only its open
connections stop counting.

Imports the errors module; ``prometheus_client`` only when the exposition is used.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from domainpolicy._errors import InvalidConfiguration, shown

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "ACTION_CLASSES",
    "LATENCY_BUCKETS",
    "METRICS_EXTRA",
    "MetricsEndpoint",
    "PolicyMetrics",
    "SummedMetrics",
    "action_class",
    "prometheus_available",
    "retire_snapshot",
    "write_snapshot",
    "write_supervisor_snapshot",
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


METRICS_EXTRA: Final = "pip install 'domainpolicy[metrics]'"
"""How to get the exposition (``prometheus_client``), for error messages."""


def _prometheus_missing() -> InvalidConfiguration:
    return InvalidConfiguration(
        [f"Prometheus metrics need the prometheus_client package: {METRICS_EXTRA}"]
    )


def prometheus_available() -> bool:
    """Whether ``prometheus_client`` (the ``metrics`` extra) can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _registry_of(*collectors: Any) -> CollectorRegistry:
    """A ``prometheus_client`` registry of its own holding *collectors* (never the global one).

    Raises:
        InvalidConfiguration: ``prometheus_client`` is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise _prometheus_missing() from None
    registry = CollectorRegistry(auto_describe=True)
    for collector in collectors:
        registry.register(collector)
    return registry


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
        self._registry: CollectorRegistry | None = None
        # The tenant registry the decisions follow: () -> (version, stale seconds); None when
        # the policy follows no registry (then the two gauges are not exported).
        self.tenant_registry: Callable[[], tuple[int | None, float]] | None = None

    def add_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Add the counters of *snapshot* (a `snapshot` of counters with the same buckets).

        Raises:
            InvalidConfiguration: *snapshot*'s latency buckets are not these.
        """
        bounds = [float(b) for b, _ in snapshot["latency_buckets"]]
        if bounds != [*self.buckets, float("inf")]:
            raise InvalidConfiguration([f"latency buckets {shown(bounds)} differ from ours"])
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + snapshot[name])
        self.latency_sum += snapshot["latency_sum_seconds"]
        for key, value in snapshot["actions"].items():
            if key in self.actions:
                self.actions[key] += value
        for key, value in snapshot["malformed"].items():
            self.malformed[key] = self.malformed.get(key, 0) + value
        below = 0
        for i, (_, cumulative) in enumerate(snapshot["latency_buckets"]):
            self._bucket_counts[i] += cumulative - below
            below = cumulative

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

    @property
    def registry(self) -> CollectorRegistry:
        """This counter set's own ``prometheus_client`` registry (made on first use).

        Raises:
            InvalidConfiguration: ``prometheus_client`` is not installed.
        """
        if self._registry is None:
            self._registry = _registry_of(_Collector(self))
        return self._registry

    def render_prometheus(self) -> str:
        """Every counter in the Prometheus text exposition format (0.0.4).

        Raises:
            InvalidConfiguration: ``prometheus_client`` is not installed.
        """
        registry = self.registry
        from prometheus_client import generate_latest

        return generate_latest(registry).decode("utf-8")

    def render_openmetrics(self) -> str:
        """Every counter in the OpenMetrics text format (ends with ``# EOF``).

        Raises:
            InvalidConfiguration: ``prometheus_client`` is not installed.
        """
        registry = self.registry
        from prometheus_client.openmetrics.exposition import generate_latest

        text: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]
        return text.decode("utf-8")


_SUMMED: Final = (
    "requests",
    "timeouts",
    "handler_errors",
    "sanitised",
    "connections",
    "connections_active",
    "connections_refused",
    "reloads",
    "reload_failures",
)

_LIVE: Final = "live-"
_RETIRED: Final = "retired-"


def write_snapshot(metrics: PolicyMetrics, directory: str, name: str) -> None:
    """Write *metrics*' `PolicyMetrics.snapshot` atomically as *name* in *directory* (a
    worker's file for `SummedMetrics`; written again, it replaces the previous one).

    Raises:
        OSError: the file cannot be written.
    """
    path = os.path.join(directory, _LIVE + name + ".json")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(metrics.snapshot(), file)
    os.replace(temporary, path)


def retire_snapshot(directory: str, name: str) -> None:
    """Keep the last counters of the worker *name*, which has died, in the sums: its open
    connections are no longer counted (an atomic rename; nothing happens if it never wrote)."""
    source = os.path.join(directory, _LIVE + name + ".json")
    target = os.path.join(directory, _RETIRED + name + ".json")
    with contextlib.suppress(FileNotFoundError):
        os.replace(source, target)


_SUPERVISOR: Final = "supervisor.json"


def write_supervisor_snapshot(directory: str, workers: int, restarts: int) -> None:
    """Write the supervisor's own figures for `SummedMetrics`: the workers running now and the
    restarts so far (atomically, replacing the previous ones).

    Raises:
        OSError: the file cannot be written.
    """
    path = os.path.join(directory, _SUPERVISOR)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump({"workers": workers, "restarts": restarts}, file)
    os.replace(path + ".tmp", path)


class SummedMetrics:
    """The counters of several worker processes summed: the multi-process mode of ``serve
    --workers N``.

    Each worker writes its counters to *directory* with `write_snapshot` (every second and at
    exit); `total` (and the exposition of `registry`, at scrape time) adds up every file,
    those of dead workers (`retire_snapshot`) included, so the sums never go backwards.  The
    names and labels are those of a single `PolicyMetrics`, plus the supervisor's
    ``domainpolicy_policy_workers`` (gauge: workers running) and
    ``domainpolicy_policy_worker_restarts_total`` (`write_supervisor_snapshot`).
    """

    def __init__(self, directory: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        """Sum the files in *directory*, written by counters with these *buckets*."""
        self.directory = directory
        self.buckets = buckets
        self._registry: CollectorRegistry | None = None

    def total(self) -> PolicyMetrics:
        """The sum of every worker's last written counters (unreadable files are skipped)."""
        total = PolicyMetrics(self.buckets)
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return total
        for name in names:
            retired = name.startswith(_RETIRED)
            if not name.endswith(".json") or not (retired or name.startswith(_LIVE)):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as file:
                    snapshot = json.load(file)
                if retired:
                    snapshot["connections_active"] = 0
                total.add_snapshot(snapshot)
            except (OSError, ValueError, KeyError, TypeError, InvalidConfiguration):
                continue  # a worker's file appeared or vanished mid-read: next scrape
        return total

    @property
    def registry(self) -> CollectorRegistry:
        """A ``prometheus_client`` registry exposing `total` at scrape time.

        Raises:
            InvalidConfiguration: ``prometheus_client`` is not installed.
        """
        if self._registry is None:
            self._registry = _registry_of(
                _Collector(self.total), _SupervisorCollector(self.directory)
            )
        return self._registry


class _SupervisorCollector:
    """The supervisor's figures (`write_supervisor_snapshot`) at scrape time."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = {"workers": 0, "restarts": 0}
        try:
            with open(os.path.join(self.directory, _SUPERVISOR), encoding="utf-8") as file:
                figures.update(json.load(file))
        except (OSError, ValueError):
            pass
        yield GaugeMetricFamily(
            f"{_PREFIX}_workers", "Worker processes running.", value=figures["workers"]
        )
        yield CounterMetricFamily(
            f"{_PREFIX}_worker_restarts",
            "Worker processes restarted after they died.",
            value=figures["restarts"],
        )


class _Collector:
    """The ``prometheus_client`` collector of a `PolicyMetrics` (or of a function returning one
    at each scrape): reads its counters at scrape time (the names and labels are part of the
    public interface; keep them)."""

    def __init__(self, metrics: PolicyMetrics | Callable[[], PolicyMetrics]) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.metrics if isinstance(self.metrics, PolicyMetrics) else self.metrics()
        p = _PREFIX
        # Scrapes may run in the HTTP server's thread: copy what the event loop may mutate.
        actions, malformed = dict(m.actions), dict(m.malformed)

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{p}_{name}", help_text, value=value)

        yield counter("requests", "Policy requests answered.", m.requests)
        family = CounterMetricFamily(f"{p}_actions", "Answers by action class.", labels=["class"])
        for name in ACTION_CLASSES:
            family.add_metric([name], actions.get(name, 0))
        yield family
        family = CounterMetricFamily(
            f"{p}_malformed", "Malformed requests (no reply, disconnect).", labels=["reason"]
        )
        for reason in sorted(malformed):
            family.add_metric([reason], malformed[reason])
        yield family
        yield counter(
            "timeouts",
            "Requests answered with the fallback action because the handler timed out.",
            m.timeouts,
        )
        yield counter(
            "handler_errors",
            "Requests answered with the fallback action because the handler failed.",
            m.handler_errors,
        )
        yield counter(
            "sanitised_actions",
            "Handler action texts that had to be sanitised (handler bug).",
            m.sanitised,
        )
        yield counter("connections", "Connections accepted.", m.connections)
        yield GaugeMetricFamily(
            f"{p}_connections_active", "Connections open now.", value=m.connections_active
        )
        yield counter(
            "connections_refused",
            "Connections closed at once because the connection limit was reached.",
            m.connections_refused,
        )
        yield counter("reloads", "Successful reloads.", m.reloads)
        yield counter("reload_failures", "Failed reloads.", m.reload_failures)
        buckets = [
            ("+Inf" if bound == float("inf") else repr(bound), count)
            for bound, count in m.latency_counts()
        ]
        yield HistogramMetricFamily(
            f"{p}_request_duration_seconds",
            "Time to answer a request.",
            buckets=buckets,
            sum_value=m.latency_sum,
        )
        if m.tenant_registry is not None:
            version, stale = m.tenant_registry()
            if version is not None:
                yield GaugeMetricFamily(
                    f"{p}_registry_version",
                    "Version of the tenant registry decisions are made with.",
                    value=version,
                )
                yield GaugeMetricFamily(
                    f"{p}_registry_stale_seconds",
                    "Seconds the tenant registry has not been refreshed because the store "
                    "failed (0: fresh).",
                    value=stale,
                )


class MetricsEndpoint:
    """``prometheus_client``'s HTTP server on loopback, serving a registry at ``/metrics``.

    The scraper's ``Accept`` header chooses the Prometheus text format or OpenMetrics (and
    ``Accept-Encoding`` gzip); any other path is 404.  The server runs in a daemon thread;
    `close` stops it.  It is meant for a local Prometheus agent or ``curl``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        """Serve *registry* (usually `PolicyMetrics.registry`)."""
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: Any = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful after binding port 0).

        Raises:
            RuntimeError: the endpoint is not started.
        """
        if self._server is None:
            raise RuntimeError("the metrics endpoint is not started")
        return int(self._server.server_address[1])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind *host*:*port* (port 0 picks a free port) and start serving.

        Raises:
            InvalidConfiguration: *host* is not a loopback IP address, or ``prometheus_client``
                is not installed.
            OSError: the address could not be bound.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError as exc:
            raise InvalidConfiguration(
                [f"metrics host {shown(host)} is not an IP address"]
            ) from exc
        if not address.is_loopback:
            raise InvalidConfiguration(
                [f"metrics host {shown(host)} is not a loopback address; it must not be exposed"]
            )
        try:
            from prometheus_client import make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer
        except ImportError:
            raise _prometheus_missing() from None
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if address.version == 6 else socket.AF_INET

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """No access log on stderr (the server logs its own lines)."""

        app = _only_metrics_path(make_wsgi_app(self._registry))
        server = make_server(host, port, app, Server, handler_class=Quiet)
        thread = threading.Thread(
            target=server.serve_forever, name="domainpolicy-metrics", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread

    async def close(self) -> None:
        """Stop serving and close the listening socket (waits for the server thread)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        self._thread.join()
        self._thread = None


def _only_metrics_path(app: Callable[..., Any]) -> Callable[..., Any]:
    """*app* at ``/metrics`` only; any other path is 404 (``prometheus_client`` answers every
    path)."""

    def only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        return app(environ, start_response)

    return only

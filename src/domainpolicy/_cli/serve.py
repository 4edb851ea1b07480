"""``domainpolicy serve``: the Postfix policy delegation server for a tenant configuration.

::

    domainpolicy serve --config tenants.toml --listen 127.0.0.1:10040 [--store URL]
        [--metrics 127.0.0.1:9100] [--request-timeout 2] [--max-batch 256] [--log-level info]
        [--socket-mode 0660] [--socket-group postfix] [--permit-connectors] [--workers N|auto]

It loads the configuration, opens the store (``--store`` or the configured one), builds the
`RelayPolicy` and serves it with `PolicyServer` and `make_handler`.  Once listening it prints
one line on stdout (``listening on ADDRESS`` and the metrics URL; ``--json``: an object), so a
supervisor or a test can wait for it.  Logs (one line per policy request, with the decision's
tenant, sender domain, verdict, code, reason and latency) go to stderr.  With a SQLite or Redis
store, requests that arrive while a decision is running are decided together, up to
``--max-batch`` at a time (``make_handler``'s group commit; ``--max-batch 1`` turns it off).

* **The tenant registry.**  The server decides with the store's tenant registry and follows
  it: at most every ``--registry-poll`` seconds (default 0.25) a decision first reads the
  registry's version, and a change made anywhere (``domainpolicy tenant register-domain``,
  ``registry import``, another server) is applied incrementally, with no reload.  A store whose
  registry is empty is seeded from ``--config`` once at start.  While the store is down the last
  registry is kept (logged; metrics ``domainpolicy_policy_registry_version``
  and ``domainpolicy_policy_registry_stale_seconds``).
* ``--snapshot FILE`` starts from a registry snapshot (``domainpolicy compile --registry URL
  -o FILE``): the compiled matcher is loaded, not compiled, and only the registry's changes since
  the snapshot's version are applied.  A snapshot of another store's registry is refused.
* ``SIGHUP`` re-reads the configuration file and imports its accepted domains and connectors
  into the registry (additions and changes, as ``registry import FILE``; never removals: use
  ``registry import --replace``), and swaps the reply texts in atomically
  (`RelayPolicy.reload`); requests in flight finish with the old ones.  An invalid new
  configuration (or one the registry refuses) is logged and the old one kept.  Thresholds
  (``[policy]``), ``[relay]`` options and the store are read at start only: a change to them is
  logged as needing a restart.
* ``SIGTERM`` / ``SIGINT`` shut down gracefully: stop accepting, answer the requests in
  flight, close; exit 0.
* A bad configuration, store URL or listen address, or an address in use, exits 2 with one
  line on stderr.
* ``--workers N`` (``auto``: one per usable CPU) serves from N processes sharing the listening
  socket, under a supervisor (``workers.py``: signals, restarts, summed metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any, TextIO

from domainpolicy._alerts.worker import AlertWorker
from domainpolicy._config import PolicyConfig, load_config
from domainpolicy._errors import DomainPolicyError, InvalidConfiguration
from domainpolicy._policy import RelayPolicy
from domainpolicy._registry import RegistryView
from domainpolicy._registry_follow import DEFAULT_POLL_SECONDS
from domainpolicy._registry_io import import_configuration, policy_from_config
from domainpolicy._registry_snapshot import view_from_snapshot
from domainpolicy._stores import MemoryStore, StateStore, open_store
from domainpolicy.integrations._metrics import (
    METRICS_EXTRA,
    MetricsEndpoint,
    prometheus_available,
)
from domainpolicy.integrations.postfix import (
    DEFAULT_MAX_BATCH,
    InstanceCache,
    ListenAddress,
    PolicyServer,
    PostfixHandler,
    ServerSettings,
    install_signal_handlers,
    make_handler,
    parse_listen_address,
)

from .common import EXIT_OK, EXIT_USAGE, Command, CommandError, one_line, read_config, whole_number
from .workers import WorkerSlot, supervise, usable_cpus

__all__ = ["COMMANDS"]

_log = logging.getLogger("domainpolicy.serve")
_LEVELS = ("debug", "info", "warning", "error")


def _error(message: str) -> int:
    sys.stderr.write(f"domainpolicy: error: {message}\n")
    return EXIT_USAGE


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


_positive_int = whole_number(1)


def _workers(text: str) -> int:
    """argparse type: a positive number of worker processes, or ``auto`` (the usable CPUs)."""
    if text == "auto":
        return usable_cpus()
    return _positive_int(text)


def _socket_mode(text: str) -> int:
    """argparse type: permission bits in octal (``0660``, ``660``, ``0o666``)."""
    digits = text.lower().removeprefix("0o")
    try:
        value = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0000 and 0777")
    return value


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "SIGHUP reloads the configuration (imports its accepted domains and connectors into "
        "the store's registry; swaps the replies); "
        "SIGTERM/SIGINT shut down gracefully. Exit codes: 0 clean shutdown; 2 configuration, "
        "store or listen address error."
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="tenant configuration (TOML)"
    )
    parser.add_argument(
        "--listen",
        required=True,
        metavar="ADDRESS",
        help="HOST:PORT (an IP address; port 0 picks one), [IPv6]:PORT or unix:/absolute/path",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="state store URL (memory:, sqlite:PATH, redis://HOST:PORT/DB, "
        "redis+cluster://HOST:PORT[,HOST:PORT...]); default: the configured one",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback only; needs "
        f"{METRICS_EXTRA})",
    )
    parser.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="answer '451 4.3.0' when a decision takes longer (default 2; keep it under "
        "Postfix's policy timeout)",
    )
    parser.add_argument(
        "--cache-size",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="messages whose decision is remembered for their other recipients (default 100000)",
    )
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="with a SQLite or Redis store, decide requests that arrive while a decision is "
        f"running together, at most N at a time (default {DEFAULT_MAX_BATCH}; 1: one at a time)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        metavar="MODE",
        help="permissions of a unix: socket, in octal (default 0660: owner and group; 0666: "
        "anyone on the host)",
    )
    parser.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="give a unix: socket to this group (a name or a gid, e.g. postfix) after binding",
    )
    parser.add_argument(
        "--permit-connectors",
        action="store_true",
        help="answer OK (permit) instead of DUNNO for accepted mail that a connector (client "
        "IP or certificate) attributed to a tenant, so the ranges need not be in mynetworks",
    )
    parser.add_argument(
        "--snapshot",
        metavar="FILE",
        help="start from this registry snapshot ('domainpolicy compile --registry URL -o FILE') "
        "and catch up with the registry's changes since it, instead of reading the whole "
        "registry",
    )
    parser.add_argument(
        "--registry-poll",
        type=_positive_float,
        default=DEFAULT_POLL_SECONDS,
        metavar="SECONDS",
        help="how often to check the store's tenant registry for changes "
        f"(default {DEFAULT_POLL_SECONDS})",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="serve from N processes sharing the listening socket (auto: one per usable CPU; "
        "default 1); SIGHUP reloads and SIGTERM drains them all, a worker that dies is "
        "restarted, --metrics serves their sum",
    )
    parser.add_argument(
        "--log-level",
        choices=_LEVELS,
        default="info",
        help="info (default) logs one line per policy request",
    )


class _Service:
    """The running server's state: the configuration file, the policy and the reload lock."""

    def __init__(
        self,
        path: str,
        config: PolicyConfig,
        policy: RelayPolicy,
        max_batch: int = DEFAULT_MAX_BATCH,
        permit_connectors: bool = False,
    ) -> None:
        self.path = path
        self.max_batch = max_batch
        self.permit_connectors = permit_connectors
        self.config = config
        self.policy = policy
        self.server: PolicyServer | None = None
        self.cache: InstanceCache[Any] | None = None
        self._lock = asyncio.Lock()

    def handler(self) -> PostfixHandler:
        """The Postfix handler for the configuration in force (sharing the per-message cache)."""
        return make_handler(
            self.policy,
            cache=self.cache,
            pinned_certificates=self.config.pinned_certificates,
            max_batch=self.max_batch,
            permit_connectors=self.permit_connectors,
        )

    async def reload(self) -> None:
        """Re-read the configuration and swap it in; raise (keeping the old one) if invalid.

        Raises:
            InvalidConfiguration: the new configuration is invalid.
        """
        async with self._lock:  # two quick SIGHUPs: one reload after the other
            new = await asyncio.to_thread(load_config, self.path)
            policy = self.policy
            changes, _ = await asyncio.to_thread(
                import_configuration,
                policy.store,
                new.matcher,
                new.connector_list,
                actor="sighup",
                reason=f"reload of {self.path}",
                now=policy.store.now(),
                machine=policy.machine,
            )
            await asyncio.to_thread(policy.sync_registry)
            policy.reload(replies=new.replies)
            old, self.config = self.config, new
            if new.pinned_certificates != old.pinned_certificates and self.server is not None:
                self.server.set_handler(self.handler())
            ignored = [
                name
                for name, changed in (
                    ("[policy] thresholds", new.block_policy != old.block_policy),
                    ("[relay] options", dict(new.relay) != dict(old.relay)),
                    ("[store] url", new.store_url != old.store_url),
                )
                if changed
            ]
            if ignored:
                _log.warning(
                    "reload: %s changed; they take effect only after a restart",
                    ", ".join(ignored),
                )
            _log.info(
                "reload: configuration %s loaded (%d tenants, %d registry changes, registry "
                "version %s)",
                self.path,
                len(new.matcher.tenants()),
                len(changes),
                policy.registry_version,
            )


async def _serve(
    args: argparse.Namespace,
    out: TextIO,
    service: _Service,
    listen: ListenAddress,
    metrics: ListenAddress | None,
    worker: WorkerSlot | None = None,
) -> int:
    settings = ServerSettings(
        request_timeout=args.request_timeout,
        unix_socket_mode=0o660 if args.socket_mode is None else args.socket_mode,
        unix_socket_group=args.socket_group,
    )
    service.cache = InstanceCache(maxsize=args.cache_size)
    server = PolicyServer(service.handler(), settings=settings, reload_hook=service.reload)
    service.server = server
    policy = service.policy
    server.metrics.tenant_registry = lambda: (
        policy.registry_version,
        policy.registry_stale_seconds,
    )
    endpoint: MetricsEndpoint | None = None
    try:
        try:
            await server.start(listen, sock=None if worker is None else worker.sock)
        except (DomainPolicyError, OSError) as exc:
            return _error(f"cannot listen on {args.listen}: {one_line(exc)}")
        if metrics is not None:
            assert metrics.host is not None
            assert metrics.port is not None
            try:
                endpoint = await server.start_metrics(metrics.host, metrics.port)
            except (DomainPolicyError, OSError) as exc:
                return _error(f"cannot serve metrics on {args.metrics}: {one_line(exc)}")
        remove = install_signal_handlers(asyncio.get_running_loop(), server.reload, server.close)
        try:
            record: dict[str, object] = {"listening": str(server.address)}
            text = f"listening on {server.address}"
            if endpoint is not None and metrics is not None:
                url = f"http://{ListenAddress(host=metrics.host, port=endpoint.port)}/metrics"
                record["metrics"] = url
                text += f"; metrics at {url}"
            out.write((json.dumps(record) if args.json else text) + "\n")
            out.flush()
            if worker is not None:
                worker.start_publishing(server.metrics)
            await server.serve_forever()
        finally:
            remove()
    finally:
        await server.close()  # also closes the metrics endpoint
        if worker is not None:
            await worker.stop_publishing()
    return EXIT_OK


def _settings(args: argparse.Namespace) -> ServerSettings:
    """The server settings of ``--workers``'s supervisor (as `_serve` makes them)."""
    return ServerSettings(
        request_timeout=args.request_timeout,
        unix_socket_mode=0o660 if args.socket_mode is None else args.socket_mode,
        unix_socket_group=args.socket_group,
    )


def _run_worker(
    args: argparse.Namespace,
    worker: WorkerSlot,
    config: PolicyConfig,
    view: RegistryView | None,
) -> int:
    """One of ``--workers N``, in the forked child: its own store, a policy following the
    store's registry from the supervisor's *view* (its compiled matcher: pages shared with the
    supervisor, no compile), the alert delivery worker when configured (each worker claims
    with a lease, so every alert is delivered once), then the usual server on the supervisor's
    socket."""
    store = open_store(args.store) if args.store is not None else config.open_store()
    alerts = None
    try:
        policy = policy_from_config(config, store, poll_interval=args.registry_poll, view=view)
        service = _Service(args.config, config, policy, args.max_batch, args.permit_connectors)
        listen = parse_listen_address(args.listen)
        if config.alerts is not None:
            alerts = AlertWorker(store, config.alerts, policy=config.block_policy)
            alerts.start()
        return asyncio.run(_serve(args, worker.out, service, listen, None, worker))
    finally:
        if alerts is not None:
            alerts.stop()
        store.close()


def _metrics_address(text: str) -> ListenAddress:
    """Parse ``--metrics HOST:PORT`` (TCP only).

    Raises:
        InvalidConfiguration: *text* is not HOST:PORT.
    """
    address = parse_listen_address(text)
    if address.path is not None:
        raise InvalidConfiguration([f"metrics address {text!r} must be HOST:PORT, not a socket"])
    return address


def _cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    try:
        listen = parse_listen_address(args.listen)
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        metrics = _metrics_address(args.metrics) if args.metrics is not None else None
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    if metrics is not None and not prometheus_available():
        return _error(f"--metrics needs the prometheus_client package: {METRICS_EXTRA}")
    if listen.path is None and (args.socket_group is not None or args.socket_mode is not None):
        return _error("--socket-mode and --socket-group apply only to --listen unix:/path")
    try:
        ServerSettings(unix_socket_group=args.socket_group)  # an unknown group: exit 2 now
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        config = read_config(args.config)
    except (CommandError, DomainPolicyError) as exc:
        return _error(one_line(exc))
    store: StateStore
    try:
        store = open_store(args.store) if args.store is not None else config.open_store()
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        try:
            view = None if args.snapshot is None else view_from_snapshot(args.snapshot, store)
            policy = policy_from_config(config, store, poll_interval=args.registry_poll, view=view)
        except DomainPolicyError as exc:
            return _error(one_line(exc))
        logging.basicConfig(
            level=getattr(logging, args.log_level.upper()),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if args.workers > 1:
            if isinstance(store, MemoryStore):
                _log.warning("memory store: each of the %d workers counts alone", args.workers)
            store.close()  # each worker opens its own after the fork
            _log.info("serving %s with %d workers and a %s", args.config, args.workers,
                      type(store).__name__)  # fmt: skip
            return supervise(
                config_path=args.config, config=config, listen=listen, settings=_settings(args),
                workers=args.workers,
                run_worker=lambda slot, new: _run_worker(args, slot, new, policy.registry_view),
                out=out, as_json=args.json, metrics=metrics,
            )  # fmt: skip
        service = _Service(args.config, config, policy, args.max_batch, args.permit_connectors)
        _log.info("serving %s with a %s", args.config, type(store).__name__)
        # The alert delivery worker ([alerts]): its own thread, never in the decision path.
        worker = None
        if config.alerts is not None:
            worker = AlertWorker(store, config.alerts, policy=config.block_policy)
            worker.start()
        try:
            return asyncio.run(_serve(args, out, service, listen, metrics))
        finally:
            if worker is not None:
                worker.stop()
    finally:
        store.close()


COMMANDS: dict[str, Command] = {
    "serve": (
        "serve the relay policy to Postfix (SMTPD access policy delegation)",
        _configure_serve,
        _cmd_serve,
    ),
}

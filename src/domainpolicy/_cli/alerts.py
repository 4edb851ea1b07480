"""The ``alerts`` commands of the ``domainpolicy`` command line: the alert outbox for operators
and embedded users.

Declares its commands in `COMMANDS`; imports `common` and the library, never the
`domainpolicy._cli` package.

* ``alerts deliver --config FILE [--once]``: run the delivery worker (for embedded users whose
  process does not run one); ``--once`` makes one pass and exits.
* ``alerts list --config FILE [--failed] [--limit N]``: the outbox rows (``--failed``: the dead
  letter), with their attempts and last error.
* ``alerts retry ID --config FILE``: make a dead row due again.
* ``alerts test --sink NAME --config FILE [--tenant T]``: send a sample notice through one sink
  now (not through the outbox) to check its configuration.

Exit codes: 0 success; 1 the sample could not be delivered, or no dead row has that id;
2 usage, configuration or store error.
"""

from __future__ import annotations

import argparse
import time
from typing import TextIO

from domainpolicy._alerts.sinks import AlertsConfig, DeliveryFailed
from domainpolicy._alerts.worker import AlertWorker
from domainpolicy._blockstate import BlockMachine, TenantState
from domainpolicy._config import PolicyConfig, load_config
from domainpolicy._errors import InvalidConfiguration
from domainpolicy._stores import StateStore, open_store
from domainpolicy._stores.outbox import DEAD, OutboxRow, alert_payload

from .common import EXIT_INVALID, EXIT_OK, Command, emit

__all__ = ["COMMANDS"]


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    def common(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", required=True, help="the TOML configuration")
        p.add_argument("--store", metavar="URL", help="state store URL (default: the configured)")
        p.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
        return p

    deliver = common("deliver", "run the alert delivery worker")
    deliver.add_argument("--once", action="store_true", help="one pass, then exit")
    listing = common("list", "list outbox rows")
    listing.add_argument("--failed", action="store_true", help="only the dead letter")
    listing.add_argument("--limit", type=int, default=100, help="at most this many rows")
    retry = common("retry", "make a dead outbox row due again")
    retry.add_argument("id", help="the row id (from alerts list)")
    test = common("test", "send a sample notice through one sink")
    test.add_argument("--sink", required=True, help="the sink's name")
    test.add_argument("--tenant", default="sample-tenant", help="the tenant of the sample")


def _open(args: argparse.Namespace) -> tuple[PolicyConfig, AlertsConfig, StateStore]:
    config = load_config(args.config)
    if config.alerts is None:
        raise InvalidConfiguration(["alerts: no [alerts] table"], source=args.config)
    store = open_store(args.store) if args.store else config.open_store()
    return config, config.alerts, store


def _row_text(row: OutboxRow) -> str:
    error = f"  last error: {row.last_error}" if row.last_error else ""
    return (
        f"{row.id}  {row.status}  tenant={row.tenant} kind={row.kind} sink={row.sink} "
        f"attempts={row.attempts}{error}"
    )


def _cmd(args: argparse.Namespace, out: TextIO) -> int:
    config, alerts, store = _open(args)
    try:
        action = args.alerts_command
        if action == "list":
            rows = store.alert_rows(status=DEAD if args.failed else None, limit=args.limit)
            for row in rows:
                record = row.to_dict()
                record.pop("payload")
                emit(out, args, record, _row_text(row))
            return EXIT_OK
        if action == "retry":
            ok = store.retry_alert(args.id, store.now())
            emit(
                out,
                args,
                {"id": args.id, "retried": ok},
                f"{args.id}: {'due again' if ok else 'no dead row with this id'}",
            )
            return EXIT_OK if ok else EXIT_INVALID
        if action == "test":
            sink = alerts.sinks.get(args.sink)
            if sink is None:
                raise InvalidConfiguration(
                    [f"alerts.sinks: no sink {args.sink!r} (have {sorted(alerts.sinks)})"]
                )
            now = time.time()
            machine = BlockMachine(config.block_policy)
            state, _ = machine.operator_block(
                TenantState.new(args.tenant), now, by="alerts test", reason="sample notice"
            )
            payload = alert_payload(
                "0" * 32,
                "blocked",
                state,
                now,
                "sample notice",
                limits=config.block_policy.limits(),
            )
            row = OutboxRow(
                id=f"{'0' * 32}.{sink.name}",
                alert_id="0" * 32,
                sink=sink.name,
                tenant=args.tenant,
                kind="blocked",
                created=now,
                payload=payload,
                due=now,
            )
            try:
                sink.deliver(row, alerts, now)
            except DeliveryFailed as exc:
                emit(
                    out,
                    args,
                    {"sink": sink.name, "delivered": False, "error": exc.reason},
                    f"sink {sink.name}: failed: {exc.reason}",
                )
                return EXIT_INVALID
            emit(
                out,
                args,
                {"sink": sink.name, "delivered": True},
                f"sink {sink.name}: sample delivered",
            )
            return EXIT_OK
        worker = AlertWorker(store, alerts, policy=config.block_policy)
        if args.once:
            report = worker.run_once()
            emit(
                out,
                args,
                {
                    "delivered": report.delivered,
                    "retried": report.retried,
                    "dead": report.dead,
                    "reminders": report.reminders,
                },
                f"delivered {report.delivered}, retried {report.retried}, "
                f"dead {report.dead}, reminders {report.reminders}",
            )
            return EXIT_OK
        worker.start()
        try:
            while True:
                time.sleep(3600)
        finally:
            worker.stop()
    finally:
        store.close()


COMMANDS: dict[str, Command] = {
    "alerts": ("the alert outbox: deliver, list, retry, test", _configure, _cmd),
}

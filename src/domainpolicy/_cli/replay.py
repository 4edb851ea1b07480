"""``domainpolicy replay``: run a relay log (JSON lines) through the policy, as an MTA would.

Each line is one event with an ``at`` time (ISO 8601 with a zone, or epoch seconds) and an
``event`` name:

* ``relay``: ``client_ip``, ``sender``, optional ``tls_cert_name`` (one certificate name),
  ``tls_cert_names`` (an array of every name of the client certificate), ``sasl_user``,
  ``recipients``, ``header_from``, ``message_id`` -- decided by the policy.
* admin events, with ``tenant`` and ``by``: ``register_domain`` (``domain``),
  ``remove_domain`` (``domain``), ``declare_not_ours`` (``domains``), ``connector_created``
  (``connector``), ``review_connector`` (``connector``, ``kept``), ``attest`` (``note``),
  ``request_unblock`` (``code``, ``evidence``), ``approve`` / ``deny`` / ``block`` /
  ``suspend`` (``reason``); and ``status`` (prints the tenant's status).

The policy's clock is the events' time, so a replay is deterministic.  Consecutive relay events
of one instant (the same ``at``; logs usually have one-second resolution) are decided together
with `RelayPolicy.evaluate_many`, up to `MAX_BATCH` at a time: one store transaction or round trip
for all of them, and exactly the decisions of deciding them one by one.  A skipped (malformed)
line changes nothing, not even the clock.  The state lives in a
fresh SQLite database in a new temporary directory unless ``--store`` names one; its URL is
printed on stderr at the end, so that ``tenant status --store URL`` shows the same final state
(the replay works on the store's tenant registry, seeded from ``--config`` when empty).  Each
decision is printed with the exact SMTP reply (a refusal repeating the reply of one printed
before for its tenant is counted in one ``... and N more refusals like ...`` line unless
``--verbose``); the run ends with every tenant's state and audit trail.  A relay log that cannot
be read, or a configuration that cannot, is one error line (exit 2), with a hint when the two
look swapped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TextIO

from domainpolicy._blockstate import ChecklistIncomplete
from domainpolicy._config import PolicyConfig
from domainpolicy._connectors import InboundConnector
from domainpolicy._errors import DomainPolicyError
from domainpolicy._policy import Decision, RelayPolicy, RelayRequest, TenantStatus
from domainpolicy._registry_io import policy_from_config
from domainpolicy._stores import SQLiteStore, StateStore, open_store

from .common import (
    EXIT_INVALID,
    EXIT_OK,
    Command,
    CommandError,
    Progress,
    add_progress_option,
    one_line,
    read_config,
)

__all__ = ["COMMANDS"]

MAX_BATCH = 512
"""Most relay events of one instant decided in one `RelayPolicy.evaluate_many` call."""

_ADMIN_EVENTS = frozenset(
    {
        "register_domain",
        "remove_domain",
        "declare_not_ours",
        "connector_created",
        "review_connector",
        "attest",
        "request_unblock",
        "approve",
        "deny",
        "block",
        "suspend",
        "status",
    }
)


class _BadEvent(ValueError):
    pass


def _first_time(handle: Any) -> float:
    """The ``at`` of the log's first line, read without consuming it (0 when it cannot be)."""
    try:
        head = handle.peek(65536)
        first = bytes(head).split(b"\n", 1)[0]
        return _time(json.loads(first).get("at"))
    except (AttributeError, OSError, ValueError, _BadEvent):
        return 0.0


def _time(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise _BadEvent(f"'at' {value!r} is not an ISO 8601 time") from exc
        if parsed.tzinfo is None:
            raise _BadEvent(f"'at' {value!r} has no time zone")
        return parsed.timestamp()
    raise _BadEvent("'at' must be an ISO 8601 time or epoch seconds")


def _stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _subject(name: str, event: dict[str, Any]) -> str:
    """What an admin event is about, for its line: the domain(s), connector or code."""
    if name in ("register_domain", "remove_domain"):
        return str(event.get("domain", ""))
    if name == "declare_not_ours":
        domains = event.get("domains", [])
        return ", ".join(map(str, domains)) if isinstance(domains, list) else str(domains)
    if name == "connector_created":
        return str(event.get("connector", ""))
    if name == "review_connector":
        kept = "kept" if event.get("kept", False) else "removed"
        return f"{event.get('connector', '')}, {kept}"
    if name == "request_unblock":
        return str(event.get("code", ""))
    return ""


def _text(event: dict[str, Any], key: str, default: str | None = None) -> str:
    value = event.get(key, default)
    if not isinstance(value, str):
        raise _BadEvent(f"{key!r} must be a string")
    return value


class _Replay:
    def __init__(
        self, policy: RelayPolicy, out: TextIO, as_json: bool, verbose: bool = False
    ) -> None:
        self.policy = policy
        self.out = out
        self.as_json = as_json
        self.verbose = verbose
        self.counts = {"accepted": 0, "refused": 0, "tempfail": 0, "admin": 0, "rejected": 0}
        # Text output: the last refusal printed in full, per (tenant, reply), and the refusals
        # like it not printed since (message ids), summarised before the next line.
        self._shown: dict[tuple[str | None, tuple[str, ...]], str] = {}
        self._repeats: tuple[tuple[str | None, tuple[str, ...]], list[str]] | None = None

    def emit(self, record: dict[str, Any], text: str) -> None:
        if self.as_json:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        self.flush_repeats()
        self.out.write(text + "\n")

    def flush_repeats(self) -> None:
        """Print the summary of the refusals not printed because they repeat an earlier one."""
        if self._repeats is None:
            return
        key, ids = self._repeats
        self._repeats = None
        count = len(ids)
        known = [i for i in ids if i != "-"]
        which = ""
        if known:
            which = f": {known[0]}" if len(known) == 1 else f": {known[0]} to {known[-1]}"
        self.out.write(
            f"{' ' * 24}... and {count} more refusal{'s' if count != 1 else ''} "
            f"like {self._shown[key]}{which}\n"
        )

    def _repeat(self, request: RelayRequest, decision: Decision) -> bool:
        """Whether a refusal only repeats one printed before for its tenant (text output,
        without ``--verbose``, no state change or alert): then it is counted, not printed."""
        if self.as_json or decision.accepted:
            return False
        key = (decision.tenant, tuple(decision.reply.lines()))
        effects = decision.effects
        if self.verbose or effects.transitions or effects.alerts or key not in self._shown:
            return False
        if self._repeats is not None and self._repeats[0] != key:
            self.flush_repeats()
        if self._repeats is None:
            self._repeats = (key, [])
        self._repeats[1].append(request.message_id or "-")
        return True

    def request(self, event: dict[str, Any]) -> RelayRequest:
        """The `RelayRequest` of a relay event.

        Raises:
            _BadEvent: a field has the wrong type.
        """
        recipients = event.get("recipients", [])
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise _BadEvent("'recipients' must be an array of strings")
        cert_names = event.get("tls_cert_names", [])
        if not isinstance(cert_names, list) or not all(isinstance(n, str) for n in cert_names):
            raise _BadEvent("'tls_cert_names' must be an array of strings")
        return RelayRequest(
            sender=_text(event, "sender"),
            client_ip=event.get("client_ip"),
            tls_cert_name=event.get("tls_cert_name"),
            tls_cert_names=cert_names,
            sasl_user=event.get("sasl_user"),
            recipients=tuple(recipients),
            header_from=event.get("header_from"),
            message_id=event.get("message_id"),
        )

    def decide(self, at: float, requests: list[RelayRequest]) -> None:
        """Decide relay requests of one instant (*at*, the policy's clock) and print them, in
        order: several at once with `RelayPolicy.evaluate_many` (one store transaction or round
        trip), which decides exactly as `RelayPolicy.evaluate` one by one."""
        if len(requests) == 1:
            decisions = [self.policy.evaluate(requests[0])]
        else:
            decisions = self.policy.evaluate_many(requests)
        for request, decision in zip(requests, decisions, strict=True):
            self._decided(at, request, decision)

    def _decided(self, at: float, request: RelayRequest, decision: Decision) -> None:
        self.counts[
            {"accept": "accepted", "refuse": "refused", "tempfail": "tempfail"}[
                decision.outcome.value
            ]
        ] += 1
        self._print_decision(at, request, decision)

    def _print_decision(self, at: float, request: RelayRequest, decision: Decision) -> None:
        if self._repeat(request, decision):
            return
        reply_lines = decision.reply.lines()
        record = {
            "at": _stamp(at),
            "event": "relay",
            "message_id": request.message_id,
            "sender": request.sender,
            "client_ip": request.client_ip,
            "tenant": decision.tenant,
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "counted": decision.counted,
            "reply": list(reply_lines),
            "transitions": [
                {"from": t.source.value, "to": t.target.value, "reason": t.reason}
                for t in decision.effects.transitions
            ],
            "alerts": [
                {"kind": a.kind.value, "message": a.message} for a in decision.effects.alerts
            ],
        }
        who = decision.tenant or "-"
        sender = request.sender or "<>"
        head = f"accepted ({decision.reason})" if decision.accepted else reply_lines[0]
        text = [f"{_stamp(at)} relay {request.message_id or '-'} {who} {sender} -> {head}"]
        text += [f"{' ' * 24}{line}" for line in reply_lines[1:]] if not decision.accepted else []
        reasons = set()
        for transition in decision.effects.transitions:
            reasons.add(transition.reason)
            text.append(
                f"{' ' * 24}STATE {transition.source.value} -> {transition.target.value}: "
                f"{transition.reason}"
            )
        for alert in decision.effects.alerts:
            # An alert that says what the state change above says is not said twice.
            said = "" if alert.message in reasons else f": {alert.message}"
            text.append(f"{' ' * 24}ALERT {alert.kind.value}{said}")
        self.emit(record, "\n".join(text))
        if not decision.accepted:
            self._shown[(decision.tenant, tuple(reply_lines))] = request.message_id or "the above"

    def admin(self, at: float, name: str, event: dict[str, Any]) -> None:
        tenant = _text(event, "tenant")
        by = _text(event, "by", "operator")
        subject = _subject(name, event)
        who = f"{tenant}{f' ({subject})' if subject else ''} by {by}"
        policy = self.policy
        actions: dict[str, Callable[[], object]] = {
            "register_domain": lambda: policy.register_domain(
                tenant, _text(event, "domain"), by=by
            ),
            "remove_domain": lambda: policy.remove_domain(tenant, _text(event, "domain"), by=by),
            "declare_not_ours": lambda: policy.declare_not_ours(
                tenant, list(event.get("domains", [])), by=by, note=event.get("note", "")
            ),
            "connector_created": lambda: policy.connector_created(
                InboundConnector(_text(event, "connector"), tenant)
            ),
            "review_connector": lambda: policy.review_connector(
                tenant, _text(event, "connector"), kept=bool(event.get("kept", False)), by=by
            ),
            "attest": lambda: policy.attest(tenant, by=by, note=_text(event, "note")),
            "request_unblock": lambda: policy.request_unblock(
                tenant, code=_text(event, "code"), evidence=_text(event, "evidence"), by=by
            ),
            "approve": lambda: policy.approve(tenant, by=by, reason=_text(event, "reason")),
            "deny": lambda: policy.deny(tenant, by=by, reason=_text(event, "reason")),
            "block": lambda: policy.block(tenant, by=by, reason=_text(event, "reason")),
            "suspend": lambda: policy.suspend(tenant, by=by, reason=_text(event, "reason")),
        }
        if name == "status":
            self.status(policy.status(tenant, history=None), at)
            return
        self.counts["admin"] += 1
        try:
            actions[name]()
        except ChecklistIncomplete as exc:
            self.counts["rejected"] += 1
            self.emit(
                {
                    "at": _stamp(at),
                    "event": name,
                    "tenant": tenant,
                    "ok": False,
                    "missing": list(exc.missing),
                },
                "\n".join(
                    [f"{_stamp(at)} {name} {who} -> REFUSED: remediation incomplete"]
                    + [f"{' ' * 24}missing: {step}" for step in exc.missing]
                ),
            )
            return
        except (DomainPolicyError, ValueError) as exc:
            self.counts["rejected"] += 1
            message = str(exc).splitlines()[0]
            self.emit(
                {"at": _stamp(at), "event": name, "tenant": tenant, "ok": False, "error": message},
                f"{_stamp(at)} {name} {who} -> REFUSED: {message}",
            )
            return
        state = policy.store.load(tenant)
        self.emit(
            {
                "at": _stamp(at),
                "event": name,
                "tenant": tenant,
                "ok": True,
                "state": state.state.value,
            },
            f"{_stamp(at)} {name} {who} -> ok, tenant is {state.state.value}",
        )

    def status(self, status: TenantStatus, at: float | None = None) -> None:
        distinct = status.distinct_domains
        lines = [
            f"{'' if at is None else _stamp(at) + ' '}tenant {status.tenant}: {status.state.value}"
            f" ({status.unregistered} unregistered of {status.total} relayed in the window, "
            f"{distinct} distinct unregistered domain{'' if distinct == 1 else 's'})"
        ]
        if status.probation_until is not None:
            lines.append(f"  probation until {_stamp(status.probation_until)}")
        if status.checklist is not None:
            if status.checklist.complete:
                lines.append("  checklist: complete")
            lines += [f"  checklist: missing: {step}" for step in status.checklist.missing]
        domains = ", ".join(d.domain for d in status.accepted_domains) or "(none)"
        lines.append(f"  accepted domains: {domains}")
        if at is None:
            lines.append("  audit trail:" + ("" if status.history else " (none)"))
            for record in status.history:
                who = f" by {record.actor}" if record.actor else ""
                lines.append(
                    f"    {_stamp(record.at)} {record.action}{who}: "
                    f"{record.before} -> {record.after}"
                )
                for transition in record.detail.get("transitions", []):
                    lines.append(f"      {transition['reason']}")
        self.emit({"event": "status", **status.to_dict()}, "\n".join(lines))


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="relay log, one JSON event per line ('-': stdin)")
    parser.add_argument("--config", required=True, help="tenant configuration (TOML)")
    parser.add_argument(
        "--store", help="state store URL (default: a fresh temporary SQLite database)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every refusal in full (default: a refusal that repeats the reply of one "
        "printed before for the same tenant is counted in a '... and N more' line)",
    )
    add_progress_option(parser)


_USAGE = "domainpolicy replay LOG.jsonl --config TENANTS.toml"


def _swapped(args: argparse.Namespace) -> str:
    """A hint when the relay log and the configuration look swapped, else ``""``."""
    log, config = str(args.log).lower(), str(args.config).lower()
    if log.endswith(".toml"):
        return f" (the arguments look swapped; usage: {_USAGE})"
    if config.endswith((".jsonl", ".json", ".log")):
        return f" (--config takes the TOML configuration; usage: {_USAGE})"
    return ""


def _open_log(args: argparse.Namespace) -> tuple[Any, int]:
    """The relay log's binary handle (stdin for ``-``) and its size (0 if unknown).

    Raises:
        CommandError: the log cannot be read, or is a configuration file (a ``.toml``).
    """
    if args.log == "-":
        return sys.stdin.buffer, 0
    hint = _swapped(args)
    if str(args.log).lower().endswith(".toml"):
        raise CommandError(f"relay log {args.log!r} is a TOML file, not JSON lines{hint}")
    try:
        handle = open(args.log, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise CommandError(
            f"cannot read relay log {args.log!r}: {exc.strerror or exc}{hint}"
        ) from exc
    return handle, os.fstat(handle.fileno()).st_size


def _run(args: argparse.Namespace, out: TextIO) -> int:
    handle, total = _open_log(args)
    try:
        try:
            config = read_config(args.config)
        except (CommandError, DomainPolicyError) as exc:
            raise CommandError(one_line(exc) + _swapped(args)) from exc
        return _run_with(args, out, config, handle, total)
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _run_with(
    args: argparse.Namespace, out: TextIO, config: PolicyConfig, handle: Any, total: int
) -> int:
    clock = [0.0]
    url = args.store
    if url is None:
        # Kept after the run, and named on stderr, so that ``tenant status --store URL`` shows
        # the same final state (the operating system's temporary directory cleans it up).
        scratch = tempfile.mkdtemp(prefix="domainpolicy-replay-")
        url = f"sqlite:{os.path.join(scratch, 'state.sqlite3')}"
        store: StateStore = SQLiteStore(
            os.path.join(scratch, "state.sqlite3"), synchronous="NORMAL"
        )
    else:
        store = open_store(url)
    try:
        # The store's tenant registry, seeded from the configuration when empty (at the time of
        # the log's first event, so that the output stays deterministic): the replay's
        # register-domain events change it, as the tenant commands do.
        clock[0] = _first_time(handle)
        policy = policy_from_config(config, store, clock=lambda: clock[0])
        code = _replay(args, out, policy, clock, handle, total)
    finally:
        store.close()
    sys.stderr.write(
        f"domainpolicy: replay store: {url} (see it with: domainpolicy tenant status TENANT "
        f"--config {args.config} --store {url})\n"
    )
    return code


def _replay(
    args: argparse.Namespace,
    out: TextIO,
    policy: RelayPolicy,
    clock: list[float],
    handle: Any,
    total: int,
) -> int:
    replay = _Replay(policy, out, args.json, args.verbose)
    progress = Progress(total, args)
    bad = 0
    done = 0
    events = 0
    pending: list[RelayRequest] = []  # relay events of the instant clock[0], not decided yet

    def flush() -> None:
        if pending:
            replay.decide(clock[0], pending)
            pending.clear()

    try:
        for number, raw in enumerate(handle, 1):
            done += len(raw)
            if not raw.strip():
                continue
            events += 1
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise _BadEvent("an event must be a JSON object")
                at = _time(event.get("at"))
                if at < clock[0]:
                    sys.stderr.write(f"line {number}: time goes backwards; using the later time\n")
                    at = clock[0]
                name = event.get("event")
                if name == "relay":
                    request = replay.request(event)
                    if at != clock[0] or len(pending) >= MAX_BATCH:
                        flush()  # decided at their own instant, before the clock moves on
                    clock[0] = at
                    pending.append(request)
                elif name in _ADMIN_EVENTS:
                    flush()
                    clock[0] = at
                    replay.admin(clock[0], str(name), event)
                else:
                    raise _BadEvent(f"unknown event {name!r}")
            except (_BadEvent, ValueError, UnicodeDecodeError) as exc:
                bad += 1
                flush()  # keep the decisions in line order around the message
                sys.stderr.write(f"domainpolicy: {args.log}:{number}: skipped: {exc}\n")
            progress.draw(done, f"{events} events")
        flush()
    finally:
        progress.finish()
    replay.flush_repeats()
    if not args.json:
        out.write("\n== final state ==\n")
    tenants = sorted(set(policy.store.tenants()) | set(policy.matcher.tenants()))
    for tenant in tenants:
        replay.status(policy.status(tenant, history=None))
    counts = replay.counts
    summary = (
        f"{events} events: {counts['accepted']} accepted, {counts['refused']} refused, "
        f"{counts['tempfail']} temporary failures, {counts['admin']} admin actions "
        f"({counts['rejected']} refused), {bad} malformed lines skipped"
    )
    replay.emit({"event": "summary", "events": events, "malformed": bad, **counts}, summary)
    return EXIT_INVALID if bad else EXIT_OK


COMMANDS: dict[str, Command] = {
    "replay": (
        "run a relay log through the policy and print every decision and the final state",
        _configure,
        _run,
    ),
}

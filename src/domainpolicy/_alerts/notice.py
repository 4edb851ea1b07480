"""The alert notice: the e-mail (RFC 5322, MIME, UTF-8, from the data-file templates in
``domainpolicy/alert_templates/<language>.toml``) and the signed webhook body.

Imports only `domainpolicy._errors` and the outbox values (`domainpolicy._stores.outbox`);
`domainpolicy._alerts.sinks` uses it.  Pure: no I/O but reading the template files.

Header safety: every header value is built from text with control characters replaced and
length capped (`header_text`), so a tenant id or domain cannot add a header; the stdlib
``email`` package (policy ``SMTP``) encodes non-ASCII as RFC 2047 words and folds lines.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import importlib.resources
import json
import re
import tomllib
from collections.abc import Mapping
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, Final

from domainpolicy._errors import InvalidConfiguration, shown

__all__ = [
    "SIGNATURE_HEADER",
    "alert_languages",
    "header_text",
    "render_email",
    "render_text",
    "sign",
    "verify",
    "webhook_body",
]

SIGNATURE_HEADER: Final = "X-Domainpolicy-Signature"
"""The webhook signature header: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""

_PACKAGE: Final = "domainpolicy.alert_templates"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")
_KINDS: Final = (
    "approaching_limit",
    "blocked",
    "suspended",
    "unblock_requested",
    "unblocked",
    "reminder",
)


def header_text(value: object, limit: int = 200) -> str:
    """*value* as one safe header line: control characters (CR, LF...) become a space, and the
    text is cut at *limit* characters."""
    text = _CONTROL.sub(" ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def alert_languages() -> list[str]:
    """The languages with an alert template (``en``, ``ja``...)."""
    files = importlib.resources.files(_PACKAGE).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


@functools.cache
def _template(language: str) -> dict[str, Any]:
    if language not in alert_languages():
        raise InvalidConfiguration(
            [f"alert language {shown(language)}: no template (have {alert_languages()})"]
        )
    text = importlib.resources.files(_PACKAGE).joinpath(f"{language}.toml").read_text("utf-8")
    data = tomllib.loads(text)
    for table in ("subject", "what"):
        missing = [k for k in _KINDS if not isinstance(data.get(table, {}).get(k), str)]
        if missing:
            raise InvalidConfiguration(
                [f"alert template {language}.toml: [{table}] lacks {missing}"]
            )
    return data


def _stamp(at: object) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(float(at), datetime.UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _facts(payload: Mapping[str, Any], support: str) -> dict[str, object]:
    block = payload.get("block") or {}
    evidence = payload.get("evidence") or {}
    limits = payload.get("limits") or {}
    return {
        "tenant": payload.get("tenant", "?"),
        "code": block.get("code", "-"),
        "state": payload.get("state", "?"),
        "number": payload.get("reminder", 0),
        "window_start": _stamp(evidence.get("window_start")),
        "window_end": _stamp(evidence.get("window_end")),
        "total": evidence.get("total", "?"),
        "unregistered": evidence.get("unregistered", "?"),
        "distinct": evidence.get("distinct_domains", "?"),
        "messages": limits.get("messages", "?"),
        "domains": limits.get("domains", "?"),
        "id": payload.get("id", "?"),
        "support": support,
    }


def render_text(
    payload: Mapping[str, Any], language: str = "en", *, support: str = ""
) -> tuple[str, str]:
    """``(subject, body)`` of the notice of *payload* (an outbox row's payload) in *language*.

    Raises:
        InvalidConfiguration: no template for *language*.
    """
    t = _template(language)
    facts = _facts(payload, support)
    kind = "reminder" if payload.get("reminder") else str(payload.get("kind", "blocked"))
    if kind not in _KINDS:
        kind = "blocked"
    body, steps = t["body"], t["steps"]
    lines = [t["what"][kind].format(**facts), ""]
    block = payload.get("block")
    if block is not None and kind != "unblocked":
        domains = list(block.get("offending_domains") or [])
        lines.append(body["domains_heading"])
        lines += [f"  - {d}" for d in domains] or [f"  {body['no_domains']}"]
        lines.append("")
        if payload.get("evidence"):
            lines.append(body["counts"].format(**facts))
        if payload.get("limits"):
            lines.append(body["limits"].format(**facts))
        lines += [body["code"].format(**facts), ""]
        checklist = payload.get("checklist") or {}
        lines.append(body["steps_heading"])
        todo = []
        if checklist.get("unresolved_domains"):
            todo.append(steps["domains"].format(items=", ".join(checklist["unresolved_domains"])))
        if checklist.get("unreviewed_connectors"):
            todo.append(
                steps["connectors"].format(items=", ".join(checklist["unreviewed_connectors"]))
            )
        if not checklist.get("attested", True):
            todo.append(steps["attest"])
        lines += [f"  {n}. {step}" for n, step in enumerate(todo, 1)] or [f"  {body['no_steps']}"]
        lines += ["", body["unblock"].format(**facts)]
    elif kind == "approaching_limit" and payload.get("limits"):
        lines.append(body["limits"].format(**facts))
    if support:
        lines += ["", body["support"].format(**facts)]
    lines += ["", "-- ", body["footer"].format(**facts)]
    subject = header_text(t["subject"][kind].format(**facts), 400)
    return subject, "\n".join(lines) + "\n"


def render_email(
    payload: Mapping[str, Any],
    *,
    sender: str,
    recipients: list[str],
    language: str = "en",
    support: str = "",
    now: float,
) -> EmailMessage:
    """The notice as an RFC 5322 message: Date, Message-ID, ``Auto-Submitted: auto-generated``,
    a UTF-8 ``text/plain`` body, the alert id in ``X-Domainpolicy-Alert-Id``.

    Raises:
        InvalidConfiguration: no template for *language*.
    """
    subject, text = render_text(payload, language, support=support)
    domain = sender.rpartition("@")[2] or "localhost"
    message = EmailMessage(policy=SMTP)
    message["From"] = f"{header_text(_template(language)['from_name'], 60)} <{header_text(sender)}>"
    message["To"] = ", ".join(header_text(r) for r in recipients)
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    message["Message-ID"] = make_msgid(
        idstring=header_text(payload.get("id", ""), 40), domain=domain
    )
    message["Auto-Submitted"] = "auto-generated"
    message["X-Auto-Response-Suppress"] = "All"
    message["X-Domainpolicy-Alert-Id"] = header_text(payload.get("id", ""), 64)
    message.set_content(text, charset="utf-8")
    return message


def webhook_body(payload: Mapping[str, Any]) -> bytes:
    """The webhook request body: the payload as compact, key-sorted UTF-8 JSON."""
    return json.dumps(
        dict(payload), separators=(",", ":"), sort_keys=True, ensure_ascii=False
    ).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `SIGNATURE_HEADER` value: ``t=<timestamp>,v1=<hex HMAC-SHA256 over "<t>.<body>">``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """What a receiver does: True when *header* signs *body* with *secret* and its timestamp is
    within *tolerance* seconds of *now* (older ones are refused as replays)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))

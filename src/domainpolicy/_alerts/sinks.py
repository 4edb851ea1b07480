"""Alert sinks and their configuration: e-mail through an SMTP relay (`SmtpSink`), signed HTTP
webhooks (`WebhookSink`) and the log (`LogSink`); `AlertsConfig` holds them with the tenants'
admin contacts, the reminder interval and the retry schedule, and routes alerts to sinks.

Imports `domainpolicy._alerts.notice`, `domainpolicy._errors` and the outbox values; the
delivery worker (`domainpolicy._alerts.worker`) and the ``[alerts]`` parser use it.  Delivery
uses the standard library only (``smtplib``, ``http.client``, ``ssl``), always with timeouts and
certificate verification.
"""

from __future__ import annotations

import http.client
import logging
import smtplib
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from typing import Final

import attrs

from domainpolicy._alerts.notice import (
    SIGNATURE_HEADER,
    alert_languages,
    render_email,
    sign,
    webhook_body,
)
from domainpolicy._errors import InvalidConfiguration, shown
from domainpolicy._stores.outbox import OutboxRow
from domainpolicy._tenant_state import Alert, AlertKind

__all__ = [
    "ALL_KINDS",
    "AlertsConfig",
    "DeliveryFailed",
    "LogSink",
    "Sink",
    "SmtpSink",
    "TenantContacts",
    "WebhookSink",
]

ALL_KINDS: Final = (*(k.value for k in AlertKind), "reminder")
"""Every kind a sink may ask for: the `AlertKind` values and ``reminder``."""

_log = logging.getLogger("domainpolicy.alerts")


class DeliveryFailed(Exception):
    """One delivery attempt failed; ``reason`` says why, ``permanent`` means retrying is futile
    (the row goes to the dead letter at once)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def _ascii_header(value: str) -> bool:
    return value.isascii() and not any(c in value for c in "\r\n\0")


@attrs.frozen
class TenantContacts:
    """Who hears about one tenant: its admins' addresses and the language of their notices."""

    admins: tuple[str, ...] = ()
    language: str = "en"


@attrs.frozen(kw_only=True)
class _Common:
    name: str
    kinds: tuple[str, ...] = ALL_KINDS
    tenants: tuple[str, ...] | None = None
    """Only these tenants (None: every tenant)."""

    def wants(self, kind: str, tenant: str) -> bool:
        """True when this sink takes alerts of *kind* about *tenant*."""
        return kind in self.kinds and (self.tenants is None or tenant in self.tenants)


@attrs.frozen(kw_only=True)
class LogSink(_Common):
    """Write each alert as one log line (logger ``domainpolicy.alerts``, level WARNING)."""

    def deliver(self, row: OutboxRow, config: AlertsConfig, now: float) -> None:
        """Log the alert; never fails."""
        _log.warning(
            "alert %s tenant=%s kind=%s id=%s: %s",
            self.name,
            row.tenant,
            row.kind,
            row.alert_id,
            row.payload.get("message", ""),
        )


@attrs.frozen(kw_only=True)
class SmtpSink(_Common):
    """E-mail the notice to the tenant's admins (``unblock_requested``: to the support
    addresses) through an SMTP relay.

    Attributes:
        host, port: the relay.
        tls: ``starttls`` (required, fails if the server does not offer it), ``implicit``
            (SMTPS) or ``none``.
        username, password: AUTH credentials (both or neither).
        timeout: seconds for connecting and for each command.
        sender: the envelope and ``From`` address.
        cafile: a CA bundle to verify the relay's certificate with (default: the system's).
    """

    host: str
    port: int = 587
    tls: str = "starttls"
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    timeout: float = 10.0
    sender: str
    cafile: str | None = None

    def recipients(self, kind: str, tenant: str, config: AlertsConfig) -> tuple[str, ...]:
        """Whom a notice of *kind* about *tenant* goes to."""
        if kind == AlertKind.UNBLOCK_REQUESTED.value:
            return config.support
        return config.contacts(tenant).admins

    def deliver(self, row: OutboxRow, config: AlertsConfig, now: float) -> None:
        """Send the notice of *row*.

        Raises:
            DeliveryFailed: the relay is unreachable, slow, refused a command (5xx permanent,
                4xx temporary), or its certificate did not verify.
        """
        to = list(self.recipients(row.kind, row.tenant, config))
        if not to:
            raise DeliveryFailed(
                f"no recipient for {row.kind} of tenant {row.tenant!r}", permanent=True
            )
        contacts = config.contacts(row.tenant)
        message = render_email(
            row.payload,
            sender=self.sender,
            recipients=to,
            language=contacts.language,
            support=", ".join(config.support),
            now=now,
        )
        context = ssl.create_default_context(cafile=self.cafile)
        try:
            if self.tls == "implicit":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=context
                )
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            with client:
                if self.tls == "starttls":
                    client.starttls(context=context)
                if self.username is not None and self.password is not None:
                    client.login(self.username, self.password)
                client.send_message(message, from_addr=self.sender, to_addrs=to)
        except smtplib.SMTPResponseException as exc:
            text = (
                exc.smtp_error.decode("utf-8", "replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            raise DeliveryFailed(
                f"SMTP {self.host}:{self.port} answered {exc.smtp_code} {text}",
                permanent=500 <= exc.smtp_code < 600,
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryFailed(
                f"SMTP {self.host}:{self.port} refused every recipient: {exc.recipients}"
            ) from exc
        except ssl.SSLError as exc:
            raise DeliveryFailed(f"SMTP {self.host}:{self.port} TLS failed: {exc}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(
                f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from exc


@attrs.frozen(kw_only=True)
class WebhookSink(_Common):
    """POST the alert's payload as JSON, signed with HMAC-SHA256 (see
    `domainpolicy._alerts.notice.sign`), with the alert id as ``Idempotency-Key``.

    Attributes:
        url: ``https://...`` (or ``http://`` for a receiver on loopback or a trusted network).
        secret: the shared secret of the signature.
        timeout: seconds for connecting and for the answer.
        headers: extra request headers (ASCII).
        cafile: a CA bundle to verify the receiver's certificate with (default: the system's).
    """

    url: str
    secret: str = attrs.field(repr=False)
    timeout: float = 5.0
    headers: Mapping[str, str] = attrs.field(factory=dict)
    cafile: str | None = None

    def deliver(self, row: OutboxRow, config: AlertsConfig, now: float) -> None:
        """POST *row*'s payload; a 2xx answer is a delivery.

        Raises:
            DeliveryFailed: the receiver is unreachable, slow, its certificate did not verify,
                or it answered anything but 2xx (4xx other than 408/429 are permanent).
        """
        parts = urllib.parse.urlsplit(self.url)
        body = webhook_body(row.payload)
        headers = {
            **self.headers,
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "domainpolicy-alerts",
            "Idempotency-Key": row.alert_id,
            "X-Domainpolicy-Delivery": row.id,
            SIGNATURE_HEADER: sign(self.secret.encode(), int(time.time()), body),
        }
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.hostname or "",
                parts.port,
                timeout=self.timeout,
                context=ssl.create_default_context(cafile=self.cafile),
            )
        else:
            connection = http.client.HTTPConnection(
                parts.hostname or "", parts.port, timeout=self.timeout
            )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            status = response.status
            response.read(4096)
        except ssl.SSLError as exc:
            raise DeliveryFailed(f"webhook {self.url}: TLS failed: {exc}") from exc
        except TimeoutError as exc:
            raise DeliveryFailed(f"webhook {self.url}: timed out after {self.timeout} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryFailed(f"webhook {self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
        if not 200 <= status < 300:
            permanent = 400 <= status < 500 and status not in (408, 425, 429)
            raise DeliveryFailed(f"webhook {self.url} answered HTTP {status}", permanent=permanent)


Sink = LogSink | SmtpSink | WebhookSink


@attrs.frozen(kw_only=True)
class AlertsConfig:
    """The ``[alerts]`` configuration: sinks, contacts, reminders and the retry schedule.

    Attributes:
        sinks: by name.
        tenants: contacts per tenant.
        support: addresses that hear about unblock requests.
        language: the default language of notices.
        reminder_interval: seconds between reminders while a tenant stays blocked or suspended
            (0: no reminders).
        max_attempts: attempts before a row goes to the dead letter.
        backoff_base, backoff_max: the retry delay is ``min(backoff_max, backoff_base *
            2**(attempts - 1))``, times a random factor in [0.5, 1] (jitter).
        lease: seconds a worker holds a claimed row.
        poll_interval: seconds between claims when idle.
    """

    sinks: Mapping[str, Sink] = attrs.field(factory=dict)
    tenants: Mapping[str, TenantContacts] = attrs.field(factory=dict)
    support: tuple[str, ...] = ()
    language: str = "en"
    reminder_interval: float = 3600.0
    max_attempts: int = 8
    backoff_base: float = 30.0
    backoff_max: float = 3600.0
    lease: float = 120.0
    poll_interval: float = 2.0

    def __attrs_post_init__(self) -> None:
        problems = check_config(self)
        if problems:
            raise InvalidConfiguration(problems, source="[alerts]")

    def contacts(self, tenant: str) -> TenantContacts:
        """The tenant's contacts (none, in the default language, for a tenant not listed)."""
        found = self.tenants.get(tenant)
        return found if found is not None else TenantContacts(language=self.language)

    def route(self, alert: Alert) -> tuple[str, ...]:
        """The sinks *alert* goes to (an `AlertRoute` for `StateStore.route_alerts`)."""
        return self.route_kind(alert.kind.value, alert.tenant)

    def route_kind(self, kind: str, tenant: str) -> tuple[str, ...]:
        """The sinks an alert of *kind* about *tenant* goes to: those that want it, and for
        e-mail only when it has a recipient."""
        names = []
        for name, sink in self.sinks.items():
            if not sink.wants(kind, tenant):
                continue
            if isinstance(sink, SmtpSink) and not sink.recipients(kind, tenant, self):
                continue
            names.append(name)
        return tuple(names)


def check_config(config: AlertsConfig) -> list[str]:
    """Every problem of *config* (empty when it is usable)."""
    problems: list[str] = []
    if config.language not in alert_languages():
        problems.append(
            f"language={shown(config.language)}: no template (have {alert_languages()})"
        )
    for tenant, contacts in config.tenants.items():
        if contacts.language not in alert_languages():
            problems.append(f"tenants.{tenant}.language={shown(contacts.language)}: no template")
        for address in contacts.admins:
            if not _address(address):
                problems.append(
                    f"tenants.{tenant}.admins: {shown(address)} is not an e-mail address"
                )
    for address in config.support:
        if not _address(address):
            problems.append(f"support: {shown(address)} is not an e-mail address")
    for key in ("max_attempts",):
        if type(getattr(config, key)) is not int or getattr(config, key) < 1:
            problems.append(f"{key}={shown(getattr(config, key))}: must be an integer >= 1")
    for key in ("backoff_base", "backoff_max", "lease", "poll_interval"):
        value = getattr(config, key)
        if type(value) not in (int, float) or not 0 < value <= 86400:
            problems.append(f"{key}={shown(value)}: must be seconds in (0, 86400]")
    if (
        type(config.reminder_interval) not in (int, float)
        or not 0 <= config.reminder_interval <= 7 * 86400
    ):
        problems.append(
            f"reminder_interval={shown(config.reminder_interval)}: must be seconds in [0, 604800]"
        )
    for name, sink in config.sinks.items():
        where = f"sinks.{name}"
        if not name or not name.replace("-", "").replace("_", "").isalnum() or not name.isascii():
            problems.append(
                f"{where}: the name {shown(name)} must be ASCII letters, digits, '-' or '_'"
            )
        bad_kinds = sorted(set(sink.kinds) - set(ALL_KINDS))
        if bad_kinds:
            problems.append(
                f"{where}.kinds: {bad_kinds} are not alert kinds (expected {list(ALL_KINDS)})"
            )
        timeout = getattr(sink, "timeout", 1.0)
        if type(timeout) not in (int, float) or not 0 < timeout <= 300:
            problems.append(f"{where}.timeout={shown(timeout)}: must be seconds in (0, 300]")
        if isinstance(sink, SmtpSink):
            if sink.tls not in ("starttls", "implicit", "none"):
                problems.append(
                    f"{where}.tls={shown(sink.tls)}: must be starttls, implicit or none"
                )
            if not sink.host or not _ascii_header(sink.host):
                problems.append(f"{where}.host={shown(sink.host)}: must be a host name or address")
            if type(sink.port) is not int or not 0 < sink.port < 65536:
                problems.append(f"{where}.port={shown(sink.port)}: must be a port number")
            if (sink.username is None) != (sink.password is None):
                problems.append(f"{where}: username and password go together")
            if not _address(sink.sender):
                problems.append(f"{where}.sender={shown(sink.sender)}: is not an e-mail address")
        elif isinstance(sink, WebhookSink):
            parts = urllib.parse.urlsplit(sink.url) if isinstance(sink.url, str) else None
            if (
                parts is None
                or parts.scheme not in ("http", "https")
                or not parts.hostname
                or not sink.url.isascii()
            ):
                problems.append(
                    f"{where}.url={shown(sink.url)}: must be an http:// or https:// URL"
                )
            if not isinstance(sink.secret, str) or len(sink.secret) < 16:
                problems.append(f"{where}.secret: missing or shorter than 16 characters")
            for key, value in sink.headers.items():
                if not _ascii_header(key) or not isinstance(value, str) or not _ascii_header(value):
                    problems.append(
                        f"{where}.headers.{key}: {shown(value)} is not an ASCII header value"
                    )
    return problems


def _address(value: object) -> bool:
    if not isinstance(value, str) or "@" not in value or len(value) > 254:
        return False
    local, _, domain = value.rpartition("@")
    return bool(local) and bool(domain) and not any(c in value for c in ' \t\r\n\0<>,;"')

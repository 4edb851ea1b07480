"""Alerts that reach people: sinks (e-mail, signed webhooks, the log), the notice, the delivery
worker with reminders, and the ``[alerts]`` configuration.  The outbox itself is part of the
store contract (`domainpolicy._stores.outbox`).

This package's modules import each other directly, never this ``__init__``.
"""

from __future__ import annotations

from domainpolicy._alerts.config import parse_alerts
from domainpolicy._alerts.notice import render_email, render_text, sign, verify, webhook_body
from domainpolicy._alerts.sinks import (
    AlertsConfig,
    DeliveryFailed,
    LogSink,
    SmtpSink,
    TenantContacts,
    WebhookSink,
)
from domainpolicy._alerts.worker import AlertWorker, DeliveryReport

__all__ = [
    "AlertWorker",
    "AlertsConfig",
    "DeliveryFailed",
    "DeliveryReport",
    "LogSink",
    "SmtpSink",
    "TenantContacts",
    "WebhookSink",
    "parse_alerts",
    "render_email",
    "render_text",
    "sign",
    "verify",
    "webhook_body",
]

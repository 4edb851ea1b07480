"""The ``[alerts]`` table of the TOML configuration, parsed into an `AlertsConfig`.

Imports `domainpolicy._alerts.sinks` and `domainpolicy._errors`; `domainpolicy._config` calls
`parse_alerts` with the file's ``alerts`` table.  Secrets may be given inline or, better, by the
name of an environment variable (``password_env``, ``secret_env``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

from domainpolicy._alerts.sinks import (
    AlertsConfig,
    LogSink,
    Sink,
    SmtpSink,
    TenantContacts,
    WebhookSink,
)
from domainpolicy._errors import InvalidConfiguration, shown

__all__ = ["parse_alerts"]

_TOP: Final = frozenset(
    {
        "sinks",
        "tenants",
        "support",
        "language",
        "reminder_interval",
        "max_attempts",
        "backoff_base",
        "backoff_max",
        "lease",
        "poll_interval",
    }
)
_COMMON: Final = frozenset({"type", "kinds", "tenants"})
_SINK_KEYS: Final = {
    "log": frozenset(),
    "smtp": frozenset(
        {
            "host",
            "port",
            "tls",
            "username",
            "password",
            "password_env",
            "timeout",
            "sender",
            "cafile",
        }
    ),
    "webhook": frozenset({"url", "secret", "secret_env", "timeout", "headers", "cafile"}),
}


def _secret(table: Mapping[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    env = table.get(f"{key}_env")
    if env is not None:
        value = os.environ.get(str(env))
        if value is None:
            problems.append(f"{where}.{key}_env: environment variable {shown(env)} is not set")
        return value
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        problems.append(f"{where}.{key}: must be a string")
        return None
    return value


def _strings(value: object, where: str, problems: list[str]) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, list)
        or not all(isinstance(v, str) for v in value)
    ):
        problems.append(f"{where}: must be a list of strings, got {shown(value)}")
        return ()
    return tuple(value)


def _sink(name: str, table: object, problems: list[str]) -> Sink | None:
    where = f"alerts.sinks.{name}"
    if not isinstance(table, Mapping):
        problems.append(f"{where}: must be a table")
        return None
    kind = table.get("type")
    if kind not in _SINK_KEYS:
        problems.append(f"{where}.type={shown(kind)}: must be one of {sorted(_SINK_KEYS)}")
        return None
    unknown = sorted(set(table) - _COMMON - _SINK_KEYS[kind])
    if unknown:
        problems.append(f"{where}: unknown keys {unknown}")
    common: dict[str, Any] = {"name": name}
    if "kinds" in table:
        common["kinds"] = _strings(table["kinds"], f"{where}.kinds", problems)
    if "tenants" in table:
        common["tenants"] = _strings(table["tenants"], f"{where}.tenants", problems)
    options = {k: v for k, v in table.items() if k in _SINK_KEYS[kind] and not k.endswith("_env")}
    try:
        if kind == "log":
            return LogSink(**common)
        if kind == "smtp":
            options["password"] = _secret(table, "password", where, problems)
            if "host" not in options or "sender" not in options:
                problems.append(f"{where}: host and sender are required")
                return None
            return SmtpSink(**common, **options)
        options["secret"] = _secret(table, "secret", where, problems)
        if "url" not in options:
            problems.append(f"{where}: url is required")
            return None
        if options["secret"] is None:
            problems.append(f"{where}: secret (or secret_env) is required")
            return None
        return WebhookSink(**common, **options)
    except TypeError as exc:
        problems.append(f"{where}: {exc}")
        return None


def parse_alerts(table: object, *, source: str | None = None) -> AlertsConfig | None:
    """The `AlertsConfig` of an ``[alerts]`` table (None when the table is absent or empty).

    Raises:
        InvalidConfiguration: every problem found (unknown keys, a bad URL, a missing secret,
            a non-ASCII header value, an unknown alert kind or language...), at once.
    """
    if table is None or table == {}:
        return None
    problems: list[str] = []
    if not isinstance(table, Mapping):
        raise InvalidConfiguration(["alerts: must be a table"], source=source)
    for key in sorted(set(table) - _TOP):
        problems.append(f"alerts.{key}: unknown option (expected one of {sorted(_TOP)})")
    sinks: dict[str, Sink] = {}
    raw_sinks = table.get("sinks", {})
    if not isinstance(raw_sinks, Mapping):
        problems.append("alerts.sinks: must be a table of tables")
        raw_sinks = {}
    for name, value in raw_sinks.items():
        sink = _sink(str(name), value, problems)
        if sink is not None:
            sinks[str(name)] = sink
    tenants: dict[str, TenantContacts] = {}
    raw_tenants = table.get("tenants", {})
    if not isinstance(raw_tenants, Mapping):
        problems.append("alerts.tenants: must be a table of tables")
        raw_tenants = {}
    for tenant, value in raw_tenants.items():
        where = f"alerts.tenants.{tenant}"
        if not isinstance(value, Mapping) or set(value) - {"admins", "language"}:
            problems.append(f"{where}: must be a table with admins and language")
            continue
        tenants[str(tenant)] = TenantContacts(
            admins=_strings(value.get("admins", []), f"{where}.admins", problems),
            language=str(value.get("language", table.get("language", "en"))),
        )
    options = {k: table[k] for k in _TOP - {"sinks", "tenants", "support"} if k in table}
    support = _strings(table.get("support", []), "alerts.support", problems)
    config = None
    try:
        config = AlertsConfig(sinks=sinks, tenants=tenants, support=support, **options)
    except InvalidConfiguration as exc:
        problems += [f"alerts.{p}" for p in exc.problems]
    if problems or config is None:
        raise InvalidConfiguration(problems, source=source)
    return config

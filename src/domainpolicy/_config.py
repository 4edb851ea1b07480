"""Configuration from a TOML file: tenants, accepted domains, connectors, thresholds, replies.

Every problem is collected and reported at once, each with where it is: the file and key
(``tenants.contoso.domains[2]``) or the file and line of a domains file.  See
``docs/policy.md`` for the format; ``examples/tenants.toml`` is a complete example.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from ._alerts.config import parse_alerts
from ._alerts.sinks import AlertsConfig
from ._blockstate import BlockPolicy
from ._connectors import ConnectorTable, InboundConnector
from ._errors import InvalidConfiguration, InvalidDomain, shown, shown_key
from ._matcher import AcceptedDomain, DomainMatcher, DomainType
from ._names import normalize_domain
from ._policy import RelayPolicy
from ._replies import ReplyCatalog
from ._stores import StateStore, open_store

__all__ = ["PolicyConfig", "load_config", "parse_domains_file"]

_TOP_KEYS: Final = frozenset(
    {"store", "policy", "relay", "replies", "tenants", "connectors", "domains_file", "postfix"}
) | {"alerts"}
_TENANT_KEYS: Final = frozenset({"domains", "domains_file"})
_DOMAIN_KEYS: Final = frozenset({"domain", "match_subdomains", "type"})
_CONNECTOR_KEYS: Final = frozenset(
    {"name", "tenant", "sender_ip_ranges", "tls_cert_names", "created_at", "enabled"}
)
_RELAY_KEYS: Final = frozenset({"null_sender", "count", "fail_open"})
_TYPES: Final = {t.value: t for t in DomainType} | {t.name.lower(): t for t in DomainType}
_MAX_DOMAINS_LINE: Final = 4096
_MAX_PROBLEMS: Final = 100  # an error lists at most this many problems, then how many more
_MAX_PROBLEM: Final = 1000  # characters of one problem (values in it are already truncated)
_MAX_DEPTH: Final = 32  # levels of tables and arrays, and parts of one dotted key
_INT64: Final = range(-(2**63), 2**63)  # TOML integers are 64-bit (TOML 1.0)


@attrs.frozen
class PolicyConfig:
    """A checked configuration, ready to build a `RelayPolicy` from.

    Attributes:
        source: the file it came from.
        matcher: the compiled accepted domains.
        connectors: the compiled connector table.
        connector_list: the connectors as configured.
        block_policy: thresholds.
        replies: reply texts.
        store_url: where state lives (``sqlite:...`` by default, next to the file).
        relay: options for `RelayPolicy` (``null_sender``, ``count``, ``fail_open``).
        pinned_certificates: for the Postfix policy server, TLS client certificate fingerprints
            (Postfix's ``ccert_fingerprint`` / ``ccert_pubkey_fingerprint``) mapped to the
            certificate name to attribute them by (``[postfix] pinned_certificates``).
    """

    source: str
    matcher: DomainMatcher
    connectors: ConnectorTable
    connector_list: tuple[InboundConnector, ...]
    block_policy: BlockPolicy
    replies: ReplyCatalog
    store_url: str
    relay: Mapping[str, Any] = attrs.field(factory=dict)
    pinned_certificates: Mapping[str, str] = attrs.field(factory=dict)
    alerts: AlertsConfig | None = None
    """The ``[alerts]`` table (see `domainpolicy._alerts.config`), None when absent."""

    def open_store(self) -> StateStore:
        """Open the configured store.

        Raises:
            InvalidConfiguration: the store URL is not usable.
            StoreUnavailable: the store cannot be opened.
        """
        return open_store(self.store_url)

    def build_policy(
        self, *, store: StateStore | None = None, clock: Callable[[], float] | None = None
    ) -> RelayPolicy:
        """A `RelayPolicy` with this configuration (and *store*, or the configured one).

        Raises:
            InvalidConfiguration: the relay options are invalid.
            StoreUnavailable: the configured store cannot be opened.
        """
        return RelayPolicy(
            self.matcher,
            self.connectors,
            self.block_policy,
            store if store is not None else self.open_store(),
            replies=self.replies,
            clock=clock,
            **self.relay,
        )


class _Problems:
    """Problems found so far: at most `_MAX_PROBLEMS`, each at most `_MAX_PROBLEM` characters,
    so that an error message stays short whatever the file holds."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []
        self.more = 0

    def add(self, where: str, message: str) -> None:
        if len(self.items) >= _MAX_PROBLEMS:
            self.more += 1
            return
        self.items.append(_clipped(f"{where}: {message}", _MAX_PROBLEM))

    def listed(self) -> list[str]:
        """The problems, and how many more were found when there are too many to list."""
        return self.items + ([f"... and {self.more} more problems"] if self.more else [])


def _clipped(text: str, limit: int = 200) -> str:
    """*text* (an exception's message, say) cut to *limit* characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _names(keys: list[Any]) -> str:
    """Unknown keys for a message: the first five, each shown truncated, and how many."""
    listed = ", ".join(shown(key, 40) for key in keys[:5])
    return f"[{listed}{f', ... ({len(keys)} in all)' if len(keys) > 5 else ''}]"


def _domain_entry(
    value: object, tenant: str, where: str, problems: _Problems
) -> AcceptedDomain | None:
    if isinstance(value, str):
        return AcceptedDomain(value, tenant)
    if not isinstance(value, Mapping):
        problems.add(where, f"{shown(value)} must be a domain string or a table")
        return None
    unknown = sorted(set(value) - _DOMAIN_KEYS)
    if unknown:
        problems.add(where, f"unknown keys {_names(unknown)} (expected {sorted(_DOMAIN_KEYS)})")
    domain = value.get("domain")
    if not isinstance(domain, str):
        problems.add(where, f"'domain' must be a string, got {shown(domain)}")
        return None
    subdomains = value.get("match_subdomains", False)
    if not isinstance(subdomains, bool):
        problems.add(where, f"'match_subdomains' must be true or false, got {shown(subdomains)}")
        return None
    kind_name = value.get("type", "authoritative")
    kind = _TYPES.get(kind_name.lower()) if isinstance(kind_name, str) else None
    if kind is None:
        problems.add(
            where,
            f"'type' must be one of {sorted(t.value for t in DomainType)}, got {shown(kind_name)}",
        )
        return None
    return AcceptedDomain(domain, tenant, kind, subdomains)


def parse_domains_file(
    path: str | os.PathLike[str], *, tenant: str | None = None
) -> Iterator[tuple[int, AcceptedDomain | str]]:
    """Read a large accepted-domains file: one ``domain<TAB>tenant<TAB>flags`` per line.

    Yields ``(line_number, entry)``, or ``(line_number, problem)`` for a bad line.  Blank lines
    and ``#`` comments are skipped.  The tenant column may be omitted when *tenant* is given.
    Flags (comma-separated, optional): ``subdomains``, and one of ``authoritative``,
    ``internal_relay``, ``external_relay``.

    Raises:
        InvalidConfiguration: the file cannot be read.
    """
    name = os.fspath(path)
    try:
        handle = open(name, encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidConfiguration(
            [f"cannot read domains file {shown(name)}: {_clipped(reason)}"]
        ) from exc
    with handle:
        try:
            for number, raw in enumerate(handle, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if len(line) > _MAX_DOMAINS_LINE:
                    yield number, f"line of {len(line)} characters is too long"
                    continue
                fields = line.split("\t")
                domain = fields[0].strip()
                owner = fields[1].strip() if len(fields) > 1 and fields[1].strip() else tenant
                if owner is None:
                    yield number, f"{shown(domain)} has no tenant column"
                    continue
                flags = (
                    {f.strip().lower() for f in fields[2].split(",")} if len(fields) > 2 else set()
                )
                flags.discard("")
                kinds = [_TYPES[f] for f in flags if f in _TYPES]
                unknown = sorted(f for f in flags if f not in _TYPES and f != "subdomains")
                if unknown or len(kinds) > 1 or len(fields) > 3:
                    yield (
                        number,
                        f"bad flags {shown(fields[2:])} (expected subdomains and one type)",
                    )
                    continue
                yield (
                    number,
                    AcceptedDomain(
                        domain,
                        owner,
                        kinds[0] if kinds else DomainType.AUTHORITATIVE,
                        "subdomains" in flags,
                    ),
                )
        except UnicodeDecodeError as exc:
            raise InvalidConfiguration(
                [f"domains file {shown(name)} is not UTF-8: {_clipped(str(exc))}"]
            ) from exc


def _datetime(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{shown(value)} is not an ISO 8601 date-time") from exc
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
    raise ValueError(f"{shown(value)} is not a date-time")


def _connector(value: object, where: str, problems: _Problems) -> InboundConnector | None:
    if not isinstance(value, Mapping):
        problems.add(where, f"{shown(value)} must be a table")
        return None
    unknown = sorted(set(value) - _CONNECTOR_KEYS)
    if unknown:
        problems.add(where, f"unknown keys {_names(unknown)} (expected {sorted(_CONNECTOR_KEYS)})")
    name, tenant = value.get("name"), value.get("tenant")
    if not isinstance(name, str) or not name or not isinstance(tenant, str) or not tenant:
        problems.add(where, "'name' and 'tenant' must be non-empty strings")
        return None
    ranges = value.get("sender_ip_ranges", [])
    names = value.get("tls_cert_names", [])
    if not isinstance(ranges, list) or not isinstance(names, list):
        problems.add(where, "'sender_ip_ranges' and 'tls_cert_names' must be arrays")
        return None
    networks = []
    for index, text in enumerate(ranges):
        if not isinstance(text, str):
            problems.add(
                f"{where}.sender_ip_ranges[{index}]", f"{shown(text)} must be a CIDR string"
            )
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            problems.add(
                f"{where}.sender_ip_ranges[{index}]", f"{shown(text)}: {_clipped(str(exc))}"
            )
    for index, cert_name in enumerate(names):
        if not isinstance(cert_name, str):
            problems.add(f"{where}.tls_cert_names[{index}]", f"{shown(cert_name)} must be a string")
    try:
        created = _datetime(value["created_at"]) if "created_at" in value else None
    except ValueError as exc:
        problems.add(f"{where}.created_at", str(exc))
        created = None
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.add(f"{where}.enabled", f"must be true or false, got {shown(enabled)}")
        enabled = True
    return InboundConnector(
        name=name,
        tenant=tenant,
        sender_ip_ranges=tuple(networks),
        tls_cert_names=tuple(n for n in names if isinstance(n, str)),
        created_at=created,
        enabled=enabled,
    )


_ENTRY_RE: Final = re.compile(r"^entry #(\d+) ")
_FINGERPRINT_RE: Final = re.compile(r"[0-9A-Fa-f]{2}(?:[:]?[0-9A-Fa-f]{2})+")


def _pinned_certificates(table: object, problems: _Problems) -> dict[str, str]:
    """``[postfix] pinned_certificates = { "AB:CD:..." = "mail.contoso.com" }``, checked."""
    if not isinstance(table, Mapping):
        problems.add("postfix", "must be a table")
        return {}
    for key in sorted(set(table) - {"pinned_certificates"}):
        problems.add(f"postfix.{shown_key(key)}", "unknown key (expected pinned_certificates)")
    pinned = table.get("pinned_certificates", {})
    if not isinstance(pinned, Mapping):
        problems.add("postfix.pinned_certificates", "must be a table of fingerprint = name")
        return {}
    result: dict[str, str] = {}
    for fingerprint, name in pinned.items():
        where = f"postfix.pinned_certificates.{shown(fingerprint, 40)}"
        if not _FINGERPRINT_RE.fullmatch(fingerprint):
            problems.add(where, "the key must be a hex fingerprint (AB:CD:... or ABCD...)")
            continue
        try:
            normalize_domain(name)
        except InvalidDomain as exc:
            problems.add(where, f"the certificate name is not a valid host name: {exc.detail}")
            continue
        result[fingerprint] = name
    return result


_TOML_TOKEN_RE: Final = re.compile(r"""[\[\]{}.,="'#\n]""")
# Possessive (*+, ++): no backtracking, so linear even when a string is not closed.
_BASIC_STRING_RE: Final = re.compile(r'(?:[^"\\\n]++|\\.)*+"')
_LITERAL_STRING_RE: Final = re.compile(r"[^'\n]*'")
_MULTILINE_BASIC_RE: Final = re.compile(r'(?:[^"\\]++|\\.|"(?!""))*+"""', re.DOTALL)


def _toml_shape_problem(text: str) -> str | None:
    """Why TOML *text* is nested too deeply to parse safely, or None; in linear time.

    Python's tomllib recurses once per nested array or inline table (so about 500 of them raise
    `RecursionError`), and it takes time quadratic in the number of parts of a dotted key.  This
    scan counts both, outside strings and comments, before tomllib sees the text.  It follows
    just enough of TOML to tell keys from values; on text that is not TOML it may stop at a
    different problem than tomllib would, but never refuses valid TOML within the limits.
    """
    stack: list[str] = []  # "h": a table header's bracket, "a": an array, "t": an inline table
    in_key, parts, line, position = True, 1, 1, 0
    while found := _TOML_TOKEN_RE.search(text, position):
        token, position = found.group(), found.end()
        if token == "\n":
            line += 1
            if not stack:
                in_key, parts = True, 1
        elif token == "#":
            end = text.find("\n", position)
            position = len(text) if end < 0 else end
        elif token in "\"'":
            start = position
            if text.startswith(token * 2, position):  # a multi-line string
                if token == '"':
                    closed = _MULTILINE_BASIC_RE.match(text, position + 2)
                    end = closed.end() if closed else -1
                else:
                    end = text.find("'''", position + 2)
                    end = end + 3 if end >= 0 else -1
                if end < 0:
                    return None  # unterminated: tomllib reports it
                for _ in range(2):  # up to two quotes of the content may precede the delimiter
                    if text.startswith(token, end):
                        end += 1
                position = end
            else:
                closed = (_BASIC_STRING_RE if token == '"' else _LITERAL_STRING_RE).match(
                    text, position
                )
                if closed:
                    position = closed.end()
                else:  # unterminated: tomllib reports it; go on after the line
                    end = text.find("\n", position)
                    position = len(text) if end < 0 else end
            line += text.count("\n", start, position)
        elif token == "[" and in_key and (not stack or stack[-1] == "h"):
            stack.append("h")
        elif token in "[{":
            stack.append("a" if token == "[" else "t")
            in_key, parts = token == "{", 1
            if len(stack) > _MAX_DEPTH:
                return f"line {line}: arrays and inline tables nested more than {_MAX_DEPTH} deep"
        elif token in "]}":
            in_key = bool(stack) and stack.pop() == "h"
        elif token == ",":
            if stack and stack[-1] == "t":
                in_key, parts = True, 1
        elif token == "=":
            in_key = False
        elif in_key:  # "." between the parts of a key
            parts += 1
            if parts > _MAX_DEPTH:
                return f"line {line}: a key or table name of more than {_MAX_DEPTH} dotted parts"
    return None


def _structure_problems(data: Mapping[str, Any]) -> list[str]:
    """Values nested deeper than `_MAX_DEPTH` (whose repr would recurse that deep) and integers
    outside TOML's 64-bit range (whose repr is quadratic), found without recursion."""
    problems: list[str] = []
    pending: list[tuple[tuple[object, ...], object]] = [((), data)]
    while pending and len(problems) < _MAX_PROBLEMS:
        where, value = pending.pop()
        if len(where) > _MAX_DEPTH:
            problems.append(f"{_path(where)}: values nested more than {_MAX_DEPTH} levels deep")
        elif isinstance(value, Mapping):
            pending += [((*where, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [((*where, index), item) for index, item in enumerate(value)]
        elif isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
            problems.append(
                f"{_path(where)}: an integer of {value.bit_length()} bits is outside the 64-bit "
                "range TOML allows"
            )
    return problems


def _path(where: tuple[object, ...]) -> str:
    """``tenants.contoso.domains[2]``: a path of keys and indices, each key `shown_key`."""
    path = "".join(
        f"[{part}]" if isinstance(part, int) else f".{shown_key(part)}" for part in where
    )
    return path.lstrip(".")


def _read_toml(source: str) -> dict[str, Any]:
    """The TOML file *source*, parsed and checked to be UTF-8, not too deep, with 64-bit
    integers.

    Raises:
        InvalidConfiguration: the file cannot be read or is not such TOML.
    """

    def refuse(problem: str) -> InvalidConfiguration:
        return InvalidConfiguration([problem], source=source)

    try:
        with open(source, "rb") as handle:
            raw = handle.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise refuse(f"cannot read {shown(source)}: {_clipped(reason)}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise refuse(
            f"not UTF-8 (TOML must be): octet {raw[exc.start]:#04x} at line {line}, column {column}"
        ) from exc
    problem = _toml_shape_problem(text)
    if problem is not None:
        raise refuse(f"not valid TOML here: {problem}")
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
        raise refuse(f"not valid TOML: {_clipped(str(exc))}") from exc
    except RecursionError as exc:  # pragma: no cover - the shape check bounds the nesting
        raise refuse("not valid TOML here: arrays or inline tables nested too deeply") from exc
    problems = _structure_problems(data)
    if problems:
        raise InvalidConfiguration(problems, source=source)
    return data


def load_config(path: str | os.PathLike[str]) -> PolicyConfig:
    """Read and check a TOML configuration file.

    The file must be UTF-8 TOML with arrays, tables and dotted keys nested at most 32 deep and
    integers within 64 bits.  Reading takes time linear in the file's size.

    Raises:
        InvalidConfiguration: listing every problem with its file and key or line (at most
            100 of them, then how many more), each value shown truncated.  No other exception
            escapes, whatever the file holds.
    """
    source = os.fspath(path)
    data = _read_toml(source)
    base = Path(source).resolve().parent
    problems = _Problems(source)
    for key in sorted(set(data) - _TOP_KEYS):
        problems.add(shown_key(key), f"unknown key (expected one of {sorted(_TOP_KEYS)})")

    # accepted domains, each with where it came from
    entries: list[AcceptedDomain] = []
    origins: list[str] = []

    def add_file(file_value: object, where: str, tenant: str | None) -> None:
        if not isinstance(file_value, str):
            problems.add(where, "must be a file path string")
            return
        file_path = (base / file_value) if not os.path.isabs(file_value) else Path(file_value)
        try:
            for number, item in parse_domains_file(file_path, tenant=tenant):
                if isinstance(item, str):
                    problems.add(f"{file_path}:{number}", item)
                else:
                    entries.append(item)
                    origins.append(f"{file_path}:{number}")
        except InvalidConfiguration as exc:
            problems.add(where, "; ".join(exc.problems))

    tenants = data.get("tenants", {})
    if not isinstance(tenants, Mapping):
        problems.add("tenants", "must be a table of tenants")
        tenants = {}
    for tenant, table in tenants.items():
        where = f"tenants.{shown_key(tenant)}"
        if not isinstance(table, Mapping):
            problems.add(where, "must be a table")
            continue
        for key in sorted(set(table) - _TENANT_KEYS):
            problems.add(
                f"{where}.{shown_key(key)}", f"unknown key (expected {sorted(_TENANT_KEYS)})"
            )
        domains = table.get("domains", [])
        if not isinstance(domains, list):
            problems.add(f"{where}.domains", "must be an array")
            domains = []
        for index, value in enumerate(domains):
            entry = _domain_entry(value, tenant, f"{where}.domains[{index}]", problems)
            if entry is not None:
                entries.append(entry)
                origins.append(f"{where}.domains[{index}]")
        if "domains_file" in table:
            add_file(table["domains_file"], f"{where}.domains_file", tenant)
    if "domains_file" in data:
        add_file(data["domains_file"], "domains_file", None)

    matcher: DomainMatcher | None = None
    try:
        matcher = DomainMatcher.compile(entries)
    except InvalidConfiguration as exc:
        for problem in exc.problems:
            found = _ENTRY_RE.match(problem)
            if found and int(found.group(1)) < len(origins):
                problems.add(origins[int(found.group(1))], problem[found.end() :])
            else:
                problems.add("accepted domains", problem)

    connectors: list[InboundConnector] = []
    raw_connectors = data.get("connectors", [])
    if not isinstance(raw_connectors, list):
        problems.add("connectors", "must be an array of tables ([[connectors]])")
        raw_connectors = []
    for index, value in enumerate(raw_connectors):
        connector = _connector(value, f"connectors[{index}]", problems)
        if connector is not None:
            connectors.append(connector)
    connector_table: ConnectorTable | None = None
    if matcher is not None:
        try:
            connector_table = ConnectorTable.compile(connectors, matcher)
        except InvalidConfiguration as exc:
            for problem in exc.problems:
                problems.add("connectors", problem)

    policy_data = data.get("policy", {})
    block_policy: BlockPolicy | None = None
    if not isinstance(policy_data, Mapping):
        problems.add("policy", "must be a table")
    else:
        known = {f.name for f in attrs.fields(BlockPolicy)}
        for key in sorted(set(policy_data) - known):
            problems.add(
                f"policy.{shown_key(key)}", f"unknown threshold (expected one of {sorted(known)})"
            )
        try:
            block_policy = BlockPolicy(**{k: v for k, v in policy_data.items() if k in known})
        except InvalidConfiguration as exc:
            for problem in exc.problems:
                problems.add("policy", problem)
        except TypeError as exc:
            problems.add("policy", _clipped(str(exc)))

    relay = data.get("relay", {})
    if not isinstance(relay, Mapping):
        problems.add("relay", "must be a table")
        relay = {}
    for key in sorted(set(relay) - _RELAY_KEYS):
        problems.add(
            f"relay.{shown_key(key)}", f"unknown option (expected one of {sorted(_RELAY_KEYS)})"
        )
    for key, allowed in (
        ("null_sender", ("accept", "refuse")),
        ("count", ("messages", "recipients")),
    ):
        if key in relay and not (isinstance(relay[key], str) and relay[key] in allowed):
            problems.add(f"relay.{key}", f"{shown(relay[key])} is not one of {list(allowed)}")
    if "fail_open" in relay and not isinstance(relay["fail_open"], bool):
        problems.add("relay.fail_open", f"{shown(relay['fail_open'])} is not true or false")

    replies = ReplyCatalog()
    try:
        replies = ReplyCatalog.from_mapping(data.get("replies", {}), source=source)
    except InvalidConfiguration as exc:
        for problem in exc.problems:
            problems.add("replies", problem)

    store = data.get("store", {})
    store_url = f"sqlite:{base / 'domainpolicy.sqlite3'}"
    if not isinstance(store, Mapping) or sorted(set(store) - {"url"}):
        problems.add("store", "must be a table with one key, url")
    elif "url" in store:
        url = store["url"]
        if not isinstance(url, str):
            problems.add("store.url", "must be a string")
        elif url.startswith("sqlite:") and not url.startswith("sqlite:///"):
            relative = url[len("sqlite:") :].removeprefix("//")
            store_url = f"sqlite:{base / relative}"
        else:
            store_url = url

    pinned = _pinned_certificates(data.get("postfix", {}), problems)

    alerts = None
    try:
        alerts = parse_alerts(data.get("alerts"))
    except InvalidConfiguration as exc:
        problems.items.extend(exc.problems)

    if problems.items or matcher is None or connector_table is None or block_policy is None:
        raise InvalidConfiguration(
            problems.listed() or ["configuration is incomplete"], source=source
        )
    return PolicyConfig(
        source=source,
        matcher=matcher,
        connectors=connector_table,
        connector_list=tuple(connectors),
        block_policy=block_policy,
        replies=replies,
        store_url=store_url,
        relay=dict(relay),
        pinned_certificates=pinned,
        alerts=alerts,
    )

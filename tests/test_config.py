"""TOML configuration: the bundled example loads, and every problem is reported at once."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from domainpolicy import InvalidConfiguration, State
from domainpolicy._config import _toml_shape_problem, load_config, parse_domains_file
from domainpolicy._policy import RelayRequest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bundled_example_loads() -> None:
    """examples/tenants.toml gives the matcher, connectors, thresholds and replies it declares."""
    config = load_config(EXAMPLES / "tenants.toml")
    assert config.matcher.tenant_of("Bücher.Example") == "contoso"
    assert config.matcher.tenant_of("mail.contoso.co.uk") == "contoso"
    assert config.matcher.tenant_of("eu.fabrikam.com") == "fabrikam"
    assert config.connectors.attribute("198.51.100.9") == "contoso"
    assert config.connectors.attribute("2001:db8:100::1") == "contoso"
    assert config.block_policy.message_limit == 20
    assert config.replies.server_name == "mx1.relay.example.net"
    assert config.store_url == f"sqlite:{EXAMPLES.resolve() / 'domainpolicy-example.sqlite3'}"
    assert config.relay == {"null_sender": "accept", "count": "messages"}


def test_build_policy_uses_the_configured_store(tmp_path: Path) -> None:
    """A copy of the example keeps its SQLite state next to the copy."""
    shutil.copy(EXAMPLES / "tenants.toml", tmp_path / "tenants.toml")
    config = load_config(tmp_path / "tenants.toml")
    policy = config.build_policy()
    try:
        policy.block("contoso", by="ops", reason="test")
        assert (tmp_path / "domainpolicy-example.sqlite3").exists()
        assert (
            policy.evaluate(RelayRequest("x@spam.example", client_ip="198.51.100.1"))
            .reply.lines()[0]
            .startswith("550-5.7.750")
        )
    finally:
        policy.store.close()
    again = load_config(tmp_path / "tenants.toml").build_policy()
    try:
        assert again.status("contoso").state is State.BLOCKED
    finally:
        again.store.close()


BROKEN = """
colour = "blue"
[store]
url = 42
[policy]
message_limit = -3
bogus = 1
[relay]
count = "bytes"
[replies.texts]
NO_SUCH_CODE = "x"
[tenants.a]
domains = ["a.example", "co.uk", { domain = "b.example", type = "nonsense" }, 7]
extra = true
[tenants.b]
domains = ["a.example"]
[[connectors]]
name = "c1"
tenant = "a"
sender_ip_ranges = ["10.0.0.1/8"]
tls_cert_names = ["mail.elsewhere.example"]
"""


def test_every_problem_reported_at_once_with_its_key(tmp_path: Path) -> None:
    """A broken file raises one InvalidConfiguration naming each problem and where it is."""
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN, encoding="utf-8")
    with pytest.raises(InvalidConfiguration) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    for where in (
        "colour:",
        "store.url:",
        "policy.bogus:",
        "relay.count:",
        "replies:",
        "tenants.a.extra:",
        "tenants.a.domains[1]:",
        "tenants.a.domains[2]:",
        "tenants.a.domains[3]:",
        "tenants.b.domains[0]:",
        "connectors[0].sender_ip_ranges[0]:",
    ):
        assert where in text, where
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_domains_file_problems_carry_line_numbers(tmp_path: Path) -> None:
    """Problems in a domains file are reported as file:line."""
    domains = tmp_path / "domains.tsv"
    domains.write_text(
        "# domain\ttenant\tflags\n"
        "big.example\tt1\tsubdomains\n"
        "\n"
        "bad_domain.example\tt1\n"
        "x.example\tt2\tsubdomains,internal_relay\n"
        "y.example\tt2\twhatever\n"
        "big.example\tt2\n",
        encoding="utf-8",
    )
    (tmp_path / "c.toml").write_text('domains_file = "domains.tsv"\n', encoding="utf-8")
    with pytest.raises(InvalidConfiguration) as info:
        load_config(tmp_path / "c.toml")
    problems = info.value.problems
    assert any(p.startswith(f"{domains}:4:") for p in problems)
    assert any(p.startswith(f"{domains}:6:") and "bad flags" in p for p in problems)
    assert any(p.startswith(f"{domains}:7:") and "already claimed" in p for p in problems)
    assert len(problems) == 3


def test_parse_domains_file_flags(tmp_path: Path) -> None:
    """Flags set match_subdomains and the domain type; a per-tenant file may omit the tenant."""
    domains = tmp_path / "d.tsv"
    domains.write_text("a.example\n b.example\t\tsubdomains,external_relay\n", encoding="utf-8")
    entries = [entry for _, entry in parse_domains_file(domains, tenant="t")]
    assert [(e.domain, e.tenant, e.match_subdomains, e.domain_type.value) for e in entries] == [  # type: ignore[union-attr]
        ("a.example", "t", False, "authoritative"),
        ("b.example", "t", True, "external_relay"),
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [("[store\n", "not valid TOML"), (None, "cannot read")],
)
def test_unreadable_or_invalid_toml(tmp_path: Path, content: str | None, needle: str) -> None:
    """A missing file or bad TOML is one clear configuration error."""
    path = tmp_path / "c.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidConfiguration) as info:
        load_config(path)
    assert needle in str(info.value)


PINNED = """
[tenants.contoso]
domains = ["contoso.example"]

[[connectors]]
name = "onprem"
tenant = "contoso"
tls_cert_names = ["mail.contoso.example"]

[postfix]
pinned_certificates = { "AA:BB:CC:DD" = "mail.contoso.example" }
"""


def test_pinned_certificates_for_postfix(tmp_path: Path) -> None:
    """[postfix] pinned_certificates maps fingerprints to certificate names."""
    path = tmp_path / "c.toml"
    path.write_text(PINNED, encoding="utf-8")
    assert load_config(path).pinned_certificates == {"AA:BB:CC:DD": "mail.contoso.example"}


def test_bad_pinned_certificates_are_reported_with_their_key(tmp_path: Path) -> None:
    """A non-hex fingerprint, a bad name or an unknown [postfix] key is named in the error."""
    path = tmp_path / "c.toml"
    path.write_text(
        PINNED.replace(
            '{ "AA:BB:CC:DD" = "mail.contoso.example" }',
            '{ "not-hex" = "mail.contoso.example", "AABB" = "bad..name" }\nextra = 1',
        ),
        encoding="utf-8",
    )
    with pytest.raises(InvalidConfiguration) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "postfix.pinned_certificates.'not-hex':" in text
    assert "postfix.pinned_certificates.'AABB': the certificate name" in text
    assert "postfix.extra:" in text


# --------------------------------------------------------------------------- hostile files


def problems_of(tmp_path: Path, content: bytes | str) -> list[str]:
    """The problems load_config reports for a file with *content*."""
    path = tmp_path / "c.toml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidConfiguration) as info:
        load_config(path)
    assert len(str(info.value)) < 20_000
    assert all(len(problem) <= 1100 for problem in info.value.problems)
    return list(info.value.problems)


HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (f'[relay]\nnull_sender = "{HUGE}"\n', "relay.null_sender: 'xxxx"),
        (f'"{HUGE}" = 1\n', "'xxxx"),
        (f'[relay]\n"{HUGE}" = 1\n', "relay.'xxxx"),
        (f'[tenants."{HUGE}"]\ndomains = ["a.example", 7]\n', "tenants.'xxxx"),
        (f'[tenants.a]\n"{HUGE}" = 1\n', "tenants.a.'xxxx"),
        (f'[tenants.a]\ndomains = [{{ domain = "a.example", type = "{HUGE}" }}]\n', "type"),
        (f'[policy]\n"{HUGE}" = 1\n', "policy.'xxxx"),
        (f'[replies.texts]\n"{HUGE}" = "x"\n', "replies: texts.'xxxx"),
        (f'[replies.tenants."{HUGE}"]\nBAD_SENDER = 5\n', "replies: tenants.'xxxx"),
        (f'[postfix]\n"{HUGE}" = 1\n', "postfix.'xxxx"),
        (f'[postfix.pinned_certificates]\n"{HUGE}" = "a.example"\n', "postfix.pinned"),
        (f'domains_file = "{HUGE[:100_000]}"\n', "domains_file: cannot read"),
        (
            f'[tenants.a]\ndomains = ["a.example"]\n[[connectors]]\nname = "c"\ntenant = "a"\n'
            f'sender_ip_ranges = ["{HUGE}"]\ncreated_at = "{HUGE}"\n',
            "connectors[0].sender_ip_ranges[0]: 'xxxx",
        ),
    ],
    ids=[
        "relay-value",
        "top-key",
        "relay-key",
        "tenant-name",
        "tenant-key",
        "domain-type",
        "policy-key",
        "reply-code",
        "reply-tenant",
        "postfix-key",
        "fingerprint",
        "domains-file",
        "ip-range-and-date",
    ],
)
def test_huge_values_and_keys_are_shown_truncated(tmp_path: Path, content: str, where: str) -> None:
    """A 10 MB value or key is named in the error truncated, with its length, never whole."""
    problems = problems_of(tmp_path, content)
    assert any(problem.startswith(where) or where in problem for problem in problems), problems
    assert any("characters" in problem for problem in problems), problems


@pytest.mark.parametrize(
    "content",
    [f'[relay]\nnull_sender = "{"x" * 10_000_000}"\n', f'"{"k" * 10_000_000}" = 1\n'],
    ids=["null-sender", "unknown-key"],
)
def test_issue_repro_ten_megabyte_values_give_short_errors(tmp_path: Path, content: str) -> None:
    """The issue's 10 MB [relay] null_sender and 10 MB unknown key give a short error."""
    (problem,) = problems_of(tmp_path, content)
    assert len(problem) < 300
    assert "(10000000 characters)" in problem


def test_keys_with_line_breaks_stay_on_their_line(tmp_path: Path) -> None:
    """Keys holding CR, LF or other line separators are shown as repr, so each problem is one
    line."""
    problems = problems_of(
        tmp_path, '"a\\nb" = 1\n[tenants."t\\r\\nx"]\ndomains = [5]\n"\\u2028" = 2\n'
    )
    assert problems
    assert all(len(problem.splitlines()) == 1 for problem in problems), problems


def test_at_most_a_hundred_problems_are_listed(tmp_path: Path) -> None:
    """A file with 100,000 problems lists 100 and says how many more there are."""
    problems = problems_of(tmp_path, "".join(f"k{n} = 1\n" for n in range(100_000)))
    assert len(problems) == 101
    assert problems[-1] == "... and 99900 more problems"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"a = " + b"[" * 500 + b"]" * 500, "line 1: arrays and inline tables nested more than 32"),
        (b"a = " + b"{b=" * 500 + b"1" + b"}" * 500, "nested more than 32"),
        (b"a = [\n" + b"[" * 40 + b"\n", "line 2: arrays and inline tables nested more than 32"),
        (b"[relay]\nnull_sender = " + b"[" * 32 + b"]" * 32, "relay.null_sender[0][0]"),
        (b"a = " + b"{b.c.d.e.f.g.h.i=" * 30 + b"1" + b"}" * 30, "levels deep"),
        (b".".join([b"a"] * 100_000) + b" = 1\n", "more than 32 dotted parts"),
        (b"[" + b".".join([b"a"] * 100_000) + b"]\n", "more than 32 dotted parts"),
        (b"a = {" + b".".join([b"b"] * 40) + b" = 1}\n", "more than 32 dotted parts"),
        (b"\xff\n", "not UTF-8 (TOML must be): octet 0xff at line 1, column 1"),
        (b'[relay]\ncount = "m\xe9"\n', "octet 0xe9 at line 2, column 11"),
        (b"a = " + b"1" * 5000, "not valid TOML: Exceeds the limit (4300 digits)"),
        (b"[policy]\nwindow_seconds = 0x" + b"f" * 5000, "policy.window_seconds: an integer of"),
        (b"a = -9223372036854775809\n", "outside the 64-bit range"),
        (b'domains_file = "a\\u0000b"\n', "domains_file: cannot read domains file"),
    ],
    ids=[
        "arrays",
        "inline-tables",
        "line-number",
        "deep-value",
        "deep-dotted",
        "dotted-key",
        "table-name",
        "inline-dotted-key",
        "not-utf8",
        "not-utf8-later",
        "long-decimal",
        "huge-hex",
        "below-int64",
        "nul-in-path",
    ],
)
def test_hostile_toml_is_invalid_configuration(tmp_path: Path, content: bytes, needle: str) -> None:
    """Deep nesting (RecursionError in tomllib), long dotted keys (quadratic in tomllib), bytes
    that are not UTF-8, huge integers and a NUL in a path are one InvalidConfiguration."""
    problems = problems_of(tmp_path, content)
    assert any(needle in problem for problem in problems), problems


def test_shape_check_passes_valid_toml_at_the_limits() -> None:
    """32 dotted parts, arrays and inline tables 32 deep, and brackets, quotes, dots and '#'
    inside strings and comments pass the shape check; one more level does not."""
    text = (
        "# [[[[ { comment . . .\n"
        + ".".join(["k"] * 32)
        + ' = ["[[[", "\\"{{", \'\'\'\n]]] "\'\'\', """x.y\n""" ] # ]]]\n'
        + "deep = "
        + "[" * 31
        + "{a.b = 1}"
        + "]" * 31
        + '\ns = """a""""\n'
        + "t = '''b'''''\n"
        + "["
        + ".".join(["h"] * 32)
        + "]\n"
        + 'x = "#[" # ]\n'
    )
    tomllib.loads(text)
    assert _toml_shape_problem(text) is None
    assert _toml_shape_problem(text.replace("[" * 31, "[" * 32).replace("]" * 31, "]" * 32))
    assert _toml_shape_problem(text.replace("k.k", "k.k.k", 1))
    assert _toml_shape_problem(text.replace("h.h", "h.h.h", 1))


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ("[relay]\nfail_open = 1", "relay.fail_open: 1 is not true or false"),
        ("[relay]\nfail_open = 0", "relay.fail_open: 0 is not true or false"),
        ("[relay]\nfail_open = 1.0", "relay.fail_open: 1.0 is not true or false"),
        ('[relay]\nfail_open = "true"', "relay.fail_open: 'true' is not true or false"),
        ("[relay]\ncount = true", "relay.count: True is not one of ['messages', 'recipients']"),
        ('[relay]\nnull_sender = ["accept"]', "relay.null_sender: ['accept'] is not one of"),
        (
            '[[connectors]]\nname = "c"\ntenant = "a"\nsender_ip_ranges = [1, true]',
            "connectors[0].sender_ip_ranges[1]: True must be a CIDR string",
        ),
        (
            '[[connectors]]\nname = "c"\ntenant = "a"\ntls_cert_names = [5]',
            "connectors[0].tls_cert_names[0]: 5 must be a string",
        ),
    ],
)
def test_booleans_and_strings_are_checked_strictly(tmp_path: Path, table: str, needle: str) -> None:
    """fail_open must be a TOML boolean (1 == True no longer passes), like every other boolean;
    the string options, IP ranges and certificate names must be strings."""
    problems = problems_of(tmp_path, f'[tenants.a]\ndomains = ["a.example"]\n{table}\n')
    assert any(needle in problem for problem in problems), problems


def test_fail_open_true_is_accepted(tmp_path: Path) -> None:
    """fail_open = true is the one spelling that turns it on."""
    path = tmp_path / "c.toml"
    path.write_text('[tenants.a]\ndomains = ["a.example"]\n[relay]\nfail_open = true\n')
    assert load_config(path).relay == {"fail_open": True}

"""The operator command line (issue 7): compile, check with a configuration or snapshot,
tenant status/history/administration, ndr; text and JSON output, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from domainpolicy import DomainMatcher
from domainpolicy._cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from domainpolicy._config import load_config
from domainpolicy._policy import RelayRequest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

DOMAINS = (
    "# accepted domains of two tenants\n"
    "contoso.com\tcontoso\n"
    "sub.contoso.com\tcontoso\tsubdomains\n"
    "\n"
    "*.fabrikam.com\tfabrikam\tinternal_relay\n"
    "contoso.com\tcontoso\n"
)

BAD_DOMAINS = (
    "contoso.com\tcontoso\n"  # 1: fine
    "co.uk\tcontoso\n"  # 2: a public suffix
    "# a comment\n"  # 3
    "orphan.example\n"  # 4: no tenant column
    "contoso.com\tfabrikam\n"  # 5: claimed by another tenant
    "x.example\tfabrikam\tweird\n"  # 6: bad flags
    "a_b.example\tfabrikam\n"  # 7: invalid domain
)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def run_json(*argv: str) -> tuple[int, list[dict[str, Any]]]:
    code, text = run(*argv, "--json")
    return code, [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def config(tmp_path: Path) -> str:
    """A copy of examples/tenants.toml: its relative SQLite store lands in tmp_path."""
    target = tmp_path / "tenants.toml"
    shutil.copy(EXAMPLES / "tenants.toml", target)
    return str(target)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("domainpolicy")
    return lines[0]


def send_spam(config: str, count: int) -> None:
    """Relay *count* messages from distinct unregistered domains through contoso's connector."""
    policy = load_config(config).build_policy()
    try:
        for number in range(count):
            policy.evaluate(RelayRequest(f"x@spam{number}.example", client_ip="198.51.100.7"))
    finally:
        policy.store.close()


# --------------------------------------------------------------------------- compile


def test_compile_writes_a_snapshot_that_loads_back_and_matches(tmp_path: Path) -> None:
    """compile reports counts and writes a snapshot that loads and matches as configured."""
    source = tmp_path / "domains.tsv"
    source.write_text(DOMAINS, encoding="utf-8")
    snapshot = tmp_path / "domains.snap"
    code, (record,) = run_json("compile", str(source), "-o", str(snapshot))
    assert code == EXIT_OK
    assert record == {
        "ok": True,
        "source": str(source),
        "snapshot": str(snapshot),
        "lines": 6,
        "entries": 4,
        "compiled": 3,
        "tenants": 2,
        "problems": [],
    }
    matcher = DomainMatcher.load(snapshot)
    assert matcher.tenant_of("a.b.sub.contoso.com") == "contoso"
    assert matcher.tenant_of("www.fabrikam.com") == "fabrikam"
    assert matcher.tenant_of("fabrikam.com") is None
    code, text = run("compile", str(source), "-o", str(snapshot))
    assert code == EXIT_OK
    assert "6 lines, 4 entries, 2 tenants" in text
    assert "3 accepted domains (1 identical duplicate merged)" in text


def test_compile_reports_every_problem_with_its_line_number(tmp_path: Path) -> None:
    """Every bad line is reported with its number, the snapshot is not written, exit 1."""
    source = tmp_path / "bad.tsv"
    source.write_text(BAD_DOMAINS, encoding="utf-8")
    snapshot = tmp_path / "bad.snap"
    code, (record,) = run_json("compile", str(source), "-o", str(snapshot))
    assert code == EXIT_INVALID
    assert record["ok"] is False
    assert record["snapshot"] is None
    assert [p["line"] for p in record["problems"]] == [2, 4, 5, 6, 7]
    assert "public suffix" in record["problems"][0]["message"]
    assert "already claimed by tenant 'contoso'" in record["problems"][2]["message"]
    assert not snapshot.exists()
    code, text = run("compile", str(source), "-o", str(snapshot))
    assert code == EXIT_INVALID
    assert f"{source}:4: 'orphan.example' has no tenant column" in text
    assert "5 problems: snapshot not written" in text


def test_compile_tenant_limit_and_default_tenant(tmp_path: Path) -> None:
    """--tenant fills a missing tenant column; --max-domains-per-tenant is enforced."""
    source = tmp_path / "one.tsv"
    source.write_text("a.example\nb.example\n", encoding="utf-8")
    snapshot = tmp_path / "one.snap"
    code, _ = run("compile", str(source), "-o", str(snapshot), "--tenant", "t1")
    assert code == EXIT_OK
    assert DomainMatcher.load(snapshot).tenant_of("b.example") == "t1"
    code, (record,) = run_json(
        "compile", str(source), "-o", str(snapshot), "--tenant", "t1",
        "--max-domains-per-tenant", "1",
    )  # fmt: skip
    assert code == EXIT_INVALID
    assert record["problems"][0]["line"] is None
    assert "more than the limit of 1" in record["problems"][0]["message"]


def test_compile_progress_bar_goes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--progress draws a progress bar on stderr and leaves stdout to the report."""
    source = tmp_path / "domains.tsv"
    source.write_text(DOMAINS, encoding="utf-8")
    code, text = run("compile", str(source), "-o", str(tmp_path / "s"), "--progress")
    assert code == EXIT_OK
    assert "100% 6/6 lines" in capsys.readouterr().err
    assert "%" not in text


def test_compile_unreadable_input_or_output_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing domains file or an unwritable snapshot is one error line and exit 2."""
    code, _ = run("compile", str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "s"))
    assert code == EXIT_USAGE
    assert "cannot read domains file" in one_error_line(capsys)
    source = tmp_path / "domains.tsv"
    source.write_text(DOMAINS, encoding="utf-8")
    code, _ = run("compile", str(source), "-o", str(tmp_path / "no" / "dir" / "s"))
    assert code == EXIT_USAGE
    assert "cannot write snapshot" in one_error_line(capsys)


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("target", "tenant", "entry", "kind"),
    [
        ("contoso.com", "contoso", "contoso.com", "exact"),
        ("<billing@Mail.Contoso.co.uk>", "contoso", "contoso.co.uk", "subdomain"),
        ("Bücher.example", "contoso", "xn--bcher-kva.example", "exact"),
        ("eu.fabrikam.com", "fabrikam", "eu.fabrikam.com", "exact"),
        ("evil.example", None, None, None),
    ],
)
def test_check_with_config_names_tenant_entry_and_why(
    config: str, target: str, tenant: str | None, entry: str | None, kind: str | None
) -> None:
    """check --config says which tenant and entry match and how, or that none does."""
    code, (record,) = run_json("check", "--config", config, target)
    assert code == EXIT_OK
    assert (record["tenant"], record["entry"], record["match"]) == (tenant, entry, kind)
    assert record["why"]
    assert record["registrable_domain"]  # the existing fields are still there


def test_check_explains_a_parent_accepted_without_subdomains(config: str) -> None:
    """A miss under an exact-only accepted domain says so in the text output."""
    code, text = run("check", "--config", config, "mail.contoso.com")
    assert code == EXIT_OK
    assert "  tenant: None\n" in text
    assert "contoso.com (tenant contoso) is accepted, but not its subdomains" in text


def test_check_with_snapshot_reports_wildcard_matches(tmp_path: Path) -> None:
    """check --snapshot uses a compiled snapshot, wildcards included."""
    source = tmp_path / "domains.tsv"
    source.write_text(DOMAINS, encoding="utf-8")
    snapshot = tmp_path / "domains.snap"
    assert run("compile", str(source), "-o", str(snapshot))[0] == EXIT_OK
    code, records = run_json("check", "--snapshot", str(snapshot), "www.fabrikam.com", "<>")
    assert code == EXIT_OK
    assert records[0]["match"] == "wildcard"
    assert records[0]["entry"] == "*.fabrikam.com"
    assert records[0]["entry_type"] == "internal_relay"
    assert records[1]["tenant"] is None
    assert records[1]["why"] == "no domain to match"


def test_check_without_a_matcher_keeps_its_output() -> None:
    """Plain check prints exactly the fields it printed before (no matching fields)."""
    code, (record,) = run_json("check", "Mail.Fabrikam.co.uk")
    assert code == EXIT_OK
    assert set(record) == {
        "input", "kind", "ok", "domain", "unicode", "registrable_domain", "public_suffix",
        "is_public_suffix",
    }  # fmt: skip


def test_check_with_bad_config_or_snapshot_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable configuration or snapshot is one error line and exit 2."""
    code, _ = run("check", "--config", str(tmp_path / "missing.toml"), "contoso.com")
    assert code == EXIT_USAGE
    assert "cannot read" in one_error_line(capsys)
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot")
    code, _ = run("check", "--snapshot", str(tmp_path / "junk.snap"), "contoso.com")
    assert code == EXIT_USAGE
    assert "not a matcher snapshot" in one_error_line(capsys)


# --------------------------------------------------------------------------- tenant


def test_remediation_flow_from_block_to_probation(config: str) -> None:
    """Blocked by traffic: the request is refused listing every step, remediation completes
    it, support approves, and the tenant is ACTIVE on probation."""
    code, (created,) = run_json(
        "tenant", "connector-created", "contoso", "--connector", "rogue", "--by", "ops",
        "--config", config,
    )  # fmt: skip
    assert code == EXIT_OK
    assert created["state"] == "active"
    send_spam(config, 9)  # the example allows 8 distinct unregistered domains

    code, (status,) = run_json("tenant", "status", "contoso", "--config", config)
    assert code == EXIT_OK
    assert status["state"] == "blocked"
    assert status["block"]["code"] == "5.7.750"
    assert status["block"]["offending"] == [f"spam{n}.example" for n in range(9)]
    assert len(status["checklist"]["missing"]) == 3

    request = (
        "tenant", "request-unblock", "contoso", "--code", "5.7.750", "--evidence", "rebuilt",
        "--by", "admin@contoso.com", "--config", config,
    )  # fmt: skip
    code, text = run(*request)
    assert code == EXIT_INVALID
    assert "refused: unblock refused for tenant 'contoso': 3 remediation steps missing" in text
    assert text.count("  missing: ") == 3
    assert "'rogue'" in text
    assert "attest that the on-premises server is secured" in text

    others = [f"--domain=spam{n}.example" for n in range(1, 9)]
    steps = [
        ("register-domain", "--domain", "spam0.example"),
        ("declare-not-ours", *others, "--note", "forged"),
        ("review-connector", "--connector", "rogue", "--removed"),
        ("attest", "--note", "patched and credentials rotated"),
    ]
    for action, *extra in steps:
        code, (record,) = run_json(
            "tenant", action, "contoso", *extra, "--by", "admin@contoso.com", "--config", config
        )
        assert code == EXIT_OK, record
        assert record["ok"] is True
    assert record["checklist"] == {"complete": True, "missing": []}

    code, (record,) = run_json(*request)
    assert code == EXIT_OK
    assert record["state"] == "unblock_requested"
    approve = ("--reason", "verified", "--by", "support", "--config", config)
    code, text = run("tenant", "approve", "contoso", *approve)
    assert code == EXIT_OK
    assert "tenant contoso is active" in text
    assert "on probation until" in text

    code, (status,) = run_json("tenant", "status", "contoso", "--config", config)
    assert status["state"] == "active"
    assert status["on_probation"] is True
    assert status["probation_until"] is not None
    assert status["block"] is None
    assert status["checklist"] is None


def test_operator_block_then_refused_request_lists_missing_steps(config: str) -> None:
    """tenant block blocks an ACTIVE tenant; an early request is refused with exit 1."""
    code, text = run(
        "tenant", "block", "fabrikam", "--reason", "abuse report", "--by", "noc", "--config", config
    )
    assert code == EXIT_OK
    assert "tenant fabrikam is blocked (5.7.750)" in text
    code, (refusal,) = run_json(
        "tenant", "request-unblock", "fabrikam", "--code", "5.7.750", "--evidence", "done",
        "--by", "admin", "--config", config,
    )  # fmt: skip
    assert code == EXIT_INVALID
    assert refusal["ok"] is False
    assert refusal["missing"] == ["attest that the on-premises server is secured"]
    code, again = run(
        "tenant", "block", "fabrikam", "--reason", "twice", "--by", "noc", "--config", config
    )
    assert code == EXIT_INVALID
    assert "refused: event 'operator_block' is not allowed" in again


def test_status_text_shows_state_checklist_domains_and_history(config: str) -> None:
    """tenant status prints state, window counts, checklist, accepted domains and history."""
    run("tenant", "suspend", "contoso", "--reason", "spam wave", "--by", "noc", "--config", config)
    code, text = run("tenant", "status", "contoso", "--config", config)
    assert code == EXIT_OK
    lines = text.splitlines()
    assert lines[0] == "tenant contoso: suspended (5.7.705)"
    assert "suspended by operator: spam wave" in lines[1]
    assert re.search(r"  window \(as of \d{4}-\d\d-\d\dT[\d:]+Z\): 0 relayed", text)
    assert "  checklist: 1 missing" in text
    assert "accepted domains (registry version 1):" in text
    assert "    contoso.co.uk (and subdomains) -- added " in text
    assert "by config-seed (version 1)" in text
    assert "    contoso-onprem (" in text
    assert "operator_suspend by noc: active -> suspended" in text


def test_history_text_and_json(config: str, tmp_path: Path) -> None:
    """tenant history prints the audit trail oldest first; --json gives one record per line.
    (The configuration's connectors seeded into the registry are recorded first.)"""
    for action, extra in [("block", "--reason=r1"), ("attest", "--note=n1")]:
        assert run("tenant", action, "contoso", extra, "--by", "op", "--config", config)[0] == 0
    code, text = run("tenant", "history", "contoso", "--config", config)
    assert code == EXIT_OK
    assert "create_connector by config-seed: active -> active" in text.splitlines()[0]
    assert "operator_block by op: active -> blocked" in text
    assert "    note: n1" in text
    store = f"sqlite:{tmp_path / 'domainpolicy-example.sqlite3'}"
    code, records = run_json("tenant", "history", "contoso", "--store", store)
    assert code == EXIT_OK
    assert [r["action"] for r in records] == ["create_connector", "operator_block", "attest"]
    assert set(records[0]) == {"tenant", "at", "action", "actor", "before", "after", "detail"}
    code, records = run_json("tenant", "history", "contoso", "--store", store, "--limit", "1")
    assert [r["action"] for r in records] == ["attest"]


def test_json_shapes_of_status_and_actions(config: str) -> None:
    """--json works before or after the action; the records have documented keys."""
    code, text = run("tenant", "--json", "status", "fabrikam", "--config", config)
    assert code == EXIT_OK
    status = json.loads(text)
    assert set(status) == {
        "tenant", "state", "total", "unregistered", "distinct_domains", "probation_until",
        "checklist", "accepted_domains", "history", "on_probation", "block",
        "as_of", "registry_version", "connectors", "added",
    }  # fmt: skip
    assert status["accepted_domains"] == ["fabrikam.com", "eu.fabrikam.com"]
    code, (record,) = run_json(
        "tenant", "suspend", "fabrikam", "--reason", "r", "--by", "noc", "--config", config
    )
    assert set(record) == {
        "ok", "action", "tenant", "by", "state", "probation_until", "checklist", "block",
    }  # fmt: skip
    assert record["block"]["code"] == "5.7.705"


def test_register_domain_refusals_and_configuration_note(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Domains the matcher refuses are refused with exit 1; success says every server
    following the store enforces it."""
    base = ("--by", "op", "--config", config)
    code, text = run("tenant", "register-domain", "contoso", "--domain", "co.uk", *base)
    assert code == EXIT_INVALID
    assert text.strip().endswith("'co.uk' is a public suffix and cannot be an accepted domain")
    code, text = run("tenant", "register-domain", "contoso", "--domain", "fabrikam.com", *base)
    assert code == EXIT_INVALID
    assert "already claimed by tenant 'fabrikam'" in text
    capsys.readouterr()
    code, _ = run("tenant", "register-domain", "contoso", "--domain", "new.example", *base)
    assert code == EXIT_OK
    assert "enforces it within its poll interval (no reload)" in capsys.readouterr().err


def test_tenant_errors_are_one_line(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing config, bad store URL, unusable store: exit 2; unknown tenant: exit 1."""
    code, _ = run("tenant", "status", "contoso", "--config", str(tmp_path / "missing.toml"))
    assert code == EXIT_USAGE
    assert "cannot read" in one_error_line(capsys)
    code, _ = run("tenant", "status", "contoso", "--config", config, "--store", "bogus:x")
    assert code == EXIT_USAGE
    assert "store url 'bogus:x'" in one_error_line(capsys)
    bad_store = f"sqlite:{tmp_path / 'no' / 'such' / 'dir.db'}"
    code, _ = run("tenant", "status", "contoso", "--config", config, "--store", bad_store)
    assert code == EXIT_USAGE
    assert "SQLite store" in one_error_line(capsys)
    code, _ = run("tenant", "history", "contoso")
    assert code == EXIT_USAGE
    assert "needs --config FILE or --store URL" in one_error_line(capsys)
    code, _ = run("tenant", "block", "contosso", "--reason", "r", "--by", "op", "--config", config)
    assert code == EXIT_INVALID
    assert "unknown tenant 'contosso'" in one_error_line(capsys)
    with pytest.raises(SystemExit) as info:
        main(["tenant", "approve", "contoso", "--config", config])
    assert info.value.code == EXIT_USAGE
    assert "--by, --reason" in one_error_line(capsys)


# --------------------------------------------------------------------------- ndr

NDR = ("--date", "2026-06-01T10:00:00Z", "--message-id", "<ndr1@mx1.example.net>",
       "--reporting-mta", "mx1.example.net")  # fmt: skip


def test_ndr_english_reply_and_report_are_deterministic() -> None:
    """ndr prints the reply, the report text and the DSN; the same options give the same bytes."""
    code, text = run("ndr", "5.7.750", "--server-name", "mx1.example.net", *NDR)
    assert code == EXIT_OK
    reply = (
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
        " [mx1.example.net]"
    )
    assert text.startswith(f"== reply ==\n{reply}\n")
    assert "Why: your organisation is blocked from sending mail" in text
    assert "Status: 5.7.750" in text
    assert "Message-ID: <ndr1@mx1.example.net>" in text
    assert run("ndr", "5.7.750", "--server-name", "mx1.example.net", *NDR)[1] == text
    code, only = run("ndr", "blocked_unregistered", "--only", "reply", "--server-name",
                     "mx1.example.net")  # fmt: skip
    assert only == reply + "\n"


def test_ndr_japanese_and_tenant_override(config: str) -> None:
    """--language ja gives the Japanese text; --config/--tenant use the tenant's reply text."""
    code, (record,) = run_json(
        "ndr", "5.7.750", "--language", "ja", "--config", config, "--tenant", "contoso",
        "--sender", "user@contoso.com", "--recipient", "bob@example.org", *NDR,
    )  # fmt: skip
    assert code == EXIT_OK
    assert record["code"] == "BLOCKED_UNREGISTERED"
    assert record["reply"] == [
        "550-5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
        "550 5.7.750 See https://support.relay.example.net/unblock?tenant=contoso"
        " [mx1.relay.example.net]",
    ]
    assert "理由" in record["text"]
    assert "Content-Language: ja" in record["dsn"]
    assert "To: user@contoso.com" in record["dsn"]
    assert "Final-Recipient: rfc822; bob@example.org" in record["dsn"]


def test_ndr_null_sender_gets_no_report_and_bad_input_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The null sender gets the reply but no report; an unknown code or address exits 1."""
    code, (record,) = run_json("ndr", "5.7.705", "--sender", "<>", *NDR)
    assert code == EXIT_OK
    assert record["dsn"] is None
    assert record["reply"] == ["550 5.7.705 Access denied, tenant has exceeded threshold"]
    code, _ = run("ndr", "5.9.999")
    assert code == EXIT_INVALID
    assert "unknown reply code '5.9.999'" in one_error_line(capsys)
    code, _ = run("ndr", "5.7.750", "--sender", "bad@@example.com")
    assert code == EXIT_INVALID
    assert "invalid address" in one_error_line(capsys)
    with pytest.raises(SystemExit) as info:
        main(["ndr", "5.7.750", "--date", "2026-06-01T10:00:00"])
    assert info.value.code == EXIT_USAGE
    assert "has no time zone" in one_error_line(capsys)


# --------------------------------------------------------------------------- the program


@pytest.mark.parametrize(
    "argv",
    [
        ["compile"],
        ["ndr"],
        ["tenant"],
        ["tenant", "status"],
        ["tenant", "history"],
        ["tenant", "register-domain"],
        ["tenant", "remove-domain"],
        ["tenant", "declare-not-ours"],
        ["tenant", "connector-created"],
        ["tenant", "review-connector"],
        ["tenant", "attest"],
        ["tenant", "request-unblock"],
        ["tenant", "approve"],
        ["tenant", "deny"],
        ["tenant", "block"],
        ["tenant", "suspend"],
    ],
)
def test_help_for_every_admin_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help works on every command and names --json and the exit codes."""
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--json" in text
    assert "exit codes" in text


def test_console_script_runs_tenant_commands(config: str) -> None:
    """The installed domainpolicy script blocks a tenant and reports it, with exit codes."""
    script = shutil.which("domainpolicy", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "domainpolicy"]
    block = subprocess.run(
        [*command, "tenant", "block", "contoso", "--reason", "r", "--by", "op", "--config", config],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert block.returncode == EXIT_OK, block.stderr
    status = subprocess.run(
        [*command, "tenant", "status", "contoso", "--json", "--config", config],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert status.returncode == EXIT_OK
    assert json.loads(status.stdout)["state"] == "blocked"
    missing = subprocess.run(
        [*command, "tenant", "status", "contoso", "--config", config + ".missing"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert missing.returncode == EXIT_USAGE
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr


def test_status_history_zero_shows_no_history(config: str) -> None:
    """--history 0 is accepted: the status without any audit record."""
    run("tenant", "block", "contoso", "--reason", "r", "--by", "noc", "--config", config)
    code, text = run("tenant", "status", "contoso", "--config", config, "--history", "0")
    assert code == EXIT_OK
    assert text.startswith("tenant contoso: blocked")
    assert "recent history" not in text
    code, records = run_json("tenant", "status", "contoso", "--config", config, "--history", "0")
    assert records[0]["history"] == []


def test_declare_not_ours_after_an_operator_block_says_why(config: str) -> None:
    """An operator block has no offending domains: the refusal says so, not '()'."""
    run("tenant", "block", "contoso", "--reason", "r", "--by", "noc", "--config", config)
    code, text = run(
        "tenant", "declare-not-ours", "contoso", "--domain", "evil.example",
        "--by", "noc", "--config", config,
    )  # fmt: skip
    assert code == EXIT_INVALID
    assert "()" not in text
    assert "the block has no offending domains" in text
    assert "evil.example" in text

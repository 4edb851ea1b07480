"""The main job: replaying the bundled compromise log through the policy."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from domainpolicy import State, open_store
from domainpolicy._cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARGS = ["replay", str(EXAMPLES / "compromise.jsonl"), "--config", str(EXAMPLES / "tenants.toml")]


def run(*extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*ARGS, *extra], out=out)
    return code, out.getvalue()


def test_replay_tells_the_whole_story() -> None:
    """Tolerated relay, the block at the crossing message, remediation, approval, probation."""
    code, text = run()
    assert code == EXIT_OK
    lines = text.splitlines()
    crossing = next(i for i, line in enumerate(lines) if " m-0019 " in line)
    assert lines[crossing].endswith(
        "-> 550-5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
    )
    assert (
        "550 5.7.750 See https://support.relay.example.net/unblock?tenant=contoso"
        in lines[crossing + 1]
    )
    assert "STATE active -> blocked" in lines[crossing + 2]
    assert any(" m-0018 " in line and "accepted (unregistered_allowed)" in line for line in lines)
    assert any(
        " m-0032 " in line and "ceo@contoso.com -> accepted (accepted_domain)" in line
        for line in lines
    )
    assert any(
        "request_unblock contoso" in line and "REFUSED: remediation incomplete" in line
        for line in lines
    )
    assert any("approve contoso" in line and "ok, tenant is active" in line for line in lines)
    assert any(" m-0044 " in line and "accepted (unregistered_allowed)" in line for line in lines)
    assert "tenant contoso: active" in text
    assert "probation until 2026-11-09T11:00:00Z" in text
    assert "550 5.7.64 TenantAttribution; Relay Access Denied [mx1.relay.example.net]" in text
    assert "501 5.1.7 Bad sender address syntax [mx1.relay.example.net]" in text
    assert lines[-1].startswith("54 events: 21 accepted, 24 refused")


def test_replay_is_deterministic() -> None:
    """Two replays print exactly the same thing (the clock is the log's)."""
    assert run() == run()


def test_replay_json_output() -> None:
    """--json prints one object per event, then each tenant's status and a summary."""
    code, text = run("--json")
    records = [json.loads(line) for line in text.splitlines()]
    assert code == EXIT_OK
    crossing = next(r for r in records if r.get("message_id") == "m-0019")
    assert crossing["outcome"] == "refuse"
    assert crossing["reason"] == "blocked"
    assert crossing["transitions"] == [
        {"from": "active", "to": "blocked", "reason": crossing["transitions"][0]["reason"]}
    ]
    statuses = {
        r["tenant"]: r
        for r in records
        if r.get("event") == "status" and "history" in r and "total" in r
    }
    assert statuses["contoso"]["state"] == "active"
    assert records[-1]["event"] == "summary"
    assert records[-1]["malformed"] == 0


def test_replay_with_a_persistent_store(tmp_path: Path) -> None:
    """--store keeps the state: the tenant's audit trail is in the named SQLite file (first the
    configured connector, seeded into the registry and onto the state)."""
    url = f"sqlite:{tmp_path / 'state.db'}"
    code, _ = run("--store", url)
    assert code == EXIT_OK
    with open_store(url) as store:
        assert store.load("contoso").state is State.ACTIVE
        actions = [record.action for record in store.history("contoso")]
    assert actions[:3] == ["create_connector", "create_connector", "observe"]
    assert actions[-1] == "approve"


def test_missing_log_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A log file that does not exist is one line on stderr and exit code 2."""
    code = main(
        ["replay", "/nonexistent.jsonl", "--config", str(EXAMPLES / "tenants.toml")],
        out=io.StringIO(),
    )
    assert code == EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1


def test_malformed_lines_are_skipped_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines are reported with their line number, the rest replays, exit code 1."""
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"at": "2026-11-02T08:00:00Z", "event": "relay", "sender": "alice@contoso.com"}\n'
        "not json\n"
        '{"at": "yesterday", "event": "relay", "sender": "a@contoso.com"}\n'
        '{"at": "2026-11-02T08:01:00Z", "event": "teleport"}\n'
        '{"at": "2026-11-02T08:02:00Z", "event": "relay", "sender": "bob@contoso.com"}\n',
        encoding="utf-8",
    )
    out = io.StringIO()
    code = main(["replay", str(log), "--config", str(EXAMPLES / "tenants.toml")], out=out)
    assert code == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"{log}:2: skipped" in err
    assert f"{log}:3: skipped" in err
    assert f"{log}:4: skipped: unknown event 'teleport'" in err
    assert out.getvalue().count("accepted (accepted_domain)") == 2


def test_relay_events_carry_every_certificate_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tls_cert_names`` (a JSON array) attributes by any of the names, alongside or without
    ``tls_cert_name``; anything but an array of strings is a malformed line."""
    head = '{"at": "2026-11-02T08:00:00Z", "event": "relay", "client_ip": "203.0.113.9", '
    log = tmp_path / "log.jsonl"
    log.write_text(
        head + '"sender": "a@fwd.example", "message_id": "names", '
        '"tls_cert_names": ["mx1.fabrikam.net", "mail.contoso.com"]}\n'
        + head
        + '"sender": "b@fwd.example", "message_id": "both", '
        '"tls_cert_name": "mx1.fabrikam.net", "tls_cert_names": ["mail.contoso.com"]}\n'
        + head
        + '"sender": "c@fwd.example", "message_id": "one", "tls_cert_name": "mail.contoso.com"}\n'
        + head
        + '"sender": "d@fwd.example", "message_id": "none", "tls_cert_names": []}\n'
        + head
        + '"sender": "e@fwd.example", "tls_cert_names": "mail.contoso.com"}\n'
        + head
        + '"sender": "f@fwd.example", "tls_cert_names": ["mail.contoso.com", 5]}\n',
        encoding="utf-8",
    )
    out = io.StringIO()
    code = main(["replay", str(log), "--config", str(EXAMPLES / "tenants.toml"), "--json"], out=out)
    assert code == EXIT_INVALID
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    relayed = {
        r["message_id"]: (r["tenant"], r["reason"]) for r in records if r["event"] == "relay"
    }
    assert relayed == {
        "names": ("contoso", "unregistered_allowed"),
        "both": ("contoso", "unregistered_allowed"),
        "one": ("contoso", "unregistered_allowed"),
        "none": (None, "no_tenant"),
    }
    err = capsys.readouterr().err
    assert f"{log}:5: skipped: 'tls_cert_names' must be an array of strings" in err
    assert f"{log}:6: skipped: 'tls_cert_names' must be an array of strings" in err


def test_readme_main_command_runs() -> None:
    """The console script runs the bundled replay end to end (exit 0)."""
    result = subprocess.run(
        [sys.executable, "-m", "domainpolicy", *ARGS, "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tenant contoso: active" in result.stdout


def _burst_log(path: Path) -> Path:
    """A log whose relay events come in bursts of one second: the compromised server's spam
    crossing the limit, legitimate mail, a malformed line and an admin event inside a burst."""
    lines = []
    for second in range(3):
        at = f"2026-11-02T08:00:0{second}Z"
        for n in range(25):
            lines.append(
                {
                    "at": at,
                    "event": "relay",
                    "client_ip": "198.51.100.25",
                    "sender": f"x{n}@forged{n % 7}.example" if n % 3 else "alice@contoso.com",
                    "recipients": ["bob@partner.example"] * (1 + n % 2),
                    "message_id": f"m-{second}-{n}",
                }
            )
            if (second, n) == (1, 10):
                lines.append({"at": at, "event": "relay", "recipients": "not a list"})
            if (second, n) == (1, 17):
                lines.append({"at": at, "event": "status", "tenant": "contoso"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("log", ["compromise", "bursts"])
def test_batched_replay_prints_what_one_by_one_prints(
    log: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relay events of one instant decided together print exactly what deciding them one by
    one prints, malformed lines and admin events inside a burst included."""
    from domainpolicy._cli import replay as _cli_replay

    path = EXAMPLES / "compromise.jsonl" if log == "compromise" else _burst_log(tmp_path / "b")
    args = ["replay", str(path), "--config", str(EXAMPLES / "tenants.toml"), "--json"]
    batched = io.StringIO()
    batched_code = main(args, out=batched)
    monkeypatch.setattr(_cli_replay, "MAX_BATCH", 1)
    alone = io.StringIO()
    alone_code = main(args, out=alone)
    assert batched_code == alone_code
    assert batched.getvalue() == alone.getvalue()
    if log == "bursts":
        assert '"to": "blocked"' in batched.getvalue()


def test_replay_decides_a_burst_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of relay events of one second goes to evaluate_many together (split at admin
    events, malformed lines and MAX_BATCH)."""
    from domainpolicy._cli import replay as _cli_replay
    from domainpolicy._policy import RelayPolicy

    sizes: list[int] = []
    original = RelayPolicy.evaluate_many

    def spy(self: RelayPolicy, requests: Any) -> Any:
        batch = list(requests)
        sizes.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(RelayPolicy, "evaluate_many", spy)
    monkeypatch.setattr(_cli_replay, "MAX_BATCH", 20)
    log = _burst_log(tmp_path / "b")
    assert (
        main(["replay", str(log), "--config", str(EXAMPLES / "tenants.toml")], out=io.StringIO())
        == EXIT_INVALID
    )
    # second 0: 20 + 5; second 1: 11 | bad line | 7 | status | 7; second 2: 20 + 5
    assert sizes == [20, 5, 11, 7, 7, 20, 5]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("domainpolicy: error: ")
    return err.removeprefix("domainpolicy: error: ").rstrip("\n")


def test_missing_log_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing relay log is its own error (not an invalid configuration), exit 2."""
    code = main(
        ["replay", "nope.jsonl", "--config", str(EXAMPLES / "tenants.toml")], out=io.StringIO()
    )
    assert code == EXIT_USAGE
    assert _error_line(capsys) == "cannot read relay log 'nope.jsonl': No such file or directory"


def test_missing_config_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing configuration is 'cannot read configuration', exit 2."""
    log = str(EXAMPLES / "compromise.jsonl")
    code = main(["replay", log, "--config", "nope.toml"], out=io.StringIO())
    assert code == EXIT_USAGE
    assert _error_line(capsys) == "cannot read configuration 'nope.toml': No such file or directory"


def test_invalid_config_keeps_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TOML syntax error keeps its detail; so does a configuration with problems."""
    bad = tmp_path / "bad.toml"
    bad.write_text("a = \n", encoding="utf-8")
    log = str(EXAMPLES / "compromise.jsonl")
    assert main(["replay", log, "--config", str(bad)], out=io.StringIO()) == EXIT_USAGE
    line = _error_line(capsys)
    assert line.startswith(f"invalid configuration in {bad}: not valid TOML: ")
    assert "(at line 1, column 5)" in line


def test_swapped_arguments_get_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    """The configuration given as the log (or the log as --config): exit 2 and a hint."""
    toml, jsonl = str(EXAMPLES / "tenants.toml"), str(EXAMPLES / "compromise.jsonl")
    assert main(["replay", toml, "--config", jsonl], out=io.StringIO()) == EXIT_USAGE
    line = _error_line(capsys)
    assert line.startswith(f"relay log {toml!r} is a TOML file, not JSON lines")
    assert "the arguments look swapped" in line
    assert "domainpolicy replay LOG.jsonl --config TENANTS.toml" in line
    assert main(["replay", jsonl, "--config", jsonl], out=io.StringIO()) == EXIT_USAGE
    line = _error_line(capsys)
    assert line.startswith(f"invalid configuration in {jsonl}: not valid TOML")
    assert "--config takes the TOML configuration" in line


def test_repeated_refusals_are_summarised() -> None:
    """A refusal repeating the reply of one printed before is counted, not printed; --verbose
    prints every one in full."""
    _, text = run()
    assert text.count("550 5.7.750 See https://") == 1
    assert "... and 12 more refusals like m-0019: m-0020 to m-0031" in text
    assert "... and 9 more refusals like m-0019: m-0033 to m-0041" in text
    _, verbose = run("--verbose")
    assert verbose.count("550 5.7.750 See https://") == 22
    assert "more refusals like" not in verbose
    # The summary counts every decision either way.
    assert text.splitlines()[-1] == verbose.splitlines()[-1]


def test_replay_text_details() -> None:
    """Admin lines say their domain or connector; one sentence is not said twice; plurals."""
    _, text = run()
    assert "connector_created contoso (relay-9) by operator -> ok" in text
    assert "register_domain contoso (contoso-news.com) by admin@contoso.com -> ok" in text
    assert "review_connector contoso (relay-9, removed) by admin@contoso.com" in text
    assert "declare_not_ours contoso (secure-bank.example, pay-pal-login.example, " in text
    assert "request_unblock contoso (5.7.750) by admin@contoso.com -> REFUSED" in text
    lines = text.splitlines()
    crossing = next(i for i, line in enumerate(lines) if " m-0019 " in line)
    assert lines[crossing + 3].strip() == "ALERT blocked"
    assert "ALERT approaching_limit: 7 unregistered messages" in text
    assert "1 distinct unregistered domain)" in text
    assert "0 distinct unregistered domains)" in text
    assert "tenant fabrikam: active" in text
    assert "  audit trail: (none)" in text


def test_the_replay_names_its_store_and_tenant_status_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replay prints its store's URL; tenant status on it shows the same final state,
    including the domain the log registered (issue 14, item 5)."""
    config = str(EXAMPLES / "tenants.toml")
    code = main(["replay", str(EXAMPLES / "compromise.jsonl"), "--config", config, "--json"])
    assert code == EXIT_OK
    captured = capsys.readouterr()
    final = [json.loads(line) for line in captured.out.splitlines()]
    replayed = [r for r in final if r.get("event") == "status" and r["tenant"] == "contoso"][-1]
    url = captured.err.split("replay store: ")[1].split()[0]
    assert main(["tenant", "status", "contoso", "--config", config, "--store", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == replayed["state"] == "active"
    assert "contoso-news.com" in status["accepted_domains"]
    assert status["accepted_domains"] == replayed["accepted_domains"]
    assert status["probation_until"] == replayed["probation_until"]

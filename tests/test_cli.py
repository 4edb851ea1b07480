"""The command line: normalize and check, text and JSON output, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import domainpolicy
from domainpolicy._cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_normalize_prints_key_and_display_form() -> None:
    """normalize prints input, A-label key and U-label display form, tab-separated."""
    code, text = run("normalize", "Bücher.Example.")
    assert code == EXIT_OK
    assert text == "Bücher.Example.\txn--bcher-kva.example\tbücher.example\n"


def test_normalize_json_and_invalid_exit_code() -> None:
    """--json gives one object per input; any invalid input makes the exit code 1."""
    code, text = run("normalize", "--json", "faß.de", "a_b.example")
    records = [json.loads(line) for line in text.splitlines()]
    assert code == EXIT_INVALID
    assert records[0] == {
        "input": "faß.de",
        "ok": True,
        "domain": "xn--fa-hia.de",
        "unicode": "faß.de",
    }
    assert records[1]["ok"] is False
    assert records[1]["reason"] == "disallowed_codepoint"
    assert records[1]["position"] == 1


def test_check_address_and_domain() -> None:
    """check describes an address's domain: key, registrable domain, public suffix."""
    code, text = run("check", "--json", "<billing@Mail.Fabrikam.co.uk>", "co.uk")
    first, second = (json.loads(line) for line in text.splitlines())
    assert code == EXIT_OK
    assert first["kind"] == "address"
    assert first["domain"] == "mail.fabrikam.co.uk"
    assert first["registrable_domain"] == "fabrikam.co.uk"
    assert second["is_public_suffix"] is True
    assert second["registrable_domain"] is None


def test_check_bundled_examples() -> None:
    """The bundled senders all pass (exit 0); the refused examples are each refused (exit 1)."""
    code, text = run("check", "--json", "--file", str(EXAMPLES / "senders.txt"))
    records = [json.loads(line) for line in text.splitlines()]
    assert code == EXIT_OK
    assert all(r["ok"] for r in records)
    assert any(r.get("null") for r in records)
    code, text = run("check", "--json", "--file", str(EXAMPLES / "refused.txt"))
    reasons = {json.loads(line)["input"]: json.loads(line)["reason"] for line in text.splitlines()}
    assert code == EXIT_INVALID
    assert reasons == {
        "a_b.example": "disallowed_codepoint",
        "xn--0ca24w.example": "bad_alabel",
        "-abc.example": "bad_hyphen",
        "1.2.3.4": "numeric_tld",
    }


def test_usage_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or a missing file is one line on stderr and exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    code, _ = run("normalize", "--file", "/nonexistent/file")
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("domainpolicy: error:")
    assert "Traceback" not in err


def test_console_script_runs_as_module() -> None:
    """python -m domainpolicy runs the same command line."""
    result = subprocess.run(
        [sys.executable, "-m", "domainpolicy", "normalize", "EXAMPLE.com."],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.split("\t")[1] == "example.com"


@pytest.mark.parametrize("command", ["normalize", "check"])
def test_help_for_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--help works on every command."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command wrote on stderr (asserting it is one line, no traceback)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("domainpolicy: error: ")
    return err.removeprefix("domainpolicy: error: ").rstrip("\n")


def test_bare_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """domainpolicy alone prints the usage with every command on stderr, exit code 2."""
    assert main([]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: domainpolicy")
    assert "replay" in err
    assert "serve" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("domainpolicy ")


@pytest.mark.parametrize(
    ("command", "what"), [("normalize", "DOMAIN"), ("check", "ADDRESS-OR-DOMAIN")]
)
def test_nothing_to_do_is_a_usage_error(
    command: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """normalize and check with neither values nor -f FILE are a usage error, not silence."""
    code, text = run(command)
    assert code == EXIT_USAGE
    assert text == ""
    assert _error_line(capsys) == f"{command} needs at least one {what} or -f FILE ('-': stdin)"


def test_unreadable_input_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """-f FILE that cannot be opened: the file and the reason, exit 2."""
    code, _ = run("normalize", "-f", "/nonexistent/file")
    assert code == EXIT_USAGE
    assert _error_line(capsys) == "cannot read '/nonexistent/file': No such file or directory"


def test_check_missing_config_is_not_an_invalid_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check --config of a missing file says it cannot be read, exit 2."""
    code, _ = run("check", "--config", "/nonexistent.toml", "a@b.example")
    assert code == EXIT_USAGE
    line = _error_line(capsys)
    assert line == "cannot read configuration '/nonexistent.toml': No such file or directory"


def test_check_toml_syntax_error_keeps_the_detail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TOML syntax error names the file, the error and its line, on one line."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants\n", encoding="utf-8")
    code, _ = run("check", "--config", str(bad), "a@b.example")
    assert code == EXIT_USAGE
    line = _error_line(capsys)
    assert line.startswith(f"invalid configuration in {bad}: not valid TOML: ")
    assert "line 1" in line


def test_one_line_joins_and_truncates_problems() -> None:
    """Problems are joined with '; '; a long list is cut, counting what did not fit."""
    from domainpolicy import InvalidConfiguration
    from domainpolicy._cli.common import MESSAGE_MAX, one_line

    assert one_line(InvalidConfiguration(["a is wrong"], source="t.toml")) == (
        "invalid configuration in t.toml: a is wrong"
    )
    assert one_line(InvalidConfiguration(["a", "b"])) == "invalid configuration: 2 problems: a; b"
    many = one_line(InvalidConfiguration([f"problem number {n} " + "x" * 40 for n in range(50)]))
    assert len(many) <= MESSAGE_MAX + 30
    assert many.startswith("invalid configuration: 50 problems: problem number 0 ")
    assert many.endswith(" more")
    assert "\n" not in many
    assert one_line(InvalidConfiguration(["y" * 1000])).endswith("...")
    assert one_line(ValueError("head\n  - one\n  - two")) == "head: one; two"


BAD_CONFIGS = {
    "deep-arrays": b"a = " + b"[" * 500 + b"]" * 500,
    "deep-inline-tables": b"a = " + b"{b=" * 500 + b"1" + b"}" * 500,
    "long-dotted-key": b".".join([b"a"] * 100_000) + b" = 1\n",
    "not-utf8": b"\xff\n",
    "huge-value": b'[relay]\nnull_sender = "' + b"x" * 10_000_000 + b'"\n',
    "huge-key": b'"' + b"k" * 1_000_000 + b'" = 1\n',
    "key-with-line-breaks": b'"a\\nb\\r\\u2028" = 1\n',
    "huge-integer": b"a = " + b"1" * 5000 + b"\n",
    "loose-boolean": b'[tenants.a]\ndomains = ["a.example"]\n[relay]\nfail_open = 1\n',
    "not-toml": b"[store\n",
    "many-problems": "".join(f"k{n} = 1\n" for n in range(10_000)).encode(),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path, name: str, command: str) -> None:
    """Every class of bad configuration file makes `check --config` and `serve --config` print
    one short line on stderr and exit 2, never a traceback."""
    path = tmp_path / "bad.toml"
    path.write_bytes(BAD_CONFIGS[name])
    argv = {
        "check": ["check", "--config", str(path), "example.com"],
        "serve": ["serve", "--config", str(path), "--listen", "127.0.0.1:0"],
    }[command]
    source = str(Path(domainpolicy.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-m", "domainpolicy", *argv],
        capture_output=True,
        check=False,
        timeout=300,
        env={**os.environ, "PYTHONPATH": source},
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == EXIT_USAGE, err[:2000]
    assert err.startswith(f"domainpolicy: error: invalid configuration in {path}: "), err[:2000]
    assert err.endswith("\n")
    assert err.count("\n") == 1, err[:2000]
    assert len(err) < 20_000
    assert result.stdout == b""

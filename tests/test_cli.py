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

"""``domainpolicy serve``: start-up errors in process; reload, metrics and shutdown in a child."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from domainpolicy._cli import EXIT_USAGE, main

SAFETY = 30.0  # seconds: a safety net against hangs, never an assertion about speed

CONFIG = """\
[store]
url = "sqlite:state.sqlite3"

[policy]
message_limit = 20
domain_limit = 8

[tenants.contoso]
domains = ["contoso.example"]
"""
WITH_FABRIKAM = CONFIG + '\n[tenants.fabrikam]\ndomains = ["fabrikam.example"]\n'


def request(sender: str, instance: str) -> bytes:
    """A RCPT-time policy request from a client no connector knows."""
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
        f"sender={sender}\nrecipient=bob@dest.example\ninstance={instance}\n\n"
    ).encode()


def ask(path: str, data: bytes) -> str:
    """Send one request over the UNIX socket at *path*; return the action."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(SAFETY)
        client.connect(path)
        client.sendall(data)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = client.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"action=")
    return reply[len(b"action=") : -2].decode()


def metric(url: str, name: str) -> int:
    """The value of the unlabelled metric *name* at *url*."""
    with urllib.request.urlopen(url, timeout=SAFETY) as response:
        text: str = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} not in the exposition")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A small configuration with a SQLite store next to it."""
    path = tmp_path / "tenants.toml"
    path.write_text(CONFIG)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process; its exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_serve_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --help`` documents every option and the signals."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--listen", "--store", "--metrics", "--request-timeout"):
        assert option in out
    assert "SIGHUP" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "localhost:10040"], "is not an IP address"),
        (["--listen", "unix:relative.sock"], "must be absolute"),
        (["--listen", "127.0.0.1:0", "--metrics", "unix:/tmp/m.sock"], "must be HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--store", "nosuch:"], "store url 'nosuch:'"),
        (["--listen", "127.0.0.1:0", "--socket-mode", "0666"], "apply only to --listen unix:"),
        (["--listen", "unix:/tmp/x.sock", "--socket-group", "no-such-group-here"], "not exist"),
    ],
)
def test_serve_refuses_bad_arguments_in_one_line(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str
) -> None:
    """A bad listen, metrics or store address exits 2 with one line on stderr."""
    code, out, err = run_main(capsys, "serve", "--config", str(config), *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.startswith("domainpolicy: error: ")
    assert err.count("\n") == 1
    assert message in err


def test_serve_refuses_bad_config_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An invalid or missing configuration exits 2 with one line naming the problem."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[tenants.contoso]\ndomains = ["bad..example"]\n')
    code, _, err = run_main(capsys, "serve", "--config", str(bad), "--listen", "127.0.0.1:0")
    assert code == EXIT_USAGE
    assert err.count("\n") == 1
    assert "tenants.contoso.domains[0]" in err
    code, _, err = run_main(
        capsys, "serve", "--config", str(tmp_path / "missing.toml"), "--listen", "127.0.0.1:0"
    )
    assert code == EXIT_USAGE
    assert err.count("\n") == 1
    assert "cannot read" in err


def test_serve_refuses_an_address_in_use(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """A listen address another socket holds exits 2 with one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_main(
            capsys, "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"
        )
    assert code == EXIT_USAGE
    assert err.startswith(f"domainpolicy: error: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_serve_refuses_non_loopback_metrics(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """Metrics are never exposed beyond loopback: exit 2, and the policy socket is closed."""
    code, _, err = run_main(
        capsys,
        "serve",
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "192.0.2.1:9100",
    )
    assert code == EXIT_USAGE
    assert "cannot serve metrics on 192.0.2.1:9100" in err
    assert "not a loopback address" in err


class Child:
    """``domainpolicy serve --json`` in a child process on a UNIX socket, with metrics."""

    def __init__(self, config: Path) -> None:
        """Start it and read the address line."""
        self.socket = str(config.parent / "policy.sock")
        self.stderr = config.parent / "serve.stderr"
        argv = [sys.executable, "-m", "domainpolicy", "serve", "--json", "--config", str(config)]
        argv += ["--listen", f"unix:{self.socket}", "--metrics", "127.0.0.1:0"]
        with open(self.stderr, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.stderr.read_text()
        self.ready: dict[str, str] = json.loads(line)
        self.metrics = self.ready["metrics"]

    def signal(self, sig: signal.Signals) -> None:
        """Send *sig* to the child (by pid)."""
        self.process.send_signal(sig)

    def wait_for(self, name: str, value: int) -> None:
        """Poll the metric *name* until it reaches *value* (a bounded wait, not a timing)."""
        for _ in range(int(SAFETY / 0.05)):
            if metric(self.metrics, name) >= value:
                return
            assert self.process.poll() is None, self.stderr.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{name} never reached {value}")

    def close(self) -> int:
        """SIGKILL the child if it still runs; reap it; its exit code."""
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait(SAFETY)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


@pytest.fixture
def child(config: Path) -> Iterator[Child]:
    """A running ``domainpolicy serve`` child; killed at the end if still running."""
    process = Child(config)
    try:
        yield process
    finally:
        process.close()


def test_serve_reloads_on_sighup_and_stops_on_sigterm(config: Path, child: Child) -> None:
    """SIGHUP swaps in a new configuration, keeps the old one if invalid; SIGTERM exits 0."""
    assert child.ready["listening"] == f"unix:{child.socket}"
    assert oct(os.stat(child.socket).st_mode & 0o777) == oct(0o660)
    assert ask(child.socket, request("a@contoso.example", "m1")) == "DUNNO"
    assert ask(child.socket, request("a@fabrikam.example", "m2")).startswith("550 5.7.64 ")

    config.write_text(WITH_FABRIKAM)
    child.signal(signal.SIGHUP)
    child.wait_for("domainpolicy_policy_reloads_total", 1)
    assert ask(child.socket, request("a@fabrikam.example", "m3")) == "DUNNO"

    config.write_text(CONFIG.replace("contoso.example", "bad..example"))
    child.signal(signal.SIGHUP)
    child.wait_for("domainpolicy_policy_reload_failures_total", 1)
    assert ask(child.socket, request("a@fabrikam.example", "m4")) == "DUNNO"  # old one kept
    assert metric(child.metrics, "domainpolicy_policy_requests_total") == 4

    child.signal(signal.SIGTERM)
    assert child.process.wait(SAFETY) == 0
    assert not os.path.exists(child.socket)
    log = child.stderr.read_text()
    assert "reload failed, keeping the previous configuration" in log
    assert "bad..example" in log
    assert "Traceback" not in log
    assert "policy server closed" in log
    assert "sender_domain=fabrikam.example verdict=accept code=250" in log
    assert "tenant=fabrikam" in log


PINNED_CONFIG = (
    CONFIG
    + """
[[connectors]]
name = "onprem"
tenant = "contoso"
tls_cert_names = ["mail.contoso.example"]

[postfix]
pinned_certificates = { "AA:BB:CC:DD:EE:FF" = "mail.contoso.example" }
"""
)


def test_serve_attributes_pinned_certificate_fingerprints(tmp_path: Path) -> None:
    """A pinned ccert_fingerprint attributes the client to its tenant; a reload that removes
    the pin stops it."""
    path = tmp_path / "tenants.toml"
    path.write_text(PINNED_CONFIG)
    pinned = request("x@spam.example", "p1").replace(
        b"instance=p1\n", b"instance=p1\nccert_fingerprint=aa:bb:cc:dd:ee:ff\n"
    )
    process = Child(path)
    try:
        assert ask(process.socket, request("x@spam.example", "p0")).startswith("550 5.7.64 ")
        assert ask(process.socket, pinned) == "DUNNO"
        path.write_text(CONFIG)
        process.signal(signal.SIGHUP)
        process.wait_for("domainpolicy_policy_reloads_total", 1)
        again = pinned.replace(b"instance=p1", b"instance=p2")
        assert ask(process.socket, again).startswith("550 5.7.64 ")
    finally:
        process.close()


@pytest.mark.parametrize("mode", ["888", "01777", "rw"])
def test_serve_refuses_a_bad_socket_mode(
    capsys: pytest.CaptureFixture[str], config: Path, mode: str
) -> None:
    """--socket-mode must be octal permission bits: a usage error in one line, exit 2."""
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "serve",
                "--config",
                str(config),
                "--listen",
                "unix:/tmp/x.sock",
                "--socket-mode",
                mode,
            ]
        )
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--socket-mode" in err


CONNECTOR = """
[[connectors]]
name = "contoso-onprem"
tenant = "contoso"
sender_ip_ranges = ["198.51.100.0/24"]
"""


def test_serve_socket_mode_group_and_permit_connectors(tmp_path: Path) -> None:
    """serve --socket-mode 0666 --socket-group GID: the socket's mode and group are set."""
    path = tmp_path / "tenants.toml"
    path.write_text(CONFIG + CONNECTOR)
    sock = str(tmp_path / "policy.sock")
    argv = [sys.executable, "-m", "domainpolicy", "serve", "--json", "--config", str(path)]
    argv += ["--listen", f"unix:{sock}", "--socket-mode", "0666"]
    argv += ["--socket-group", str(os.getgid()), "--permit-connectors"]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else b""
        info = os.stat(sock)
        assert oct(info.st_mode & 0o777) == oct(0o666)
        assert info.st_gid == os.getgid()
        # No connector knows this client: the sender's domain finds the tenant, not OK.
        assert ask(sock, request("a@contoso.example", "m1")) == "DUNNO"
        assert ask(sock, request("a@fabrikam.example", "m2")).startswith("550 5.7.64 ")
        # contoso's connector: accepted mail (even from an unregistered domain) is permitted.
        from_connector = request("x@spam.example", "m3").replace(b"192.0.2.1", b"198.51.100.7")
        assert ask(sock, from_connector) == "OK"
    finally:
        process.terminate()
        process.wait(SAFETY)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_serve_metrics_without_the_extra_is_one_line(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--metrics without prometheus_client: exit 2, one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    code, out, err = run_main(
        capsys, "serve", "--config", str(config), "--listen", "127.0.0.1:0",
        "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    assert code == EXIT_USAGE
    assert out == ""
    assert err == (
        "domainpolicy: error: --metrics needs the prometheus_client package: "
        "pip install 'domainpolicy[metrics]'\n"
    )

"""End to end with a real Postfix: smtplib -> Postfix smtpd -> check_policy_service -> PolicyServer.

The harness (``postfix_harness.py``) fetches Debian's postfix package on first use and runs a
private instance whose ``smtpd_relay_restrictions`` start with our policy service.  The last
test runs the real ``domainpolicy serve`` command as a subprocess with a SQLite store and
remediates the block with the real ``domainpolicy tenant`` commands.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domainpolicy.integrations import PolicyRequest
from postfix_harness import (
    BLOCKED_TEXT,
    PostfixInstance,
    ThreadedPolicyServer,
    kill_subprocess,
    postfix_instance,
    postfix_root,
    serve_subprocess,
)

__all__ = ["postfix_instance", "postfix_root"]  # fixtures, imported for pytest to find

pytestmark = pytest.mark.postfix

REJECTED = (
    "5.7.750 {rcpt}: Recipient address rejected: Service unavailable. "
    "Client blocked from sending from unregistered domains"
)
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"


def test_real_postfix_relays_through_policy(postfix_instance: PostfixInstance) -> None:
    """Registered senders are relayed, blocked ones get exactly 550 5.7.750 from Postfix."""
    seen: list[PolicyRequest] = []

    async def handler(request: PolicyRequest) -> str:
        seen.append(request)
        if request.sender.endswith("@unregistered.example"):
            return BLOCKED_TEXT
        return "DUNNO"

    with (
        ThreadedPolicyServer(handler, postfix_instance.policy_port),
        smtplib.SMTP("127.0.0.1", postfix_instance.smtp_port, timeout=30) as client,
    ):
        client.ehlo("client.example")
        assert client.mail("alice@registered.example") == (250, b"2.1.0 Ok")
        assert client.rcpt("bob@dest.example")[0] == 250
        assert client.rcpt("carol@dest.example")[0] == 250
        code, _ = client.data(MESSAGE)
        assert code == 250

        assert client.mail("mallory@unregistered.example")[0] == 250
        code, text = client.rcpt("bob@dest.example")
        assert code == 550
        assert text.decode() == REJECTED.format(rcpt="<bob@dest.example>")
        client.rset()

        assert client.mail("用户@例子.广告", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("bob@dest.example")[0] == 250
        client.rset()

    rcpt = [r for r in seen if r.protocol_state == "RCPT"]
    assert [(r.sender, r.recipient) for r in rcpt] == [
        ("alice@registered.example", "bob@dest.example"),
        ("alice@registered.example", "carol@dest.example"),
        ("mallory@unregistered.example", "bob@dest.example"),
        ("用户@例子.广告", "bob@dest.example"),
    ]
    # Postfix asks once per recipient, with one instance per message.
    assert rcpt[0].instance == rcpt[1].instance
    assert rcpt[0].message_key == rcpt[1].message_key
    assert rcpt[2].instance != rcpt[0].instance
    first = rcpt[0]
    assert first.client_address == "127.0.0.1"
    assert first.helo_name == "client.example"
    assert first.protocol_name == "ESMTP"
    assert first.instance
    assert first.client_port.isdigit()
    assert first.server_port == str(postfix_instance.smtp_port)
    assert dict(first.unknown) == {}  # every attribute this Postfix sends is known
    assert "Recipient address rejected: Service unavailable" in postfix_instance.log_text()


def test_policy_server_killed_mid_run(postfix_instance: PostfixInstance) -> None:
    """With the policy server killed Postfix answers its default 451 4.3.5; a restart recovers."""
    listen = f"127.0.0.1:{postfix_instance.policy_port}"
    child = serve_subprocess(listen)
    try:
        with smtplib.SMTP("127.0.0.1", postfix_instance.smtp_port, timeout=30) as client:
            client.ehlo("client.example")
            assert client.mail("alice@good.example")[0] == 250
            assert client.rcpt("bob@dest.example")[0] == 250
            client.rset()

            kill_subprocess(child)  # SIGKILL: no goodbye to Postfix

            assert client.mail("alice@good.example")[0] == 250
            code, text = client.rcpt("bob@dest.example")
            assert code == 451
            assert text.decode() == (
                "4.3.5 <bob@dest.example>: Recipient address rejected: Policy service unavailable"
            )
            client.rset()

            child = serve_subprocess(listen)
            assert client.mail("alice@good.example")[0] == 250
            assert client.rcpt("bob@dest.example")[0] == 250
            client.rset()
            assert client.mail("x@bad.example")[0] == 250
            assert client.rcpt("bob@dest.example")[0] == 550
    finally:
        kill_subprocess(child)
    assert "problem talking to server" in postfix_instance.log_text()


# --------------------------------------------------------------------------- domainpolicy serve

# Small limits: the 9th distinct unregistered domain in the hour blocks the tenant.  The
# connector attributes every loopback client (the test's smtplib) to contoso, so mail from
# domains contoso has not registered is counted against it.  No server_name and no tenant
# override: the client sees the plain 5.7.750 text.
CONFIG = """\
[store]
url = "sqlite:state.sqlite3"

[policy]
message_limit = 20
domain_limit = 8
window_seconds = 3600
bucket_seconds = 60

[tenants.contoso]
domains = ["contoso.example"]

[[connectors]]
name = "contoso-onprem"
tenant = "contoso"
sender_ip_ranges = ["127.0.0.0/8"]
created_at = 2020-01-01T00:00:00Z
"""
RECIPIENTS = ("bob@dest.example", "carol@dest.example", "dave@dest.example")


class Serve:
    """``domainpolicy serve`` in a child process (the real console command, by module)."""

    def __init__(self, config: Path, port: int) -> None:
        """Serve *config* on 127.0.0.1:*port* once `start` is called."""
        self.config = config
        self.port = port
        self.stderr = config.parent / "serve.stderr"
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait for its ``listening on`` line.

        Raises:
            RuntimeError: it did not start (its stderr is included).
        """
        argv = [sys.executable, "-m", "domainpolicy", "serve", "--config", str(self.config)]
        argv += ["--listen", f"127.0.0.1:{self.port}"]
        with open(self.stderr, "ab") as log:
            self.child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
            )
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line.startswith(b"listening on 127.0.0.1:"):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"serve did not start: {line!r}\n{self.stderr.read_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send *sig* to the server (by pid), reap it and close its pipe; returns its exit code."""
        child, self.child = self.child, None
        assert child is not None
        if child.poll() is None:
            child.send_signal(sig)
        code = child.wait(10)
        assert child.stdout is not None
        child.stdout.close()
        return code


def cli(config: Path, *argv: str) -> dict[str, object]:
    """Run ``domainpolicy ARGV --config CONFIG --json`` and return its JSON answer (exit 0)."""
    result = subprocess.run(
        [sys.executable, "-m", "domainpolicy", *argv, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    answer: dict[str, object] = json.loads(result.stdout.splitlines()[0])
    return answer


def relay(client: smtplib.SMTP, sender: str) -> list[tuple[int, str]]:
    """Offer one message from *sender* to `RECIPIENTS`; the RCPT replies, then RSET."""
    assert client.mail(sender)[0] == 250
    replies = [client.rcpt(rcpt) for rcpt in RECIPIENTS]
    client.rset()
    return [(code, text.decode()) for code, text in replies]


def accepted() -> list[tuple[int, str]]:
    """What `relay` returns when the policy lets the message through."""
    return [(250, "2.1.5 Ok")] * len(RECIPIENTS)


def blocked() -> list[tuple[int, str]]:
    """What `relay` returns when the tenant is blocked: exactly 550 5.7.750 for every RCPT."""
    return [(550, REJECTED.format(rcpt=f"<{rcpt}>")) for rcpt in RECIPIENTS]


@pytest.fixture
def serve(postfix_instance: PostfixInstance, tmp_path: Path) -> Iterator[Serve]:
    """``domainpolicy serve`` on the Postfix instance's policy port, with a fresh SQLite store."""
    config = tmp_path / "tenants.toml"
    config.write_text(CONFIG)
    server = Serve(config, postfix_instance.policy_port)
    server.start()
    try:
        yield server
    finally:
        if server.child is not None:
            server.stop(signal.SIGKILL)


def test_serve_blocks_survives_kill_and_unblocks(
    postfix_instance: PostfixInstance, serve: Serve
) -> None:
    """The real serve command behind real Postfix: count, block, survive SIGKILL, unblock."""
    config = serve.config
    with smtplib.SMTP("127.0.0.1", postfix_instance.smtp_port, timeout=30) as client:
        client.ehlo("onprem.contoso.example")
        # A registered sender is accepted (three recipients, one message).
        assert client.mail("alice@contoso.example")[0] == 250
        for rcpt in RECIPIENTS:
            assert client.rcpt(rcpt) == (250, b"2.1.5 Ok")
        assert client.data(MESSAGE)[0] == 250

        # Unregistered senders: 8 messages of 3 recipients (24 > message_limit if recipients
        # were counted) from 8 distinct domains are accepted: one count per message.
        for i in range(8):
            assert relay(client, f"spam@forged{i}.example") == accepted(), i
        status = cli(config, "tenant", "status", "contoso")
        assert (status["state"], status["unregistered"], status["distinct_domains"]) == (
            "active",
            8,
            8,
        )
        # The 9th domain crosses the limit: exactly 550 5.7.750 with the plain text.
        assert relay(client, "spam@forged8.example") == blocked()
        assert relay(client, "spam@forged0.example") == blocked()
        # The tenant's own domain still goes through while blocked.
        assert relay(client, "alice@contoso.example") == accepted()

        # The server is killed: Postfix applies its default action.
        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
        assert client.mail("spam@forged0.example")[0] == 250
        assert client.rcpt("bob@dest.example") == (
            451,
            b"4.3.5 <bob@dest.example>: Recipient address rejected: Policy service unavailable",
        )
        client.rset()

        # Restarted on the same store: nothing was lost, the tenant is still blocked.
        serve.start()
        assert relay(client, "spam@forged9.example") == blocked()
        assert relay(client, "alice@contoso.example") == accepted()
        status = cli(config, "tenant", "status", "contoso")
        assert status["state"] == "blocked"
        assert status["unregistered"] == 11  # 8 accepted, then 3 refused (counted) messages
        assert status["total"] == 14  # and 3 messages from the registered domain

        # Remediation and approval with the CLI, on the same SQLite store, server running.
        block = status["block"]
        assert isinstance(block, dict)
        offending = [f"forged{i}.example" for i in range(9)]  # the domains of the block
        assert sorted(block["offending"]) == offending
        declared = cli(
            config,
            "tenant",
            "declare-not-ours",
            "contoso",
            *(arg for domain in offending for arg in ("--domain", domain)),
            "--by",
            "ops@relay.example",
        )
        assert declared["ok"] is True
        cli(config, "tenant", "attest", "contoso", "--note", "rebuilt", "--by", "admin@contoso")
        requested = cli(
            config,
            "tenant",
            "request-unblock",
            "contoso",
            "--code",
            "5.7.750",
            "--evidence",
            "server rebuilt, credentials rotated",
            "--by",
            "admin@contoso",
        )
        assert requested["ok"] is True
        approved = cli(
            config, "tenant", "approve", "contoso", "--reason", "verified", "--by", "support"
        )
        assert (approved["ok"], approved["state"]) == (True, "active")

        # Accepted again.
        assert relay(client, "newsletter@partner.example") == accepted()
        assert relay(client, "alice@contoso.example") == accepted()
    assert serve.stop() == 0  # SIGTERM: graceful, exit 0
    log = serve.stderr.read_text()
    assert "tenant=contoso sender_domain=forged8.example verdict=refuse code=550" in log
    assert "policy server closed" in log


def test_registry_changes_reach_a_running_serve_without_sighup(
    postfix_instance: PostfixInstance, serve: Serve
) -> None:
    """tenant register-domain while serve runs: the next SMTP transaction from that domain is
    accepted, no SIGHUP; a connector added by the CLI is on the checklist of the next block."""
    config = serve.config
    with smtplib.SMTP("127.0.0.1", postfix_instance.smtp_port, timeout=30) as client:
        client.ehlo("onprem.contoso.example")
        # Unregistered but attributed by the on-premises connector: accepted and counted.
        assert relay(client, "news@contoso-news.example") == accepted()
        registered = cli(
            config,
            "tenant",
            "register-domain",
            "contoso",
            "--domain",
            "contoso-news.example",
            "--by",
            "admin@contoso",
        )
        assert registered["ok"] is True
        deadline = time.monotonic() + 1.0 + 0.5  # the poll interval is 0.25 s
        while True:
            status = cli(config, "tenant", "status", "contoso")
            before = status["unregistered"]
            assert relay(client, "news@contoso-news.example") == accepted()
            after = cli(config, "tenant", "status", "contoso")["unregistered"]
            if after == before:  # decided as the tenant's accepted domain: not unregistered
                break
            assert time.monotonic() < deadline, "the registration was not enforced in time"
        added = cli(
            config,
            "tenant",
            "add-connector",
            "contoso",
            "--connector",
            "rogue",
            "--ip-range",
            "203.0.113.0/24",
            "--by",
            "attacker@contoso",
        )
        assert added["ok"] is True
        for i in range(9):  # cross the domain limit: blocked
            relay(client, f"spam@forged{i}.example")
        assert relay(client, "spam@forged0.example") == blocked()
        status = cli(config, "tenant", "status", "contoso")
        block = status["block"]
        assert isinstance(block, dict)
        assert "rogue" in block["to_review"]
    assert serve.stop() == 0

"""End to end with a real Postfix: smtplib -> Postfix smtpd -> check_policy_service -> PolicyServer.

The harness (``postfix_harness.py``) fetches Debian's postfix package on first use and runs a
private instance whose ``smtpd_relay_restrictions`` start with our policy service.
"""

from __future__ import annotations

import smtplib

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

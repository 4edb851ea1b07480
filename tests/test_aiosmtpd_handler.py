"""The aiosmtpd handler end to end: a real aiosmtpd Controller on 127.0.0.1, smtplib as client.

The policy is real too (compiled matchers, the example configuration, `MemoryStore`), driven by
a manual clock so windows never depend on wall time.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from domainpolicy import (
    AcceptedDomain,
    BlockPolicy,
    ConnectorTable,
    DomainMatcher,
    InboundConnector,
    InvalidConfiguration,
    MemoryStore,
    StoreUnavailable,
)
from domainpolicy._alerts import AlertsConfig, LogSink
from domainpolicy._blockstate import BlockMachine, Effects, State, TenantState
from domainpolicy._config import load_config
from domainpolicy._policy import Decision, RelayPolicy, RelayRequest
from domainpolicy.integrations.aiosmtpd import (
    PolicyHandler,
    peer_certificate_name,
    peer_certificate_names,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "examples" / "tenants.toml"
BLOCKED = b"5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"
T0 = 1_800_000_000.0


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryStore):
    """A `MemoryStore` whose ``observe`` fails with `StoreUnavailable` while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def observe(
        self,
        machine: BlockMachine,
        tenant: str,
        now: float,
        *,
        registered: bool,
        registrable: str | None,
        weight: int = 1,
    ) -> tuple[TenantState, Effects]:
        if self.down:
            raise StoreUnavailable("store is down (test)")
        return super().observe(
            machine, tenant, now, registered=registered, registrable=registrable, weight=weight
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (aiosmtpd 1.4.6 cannot use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ProxyController(Controller):
    """A Controller for servers that expect a PROXY protocol header.

    The stock start-up probe connects, sends nothing and hangs up.  aiosmtpd 1.4.6 then
    cancels the session while it waits for the header and never closes the transport (a
    ResourceWarning when the loop is gone), so this probe sends a header first.
    """

    def _trigger_server(self) -> None:
        with socket.create_connection((self.hostname, self.port), 1.0) as probe:
            probe.sendall(f"PROXY TCP4 192.0.2.1 127.0.0.1 1 {self.port}\r\n".encode())
            probe.recv(1024)


@contextmanager
def serving(handler: Any, **smtp_options: Any) -> Iterator[int]:
    """Run *handler* in a real aiosmtpd Controller on 127.0.0.1; yields the port."""
    port = free_port()
    kind = ProxyController if "proxy_protocol_timeout" in smtp_options else Controller
    # A generous ready_timeout: start-up is slow on a loaded machine, and nothing is timed.
    controller = kind(handler, hostname="127.0.0.1", port=port, ready_timeout=60, **smtp_options)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def fabrikam_policy(
    *,
    store: MemoryStore | None = None,
    clock: ManualClock | None = None,
    message_limit: int = 3,
    count: str = "messages",
    loopback_connector: bool = True,
) -> RelayPolicy:
    """fabrikam.com is fabrikam's; its connector covers 127.0.0.0/8 (the test client)."""
    matcher = DomainMatcher.compile([AcceptedDomain("fabrikam.com", "fabrikam")])
    connectors = [
        InboundConnector(
            name="fabrikam-onprem",
            tenant="fabrikam",
            sender_ip_ranges=(ipaddress.ip_network("127.0.0.0/8"),),
        )
    ]
    return RelayPolicy(
        matcher,
        ConnectorTable.compile(connectors if loopback_connector else [], matcher),
        BlockPolicy(message_limit=message_limit, domain_limit=5),
        store if store is not None else MemoryStore(),
        clock=clock or ManualClock(),
        count=count,  # type: ignore[arg-type]
    )


class Recorder:
    """Collects what the handler decided and what it relayed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decisions: list[tuple[RelayRequest, Decision]] = []
        self.relayed: list[tuple[str, list[str], bytes]] = []

    def on_decision(self, request: RelayRequest, decision: Decision) -> None:
        with self.lock:
            self.decisions.append((request, decision))

    async def relay(self, envelope: Any) -> None:
        with self.lock:
            self.relayed.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )


def client(port: int) -> smtplib.SMTP:
    """An smtplib client that said EHLO."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    smtp.ehlo("client.example")
    return smtp


# --------------------------------------------------------------------------- check at MAIL


def test_block_flow_and_remediation_over_real_smtp() -> None:
    """Unregistered mail passes up to the limit, then 550 5.7.750; remediation reopens it."""
    # Registered mail flows throughout, also while the tenant is blocked.
    clock = ManualClock()
    policy = fabrikam_policy(clock=clock)
    seen = Recorder()
    handler = PolicyHandler(policy, relay=seen.relay, on_decision=seen.on_decision)
    with serving(handler) as port, client(port) as smtp:
        assert smtp.sendmail("alice@fabrikam.com", ["bob@dest.example"], MESSAGE) == {}
        assert seen.relayed == [("alice@fabrikam.com", ["bob@dest.example"], MESSAGE)]

        for number in range(3):  # message_limit = 3: three unregistered messages pass
            clock.now += 10
            smtp.sendmail(f"spam{number}@spam.example", ["victim@dest.example"], MESSAGE)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("spam9@spam.example", ["victim@dest.example"], MESSAGE)
        assert refused.value.smtp_code == 550
        assert refused.value.smtp_error == BLOCKED
        assert refused.value.sender == "spam9@spam.example"
        # A refused MAIL leaves no transaction: aiosmtpd itself refuses RCPT.
        assert smtp.mail("spam10@spam.example") == (550, BLOCKED)
        assert smtp.rcpt("victim@dest.example")[0] == 503
        smtp.rset()

        # Registered mail is still accepted while the tenant is blocked.
        assert smtp.sendmail("carol@fabrikam.com", ["dan@dest.example"], MESSAGE) == {}
        assert policy.status("fabrikam").state is State.BLOCKED

        # Remediation through the policy's admin methods, then support approves.
        clock.now += 600
        checklist = policy.status("fabrikam").checklist
        assert checklist is not None
        assert checklist.unresolved_domains == ("spam.example",)
        policy.declare_not_ours("fabrikam", ["spam.example"], by="admin@fabrikam.com")
        policy.attest("fabrikam", by="admin@fabrikam.com", note="server rebuilt, relay closed")
        policy.request_unblock(
            "fabrikam", code="5.7.750", evidence="ticket 42", by="admin@fabrikam.com"
        )
        policy.approve("fabrikam", by="support", reason="verified")
        assert policy.status("fabrikam").state is State.ACTIVE

        clock.now += 10
        assert smtp.sendmail("news@partner.example", ["bob@dest.example"], MESSAGE) == {}

    relayed_senders = [sender for sender, _, _ in seen.relayed]
    assert relayed_senders == [
        "alice@fabrikam.com",
        "spam0@spam.example",
        "spam1@spam.example",
        "spam2@spam.example",
        "carol@fabrikam.com",
        "news@partner.example",
    ]
    request, decision = seen.decisions[0]
    assert request.client_ip == "127.0.0.1"
    assert request.sender == "alice@fabrikam.com"
    assert request.recipients == ()
    assert request.tls_cert_name is None
    assert request.sasl_user is None
    assert decision.reason == "accepted_domain"
    # One decision per MAIL FROM: 1 + 3 + 2 refused + 1 + 1.
    assert len(seen.decisions) == 8


def test_no_tenant_and_bad_sender_syntax() -> None:
    """No tenant gives 550 5.7.64, bad syntax 501 5.1.7 (or aiosmtpd's own 553 5.1.3)."""
    policy = fabrikam_policy(loopback_connector=False)
    with serving(PolicyHandler(policy)) as port, client(port) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("someone@nowhere.example", ["bob@dest.example"], MESSAGE)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550,
            b"5.7.64 TenantAttribution; Relay Access Denied",
        )
        # aiosmtpd's parser (email.headerregistry) lets these through; ours refuses them.
        for bad in ("a..b@fabrikam.com", "user@exa_mple.com", "user@-bad.com", "user"):
            assert smtp.mail(bad) == (501, b"5.1.7 Bad sender address syntax"), bad
        # aiosmtpd answers these itself, before any handler hook runs.
        assert smtp.docmd("MAIL FROM:<user@@fabrikam.com>") == (
            553,
            b"5.1.3 Error: malformed address",
        )
        assert smtp.docmd("MAIL FROM:<user@.fabrikam.com>")[0] == 553
        # The null sender is accepted (uncounted) by default.
        assert smtp.mail("") == (250, b"2.1.0 Sender OK")
        assert smtp.rcpt("bob@dest.example") == (250, b"2.1.5 Recipient OK")
        smtp.rset()
    assert policy.status("fabrikam").total == 0


def test_store_failure_is_451_then_recovers() -> None:
    """A failing store gives the client 451 4.3.0, uncounted; the store back, mail flows."""
    store = FlakyStore()
    policy = fabrikam_policy(store=store)
    seen = Recorder()
    with serving(PolicyHandler(policy, relay=seen.relay)) as port, client(port) as smtp:
        store.down = True
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("alice@fabrikam.com", ["bob@dest.example"], MESSAGE)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            451,
            b"4.3.0 Temporary policy failure, please try again later",
        )
        assert seen.relayed == []
        store.down = False
        assert smtp.sendmail("alice@fabrikam.com", ["bob@dest.example"], MESSAGE) == {}
    assert len(seen.relayed) == 1
    assert policy.status("fabrikam").total == 1


def test_relay_callables_sync_failing_and_returning_a_reply() -> None:
    """A sync relay may give its own reply; a relay that raises gives 451 4.4.0 after DATA."""
    delivered: list[list[str]] = []

    def sync_relay(envelope: Any) -> str:
        if "fail@dest.example" in envelope.rcpt_tos:
            raise ConnectionRefusedError("downstream is down")
        delivered.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Queued downstream"

    handler = PolicyHandler(fabrikam_policy(), relay=sync_relay)
    with serving(handler) as port, client(port) as smtp:
        smtp.mail("alice@fabrikam.com")
        smtp.rcpt("bob@dest.example")
        assert smtp.data(MESSAGE) == (250, b"2.0.0 Queued downstream")
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail("alice@fabrikam.com", ["fail@dest.example"], MESSAGE)
        assert (failed.value.smtp_code, failed.value.smtp_error) == (
            451,
            b"4.4.0 Relay to the next hop failed, try again later",
        )
    assert delivered == [["bob@dest.example"]]


def test_without_relay_data_answers_250() -> None:
    """Without a relay callable the handler accepts the content with 250 2.0.0."""
    with serving(PolicyHandler(fabrikam_policy())) as port, client(port) as smtp:
        smtp.mail("alice@fabrikam.com")
        smtp.rcpt("bob@dest.example")
        assert smtp.data(MESSAGE) == (250, b"2.0.0 OK")


# --------------------------------------------------------------------------- the example config


class ProxiedSMTP(smtplib.SMTP):
    """smtplib client that opens with a PROXY protocol v1 header claiming *source* as client."""

    def __init__(self, port: int, source: str) -> None:
        self._proxy_header = f"PROXY TCP4 {source} 127.0.0.1 40000 {port}\r\n".encode()
        super().__init__("127.0.0.1", port, timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # smtplib's private socket factory (not in typeshed), the one hook before the greeting.
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self._proxy_header)
        return sock


def test_multiline_tenant_override_reaches_the_client_intact() -> None:
    """Contoso's two-line 5.7.750 override (examples/tenants.toml) arrives byte for byte."""
    # contoso's connector covers 198.51.100.0/24: the client claims 198.51.100.7 via PROXY.
    config = load_config(EXAMPLE_CONFIG)
    clock = ManualClock()
    policy = config.build_policy(store=MemoryStore(), clock=clock)
    seen = Recorder()
    handler = PolicyHandler(policy, on_decision=seen.on_decision)
    with (
        serving(handler, proxy_protocol_timeout=5) as port,
        ProxiedSMTP(port, "198.51.100.7") as smtp,
    ):
        smtp.ehlo("onprem.contoso.com")
        for number in range(20):
            clock.now += 1
            assert smtp.mail(f"user{number}@forwarded.example")[0] == 250
            smtp.rset()
        smtp.putcmd("MAIL FROM:<user99@forwarded.example>")
        raw = [smtp.file.readline() for _ in range(2)]  # type: ignore[union-attr]
        assert raw == [
            b"550-5.7.750 Service unavailable. Client blocked from sending from unregistered "
            b"domains\r\n",
            b"550 5.7.750 See https://support.relay.example.net/unblock?tenant=contoso "
            b"[mx1.relay.example.net]\r\n",
        ]
        # smtplib reads the same reply as one (code, text) pair, lines joined by LF.
        assert smtp.mail("user100@forwarded.example") == (
            550,
            BLOCKED + b"\n5.7.750 See https://support.relay.example.net/unblock?tenant=contoso "
            b"[mx1.relay.example.net]",
        )
        smtp.rset()
        # contoso's own domains are still accepted.
        assert smtp.mail("alice@contoso.com") == (250, b"2.1.0 Sender OK")
    request, decision = seen.decisions[0]
    assert request.client_ip == "198.51.100.7"
    assert decision.tenant == "contoso"
    assert decision.reason == "unregistered_allowed"


def test_example_config_from_loopback_without_connector_is_5_7_64() -> None:
    """With the example config, loopback has no connector: only owned domains are accepted."""
    policy = load_config(EXAMPLE_CONFIG).build_policy(store=MemoryStore(), clock=ManualClock())
    with serving(PolicyHandler(policy)) as port, client(port) as smtp:
        assert smtp.mail("someone@forwarded.example") == (
            550,
            b"5.7.64 TenantAttribution; Relay Access Denied [mx1.relay.example.net]",
        )
        assert smtp.mail("bob@fabrikam.com") == (250, b"2.1.0 Sender OK")
        smtp.rset()


# --------------------------------------------------------------------------- check at RCPT


def test_rcpt_stage_counts_each_message_once() -> None:
    """check_at="rcpt" with a per-message policy: the first RCPT decides, counted once."""
    policy = fabrikam_policy(message_limit=2)
    seen = Recorder()
    handler = PolicyHandler(policy, check_at="rcpt", relay=seen.relay, on_decision=seen.on_decision)
    recipients = ["a@dest.example", "b@dest.example", "c@dest.example"]
    with serving(handler) as port, client(port) as smtp:
        for _ in range(2):
            assert smtp.sendmail("x@spam.example", recipients, MESSAGE) == {}
        assert smtp.mail("x@spam.example") == (250, b"2.1.0 Sender OK")
        assert smtp.rcpt("a@dest.example") == (550, BLOCKED)
        assert smtp.rcpt("b@dest.example") == (550, BLOCKED)
        assert smtp.docmd("DATA")[0] == 503  # aiosmtpd: no accepted recipient
        smtp.rset()
        # At MAIL only the syntax is checked (nothing counted).
        assert smtp.mail("a..b@fabrikam.com") == (501, b"5.1.7 Bad sender address syntax")
    assert [r for _, r, _ in seen.relayed] == [recipients, recipients]
    assert [request.recipients for request, _ in seen.decisions] == [("a@dest.example",)] * 3
    status = policy.status("fabrikam")
    assert (status.total, status.unregistered) == (3, 3)


def test_rcpt_stage_counts_recipients_for_a_recipient_policy() -> None:
    """count="recipients": each recipient weighs 1; from the crossing one on, refused."""
    policy = fabrikam_policy(message_limit=3, count="recipients")
    seen = Recorder()
    handler = PolicyHandler(policy, check_at="rcpt", relay=seen.relay)
    with serving(handler) as port, client(port) as smtp:
        assert smtp.sendmail("x@spam.example", ["a@d.example", "b@d.example"], MESSAGE) == {}
        refused = smtp.sendmail(
            "x@spam.example", ["c@d.example", "d@d.example", "e@d.example"], MESSAGE
        )
        assert refused == {"d@d.example": (550, BLOCKED), "e@d.example": (550, BLOCKED)}
        assert policy.status("fabrikam").unregistered == 5
        # A refused message: the first recipient decides, the others are not counted again.
        smtp.mail("x@spam.example")
        assert smtp.rcpt("f@d.example") == (550, BLOCKED)
        assert smtp.rcpt("g@d.example") == (550, BLOCKED)
        smtp.rset()
    assert [r for _, r, _ in seen.relayed] == [["a@d.example", "b@d.example"], ["c@d.example"]]
    assert policy.status("fabrikam").unregistered == 6


def test_recipient_policy_needs_check_at_rcpt() -> None:
    """A recipient-counting policy with check_at="mail" (and other bad arguments) is refused."""
    with pytest.raises(InvalidConfiguration, match="check_at='rcpt'"):
        PolicyHandler(fabrikam_policy(count="recipients"))
    with pytest.raises(InvalidConfiguration) as bad:
        PolicyHandler(object(), check_at="data", relay=42)  # type: ignore[arg-type]
    assert len(bad.value.problems) == 3


# --------------------------------------------------------------------------- client identity


def test_sasl_login_reaches_the_request() -> None:
    """After AUTH PLAIN the SASL login is the request's sasl_user."""

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"secret"
        return AuthResult(success=ok, auth_data=auth_data)

    seen = Recorder()
    handler = PolicyHandler(fabrikam_policy(), on_decision=seen.on_decision)
    with (
        serving(handler, authenticator=authenticator, auth_require_tls=False) as port,
        client(port) as smtp,
    ):
        smtp.login("relay-user", "secret")
        assert smtp.mail("alice@fabrikam.com")[0] == 250
        smtp.rset()
    assert [request.sasl_user for request, _ in seen.decisions] == ["relay-user"]


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate for mail.contoso.com, and
    client certificates with several names: ``client-multi`` (``mx1.fabrikam.net``, the IP
    address 127.0.0.1, then ``mail.contoso.com``) and ``client-ambiguous``
    (``mail.contoso.com`` and ``mx.fabrikam.com``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    end = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        label: str,
        common: str,
        san: x509.GeneralName | list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName(san if isinstance(san, list) else [san]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        paths[label] = directory / f"{label}.pem"
        paths[label].write_bytes(pem)

    leaf(
        "server",
        "127.0.0.1",
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    leaf(
        "client",
        "mail.contoso.com",
        x509.DNSName("mail.contoso.com"),
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    leaf(
        "client-multi",
        "mx1.fabrikam.net",
        [
            x509.DNSName("mx1.fabrikam.net"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("mail.contoso.com"),
        ],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    leaf(
        "client-ambiguous",
        "mail.contoso.com",
        [x509.DNSName("mail.contoso.com"), x509.DNSName("mx.fabrikam.com")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return paths


def test_tls_client_certificate_attributes_the_tenant(tmp_path: Path) -> None:
    """A verified client certificate for mail.contoso.com attributes the sender to contoso."""
    pki = _write_pki(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki["server"])
    server_context.load_verify_locations(pki["ca"])
    server_context.verify_mode = ssl.CERT_OPTIONAL
    policy = load_config(EXAMPLE_CONFIG).build_policy(store=MemoryStore(), clock=ManualClock())
    seen = Recorder()
    handler = PolicyHandler(policy, on_decision=seen.on_decision)

    def client_context(with_certificate: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        if with_certificate:
            context.load_cert_chain(pki["client"])
        return context

    with serving(handler, tls_context=server_context) as port:
        with client(port) as smtp:
            smtp.starttls(context=client_context(True))
            smtp.ehlo("mail.contoso.com")
            assert smtp.mail("someone@forwarded.example") == (250, b"2.1.0 Sender OK")
            smtp.rset()
        with client(port) as smtp:
            smtp.starttls(context=client_context(False))
            smtp.ehlo("anonymous.example")
            assert smtp.mail("someone@forwarded.example")[0] == 550
    (with_cert, first), (without_cert, second) = seen.decisions
    assert with_cert.tls_cert_name == "mail.contoso.com"
    assert (first.tenant, first.reason) == ("contoso", "unregistered_allowed")
    assert without_cert.tls_cert_name is None
    assert second.reason == "no_tenant"


def _tls_server_context(pki: dict[str, Path]) -> ssl.SSLContext:
    """The server's context: its certificate, and client certificates verified if presented."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server"])
    context.load_verify_locations(pki["ca"])
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def test_every_certificate_name_attributes_the_client(tmp_path: Path) -> None:
    """A certificate whose second SAN name is contoso's attributes to contoso; one with names
    of two tenants is ambiguous and the client address decides; the request carries them all."""
    pki = _write_pki(tmp_path)
    matcher = DomainMatcher.compile(
        [
            AcceptedDomain("contoso.com", "contoso"),
            AcceptedDomain("fabrikam.com", "fabrikam"),
            AcceptedDomain("northwind.example", "northwind"),
        ]
    )
    connectors = ConnectorTable.compile(
        [
            InboundConnector("contoso-cert", "contoso", tls_cert_names=["mail.contoso.com"]),
            InboundConnector("fabrikam-cert", "fabrikam", tls_cert_names=["mx.fabrikam.com"]),
            InboundConnector("northwind-onprem", "northwind", sender_ip_ranges=["127.0.0.0/8"]),
        ],
        matcher,
    )
    policy = RelayPolicy(matcher, connectors, BlockPolicy(), MemoryStore(), clock=ManualClock())
    seen = Recorder()
    handler = PolicyHandler(policy, on_decision=seen.on_decision)
    with serving(handler, tls_context=_tls_server_context(pki)) as port:
        for certificate in ("client-multi", "client-ambiguous", None):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
            if certificate is not None:
                context.load_cert_chain(pki[certificate])
            with client(port) as smtp:
                smtp.starttls(context=context)
                smtp.ehlo("client.example")
                assert smtp.mail("someone@forwarded.example") == (250, b"2.1.0 Sender OK")
                smtp.rset()
    requests = [
        (request.tls_cert_name, request.tls_cert_names, decision.tenant)
        for request, decision in seen.decisions
    ]
    assert requests == [
        ("mx1.fabrikam.net", ("mx1.fabrikam.net", "mail.contoso.com"), "contoso"),
        ("mail.contoso.com", ("mail.contoso.com", "mx.fabrikam.com"), "northwind"),
        (None, (), "northwind"),
    ]


@pytest.mark.parametrize("where", ["starttls", "transport"])
def test_build_request_passes_every_certificate_name(where: str) -> None:
    """build_request carries all the names, from STARTTLS session data or an implicit-TLS
    transport, and the first of them as tls_cert_name."""
    peercert = {
        "subject": ((("commonName", "cn.example.com"),),),
        "subjectAltName": (("DNS", "mx1.fabrikam.net"), ("DNS", "mail.contoso.com")),
    }
    extra = {"peercert": peercert}
    session = SimpleNamespace(peer=("192.0.2.1", 2525), ssl=extra if where == "starttls" else None)
    server = SimpleNamespace(transport=SimpleNamespace(get_extra_info=extra.get))
    request = PolicyHandler(fabrikam_policy()).build_request(server, session, "a@fabrikam.com", ())
    assert request.tls_cert_names == ("mx1.fabrikam.net", "mail.contoso.com")
    assert request.tls_cert_name == "mx1.fabrikam.net"
    assert request.client_ip == "192.0.2.1"


_CN = ((("commonName", "cn.example.com"),),)


@pytest.mark.parametrize(
    ("peercert", "names"),
    [
        # every SAN DNS name, in certificate order; the CN is not added
        (
            {
                "subject": _CN,
                "subjectAltName": (("DNS", "mx1.fabrikam.net"), ("DNS", "mail.contoso.com")),
            },
            ("mx1.fabrikam.net", "mail.contoso.com"),
        ),
        (
            {"subjectAltName": (("DNS", "b.example"), ("DNS", "a.example"))},
            ("b.example", "a.example"),
        ),
        # IP (and other kinds of) SANs are not names
        (
            {
                "subject": _CN,
                "subjectAltName": (
                    ("IP Address", "192.0.2.1"),
                    ("DNS", "mail.example.com"),
                    ("email", "postmaster@example.com"),
                    ("URI", "https://example.com/"),
                    ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
                    ("DNS", "b.example.com"),
                ),
            },
            ("mail.example.com", "b.example.com"),
        ),
        # the CN only without any SAN DNS name (RFC 6125 6.4.4)
        ({"subject": _CN}, ("cn.example.com",)),
        ({"subject": _CN, "subjectAltName": ()}, ("cn.example.com",)),
        ({"subject": _CN, "subjectAltName": (("IP Address", "192.0.2.1"),)}, ("cn.example.com",)),
        (
            {
                "subject": (
                    (("organizationName", "Contoso"),),
                    (("commonName", "first.example"),),
                    (("commonName", "second.example"),),
                )
            },
            ("first.example",),
        ),
        # nothing verified, nothing to go by
        ({}, ()),
        (None, ()),
        ({"subject": ((("organizationName", "Contoso"),),)}, ()),
        # malformed entries are skipped
        (
            {
                "subject": _CN,
                "subjectAltName": (
                    ("DNS",),
                    ("DNS", ""),
                    ("DNS", 5),
                    "DNS",
                    ("DNS", "ok.example", 1),
                ),
            },
            ("cn.example.com",),
        ),
        ({"subject": 5, "subjectAltName": 7}, ()),
        ({"subject": (("commonName", "flat.example"),), "subjectAltName": None}, ()),
        ({"subjectAltName": [["DNS", "list.example"]]}, ("list.example",)),
    ],
)
def test_peer_certificate_names(peercert: Any, names: tuple[str, ...]) -> None:
    """SAN DNS names in certificate order, else the CN alone; () for nothing verified; and
    peer_certificate_name is the first of them."""
    assert peer_certificate_names(peercert) == names
    assert peer_certificate_name(peercert) == (names[0] if names else None)


def test_peer_certificate_name_prefers_subject_alt_name() -> None:
    """The first SAN DNS name wins over the common name; CN is the fallback; {} is None."""
    cn = ((("commonName", "cn.example.com"),),)
    assert peer_certificate_name({"subject": cn}) == "cn.example.com"
    san = (("IP Address", "192.0.2.1"), ("DNS", "mail.example.com"), ("DNS", "b.example.com"))
    assert peer_certificate_name({"subject": cn, "subjectAltName": san}) == "mail.example.com"
    assert peer_certificate_name({}) is None
    assert peer_certificate_name(None) is None


# --------------------------------------------------------------------------- the example relay


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "aiosmtpd_relay_example", ROOT / "examples" / "aiosmtpd_relay.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Sink:
    """A downstream aiosmtpd handler that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 stored"


def test_example_relay_forwards_accepted_mail_downstream() -> None:
    """examples/aiosmtpd_relay.py forwards accepted mail to a loopback downstream server."""
    example = _load_example()
    sink = Sink()
    policy = fabrikam_policy(loopback_connector=False)
    with serving(sink) as downstream:
        handler = PolicyHandler(policy, relay=example.forwarder("127.0.0.1", downstream))
        with serving(handler) as port, client(port) as smtp:
            assert smtp.sendmail("alice@fabrikam.com", ["bob@dest.example"], MESSAGE) == {}
            with pytest.raises(smtplib.SMTPSenderRefused):
                smtp.sendmail("x@nowhere.example", ["bob@dest.example"], MESSAGE)
    assert len(sink.messages) == 1
    sender, recipients, content = sink.messages[0]
    assert (sender, recipients) == ("alice@fabrikam.com", ["bob@dest.example"])
    assert content.endswith(MESSAGE)


# --------------------------------------------------------------------------- alerts


def test_handler_with_alerts_delivers_the_block_notice(caplog: pytest.LogCaptureFixture) -> None:
    """With ``alerts``, the handler runs the delivery worker: the block reached over SMTP is
    delivered to the sinks once, outside the SMTP path; ``close`` stops the worker."""
    store = MemoryStore()
    policy = fabrikam_policy(store=store)
    alerts = AlertsConfig(sinks={"log": LogSink(name="log")}, poll_interval=0.05)
    handler = PolicyHandler(policy, alerts=alerts)
    worker = handler.alert_worker
    assert worker is not None
    try:
        with (
            caplog.at_level(logging.WARNING, logger="domainpolicy.alerts"),
            serving(handler) as port,
            client(port) as smtp,
        ):
            for number in range(3):
                smtp.sendmail(f"spam{number}@spam.example", ["victim@dest.example"], MESSAGE)
            with pytest.raises(smtplib.SMTPSenderRefused):
                smtp.sendmail("spam9@spam.example", ["victim@dest.example"], MESSAGE)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                rows = [r for r in store.alert_rows() if r.kind == "blocked"]
                if rows and rows[0].status == "delivered":
                    break
                time.sleep(0.05)
        (row,) = [r for r in store.alert_rows() if r.kind == "blocked"]
        assert (row.tenant, row.sink, row.status) == ("fabrikam", "log", "delivered")
        lines = [r.getMessage() for r in caplog.records if "kind=blocked" in r.getMessage()]
        assert len(lines) == 1
        assert "tenant=fabrikam" in lines[0]
    finally:
        handler.close()
    assert handler.alert_worker is None
    assert not any(t.name == "domainpolicy-alerts" and t.is_alive() for t in threading.enumerate())


def test_handler_refuses_alerts_that_are_not_a_configuration() -> None:
    """``alerts`` must be an AlertsConfig: anything else is one InvalidConfiguration."""
    with pytest.raises(InvalidConfiguration, match="must be an AlertsConfig"):
        PolicyHandler(fabrikam_policy(), alerts={"sinks": {}})  # type: ignore[arg-type]

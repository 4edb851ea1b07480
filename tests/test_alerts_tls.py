"""Alert sinks over TLS against real receivers on loopback: STARTTLS and implicit TLS with AUTH,
HTTPS webhooks, and certificates that do not verify (retried, never delivered in the clear)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from alert_receivers import Logins, http_receiver, server_context, tls_smtp_receiver, write_pki
from domainpolicy import (
    AlertsConfig,
    AlertWorker,
    BlockMachine,
    BlockPolicy,
    MemoryStore,
    SmtpSink,
    TenantContacts,
    WebhookSink,
)
from domainpolicy._stores.outbox import DEAD, DELIVERED

POLICY = BlockPolicy(message_limit=5, domain_limit=5, max_tracked_domains=20, warn_fraction=1.0)
T0 = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret"


def config(sink: SmtpSink | WebhookSink) -> AlertsConfig:
    return AlertsConfig(
        sinks={sink.name: sink},
        tenants={"contoso": TenantContacts(admins=("admin@contoso.example",))},
        backoff_base=10,
        backoff_max=100,
        max_attempts=4,
        reminder_interval=0,
    )


def blocked_store(alerts: AlertsConfig) -> MemoryStore:
    """A store routing alerts as *alerts* does, whose tenant contoso was just blocked."""
    store = MemoryStore()
    store.route_alerts(alerts.route)
    machine = BlockMachine(POLICY)
    for i in range(6):
        store.observe(machine, "contoso", T0 + i, registered=False, registrable=f"s{i}.example")
    return store


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))


def smtp_sink(port: int, ca: Path | None, tls: str, **auth: str) -> SmtpSink:
    return SmtpSink(
        name="mail",
        host="127.0.0.1",
        port=port,
        tls=tls,
        sender="alerts@relay.example",
        timeout=10,
        cafile=None if ca is None else str(ca),
        **auth,  # type: ignore[arg-type]
    )


# aiosmtpd warns about AUTH without STARTTLS, not knowing the implicit-TLS transport is TLS.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_smtp_over_verified_tls_with_auth_delivers(pki: tuple[Path, Path, Path], tls: str) -> None:
    """STARTTLS or implicit TLS to a relay whose certificate verifies, then AUTH: delivered."""
    ca, certificate, key = pki
    logins = Logins("alerts", "pa55word")
    with tls_smtp_receiver(
        server_context(certificate, key), implicit=tls == "implicit", logins=logins
    ) as (smtp, port):
        sink = smtp_sink(port, ca, tls, username="alerts", password="pa55word")
        store = blocked_store(config(sink))
        worker = AlertWorker(store, config(sink))
        assert worker.run_once(T0 + 10).delivered == 1
    assert logins.attempts == ["alerts"]
    ((sender, recipients, content),) = smtp.messages
    assert (sender, recipients) == ("alerts@relay.example", ["admin@contoso.example"])
    assert b"Auto-Submitted: auto-generated" in content


def test_smtp_wrong_password_is_dead(pki: tuple[Path, Path, Path]) -> None:
    """A relay refusing the credentials (535) is a permanent failure: dead letter, no mail."""
    ca, certificate, key = pki
    with tls_smtp_receiver(server_context(certificate, key), logins=Logins("alerts", "right")) as (
        smtp,
        port,
    ):
        sink = smtp_sink(port, ca, "starttls", username="alerts", password="wrong")
        store = blocked_store(config(sink))
        worker = AlertWorker(store, config(sink))
        assert worker.run_once(T0 + 10).dead == 1
    assert smtp.messages == []
    (row,) = store.alert_rows()
    assert row.status == DEAD
    assert "535" in (row.last_error or "")


def test_smtp_certificate_that_does_not_verify_is_retried(
    pki: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A relay whose certificate is not trusted: a failed attempt (retried later, reason
    logged), and nothing is sent in the clear."""
    _, certificate, key = pki
    with tls_smtp_receiver(server_context(certificate, key)) as (smtp, port):
        sink = smtp_sink(port, None, "starttls")
        store = blocked_store(config(sink))
        worker = AlertWorker(store, config(sink))
        with caplog.at_level(logging.WARNING):
            assert worker.run_once(T0 + 10).retried == 1
    assert smtp.messages == []
    (row,) = store.alert_rows()
    assert row.status not in (DELIVERED, DEAD)
    assert "TLS failed" in (row.last_error or "")
    assert "CERTIFICATE_VERIFY_FAILED" in (row.last_error or "")


@pytest.mark.parametrize("trusted", [True, False])
def test_https_webhook_verifies_the_receiver(pki: tuple[Path, Path, Path], trusted: bool) -> None:
    """An HTTPS receiver whose certificate verifies gets the signed payload; one that does not
    verify gets nothing and the row is retried."""
    ca, certificate, key = pki
    with http_receiver(context=server_context(certificate, key)) as (receiver, url):
        assert url.startswith("https://")
        sink = WebhookSink(
            name="hook", url=url, secret=SECRET, timeout=10, cafile=str(ca) if trusted else None
        )
        store = blocked_store(config(sink))
        worker = AlertWorker(store, config(sink))
        report = worker.run_once(T0 + 10)
    if trusted:
        assert report.delivered == 1
        assert len(receiver.requests) == 1
    else:
        assert report.retried == 1
        assert receiver.requests == []
        (row,) = store.alert_rows()
        assert "TLS failed" in (row.last_error or "")

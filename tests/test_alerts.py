"""Alerts that reach people: the notice, the signed webhook, the sinks against real receivers
on loopback, the delivery worker's retries and dead letter, reminders, and the configuration."""

from __future__ import annotations

import email
import email.policy
import logging
import random
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alert_receivers import http_receiver, smtp_receiver
from domainpolicy import BlockMachine, BlockPolicy, InvalidConfiguration, MemoryStore
from domainpolicy._alerts import (
    AlertsConfig,
    AlertWorker,
    LogSink,
    SmtpSink,
    TenantContacts,
    WebhookSink,
    parse_alerts,
    render_email,
    sign,
    verify,
    webhook_body,
)
from domainpolicy._stores.outbox import DEAD, DELIVERED, alert_payload

POLICY = BlockPolicy(message_limit=5, domain_limit=5, max_tracked_domains=20, warn_fraction=1.0)
T0 = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret"


def blocked_payload(tenant: str = "contoso") -> dict[str, object]:
    machine = BlockMachine(POLICY)
    store = MemoryStore()
    for i in range(6):
        state, _effects = store.observe(
            machine, tenant, T0 + i, registered=False, registrable=f"spam{i}.example"
        )
    return alert_payload("a" * 32, "blocked", state, T0 + 5, "blocked", limits=POLICY.limits())


def config(**sinks: object) -> AlertsConfig:
    return AlertsConfig(
        sinks=sinks,  # type: ignore[arg-type]
        tenants={"contoso": TenantContacts(admins=("admin@contoso.example",))},
        support=("support@relay.example",),
        backoff_base=10,
        backoff_max=100,
        max_attempts=4,
        reminder_interval=0,
    )


def block(store: MemoryStore, tenant: str = "contoso", at: float = T0) -> None:
    machine = BlockMachine(POLICY)
    for i in range(6):
        store.observe(machine, tenant, at + i, registered=False, registrable=f"spam{i}.example")


# -------------------------------------------------------------------------- the notice


def test_email_parses_and_names_domains_and_checklist() -> None:
    """The e-mail parses with the stdlib and names the domains, counts, code and checklist."""
    message = render_email(
        blocked_payload(), sender="alerts@relay.example", recipients=["a@contoso.example"], now=T0
    )
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"]
    assert parsed["Message-ID"]
    assert "5.7.750" in parsed["Subject"]
    text = parsed.get_body().get_content()  # type: ignore[union-attr]
    for i in range(6):
        assert f"spam{i}.example" in text
    assert "5.7.750" in text
    assert "Attest that the on-premises mail server is secured." in text
    assert "5 messages and 5 distinct domains" in text


def test_japanese_notice_is_utf8() -> None:
    """The Japanese notice is UTF-8 text with an encoded subject."""
    message = render_email(
        blocked_payload(),
        sender="a@relay.example",
        recipients=["a@b.example"],
        language="ja",
        now=T0,
    )
    raw = message.as_bytes()
    assert raw.isascii()  # encoded on the wire
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert "ブロック" in parsed["Subject"]
    assert "spam0.example" in parsed.get_body().get_content()  # type: ignore[union-attr]


@given(st.text(min_size=1, max_size=40))
def test_no_header_injection_from_tenant_names(tenant: str) -> None:
    """Whatever the tenant id, the notice has exactly its own headers, one of each."""
    payload = blocked_payload()
    payload["tenant"] = tenant + "\r\nBcc: victim@example.com"
    message = render_email(payload, sender="a@relay.example", recipients=["a@b.example"], now=T0)
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert len(parsed.get_all("Subject") or []) == 1


@pytest.mark.parametrize(
    ("skew", "tamper", "ok"),
    [
        (0, False, True),
        (299, False, True),
        (301, False, False),
        (-301, False, False),
        (0, True, False),
    ],
)
def test_signature_examples(skew: int, tamper: bool, ok: bool) -> None:
    """A receiver accepts a fresh, untampered signature and refuses replays and tampering."""
    body = webhook_body(blocked_payload())
    header = sign(SECRET.encode(), int(T0), body)
    if tamper:
        body += b" "
    assert verify(SECRET.encode(), header, body, now=T0 + skew) is ok


# -------------------------------------------------------------------------- sinks, worker


def test_block_is_delivered_by_mail_and_webhook_once() -> None:
    """A block reaches the admins by e-mail and the webhook once, signed, keyed by the alert id."""
    with smtp_receiver() as (smtp, port), http_receiver() as (hook, url):
        cfg = config(
            mail=SmtpSink(
                name="mail", host="127.0.0.1", port=port, tls="none", sender="a@relay.example"
            ),
            hook=WebhookSink(name="hook", url=url, secret=SECRET),
        )
        store = MemoryStore()
        worker = AlertWorker(store, cfg)
        block(store)
        report = worker.run_once(T0 + 10)
        assert report.delivered == 2
        assert worker.run_once(T0 + 20).delivered == 0
        (mail,) = smtp.messages
        assert mail[1] == ["admin@contoso.example"]
        (request,) = hook.requests
        headers, body = request
        (row_id,) = {r.alert_id for r in store.alert_rows()}
        assert headers["Idempotency-Key"] == row_id
        assert verify(SECRET.encode(), headers["X-Domainpolicy-Signature"], body, now=time.time())


def test_500_twice_then_200_is_three_attempts_one_delivery() -> None:
    """A receiver that answers 500 twice then 200 gets the alert three times, same key; one row
    delivered with three attempts."""
    with http_receiver([500, 500]) as (hook, url):
        store = MemoryStore()
        worker = AlertWorker(
            store,
            config(hook=WebhookSink(name="hook", url=url, secret=SECRET)),
            rng=random.Random(1),
        )
        block(store)
        now = T0 + 10
        for _ in range(3):
            worker.run_once(now)
            now += 1000
        (row,) = store.alert_rows()
        assert row.status == DELIVERED
        assert row.attempts == 3
        assert len(hook.requests) == 3
        assert len({h["Idempotency-Key"] for h, _ in hook.requests}) == 1


def test_permanent_refusal_is_dead_then_retry_delivers() -> None:
    """A 4xx answer is the dead letter at once; retry makes it deliverable again."""
    with http_receiver([404]) as (_hook, url):
        store = MemoryStore()
        worker = AlertWorker(store, config(hook=WebhookSink(name="hook", url=url, secret=SECRET)))
        block(store)
        assert worker.run_once(T0 + 10).dead == 1
        (row,) = store.alert_rows(status=DEAD)
        assert "HTTP 404" in (row.last_error or "")
        assert store.retry_alert(row.id, T0 + 11)
        assert worker.run_once(T0 + 12).delivered == 1


def test_receiver_down_is_retried_then_dead_never_forever(caplog: pytest.LogCaptureFixture) -> None:
    """A receiver that is down is retried with backoff, logged, and dead after max_attempts."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    store = MemoryStore()
    worker = AlertWorker(
        store,
        config(
            hook=WebhookSink(name="hook", url=f"http://127.0.0.1:{port}/", secret=SECRET, timeout=1)
        ),
    )
    block(store)
    now = T0 + 10
    with caplog.at_level(logging.WARNING, logger="domainpolicy.alerts"):
        for _ in range(10):
            worker.run_once(now)
            now += 10_000
    (row,) = store.alert_rows()
    assert row.status == DEAD
    assert row.attempts == 4
    assert "ConnectionRefusedError" in (row.last_error or "")
    assert "dead letter" in caplog.text


def test_slow_receiver_times_out_and_is_retried() -> None:
    """A receiver slower than the timeout counts as a failed attempt, retried later."""
    with http_receiver(delay=2.0) as (_, url):
        store = MemoryStore()
        worker = AlertWorker(
            store, config(hook=WebhookSink(name="hook", url=url, secret=SECRET, timeout=0.3))
        )
        block(store)
        assert worker.run_once(T0 + 10).retried == 1
        (row,) = store.alert_rows()
        assert "timed out" in (row.last_error or "")


def test_smtp_relay_with_bad_tls_is_retried() -> None:
    """An SMTP relay that offers no STARTTLS when it is required is a failed attempt."""
    with smtp_receiver() as (smtp, port):
        store = MemoryStore()
        cfg = config(
            mail=SmtpSink(
                name="mail", host="127.0.0.1", port=port, sender="a@relay.example", timeout=2
            )
        )
        worker = AlertWorker(store, cfg)
        block(store)
        assert worker.run_once(T0 + 10).retried == 1
        assert smtp.messages == []


def test_decisions_do_not_wait_for_a_slow_sink() -> None:
    """With the worker thread stuck on a slow receiver, decisions go on at full speed."""
    with http_receiver(delay=3.0) as (_, url):
        store = MemoryStore()
        cfg = config(hook=WebhookSink(name="hook", url=url, secret=SECRET, timeout=5))
        worker = AlertWorker(store, cfg)
        block(store)
        worker.start()
        try:
            time.sleep(0.2)
            machine = BlockMachine(POLICY)
            started = time.perf_counter()
            for i in range(200):
                store.observe(machine, "other", T0 + i, registered=True, registrable=None)
            assert time.perf_counter() - started < 1.0
        finally:
            worker.stop(timeout=0.1)


# -------------------------------------------------------------------------- reminders


def test_reminders_every_interval_until_unblocked() -> None:
    """A blocked tenant gets one reminder per interval, from any number of workers, and none
    after it is unblocked."""
    store = MemoryStore()
    cfg = AlertsConfig(sinks={"log": LogSink(name="log")}, reminder_interval=3600)
    workers = [AlertWorker(store, cfg) for _ in range(3)]
    block(store)
    for w in workers:
        w.run_once(T0 + 100)
    assert [r.kind for r in store.alert_rows()] == ["blocked"]
    for w in workers:
        w.run_once(T0 + 5 + 3600 + 1)
        w.run_once(T0 + 5 + 3600 + 100)
    reminders = [r for r in store.alert_rows() if r.kind == "reminder"]
    assert len(reminders) == 1
    assert reminders[0].payload["reminder"] == 1
    machine = BlockMachine(POLICY)
    store.apply(
        "contoso",
        lambda s, at: machine.operator_suspend(s, at, by="ops", reason="x"),
        T0 + 4000,
        action="s",
    )
    store.apply(
        "contoso", lambda s, at: machine.attest(s, at, by="ops", note="x"), T0 + 4000, action="a"
    )
    assert len([r for r in store.alert_rows() if r.kind == "reminder"]) == 1


# -------------------------------------------------------------------------- configuration


def test_config_parses_sinks_and_contacts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full [alerts] table parses, secrets from the environment."""
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    cfg = parse_alerts(
        {
            "support": ["support@relay.example"],
            "reminder_interval": 1800,
            "tenants": {"contoso": {"admins": ["a@contoso.example"], "language": "ja"}},
            "sinks": {
                "mail": {
                    "type": "smtp",
                    "host": "smtp.example",
                    "port": 465,
                    "tls": "implicit",
                    "sender": "a@relay.example",
                    "kinds": ["blocked", "reminder"],
                },
                "hook": {
                    "type": "webhook",
                    "url": "https://hooks.example/x",
                    "secret_env": "HOOK_SECRET",
                    "tenants": ["contoso"],
                },
                "log": {"type": "log"},
            },
        }
    )
    assert cfg is not None
    assert set(cfg.sinks) == {"mail", "hook", "log"}
    assert cfg.contacts("contoso").language == "ja"
    assert cfg.route_kind("blocked", "contoso") == ("mail", "hook", "log")
    assert cfg.route_kind("unblocked", "fabrikam") == ("log",)


def test_bad_sinks_are_one_invalid_configuration() -> None:
    """A bad URL, a missing secret and a non-ASCII header value are reported together."""
    with pytest.raises(InvalidConfiguration) as info:
        parse_alerts(
            {
                "sinks": {
                    "a": {"type": "webhook", "url": "ftp://x", "secret": SECRET},
                    "b": {"type": "webhook", "url": "https://x.example/"},
                    "c": {
                        "type": "webhook",
                        "url": "https://x.example/",
                        "secret": SECRET,
                        "headers": {"X-T": "é"},
                    },
                    "d": {"type": "smtp", "host": "h", "sender": "a@b.example", "kinds": ["nope"]},
                }
            }
        )
    text = str(info.value)
    assert "ftp://x" in text
    assert "secret" in text
    assert "'é'" in text
    assert "nope" in text


def test_config_file_with_alerts(tmp_path: Path) -> None:
    """load_config reads the [alerts] table."""
    from domainpolicy import load_config

    path = tmp_path / "c.toml"
    path.write_text(
        '[tenants.contoso]\ndomains = ["contoso.example"]\n[alerts.sinks.log]\ntype = "log"\n',
        encoding="utf-8",
    )
    loaded = load_config(path)
    assert loaded.alerts is not None
    assert list(loaded.alerts.sinks) == ["log"]

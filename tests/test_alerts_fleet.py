"""Alerts across a fleet: four processes on one real Redis and on one SQLite file drive a tenant
past its limit at once, each running a delivery worker; a process killed after the transition
is stored and before delivery; the ``alerts`` commands."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from alert_receivers import http_receiver, smtp_receiver
from domainpolicy import BlockMachine, BlockPolicy, open_store
from domainpolicy._alerts import AlertsConfig, AlertWorker, SmtpSink, TenantContacts, WebhookSink
from domainpolicy._alerts.notice import verify
from domainpolicy._cli import main
from store_support import STORE_KINDS

POLICY = BlockPolicy(message_limit=40, domain_limit=40, max_tracked_domains=100, warn_fraction=1.0)
SECRET = "fleet-secret-fleet-secret"
KINDS = ["sqlite", "redis"]


def alerts_config(smtp_port: int, url: str) -> AlertsConfig:
    return AlertsConfig(
        sinks={
            "mail": SmtpSink(
                name="mail", host="127.0.0.1", port=smtp_port, tls="none", sender="a@relay.example"
            ),
            "hook": WebhookSink(name="hook", url=url, secret=SECRET),
        },
        tenants={"acme": TenantContacts(admins=("admin@acme.example",))},
        reminder_interval=0,
        poll_interval=0.05,
        backoff_base=0.1,
    )


def drive(store_url: str, smtp_port: int, hook_url: str, start: float) -> None:
    """One process of the fleet: observe unregistered mail at once, deliver, repeat."""
    store = open_store(store_url)
    worker = AlertWorker(store, alerts_config(smtp_port, hook_url))
    machine = BlockMachine(POLICY)
    while time.time() < start:
        time.sleep(0.001)
    for i in range(30):
        store.observe(machine, "acme", store.now(), registered=False, registrable=f"d{i}.example")
        worker.run_once()
    for _ in range(20):
        worker.run_once()
        time.sleep(0.02)
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_four_processes_one_notice_per_sink(kind: str, tmp_path: Path) -> None:
    """Four processes crossing the limit at once send exactly one blocked notice per sink."""
    url = STORE_KINDS[kind][0](tmp_path)
    with smtp_receiver() as (smtp, port), http_receiver() as (hook, hook_url):
        start = time.time() + 1.0
        procs = [
            multiprocessing.Process(target=drive, args=(url, port, hook_url, start))
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert len(smtp.messages) == 1
        assert len(hook.requests) == 1
        headers, body = hook.requests[0]
        assert verify(SECRET.encode(), headers["X-Domainpolicy-Signature"], body, now=time.time())
        assert json.loads(body)["kind"] == "blocked"
        with open_store(url) as store:
            rows = store.alert_rows()
        assert sorted((r.sink, r.status) for r in rows) == [
            ("hook", "delivered"),
            ("mail", "delivered"),
        ]


def block_then_die(store_url: str, smtp_port: int, hook_url: str) -> None:
    """Store the block (and its outbox rows), then die before any delivery."""
    store = open_store(store_url)
    store.route_alerts(alerts_config(smtp_port, hook_url).route)
    machine = BlockMachine(POLICY)
    for i in range(45):
        store.observe(machine, "acme", store.now(), registered=False, registrable=f"d{i}.example")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("kind", KINDS)
def test_killed_before_delivery_a_restarted_worker_delivers(kind: str, tmp_path: Path) -> None:
    """A process SIGKILLed after storing the block and before delivering it loses nothing."""
    url = STORE_KINDS[kind][0](tmp_path)
    with smtp_receiver() as (smtp, port), http_receiver() as (hook, hook_url):
        p = multiprocessing.Process(target=block_then_die, args=(url, port, hook_url))
        p.start()
        p.join(60)
        assert p.exitcode == -signal.SIGKILL
        assert smtp.messages == []
        with open_store(url) as store:
            worker = AlertWorker(store, alerts_config(port, hook_url))
            assert worker.run_once().delivered == 2
        assert len(smtp.messages) == 1
        assert len(hook.requests) == 1


def test_alerts_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """alerts test, deliver --once, list --failed and retry work on a configured store."""
    with http_receiver([404]) as (hook, hook_url):
        config = tmp_path / "c.toml"
        config.write_text(
            '[tenants.acme]\ndomains = ["acme.example"]\n'
            "[policy]\nmessage_limit = 40\ndomain_limit = 40\nwarn_fraction = 1.0\n"
            f'[alerts.sinks.hook]\ntype = "webhook"\nurl = "{hook_url}"\nsecret = "{SECRET}"\n',
            encoding="utf-8",
        )
        assert main(["alerts", "test", "--sink", "hook", "--config", str(config)]) == 1  # 404
        assert main(["alerts", "test", "--sink", "hook", "--config", str(config)]) == 0
        store_url = f"sqlite:{tmp_path / 'domainpolicy.sqlite3'}"
        with open_store(store_url) as store:
            store.route_alerts(lambda alert: ("hook",))
            machine = BlockMachine(POLICY)
            for i in range(45):
                store.observe(machine, "acme", store.now(), registered=False, registrable=f"d{i}.x")
        hook.statuses = [410]
        assert main(["alerts", "deliver", "--once", "--config", str(config)]) == 0
        capsys.readouterr()
        assert main(["alerts", "list", "--failed", "--json", "--config", str(config)]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        row = json.loads(line)
        assert row["status"] == "dead"
        assert "410" in row["last_error"]
        assert main(["alerts", "retry", row["id"], "--config", str(config)]) == 0
        assert main(["alerts", "deliver", "--once", "--config", str(config)]) == 0
        capsys.readouterr()
        assert main(["alerts", "list", "--failed", "--config", str(config)]) == 0
        assert capsys.readouterr().out == ""
        assert main(["alerts", "list", "--config", str(config)]) == 0
        assert "delivered" in capsys.readouterr().out

"""Two processes on one store: a registry change made in one is enforced by the other."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from domainpolicy import AcceptedDomain, InboundConnector, open_store
from domainpolicy._policy import RelayPolicy, RelayRequest
from domainpolicy._registry import RegistryChange
from domainpolicy._stores.registry_base import RegistryStore
from store_support import STORE_KINDS

SAFETY = 30.0  # a safety net against hangs, not an assertion about speed
KINDS = ["sqlite", "redis", "redis-cluster"]


def _enforcer(
    url: str, commands: multiprocessing.Queue[object], results: multiprocessing.Queue[object]
) -> None:
    """Decide with the registry, polling every 50 ms; for each (sender, reason) command, report
    when the decision for sender first has that reason."""
    store = open_store(url)
    policy = RelayPolicy.from_registry(store, poll_interval=0.05)
    results.put("ready")
    while True:
        command = commands.get(timeout=SAFETY)
        if command is None:
            break
        assert isinstance(command, tuple)
        sender, client_ip, reason = command
        deadline = time.monotonic() + SAFETY
        while policy.evaluate(RelayRequest(sender, client_ip)).reason != reason:
            if time.monotonic() > deadline:
                results.put(("timeout", sender))
                break
            time.sleep(0.001)
        else:
            results.put(("seen", sender, time.time()))
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_change_in_one_process_is_enforced_by_the_other(kind: str, tmp_path: Path) -> None:
    """Domains registered and removed, and a connector added, by this process are enforced by
    another process within a second (its poll interval is 50 ms)."""
    url = STORE_KINDS[kind][0](tmp_path)
    store = open_store(url)
    assert isinstance(store, RegistryStore)
    store.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("contoso.com", "contoso"))], actor="a", now=1.0
    )
    admin = RelayPolicy.from_registry(store)
    context = multiprocessing.get_context("spawn")
    commands: multiprocessing.Queue[object] = context.Queue()
    results: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(target=_enforcer, args=(url, commands, results))
    child.start()
    try:
        assert results.get(timeout=SAFETY) == "ready"
        steps: list[tuple[Callable[[], object], tuple[str, str | None, str]]] = [
            (lambda: admin.register_domain("contoso", "news.example", by="a"),
             ("x@news.example", None, "accepted_domain")),
            (lambda: admin.remove_domain("contoso", "news.example", by="a"),
             ("x@news.example", None, "no_tenant")),
            (lambda: admin.add_connector(
                InboundConnector("c1", "contoso", sender_ip_ranges=("198.51.100.0/24",)), by="a"),
             ("x@elsewhere.example", "198.51.100.9", "unregistered_allowed")),
        ]  # fmt: skip
        for change, command in steps:
            changed_at = time.time()
            change()
            commands.put(command)
            result = results.get(timeout=SAFETY)
            assert isinstance(result, tuple)
            assert result[0] == "seen", result
            assert result[2] - changed_at < 1.0, (command, result[2] - changed_at)
        commands.put(None)
        child.join(SAFETY)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        store.close()

"""Registry snapshots: start from a compiled registry and catch up with the changes since."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from domainpolicy import AcceptedDomain, InboundConnector, InvalidSnapshot, SQLiteStore
from domainpolicy._cli import EXIT_OK, EXIT_USAGE, main
from domainpolicy._policy import RelayPolicy, RelayRequest
from domainpolicy._registry import RegistryChange
from domainpolicy._registry_snapshot import snapshot_registry, view_from_snapshot
from test_cli_serve import CONFIG, SAFETY, ask, request

NOW = 1_800_000_000.0


def seeded(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store.registry_commit(
        [
            RegistryChange.add_domain(AcceptedDomain(f"d{i}.example", f"t{i % 7}"))
            for i in range(500)
        ]
        + [
            RegistryChange.add_connector(
                InboundConnector("c", "t0", sender_ip_ranges=("198.51.100.0/24",))
            )
        ],
        actor="seed",
        now=NOW,
    )
    return store


def test_a_snapshot_catches_up_to_the_same_registry(tmp_path: Path) -> None:
    """Snapshot at version 1, commits after it: the view from the snapshot equals the store's."""
    store = seeded(tmp_path / "s.db")
    snapshot = str(tmp_path / "registry.snap")
    assert snapshot_registry(store, snapshot).version == 1
    store.registry_commit(
        [
            RegistryChange.add_domain(AcceptedDomain("late.example", "t1")),
            RegistryChange.remove_domain(AcceptedDomain("d3.example", "t3")),
        ],
        actor="a",
        now=NOW,
    )
    other = SQLiteStore(tmp_path / "s.db")
    view = view_from_snapshot(snapshot, other)
    assert view.version == 2
    assert view.matcher == store.registry_view().matcher
    assert view.connectors == store.registry_view().connectors
    policy = RelayPolicy.from_registry(other, view=view)
    assert policy.evaluate(RelayRequest("a@late.example")).reason == "accepted_domain"
    assert policy.evaluate(RelayRequest("a@d3.example")).reason == "no_tenant"


def test_a_snapshot_of_another_registry_is_refused(tmp_path: Path) -> None:
    """A snapshot whose version record differs from the store's is refused, naming why."""
    snapshot = str(tmp_path / "registry.snap")
    snapshot_registry(seeded(tmp_path / "a.db"), snapshot)
    other = SQLiteStore(tmp_path / "b.db")
    with pytest.raises(InvalidSnapshot, match="is at version 0"):
        view_from_snapshot(snapshot, other)
    other.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("x.example", "t"))], actor="b", now=NOW
    )
    with pytest.raises(InvalidSnapshot, match="another store's registry"):
        view_from_snapshot(snapshot, other)


@pytest.mark.parametrize(
    ("damage", "rule"),
    [
        (lambda data: data[:-1], "checksum"),
        (lambda data: b"x" + data[1:], "not a registry snapshot"),
        (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum"),
    ],
)
def test_a_damaged_snapshot_is_refused(tmp_path: Path, damage: object, rule: str) -> None:
    """Truncated, foreign or flipped bytes: InvalidSnapshot naming the rule."""
    store = seeded(tmp_path / "s.db")
    snapshot = tmp_path / "registry.snap"
    snapshot_registry(store, str(snapshot))
    snapshot.write_bytes(damage(snapshot.read_bytes()))  # type: ignore[operator]
    with pytest.raises(InvalidSnapshot, match=rule):
        view_from_snapshot(str(snapshot), store)


def test_compile_writes_a_registry_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compile --registry URL -o FILE writes the registry's snapshot; a file and --registry
    together are a usage error."""
    seeded(tmp_path / "s.db")
    out = tmp_path / "registry.snap"
    code = main(["compile", "--registry", f"sqlite:{tmp_path / 's.db'}", "-o", str(out), "--json"])
    assert code == EXIT_OK
    record = json.loads(capsys.readouterr().out)
    assert (record["registry_version"], record["compiled"]) == (1, 500)
    assert main(["compile", "x.tsv", "--registry", "memory:", "-o", str(out)]) == EXIT_USAGE


def test_serve_starts_from_a_snapshot_and_follows_the_registry(tmp_path: Path) -> None:
    """serve --snapshot decides with the snapshot plus the changes since, and follows."""
    config = tmp_path / "tenants.toml"
    config.write_text(CONFIG)
    store = SQLiteStore(tmp_path / "state.sqlite3")
    store.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("snap.example", "contoso"))], actor="a", now=NOW
    )
    snapshot = str(tmp_path / "registry.snap")
    snapshot_registry(store, snapshot)
    store.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("after.example", "contoso"))], actor="a", now=NOW
    )
    sock = str(tmp_path / "policy.sock")
    argv = [sys.executable, "-m", "domainpolicy", "serve", "--config", str(config)]
    argv += ["--listen", f"unix:{sock}", "--snapshot", snapshot, "--registry-poll", "0.05"]
    with open(tmp_path / "serve.stderr", "wb") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
    try:
        assert process.stdout is not None
        assert process.stdout.readline(), (tmp_path / "serve.stderr").read_text()
        assert ask(sock, request("a@snap.example", "m1")) == "DUNNO"
        assert ask(sock, request("a@after.example", "m2")) == "DUNNO"
        assert ask(sock, request("a@contoso.example", "m3")).startswith("550 5.7.64 ")
    finally:
        process.kill()
        process.wait(SAFETY)
        assert process.stdout is not None
        process.stdout.close()

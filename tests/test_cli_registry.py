"""The registry on the command line: import/export/history, tenant commands, serve follows it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domainpolicy import open_store
from domainpolicy._cli import EXIT_INVALID, EXIT_OK, main
from domainpolicy._stores.registry_base import RegistryStore
from test_cli_serve import CONFIG, SAFETY, Child, ask, request

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def config(tmp_path: Path) -> str:
    target = tmp_path / "tenants.toml"
    shutil.copy(EXAMPLES / "tenants.toml", target)
    return str(target)


def store_of(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'domainpolicy-example.sqlite3'}"


def registry(url: str) -> RegistryStore:
    store = open_store(url)
    assert isinstance(store, RegistryStore)
    return store


def test_import_dry_run_prints_the_diff_and_writes_nothing(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run lists every change and leaves the registry empty."""
    code, text = run(capsys, "registry", "import", config, "--by", "op", "--dry-run")
    assert code == EXIT_OK
    assert "would change 6 entries" in text
    assert "+ domain contoso.co.uk (tenant contoso, authoritative, subdomains)" in text
    assert "+ connector contoso-onprem (tenant contoso: " in text
    assert registry(store_of(tmp_path)).registry_version() == 0


def test_import_then_export_round_trips(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """import writes one record; export re-imports into a fresh store to the same registry."""
    code, text = run(capsys, "registry", "import", config, "--by", "op", "--reason", "first")
    assert code == EXIT_OK
    assert "registry version 1" in text
    code, text = run(capsys, "registry", "import", config, "--by", "op")
    assert "changed 0 entries; registry version 1" in text
    exported = tmp_path / "export.toml"
    code, _ = run(capsys, "registry", "export", "--config", config, "-o", str(exported))
    assert code == EXIT_OK
    other = tmp_path / "other.sqlite3"
    code, _ = run(
        capsys, "registry", "import", str(exported), "--by", "op", "--store", f"sqlite:{other}"
    )
    assert code == EXIT_OK
    first = registry(store_of(tmp_path)).registry_view()
    second = registry(f"sqlite:{other}").registry_view()
    assert first.matcher == second.matcher
    assert first.connectors == second.connectors
    code, text = run(capsys, "registry", "history", "--config", config)
    assert text.startswith("version 1 at ")
    assert "by op: first" in text.splitlines()[0]


def test_import_refusal_lists_problems_and_exits_1(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file claiming another tenant's domain is refused whole, naming the owner."""
    run(capsys, "registry", "import", config, "--by", "op")
    clash = tmp_path / "clash.toml"
    clash.write_text('[tenants.mallory]\ndomains = ["contoso.com", "fine.example"]\n')
    code, text = run(
        capsys, "registry", "import", str(clash), "--by", "m", "--store", store_of(tmp_path)
    )
    assert code == EXIT_INVALID
    assert "already claimed by tenant 'contoso'" in text
    assert registry(store_of(tmp_path)).registry_view().matcher.tenant_of("fine.example") is None


def test_register_and_remove_domain_change_what_status_shows(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """tenant register-domain adds to the registry (status lists it, who added it);
    remove-domain removes it (status no longer lists it)."""
    base = ("--by", "alice", "--config", config)
    code, _ = run(
        capsys, "tenant", "register-domain", "contoso", "--domain", "contoso-news.com", *base
    )
    assert code == EXIT_OK
    code, text = run(capsys, "tenant", "status", "contoso", "--config", config)
    assert "    contoso-news.com -- added " in text
    assert "by alice (version 2)" in text
    code, text = run(capsys, "tenant", "remove-domain", "contoso", "--domain", "contoso.com", *base)
    assert code == EXIT_INVALID  # the connector's certificate name mail.contoso.com needs it
    assert "cannot be trusted" in text
    code, _ = run(
        capsys, "tenant", "remove-domain", "contoso", "--domain", "BÜCHER.example.", *base
    )
    assert code == EXIT_OK
    code, text = run(capsys, "tenant", "status", "contoso", "--config", config, "--json")
    status = json.loads(text)
    assert "xn--bcher-kva.example" not in status["accepted_domains"]
    assert "contoso-news.com" in status["accepted_domains"]


def test_a_connector_added_by_the_cli_is_on_the_next_blocks_checklist(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """tenant add-connector puts the connector on the checklist of the next block."""
    base = ("--by", "mallory", "--config", config)
    code, _ = run(
        capsys,
        "tenant",
        "add-connector",
        "fabrikam",
        "--connector",
        "sneaky",
        "--ip-range",
        "203.0.113.0/24",
        *base,
    )
    assert code == EXIT_OK
    run(capsys, "tenant", "block", "fabrikam", "--reason", "spam", *base)
    code, text = run(capsys, "tenant", "status", "fabrikam", "--config", config, "--json")
    missing = json.loads(text)["checklist"]["missing"]
    assert any("sneaky" in step for step in missing)
    assert json.loads(text)["connectors"] == ["sneaky"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Child]]:
    path = tmp_path / "tenants.toml"
    path.write_text(CONFIG)
    child = Child(path)
    try:
        yield path, child
    finally:
        child.close()


def test_serve_enforces_a_cli_registration_without_sighup(
    served: tuple[Path, Child], capsys: pytest.CaptureFixture[str]
) -> None:
    """register-domain while serve runs: the next request from that domain is accepted, with
    no SIGHUP (within the registry poll interval)."""
    path, child = served
    assert ask(child.socket, request("a@news.example", "m0")).startswith("550 5.7.64 ")
    code, _ = run(
        capsys,
        "tenant",
        "register-domain",
        "contoso",
        "--domain",
        "news.example",
        "--by",
        "ops",
        "--config",
        str(path),
    )
    assert code == EXIT_OK
    deadline = time.monotonic() + SAFETY
    started = time.monotonic()
    attempt = 0
    while ask(child.socket, request("a@news.example", f"m{attempt + 1}")) != "DUNNO":
        attempt += 1
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert time.monotonic() - started < 1.0 + 0.5  # enforced within a second (+ slack)

"""The performance page's plots are drawn from the committed benchmark JSON, which holds the
figures of the page's tables, and from exactly what the benchmarks write with ``--json``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
PAGE = ROOT / "docs" / "performance.md"


@pytest.fixture
def plots(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tools/gen_perf_plots.py, with tools/ and benchmarks/ on the path."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gen_perf_plots")


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return document


def test_pictures_are_up_to_date(plots: ModuleType) -> None:
    """Each committed picture equals its regeneration byte for byte (run
    python tools/gen_perf_plots.py if not), and the page shows each of them."""
    page = PAGE.read_text(encoding="utf-8")
    for path, text in plots.render_all().items():
        assert path.read_text(encoding="utf-8") == text, path.name
        assert f"](images/{path.name})" in page
    assert plots.main(["--check"]) == 0


def test_the_data_are_the_figures_of_the_tables() -> None:
    """Every figure a plot shows is in a table of the page, formatted as the table has it."""
    page = PAGE.read_text(encoding="utf-8")
    for record in _load("matcher.json")["results"]:
        for rate in record["lookups_per_s"].values():
            assert f" {rate:,} |" in page
    for record in _load("policy_server.json")["results"]:
        row = (
            f"| {record['server']} | {record['connections']} | {record['req_per_s']:,} "
            f"| {record['p50_ms']:.3f} | {record['p99_ms']:.3f} | {record['max_ms']:.3f} |"
        )
        assert row in page
    for record in _load("policy.json")["results"]:
        call = "evaluate" if record["batch"] is None else f"evaluate_many({record['batch']})"
        rates = " | ".join(f"{v:,}/s" for v in record["decisions_per_s"].values())
        assert f"| {record['store']} | {record['processes']} | `{call}` | {rates} |" in page


def test_plots_accept_what_the_benchmarks_write(
    plots: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny real matcher run and the records the server and policy benchmarks build go
    through ``--json``'s writer and are drawn, every contender, server and store a series."""
    support = importlib.import_module("_support")
    matcher = importlib.import_module("bench_matcher")
    server = importlib.import_module("bench_policy_server")
    policy = importlib.import_module("bench_policy")
    records = [matcher.run(300, 400, 1), matcher.run(600, 400, 1)]
    capsys.readouterr()
    latencies = [0.001 * (1 + i % 7) for i in range(200)]
    documents = {
        "matcher": records,
        "server": [
            server.level_record(name, connections, 0.5, latencies)
            for name in ("memory", "sqlite", "sqlite-nobatch")
            for connections in (1, 10)
        ],
        "policy": [
            policy.row_record(
                store, processes, size, {kind: 1000.0 + size for kind, _ in policy.KINDS}
            )
            for store, processes in (("memory", 1), ("sqlite", 2))
            for size in (0, 1, 16)
        ],
    }
    drawn = {}
    for name, results in documents.items():
        path = tmp_path / f"{name}.json"
        support.write_json(str(path), f"bench_{name}", results)
        document = json.loads(path.read_text(encoding="utf-8"))
        assert document["results"] == json.loads(json.dumps(results))
        assert {"benchmark", "command", "measured", "python", "source"} <= set(document)
        drawn[name] = document
    svg = plots.matcher_plot(drawn["matcher"])
    for contender in records[0]["lookups_per_s"]:
        assert f": {contender}: 300 -&gt; " in svg
    svg = plots.server_plot(drawn["server"])
    for name in ("memory", "sqlite", "sqlite-nobatch"):
        assert f"throughput: {name}: 1 -&gt; 400" in svg
    svg = plots.batch_plot(drawn["policy"])
    assert "refuse: sqlite, 2 processes: 1 -&gt; 1,001, 16 -&gt; 1,016" in svg

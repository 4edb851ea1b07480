"""Smoke runs of the matcher benchmark at a tiny size, so that the script the performance
figures come from keeps working (its own checks, that every contender answers as ours does,
run here too)."""

from __future__ import annotations

import importlib
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
MATCHER_SOURCE = BENCHMARKS.parent / "src" / "domainpolicy" / "_matcher.py"


@pytest.fixture
def bench_matcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("bench_matcher")
    sys.modules.pop("domainpolicy._matcher_before", None)


def test_matcher_benchmark_runs_side_by_side_with_a_before_version(
    bench_matcher: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """At N = 300 the benchmark checks every contender's answers, then prints the lookup
    table, the compile/load/memory table with the before and floor rows, and the memory line."""
    module = bench_matcher
    before = module.load_before(str(MATCHER_SOURCE))
    module.run(300, 400, 1, before)
    out = capsys.readouterr().out
    assert "### N = 300 (tenants: " in out
    for row in (
        "| ours raw |",
        "| nested key |",
        "| compact key |",
        "| before key |",
        "| naive endswith |",
    ):
        assert row in out
    assert "| ours | " in out
    assert "| before | " in out
    assert "| floor: a dict of the keys |" in out
    assert "| compact (not taken) |" in out
    assert "nested / ours = " in out


def test_generated_sets_are_deterministic_and_shaped_as_documented(bench_matcher: Any) -> None:
    """The seeded generator gives the same entries twice, with IDN names, wildcards, entries
    matching subdomains and nested names; the query mix has hits, misses and raw spellings."""
    module = bench_matcher
    first = module.generate(2000)
    assert first == module.generate(2000)
    assert len(first) == len({entry.domain for entry in first}) == 2000
    idn = sum(not entry.domain.isascii() for entry in first) / len(first)
    subdomains = sum(entry.match_subdomains for entry in first) / len(first)
    wildcards = sum(entry.domain.startswith("*.") for entry in first)
    assert 0.02 < idn < 0.09
    assert 0.45 < subdomains < 0.7
    assert wildcards > 0
    assert {entry.domain.count(".") for entry in first} >= {1, 2}
    queries = module.queries(first, 2000)
    assert any(query.endswith(".") for query in queries)
    assert any(query != query.lower() for query in queries)
    assert any(query.startswith("evil") for query in queries)


def test_compact_table_round_trips_and_refuses_a_corrupt_snapshot(bench_matcher: Any) -> None:
    """The compact layout answers as our matcher does, before and after a snapshot round trip,
    and a flipped byte fails its checksum."""
    module = bench_matcher
    compact_table = importlib.import_module("compact_table")
    entries = module.generate(500)
    rows = module.canonical(entries)
    table = compact_table.CompactTable.build(rows)
    data = table.to_bytes()
    loaded = compact_table.CompactTable.from_bytes(data)
    matcher = module.DomainMatcher.compile(entries)
    keys = [row[0] for row in rows] + [f"x.{row[0]}" for row in rows] + ["absent.example"]
    for key in keys:
        owner = matcher.owner_of_normalized(key)
        expected = None if owner is None else owner.tenant
        assert table.tenant(key) == loaded.tenant(key) == expected, key
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        compact_table.CompactTable.from_bytes(bytes(broken))


def test_replay_benchmark_runs_both_ways(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replay benchmark generates its bursty log and replays it batched and alone."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("bench_replay")
    monkeypatch.setattr(
        sys, "argv", ["bench_replay.py", "--events", "120", "--burst", "10", "--rounds", "1"]
    )
    module.main()
    out = capsys.readouterr().out
    assert "| batched |" in out
    assert "| alone |" in out
    assert "batched / alone: " in out

"""Benchmark the accepted-domain matcher against baselines, side by side in one process per N.

Usage::

    python benchmarks/bench_matcher.py                      # N = 1k, 100k, 1M
    python benchmarks/bench_matcher.py --sizes 1000,100000  # choose N
    python benchmarks/bench_matcher.py --10m                # also N = 10M (~12 GB, ~15 minutes)

Columns: lookups/s (median of repeats) on the same raw query mix for our `DomainMatcher.lookup`
("ours raw": validates and normalises), the flat label walk and the nested-dict trie baselines
fed ``normalize_domain(query)`` ("end to end"); then the structures alone on pre-normalised
keys ("ours key" = `owner_of_normalized`); publicsuffix2 ``get_sld`` and tldextract (offline)
as the PSL-library reference; a naive ``endswith`` loop at N <= 1k.  Every contender's answers
are checked against ours before timing.

``--before PATH`` also loads another version of ``_matcher.py`` (for example the file as it was
before a change, copied out of git) and measures it in the same process on the same entries and
queries: its compile, snapshot load, lookups and memory appear as "before" rows, side by side.
Its compile runs with the IDN shortcuts of ``normalize_domain`` switched off, as they were
before they existed, so the "before" compile is the whole earlier cost.

The "compact" rows are the layout we did not take (``compact_table.py``): names in one blob and
a CRC-32 open-addressing table in ``array`` columns, no object per name.  Its snapshot load,
memory and key lookups are measured on the same entries and queries, so the trade-off between
the targets is shown, not argued.

The "floor" row is what any layout built on a ``dict`` of name strings pays at least, measured in
the same run: splitting a blob of the keys and building ``dict(zip(names, values))``, and the
bytes of those strings plus the dict.

Memory is reported two ways: "deep" is the sum of ``sys.getsizeof`` over every object reachable
from the lookup structure (an estimate, used for all contenders); "traced" is what
``tracemalloc`` sees allocated and still alive after ``DomainMatcher.load`` (exact allocator
bytes of a matcher that owns all its objects, tenant ids included; ours only).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from itertools import repeat
from types import ModuleType
from typing import Any

from _support import old_path, write_json
from compact_table import CompactTable
from domainpolicy import AcceptedDomain, DomainMatcher, DomainType, normalize_domain
from domainpolicy._names import clear_cache
from domainpolicy._psl import default_public_suffixes

SUFFIXES = (
    ["com"] * 30
    + ["net"] * 8
    + ["org"] * 8
    + ["de"] * 6
    + ["co.uk"] * 6
    + [
        "com.au",
        "co.jp",
        "fr",
        "nl",
        "io",
        "jp",
        "ru",
        "com.br",
        "ca",
        "it",
        "es",
        "ch",
    ]
)
IDN_LABELS = ["bücher", "münchen", "café", "пример", "例え", "straße", "ñandú", "élan"]
SUBS = ["mail", "eu", "us", "sales", "hr", "mx", "corp", "dev", "shop", "it"]


def label(rnd: random.Random) -> str:
    size = rnd.randint(3, 12)
    return (
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size)).lstrip(
            "0123456789"
        )
        or "x"
    )


def generate(n: int, seed: int = 7) -> list[AcceptedDomain]:
    """N seeded entries: 2-4 labels, ~5% IDN, ~60% match_subdomains, nested entries, tenants
    with 1 to ~50 domains (geometric-ish), a few wildcards."""
    rnd = random.Random(seed)
    entries: list[AcceptedDomain] = []
    seen: set[str] = set()
    tenant_no = 0
    left = 0
    while len(entries) < n:
        if left <= 0:
            tenant_no += 1
            left = min(50, int(rnd.expovariate(1 / 5)) + 1)
        base = (rnd.choice(IDN_LABELS) + label(rnd)) if rnd.random() < 0.05 else label(rnd)
        name = f"{base}{tenant_no}.{rnd.choice(SUFFIXES)}"
        if rnd.random() < 0.15:  # nested entry (a delegated subdomain or a deeper name)
            name = f"{rnd.choice(SUBS)}.{name}"
        if name in seen:
            continue
        seen.add(name)
        tenant = f"tenant-{tenant_no:07d}"
        if rnd.random() < 0.03:
            entries.append(AcceptedDomain(f"*.{name}", tenant, DomainType.INTERNAL_RELAY))
        else:
            entries.append(
                AcceptedDomain(name, tenant, DomainType.AUTHORITATIVE, rnd.random() < 0.6)
            )
        left -= 1
    return entries


def queries(entries: list[AcceptedDomain], count: int, seed: int = 11) -> list[str]:
    """50% hits (exact and subdomain), 50% misses (near misses, parents, other TLD, random),
    with mixed case and trailing dots."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        entry = rnd.choice(entries)
        name = entry.domain.removeprefix("*.")
        roll = rnd.random()
        if roll < 0.25 and not entry.domain.startswith("*."):
            q = name
        elif roll < 0.5:
            q = f"{rnd.choice(SUBS)}.{name}"
        elif roll < 0.6:
            q = "evil" + name
        elif roll < 0.7:
            q = name.partition(".")[2] if name.count(".") > 1 else "x" + name
        elif roll < 0.8:
            q = name.rpartition(".")[0] + ".example"
        else:
            q = f"{label(rnd)}.{label(rnd)}.{rnd.choice(SUFFIXES)}"
        if rnd.random() < 0.3:
            q = q.upper() if rnd.random() < 0.5 else q.title()
        if rnd.random() < 0.2:
            q += "."
        out.append(q)
    return out


# ------------------------------------------------------------------------------ baselines


def canonical(entries: list[AcceptedDomain]) -> list[tuple[str, bool, bool, str]]:
    """(key, wildcard, match_subdomains, tenant) per entry."""
    out: list[tuple[str, bool, bool, str]] = []
    for e in entries:
        wildcard = e.domain.startswith("*.")
        out.append(
            (
                normalize_domain(e.domain[2:] if wildcard else e.domain),
                wildcard,
                e.match_subdomains,
                e.tenant,
            )
        )
    return out


class FlatLabelWalk:
    """Flat dicts keyed by domain; split into labels and join each suffix."""

    def __init__(self, rows: list[tuple[str, bool, bool, str]]) -> None:
        self.apex: dict[str, str] = {}
        self.below: dict[str, str] = {}
        for key, wildcard, subs, tenant in rows:
            if not wildcard:
                self.apex[key] = tenant
            if wildcard or subs:
                self.below[key] = tenant

    def tenant(self, key: str) -> str | None:
        found = self.apex.get(key)
        if found is not None:
            return found
        labels = key.split(".")
        below = self.below
        for i in range(1, len(labels) - 1):
            found = below.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None


class NestedTrie:
    """One dict per label, walked from the right; '' holds the apex tenant, '*' the below one."""

    def __init__(self, rows: list[tuple[str, bool, bool, str]]) -> None:
        self.root: dict[str, object] = {}
        for key, wildcard, subs, tenant in rows:
            node = self.root
            for part in reversed(key.split(".")):
                node = node.setdefault(part, {})  # type: ignore[assignment]
            if not wildcard:
                node[""] = tenant
            if wildcard or subs:
                node["*"] = tenant

    def tenant(self, key: str) -> str | None:
        node = self.root
        best: str | None = None
        labels = key.split(".")
        last = len(labels) - 1
        for i in range(last, -1, -1):
            child = node.get(labels[i])
            if child is None:
                return best
            node = child  # type: ignore[assignment]
            if i:
                below = node.get("*")
                if below is not None:
                    best = below  # type: ignore[assignment]
        apex = node.get("")
        found = apex if apex is not None else best
        return found if isinstance(found, str) else None


def naive(rows: list[tuple[str, bool, bool, str]]) -> Callable[[str], str | None]:
    def tenant(key: str) -> str | None:
        best = None
        size = -1
        for k, wildcard, subs, t in rows:
            if len(k) > size and (
                (key == k and not wildcard) or ((wildcard or subs) and key.endswith("." + k))
            ):
                best, size = t, len(k)
        return best

    return tenant


def deep_size(root: object) -> int:
    """Bytes of every object reachable from *root* (each counted once), ignoring classes,
    modules, functions and the immortal-ish singletons."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    skip = (type, type(sys), type(deep_size))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (*skip, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, DomainType) or type(obj).__name__ == "MatchKind":
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(type(obj), "__slots__"):
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    return total


def dict_floor(keys: list[str], repeats: int = 3) -> tuple[float, int]:
    """What any dict-of-names layout pays at least, on this machine, in this run: the median
    seconds to split a blob of the keys and build ``dict(zip(names, values))`` (values one
    shared object), and the bytes of those name strings plus the dict itself."""
    blob = "\n".join(keys).encode("ascii")
    value = (None, None)
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        names = blob.decode("ascii").split("\n")
        table = dict(zip(names, repeat(value)))
        times.append(time.perf_counter() - start)
        gc.enable()
        size = sys.getsizeof(table) + sum(map(sys.getsizeof, names))
        del names, table
    return statistics.median(times), size


def rate(fn: Callable[[str], object], items: list[str], repeats: int) -> float:
    """Median lookups/s over *repeats* passes."""
    return rates({"": (fn, items)}, repeats)[""]


def rates(
    contenders: dict[str, tuple[Callable[[str], object], list[str]]], repeats: int
) -> dict[str, float]:
    """Median lookups/s of each contender over *repeats* rounds; each round times one pass of
    every contender in turn, so a change of machine load hits all of them alike."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (fn, items) in contenders.items():
            gc.collect()
            start = time.perf_counter()
            for q in items:
                fn(q)
            results[name].append(len(items) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in results.items()}


def timed_compact_load(data: bytes, repeats: int = 3) -> tuple[float, CompactTable]:
    """Median seconds of *repeats* `CompactTable.from_bytes` calls, and the last table."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        table = CompactTable.from_bytes(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times), table


def load_before(path: str) -> ModuleType:
    """Import another version of ``_matcher.py`` as ``domainpolicy._matcher_before``."""
    spec = importlib.util.spec_from_file_location("domainpolicy._matcher_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed_load(cls: Any, path: str, repeats: int = 3) -> tuple[float, object]:
    """Median seconds of *repeats* ``cls.load(path)`` calls, and the last matcher loaded."""
    times = []
    loaded = None
    for _ in range(repeats):
        del loaded
        gc.collect()
        start = time.perf_counter()
        loaded = cls.load(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times), loaded


def traced_bytes(cls: Any, path: str) -> int:
    """Bytes allocated and kept by ``cls.load(path)``, measured with tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loaded = cls.load(path)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del loaded
    return kept


def run(n: int, query_count: int, repeats: int, before: ModuleType | None = None) -> dict[str, Any]:
    """Measure every contender at size *n*, print the tables, and return the record that
    ``--json`` writes: ``{"n", "lookups_per_s": {contender: rate}}``."""
    entries = generate(n)
    qs = queries(entries, query_count)
    # Both versions compile with cold name caches (IDN labels are converted once per process).
    clear_cache()
    gc.collect()
    start = time.perf_counter()
    matcher = DomainMatcher.compile(entries)
    compile_s = time.perf_counter() - start
    old_matcher: Any = None
    if before is not None:
        old_entries = [
            before.AcceptedDomain(
                e.domain, e.tenant, before.DomainType(e.domain_type.value), e.match_subdomains
            )
            for e in entries
        ]
        clear_cache()
        gc.collect()
        with old_path():  # before this change, every IDN name went through idna
            start = time.perf_counter()
            old_matcher = before.DomainMatcher.compile(old_entries)
            old_compile_s = time.perf_counter() - start
        clear_cache()
        del old_entries
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "m.snapshot")
        matcher.save(path)
        snapshot_bytes = os.path.getsize(path)
        load_s, loaded = timed_load(DomainMatcher, path)
        assert loaded == matcher
        del loaded
        traced = traced_bytes(DomainMatcher, path)
        if before is not None:
            old_snapshot = os.path.join(directory, "old.snapshot")
            old_matcher.save(old_snapshot)
            old_snapshot_bytes = os.path.getsize(old_snapshot)
            old_load_s, loaded = timed_load(before.DomainMatcher, old_snapshot)
            del loaded
            old_traced = traced_bytes(before.DomainMatcher, old_snapshot)
    floor_s, floor_bytes = dict_floor(list(matcher._table))
    rows = canonical(entries)
    keys: list[str] = []
    valid = []
    for q in qs:
        try:
            keys.append(normalize_domain(q))
            valid.append(q)
        except ValueError:
            continue
    flat = FlatLabelWalk(rows)
    nested = NestedTrie(rows)
    compact_bytes = CompactTable.build(rows).to_bytes()
    compact_load_s, compact = timed_compact_load(compact_bytes)

    def ours_key(key: str) -> str | None:
        owner = matcher.owner_of_normalized(key)  # type: ignore[arg-type]
        return None if owner is None else owner.tenant

    # identical answers before timing
    for key in keys:
        expected = ours_key(key)
        assert flat.tenant(key) == expected, key
        assert nested.tenant(key) == expected, key
        assert compact.tenant(key) == expected, key
        if old_matcher is not None:
            old_owner = old_matcher.owner_of_normalized(key)
            assert (None if old_owner is None else old_owner.tenant) == expected, key
    contenders: dict[str, tuple[Callable[[str], object], list[str]]] = {
        "ours raw": (matcher.lookup, valid),
        "flat raw": (lambda q: flat.tenant(normalize_domain(q)), valid),
        "nested raw": (lambda q: nested.tenant(normalize_domain(q)), valid),
        "ours key": (matcher.owner_of_normalized, keys),  # type: ignore[dict-item]
        "flat key": (flat.tenant, keys),
        "nested key": (nested.tenant, keys),
        "compact key": (compact.tenant, keys),
    }
    if old_matcher is not None:
        contenders["before raw"] = (old_matcher.lookup, valid)
        contenders["before key"] = (old_matcher.owner_of_normalized, keys)
    if n <= 1000:
        slow = naive(rows)
        assert all(slow(k) == ours_key(k) for k in keys[:200])
        contenders["naive endswith"] = (slow, keys[:2000])
    try:
        import publicsuffix2

        contenders["publicsuffix2 get_sld"] = (publicsuffix2.get_sld, keys)
    except ImportError:  # pragma: no cover
        pass
    try:
        import tldextract

        extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        contenders["tldextract"] = (extract, keys[: max(2000, len(keys) // 5)])
    except ImportError:  # pragma: no cover
        pass
    measured = rates(contenders, repeats)
    sizes = {
        "ours": deep_size(matcher._table),
        "flat": deep_size((flat.apex, flat.below)),
        "nested": deep_size(nested.root),
    }
    if old_matcher is not None:
        sizes["before"] = deep_size(old_matcher._table)
    print(f"\n### N = {n:,} (tenants: {len(matcher.tenants()):,}, queries: {len(qs):,})\n")
    print("| contender | lookups/s | ours / it |")
    print("|---|---:|---:|")
    for name, value in measured.items():
        ref = measured["ours raw"] if "raw" in name or "ours" not in name else measured["ours key"]
        if name.endswith("key") or name == "naive endswith":
            ref = measured["ours key"]
        print(f"| {name} | {value:,.0f} | {ref / value:.2f}x |")
    print()
    print(
        "| version | compile | snapshot load | snapshot bytes/domain "
        "| memory bytes/domain, deep | memory bytes/domain, traced |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| ours | {compile_s:.3f} s | {load_s:.3f} s | {snapshot_bytes / n:.1f} "
        f"| {sizes['ours'] / n:.1f} | {traced / n:.1f} |"
    )
    if before is not None:
        print(
            f"| before | {old_compile_s:.3f} s | {old_load_s:.3f} s "
            f"| {old_snapshot_bytes / n:.1f} | {sizes['before'] / n:.1f} "
            f"| {old_traced / n:.1f} |"
        )
    print(
        f"| compact (not taken) | | {compact_load_s:.3f} s | {len(compact_bytes) / n:.1f} "
        f"| {compact.size() / n:.1f} | |"
    )
    print(f"| floor: a dict of the keys | | {floor_s:.3f} s | | {floor_bytes / n:.1f} | |")
    print()
    print(
        "memory, bytes per domain (deep size of the lookup structure): "
        + ", ".join(f"{name} {value / n:.1f}" for name, value in sizes.items())
        + f"; nested / ours = {sizes['nested'] / sizes['ours']:.2f}x"
    )
    return {"n": n, "lookups_per_s": {name: round(value) for name, value in measured.items()}}


def disposable(repeats: int) -> None:
    """The real-world set: every domain of the disposable-email-domains package."""
    from disposable_email_domains import blocklist

    entries = [AcceptedDomain(d, "disposable", match_subdomains=True) for d in sorted(blocklist)]
    start = time.perf_counter()
    try:
        matcher = DomainMatcher.compile(entries)
    except ValueError as exc:
        # the list holds a few public suffixes; drop exactly the refused ones and say so
        bad = {p.split(" ")[1] for p in exc.problems}  # type: ignore[attr-defined]
        entries = [e for i, e in enumerate(entries) if f"#{i}" not in bad]
        print(f"\n(disposable-email-domains: {len(bad)} entries refused by compile, dropped)")
        start = time.perf_counter()
        matcher = DomainMatcher.compile(entries)
    compile_s = time.perf_counter() - start
    qs = queries(entries, 50_000)
    print(f"\n### disposable-email-domains ({len(entries):,} entries)\n")
    print(
        f"ours raw: {rate(matcher.lookup, qs, repeats):,.0f} lookups/s; compile {compile_s:.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--10m", dest="ten_million", action="store_true")
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--before", metavar="PATH", help="another _matcher.py to measure side by side"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write the lookups/s of every contender per N here"
    )
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.ten_million:
        sizes.append(10_000_000)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    default_public_suffixes()  # built once per process, outside every timing
    results = []
    for n in sizes:
        results.append(run(n, args.queries, args.repeats, before))
        gc.collect()
    if args.json:
        write_json(args.json, "bench_matcher", results)
    disposable(args.repeats)


if __name__ == "__main__":
    main()

"""Benchmark: domain normalisation and address parsing against idna and the standard library.

Run: ``python benchmarks/bench_names.py`` (``--quick`` for a short run).  Every figure is the
median of several repeats measured in the same process, so the ratios are side by side.
"""

from __future__ import annotations

import argparse
import email.utils
import random
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence

import idna

from _support import old_path
from domainpolicy import normalize_domain, parse_address
from domainpolicy._names import _CACHE_SIZE, _normalize_uncached, _plain_mapping, clear_cache

ASCII = [f"mail{i}.example{i % 97}.com" for i in range(1000)]
MIXED = [f"Mail{i}.Example{i % 97}.COM." for i in range(1000)]
IDN = [f"bücher{i}.beispiel{i % 97}.de" for i in range(1000)]
ADDRESSES = [f"<user{i}@mail{i}.example.com>" for i in range(1000)]
IDN_ADDRESSES = [f"<ü{i}@bücher{i}.example>" for i in range(1000)]


def rate(
    function: Callable[[str], object], inputs: Sequence[str], repeats: int, rounds: int
) -> float:
    """Median calls per second over *repeats* timed runs of *rounds* passes over *inputs*."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(rounds):
            for item in inputs:
                function(item)
        samples.append(len(inputs) * rounds / (time.perf_counter() - started))
    return statistics.median(samples)


def clear_caches() -> None:
    clear_cache()


def unique_stream(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}.example.com" for i in range(count)]


def uncached(function: Callable[[str], object]) -> Callable[[str], object]:
    def run(text: str) -> object:
        clear_caches()
        return function(text)

    return run


def rate_cold(function: Callable[[str], object], inputs: Sequence[str], repeats: int) -> float:
    """Median calls per second over *repeats* passes over *inputs*, caches cleared before each."""
    samples = []
    for _ in range(repeats):
        clear_caches()
        started = time.perf_counter()
        for item in inputs:
            function(item)
        samples.append(len(inputs) / (time.perf_counter() - started))
    return statistics.median(samples)


def idn_names(count: int, seed: int = 2026) -> list[str]:
    """*count* distinct IDN names: accented words with an ASCII tail under Latin ccTLDs (some
    capitalised), Cyrillic under .рф or .com, Japanese and Chinese under .jp, Greek under .gr."""
    rng = random.Random(seed)
    latin = [
        "bücher",
        "münchen",
        "straße",
        "café",
        "élan",
        "ñandú",
        "zürich",
        "köln",
        "größe",
        "français",
        "håndværk",
        "smørrebrød",
        "łódź",
        "čeština",
        "açaí",
        "über",
    ]
    tlds = ["de", "at", "ch", "fr", "es", "com", "eu", "dk", "pl"]
    cyrillic = "абвгдежзийклмнопрстуфхцчшщыэюя"
    cjk = "日本語例会社東京中文网络公司商店テストドメインメールみんなのひろば"
    greek = "αβγδεζηθικλμνξοπρστυφχψω"
    tail_chars = string.ascii_lowercase + string.digits
    names: dict[str, None] = {}
    while len(names) < count:
        kind = rng.random()
        tail = "".join(rng.choices(tail_chars, k=rng.randint(2, 8)))
        if kind < 0.5:
            name = f"{rng.choice(latin)}-{tail}.{rng.choice(tlds)}"
        elif kind < 0.6:
            name = f"Mail.{rng.choice(latin).capitalize()}{tail}.{rng.choice(tlds).upper()}"
        elif kind < 0.75:
            word = "".join(rng.choices(cyrillic, k=rng.randint(4, 12)))
            name = f"{word}.рф" if kind < 0.7 else f"{tail}.{word}.com"
        elif kind < 0.9:
            name = "".join(rng.choices(cjk, k=rng.randint(2, 6))) + ".jp"
        else:
            name = "".join(rng.choices(greek, k=rng.randint(4, 10))) + f"{tail}.gr"
        names[name] = None
    return list(names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    repeats, rounds = (3, 3) if args.quick else (7, 10)

    rows: list[tuple[str, float]] = []

    def row(name: str, value: float) -> float:
        rows.append((name, value))
        print(f"{name:55s} {value:>14,.0f} /s", flush=True)
        return value

    print(f"Python {sys.version.split()[0]}, idna {idna.__version__}, cache size {_CACHE_SIZE}")
    ref_idna = row(
        "idna.encode(uts46=True)  ASCII",
        rate(lambda s: idna.encode(s, uts46=True), ASCII, repeats, 1),
    )
    ref_idna_idn = row(
        "idna.encode(uts46=True)  IDN", rate(lambda s: idna.encode(s, uts46=True), IDN, repeats, 1)
    )
    ref_codec = row(
        'str.encode("idna") (IDNA 2003)  ASCII',
        rate(lambda s: s.encode("idna"), ASCII, repeats, rounds),
    )
    clear_caches()
    ascii_cached = row(
        "normalize_domain  ASCII (repeated set, cached)",
        rate(normalize_domain, ASCII, repeats, rounds),
    )
    mixed_cached = row(
        "normalize_domain  mixed case + dot (cached)",
        rate(normalize_domain, MIXED, repeats, rounds),
    )
    stream = unique_stream("host", 200_000)
    ascii_unique = row(
        "normalize_domain  ASCII unique stream (cache misses)",
        rate(normalize_domain, stream, max(3, repeats // 2), 1),
    )
    ascii_path = row(
        "  ASCII path alone, no cache", rate(_normalize_uncached, ASCII, repeats, rounds)
    )
    clear_caches()
    idn_cached = row("normalize_domain  IDN (cached)", rate(normalize_domain, IDN, repeats, rounds))
    idn_uncached = row(
        "normalize_domain  IDN (uncached)", rate(uncached(normalize_domain), IDN, repeats, 1)
    )
    idn_stream = idn_names(20_000)
    plain = sum(_plain_mapping(name) is not None for name in idn_stream) / len(idn_stream)
    idn_unique = row(
        "normalize_domain  IDN unique stream (cache misses)",
        rate_cold(normalize_domain, idn_stream, repeats),
    )
    with old_path():
        idn_unique_old = row(
            "  same, old path (idna for every IDN name)",
            rate_cold(normalize_domain, idn_stream, repeats),
        )
    row("email.utils.parseaddr  ASCII", rate(email.utils.parseaddr, ADDRESSES, repeats, rounds))
    parse_ref = rows[-1][1]
    row(
        "parse_address  ASCII (repeated set, cached)",
        rate(parse_address, ADDRESSES, repeats, rounds),
    )
    parse_ours = rows[-1][1]
    unique_addresses = [f"<user{i}@host{i}.example.com>" for i in range(200_000)]
    parse_unique = row(
        "parse_address  ASCII unique stream (cache misses)",
        rate(parse_address, unique_addresses, max(3, repeats // 2), 1),
    )
    row(
        "parse_address  SMTPUTF8 (cached domains)",
        rate(parse_address, IDN_ADDRESSES, repeats, rounds),
    )

    print()
    print("ratios (ours / reference, same run):")
    print(f"  ASCII cached   vs idna.encode: {ascii_cached / ref_idna:8.1f}x   (target >= 100x)")
    print(f"  mixed cached   vs idna.encode: {mixed_cached / ref_idna:8.1f}x")
    print(
        f"  ASCII unique   vs idna.encode: {ascii_unique / ref_idna:8.1f}x   (every call a cache miss)"
    )
    print(f"  ASCII path     vs idna.encode: {ascii_path / ref_idna:8.1f}x   (no cache at all)")
    print(f"  ASCII cached   vs IDNA 2003 codec: {ascii_cached / ref_codec:6.2f}x")
    print(
        f"  IDN cached     vs idna.encode: {idn_cached / ref_idna_idn:8.1f}x   ({idn_cached / 1e6:.2f}M/s; target >= 2M/s)"
    )
    print(f"  IDN uncached   vs idna.encode: {idn_uncached / ref_idna_idn:8.2f}x")
    print(
        f"  IDN unique     vs old path:    {idn_unique / idn_unique_old:8.2f}x   ({len(idn_stream):,} distinct names, {plain:.0%} plain to map, every call a cache miss)"
    )
    print(
        f"  parse_address cached vs parseaddr: {parse_ours / parse_ref:6.2f}x   (parseaddr validates nothing)"
    )
    print(
        f"  parse_address unique vs parseaddr: {parse_unique / parse_ref:6.2f}x   (every call a cache miss)"
    )

    return 0


if __name__ == "__main__":
    raise SystemExit(main())

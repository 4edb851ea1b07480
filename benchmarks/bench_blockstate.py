"""Observations per second on the pure block-state machine (issue 4; target >= 300k/s accept path).

Run: ``python benchmarks/bench_blockstate.py`` (``--quick`` for a short run).

Each row is the best of several repeats of a tight loop calling ``BlockMachine.observe`` and
unpacking its ``(state, effects)`` result, loop overhead included.  For comparison the script
also times what the rejected fully-immutable design would cost per observation (one attrs
``evolve`` of the tenant state) and the store path (``to_dict`` + ``from_dict``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import attrs

from domainpolicy import BlockMachine, BlockPolicy, State, TenantState, Verdict

T0 = 1_750_000_000.0
DOMAINS = [f"forwarded{i}.example" for i in range(20)]


def best_rate(loop: Callable[[int], None], count: int, repeats: int) -> float:
    """Best calls/s over *repeats* runs of ``loop(count)``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loop(count)
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    count, repeats = (100_000, 3) if quick else (1_000_000, 5)
    # A policy whose limits the benchmark never reaches, so every call takes the accept path.
    roomy = BlockMachine(BlockPolicy(message_limit=10**12))
    default = BlockMachine(BlockPolicy())

    def registered(n: int) -> None:
        state = TenantState.new("bench")
        observe = roomy.observe
        for i in range(n):
            state, effects = observe(state, T0 + i * 0.001, registered=True)
        assert effects.decision is Verdict.ACCEPT

    def unregistered(n: int) -> None:
        state = TenantState.new("bench")
        observe = roomy.observe
        domains = DOMAINS
        for i in range(n):
            state, effects = observe(
                state, T0 + i * 0.001, registered=False, registrable=domains[i % 20]
            )
        assert effects.decision is Verdict.ACCEPT
        assert state.state is State.ACTIVE

    def mixed(n: int) -> None:
        # 9 registered : 1 unregistered, time advancing one bucket every 60,000 calls.
        state = TenantState.new("bench")
        observe = roomy.observe
        domains = DOMAINS
        for i in range(n):
            now = T0 + i * 0.001
            if i % 10:
                state, _effects = observe(state, now, registered=True)
            else:
                state, _effects = observe(state, now, registered=False, registrable=domains[i % 20])
        assert state.state is State.ACTIVE

    def advancing(n: int) -> None:
        # Every call in a new bucket: the expiry path runs each time.
        state = TenantState.new("bench")
        observe = roomy.observe
        domains = DOMAINS
        for i in range(n):
            state, _effects = observe(
                state, T0 + i * 60.0, registered=False, registrable=domains[i % 20]
            )
        assert state.state is State.ACTIVE

    def refused(n: int) -> None:
        state, _ = roomy.operator_block(TenantState.new("bench"), T0, by="bench", reason="b")
        observe = roomy.observe
        for i in range(n):
            state, effects = observe(
                state, T0 + i * 0.001, registered=False, registrable="spam.example"
            )
        assert effects.decision is Verdict.REFUSE_UNREGISTERED

    def immutable_alternative(n: int) -> None:
        state = TenantState.new("bench")
        evolve = attrs.evolve
        for i in range(n):
            state = evolve(state, offences=i)

    def store_round_trip(n: int) -> None:
        state, _ = default.observe(
            TenantState.new("bench"), T0, registered=False, registrable="x.example"
        )
        for _ in range(n):
            state = TenantState.from_dict(state.to_dict())

    rows = [
        ("accept path: registered sender domain (ACTIVE)", registered, count),
        ("accept path: unregistered, under the limits (ACTIVE)", unregistered, count),
        ("accept path: 90% registered / 10% unregistered", mixed, count),
        ("worst case: every call in a new bucket (expiry each call)", advancing, count // 4),
        ("refuse path: unregistered while BLOCKED (5.7.750)", refused, count),
        ("(rejected design) one attrs.evolve per observation", immutable_alternative, count // 10),
        ("(store path) to_dict + from_dict", store_round_trip, count // 50),
    ]
    print(
        f"Python {sys.version.split()[0]}, {count:,} calls per accept-path row, best of {repeats}"
    )
    results = {}
    for name, loop, n in rows:
        results[name] = rate = best_rate(loop, n, repeats)
        print(f"{name:<62} {rate:>12,.0f} /s")
    accept = min(results[name] for name, _, _ in rows[:3])
    verdict = "met" if accept >= 300_000 else "NOT met"
    print(f"\nslowest accept-path row: {accept:,.0f} observations/s (target >= 300,000: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

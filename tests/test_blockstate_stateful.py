"""Stateful property test of the block-state machine against a reference model (issue 4)."""

from __future__ import annotations

import json
from collections.abc import Callable

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domainpolicy import (
    TRANSITIONS,
    BlockMachine,
    BlockPolicy,
    Effects,
    Event,
    InvalidTransition,
    State,
    TenantState,
    Verdict,
)

POLICY = BlockPolicy(
    window_seconds=300,
    bucket_seconds=60,
    message_limit=6,
    domain_limit=3,
    max_tracked_domains=8,
    suspend_factor=2.5,
    probation_seconds=600,
    max_probation_seconds=2400,
    connector_lookback_seconds=900,
)
N = POLICY.buckets
DOMAINS = [f"d{i}.example" for i in range(6)]  # fewer than max_tracked_domains: model is exact
CONNECTORS = ["c0", "c1", "c2", "c3"]
CODES = ["5.7.750", "5.7.705"]
EDGES = {(e.source, e.event, e.target) for e in TRANSITIONS}
LOCKED = {State.BLOCKED, State.UNBLOCK_REQUESTED, State.SUSPENDED}


class BlockStateMachine(RuleBasedStateMachine):
    """Drives one tenant with random events and clock jumps (backwards too)."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = BlockMachine(POLICY)
        self.state = TenantState.new("tenant")
        self.now = 1_000_000.0
        self.head = 0
        # Reference model: every observation since the last approval, as (bucket, domain, weight);
        # domain None for registered mail.
        self.history: list[tuple[int, str | None, int]] = []

    # ------------------------------------------------------------------ helpers

    def _tick(self, delta: float) -> None:
        self.now = max(0.0, self.now + delta)

    def _apply(self, event: Event, call: Callable[[], tuple[TenantState, Effects]]) -> None:
        before = self.state
        snapshot = before.to_dict()
        try:
            after, effects = call()
        except InvalidTransition:
            assert before.to_dict() == snapshot, "a refused event changed the state"
            return
        self._check_effects(before.state, event, after, effects)
        if event is Event.APPROVE:
            self.head = max(self.head, int(self.now / POLICY.bucket_seconds))
            self.history = []
        self.state = after

    def _check_effects(
        self, source: State, event: Event, after: TenantState, effects: Effects
    ) -> None:
        assert (source, event, after.state) in EDGES
        if source is after.state:
            assert effects.transitions == ()
        else:
            (record,) = effects.transitions
            assert (record.source, record.event, record.target) == (source, event, after.state)
        if source in LOCKED and after.state is State.ACTIVE:
            assert event is Event.APPROVE, "left a blocked state without approval"

    # ------------------------------------------------------------------ rules

    @rule(
        registered=st.booleans(),
        domain=st.sampled_from(DOMAINS),
        weight=st.integers(1, 4),
        delta=st.floats(-400, 400, allow_nan=False),
    )
    def observe(self, registered: bool, domain: str, weight: int, delta: float) -> None:
        self._tick(delta)
        source = self.state.state
        bucket = int(self.now / POLICY.bucket_seconds)
        self.head = max(self.head, bucket)
        self.history.append((self.head, None if registered else domain, weight))
        after, effects = self.machine.observe(
            self.state, self.now, registered=registered, registrable=domain, weight=weight
        )
        assert effects.decision is not None
        if registered and source in (State.ACTIVE, State.BLOCKED, State.UNBLOCK_REQUESTED):
            assert effects.decision is Verdict.ACCEPT, "accepted-domain mail refused"
        if source is State.SUSPENDED:
            assert effects.decision is Verdict.REFUSE_THRESHOLD
        if effects.transitions:
            assert not effects.decision.accepted, "the crossing message must be refused"
        self._check_effects(source, Event.OBSERVE, after, effects)
        self.state = after

    @rule(domain=st.sampled_from(DOMAINS), delta=st.floats(0, 60))
    def register_domain(self, domain: str, delta: float) -> None:
        self._tick(delta)
        self._apply(
            Event.REGISTER_DOMAIN,
            lambda: self.machine.register_domain(self.state, self.now, domain),
        )

    @rule(domain=st.sampled_from(DOMAINS))
    def remove_domain(self, domain: str) -> None:
        self._apply(
            Event.REMOVE_DOMAIN, lambda: self.machine.remove_domain(self.state, self.now, domain)
        )

    @precondition(lambda self: self.state.block is not None)
    @rule(data=st.data())
    def declare_not_ours(self, data: st.DataObject) -> None:
        assert self.state.block is not None
        offending = list(self.state.block.offending)
        chosen = data.draw(st.lists(st.sampled_from(offending), max_size=3)) if offending else []
        self._apply(
            Event.DECLARE_NOT_OURS,
            lambda: self.machine.declare_not_ours(self.state, self.now, chosen, by="admin"),
        )

    @rule(connector=st.sampled_from(CONNECTORS), delta=st.floats(0, 600))
    def create_connector(self, connector: str, delta: float) -> None:
        self._tick(delta)
        self._apply(
            Event.CREATE_CONNECTOR,
            lambda: self.machine.create_connector(self.state, self.now, connector),
        )

    @rule(connector=st.sampled_from(CONNECTORS), kept=st.booleans())
    def review_connector(self, connector: str, kept: bool) -> None:
        self._apply(
            Event.REVIEW_CONNECTOR,
            lambda: self.machine.review_connector(
                self.state, self.now, connector, kept=kept, by="admin"
            ),
        )

    @rule()
    def attest(self) -> None:
        self._apply(
            Event.ATTEST, lambda: self.machine.attest(self.state, self.now, by="admin", note="ok")
        )

    @rule(code=st.sampled_from(CODES))
    def request_unblock(self, code: str) -> None:
        self._apply(
            Event.REQUEST_UNBLOCK,
            lambda: self.machine.request_unblock(self.state, self.now, code=code, evidence="done"),
        )

    @rule()
    def remediate_everything(self) -> None:
        """Resolve the whole checklist, so that unblock requests and approvals succeed often."""
        if self.state.block is None:
            return
        checklist = self.machine.checklist(self.state)
        if checklist.unresolved_domains:
            self.declare_not_ours_all(checklist.unresolved_domains)
        for connector in self.machine.checklist(self.state).unreviewed_connectors:
            self._apply(
                Event.REVIEW_CONNECTOR,
                lambda c=connector: self.machine.review_connector(  # type: ignore[misc]
                    self.state, self.now, c, kept=False, by="admin"
                ),
            )
        self.attest()

    def declare_not_ours_all(self, domains: tuple[str, ...]) -> None:
        self._apply(
            Event.DECLARE_NOT_OURS,
            lambda: self.machine.declare_not_ours(self.state, self.now, domains, by="admin"),
        )

    @rule(delta=st.floats(0, 3000))
    def approve(self, delta: float) -> None:
        self._tick(delta)
        self._apply(
            Event.APPROVE,
            lambda: self.machine.approve(self.state, self.now, by="support", reason="ok"),
        )

    @rule()
    def deny(self) -> None:
        self._apply(
            Event.DENY, lambda: self.machine.deny(self.state, self.now, by="support", reason="no")
        )

    @rule()
    def operator_block(self) -> None:
        self._apply(
            Event.OPERATOR_BLOCK,
            lambda: self.machine.operator_block(self.state, self.now, by="op", reason="abuse"),
        )

    @rule()
    def operator_suspend(self) -> None:
        self._apply(
            Event.OPERATOR_SUSPEND,
            lambda: self.machine.operator_suspend(self.state, self.now, by="op", reason="abuse"),
        )

    # ------------------------------------------------------------------ invariants

    @invariant()
    def counts_equal_the_reference_model(self) -> None:
        window = self.state.window
        assert window.head == self.head
        live = [(k, d, w) for k, d, w in self.history if k > self.head - N]
        assert window.total == sum(w for _, _, w in live)
        assert window.unregistered == sum(w for _, d, w in live if d is not None)
        last: dict[str, int] = {}
        for k, d, _ in live:
            if d is not None:
                last[d] = max(last.get(d, k), k)
        assert window.domains == last
        for _, total, unregistered in window.buckets_list():
            assert total >= unregistered >= 0
            assert total > 0
        assert window.older_total >= 0
        assert window.older_unregistered >= 0

    @invariant()
    def serialisation_is_identity(self) -> None:
        data = self.state.to_dict()
        again = TenantState.from_dict(json.loads(json.dumps(data)))
        assert again == self.state
        assert again.to_dict() == data

    @invariant()
    def block_present_exactly_when_not_active(self) -> None:
        assert (self.state.block is None) == (self.state.state is State.ACTIVE)


TestBlockStateMachine = BlockStateMachine.TestCase
TestBlockStateMachine.__doc__ = (
    "Random event sequences keep the invariants: approval-only exits, registered mail accepted "
    "when blocked, counts equal to the reference model, to_dict/from_dict identity."
)

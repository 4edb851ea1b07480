"""Table and unit tests of the tenant block-state machine (issue 4)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from domainpolicy import (
    STATE_SCHEMA_VERSION,
    TRANSITIONS,
    AlertKind,
    BlockCode,
    BlockMachine,
    BlockPolicy,
    ChecklistIncomplete,
    DomainPolicyError,
    Effects,
    Event,
    InvalidConfiguration,
    InvalidEvent,
    InvalidTenantState,
    InvalidTransition,
    State,
    TenantState,
    Verdict,
)

A, B, R, S = State.ACTIVE, State.BLOCKED, State.UNBLOCK_REQUESTED, State.SUSPENDED
T0 = 1_000_000.0
POLICY = BlockPolicy(
    window_seconds=600,
    bucket_seconds=60,
    message_limit=10,
    domain_limit=3,
    max_tracked_domains=6,
    probation_seconds=1000,
    max_probation_seconds=4000,
    connector_lookback_seconds=1000,
)
M = BlockMachine(POLICY)
Outcome = tuple[TenantState, Effects]


# --------------------------------------------------------------------------- builders


def unreg(s: TenantState, now: float, domain: str = "spam.example", weight: int = 1) -> Outcome:
    return M.observe(s, now, registered=False, registrable=domain, weight=weight)


def active() -> TenantState:
    s = TenantState.new("t1")
    s, _ = M.create_connector(s, T0 - 10, "c1")
    return s


def blocked() -> TenantState:
    s, effects = unreg(active(), T0, weight=11)
    assert s.state is B, effects
    return s


def remediate(s: TenantState, now: float = T0 + 100) -> TenantState:
    s, _ = M.register_domain(s, now, "spam.example")
    for connector in M.checklist(s).unreviewed_connectors:
        s, _ = M.review_connector(s, now, connector, kept=False, by="admin")
    s, _ = M.attest(s, now, by="admin", note="reimaged")
    return s


def requested() -> TenantState:
    s, _ = M.request_unblock(remediate(blocked()), T0 + 110, code="5.7.750", evidence="clean")
    assert s.state is R
    return s


def suspended() -> TenantState:
    s, _ = unreg(blocked(), T0 + 1, weight=20)
    assert s.state is S
    return s


def requested_suspended() -> TenantState:
    s, _ = M.request_unblock(remediate(suspended()), T0 + 110, code="5.7.705", evidence="clean")
    assert s.state is R
    return s


BUILDERS: dict[State, Callable[[], TenantState]] = {
    A: active,
    B: blocked,
    R: requested,
    S: suspended,
}
NOW = T0 + 200


def drive(edge_key: tuple[State, Event, State]) -> tuple[TenantState, Outcome]:
    """Build the edge's source state and apply its event so that it takes that edge."""
    source, event, target = edge_key
    s = BUILDERS[source]()
    if edge_key == (R, Event.DENY, S):
        s = requested_suspended()
    if edge_key == (S, Event.REQUEST_UNBLOCK, R):
        s = remediate(s)
    if source is B and event is Event.REQUEST_UNBLOCK:
        s = remediate(s)
    actions: dict[Event, Callable[[TenantState], Outcome]] = {
        Event.REGISTER_DOMAIN: lambda s: M.register_domain(s, NOW, "spam.example"),
        Event.REMOVE_DOMAIN: lambda s: M.remove_domain(s, NOW, "spam.example"),
        Event.DECLARE_NOT_OURS: lambda s: M.declare_not_ours(s, NOW, ["spam.example"], by="a"),
        Event.CREATE_CONNECTOR: lambda s: M.create_connector(s, NOW, "c2"),
        Event.REVIEW_CONNECTOR: lambda s: M.review_connector(s, NOW, "c1", kept=True, by="a"),
        Event.ATTEST: lambda s: M.attest(s, NOW, by="a", note="n"),
        Event.REQUEST_UNBLOCK: lambda s: M.request_unblock(
            s, NOW, code=s.block.code.value if s.block else "5.7.750", evidence="e"
        ),
        Event.APPROVE: lambda s: M.approve(s, NOW, by="support", reason="ok"),
        Event.DENY: lambda s: M.deny(s, NOW, by="support", reason="no"),
        Event.OPERATOR_BLOCK: lambda s: M.operator_block(s, NOW, by="op", reason="abuse"),
        Event.OPERATOR_SUSPEND: lambda s: M.operator_suspend(s, NOW, by="op", reason="abuse"),
    }
    if event is Event.OBSERVE:
        if target is source:
            return s, M.observe(s, NOW, registered=True)
        weight = 10 if source is A else 20
        return s, unreg(s, NOW - 150, weight=weight if source is not A else 11)
    return s, actions[event](s)


# --------------------------------------------------------------------------- transition table


@pytest.mark.parametrize(
    "edge",
    [(e.source, e.event, e.target) for e in TRANSITIONS],
    ids=[f"{e.source.name}-{e.event.value}-{e.target.name}-{i}" for i, e in enumerate(TRANSITIONS)],
)
def test_every_edge_of_the_table_is_taken_as_described(edge: tuple[State, Event, State]) -> None:
    """Each row of TRANSITIONS can be driven and lands in its target with a matching record."""
    source, event, target = edge
    before, (after, effects) = drive(edge)
    assert before.state is source
    assert after.state is target
    if source is target:
        assert effects.transitions == ()
    else:
        (record,) = effects.transitions
        assert (record.source, record.event, record.target) == edge
        assert record.tenant == "t1"
        assert record.at == NOW or event is Event.OBSERVE
    assert TenantState.from_dict(after.to_dict()) == after


ALL_EVENTS = sorted(Event, key=lambda e: e.value)
REFUSED = [
    (state, event)
    for state in State
    for event in ALL_EVENTS
    if (state, event) not in {(e.source, e.event) for e in TRANSITIONS}
]


@pytest.mark.parametrize(
    ("state", "event"), REFUSED, ids=[f"{s.name}-{e.value}" for s, e in REFUSED]
)
def test_every_pair_missing_from_the_table_is_refused_and_changes_nothing(
    state: State, event: Event
) -> None:
    """Events not in TRANSITIONS for a state raise InvalidTransition; the state is untouched."""
    s = BUILDERS[state]()
    snapshot = s.to_dict()
    with pytest.raises(InvalidTransition, match=repr(event.value)):
        _apply_refused(s, event)
    assert s.to_dict() == snapshot


def _apply_refused(s: TenantState, event: Event) -> Outcome:
    calls: dict[Event, Callable[[], Outcome]] = {
        Event.DECLARE_NOT_OURS: lambda: M.declare_not_ours(s, NOW, ["spam.example"], by="a"),
        Event.ATTEST: lambda: M.attest(s, NOW, by="a", note="n"),
        Event.REQUEST_UNBLOCK: lambda: M.request_unblock(s, NOW, code="5.7.750", evidence="e"),
        Event.APPROVE: lambda: M.approve(s, NOW, by="a", reason="r"),
        Event.DENY: lambda: M.deny(s, NOW, by="a", reason="r"),
        Event.OPERATOR_BLOCK: lambda: M.operator_block(s, NOW, by="a", reason="r"),
        Event.OPERATOR_SUSPEND: lambda: M.operator_suspend(s, NOW, by="a", reason="r"),
    }
    return calls[event]()


def test_only_approval_leads_out_of_the_blocked_states() -> None:
    """The table has no edge from BLOCKED/UNBLOCK_REQUESTED/SUSPENDED to ACTIVE but approve."""
    exits = {(e.source, e.event) for e in TRANSITIONS if e.source is not A and e.target is A}
    assert exits == {(R, Event.APPROVE)}


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("state", "registered", "decision"),
    [
        (A, True, Verdict.ACCEPT),
        (A, False, Verdict.ACCEPT),
        (B, True, Verdict.ACCEPT),
        (B, False, Verdict.REFUSE_UNREGISTERED),
        (R, True, Verdict.ACCEPT),
        (R, False, Verdict.REFUSE_UNREGISTERED),
        (S, True, Verdict.REFUSE_THRESHOLD),
        (S, False, Verdict.REFUSE_THRESHOLD),
    ],
)
def test_decision_table(state: State, registered: bool, decision: Verdict) -> None:
    """Accept/refuse(code) for registered and unregistered mail in each state."""
    s = BUILDERS[state]() if state is not A else TenantState.new("t1")
    s2, effects = M.observe(s, T0 + 2, registered=registered, registrable="other.example")
    assert effects.decision is decision
    assert s2 is s
    assert effects.transitions == ()


def test_decision_codes() -> None:
    """Decisions expose their enhanced status code as a BlockCode (a str)."""
    assert Verdict.ACCEPT.code is None
    assert Verdict.ACCEPT.accepted
    assert Verdict.REFUSE_UNREGISTERED.code == "5.7.750"
    assert Verdict.REFUSE_THRESHOLD.code is BlockCode.THRESHOLD
    assert str(BlockCode.THRESHOLD) == "5.7.705"
    assert not Verdict.REFUSE_THRESHOLD.accepted


def test_the_message_that_crosses_the_limit_is_refused() -> None:
    """The 11th unregistered message (limit 10) is refused and blocks, with evidence."""
    s = TenantState.new("t1")
    for i in range(10):
        s, effects = unreg(s, T0 + i, domain=f"d{i % 2}.example")
        assert effects.decision is Verdict.ACCEPT
    s, effects = unreg(s, T0 + 10, domain="d0.example")
    assert effects.decision is Verdict.REFUSE_UNREGISTERED
    assert s.state is B
    assert s.offences == 1
    (record,) = effects.transitions
    assert record.evidence.unregistered == 11
    assert record.evidence.sample == ("d0.example", "d1.example")
    assert [a.kind for a in effects.alerts] == [AlertKind.BLOCKED]
    assert s.block is not None
    assert s.block.offending == ("d0.example", "d1.example")


def test_distinct_domain_spray_blocks() -> None:
    """A fourth distinct unregistered domain (limit 3) blocks even at low volume."""
    s = TenantState.new("t1")
    for i in range(3):
        s, effects = unreg(s, T0 + i, domain=f"f{i}.example")
        assert effects.decision is Verdict.ACCEPT
    s, effects = unreg(s, T0 + 3, domain="f3.example")
    assert effects.decision is Verdict.REFUSE_UNREGISTERED
    assert s.state is B


def test_warning_once_per_window() -> None:
    """approaching_limit fires when a warning threshold is passed, at most once per window."""
    s = TenantState.new("t1")
    kinds = []
    for i in range(9):
        s, effects = unreg(s, T0 + i)
        kinds += [a.kind for a in effects.alerts]
    assert kinds == [AlertKind.APPROACHING_LIMIT]
    # A window later the count has expired; build up again and get a second warning.
    later = T0 + 600 + 60
    for i in range(9):
        s, effects = unreg(s, later + i)
        kinds += [a.kind for a in effects.alerts]
    assert kinds == [AlertKind.APPROACHING_LIMIT] * 2
    assert s.state is A


def test_share_gate_tolerates_unregistered_mail_that_is_a_small_share() -> None:
    """With min_unregistered_share, volume over the limit does not block while the share is low."""
    machine = BlockMachine(attrs.evolve(POLICY, min_unregistered_share=0.5))
    s = TenantState.new("t1")
    s, _ = machine.observe(s, T0, registered=True, weight=100)
    s, effects = machine.observe(s, T0, registered=False, registrable="x.example", weight=50)
    assert effects.decision is Verdict.ACCEPT
    assert s.state is A
    s, effects = machine.observe(s, T0, registered=False, registrable="x.example", weight=51)
    assert effects.decision is Verdict.REFUSE_UNREGISTERED
    assert s.state is B


def test_blocked_tenant_pushing_past_the_suspension_threshold_is_suspended() -> None:
    """Unregistered attempts over suspend_factor x limit (30) suspend; the request is dropped."""
    s = requested()
    s, effects = unreg(s, T0 + 120, weight=19)  # 11 + 19 = 30, not over
    assert s.state is R
    assert effects.decision is Verdict.REFUSE_UNREGISTERED
    s, effects = unreg(s, T0 + 121)
    assert s.state is S
    assert effects.decision is Verdict.REFUSE_THRESHOLD
    assert s.block is not None
    assert s.block.request is None
    assert s.block.code is BlockCode.THRESHOLD
    assert [a.kind for a in effects.alerts] == [AlertKind.SUSPENDED]


def test_probation_halves_limits_and_escalates() -> None:
    """After approval: fresh window, limits halved until the deadline, longer next probation."""
    s, effects = M.approve(requested(), T0 + 200, by="support", reason="ok")
    assert s.state is A
    assert s.probation_until == T0 + 200 + 1000
    assert s.window.total == 0
    assert s.block is None
    assert [a.kind for a in effects.alerts] == [AlertKind.UNBLOCKED]
    for i in range(5):
        s, effects = unreg(s, T0 + 300 + i, domain="spam.example")
        assert effects.decision is Verdict.ACCEPT
    s, effects = unreg(s, T0 + 306, domain="spam.example")
    assert s.state is B
    assert s.offences == 2
    assert "probation" in effects.transitions[0].reason
    s, _ = M.request_unblock(remediate(s, T0 + 400), T0 + 401, code="5.7.750", evidence="e")
    s, _ = M.approve(s, T0 + 500, by="support", reason="ok")
    assert s.probation_until == T0 + 500 + 2000
    assert POLICY.probation_for(5) == 4000  # capped at max_probation_seconds


def test_probation_ends_at_the_deadline() -> None:
    """After probation_until the normal limits apply again."""
    s, _ = M.approve(requested(), T0 + 200, by="support", reason="ok")
    assert s.probation_until is not None
    after = s.probation_until + 1
    for i in range(10):
        s, effects = unreg(s, after + i)
        assert effects.decision is Verdict.ACCEPT
    assert s.state is A


# --------------------------------------------------------------------------- counting


def test_buckets_expire_after_the_window() -> None:
    """Counts leave the window N buckets after their bucket; the window is exact to one bucket."""
    s = TenantState.new("t1")
    s, _ = unreg(s, T0, weight=5)
    bucket = int(T0 / 60)
    s, _ = M.observe(s, (bucket + 9) * 60.0, registered=True)
    assert s.window.unregistered == 5
    assert s.window.domains == {"spam.example": bucket}
    s, _ = M.observe(s, (bucket + 10) * 60.0, registered=True)
    assert s.window.unregistered == 0
    assert s.window.total == 2
    assert s.window.domains == {}


def test_time_going_backwards_counts_in_the_newest_bucket() -> None:
    """A late observation is counted (never dropped) in bucket head; nothing expires or revives."""
    s = TenantState.new("t1")
    s, _ = unreg(s, T0 + 300, weight=2)
    head = s.window.head
    s, _ = unreg(s, T0 - 5000, domain="late.example", weight=3)
    assert s.window.head == head
    assert s.window.unregistered == 5
    assert s.window.domains["late.example"] == head
    assert s.window.head_unregistered == 5


def test_full_domain_record_refuses_new_names_but_keeps_counting() -> None:
    """At max_tracked_domains new names are not recorded; known names keep their last bucket."""
    small = BlockMachine(attrs.evolve(POLICY, message_limit=1000, domain_limit=5))
    s = TenantState.new("t1")
    for i in range(4):
        s, _ = small.observe(s, T0, registered=False, registrable=f"d{i}.example")
    later = T0 + 120
    for i in range(4, 9):
        s, _ = small.observe(s, later, registered=False, registrable=f"d{i}.example")
    assert sorted(s.window.domains) == [f"d{i}.example" for i in range(6)]
    s, _ = small.observe(s, later, registered=False, registrable="d0.example")
    assert s.window.domains["d0.example"] == int(later / 60)
    assert s.window.unregistered == 10
    assert s.state is State.BLOCKED  # six distinct > 5


def test_registered_mail_never_counts_as_unregistered() -> None:
    """Registered observations add to the total only and never block."""
    s = TenantState.new("t1")
    for i in range(100):
        s, effects = M.observe(s, T0 + i, registered=True, weight=3)
        assert effects.decision is Verdict.ACCEPT
    assert s.window.total == 300
    assert s.window.unregistered == 0
    assert s.state is A


# --------------------------------------------------------------------------- checklist


def test_unblock_request_lists_every_missing_step() -> None:
    """ChecklistIncomplete names each unresolved domain, unreviewed connector, the attestation."""
    s = blocked()
    s, _ = M.create_connector(s, T0 + 5, "c9")
    with pytest.raises(ChecklistIncomplete) as info:
        M.request_unblock(s, T0 + 6, code="5.7.750", evidence="e")
    missing = info.value.missing
    assert len(missing) == 3
    assert "'spam.example'" in missing[0]
    assert "'c1'" in missing[1]
    assert "'c9'" in missing[1]
    assert "attest" in missing[2]
    assert isinstance(info.value, InvalidTransition)


@pytest.mark.parametrize(
    ("code", "builder"),
    [("5.7.705", blocked), ("5.7.750", suspended), ("5.7.1", blocked), ("", blocked)],
)
def test_unblock_request_must_quote_the_code_of_the_block(
    code: str, builder: Callable[[], TenantState]
) -> None:
    """A request quoting another code is refused, naming the code quoted and the one in force."""
    s = remediate(builder())
    with pytest.raises(InvalidTransition, match=repr(code)):
        M.request_unblock(s, NOW, code=code, evidence="e")


def test_approval_rechecks_the_checklist() -> None:
    """Removing a registered offending domain after the request makes approval fail."""
    s, _ = M.remove_domain(requested(), NOW, "spam.example")
    with pytest.raises(ChecklistIncomplete, match=r"spam\.example"):
        M.approve(s, NOW, by="support", reason="ok")
    s, _ = M.register_domain(s, NOW, "Spam.Example.")
    s, _ = M.approve(s, NOW, by="support", reason="ok")
    assert s.state is A


def test_connector_created_while_blocked_must_be_reviewed() -> None:
    """A connector created during the block joins the review list."""
    s, _ = M.create_connector(remediate(blocked()), NOW, "c2")
    assert M.checklist(s).unreviewed_connectors == ("c2",)
    assert not M.checklist(s).complete


def test_connectors_older_than_the_lookback_are_not_reviewed() -> None:
    """Only connectors created within connector_lookback_seconds before the block need review."""
    s = TenantState.new("t1")
    s, _ = M.create_connector(s, T0 - 2000, "old")
    s, _ = M.create_connector(s, T0 - 10, "new")
    s, _ = unreg(s, T0, weight=11)
    assert s.block is not None
    assert s.block.to_review == ("new",)


def test_denial_keeps_the_checklist() -> None:
    """Deny returns to BLOCKED with the checklist intact and the denial recorded."""
    s, effects = M.deny(requested(), NOW, by="support", reason="not convinced")
    assert s.state is B
    assert M.checklist(s).complete
    assert s.block is not None
    assert s.block.last_denial is not None
    assert s.block.last_denial.reason == "not convinced"
    assert effects.transitions[0].actor == "support"


# --------------------------------------------------------------------------- bad input


BAD_OBSERVATIONS: list[tuple[dict[str, Any], str]] = [
    ({"now": math.nan}, "now"),
    ({"now": math.inf}, "now"),
    ({"now": -1.0}, "now"),
    ({"now": 1e13}, "now"),
    ({"now": "1000"}, "now"),
    ({"now": None}, "now"),
    ({"weight": 0}, "weight"),
    ({"weight": -3}, "weight"),
    ({"weight": 1.5}, "weight"),
    ({"weight": True}, "weight"),
    ({"weight": "2"}, "weight"),
    ({"registrable": None}, "registrable"),
    ({"registrable": ""}, "registrable"),
    ({"registrable": 42}, "registrable"),
]


@pytest.mark.parametrize(("change", "name"), BAD_OBSERVATIONS)
def test_bad_observations_are_refused_before_counting(change: dict[str, Any], name: str) -> None:
    """Malformed observations raise InvalidEvent naming the argument; nothing is counted."""
    s = TenantState.new("t1")
    args: dict[str, Any] = {"now": T0, "registered": False, "registrable": "x.example", "weight": 1}
    args.update(change)
    snapshot = s.to_dict()
    with pytest.raises(InvalidEvent, match=name):
        M.observe(s, args.pop("now"), **args)
    assert s.to_dict() == snapshot


BAD_ADMIN: list[tuple[Callable[[TenantState], Outcome], str]] = [
    (lambda s: M.register_domain(s, NOW, "not a domain"), "domain"),
    (lambda s: M.remove_domain(s, math.nan, "x.example"), "now"),
    (lambda s: M.declare_not_ours(s, NOW, "spam.example", by="a"), "domains"),
    (lambda s: M.declare_not_ours(s, NOW, ["nope.example"], by="a"), "nope.example"),
    (lambda s: M.declare_not_ours(s, NOW, ["spam.example"], by=""), "by"),
    (lambda s: M.create_connector(s, NOW, "c1"), "already"),
    (lambda s: M.create_connector(s, NOW, ""), "connector"),
    (lambda s: M.review_connector(s, NOW, "ghost", kept=True, by="a"), "ghost"),
    (lambda s: M.review_connector(s, NOW, "c1", kept=1, by="a"), "kept"),  # type: ignore[arg-type]
    (lambda s: M.attest(s, NOW, by="a", note=""), "note"),
    (lambda s: M.attest(s, NOW, by=None, note="n"), "by"),  # type: ignore[arg-type]
    (lambda s: M.request_unblock(s, NOW, code="5.7.750", evidence="   "), "evidence"),
]


@pytest.mark.parametrize(("call", "name"), BAD_ADMIN)
def test_bad_admin_events_are_refused_with_the_value_named(
    call: Callable[[TenantState], Outcome], name: str
) -> None:
    """Malformed administrative events raise InvalidEvent naming the offending value."""
    s = blocked()
    snapshot = s.to_dict()
    with pytest.raises(InvalidEvent, match=name):
        call(s)
    assert s.to_dict() == snapshot


def test_tenant_id_must_be_text() -> None:
    """TenantState.new refuses an empty tenant id with InvalidEvent."""
    with pytest.raises(InvalidEvent, match="tenant"):
        TenantState.new(" ")


def test_admin_events_do_not_touch_their_input() -> None:
    """Every method but observe leaves its input state (window included) unchanged."""
    s = blocked()
    snapshot = s.to_dict()
    s2, _ = M.register_domain(s, NOW, "spam.example")
    s3, _ = M.observe(s2, NOW, registered=True)
    assert s.to_dict() == snapshot
    assert s3.window is not s.window


# --------------------------------------------------------------------------- policy


def test_policy_defaults_and_limits() -> None:
    """Defaults: 500 messages / 50 domains per hour in 60 buckets; probation halves them."""
    policy = BlockPolicy()
    assert policy.buckets == 60
    normal, probation = policy.limits(), policy.limits(probation=True)
    assert (normal.messages, normal.domains, normal.warn_messages, normal.warn_domains) == (
        500,
        50,
        400,
        40,
    )
    assert normal.suspend_messages == 1500
    assert (probation.messages, probation.domains) == (250, 25)
    assert [policy.probation_for(n) // 86400 for n in (1, 2, 3, 4, 5, 6)] == [7, 14, 28, 56, 90, 90]
    for field in attrs.fields(BlockPolicy):
        assert field.metadata["reason"], field.name


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"window_seconds": 0}, "window_seconds=0"),
        ({"bucket_seconds": 7}, "multiple of bucket_seconds"),
        ({"window_seconds": 86400 * 30, "bucket_seconds": 1}, "10000"),
        ({"message_limit": 1.5}, "message_limit=1.5"),
        ({"domain_limit": True}, "domain_limit=True"),
        ({"max_tracked_domains": 50}, "max_tracked_domains=50"),
        ({"min_unregistered_share": 1.0}, "min_unregistered_share=1.0"),
        ({"warn_fraction": 0.0}, "warn_fraction=0.0"),
        ({"warn_fraction": math.nan}, "warn_fraction=nan"),
        ({"suspend_factor": 1.0}, "suspend_factor=1.0"),
        ({"probation_fraction": 2}, "probation_fraction=2"),
        ({"probation_escalation": 0.5}, "probation_escalation=0.5"),
        ({"max_probation_seconds": 10}, "max_probation_seconds=10"),
        ({"sample_size": "10"}, "sample_size='10'"),
    ],
)
def test_policy_validation_names_value_and_rule(changes: dict[str, Any], fragment: str) -> None:
    """Each invalid BlockPolicy field is reported with its repr and the rule broken."""
    with pytest.raises(InvalidConfiguration, match="must") as info:
        BlockPolicy(**changes)
    assert any(fragment in problem for problem in info.value.problems), info.value.problems


def test_policy_validation_reports_every_problem() -> None:
    """All problems are listed at once, not only the first."""
    with pytest.raises(InvalidConfiguration) as info:
        BlockPolicy(message_limit=0, domain_limit=-1, warn_fraction=3.0)
    assert len(info.value.problems) == 3


def test_machine_refuses_a_non_policy() -> None:
    """BlockMachine needs a BlockPolicy."""
    with pytest.raises(InvalidConfiguration, match="BlockPolicy"):
        BlockMachine({"message_limit": 5})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("builder", [active, blocked, requested, suspended, requested_suspended])
def test_to_dict_round_trips_through_json(builder: Callable[[], TenantState]) -> None:
    """from_dict(json(to_dict(s))) == s and to_dict is stable, in every state."""
    s = builder()
    s, _ = M.deny(s, NOW, by="x", reason="y") if s.state is R else (s, None)
    data = s.to_dict()
    assert data["schema"] == STATE_SCHEMA_VERSION
    again = TenantState.from_dict(json.loads(json.dumps(data)))
    assert again == s
    assert again.to_dict() == data


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], object]]]:
    def setter(path: list[Any], value: object) -> Callable[[dict[str, Any]], object]:
        def apply(d: dict[str, Any]) -> object:
            target: Any = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return d

        return apply

    def deleter(key: str) -> Callable[[dict[str, Any]], object]:
        def apply(d: dict[str, Any]) -> object:
            del d[key]
            return d

        return apply

    return [
        ("schema", setter(["schema"], 2)),
        ("schema", setter(["schema"], True)),
        ("tenant", deleter("tenant")),
        ("tenant", setter(["tenant"], 5)),
        ("state.state", setter(["state"], "frozen")),
        ("offences", setter(["offences"], -1)),
        ("probation_until", setter(["probation_until"], "soon")),
        ("buckets", setter(["window", "buckets"], [[1, 5, 6]])),
        ("buckets", setter(["window", "buckets"], [[10**12, 5, 1]])),
        ("buckets", setter(["window", "buckets"], [[1, 2]])),
        ("buckets", setter(["window", "buckets"], "x")),
        ("domains", setter(["window", "domains"], [["b", 1], ["a", 1]])),
        ("warned", setter(["window", "warned"], 10**12)),
        ("window", setter(["window"], None)),
        ("block", setter(["block"], None)),
        ("block.code", setter(["block", "code"], "5.7.1")),
        ("registered", setter(["block", "registered"], ["zzz.example"])),
        ("reviews", setter(["block", "reviews"], [["c1", "yes", "a", 1.0]])),
        ("request", setter(["block", "request"], {"code": "5.7.750", "evidence": "e"})),
        ("connectors", setter(["connectors"], [["c", 1.0], ["c", 2.0]])),
        ("evidence", setter(["block", "evidence", "sample"], [1])),
        ("state", lambda d: [d]),
        ("state", lambda d: None),
    ]


@pytest.mark.parametrize(("where", "mutate"), _mutations())
def test_from_dict_refuses_garbage_with_invalid_tenant_state(
    where: str, mutate: Callable[[dict[str, Any]], object]
) -> None:
    """Malformed or inconsistent dicts raise InvalidTenantState naming the field, not a builtin."""
    data = copy.deepcopy(blocked().to_dict())
    broken = mutate(data)
    with pytest.raises(InvalidTenantState, match=where.rsplit(".", maxsplit=1)[-1]) as info:
        TenantState.from_dict(broken)  # type: ignore[arg-type]
    assert isinstance(info.value, DomainPolicyError)


def test_states_are_frozen_and_hashable() -> None:
    """TenantState is frozen; the window is excluded from the hash and compared by content."""
    s = blocked()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.offences = 5  # type: ignore[misc]
    assert hash(s) == hash(TenantState.from_dict(s.to_dict()))
    assert s.window == s.window.copy()
    assert s.window != object()
    assert "unregistered=11" in repr(s.window)


def test_checklist_incomplete_pickles() -> None:
    """ChecklistIncomplete survives pickling (for multiprocess facades)."""
    import pickle

    with pytest.raises(ChecklistIncomplete) as info:
        M.request_unblock(blocked(), NOW, code="5.7.750", evidence="e")
    again = pickle.loads(pickle.dumps(info.value))
    assert again.missing == info.value.missing


def test_operator_block_evidence_describes_the_window_at_that_time() -> None:
    """Evidence of a block on an idle tenant spans the hour before now, never before 1970."""
    machine = BlockMachine(BlockPolicy())
    _state, effects = machine.operator_block(
        TenantState.new("t"), 1_800_000_000.0, by="ops", reason="r"
    )
    evidence = effects.transitions[0].evidence
    assert evidence.window_end >= 1_800_000_000.0
    assert evidence.window_start == evidence.window_end - 3600.0
    assert (evidence.total, evidence.unregistered) == (0, 0)


def test_evidence_leaves_out_buckets_expired_since_the_last_observation() -> None:
    """Counts from more than a window ago are not evidence for a block now."""
    machine = BlockMachine(BlockPolicy())
    state = TenantState.new("t")
    state, _ = machine.observe(state, 1_800_000_000.0, registered=False, registrable="x.example")
    _, effects = machine.operator_block(state, 1_800_000_000.0 + 7200, by="ops", reason="r")
    assert effects.transitions[0].evidence.unregistered == 0
    assert state.window.unregistered == 1  # the stored window itself is untouched

"""The relay policy facade: attribution, sender checks, counting, replies and failure handling."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domainpolicy import (
    AcceptedDomain,
    BlockMachine,
    BlockPolicy,
    ChecklistIncomplete,
    ConnectorTable,
    DomainMatcher,
    Effects,
    InboundConnector,
    InvalidConfiguration,
    MemoryStore,
    ReplyCatalog,
    ReplyCode,
    SQLiteStore,
    State,
    StateStore,
    StoreUnavailable,
    TenantState,
)
from domainpolicy._policy import ACCEPTED_REPLY, Outcome, RelayPolicy, RelayRequest
from domainpolicy._stores import Mutation
from domainpolicy.testing import addresses, hostile_text

NOW = 1_800_000_000.0
POLICY = BlockPolicy(message_limit=5, domain_limit=4, max_tracked_domains=20)
MATCHER = DomainMatcher.compile(
    [
        AcceptedDomain("contoso.com", "contoso"),
        AcceptedDomain("bücher.example", "contoso"),
        AcceptedDomain("contoso.co.uk", "contoso", match_subdomains=True),
        AcceptedDomain("fabrikam.com", "fabrikam"),
    ]
)
CONNECTORS = ConnectorTable.compile(
    [
        InboundConnector(
            "contoso-onprem",
            "contoso",
            sender_ip_ranges=(ipaddress.ip_network("198.51.100.0/24"),),
            tls_cert_names=("mail.contoso.com",),
        )
    ],
    MATCHER,
)
ONPREM = "198.51.100.7"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make(store: StateStore | None = None, **options: Any) -> RelayPolicy:
    return RelayPolicy(
        MATCHER, CONNECTORS, POLICY, store or MemoryStore(), clock=Clock(), **options
    )


CASES = [
    # (sender, client ip, outcome, reason, tenant, status)
    ("alice@contoso.com", None, Outcome.ACCEPT, "accepted_domain", "contoso", "2.1.0"),
    ("<Alice@Mail.Contoso.CO.UK.>", None, Outcome.ACCEPT, "accepted_domain", "contoso", "2.1.0"),
    ("ü@BÜCHER.example", None, Outcome.ACCEPT, "accepted_domain", "contoso", "2.1.0"),
    ("x@forwarded.example", ONPREM, Outcome.ACCEPT, "unregistered_allowed", "contoso", "2.1.0"),
    ("carol@fabrikam.com", ONPREM, Outcome.ACCEPT, "unregistered_allowed", "contoso", "2.1.0"),
    ("x@forwarded.example", "192.0.2.1", Outcome.REFUSE, "no_tenant", None, "5.7.64"),
    ("x@evilcontoso.com", None, Outcome.REFUSE, "no_tenant", None, "5.7.64"),
    ("a@@b", ONPREM, Outcome.REFUSE, "bad_sender", "contoso", "5.1.7"),
    ("not an address", None, Outcome.REFUSE, "bad_sender", None, "5.1.7"),
    ("x@[192.0.2.1]", ONPREM, Outcome.REFUSE, "address_literal", "contoso", "5.7.64"),
    ("<>", None, Outcome.ACCEPT, "null_sender", None, "2.1.0"),
    ("", ONPREM, Outcome.ACCEPT, "null_sender", "contoso", "2.1.0"),
]


@pytest.mark.parametrize(("sender", "ip", "outcome", "reason", "tenant", "status"), CASES)
def test_decisions(
    sender: str, ip: str | None, outcome: Outcome, reason: str, tenant: str | None, status: str
) -> None:
    """Each path through the steps gives its outcome, reason, tenant and reply."""
    decision = make().evaluate(RelayRequest(sender, client_ip=ip))
    assert (decision.outcome, decision.reason, decision.tenant) == (outcome, reason, tenant)
    assert decision.reply.status == status
    assert decision.accepted is (outcome is Outcome.ACCEPT)


def test_certificate_name_attributes_the_tenant() -> None:
    """A TLS certificate name of the tenant's connector attributes mail from any IP."""
    decision = make().evaluate(
        RelayRequest(
            "x@forwarded.example", client_ip="203.0.113.5", tls_cert_name="mail.contoso.com"
        )
    )
    assert (decision.tenant, decision.registered, decision.counted) == ("contoso", False, True)


def test_invalid_client_ip_falls_back_to_sender_domain() -> None:
    """A client IP that is not an address is ignored; the sender's domain attributes the mail."""
    decision = make().evaluate(RelayRequest("alice@contoso.com", client_ip="not-an-ip"))
    assert (decision.outcome, decision.tenant) == (Outcome.ACCEPT, "contoso")


def test_null_sender_refused_by_option() -> None:
    """null_sender='refuse' refuses <> unless a connector attributes it."""
    policy = make(null_sender="refuse")
    assert policy.evaluate(RelayRequest("<>")).reply.status == "5.7.64"
    assert policy.evaluate(RelayRequest("<>", client_ip=ONPREM)).accepted


def test_block_at_the_crossing_message_and_registered_mail_still_flows() -> None:
    """Unregistered mail is accepted up to the limit, the crossing message is refused with
    5.7.750 and blocks the tenant; accepted-domain mail still flows; other tenants unaffected."""
    policy = make()
    decisions = [
        policy.evaluate(RelayRequest(f"s@spam{i % 3}.example", client_ip=ONPREM))
        for i in range(POLICY.message_limit + 3)
    ]
    assert [d.accepted for d in decisions] == [True] * POLICY.message_limit + [False] * 3
    crossing = decisions[POLICY.message_limit]
    assert str(crossing.reply) == (
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
    )
    assert crossing.reason == "blocked"
    assert [t.target for t in crossing.effects.transitions] == [State.BLOCKED]
    assert policy.evaluate(RelayRequest("ceo@contoso.com", client_ip=ONPREM)).accepted
    assert policy.evaluate(RelayRequest("carol@fabrikam.com")).accepted
    assert policy.status("contoso").state is State.BLOCKED


def test_suspended_tenant_refuses_all_relay_with_5_7_705() -> None:
    """An operator suspension refuses even accepted-domain mail with 5.7.705."""
    policy = make()
    policy.suspend("contoso", by="ops", reason="abuse")
    decision = policy.evaluate(RelayRequest("alice@contoso.com"))
    assert (decision.outcome, decision.reason) == (Outcome.REFUSE, "suspended")
    assert str(decision.reply) == "550 5.7.705 Access denied, tenant has exceeded threshold"


def test_count_recipients_weights_by_recipient_count() -> None:
    """count='recipients' counts every envelope recipient."""
    policy = make(count="recipients")
    policy.evaluate(
        RelayRequest("x@spam.example", client_ip=ONPREM, recipients=("a@x.example", "b@x.example"))
    )
    assert policy.status("contoso").unregistered == 2


def test_tenant_reply_override_and_server_name() -> None:
    """Replies come from the catalogue: tenant overrides and the server name apply."""
    replies = ReplyCatalog(server_name="mx1.example.net").with_text(
        ReplyCode.BLOCKED_UNREGISTERED,
        "{default}\nSee https://help.example.net/c",
        tenant="contoso",
    )
    policy = make(replies=replies)
    policy.block("contoso", by="ops", reason="test")
    decision = policy.evaluate(RelayRequest("x@spam.example", client_ip=ONPREM))
    assert decision.reply.lines() == (
        "550-5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
        "550 5.7.750 See https://help.example.net/c [mx1.example.net]",
    )


class FailingStore(StateStore):
    """A store whose backend is down: every call raises StoreUnavailable."""

    kind = "failing"

    def observe(
        self, machine: BlockMachine, tenant: str, now: float, **kw: Any
    ) -> tuple[TenantState, Effects]:
        raise StoreUnavailable("backend down")

    def apply(
        self, tenant: str, mutation: Mutation, now: float, **kw: Any
    ) -> tuple[TenantState, Effects]:
        raise StoreUnavailable("backend down")

    def load(self, tenant: str) -> TenantState:
        raise StoreUnavailable("backend down")

    def history(self, tenant: str, *, limit: int | None = None) -> list[Any]:
        raise StoreUnavailable("backend down")

    def tenants(self) -> list[str]:
        raise StoreUnavailable("backend down")


def test_store_failure_is_a_temporary_failure_never_an_accept() -> None:
    """A failing store gives 451 4.3.0 (tempfail) for every counted message."""
    policy = make(FailingStore())
    for sender in ("alice@contoso.com", "x@spam.example"):
        decision = policy.evaluate(RelayRequest(sender, client_ip=ONPREM))
        assert decision.outcome is Outcome.TEMPFAIL
        assert decision.reply.code == 451
        assert decision.reply.status == "4.3.0"
        assert not decision.counted


def test_fail_open_only_by_explicit_choice() -> None:
    """fail_open=True accepts uncounted when the store fails, and says so."""
    decision = make(FailingStore(), fail_open=True).evaluate(
        RelayRequest("x@spam.example", client_ip=ONPREM)
    )
    assert (decision.outcome, decision.reason, decision.counted) == (
        Outcome.ACCEPT,
        "store_unavailable_fail_open",
        False,
    )


def test_closed_sqlite_store_gives_tempfail(tmp_path: Path) -> None:
    """A real SQLite store that became unusable gives 451, not an exception."""
    store = SQLiteStore(tmp_path / "s.db")
    policy = make(store)
    store.close()
    assert policy.evaluate(RelayRequest("alice@contoso.com")).outcome is Outcome.TEMPFAIL


def test_remediation_flow_unblocks_on_probation() -> None:
    """Request refused while steps are missing; after every step and approval: probation."""
    policy = make()
    for i in range(POLICY.message_limit + 1):
        policy.evaluate(RelayRequest(f"s@spam{i % 2}.example", client_ip=ONPREM))
    policy.connector_created(InboundConnector("rogue", "contoso"))
    with pytest.raises(ChecklistIncomplete) as info:
        policy.request_unblock("contoso", code="5.7.750", evidence="please", by="admin")
    assert len(info.value.missing) == 3
    policy.register_domain("contoso", "spam0.example", by="admin")
    policy.declare_not_ours("contoso", ["spam1.example"], by="admin")
    policy.review_connector("contoso", "rogue", kept=False, by="admin")
    policy.attest("contoso", by="admin", note="rebuilt")
    status = policy.status("contoso")
    assert status.checklist is not None
    assert status.checklist.complete
    policy.request_unblock("contoso", code="5.7.750", evidence="fixed", by="admin")
    policy.approve("contoso", by="support", reason="verified")
    status = policy.status("contoso")
    assert status.state is State.ACTIVE
    assert status.probation_until is not None
    assert (
        policy.evaluate(RelayRequest("x@spam0.example", client_ip=ONPREM)).reason
        == "accepted_domain"
    )
    actions = [r.action for r in status.history]
    assert actions[0] == "observe"
    assert actions[-2:] == ["request_unblock", "approve"]
    assert status.to_dict()["state"] == "active"


def test_register_domain_swaps_the_matcher_copy_on_write() -> None:
    """register_domain makes the domain accepted at once without touching the old matcher."""
    policy = make()
    old = policy.matcher
    policy.register_domain("fabrikam", "fabrikam.net", by="admin")
    assert policy.evaluate(RelayRequest("a@fabrikam.net")).tenant == "fabrikam"
    assert old.tenant_of("fabrikam.net") is None
    policy.remove_domain("fabrikam", "fabrikam.net", by="admin")
    assert policy.evaluate(RelayRequest("a@fabrikam.net")).reason == "no_tenant"
    with pytest.raises(InvalidConfiguration):
        policy.remove_domain("fabrikam", "fabrikam.net", by="admin")
    with pytest.raises(InvalidConfiguration):
        policy.register_domain("fabrikam", "contoso.com", by="admin")


@pytest.mark.parametrize(
    ("registered", "removed"),
    [
        (None, "bücher.example"),
        (None, "BÜCHER.example."),
        (None, "xn--bcher-kva.example"),
        ("Partner.Example.", "Partner.Example."),
        ("Partner.Example.", "partner.example"),
        ("partner.example", "PARTNER.EXAMPLE"),
        ("Bücher.Partner.Example", "xn--bcher-kva.partner.example."),
    ],
)
def test_remove_domain_normalises_like_register_domain(
    registered: str | None, removed: str
) -> None:
    """remove_domain accepts every spelling register_domain (or compile) accepts (issue 14.7)."""
    policy = make()
    if registered is not None:
        policy.register_domain("contoso", registered, by="admin")
    policy.remove_domain("contoso", removed, by="admin")
    gone = removed.rstrip(".")
    assert policy.evaluate(RelayRequest(f"a@{gone}")).reason == "no_tenant"


def test_remove_domain_of_an_invalid_name_names_it() -> None:
    """An invalid name is refused with InvalidConfiguration naming it, nothing changed."""
    policy = make()
    with pytest.raises(InvalidConfiguration, match=r"bad\.\.name"):
        policy.remove_domain("contoso", "bad..name", by="admin")
    assert len(policy.matcher) == len(MATCHER)


def test_reload_swaps_configuration() -> None:
    """reload() swaps the matcher atomically."""
    policy = make()
    policy.reload(matcher=DomainMatcher.compile([AcceptedDomain("new.example", "contoso")]))
    assert policy.evaluate(RelayRequest("a@new.example")).accepted
    assert policy.evaluate(RelayRequest("a@fabrikam.com")).reason == "no_tenant"


def test_evaluate_async_shares_the_logic() -> None:
    """evaluate_async gives the same decision as evaluate."""
    decision = asyncio.run(make().evaluate_async(RelayRequest("alice@contoso.com")))
    assert decision.reason == "accepted_domain"
    assert decision.reply == ACCEPTED_REPLY


@pytest.mark.parametrize(
    "options",
    [
        {"null_sender": "maybe"},
        {"count": "bytes"},
    ],
)
def test_bad_options_are_configuration_errors(options: Mapping[str, Any]) -> None:
    """Unknown options raise InvalidConfiguration listing the problem."""
    with pytest.raises(InvalidConfiguration):
        make(**options)


def test_wrong_argument_types_are_configuration_errors() -> None:
    """Passing something that is not a matcher raises InvalidConfiguration, not TypeError."""
    with pytest.raises(InvalidConfiguration) as info:
        RelayPolicy("contoso.com", store="memory:")  # type: ignore[arg-type]
    assert len(info.value.problems) == 2


@given(
    sender=st.one_of(hostile_text(max_size=300), addresses()),
    ip=st.one_of(st.none(), st.just(ONPREM), st.text(max_size=40)),
    cert=st.one_of(st.none(), st.text(max_size=40), st.just("mail.contoso.com")),
    certs=st.lists(st.one_of(st.text(max_size=40), st.just("mail.contoso.com")), max_size=5),
)
@settings(max_examples=200)
def test_evaluate_never_raises(
    sender: str, ip: str | None, cert: str | None, certs: list[str]
) -> None:
    """No request makes evaluate raise; every decision carries a valid reply."""
    decision = make().evaluate(
        RelayRequest(sender, client_ip=ip, tls_cert_name=cert, tls_cert_names=certs)
    )
    assert decision.reply.code in (250, 451, 501, 550)


class PolicyMachine(RuleBasedStateMachine):
    """Drives the facade with relay traffic and admin events, checking its promises."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.policy = RelayPolicy(MATCHER, CONNECTORS, POLICY, MemoryStore(), clock=self.clock)
        self.unregistered_sent = 0

    @rule(domain=st.sampled_from(["contoso.com", "bücher.example", "x.contoso.co.uk"]))
    def registered(self, domain: str) -> None:
        decision = self.policy.evaluate(RelayRequest(f"a@{domain}", client_ip=ONPREM))
        state = self.policy.status("contoso").state
        if state is State.SUSPENDED:
            assert decision.reason == "suspended"
        else:
            assert decision.accepted, decision

    @rule(n=st.integers(0, 9))
    def unregistered(self, n: int) -> None:
        before = self.policy.status("contoso").state
        decision = self.policy.evaluate(RelayRequest(f"s@spam{n}.example", client_ip=ONPREM))
        self.unregistered_sent += 1
        assert decision.counted
        if before is not State.ACTIVE:
            assert not decision.accepted
        if decision.accepted:
            assert self.policy.status("contoso").state is State.ACTIVE

    @rule()
    def operator_block(self) -> None:
        if self.policy.status("contoso").state is State.ACTIVE:
            self.policy.block("contoso", by="ops", reason="test")

    @precondition(lambda self: self.policy.status("contoso").state is not State.ACTIVE)
    @rule()
    def remediate_and_approve(self) -> None:
        status = self.policy.status("contoso")
        block = status.raw.block
        assert block is not None
        pending = [d for d in block.offending if d not in block.registered + block.declared]
        if pending:
            self.policy.declare_not_ours("contoso", pending, by="admin")
        if status.state is not State.UNBLOCK_REQUESTED:
            if block.attestation is None:
                self.policy.attest("contoso", by="admin", note="clean")
            self.policy.request_unblock(
                "contoso", code=block.code.value, evidence="fixed", by="admin"
            )
        self.policy.approve("contoso", by="support", reason="ok")
        assert self.policy.status("contoso").state is State.ACTIVE

    @rule()
    def fabrikam_unaffected(self) -> None:
        assert self.policy.evaluate(RelayRequest("c@fabrikam.com")).accepted

    @invariant()
    def counts_are_sane(self) -> None:
        status = self.policy.status("contoso")
        assert 0 <= status.unregistered <= status.total
        assert status.unregistered <= self.unregistered_sent


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_reload_connectors_resets_cached_attribution() -> None:
    """Attribution is cached per client; reloading connectors takes effect at once."""
    policy = make()
    assert (
        policy.evaluate(RelayRequest("x@fwd.example", client_ip="203.0.113.5")).reason
        == "no_tenant"
    )
    moved = ConnectorTable.compile(
        [InboundConnector("new", "fabrikam", sender_ip_ranges=("203.0.113.0/24",))], MATCHER
    )
    policy.reload(connectors=moved)
    assert (
        policy.evaluate(RelayRequest("x@fwd.example", client_ip="203.0.113.5")).tenant == "fabrikam"
    )


def test_reload_replies_resets_cached_decisions() -> None:
    """Cached refusals pick up new reply texts after reload(replies=...)."""
    policy = make()
    policy.block("contoso", by="ops", reason="test")
    first = policy.evaluate(RelayRequest("x@spam.example", client_ip=ONPREM))
    assert policy.evaluate(RelayRequest("x@spam.example", client_ip=ONPREM)) is first
    policy.reload(replies=ReplyCatalog(server_name="mx9.example.net"))
    again = policy.evaluate(RelayRequest("x@spam.example", client_ip=ONPREM))
    assert str(again.reply).endswith("[mx9.example.net]")


def test_unhashable_request_fields_do_not_crash() -> None:
    """A careless caller passing a list as certificate name still gets a decision."""
    careless: Any = ["x"]
    decision = make().evaluate(
        RelayRequest("alice@contoso.com", client_ip=ONPREM, tls_cert_name=careless)
    )
    assert decision.reply.code in (250, 451)


# --------------------------------------------------------------------------- certificate names

#: contoso's connector knows mail.contoso.com, fabrikam's mx.fabrikam.com; 198.51.100.0/24 is
#: contoso's, 192.0.2.0/24 is northwind's (a third tenant, so a fallback to the address shows).
MULTI_MATCHER = DomainMatcher.compile(
    [
        AcceptedDomain("contoso.com", "contoso"),
        AcceptedDomain("fabrikam.com", "fabrikam"),
        AcceptedDomain("northwind.example", "northwind"),
    ]
)
MULTI_CONNECTORS = ConnectorTable.compile(
    [
        InboundConnector("contoso", "contoso", "198.51.100.0/24", "mail.contoso.com"),
        InboundConnector("fabrikam", "fabrikam", (), "mx.fabrikam.com"),
        InboundConnector("northwind", "northwind", "192.0.2.0/24"),
    ],
    MULTI_MATCHER,
)


def multi() -> RelayPolicy:
    return RelayPolicy(MULTI_MATCHER, MULTI_CONNECTORS, POLICY, MemoryStore(), clock=Clock())


@pytest.mark.parametrize(
    ("given_names", "stored"),
    [
        ((), ()),
        (None, ()),
        ("mail.contoso.com", ("mail.contoso.com",)),
        (["a.example", "b.example"], ("a.example", "b.example")),
        (("a.example",), ("a.example",)),
        ((n for n in ["a.example", "b.example"]), ("a.example", "b.example")),
    ],
)
def test_tls_cert_names_converter(given_names: Any, stored: tuple[str, ...]) -> None:
    """A single name, None or any iterable of names is stored as a tuple, and the request stays
    hashable; tls_cert_name is untouched."""
    request = RelayRequest("a@contoso.com", tls_cert_name="x.example", tls_cert_names=given_names)
    assert request.tls_cert_names == stored
    assert request.tls_cert_name == "x.example"
    assert hash(request) == hash(
        RelayRequest("a@contoso.com", tls_cert_name="x.example", tls_cert_names=stored)
    )


def test_tls_cert_names_is_keyword_only_and_defaults_to_empty() -> None:
    """Positional construction is unchanged: the new field is keyword-only, default ()."""
    request = RelayRequest("a@contoso.com", "192.0.2.1", "mail.contoso.com", "user")
    assert (request.tls_cert_name, request.sasl_user, request.tls_cert_names) == (
        "mail.contoso.com",
        "user",
        (),
    )


@pytest.mark.parametrize(
    ("ip", "name", "names", "tenant"),
    [
        # the second name of the certificate attributes it
        ("203.0.113.5", None, ("mx1.unknown.example", "mail.contoso.com"), "contoso"),
        # the union of tls_cert_name and tls_cert_names
        ("203.0.113.5", "mx1.unknown.example", ("mail.contoso.com",), "contoso"),
        ("203.0.113.5", "mx.fabrikam.com", ("mx1.unknown.example",), "fabrikam"),
        ("203.0.113.5", "mail.contoso.com", ("mail.contoso.com", "x.unknown.example"), "contoso"),
        # the certificate wins over the address
        ("192.0.2.7", None, ("mx1.unknown.example", "mx.fabrikam.com"), "fabrikam"),
        # names of two tenants are ambiguous: the address decides
        ("192.0.2.7", None, ("mail.contoso.com", "mx.fabrikam.com"), "northwind"),
        ("192.0.2.7", "mail.contoso.com", ("mx.fabrikam.com",), "northwind"),
        ("198.51.100.7", "mx.fabrikam.com", ("mail.contoso.com",), "contoso"),
        # ... and without a connector for the address, the sender's domain
        ("203.0.113.5", None, ("mail.contoso.com", "mx.fabrikam.com"), None),
    ],
)
def test_policy_attributes_by_every_certificate_name(
    ip: str, name: str | None, names: tuple[str, ...], tenant: str | None
) -> None:
    """evaluate attributes by the union of tls_cert_name and tls_cert_names."""
    request = RelayRequest("x@forwarded.example", ip, name, tls_cert_names=names)
    decision = multi().evaluate(request)
    assert decision.tenant == tenant
    assert decision.reason == ("no_tenant" if tenant is None else "unregistered_allowed")


def test_ambiguous_certificate_falls_back_to_the_sender_domain() -> None:
    """Ambiguous names and no connector for the address: the sender's domain attributes."""
    request = RelayRequest(
        "alice@fabrikam.com",
        "203.0.113.5",
        tls_cert_names=("mail.contoso.com", "mx.fabrikam.com"),
    )
    decision = multi().evaluate(request)
    assert (decision.tenant, decision.reason) == ("fabrikam", "accepted_domain")


def test_the_explicit_name_is_considered_even_past_the_cap() -> None:
    """tls_cert_name comes first, so a long tls_cert_names cannot push it out."""
    filler = tuple(f"mx{i}.unknown.example" for i in range(ConnectorTable.MAX_CERT_NAMES))
    decision = multi().evaluate(
        RelayRequest(
            "x@forwarded.example", "203.0.113.5", "mail.contoso.com", tls_cert_names=filler
        )
    )
    assert decision.tenant == "contoso"
    beyond = RelayRequest(
        "x@forwarded.example", "203.0.113.5", tls_cert_names=[*filler, "mail.contoso.com"]
    )
    assert multi().evaluate(beyond).tenant is None


def test_attribution_cache_keys_on_all_the_names() -> None:
    """Cached attribution distinguishes requests from one address by their certificate names."""
    policy = multi()
    one = RelayRequest("x@fwd.example", "203.0.113.5", tls_cert_names=("mail.contoso.com",))
    both = RelayRequest(
        "x@fwd.example", "203.0.113.5", tls_cert_names=("mail.contoso.com", "mx.fabrikam.com")
    )
    other = RelayRequest("x@fwd.example", "203.0.113.5", tls_cert_names=("mx.fabrikam.com",))
    for _ in range(2):
        assert [policy.evaluate(r).tenant for r in (one, both, other)] == [
            "contoso",
            None,
            "fabrikam",
        ]


def test_unhashable_certificate_names_do_not_crash() -> None:
    """Unhashable items among the names are evaluated uncached, the valid names still count."""
    careless: Any = [["x"], "mail.contoso.com"]
    decision = multi().evaluate(
        RelayRequest("x@forwarded.example", "203.0.113.5", tls_cert_names=careless)
    )
    assert (decision.tenant, decision.reason) == ("contoso", "unregistered_allowed")


def test_remove_domain_registered_elsewhere_is_recorded() -> None:
    """A domain registered on the checklist by another process can be removed again here."""
    policy = make()
    for i in range(POLICY.message_limit + 1):
        policy.evaluate(RelayRequest(f"x@spam{i % 2}.example", client_ip=ONPREM))
    other = RelayPolicy(MATCHER, CONNECTORS, POLICY, policy.store, clock=Clock())
    other.store.apply(
        "contoso",
        lambda s, now: other.machine.register_domain(s, now, "spam0.example"),
        NOW,
        action="register_domain",
    )
    assert "spam0.example" in policy.status("contoso").raw.block.registered  # type: ignore[union-attr]
    state = policy.remove_domain("contoso", "spam0.example", by="admin")
    assert state.block is not None
    assert "spam0.example" not in state.block.registered


# --------------------------------------------------------------------------- evaluate_many

_REQUESTS = [
    RelayRequest("alice@contoso.com"),
    RelayRequest("bob@contoso.com", client_ip=ONPREM),
    RelayRequest("carol@fabrikam.com"),
    RelayRequest("<>"),
    RelayRequest("a@@b", client_ip=ONPREM),
    RelayRequest("x@[192.0.2.1]", client_ip=ONPREM),
    RelayRequest("x@nobody.example"),
    RelayRequest("x@spam1.example", client_ip=ONPREM),
    RelayRequest("x@spam2.example", client_ip=ONPREM, recipients=("a@b.example", "c@d.example")),
    RelayRequest("x@spam3.example", client_ip=ONPREM),
    RelayRequest("x@spam4.example", tls_cert_name="mail.contoso.com", client_ip="203.0.113.9"),
    RelayRequest("x@spam5.example", client_ip=ONPREM),
    RelayRequest(
        "x@spam6.example",
        client_ip="203.0.113.9",
        tls_cert_names=("mx1.fabrikam.net", "mail.contoso.com"),
    ),
]


@given(
    batches=st.lists(st.lists(st.sampled_from(_REQUESTS), max_size=20), min_size=1, max_size=5),
    count=st.sampled_from(["messages", "recipients"]),
    on=st.sampled_from(["memory", "sqlite"]),
)
@settings(max_examples=100)
def test_evaluate_many_equals_sequential_evaluate(
    batches: list[list[RelayRequest]], count: str, on: str
) -> None:
    """Random batches of requests (every path: accepted, blocked at the crossing message,
    refused, uncounted) give exactly the decisions of evaluate one by one, and the same states
    and audit trails."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        store: StateStore = MemoryStore() if on == "memory" else SQLiteStore(Path(scratch) / "s.db")
        alerts: list[object] = []
        expected_alerts: list[object] = []
        batched = make(store, count=count, on_alert=alerts.append)
        sequential = make(count=count, on_alert=expected_alerts.append)
        try:
            for batch in batches:
                expected = [sequential.evaluate(request) for request in batch]
                assert batched.evaluate_many(batch) == expected
            for tenant in ("contoso", "fabrikam"):
                assert (
                    batched.store.load(tenant).to_dict() == sequential.store.load(tenant).to_dict()
                )
                assert [r.to_dict() for r in batched.store.history(tenant)] == [
                    r.to_dict() for r in sequential.store.history(tenant)
                ]
            assert alerts == expected_alerts
        finally:
            store.close()


def test_evaluate_many_of_nothing_is_nothing() -> None:
    """An empty batch gives no decisions and counts nothing."""
    policy = make()
    assert policy.evaluate_many([]) == []
    assert policy.evaluate_many(iter(())) == []
    assert policy.store.tenants() == []


def test_evaluate_many_store_failure_is_a_temporary_failure() -> None:
    """With a failing store every counted message of the batch is 451 4.3.0 and uncounted;
    the decisions that need no counting are unchanged."""
    batch = [_REQUESTS[0], _REQUESTS[6], _REQUESTS[7], _REQUESTS[3], _REQUESTS[4]]
    decisions = make(FailingStore()).evaluate_many(batch)
    assert [d.reason for d in decisions] == [
        "store_unavailable",
        "no_tenant",
        "store_unavailable",
        "null_sender",
        "bad_sender",
    ]
    assert [d.reply.status for d in decisions] == ["4.3.0", "5.7.64", "4.3.0", "2.1.0", "5.1.7"]
    assert not any(d.counted for d in decisions)
    assert decisions[2].tenant == "contoso"


def test_evaluate_many_fail_open_only_by_explicit_choice() -> None:
    """fail_open=True accepts the counted messages of a failed batch uncounted, and says so."""
    decisions = make(FailingStore(), fail_open=True).evaluate_many(_REQUESTS[:2])
    assert [(d.outcome, d.reason, d.counted) for d in decisions] == [
        (Outcome.ACCEPT, "store_unavailable_fail_open", False)
    ] * 2


def test_evaluate_many_sqlite_failure_fails_the_whole_batch(tmp_path: Path) -> None:
    """SQLite counts a batch in one transaction: when it cannot, every counted message of the
    batch is 451 and none is counted."""
    import sqlite3

    path = tmp_path / "s.db"
    with SQLiteStore(path, timeout=0.05) as store:
        policy = make(store)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            decisions = policy.evaluate_many(_REQUESTS[:3])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert [d.reason for d in decisions] == ["store_unavailable"] * 3
        assert store.tenants() == []


class BrokenBatchStore(MemoryStore):
    """observe_many raises an unexpected error (a bug), or returns too few results."""

    def __init__(self, short: bool) -> None:
        super().__init__()
        self.short = short

    def observe_many(self, machine: BlockMachine, items: Any, now: Any) -> list[Any]:
        if self.short:
            return []
        raise KeyError("bug")


@pytest.mark.parametrize("short", [False, True])
def test_evaluate_many_never_raises_on_a_broken_store(short: bool) -> None:
    """A store bug in observe_many makes each counted message an internal-error tempfail."""
    decisions = make(BrokenBatchStore(short)).evaluate_many([_REQUESTS[0], _REQUESTS[3]])
    assert [(d.reason, d.reply.code) for d in decisions] == [
        ("internal_error", 451),
        ("null_sender", 250),
    ]


def test_evaluate_many_clock_failure_is_per_message() -> None:
    """A clock that fails for one message tempfails that message only."""
    calls = iter([NOW, None, NOW + 2])

    def clock() -> float:
        value = next(calls)
        if value is None:
            raise StoreUnavailable("no time")
        return value

    policy = RelayPolicy(MATCHER, CONNECTORS, POLICY, MemoryStore(), clock=clock)
    decisions = policy.evaluate_many([_REQUESTS[0], _REQUESTS[1], _REQUESTS[2]])
    assert [d.reason for d in decisions] == [
        "accepted_domain",
        "store_unavailable",
        "accepted_domain",
    ]


def test_evaluate_many_async_shares_the_logic() -> None:
    """evaluate_many_async gives the decisions of evaluate_many."""
    decisions = asyncio.run(make().evaluate_many_async(iter(_REQUESTS)))
    assert decisions == make().evaluate_many(_REQUESTS)


def test_default_clock_for_observations_is_the_store_observation_clock() -> None:
    """Without a clock, counting reads StateStore.observation_clock: plain time for the embedded
    stores, the store's own now when it has one."""
    import time

    assert MemoryStore().observation_clock() is time.time

    class Slow(FailingStore):
        def now(self) -> float:
            return 5.0

    policy = RelayPolicy(MATCHER, CONNECTORS, POLICY, Slow())
    assert policy._observe_clock() == 5.0

"""The web console over HTTP (Starlette's TestClient): every route's authorisation, CSRF, escaping,
sessions, the login rate limit, bad input, a store that is down, and the remediation story."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from console_support import (
    EVIL_CONNECTOR,
    PASSWORD,
    add_accounts,
    block_contoso,
    csrf_of,
    login,
    make_policy,
)
from domainpolicy import (
    InvalidConfiguration,
    RelayPolicy,
    RelayRequest,
    SQLiteStore,
    StateStore,
    open_store,
)
from domainpolicy._cli import main
from domainpolicy._errors import StoreUnavailable
from domainpolicy._stores.accounts import (
    SUPPORT,
    Account,
    AccountStore,
    MemoryAccounts,
    SQLiteAccounts,
    accounts_for,
)
from domainpolicy.console import create_app
from domainpolicy.console._app import ACTIONS, ROUTES, ConsoleRoute
from domainpolicy.console._auth import hash_password, verify_password
from domainpolicy.console._chart import relay_chart
from redis_support import redis_cluster_url, redis_url

# Values that a form of each action accepts (for the authorisation tests).
GOOD_FIELDS: dict[str, dict[str, str]] = {
    "register": {"domain": "forged0.example"},
    "declare": {"domain": "forged1.example"},
    "review": {"connector": EVIL_CONNECTOR, "outcome": "kept"},
    "attest": {"note": "reinstalled"},
    "request-unblock": {"code": "5.7.750", "evidence": "done"},
    "approve": {"reason": "ok"},
    "deny": {"reason": "no"},
    "block": {"reason": "spam"},
    "suspend": {"reason": "spam"},
}


@pytest.fixture
def policy() -> RelayPolicy:
    policy = make_policy()
    block_contoso(policy)
    add_accounts(accounts_for(policy.store))
    return policy


@pytest.fixture
def client(policy: RelayPolicy) -> TestClient:
    return TestClient(create_app(policy, tenants={"contoso", "fabrikam"}))


def snapshot(policy: RelayPolicy, tenant: str = "contoso") -> tuple[Any, ...]:
    status = policy.status(tenant, history=None)
    return (status.raw.to_dict(), [r.to_dict() for r in status.history])


def call(client: TestClient, route: ConsoleRoute, tenant: str, csrf: str) -> Any:
    path = route.path.replace("{tenant}", tenant)
    if route.method == "GET":
        return client.get(path, follow_redirects=False)
    action = route.path.rsplit("/", 1)[1]
    fields = GOOD_FIELDS[action]
    if route.api:
        return client.post(path, json=fields, headers={"X-CSRF-Token": csrf})
    return client.post(path, data={**fields, "csrf": csrf}, follow_redirects=False)


def page_csrf(client: TestClient, path: str) -> str:
    return csrf_of(client.get(path).text)


# --------------------------------------------------------------------------- the route table


def test_route_table_is_every_guarded_route(client: TestClient) -> None:
    """Every route of the app is in ROUTES, except the open ones (login, logout, /, css)."""
    app: Any = client.app
    paths = {
        (method, r.path)
        for r in app.routes
        if isinstance(r, Route)
        for method in (r.methods or set()) - {"HEAD"}
    }
    open_routes = {
        ("GET", "/"),
        ("GET", "/login"),
        ("POST", "/login"),
        ("POST", "/logout"),
        ("GET", "/static/console.css"),
    }
    assert paths - open_routes == {(r.method, r.path) for r in ROUTES}
    assert set(GOOD_FIELDS) == set(ACTIONS)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_another_tenants_admin_gets_404_or_403_and_changes_nothing(
    policy: RelayPolicy, client: TestClient, route: ConsoleRoute
) -> None:
    assert login(client, "fred").status_code == 303
    csrf = page_csrf(client, "/t/fabrikam")
    before = snapshot(policy)
    response = call(client, route, "contoso", csrf)
    if "{tenant}" in route.path:
        assert response.status_code == 404
    else:
        assert response.status_code == 403
    assert "contoso" not in response.text or route.access == "support"
    assert snapshot(policy) == before


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_signed_out_is_sent_to_login_or_401(
    policy: RelayPolicy, client: TestClient, route: ConsoleRoute
) -> None:
    before = snapshot(policy)
    response = call(client, route, "contoso", "x")
    if route.api:
        assert response.status_code == 401
        assert response.json()["ok"] is False
    else:
        assert response.status_code == 303
        assert response.headers["location"] == "/login"
    assert snapshot(policy) == before


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.method == "POST"], ids=lambda r: f"{r.method} {r.path}"
)
@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_csrf_is_refused(
    policy: RelayPolicy, client: TestClient, route: ConsoleRoute, token: str | None
) -> None:
    login(client, "sam")
    before = snapshot(policy)
    path = route.path.replace("{tenant}", "contoso")
    fields = GOOD_FIELDS[route.path.rsplit("/", 1)[1]]
    if route.api:
        headers = {} if token is None else {"X-CSRF-Token": token}
        response = client.post(path, json=fields, headers=headers)
        assert response.json()["ok"] is False
    else:
        data = fields if token is None else {**fields, "csrf": token}
        response = client.post(path, data=data)
        assert "security token" in response.text
    assert response.status_code == 403
    assert snapshot(policy) == before


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.method == "GET"], ids=lambda r: f"{r.method} {r.path}"
)
@pytest.mark.parametrize("name", ["alice", "sam"])
def test_allowed_readers_get_every_page(client: TestClient, route: ConsoleRoute, name: str) -> None:
    login(client, name)
    response = client.get(route.path.replace("{tenant}", "contoso"), follow_redirects=False)
    if name == "alice" and route.access == "support":
        assert response.status_code == 403
    else:
        assert response.status_code == 200
        assert "contoso" in response.text or "{tenant}" not in route.path


def test_tenant_admin_gets_403_on_support_actions_of_own_tenant(
    policy: RelayPolicy, client: TestClient
) -> None:
    login(client, "alice")
    csrf = page_csrf(client, "/t/contoso")
    before = snapshot(policy)
    for name in ("approve", "deny", "block", "suspend"):
        response = client.post(f"/t/contoso/{name}", data={"reason": "x", "csrf": csrf})
        assert response.status_code == 403
    assert snapshot(policy) == before


def test_support_unknown_tenant_is_404(client: TestClient) -> None:
    login(client, "sam")
    assert client.get("/t/nobody").status_code == 404
    assert client.get("/api/tenants/nobody").status_code == 404


# --------------------------------------------------------------------------- the story


def test_remediation_story_over_http(policy: RelayPolicy, client: TestClient) -> None:
    login(client, "alice")
    page = client.get("/t/contoso")
    assert page.status_code == 200
    assert "blocked" in page.text
    assert "<svg" in page.text
    assert "limit 4" in page.text
    csrf = csrf_of(page.text)
    offending = policy.status("contoso").raw.block.offending  # type: ignore[union-attr]
    response = client.post(
        "/t/contoso/register", data={"domain": offending[0], "csrf": csrf}, follow_redirects=False
    )
    assert response.status_code == 303
    for domain in offending[1:]:
        assert client.post("/t/contoso/declare", data={"domain": domain, "csrf": csrf}).is_success
    for connector in policy.status("contoso").raw.block.to_review:  # type: ignore[union-attr]
        data = {"connector": connector, "outcome": "removed", "csrf": csrf}
        assert client.post("/t/contoso/review", data=data).is_success
    assert client.post("/t/contoso/attest", data={"note": "patched", "csrf": csrf}).is_success
    before = snapshot(policy)
    wrong = client.post(
        "/t/contoso/request-unblock", data={"code": "5.7.705", "evidence": "e", "csrf": csrf}
    )
    assert wrong.status_code == 400
    assert "block code does not match" in wrong.text
    assert "Nothing was changed" in wrong.text
    assert snapshot(policy) == before
    done = client.post(
        "/t/contoso/request-unblock",
        data={"code": "5.7.750", "evidence": "server rebuilt", "csrf": csrf},
    )
    assert done.is_success
    assert policy.status("contoso").state.value == "unblock_requested"

    support = TestClient(client.app)
    login(support, "sam")
    queue = support.get("/support")
    assert "contoso" in queue.text
    assert "server rebuilt" in queue.text
    assert support.get("/api/queue").json()["queue"][0]["tenant"] == "contoso"
    scsrf = page_csrf(support, "/t/contoso")
    approved = support.post("/t/contoso/approve", data={"reason": "verified", "csrf": scsrf})
    assert approved.is_success
    assert policy.status("contoso").state.value == "active"
    actors = {r.actor for r in policy.status("contoso", history=None).history}
    assert {"alice", "sam"} <= actors
    history = client.get("/t/contoso/history").text
    assert "verified" in history
    assert "sam" in history
    decision = policy.evaluate(RelayRequest("news@forged5.example", client_ip="198.51.100.9"))
    assert decision.accepted


def test_api_mirrors_the_actions_with_basic_auth(policy: RelayPolicy, client: TestClient) -> None:
    auth = ("alice", PASSWORD)
    status = client.get("/api/tenants/contoso", auth=auth).json()
    assert status["state"] == "blocked"
    assert status["block"]["code"] == "5.7.750"
    bad = client.post("/api/tenants/contoso/register", json={"domain": "not a domain"}, auth=auth)
    assert bad.status_code == 400
    assert "not a valid domain" in bad.json()["error"]
    ok = client.post("/api/tenants/contoso/attest", json={"note": "done"}, auth=auth)
    assert ok.json() == {"ok": True, "action": "attest", "tenant": "contoso", "state": "blocked"}
    refused = client.post(
        "/api/tenants/contoso/request-unblock",
        json={"code": "5.7.750", "evidence": "x"},
        auth=auth,
    )
    assert refused.status_code == 400
    assert "steps missing" in refused.json()["error"]
    assert client.get("/api/tenants/fabrikam", auth=auth).status_code == 404
    assert client.get("/api/tenants/contoso", auth=("alice", "wrong")).status_code == 401
    history = client.get("/api/tenants/contoso/history", auth=auth).json()["history"]
    assert history[-1]["action"] == "attest"
    assert history[-1]["actor"] == "alice"
    found = client.get("/api/tenants", params={"q": "fab"}, auth=("sam", PASSWORD)).json()
    assert found == {"tenants": ["fabrikam"]}


# --------------------------------------------------------------------------- escaping


def test_markup_in_stored_values_is_inert(policy: RelayPolicy, client: TestClient) -> None:
    evil = "<script>alert(1)</script>"
    policy.attest("contoso", by=evil, note=evil)
    login(client, "sam")
    for path in ("/t/contoso", "/t/contoso/history"):
        text = client.get(path).text
        assert "<script>" not in text
        assert "&lt;script&gt;" in text
    assert (
        EVIL_CONNECTOR.replace("<", "&lt;").replace(">", "&gt;")[:20]
        in client.get("/t/contoso").text
    )
    assert "<script>" not in client.get("/support/search", params={"q": evil}).text


def test_markup_in_requests_and_denials_is_inert(policy: RelayPolicy, client: TestClient) -> None:
    evil = "<script>alert(2)</script>"
    block = policy.status("contoso").raw.block
    assert block is not None
    for domain in block.offending:
        policy.declare_not_ours("contoso", [domain], by="t", note=evil)
    for connector in block.to_review:
        policy.review_connector("contoso", connector, kept=True, by=evil)
    policy.attest("contoso", by="t", note="n")
    policy.request_unblock("contoso", code="5.7.750", evidence=evil, by="t")
    login(client, "sam")
    assert "<script>" not in client.get("/support").text
    assert "&lt;script&gt;alert(2)" in client.get("/support").text
    csrf = page_csrf(client, "/t/contoso")
    assert client.post("/t/contoso/deny", data={"reason": evil, "csrf": csrf}).is_success
    for path in ("/t/contoso", "/t/contoso/history"):
        text = client.get(path).text
        assert "<script>" not in text
        assert "&lt;script&gt;alert(2)" in text


def test_anonymous_sessions_are_bounded() -> None:
    from domainpolicy.console._auth import MAX_SESSIONS, Sessions

    sessions = Sessions()
    signed_in = sessions.new(Account("sam", SUPPORT, None, "h"))
    for _ in range(MAX_SESSIONS + 50):
        sessions.new(None)
    assert sessions.get(signed_in.token) is signed_in
    assert len(sessions._sessions) <= MAX_SESSIONS


def test_security_headers(client: TestClient) -> None:
    response = client.get("/login")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


# --------------------------------------------------------------------------- sessions


def test_session_cookie_flags_and_rotation(client: TestClient) -> None:
    anonymous = client.get("/login")
    before = anonymous.cookies["dp_session"]
    cookie = anonymous.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "secure" not in cookie
    response = login(client, "alice")
    after = response.cookies["dp_session"]
    assert after != before
    attacker = TestClient(client.app, cookies={"dp_session": before})
    assert attacker.get("/t/contoso", follow_redirects=False).status_code == 303


def test_session_fixation_with_a_planted_cookie(client: TestClient) -> None:
    client.cookies.set("dp_session", "planted-by-attacker")
    response = login(client, "alice")
    assert response.status_code == 303
    assert response.cookies["dp_session"] != "planted-by-attacker"
    attacker = TestClient(client.app, cookies={"dp_session": "planted-by-attacker"})
    assert attacker.get("/t/contoso", follow_redirects=False).status_code == 303


def test_cookie_is_secure_over_tls(policy: RelayPolicy) -> None:
    client = TestClient(create_app(policy), base_url="https://testserver")
    assert "secure" in client.get("/login").headers["set-cookie"].lower()


def test_logout_forgets_the_session(client: TestClient) -> None:
    login(client, "alice")
    csrf = page_csrf(client, "/t/contoso")
    token = client.cookies["dp_session"]
    client.post("/logout", data={"csrf": csrf})
    again = TestClient(client.app, cookies={"dp_session": token})
    assert again.get("/t/contoso", follow_redirects=False).status_code == 303


def test_login_needs_the_forms_token(client: TestClient) -> None:
    client.get("/login")
    response = client.post("/login", data={"name": "alice", "password": PASSWORD})
    assert response.status_code == 403


# --------------------------------------------------------------------------- rate limit


def test_login_rate_limit_per_account(client: TestClient) -> None:
    for _ in range(5):
        assert login(client, "alice", "wrong").status_code == 401
    response = login(client, "alice")
    assert response.status_code == 429
    assert "too many failed logins" in response.text


def test_login_rate_limit_per_address(client: TestClient) -> None:
    for n in range(20):
        assert login(client, f"nobody{n}", "wrong").status_code == 401
    assert login(client, "sam").status_code == 429


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("action", "fields", "expected"),
    [
        ("register", {"domain": "bad..domain"}, "not a valid domain"),
        ("register", {"domain": "<b>x</b>.example"}, "not a valid domain"),
        ("register", {"domain": "a" * 300}, "too long"),
        ("attest", {"note": "x" * 5000}, "too long"),
        ("attest", {"note": ""}, "required"),
        ("review", {"connector": "c", "outcome": "maybe"}, "outcome must be"),
        ("declare", {"domain": "unrelated.example"}, "unrelated.example"),
    ],
)
def test_bad_form_input_is_a_readable_error_and_changes_nothing(
    policy: RelayPolicy, client: TestClient, action: str, fields: dict[str, str], expected: str
) -> None:
    login(client, "alice")
    csrf = page_csrf(client, "/t/contoso")
    before = snapshot(policy)
    response = client.post(f"/t/contoso/{action}", data={**fields, "csrf": csrf})
    assert response.status_code in (400, 409)
    assert expected in response.text
    assert "<b>x</b>" not in response.text
    assert snapshot(policy) == before
    api = client.post(f"/api/tenants/contoso/{action}", json=fields, headers={"X-CSRF-Token": csrf})
    assert api.status_code in (400, 409)
    assert api.json()["ok"] is False
    assert snapshot(policy) == before


def test_non_utf8_bodies_are_refused(policy: RelayPolicy, client: TestClient) -> None:
    login(client, "alice")
    csrf = page_csrf(client, "/t/contoso")
    before = snapshot(policy)
    form = b"note=%FF%FE&csrf=" + csrf.encode()
    response = client.post(
        "/t/contoso/attest",
        content=form,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400
    assert "UTF-8" in response.text
    raw = client.post(
        "/t/contoso/attest",
        content=b"note=\xff&csrf=" + csrf.encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert raw.status_code == 400
    api = client.post(
        "/api/tenants/contoso/attest",
        content=b'{"note": "\xff"}',
        headers={"X-CSRF-Token": csrf, "content-type": "application/json"},
    )
    assert api.status_code == 400
    assert "UTF-8" in api.json()["error"]
    big = client.post("/t/contoso/attest", content=b"x" * 70_000)
    assert big.status_code == 400
    assert snapshot(policy) == before


# --------------------------------------------------------------------------- store down


class _Down(Exception):
    pass


def test_store_down_is_a_503_page(
    policy: RelayPolicy, client: TestClient, monkeypatch: Any
) -> None:
    login(client, "alice")
    csrf = page_csrf(client, "/t/contoso")
    before = snapshot(policy)

    def down(*args: object, **kwargs: object) -> Any:
        raise StoreUnavailable("the store is down")

    store = policy.store
    with monkeypatch.context() as patch:
        patch.setattr(store, "apply", down)
        patch.setattr(store, "load", down)
        page = client.get("/t/contoso")
        assert page.status_code == 503
        assert "unavailable" in page.text
        post = client.post("/t/contoso/attest", data={"note": "n", "csrf": csrf})
        assert post.status_code == 503
        assert "nothing was changed" in post.text
        api = client.post(
            "/api/tenants/contoso/attest", json={"note": "n"}, headers={"X-CSRF-Token": csrf}
        )
        assert api.status_code == 503
        assert "unavailable" in api.json()["error"]
    assert snapshot(policy) == before


# --------------------------------------------------------------------------- parts


def test_passwords_are_scrypt_hashes() -> None:
    encoded = hash_password("a long password", n=2**10)
    assert encoded.startswith("scrypt$1024$8$1$")
    assert verify_password("a long password", encoded)
    assert not verify_password("a long passworD", encoded)
    assert not verify_password("x", None)
    assert not verify_password("x", "md5$nonsense")


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "redis-cluster"])
def test_account_stores(tmp_path: Path, kind: str) -> None:
    """Every account store keeps accounts and counts login failures in a sliding window."""
    state: StateStore | None = None
    if kind == "memory":
        accounts: AccountStore = MemoryAccounts()
    elif kind == "sqlite":
        accounts = SQLiteAccounts(str(tmp_path / "a.db"))
    else:
        url = redis_url(tmp_path) if kind == "redis" else redis_cluster_url(tmp_path)
        state = open_store(url)
        accounts = accounts_for(state)
    try:
        accounts.put(Account("sam", SUPPORT, None, "h"))
        assert accounts.get("sam") == Account("sam", SUPPORT, None, "h")
        assert accounts.get("nobody") is None
        assert [a.name for a in accounts.list()] == ["sam"]
        assert accounts.record_failure("k", 100.0, 10.0) == 1
        assert accounts.record_failure("k", 105.0, 10.0) == 2
        assert accounts.failures("k", 112.0, 10.0) == 1
        assert accounts.record_failure("k", 200.0, 10.0) == 1
        accounts.clear_failures("k")
        assert accounts.failures("k", 200.0, 10.0) == 0
    finally:
        if state is not None:
            state.close()
    with pytest.raises(ValueError, match="tenant admin"):
        Account("x", "tenant-admin", None, "h")


def test_accounts_live_in_the_store(tmp_path: Path) -> None:
    """Accounts outlive the process in a SQLite file and in Redis; another store is refused."""
    with SQLiteStore(tmp_path / "s.db") as store:
        accounts_for(store).put(Account("sam", SUPPORT, None, "h"))
    with SQLiteStore(tmp_path / "s.db") as store:
        assert accounts_for(store).get("sam") is not None
    url = redis_url(tmp_path)
    with open_store(url) as store:
        accounts_for(store).put(Account("sam", SUPPORT, None, "h"))
    with open_store(url) as store:
        assert accounts_for(store).get("sam") == Account("sam", SUPPORT, None, "h")
    with pytest.raises(InvalidConfiguration, match="not a elsewhere store"):
        accounts_for(SimpleNamespace(kind="elsewhere"))  # type: ignore[arg-type]


def test_chart_draws_bars_running_total_and_limit() -> None:
    svg = relay_chart([[8, 3, 2], [10, 5, 5]], 10, 5, 4, 60)
    assert svg.startswith("<svg")
    assert svg.count("<rect") == 2
    assert "polyline" in svg
    assert 'class="limit"' in svg
    assert ">4</text>" in svg


# --------------------------------------------------------------------------- command line


def test_console_without_the_extra_exits_2_with_one_line(
    monkeypatch: Any, capsys: Any, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code = main(["console", "--store", f"sqlite:{tmp_path / 's.db'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "pip install 'domainpolicy[console]'" in err


def test_user_add_and_list(monkeypatch: Any, tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 's.db'}"
    with SQLiteStore(tmp_path / "s.db") as store:
        block_contoso(make_policy(store), evil_connector=False)  # contoso is now in the store
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    out = io.StringIO()
    args = ["console", "user", "add", "alice", "--role", "tenant-admin", "--tenant", "contoso"]
    assert main([*args, "--password-stdin", "--store", url], out=out) == 0
    assert "alice" in out.getvalue()
    with SQLiteStore(tmp_path / "s.db") as store:
        account = accounts_for(store).get("alice")
    assert account is not None
    assert verify_password(PASSWORD, account.password_hash)
    listed = io.StringIO()
    assert main(["console", "user", "list", "--store", url], out=listed) == 0
    assert listed.getvalue() == "alice\ttenant-admin\tcontoso\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main([*args, "--password-stdin", "--store", url]) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    unknown = [*args[:-1], "nobody", "--password-stdin", "--store", url]
    assert main(unknown) == 1
    support_with_tenant = ["console", "user", "add", "bob", "--role", "support", "--tenant", "x"]
    assert main([*support_with_tenant, "--password-stdin", "--store", url]) == 2


def test_console_users_on_redis_and_a_redis_that_is_down(tmp_path: Path, capsys: Any) -> None:
    """``console user list`` reads accounts kept in Redis; an unreachable Redis is one line,
    exit 2."""
    url = redis_url(tmp_path)
    with open_store(url) as store:
        accounts_for(store).put(Account("sam", SUPPORT, None, hash_password("a long password")))
    assert main(["console", "user", "list", "--store", url]) == 0
    assert "sam" in capsys.readouterr().out
    code = main(["console", "user", "list", "--store", "redis://127.0.0.1:1/0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Redis store unreachable" in err


def test_mounted_under_a_prefix(policy: RelayPolicy) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/relay-console", app=create_app(policy))])
    client = TestClient(outer)
    page = client.get("/relay-console/login")
    assert 'action="/relay-console/login"' in page.text
    assert "Path=/relay-console" in page.headers["set-cookie"]
    response = client.post(
        "/relay-console/login",
        data={"csrf": csrf_of(page.text), "name": "alice", "password": PASSWORD},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/relay-console/"
    assert client.get("/relay-console/t/contoso").status_code == 200


def test_queue_is_oldest_first(policy: RelayPolicy, client: TestClient) -> None:
    for tenant in ("fabrikam", "contoso"):
        if tenant == "fabrikam":
            policy.block(tenant, by="sam", reason="test")
        block = policy.status(tenant).raw.block
        assert block is not None
        for domain in block.offending:
            policy.declare_not_ours(tenant, [domain], by="t")
        for connector in block.to_review:
            policy.review_connector(tenant, connector, kept=False, by="t")
        policy.attest(tenant, by="t", note="n")
        policy.request_unblock(tenant, code="5.7.750", evidence=f"{tenant} first", by="t")
    login(client, "sam")
    queue = client.get("/api/queue").json()["queue"]
    assert [row["tenant"] for row in queue] == ["fabrikam", "contoso"]
    text = client.get("/support").text
    assert text.index("fabrikam first") < text.index("contoso first")

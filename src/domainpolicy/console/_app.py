"""The console's ASGI application: routes, authorisation, forms, the JSON API, error pages.

Every route is declared once in `ROUTES` with who may call it; every tenant-scoped route checks
the tenant against the signed-in account on the server (a tenant admin asking for another
tenant gets 404, a support-only route 403).  Forms are parsed here, strictly (UTF-8 only, size
and field limits), and every state change goes through `RelayPolicy` with the account's name as
the actor of the audit record.

Imports Starlette and Jinja2 (the ``console`` extra), the library's policy and stores, and the
console's `_auth` and `_chart`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domainpolicy._blockstate import ChecklistIncomplete, State, TenantState
from domainpolicy._errors import (
    DomainPolicyError,
    InvalidConfiguration,
    InvalidDomain,
    StoreUnavailable,
)
from domainpolicy._names import normalize_domain
from domainpolicy._policy import RelayPolicy, TenantStatus
from domainpolicy._stores.accounts import SUPPORT, Account, AccountStore
from domainpolicy.console._auth import (
    MAX_PASSWORD,
    LoginLimiter,
    Session,
    Sessions,
    csrf_ok,
    verify_password,
)
from domainpolicy.console._chart import relay_chart

__all__ = ["COOKIE", "ROUTES", "Action", "ConsoleRoute", "build_app"]

log = logging.getLogger("domainpolicy.console")

COOKIE: Final = "dp_session"
MAX_BODY: Final = 64 * 1024
_MAX_FIELD: Final = {"domain": 253, "connector": 200, "code": 16, "name": 200, "q": 200}
_MAX_TEXT: Final = 2000
_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)


class BadInput(Exception):
    """A form or JSON body is unusable; the message is shown to the user (fixed text plus
    escaped values)."""


@attrs.frozen
class Action:
    """A state-changing action on one tenant: its form fields and who may run it."""

    name: str
    title: str
    fields: tuple[str, ...]
    support_only: bool
    run: Callable[[RelayPolicy, str, str, Mapping[str, str]], TenantState]


def _register(policy: RelayPolicy, tenant: str, by: str, f: Mapping[str, str]) -> TenantState:
    return policy.register_domain(tenant, f["domain"], by=by)


def _declare(policy: RelayPolicy, tenant: str, by: str, f: Mapping[str, str]) -> TenantState:
    return policy.declare_not_ours(tenant, [f["domain"]], by=by, note=f.get("note", ""))


def _review(policy: RelayPolicy, tenant: str, by: str, f: Mapping[str, str]) -> TenantState:
    if f["outcome"] not in ("kept", "removed"):
        raise BadInput("outcome must be 'kept' or 'removed'")
    return policy.review_connector(tenant, f["connector"], kept=f["outcome"] == "kept", by=by)


def _attest(policy: RelayPolicy, tenant: str, by: str, f: Mapping[str, str]) -> TenantState:
    return policy.attest(tenant, by=by, note=f["note"])


def _request(policy: RelayPolicy, tenant: str, by: str, f: Mapping[str, str]) -> TenantState:
    block = policy.store.load(tenant).block
    if block is None or f["code"] != block.code.value:
        raise BadInput(
            "the block code does not match: quote the enhanced status code of the refusal "
            "(for example 5.7.750)"
        )
    return policy.request_unblock(tenant, code=f["code"], evidence=f["evidence"], by=by)


ACTIONS: Final = {
    a.name: a
    for a in (
        Action("register", "Register an accepted domain", ("domain",), False, _register),
        Action("declare", "Declare a domain not ours", ("domain", "note?"), False, _declare),
        Action("review", "Review a connector", ("connector", "outcome"), False, _review),
        Action("attest", "Attest the server is secured", ("note",), False, _attest),
        Action("request-unblock", "Request unblock", ("code", "evidence"), False, _request),
        Action(
            "approve",
            "Approve the unblock",
            ("reason",),
            True,
            lambda p, t, by, f: p.approve(t, by=by, reason=f["reason"]),
        ),
        Action(
            "deny",
            "Deny the unblock",
            ("reason",),
            True,
            lambda p, t, by, f: p.deny(t, by=by, reason=f["reason"]),
        ),
        Action(
            "block",
            "Block (unregistered domains)",
            ("reason",),
            True,
            lambda p, t, by, f: p.block(t, by=by, reason=f["reason"]),
        ),
        Action(
            "suspend",
            "Suspend all relay",
            ("reason",),
            True,
            lambda p, t, by, f: p.suspend(t, by=by, reason=f["reason"]),
        ),
    )
}


@attrs.frozen
class ConsoleRoute:
    """One route: method, path, who may call it (``tenant``: the tenant's admin or support;
    ``support``: support only; ``login``: anyone)."""

    method: str
    path: str
    access: str
    api: bool = False


ROUTES: Final = (
    ConsoleRoute("GET", "/t/{tenant}", "tenant"),
    ConsoleRoute("GET", "/t/{tenant}/history", "tenant"),
    *(
        ConsoleRoute("POST", f"/t/{{tenant}}/{a.name}", "support" if a.support_only else "tenant")
        for a in ACTIONS.values()
    ),
    ConsoleRoute("GET", "/support", "support"),
    ConsoleRoute("GET", "/support/search", "support"),
    ConsoleRoute("GET", "/api/tenants/{tenant}", "tenant", api=True),
    ConsoleRoute("GET", "/api/tenants/{tenant}/history", "tenant", api=True),
    *(
        ConsoleRoute(
            "POST",
            f"/api/tenants/{{tenant}}/{a.name}",
            "support" if a.support_only else "tenant",
            api=True,
        )
        for a in ACTIONS.values()
    ),
    ConsoleRoute("GET", "/api/queue", "support", api=True),
    ConsoleRoute("GET", "/api/tenants", "support", api=True),
)
"""Every authorised route (login, logout, the stylesheet and ``/`` are open)."""


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _stamp(at: float | None) -> str:
    if at is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput("the form is not valid UTF-8 form data; nothing was changed") from exc
    return dict(pairs)


def _parse_json(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput("the body is not a UTF-8 JSON object") from exc
    if not isinstance(data, dict):
        raise BadInput("the body must be a JSON object")
    out: dict[str, str] = {}
    for key, raw in data.items():
        value = ("kept" if raw else "removed") if isinstance(raw, bool) else raw
        if not isinstance(value, str):
            raise BadInput(f"field {key!r} must be a string")
        out[str(key)] = value
    return out


def _fields(action: Action, data: Mapping[str, str]) -> dict[str, str]:
    """The action's fields from *data*, checked: present, not over-long, no control characters,
    domains valid."""
    out: dict[str, str] = {}
    for spec in action.fields:
        name = spec.rstrip("?")
        value = data.get(name, "").strip()
        if not value:
            if spec.endswith("?"):
                out[name] = ""
                continue
            raise BadInput(f"{name} is required")
        limit = _MAX_FIELD.get(name, _MAX_TEXT)
        if len(value) > limit:
            raise BadInput(f"{name} is too long (at most {limit} characters)")
        if any(ord(c) < 32 and c not in "\r\n\t" for c in value) or "\ufffd" in value:
            raise BadInput(f"{name} contains control characters")
        if name == "domain":
            try:
                normalize_domain(value)
            except InvalidDomain as exc:
                raise BadInput(f"{value!r} is not a valid domain: {exc}") from exc
        out[name] = value
    return out


class _Headers:
    """Adds the security headers to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_HEADERS]
            await send(message)

        await self.app(scope, receive, wrapped)


class Console:
    """The state behind the application: policy, accounts, sessions, templates."""

    def __init__(
        self,
        policy: RelayPolicy,
        accounts: AccountStore,
        *,
        known_tenants: Callable[[], set[str]] | None = None,
        secure_cookies: bool | None = None,
        limiter: LoginLimiter | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.policy = policy
        self.accounts = accounts
        self.sessions = sessions or Sessions()
        self.limiter = limiter or LoginLimiter(accounts)
        self.secure_cookies = secure_cookies
        self._known = known_tenants
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("domainpolicy.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["stamp"] = _stamp
        self.env.filters["q"] = lambda v: urllib.parse.quote(str(v), safe="")

    # -- helpers ----------------------------------------------------------------

    def tenants(self) -> set[str]:
        """Every tenant the console knows: configured or stored."""
        found = set(self.policy.store.tenants())
        if self._known is not None:
            found |= self._known()
        return found

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def page(self, request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        session = self.session(request)
        html = self.env.get_template(name).render(
            base=self.base(request),
            account=None if session is None else session.account,
            csrf="" if session is None else session.csrf,
            **context,
        )
        return HTMLResponse(html, status_code=code)

    def set_cookie(self, request: Request, response: Response, token: str) -> None:
        secure = self.secure_cookies
        if secure is None:
            secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(self.sessions.lifetime),
            path=self.base(request) or "/",
            secure=secure,
            httponly=True,
            samesite="lax",
        )

    def authorise(self, account: Account, tenant: str | None, access: str) -> None:
        """Raise `_Denied` unless *account* may use a route of *access* on *tenant*."""
        if tenant is not None and account.role != SUPPORT and account.tenant != tenant:
            raise _Denied(404, "no such tenant")
        if access == "support" and account.role != SUPPORT:
            raise _Denied(403, "this page is for the support desk")
        if tenant is not None and account.role == SUPPORT and tenant not in self.tenants():
            raise _Denied(404, "no such tenant")

    async def api_account(self, request: Request) -> tuple[Account | None, bool]:
        """The API caller: HTTP Basic credentials (no CSRF needed) or a session (CSRF header
        needed for changes); the bool says whether it came from Basic."""
        header = request.headers.get("authorization", "")
        if header[:6].lower() == "basic ":
            try:
                name, _, password = (
                    base64.b64decode(header[6:], validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return None, True
            account = await self.check_login(name, password, _client(request))
            return account, True
        session = self.session(request)
        return (None if session is None else session.account), False

    async def check_login(self, name: str, password: str, address: str) -> Account | None:
        """The account when *password* is right and neither the account nor the address is
        over the rate limit; counts a failure otherwise.

        Raises:
            _Denied: 429 when over the limit.
        """
        if len(name) > _MAX_FIELD["name"] or len(password) > MAX_PASSWORD:
            return None
        allowed = await run_in_threadpool(self.limiter.allowed, name, address)
        if not allowed:
            raise _Denied(429, "too many failed logins: wait a few minutes and try again")
        account = await run_in_threadpool(self.accounts.get, name)
        ok = await run_in_threadpool(
            verify_password, password, None if account is None else account.password_hash
        )
        if not ok or account is None:
            await run_in_threadpool(self.limiter.failed, name, address)
            log.info("failed console login for %r from %s", name, address)
            return None
        await run_in_threadpool(self.limiter.succeeded, name)
        return account

    def tenant_view(self, tenant: str) -> dict[str, Any]:
        """Everything the tenant page and the API show (reads the store)."""
        status = self.policy.status(tenant, history=20)
        machine = self.policy.machine
        limits = machine.policy
        window = status.raw.window
        chart = relay_chart(
            window.buckets_list(),
            window.head or int(self.policy.store.now() // limits.bucket_seconds),
            limits.buckets,
            limits.message_limit,
            limits.bucket_seconds,
        )
        return {
            "tenant": tenant,
            "status": status,
            "block": status.raw.block,
            "checklist": status.checklist,
            "limits": limits,
            "chart": chart,
            "State": State,
        }


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _api_status(status: TenantStatus) -> dict[str, Any]:
    out = status.to_dict()
    block = status.raw.block
    out["block"] = (
        None
        if block is None
        else {
            "code": block.code.value,
            "since": block.since,
            "reason": block.reason,
            "offending": list(block.offending),
            "registered": list(block.registered),
            "declared": list(block.declared),
            "to_review": list(block.to_review),
            "evidence": {
                "unregistered": block.evidence.unregistered,
                "distinct_domains": block.evidence.distinct_domains,
                "total": block.evidence.total,
            },
            "requested_at": None if block.request is None else block.request.at,
        }
    )
    return out


def build_app(console: Console) -> Starlette:
    """The Starlette application of *console* (see `domainpolicy.console.create_app`)."""

    def guarded(
        route: ConsoleRoute, body: Callable[[Request, Account, str | None], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            tenant = request.path_params.get("tenant")
            try:
                if route.api:
                    account, basic = await console.api_account(request)
                    if account is None:
                        return JSONResponse({"ok": False, "error": "sign in first"}, 401)
                    if (
                        route.method == "POST"
                        and not basic
                        and not csrf_ok(
                            console.session(request), request.headers.get("x-csrf-token")
                        )
                    ):
                        return JSONResponse(
                            {"ok": False, "error": "missing or wrong CSRF token"}, 403
                        )
                else:
                    session = console.session(request)
                    if session is None or session.account is None:
                        return RedirectResponse(f"{console.base(request)}/login", 303)
                    account = session.account
                console.authorise(account, tenant, route.access)
                return await body(request, account, tenant)
            except _Denied as exc:
                if route.api:
                    return JSONResponse({"ok": False, "error": str(exc)}, exc.status)
                return console.page(request, "error.html", exc.status, message=str(exc))
            except StoreUnavailable as exc:
                log.warning("store unavailable: %s", exc)
                message = "The state store is unavailable; nothing was changed. Try again later."
                if route.api:
                    return JSONResponse({"ok": False, "error": message}, 503)
                return console.page(request, "error.html", 503, message=message)

        return endpoint

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            raise BadInput("the request is too large")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BadInput("the request is too large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def tenant_page(request: Request, account: Account, tenant: str | None) -> Response:
        assert tenant is not None
        view = await run_in_threadpool(console.tenant_view, tenant)
        done = request.query_params.get("done")
        notice = ACTIONS[done].title + ": done." if done in ACTIONS else None
        return console.page(request, "tenant.html", notice=notice, error=None, **view)

    async def history_page(request: Request, account: Account, tenant: str | None) -> Response:
        assert tenant is not None
        records = await run_in_threadpool(console.policy.store.history, tenant, limit=500)
        return console.page(request, "history.html", tenant=tenant, records=records)

    def queue() -> list[dict[str, Any]]:
        rows: list[tuple[float, str, dict[str, Any]]] = []
        for tenant in sorted(console.tenants()):
            status = console.policy.status(tenant, history=0)
            block = status.raw.block
            if status.state is State.UNBLOCK_REQUESTED and block is not None:
                at = block.request.at if block.request is not None else 0.0
                rows.append((at, tenant, {"tenant": tenant, "status": status, "block": block}))
        rows.sort(key=lambda r: (r[0], r[1]))
        return [r[2] for r in rows]

    async def queue_page(request: Request, account: Account, tenant: str | None) -> Response:
        rows = await run_in_threadpool(queue)
        return console.page(request, "queue.html", rows=rows)

    def search(text: str) -> list[str]:
        text = text.strip().lower()[: _MAX_FIELD["q"]]
        return [t for t in sorted(console.tenants()) if text in t.lower()][:100]

    async def search_page(request: Request, account: Account, tenant: str | None) -> Response:
        text = request.query_params.get("q", "")
        found = await run_in_threadpool(search, text)
        return console.page(request, "search.html", q=text, found=found)

    def make_action(action: Action, api: bool) -> Callable[..., Awaitable[Response]]:
        async def run(request: Request, account: Account, tenant: str | None) -> Response:
            assert tenant is not None
            status = 400
            try:
                body = await read_body(request)
                data = _parse_json(body) if api else _parse_form(body)
                if not api and not csrf_ok(console.session(request), data.get("csrf")):
                    status = 403
                    raise BadInput("the form's security token is missing or wrong; reload the page")
                fields = _fields(action, data)
                state = await run_in_threadpool(
                    action.run, console.policy, tenant, account.name, fields
                )
            except (BadInput, ChecklistIncomplete, InvalidConfiguration) as exc:
                message = _message(exc)
            except StoreUnavailable:
                raise
            except DomainPolicyError as exc:  # InvalidTransition, InvalidEvent...
                message = _message(exc)
                status = 409
            else:
                log.info("console %s on %r by %r", action.name, tenant, account.name)
                if api:
                    return JSONResponse(
                        {
                            "ok": True,
                            "action": action.name,
                            "tenant": tenant,
                            "state": state.state.value,
                        }
                    )
                return RedirectResponse(
                    f"{console.base(request)}/t/{urllib.parse.quote(tenant, safe='')}"
                    f"?done={action.name}",
                    303,
                )
            if api:
                return JSONResponse({"ok": False, "error": message}, status)
            view = await run_in_threadpool(console.tenant_view, tenant)
            return console.page(request, "tenant.html", status, notice=None, error=message, **view)

        return run

    async def api_status(request: Request, account: Account, tenant: str | None) -> Response:
        assert tenant is not None
        status = await run_in_threadpool(console.policy.status, tenant)
        return JSONResponse(_api_status(status))

    async def api_history(request: Request, account: Account, tenant: str | None) -> Response:
        assert tenant is not None
        records = await run_in_threadpool(console.policy.store.history, tenant, limit=500)
        return JSONResponse({"tenant": tenant, "history": [r.to_dict() for r in records]})

    async def api_queue(request: Request, account: Account, tenant: str | None) -> Response:
        rows = await run_in_threadpool(queue)
        return JSONResponse({"queue": [_api_status(r["status"]) for r in rows]})

    async def api_search(request: Request, account: Account, tenant: str | None) -> Response:
        found = await run_in_threadpool(search, request.query_params.get("q", ""))
        return JSONResponse({"tenants": found})

    bodies: dict[tuple[str, str], Callable[..., Awaitable[Response]]] = {
        ("GET", "/t/{tenant}"): tenant_page,
        ("GET", "/t/{tenant}/history"): history_page,
        ("GET", "/support"): queue_page,
        ("GET", "/support/search"): search_page,
        ("GET", "/api/tenants/{tenant}"): api_status,
        ("GET", "/api/tenants/{tenant}/history"): api_history,
        ("GET", "/api/queue"): api_queue,
        ("GET", "/api/tenants"): api_search,
    }
    for action in ACTIONS.values():
        bodies["POST", f"/t/{{tenant}}/{action.name}"] = make_action(action, False)
        bodies["POST", f"/api/tenants/{{tenant}}/{action.name}"] = make_action(action, True)

    async def home(request: Request) -> Response:
        session = console.session(request)
        base = console.base(request)
        if session is None or session.account is None:
            return RedirectResponse(f"{base}/login", 303)
        if session.account.role == SUPPORT:
            return RedirectResponse(f"{base}/support", 303)
        tenant = urllib.parse.quote(session.account.tenant or "", safe="")
        return RedirectResponse(f"{base}/t/{tenant}", 303)

    async def login_form(request: Request) -> Response:
        session = console.session(request)
        if session is None:
            session = console.sessions.new(None)
        response = console.env.get_template("login.html").render(
            base=console.base(request), account=None, csrf=session.csrf, error=None
        )
        out = HTMLResponse(response)
        console.set_cookie(request, out, session.token)
        return out

    async def login(request: Request) -> Response:
        session = console.session(request)
        status = 400
        try:
            data = _parse_form(await read_body(request))
            if not csrf_ok(session, data.get("csrf")):
                status = 403
                raise BadInput("the form's security token is missing or wrong; reload the page")
            try:
                account = await console.check_login(
                    data.get("name", ""), data.get("password", ""), _client(request)
                )
            except _Denied as exc:
                status = exc.status
                raise BadInput(str(exc)) from exc
            except StoreUnavailable as exc:
                status = 503
                raise BadInput("the account store is unavailable; try again later") from exc
            if account is None:
                status = 401
                raise BadInput("wrong name or password")
        except BadInput as exc:
            fresh = session or console.sessions.new(None)
            page = console.env.get_template("login.html").render(
                base=console.base(request), account=None, csrf=fresh.csrf, error=str(exc)
            )
            out = HTMLResponse(page, status_code=status)
            console.set_cookie(request, out, fresh.token)
            return out
        assert session is not None
        new = console.sessions.new(account, replacing=session.token)
        log.info("console login %r from %s", account.name, _client(request))
        response = RedirectResponse(f"{console.base(request)}/", 303)
        console.set_cookie(request, response, new.token)
        return response

    async def logout(request: Request) -> Response:
        session = console.session(request)
        try:
            data = _parse_form(await read_body(request))
        except BadInput:
            data = {}
        if session is not None and csrf_ok(session, data.get("csrf")):
            console.sessions.drop(session.token)
        response = RedirectResponse(f"{console.base(request)}/login", 303)
        response.delete_cookie(COOKIE, path=console.base(request) or "/")
        return response

    async def stylesheet(request: Request) -> Response:
        css = console.env.loader.get_source(console.env, "console.css")[0]  # type: ignore[union-attr]
        return Response(css, media_type="text/css")

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/console.css", stylesheet, methods=["GET"]),
    ]
    for route in ROUTES:
        routes.append(
            Route(
                route.path, guarded(route, bodies[route.method, route.path]), methods=[route.method]
            )
        )
    app = Starlette(routes=routes)
    app.add_middleware(_Headers)
    app.state.console = console
    return app


def _message(exc: BaseException) -> str:
    if isinstance(exc, ChecklistIncomplete):
        return "unblock refused: steps missing: " + "; ".join(exc.missing)
    if isinstance(exc, InvalidConfiguration):
        return "; ".join(exc.problems)
    return " ".join(str(exc).split())

"""The console's authentication: passwords hashed with scrypt (`hash_password`,
`verify_password`), server-side sessions with their CSRF token (`Sessions`), and the login rate
limit per account and per client address (`LoginLimiter`).

No web framework here: imports the standard library and `domainpolicy._stores.accounts`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Final

import attrs

from domainpolicy._stores.accounts import Account, AccountStore

__all__ = [
    "LoginLimiter",
    "Session",
    "Sessions",
    "csrf_ok",
    "hash_password",
    "verify_password",
]

_N: Final = 2**14
_R: Final = 8
_P: Final = 1
_MAXMEM: Final = 64 * 1024 * 1024
_SCHEME: Final = "scrypt"
MAX_PASSWORD: Final = 1024
MAX_SESSIONS: Final = 10_000
"""Sessions kept at most before anonymous ones are forgotten, oldest first."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """The encoded scrypt hash of *password*: ``scrypt$N$r$p$salt$hash`` (base64)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32
    )
    return f"{_SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


_DUMMY: Final = hash_password("not a password")


def verify_password(password: str, encoded: str | None) -> bool:
    """True when *password* matches *encoded*; a missing or malformed hash is checked against a
    dummy one all the same, so that a wrong name costs what a wrong password costs."""
    target = encoded if encoded is not None else _DUMMY
    try:
        scheme, n, r, p, salt, digest = target.split("$")
        if scheme != _SCHEME:
            raise ValueError(scheme)
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return encoded is not None and hmac.compare_digest(got, expected)


@attrs.define
class Session:
    """One browser session: who (None before login), its CSRF token, when it expires."""

    token: str
    account: Account | None
    csrf: str
    expires: float


class Sessions:
    """Server-side sessions, keyed by a random token (the cookie).  A login always issues a new
    token and forgets the old one (no fixation); a token nobody issued is never accepted.

    Args:
        lifetime: seconds a session lasts after it was issued.
        clock: epoch seconds.
    """

    def __init__(self, lifetime: float = 8 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def new(self, account: Account | None, *, replacing: str | None = None) -> Session:
        """Issue a new session for *account* (None: anonymous, for the login form's token, which
        lasts an hour at most), dropping the session *replacing*.  Past `MAX_SESSIONS`, expired
        sessions are forgotten, then the oldest anonymous ones."""
        now = self._clock()
        lifetime = self.lifetime if account is not None else min(self.lifetime, 3600.0)
        session = Session(
            secrets.token_urlsafe(32), account, secrets.token_urlsafe(32), now + lifetime
        )
        with self._lock:
            if replacing is not None:
                self._sessions.pop(replacing, None)
            if len(self._sessions) >= MAX_SESSIONS:
                for token in [t for t, s in self._sessions.items() if s.expires <= now]:
                    del self._sessions[token]
                anonymous = [t for t, s in self._sessions.items() if s.account is None]
                for token in anonymous[: len(self._sessions) - MAX_SESSIONS + 1]:
                    del self._sessions[token]  # dicts keep insertion order: oldest first
            self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of *token*, or None."""
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.expires <= self._clock():
                del self._sessions[token]
                return None
            return session

    def drop(self, token: str | None) -> None:
        """Forget the session (logout)."""
        if token:
            with self._lock:
                self._sessions.pop(token, None)


def csrf_ok(session: Session | None, token: str | None) -> bool:
    """True when *token* is the session's CSRF token (compared in constant time)."""
    if session is None or not token:
        return False
    return hmac.compare_digest(session.csrf.encode(), token.encode("utf-8", "replace"))


class LoginLimiter:
    """At most *per_account* failed logins per account and *per_address* per client address
    in *window* seconds; over that, logins are refused without checking the password.

    The counters live in the `AccountStore`, so every console process sharing it shares them.
    """

    def __init__(
        self,
        accounts: AccountStore,
        *,
        per_account: int = 5,
        per_address: int = 20,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.accounts = accounts
        self.per_account = per_account
        self.per_address = per_address
        self.window = window
        self._clock = clock

    def _keys(self, name: str, address: str) -> tuple[tuple[str, int], tuple[str, int]]:
        return (f"account:{name}", self.per_account), (f"address:{address}", self.per_address)

    def allowed(self, name: str, address: str) -> bool:
        """False when the account or the address is over its limit."""
        now = self._clock()
        return all(
            self.accounts.failures(key, now, self.window) < limit
            for key, limit in self._keys(name, address)
        )

    def failed(self, name: str, address: str) -> None:
        """Count a failed login against both."""
        now = self._clock()
        for key, _ in self._keys(name, address):
            self.accounts.record_failure(key, now, self.window)

    def succeeded(self, name: str) -> None:
        """A successful login clears the account's counter (the address's stays)."""
        self.accounts.clear_failures(f"account:{name}")

"""A real Postfix for tests: Debian's package extracted into a cache, run as a private instance.

How Postfix gets here (decided for a fresh CI machine, Debian, running as root):

1. ``$DOMAINPOLICY_POSTFIX_ROOT`` if set (a directory holding ``usr/lib/postfix/sbin/master``);
2. else a system-wide Postfix if one is installed (``/usr/lib/postfix/sbin/master``);
3. else ``apt-get download postfix`` + ``dpkg-deb -x`` into a cache directory
   (``$DOMAINPOLICY_POSTFIX_CACHE``, default ``~/.cache/domainpolicy-tests/postfix``), once;
   ``apt-get update`` is run first only if the package cannot be found.  Postfix's shared
   libraries (libdb, libicu, libsasl2, libssl, libnsl) are normally present already; if ``ldd``
   says one is missing, only those library packages are installed with apt-get.

The package is *extracted*, never installed: ``apt-get install postfix`` would configure and try
to start a system MTA, replace any other MTA (exim4 ...) and leave /etc/postfix behind.  The
extracted binaries run from the cache with ``LD_LIBRARY_PATH`` pointing at Postfix's own
libraries, configured by a private ``main.cf``/``master.cf`` in a temporary directory
(``postfix-harness.md``).  ``master -d`` runs in the foreground in its own session; teardown
stops it by pid (SIGTERM, then SIGKILL of its process group) and removes the directory.

Postfix's ``master`` must run as root.  Without root, or without apt-get/dpkg-deb, the
fixtures fail: the end-to-end tests are part of the suite CI runs, and a silent skip would
hide a missing MTA.  A developer without root can opt out explicitly with
``DOMAINPOLICY_SKIP_POSTFIX=1``, which turns the failure into a skip.

Run as a script, this module serves the demo policy (reject senders at ``bad.example``) on a
given address: ``python tests/postfix_harness.py serve 127.0.0.1:10040``; the end-to-end test
uses that to SIGKILL a policy server mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from domainpolicy.integrations import PolicyRequest, PolicyServer, ServerSettings

__all__ = [
    "BLOCKED_TEXT",
    "PostfixInstance",
    "ThreadedPolicyServer",
    "demo_handler",
    "ensure_postfix_root",
    "free_port",
    "kill_subprocess",
    "postfix_instance",
    "postfix_root",
    "running_postfix",
    "serve_subprocess",
]

BLOCKED_TEXT = (
    "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
)
DEFAULT_ACTION = "451 4.3.5 Policy service unavailable"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_MASTER = Path("usr/lib/postfix/sbin/master")


class HarnessUnavailable(Exception):
    """Postfix cannot be provided on this machine (not root, not Debian ...)."""


# --------------------------------------------------------------------------- getting Postfix


def _cache_dir() -> Path:
    configured = os.environ.get("DOMAINPOLICY_POSTFIX_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "domainpolicy-tests" / "postfix"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def _missing_libraries(root: Path) -> list[str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(root / "usr/lib/postfix"))
    out = subprocess.run(
        ["ldd", str(root / "usr/lib/postfix/sbin/smtpd"), str(root / _MASTER)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted({line.split()[0] for line in out.splitlines() if "not found" in line})


def _install_library_dependencies() -> None:
    """Install (only) the shared-library packages postfix depends on."""
    depends = _run(["apt-cache", "depends", "--important", "postfix"]).stdout
    packages = sorted(
        {
            line.split(":", 1)[1].strip()
            for line in depends.splitlines()
            if line.strip().startswith("Depends:")
            and line.split(":", 1)[1].strip().startswith("lib")
        }
    )
    if not packages:
        raise HarnessUnavailable("cannot find postfix's library dependencies with apt-cache")
    result = _run(["apt-get", "install", "-y", "--no-install-recommends", *packages])
    if result.returncode != 0:
        raise HarnessUnavailable(f"apt-get install {packages} failed: {result.stderr[-2000:]}")


def _extract_postfix(cache: Path) -> Path:
    root = cache / "root"
    marker = cache / "root.complete"
    if marker.exists() and (root / _MASTER).exists():
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise HarnessUnavailable(f"{tool} not found: cannot fetch Debian's postfix package")
    downloads = cache / "debs"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir(parents=True)
    result = _run(["apt-get", "download", "postfix"], cwd=downloads)
    if result.returncode != 0:
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise HarnessUnavailable(f"apt-get update failed: {update.stderr[-2000:]}")
        result = _run(["apt-get", "download", "postfix"], cwd=downloads)
    debs = sorted(downloads.glob("postfix_*.deb"))
    if result.returncode != 0 or not debs:
        raise HarnessUnavailable(f"apt-get download postfix failed: {result.stderr[-2000:]}")
    staging = Path(tempfile.mkdtemp(prefix="root.", dir=cache))
    extract = _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)])
    if extract.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise HarnessUnavailable(f"dpkg-deb -x failed: {extract.stderr[-2000:]}")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    shutil.rmtree(downloads, ignore_errors=True)
    marker.write_text(debs[-1].name + "\n")
    return root


def ensure_postfix_root() -> Path:
    """Return a directory ROOT with ``ROOT/usr/lib/postfix/sbin/master``, fetching it if needed.

    Raises:
        HarnessUnavailable: not root, or the package cannot be fetched on this machine.
    """
    if os.geteuid() != 0:
        raise HarnessUnavailable("Postfix's master must run as root")
    configured = os.environ.get("DOMAINPOLICY_POSTFIX_ROOT")
    if configured:
        root = Path(configured)
        if not (root / _MASTER).exists():
            raise HarnessUnavailable(f"DOMAINPOLICY_POSTFIX_ROOT={configured!r} has no {_MASTER}")
        return root
    if (Path("/") / _MASTER).exists():
        return Path("/")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs extract once
        root = _extract_postfix(cache)
        if _missing_libraries(root):
            _install_library_dependencies()
            missing = _missing_libraries(root)
            if missing:
                raise HarnessUnavailable(f"shared libraries still missing: {missing}")
    return root


# --------------------------------------------------------------------------- running it


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _main_cf(root: Path, work: Path, policy_port: int) -> str:
    lib = root / "usr/lib/postfix"
    policy = (
        f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=5s, "
        f"{{ default_action = {DEFAULT_ACTION} }} }}"
    )
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": work / "queue",
        "data_directory": work / "data",
        "meta_directory": work / "conf",
        "daemon_directory": lib / "sbin",
        "command_directory": root / "usr/sbin",
        "shlib_directory": lib,
        "mail_owner": "daemon",
        "setgid_group": "mail",
        "default_privs": "nobody",
        "myhostname": "postfix-harness.test",
        "mydomain": "test",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mydestination": "",
        "relay_domains": "",
        "mynetworks": "127.0.0.0/8",
        "maillog_file": work / "log" / "maillog",
        "maillog_file_prefixes": work / "log",
        "alias_maps": "",
        "alias_database": "",
        "default_transport": "discard",
        "relay_transport": "discard",
        "local_transport": "discard",
        "smtputf8_enable": "yes",
        "smtpd_peername_lookup": "no",
        "biff": "no",
        "import_environment": (
            "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME "
            f"LD_LIBRARY_PATH={lib}"
        ),
        # The policy decides first: DUNNO lets the rest run (permit_mynetworks accepts).
        "smtpd_relay_restrictions": f"{policy}, permit_mynetworks, reject_unauth_destination",
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def _make_directories(work: Path) -> None:
    daemon = pwd.getpwnam("daemon").pw_uid
    daemon_gid = pwd.getpwnam("daemon").pw_gid
    mail_gid = grp.getgrnam("mail").gr_gid
    work.chmod(0o755)  # every directory above the queue must be readable by daemon
    for sub in ("conf", "log", "queue"):
        (work / sub).mkdir(mode=0o755)
    data = work / "data"
    data.mkdir(mode=0o700)
    os.chown(data, daemon, daemon_gid)
    queue = work / "queue"
    owned = {
        "active": 0o700,
        "bounce": 0o700,
        "corrupt": 0o700,
        "defer": 0o700,
        "deferred": 0o700,
        "flush": 0o700,
        "hold": 0o700,
        "incoming": 0o700,
        "saved": 0o700,
        "trace": 0o700,
        "private": 0o700,
        "public": 0o710,
        "maildrop": 0o730,
    }
    for name, mode in owned.items():
        path = queue / name
        path.mkdir()
        os.chown(path, daemon, mail_gid if name in ("public", "maildrop") else daemon_gid)
        path.chmod(mode)
    (queue / "pid").mkdir(mode=0o755)


class PostfixInstance:
    """A running private Postfix: its SMTP port, policy port, log and master process."""

    def __init__(self, root: Path, work: Path, smtp_port: int, policy_port: int) -> None:
        """Describe an instance; `start` writes its configuration and runs it."""
        self.root = root
        self.work = work
        self.smtp_port = smtp_port
        self.policy_port = policy_port
        self.master: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Postfix's ``maillog_file``."""
        return self.work / "log" / "maillog"

    def log_text(self) -> str:
        """Everything Postfix has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Write main.cf/master.cf, start ``master -d`` and wait until smtpd accepts connections.

        Raises:
            RuntimeError: master exited or the SMTP port did not open in time (log included).
        """
        _make_directories(self.work)
        conf = self.work / "conf"
        (conf / "main.cf").write_text(_main_cf(self.root, self.work, self.policy_port))
        (conf / "master.cf").write_text(_MASTER_CF.format(smtp_port=self.smtp_port))
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LD_LIBRARY_PATH": str(self.root / "usr/lib/postfix"),
            "LANG": "C",
        }
        with open(self.work / "log" / "master.stderr", "wb") as stderr:
            self.master = subprocess.Popen(
                [str(self.root / _MASTER), "-c", str(conf), "-d"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError(
                    f"postfix master exited ({self.master.returncode}):\n{self._diagnostics()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as probe,
            ):
                probe.settimeout(5)
                if probe.recv(512).startswith(b"220"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"postfix did not open port {self.smtp_port}:\n{self._diagnostics()}")

    def _diagnostics(self) -> str:
        stderr = self.work / "log" / "master.stderr"
        err = stderr.read_text(errors="replace") if stderr.exists() else ""
        return f"--- master stderr ---\n{err}\n--- maillog ---\n{self.log_text()}"

    def stop(self) -> None:
        """Stop master by pid (SIGTERM, then SIGKILL of its process group); idempotent."""
        master = self.master
        if master is None:
            return
        self.master = None
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(_STOP_TIMEOUT)
        # master's children (smtpd, qmgr ...) share its process group; make sure none survive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(master.pid, signal.SIGKILL)


@contextlib.contextmanager
def running_postfix(root: Path, policy_port: int) -> Iterator[PostfixInstance]:
    """Run a private Postfix whose smtpd asks the policy service on 127.0.0.1:*policy_port*."""
    work = Path(tempfile.mkdtemp(prefix="domainpolicy-postfix-"))
    instance = PostfixInstance(root, work, free_port(), policy_port)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postfix_root() -> Path:
    """Debian's Postfix, fetched and extracted on first use (see the module docstring)."""
    try:
        return ensure_postfix_root()
    except HarnessUnavailable as exc:
        if os.environ.get("DOMAINPOLICY_SKIP_POSTFIX") == "1":
            pytest.skip(f"real Postfix unavailable (DOMAINPOLICY_SKIP_POSTFIX=1): {exc}")
        pytest.fail(f"real Postfix required but unavailable: {exc}")


@pytest.fixture(scope="module")
def postfix_instance(postfix_root: Path) -> Iterator[PostfixInstance]:
    """A running private Postfix (one per test module) pointing at a free policy port."""
    with running_postfix(postfix_root, free_port()) as instance:
        yield instance


# --------------------------------------------------------------------------- policy servers


Handler = Callable[[PolicyRequest], Awaitable[str]]


class ThreadedPolicyServer:
    """A `PolicyServer` on its own event loop thread, for synchronous tests using smtplib."""

    def __init__(self, handler: Handler, port: int, settings: ServerSettings | None = None) -> None:
        """Serve *handler* on 127.0.0.1:*port* once entered as a context manager."""
        self.handler = handler
        self.port = port
        self.settings = settings
        self.server: PolicyServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="policy-server", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = PolicyServer(self.handler, settings=self.settings)
            try:
                await server.start(f"127.0.0.1:{self.port}")
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self.server = server
            self._ready.set()
            await self._stop.wait()
            await server.close()

        asyncio.run(serve())

    def __enter__(self) -> ThreadedPolicyServer:
        self._thread.start()
        self._ready.wait(_START_TIMEOUT)
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start: {self._error!r}") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_STOP_TIMEOUT)


async def demo_handler(request: PolicyRequest) -> str:
    """Reject senders at bad.example with the 5.7.750 reply; let everything else through."""
    if request.sender.lower().endswith("@bad.example"):
        return BLOCKED_TEXT
    return "DUNNO"


def serve_subprocess(listen: str) -> subprocess.Popen[bytes]:
    """Start ``demo_handler`` in a child Python process on *listen*; returns once it listens.

    Raises:
        RuntimeError: the child did not report that it listens.
    """
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve", listen],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith(b"listening"):
        kill_subprocess(child)
        raise RuntimeError(f"policy server child did not start: {line!r}")
    return child


def kill_subprocess(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child started by `serve_subprocess` (by pid), reap it and close its pipe."""
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(_STOP_TIMEOUT)
    if child.stdout is not None:
        child.stdout.close()


def _serve_main(listen: str) -> None:
    async def serve() -> None:
        server = PolicyServer(demo_handler)
        await server.start(listen)
        print("listening", server.address, flush=True)
        await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: postfix_harness.py serve HOST:PORT")
    _serve_main(sys.argv[2])

"""``serve --workers N``: a supervisor process forking N policy server workers on one socket.

The supervisor binds the listening socket (TCP, or a UNIX socket given its group and mode as
the single-process server does), holds the configuration already compiled, calls
`gc.freeze` and forks the workers: each inherits the socket and the compiled matcher (its pages
stay shared until written to), opens its own store connection *after* the fork (a SQLite
connection or a Redis client is never shared across a fork) and runs the ordinary server on the
inherited socket (`PolicyServer.start` with ``sock=``).  The kernel hands each new connection
to one worker; a connection stays with its worker.

* ``SIGHUP``: the supervisor re-reads the configuration (so that a restarted worker starts
  with the new one; an invalid file is logged and the old one kept) and forwards the signal to
  every worker, which reloads as a single server does.
* ``SIGTERM`` / ``SIGINT``: forwarded; each worker stops accepting, answers what is in flight
  and exits; the supervisor waits for all of them, closes the socket (removing a UNIX socket's
  file) and exits 0.
* A worker that dies (a crash, ``SIGKILL``, the OOM killer) is logged and restarted, at once
  the first time and with a backoff doubling up to 30 s while it keeps dying young.  Its
  accepted connections are lost (Postfix reconnects and asks again); the connections still
  waiting in the shared accept queue are served by the other workers.
* Metrics (``--metrics``): each worker writes its counters every second and at exit to a file
  of its own in a private directory; a metrics process forked by the supervisor serves their
  sum (`SummedMetrics`) on one endpoint.  A dead worker's last counters stay in the sums, so a
  counter never goes backwards (what it counted in its last second before a ``SIGKILL`` is
  missing from the metrics, not from the store).
* If the supervisor itself is killed, its workers get ``SIGTERM`` (Linux's parent-death
  signal) and drain: no orphan keeps the socket.
* Every log line of a worker says ``worker=N`` (1 to N; a restarted worker keeps its number).
* Per-message state is per worker: each worker has its own `InstanceCache` and its own group
  commit.  Postfix may send the requests of one message on different connections, and two
  connections may land on two workers: then each worker decides (and counts) the message once,
  so a message is counted at most once per worker that sees it; with one connection per
  ``smtpd`` process (Postfix's ``check_policy_service`` keeps one per process) all of a
  message's requests normally arrive on one connection.

The supervisor runs no thread and no event loop (so forking a replacement worker is safe): it
blocks the signals it handles and waits for them with `signal.sigtimedwait`.

Imports the configuration, the metrics, the Postfix server (for listen addresses and socket
access) and ``common``; ``serve`` imports this module and hands it the function that runs one
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import TextIO

from domainpolicy._config import PolicyConfig, load_config
from domainpolicy._errors import DomainPolicyError
from domainpolicy.integrations._metrics import (
    MetricsEndpoint,
    PolicyMetrics,
    SummedMetrics,
    retire_snapshot,
    write_snapshot,
    write_supervisor_snapshot,
)
from domainpolicy.integrations.postfix.server import (
    ListenAddress,
    ServerSettings,
    _remove_stale_socket,
    _set_socket_access,
)

from .common import EXIT_OK, EXIT_USAGE, one_line

__all__ = ["PUBLISH_INTERVAL", "WorkerSlot", "supervise", "usable_cpus"]

_log = logging.getLogger("domainpolicy.serve")

PUBLISH_INTERVAL = 1.0
"""Seconds between two writes of a worker's counters for the summed metrics."""

_HANDLED = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
_MAX_BACKOFF = 30.0
_YOUNG = 10.0  # a worker that dies younger than this is restarted with a growing backoff
_STOP_SAFETY = 30.0  # seconds past the drain grace before stragglers are killed
_FORMAT = "%(asctime)s %(levelname)s %(name)s: {who} %(message)s"


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class WorkerSlot:
    """What one forked worker gets: its number, the inherited socket, the line to write once it
    listens, and where to write its counters."""

    def __init__(
        self, index: int, sock: socket.socket, out: TextIO, metrics_dir: str | None
    ) -> None:
        """Worker *index* (from 1) serving on *sock*; *out* goes to the supervisor."""
        self.index = index
        self.sock = sock
        self.out = out
        self.metrics_dir = metrics_dir
        self._metrics: PolicyMetrics | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The name of this worker's counters file (unique per process)."""
        return f"worker{self.index}-{os.getpid()}"

    def start_publishing(self, metrics: PolicyMetrics) -> None:
        """Write *metrics* every `PUBLISH_INTERVAL` seconds (in the running event loop)."""
        if self.metrics_dir is None:
            return
        self._metrics = metrics
        write_snapshot(metrics, self.metrics_dir, self.name)
        self._task = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        assert self._metrics is not None
        assert self.metrics_dir is not None
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            try:
                write_snapshot(self._metrics, self.metrics_dir, self.name)
            except OSError as exc:
                _log.warning("cannot write the worker's metrics: %s", exc)

    async def stop_publishing(self) -> None:
        """Stop the periodic writes and write the final counters."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._metrics is not None and self.metrics_dir is not None:
            with contextlib.suppress(OSError):
                write_snapshot(self._metrics, self.metrics_dir, self.name)


RunWorker = Callable[[WorkerSlot, PolicyConfig], int]
"""Runs one worker in the forked child (``serve``'s single-process path on the slot's socket);
returns its exit code."""


def _bind(listen: ListenAddress, settings: ServerSettings) -> socket.socket:
    """The listening socket the workers share.

    Raises:
        InvalidConfiguration: a live server owns the UNIX socket path, or its group or mode
            cannot be set.
        OSError: the address cannot be bound.
    """
    if listen.path is not None:
        _remove_stale_socket(listen.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(listen.path)
            _set_socket_access(listen.path, settings)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(listen.path)
            raise
    else:
        assert listen.host is not None
        assert listen.port is not None
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server(
            (listen.host, listen.port), family=family, backlog=socket.SOMAXCONN
        )
    sock.setblocking(False)
    return sock


def _die_with(parent: int) -> None:
    """In a forked child: get SIGTERM (drain and exit) if the supervisor *parent* dies, so
    that a killed supervisor leaves no worker holding the socket (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class _Child:
    """A forked worker (or the metrics process) as the supervisor sees it."""

    def __init__(self, index: int, pid: int, ready: int) -> None:
        self.index = index
        self.pid = pid
        self.ready_fd: int | None = ready
        self.started = time.monotonic()
        self.line = b""

    @property
    def label(self) -> str:
        return "metrics process" if self.index == 0 else f"worker {self.index}"


class _Supervisor:
    def __init__(
        self,
        config_path: str,
        config: PolicyConfig,
        sock: socket.socket,
        workers: int,
        run_worker: RunWorker,
        metrics: ListenAddress | None,
        grace: float,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.sock = sock
        self.workers = workers
        self.run_worker = run_worker
        self.metrics = metrics
        self.grace = grace
        self.metrics_dir: str | None = None
        self.children: dict[int, _Child] = {}  # by pid
        self.backoff: dict[int, float] = {}  # by index
        self.due: dict[int, float] = {}  # index -> monotonic time of its restart
        self.stopping = False
        self.failed = False
        self.deadline = float("inf")
        self.restarts = 0

    # ------------------------------------------------------------ forking

    def _fork(self, index: int, body: Callable[[TextIO], int]) -> _Child:
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                _die_with(parent)
                os.close(read)
                for child in self.children.values():
                    if child.ready_fd is not None:
                        os.close(child.ready_fd)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker handles it
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                who = "metrics" if index == 0 else f"worker={index}"
                for handler in logging.getLogger().handlers:
                    handler.setFormatter(logging.Formatter(_FORMAT.format(who=who)))
                if index != 0:
                    signal.pthread_sigmask(signal.SIG_SETMASK, set())
                with os.fdopen(write, "w", encoding="utf-8") as out:
                    code = body(out)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stderr.flush()
                os._exit(code)
        os.close(write)
        child = _Child(index, pid, read)
        self.children[pid] = child
        return child

    def _spawn_worker(self, index: int) -> _Child:
        config = self.config

        def body(out: TextIO) -> int:
            slot = WorkerSlot(index, self.sock, out, self.metrics_dir)
            return self.run_worker(slot, config)

        child = self._fork(index, body)
        _log.info("worker %d started (pid %d)", index, child.pid)
        self._publish()
        return child

    def _publish(self) -> None:
        """The supervisor's figures for the metrics endpoint (workers running, restarts)."""
        if self.metrics_dir is None:
            return
        running = sum(child.index != 0 for child in self.children.values())
        try:
            write_supervisor_snapshot(self.metrics_dir, running, self.restarts)
        except OSError as exc:
            _log.warning("cannot write the supervisor's metrics: %s", exc)

    def _spawn_metrics(self) -> _Child:
        assert self.metrics is not None
        assert self.metrics_dir is not None
        host, port, directory = self.metrics.host, self.metrics.port, self.metrics_dir
        assert host is not None
        assert port is not None

        def body(out: TextIO) -> int:
            self.sock.close()
            # Signals stay blocked: the endpoint's thread must not take them; we wait for them.
            endpoint = MetricsEndpoint(SummedMetrics(directory).registry)
            try:
                asyncio.run(endpoint.start(host, port))
            except (DomainPolicyError, OSError) as exc:
                sys.stderr.write(
                    f"domainpolicy: error: cannot serve metrics on "
                    f"{ListenAddress(host=host, port=port)}: {one_line(exc)}\n"
                )
                return EXIT_USAGE
            url = f"http://{ListenAddress(host=host, port=endpoint.port)}/metrics"
            out.write(url + "\n")
            out.flush()
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
            asyncio.run(endpoint.close())
            return EXIT_OK

        return self._fork(0, body)

    def _read_ready(self, child: _Child, block: bool) -> str | None:
        """The child's ready line; None while not yet written (or if it closed without one)."""
        fd = child.ready_fd
        while fd is not None:
            if not block and not select.select([fd], [], [], 0)[0]:
                return None
            chunk = os.read(fd, 4096)
            child.line += chunk
            if not chunk or b"\n" in child.line:
                os.close(fd)
                child.ready_fd = None
                if b"\n" not in child.line:
                    return None
                line = child.line.decode("utf-8", "replace").splitlines()[0]
                if child.index != 0 and not block:
                    _log.info("worker %d ready (pid %d)", child.index, child.pid)
                return line
        return None

    # ------------------------------------------------------------ running

    def start(self) -> tuple[str | None, list[int]] | None:
        """Fork the metrics process and the workers; wait until each listens.

        Returns the metrics URL and the workers' pids, or None if one failed to start (it said
        why on stderr).
        """
        url = None
        if self.metrics is not None:
            self.metrics_dir = tempfile.mkdtemp(prefix="domainpolicy-metrics-")
            child = self._spawn_metrics()
            url = self._read_ready(child, block=True)
            if url is None:
                return None
            assert self.metrics.host is not None
            port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
            self.metrics = ListenAddress(host=self.metrics.host, port=port)  # restart: same port
        gc.collect()
        gc.freeze()  # what the workers inherit stays in shared pages (no GC writes to it)
        started = [self._spawn_worker(index) for index in range(1, self.workers + 1)]
        for child in started:
            if self._read_ready(child, block=True) is None:
                return None
        return url, [child.pid for child in started]

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.ready_fd is not None:
                os.close(child.ready_fd)
                child.ready_fd = None
            if self.metrics_dir is not None and child.index != 0:
                retire_snapshot(self.metrics_dir, f"worker{child.index}-{pid}")
            if self.stopping:
                if status != 0:
                    self.failed = True
                    _log.warning("%s (pid %d) ended: %s", child.label, pid, _describe(status))
                continue
            lived = time.monotonic() - child.started
            if lived >= _YOUNG:
                delay = 0.0
                self.backoff.pop(child.index, None)
            else:  # dying young again and again: 0, 0.5, 1, 2 ... 30 seconds
                delay = self.backoff.get(child.index, 0.0)
                self.backoff[child.index] = min(_MAX_BACKOFF, max(0.5, delay * 2))
            self.due[child.index] = time.monotonic() + delay
            if child.index != 0:
                self.restarts += 1
                self._publish()
            _log.warning(
                "%s (pid %d) died (%s) after %.1fs; restarting in %.1fs",
                child.label,
                pid,
                _describe(status),
                lived,
                delay,
            )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in sorted(self.due.items()):
            if when <= now:
                del self.due[index]
                if index == 0:
                    self._spawn_metrics()
                else:
                    self._spawn_worker(index)

    def _reload(self) -> None:
        try:
            self.config = load_config(self.config_path)
        except (DomainPolicyError, OSError) as exc:
            _log.error(
                "reload failed, keeping the previous configuration for new workers: %s",
                one_line(exc),
            )
        else:
            gc.collect()
            gc.freeze()
            _log.info(
                "reload: configuration %s loaded (%d tenants)",
                self.config_path,
                len(self.config.matcher.tenants()),
            )
        for pid, child in list(self.children.items()):
            if child.index != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT and every worker has drained; the exit code."""
        while True:
            if self.stopping and not self.children:
                return 1 if self.failed else EXIT_OK
            info = signal.sigtimedwait(_HANDLED, 0.2)
            if info is not None:
                number = info.si_signo
                if number == signal.SIGHUP and not self.stopping:
                    _log.info("received SIGHUP: reloading every worker")
                    self._reload()
                elif number in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    _log.info(
                        "received %s: draining %d worker(s)",
                        signal.Signals(number).name,
                        sum(child.index != 0 for child in self.children.values()),
                    )
                    self.stopping = True
                    self.due.clear()
                    self._signal_all(signal.SIGTERM)
                    self.deadline = time.monotonic() + self.grace + _STOP_SAFETY
            self._reap()
            if self.stopping:
                if self.children and time.monotonic() > self.deadline:
                    _log.error("workers still running after the grace period: killing them")
                    self.failed = True
                    self._signal_all(signal.SIGKILL)
                    self.deadline = float("inf")
                continue
            for child in list(self.children.values()):
                if child.ready_fd is not None:
                    self._read_ready(child, block=False)
            self._restart_due()

    def stop_now(self) -> None:
        """Kill and reap whatever runs (a failed start)."""
        self._signal_all(signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()

    def cleanup(self, listen: ListenAddress) -> None:
        self.sock.close()
        if listen.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.path)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def supervise(
    *,
    config_path: str,
    config: PolicyConfig,
    listen: ListenAddress,
    settings: ServerSettings,
    workers: int,
    run_worker: RunWorker,
    out: TextIO,
    as_json: bool,
    metrics: ListenAddress | None = None,
) -> int:
    """Bind *listen*, fork *workers* workers running *run_worker* and supervise them.

    Prints ``listening on ADDRESS; N workers`` (and the metrics URL) on *out* once every worker
    listens; returns the exit code (0 after a SIGTERM/SIGINT drain; 2 if the address cannot
    be bound or a worker cannot start).
    """
    try:
        sock = _bind(listen, settings)
    except (DomainPolicyError, OSError) as exc:
        sys.stderr.write(f"domainpolicy: error: cannot listen on {listen}: {one_line(exc)}\n")
        return EXIT_USAGE
    if listen.path is None:
        listen = ListenAddress(host=listen.host, port=sock.getsockname()[1])
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    supervisor = _Supervisor(
        config_path, config, sock, workers, run_worker, metrics, settings.shutdown_grace
    )
    try:
        started = supervisor.start()
        if started is None:
            supervisor.stop_now()
            return EXIT_USAGE
        url, pids = started
        record: dict[str, object] = {"listening": str(listen)}
        text = f"listening on {listen}"
        if url is not None:
            record["metrics"] = url
            text += f"; metrics at {url}"
        record.update(workers=workers, pids=pids)
        text += f"; {workers} workers"
        out.write((json.dumps(record) if as_json else text) + "\n")
        out.flush()
        _log.info("supervising %d workers on %s", workers, listen)
        code = supervisor.run()
        _log.info("all workers stopped")
        return code
    finally:
        if supervisor.children:
            supervisor.stop_now()
        supervisor.cleanup(listen)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

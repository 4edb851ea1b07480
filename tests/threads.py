"""Run test workers side by side in threads and bring their failures back to the test."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["run_in_threads"]


def run_in_threads(*workers: Callable[[], object]) -> None:
    """Start every worker in its own thread, wait for all of them, then re-raise the first
    exception a worker raised, in the caller's thread (so an assertion inside a worker fails
    the test with its own traceback)."""
    errors: list[BaseException] = []

    def guarded(worker: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                worker()
            except BaseException as exc:  # handed back to the caller below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(worker)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

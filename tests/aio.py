"""Run a test's coroutine on a fresh event loop, with a safety net against hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(coro: Awaitable[T], *, safety: float = 20.0) -> T:
    """Run *coro* to completion in a new event loop; fail after *safety* seconds (a net against
    hangs, never an assertion about speed)."""

    async def guarded() -> T:
        async with asyncio.timeout(safety):
            return await coro

    return asyncio.run(guarded())

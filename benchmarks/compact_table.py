"""The layout we did not take, measured: a compact table that needs no per-name objects.

Issue 3 asks at once for lookups faster than dict-based baselines, <= 130 bytes per domain and
a 1M snapshot loaded in <= 0.3 s.  A ``dict`` of name strings cannot load a million names that
fast on CPython 3.11 (building the dict alone takes longer; see the "floor" row of
``bench_matcher.py``).  This module is the obvious alternative, written as fast as we could in
pure Python, so that the trade-off is a measurement and not an estimate:

* every normalised base name, ASCII, in one ``bytes`` blob, with an ``array`` of offsets;
* an open-addressing table (linear probing, at most half full) of ``array('Q')`` slots, each
  ``crc32(name) << 32 | (index + 1)``, so a probe compares the stored hash before touching the
  blob; ``zlib.crc32`` is used because ``hash()`` of a ``str`` is randomised per process and a
  table on disk needs a stable hash;
* two ``array('I')`` columns of tenant numbers (0 for none): the apex slot and the below slot;
* the tenant ids as a list of strings.

A snapshot is those arrays' bytes plus the blob and the tenant ids; loading is ``frombytes``
(a copy) and one ``split`` of the tenant ids, after a SHA-256 check like ours.  A lookup encodes
the query once, then per probe computes a CRC, probes the table and compares the blob in place.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from itertools import accumulate
from zlib import crc32

__all__ = ["CompactTable"]

_HEADER = struct.Struct("<5Q")


class CompactTable:
    """Accepted suffixes in flat arrays; `tenant` answers like the other contenders."""

    __slots__ = ("apex", "below", "blob", "mask", "offsets", "slots", "tenants")

    def __init__(
        self,
        blob: bytes,
        offsets: array[int],
        slots: array[int],
        apex: array[int],
        below: array[int],
        tenants: list[str],
    ) -> None:
        self.blob = blob
        self.offsets = offsets
        self.slots = slots
        self.mask = len(slots) - 1
        self.apex = apex
        self.below = below
        self.tenants = tenants

    @classmethod
    def build(cls, rows: list[tuple[str, bool, bool, str]]) -> CompactTable:
        """From (key, wildcard, match_subdomains, tenant) rows, as ``bench_matcher.canonical``."""
        numbers: dict[str, int] = {}
        apex_of: dict[str, int] = {}
        below_of: dict[str, int] = {}
        for key, wildcard, subs, tenant in rows:
            number = numbers.setdefault(tenant, len(numbers) + 1)
            if not wildcard:
                apex_of[key] = number
            if wildcard or subs:
                below_of[key] = number
        keys = list(dict.fromkeys([*apex_of, *below_of]))
        encoded = [key.encode("ascii") for key in keys]
        offsets = array("I", accumulate(map(len, encoded), initial=0))
        size = 1 << (2 * len(keys)).bit_length()
        mask = size - 1
        slots = array("Q", bytes(8 * size))
        for index, name in enumerate(encoded):
            stamp = crc32(name)
            position = stamp & mask
            while slots[position]:
                position = (position + 1) & mask
            slots[position] = stamp << 32 | (index + 1)
        apex = array("I", [apex_of.get(key, 0) for key in keys])
        below = array("I", [below_of.get(key, 0) for key in keys])
        return cls(b"".join(encoded), offsets, slots, apex, below, list(numbers))

    def _index(self, name: bytes) -> int:
        """1 + the number of *name* in the blob, or 0."""
        stamp = crc32(name)
        slots = self.slots
        mask = self.mask
        position = stamp & mask
        slot = slots[position]
        while slot:
            if slot >> 32 == stamp:
                index = slot & 0xFFFFFFFF
                start = self.offsets[index - 1]
                if self.offsets[index] - start == len(name) and self.blob.startswith(name, start):
                    return index
            position = (position + 1) & mask
            slot = slots[position]
        return 0

    def tenant(self, key: str) -> str | None:
        """The tenant of the longest entry matching the normalised *key*, or None."""
        name = key.encode("ascii")
        index = self._index(name)
        if index and self.apex[index - 1]:
            return self.tenants[self.apex[index - 1] - 1]
        rest = name.partition(b".")[2]
        while b"." in rest:
            index = self._index(rest)
            if index and self.below[index - 1]:
                return self.tenants[self.below[index - 1] - 1]
            rest = rest.partition(b".")[2]
        return None

    def to_bytes(self) -> bytes:
        """A snapshot: header, arrays, blob, tenant ids, SHA-256 of all that."""
        tenants = "\n".join(self.tenants).encode("utf-8")
        body = b"".join(
            [
                _HEADER.pack(
                    len(self.apex),
                    len(self.slots),
                    len(self.blob),
                    len(tenants),
                    sys.byteorder == "little",
                ),
                self.offsets.tobytes(),
                self.slots.tobytes(),
                self.apex.tobytes(),
                self.below.tobytes(),
                self.blob,
                tenants,
            ]
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactTable:
        """Load a snapshot made by `to_bytes` (checked with its SHA-256 first)."""
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("compact snapshot: checksum mismatch")
        count, size, blob_bytes, tenant_bytes, little = _HEADER.unpack_from(body)
        if little != (sys.byteorder == "little"):
            raise ValueError("compact snapshot: other byte order")
        view = memoryview(body)
        at = _HEADER.size
        parts = []
        for code, items in (("I", count + 1), ("Q", size), ("I", count), ("I", count)):
            column = array(code)
            end = at + items * column.itemsize
            column.frombytes(view[at:end])
            parts.append(column)
            at = end
        blob = bytes(view[at : at + blob_bytes])
        at += blob_bytes
        tenants = bytes(view[at : at + tenant_bytes]).decode("utf-8").split("\n")
        offsets, slots, apex, below = parts
        return cls(blob, offsets, slots, apex, below, tenants)

    def size(self) -> int:
        """Bytes of everything the table holds (arrays, blob, tenant list and ids)."""
        return (
            sys.getsizeof(self.blob)
            + sum(map(sys.getsizeof, (self.offsets, self.slots, self.apex, self.below)))
            + sys.getsizeof(self.tenants)
            + sum(map(sys.getsizeof, self.tenants))
        )

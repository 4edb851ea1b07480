"""Registry snapshots: a compiled registry at one version, to start a large fleet fast.

A process that starts from a snapshot loads the compiled matcher (`DomainMatcher.from_bytes`,
no compile) and the connectors, then catches up with the registry's records since the
snapshot's version (`RegistryFollower`, `DomainMatcher.with_changes`), so a registry of a
million domains is neither recompiled at every start nor at every change.

File format (version 1)::

    b"domainpolicy-registry/1\\n"
    header: one line of JSON: {"version": V, "fingerprint": F, "connectors": [...],
                               "matcher_bytes": N}
    the matcher snapshot (`DomainMatcher.to_bytes`, N bytes, with its own checksum)
    SHA-256 of everything above (32 bytes)

``fingerprint`` is the SHA-256 of the version and the stamp of the registry's record V (when, who,
why; `RegistryStore.registry_stamp`, read without the record's changes): a snapshot is used
only with the store whose record V is that record (not a snapshot of another store's registry).
The file is written next to its path and renamed over it, so readers never see half of one.

Imports the registry core and the matcher only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Final

from ._errors import InvalidConfiguration, InvalidSnapshot, StoreUnavailable
from ._matcher import DomainMatcher
from ._psl import PublicSuffixes
from ._registry import RegistryView, connector_from_dict, connector_to_dict
from ._stores.registry_base import RegistryStore

__all__ = [
    "REGISTRY_SNAPSHOT_VERSION",
    "load_registry_snapshot",
    "record_fingerprint",
    "save_registry_snapshot",
    "snapshot_registry",
    "view_from_snapshot",
]

REGISTRY_SNAPSHOT_VERSION: Final = 1
_MAGIC: Final = b"domainpolicy-registry/"
_DIGEST: Final = 32


def record_fingerprint(version: int, stamp: tuple[float, str, str] | None) -> str:
    """The fingerprint of the registry's record of *version*, from its stamp
    (`RegistryStore.registry_stamp`: when, who, why); ``""`` for version 0 (empty)."""
    if version == 0 or stamp is None:
        return ""
    text = json.dumps([version, *stamp], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_registry_snapshot(view: RegistryView, fingerprint: str, path: str) -> None:
    """Write *view* (at its version, whose record has *fingerprint*) to *path* atomically.

    Raises:
        InvalidSnapshot: the file cannot be written (``__cause__`` is the ``OSError``).
    """
    matcher = view.matcher.to_bytes()
    header = {
        "version": view.version,
        "fingerprint": fingerprint,
        "connectors": [connector_to_dict(c) for c in view.connectors.values()],
        "matcher_bytes": len(matcher),
    }
    head = _MAGIC + b"%d\n" % REGISTRY_SNAPSHOT_VERSION
    line = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
    digest = hashlib.sha256(head + line)
    digest.update(matcher)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.writelines([head, line, matcher, digest.digest()])
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise InvalidSnapshot(f"cannot write registry snapshot {path!r}: {exc}") from exc


def snapshot_registry(store: object, path: str) -> RegistryView:
    """Write a snapshot of *store*'s registry at its newest version to *path*; return the view.

    Raises:
        InvalidConfiguration: *store* keeps no registry.
        InvalidSnapshot: the file cannot be written.
        StoreUnavailable: the store failed.
    """
    if not isinstance(store, RegistryStore):
        raise InvalidConfiguration([f"store {store!r} keeps no tenant registry"])
    view = store.registry_view()
    stamp = store.registry_stamp(view.version)
    save_registry_snapshot(view, record_fingerprint(view.version, stamp), path)
    return view


def load_registry_snapshot(
    path: str, *, public_suffixes: PublicSuffixes | None = None
) -> tuple[RegistryView, str]:
    """Read a registry snapshot: the view at its version, and that version's fingerprint.

    Raises:
        InvalidSnapshot: the file cannot be read, is not a registry snapshot, has another format
            version, or is corrupt (checksum, header, matcher); the message names the rule.
    """

    def bad(rule: str) -> InvalidSnapshot:
        return InvalidSnapshot(f"registry snapshot {path!r} is not usable: {rule}")

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise InvalidSnapshot(f"cannot read registry snapshot {path!r}: {exc}") from exc
    head = _MAGIC + b"%d\n" % REGISTRY_SNAPSHOT_VERSION
    if not data.startswith(_MAGIC):
        raise bad(f"it does not start with {_MAGIC!r} (not a registry snapshot)")
    if not data.startswith(head):
        raise bad(f"its format version is not {REGISTRY_SNAPSHOT_VERSION}")
    if len(data) < len(head) + _DIGEST or (
        hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]
    ):
        raise bad("the SHA-256 checksum does not match (corrupt or truncated file)")
    end = data.find(b"\n", len(head))
    try:
        header = json.loads(data[len(head) : end])
        version = int(header["version"])
        fingerprint = str(header["fingerprint"])
        connectors = [connector_from_dict(c) for c in header["connectors"]]
        size = int(header["matcher_bytes"])
    except (KeyError, TypeError, ValueError, InvalidConfiguration) as exc:
        raise bad(f"the header is malformed: {exc!r}") from exc
    if end < 0 or end + 1 + size != len(data) - _DIGEST or version < 0:
        raise bad("the matcher's length does not match the header")
    matcher = DomainMatcher.from_bytes(
        data[end + 1 : end + 1 + size], public_suffixes=public_suffixes, source=path
    )
    view = RegistryView(matcher=matcher, connectors=connectors, version=version)
    return view, fingerprint


def view_from_snapshot(
    path: str, store: object, *, public_suffixes: PublicSuffixes | None = None
) -> RegistryView:
    """The registry of *store*, starting from the snapshot at *path* and caught up with the
    records since its version (incrementally); the store's own view is primed with it, so that
    commits through *store* do not read the whole log either.

    Raises:
        InvalidSnapshot: the snapshot is unusable, or is not of this store's registry (its
            version is newer than the store's, or the store's record of that version differs).
        InvalidConfiguration: *store* keeps no registry.
        StoreUnavailable: the store failed.
    """
    if not isinstance(store, RegistryStore):
        raise InvalidConfiguration([f"store {store!r} keeps no tenant registry"])
    view, fingerprint = load_registry_snapshot(path, public_suffixes=public_suffixes)
    if view.version > 0:
        stamp = store.registry_stamp(view.version)
        if stamp is None:
            raise InvalidSnapshot(
                f"registry snapshot {path!r} is of version {view.version}; this store's "
                f"registry is at version {store.registry_version()} (not this store's snapshot)"
            )
        if record_fingerprint(view.version, stamp) != fingerprint:
            raise InvalidSnapshot(
                f"registry snapshot {path!r}: the store's record of version {view.version} is "
                "not the snapshot's (a snapshot of another store's registry)"
            )
    records = store.registry_records(view.version)
    for record in records:
        try:
            view.apply(record)
        except InvalidConfiguration as exc:
            raise StoreUnavailable(
                f"the registry's record {record.version} does not apply: {exc}"
            ) from exc
    store.registry_prime(view)
    return view

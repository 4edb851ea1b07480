"""The registry's Redis layout: content in the tenants' slots, a commit point, orphan repair."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from domainpolicy import AcceptedDomain, open_store
from domainpolicy._registry import RegistryChange, RegistryRecord
from domainpolicy._stores.redis import RedisStore
from redis_support import redis_cluster_url, redis_url

NOW = 1_800_000_000.0


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RedisStore:
    url = (redis_url if request.param == "redis" else redis_cluster_url)(tmp_path)
    opened = open_store(url)
    assert isinstance(opened, RedisStore)
    return opened


def test_parts_live_in_their_tenants_slots(store: RedisStore) -> None:
    """A mutation of many tenants writes each tenant's part in that tenant's slot."""
    changes = [
        RegistryChange.add_domain(AcceptedDomain(f"d{i}.example", f"tenant-{i}")) for i in range(20)
    ]
    store.registry_commit(changes, actor="a", now=NOW)
    keys = [k.decode() for k in store._client.scan_iter(match="dp:{reg:*", count=1000)]
    assert len(keys) == 20
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) > 10
    assert store.registry_orphans() == []


def test_a_writer_that_dies_before_its_commit_point_leaves_only_orphans(store: RedisStore) -> None:
    """Parts written but never committed are invisible to readers and listed for repair."""
    store.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("a.example", "t"))], actor="a", now=NOW
    )
    record = RegistryRecord(
        2, NOW, "a", "", (RegistryChange.add_domain(AcceptedDomain("b.example", "t")),)
    )
    original = store._registry_append_script

    def crash(**kwargs: object) -> object:
        raise redis.ConnectionError("killed before the commit point")

    store._registry_append_script = crash  # type: ignore[assignment]
    with pytest.raises(Exception, match="killed"):
        store._registry_append(1, record)
    store._registry_append_script = original
    assert store.registry_version() == 1
    assert store.registry_view().matcher.tenant_of("b.example") is None
    orphans = store.registry_orphans()
    assert len(orphans) == 1
    store._client.delete(*orphans)
    assert store.registry_records(0)[0].version == 1

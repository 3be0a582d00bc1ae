"""The exclusive lock several instances elect their MQTT reader with, on a real PostgreSQL.

One holder at a time; a holder's lock ends with its connection (terminated by the server, as a
kill -9 ends it) or after `lapse_s` of silence (a frozen process), and the holder's next check
then says it lost it. SQLite has one process: its lock is always held.
"""

from __future__ import annotations

import time
import uuid

import anyio
import psycopg
import pytest

from service.store.base import LockLostError
from service.store.postgres import PostgresStore
from service.store.postgres_lock import advisory_key

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pg_store(postgres_url):
    store = PostgresStore(postgres_url)
    await store.open()
    yield store
    await store.close()


def lock_name() -> str:
    """Advisory locks are per database and tests share one: each test has its own name."""
    return f"test-{uuid.uuid4().hex[:12]}"


async def test_one_holder_at_a_time_and_the_next_one_after_release(pg_store):
    name = lock_name()
    first = pg_store.exclusive_lock(name, lapse_s=5)
    second = pg_store.exclusive_lock(name, lapse_s=5)
    assert await first.try_acquire()
    assert await first.try_acquire()  # held already: still ours
    assert not await second.try_acquire()
    await first.check()
    await first.release()
    assert await second.try_acquire()
    with pytest.raises(LockLostError):
        await first.check()
    await second.release()


async def test_a_holder_whose_session_ends_loses_the_lock_and_says_so(pg_store, postgres_url):
    name = lock_name()
    holder = pg_store.exclusive_lock(name, lapse_s=5)
    other = pg_store.exclusive_lock(name, lapse_s=5)
    assert await holder.try_acquire()
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # what a kill -9 also causes
        # With a timeout, pg_terminate_backend waits until the backend has gone (PostgreSQL
        # 14+); without one it only signals it, and the lock could still be held just after.
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks"
            " WHERE locktype = 'advisory' AND objid = (%s::bigint & 4294967295)::oid",
            (advisory_key(name),),
        )
    assert await other.try_acquire()
    with pytest.raises(LockLostError):
        await holder.check()
    assert not await holder.try_acquire()  # a fresh connection, but the lock is taken
    await other.release()
    await holder.release()


async def test_a_silent_holder_loses_the_lock_after_its_lapse(pg_store):
    name = lock_name()
    lapse_s = 0.3
    frozen = pg_store.exclusive_lock(name, lapse_s=lapse_s)
    other = pg_store.exclusive_lock(name, lapse_s=lapse_s)
    assert await frozen.try_acquire()
    silent_since = time.monotonic()
    assert not await other.try_acquire()  # held while its holder is silent, until the lapse
    with anyio.fail_after(5):
        while not await other.try_acquire():
            await anyio.sleep(0.05)  # polling the lock: what a standing-by instance does too
    assert time.monotonic() - silent_since >= lapse_s
    with pytest.raises(LockLostError):
        await frozen.check()
    await other.release()


async def test_the_sqlite_store_lock_is_always_held(store):
    lock = store.exclusive_lock(lock_name(), lapse_s=1)
    assert await lock.try_acquire()
    await lock.check()
    await lock.release()
    assert await store.exclusive_lock("same", lapse_s=1).try_acquire()

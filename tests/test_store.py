"""The CAS store against SQLite and a real PostgreSQL server: races, replays, encryption at rest, restarts."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from pyscone.cas.integrity import Tampered
from pyscone.cas.store import Conflict, Store

MASTER = bytes(range(32))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cas.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(base)
    tables = sa.MetaData()
    tables.reflect(engine)
    tables.drop_all(engine)  # every test starts from an empty database
    engine.dispose()
    yield base


def test_sessions_are_created_once_and_updated_only_from_their_version(url: str) -> None:
    store = Store(url, MASTER)
    store.put_session("s", "owner", "v1", "policy 1", {"pw": "hunter2"}, {"pw": "password"}, None)
    with pytest.raises(Conflict):
        store.put_session("s", "owner", "v1", "again", {}, {}, None)
    with pytest.raises(Conflict):
        store.put_session("s", "owner", "v3", "policy 3", {}, {}, "v2")  # a stale predecessor
    store.put_session("s", "owner", "v2", "policy 2", {"pw": "hunter3"}, {"pw": "password"}, "v1")
    row = Store(url, MASTER).session("s")  # a restarted CAS sees it
    assert row is not None and (row.version, row.policy, row.values) == ("v2", "policy 2", {"pw": "hunter3"})


def test_concurrent_updates_from_one_version_have_one_winner(url: str) -> None:
    store = Store(url, MASTER)
    store.put_session("race", "owner", "v0", "p", {}, {}, None)

    def update(i: int) -> bool:
        try:
            store.put_session("race", "owner", f"v{i + 1}", "p", {}, {}, "v0")
            return True
        except Conflict:
            return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(update, range(16))) == 1


def test_a_challenge_is_taken_once_for_its_own_service(url: str) -> None:
    store = Store(url, MASTER)
    nonce = store.new_challenge("s", "api")
    assert not store.take_challenge(nonce, "s", "other")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda _: store.take_challenge(nonce, "s", "api"), range(16))) == 1
    assert not store.take_challenge("00" * 32, "s", "api")


def test_tag_reports_only_move_forward_and_only_for_the_latest_run(url: str) -> None:
    store = Store(url, MASTER)
    tags, run, key = store.start_run("s", "api", "/data/app.fspf", ["t0"])
    assert tags == ["t0"] and len(key) == 32
    found = store.run_key("s", "api", run)
    assert found is not None and (found.key, found.seq) == (key, 0)
    assert store.pin_tags("s", "api", run, 1, ["t0", "t1"]) is None
    assert store.pin_tags("s", "api", run, 2, ["t1"]) is None
    assert store.pin_tags("s", "api", run, 1, ["t0", "t1"]) == "stale report"  # a replayed old report
    tags2, _, _ = store.start_run("s", "api", "/data/app.fspf", ["ignored"])
    assert tags2 == ["t1"]  # the pin survives into the next run
    assert store.pin_tags("s", "api", run, 3, ["t0"]) == "stale report"  # the old run can no longer move it
    assert store.run_key("s", "api", run) is None


def test_a_pin_belongs_to_the_volume_and_moves_only_along_its_commits(url: str) -> None:
    store = Store(url, MASTER)
    _, writer, _ = store.start_run("s", "writer", "/data/app.fspf", ["t0"])
    assert store.pin_tags("s", "writer", writer, 1, ["t0", "t1"]) is None
    assert store.pin_tags("s", "writer", writer, 2, ["t1"]) is None
    tags, reader, _ = store.start_run("s", "reader", "/data/app.fspf", ["t0"])
    assert tags == ["t1"]  # another service of the session on the same FSPF: the same pin
    assert store.start_run("s", "other", "/data/other.fspf", ["u0"])[0] == ["u0"]  # another volume
    assert store.start_run("other-session", "writer", "/data/app.fspf", ["v0"])[0] == ["v0"]
    # The reader, started on t1, commits; the writer's next report does not follow it.
    assert store.pin_tags("s", "reader", reader, 1, ["t1", "t2"]) is None
    assert store.pin_tags("s", "reader", reader, 2, ["t2"]) is None
    why = store.pin_tags("s", "writer", writer, 3, ["t1", "t3"])
    assert why is not None and "not a version the pin accepts" in why
    assert store.pin_tags("s", "writer", writer, 4, ["t0"]) is not None  # nor moves it back
    store.reset_volume("s", "/data/app.fspf", ["t9"])  # the owner names a new starting point
    assert store.pin_tags("s", "reader", reader, 3, ["t9"]) == "stale report"  # runs on it ended
    assert store.start_run("s", "writer", "/data/app.fspf", ["t0"])[0] == ["t9"]


def test_secrets_and_run_keys_are_encrypted_at_rest(url: str) -> None:
    store = Store(url, MASTER)
    policy = "fspf: {key: 0f5b1c2a9e7d}"  # a policy may hold an FSPF key
    store.put_session("s", "owner", "v1", policy, {"pw": "correct horse battery"}, {"pw": "password"}, None)
    _, _, key = store.start_run("s", "api", None, [])
    with store.engine.connect() as db:
        dump = repr(db.execute(sa.text("SELECT * FROM sessions")).all()) + repr(
            db.execute(sa.text("SELECT * FROM runs")).all()
        )
    assert "correct horse" not in dump and key.hex() not in dump and repr(key) not in dump
    assert "0f5b1c2a9e7d" not in dump
    row = store.session("s")
    assert row is not None and row.policy == policy
    with pytest.raises(Tampered):  # another master key cannot open them
        Store(url, os.urandom(32)).session("s")


def test_the_first_runs_of_a_service_may_race(url: str) -> None:
    # Found by the attestation benchmark: concurrent first attestations of a service both
    # inserted its row, and all but one failed (HTTP 500 on PostgreSQL).
    store = Store(url, MASTER)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: store.start_run("s", "new", "/data/new.fspf", ["t0"]), range(16)))
    assert all(tags == ["t0"] for tags, _, _ in runs)
    assert len({run for _, run, _ in runs}) == 16


def test_an_owner_request_is_used_once_across_cas_processes(url: str) -> None:
    # Two CAS processes on one database: a request one of them took is a replay for the other.
    first, second = Store(url, MASTER), Store(url, MASTER)
    assert first.use_request("ab" * 32, time.time() + 600)
    assert not second.use_request("ab" * 32, time.time() + 600)
    assert second.use_request("cd" * 32, time.time() + 600)
    assert first.use_request("ef" * 32, time.time() - 1)  # expired entries are swept ...
    assert first.use_request("ef" * 32, time.time() + 600)  # ... so an expired one may be reused


def test_cas_replicas_started_together_on_an_empty_database_all_open_it(url: str) -> None:
    # Found with two CAS replicas on one PostgreSQL: started at once on an empty database,
    # both created the tables and one failed on the other's (a duplicate key in pg_type).
    def open_store(_: int) -> str:
        try:
            Store(url, MASTER).engine.dispose()
        except Exception as e:  # noqa: BLE001 - whatever the driver raised
            return " ".join(str(e).split())[:200]
        return ""

    for _ in range(3):
        tables = sa.MetaData()
        engine = sa.create_engine(url)
        tables.reflect(engine)
        tables.drop_all(engine)
        engine.dispose()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(open_store, range(4))) == [""] * 4

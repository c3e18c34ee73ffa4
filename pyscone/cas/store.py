"""The CAS's storage: trusted platforms, sessions, attestation challenges, FSPF pins, audit.

SQLAlchemy Core over SQLite (the default, one file) or PostgreSQL (``postgresql://…``,
for a replicated CAS).  Every change that must not race is one transaction whose
conditions are in its ``WHERE`` clause (a session update names the version it
replaces, a pin the generation it moves on from; a challenge is taken only if unused
and fresh), so two CAS processes on one PostgreSQL database, or many threads on one
SQLite file, cannot both win.

Policies (which may hold FSPF keys), secret values and run keys are stored encrypted
under the CAS's master key; the rows that decide something are sealed or MAC'd with
every field that gives them meaning, carry a generation, and are checked against the
CAS's anchor on every read (``integrity.py``): a database writer without the master key
cannot change an owner, put an old policy or pin back, re-trust a revoked platform or
delete audit events unnoticed.

**Pins belong to volumes.**  An FSPF (a *volume*, named by its path in the session's
policy) has one pin per session, shared by every service that names it: the FSPF
tags a start may use.  A report moves the pin only along the chain of commits: it
must start from a tag the pin accepts (``[old, new]`` before a commit point,
``[new]`` after it), so two runs on one volume cannot fork it and no replayed report
moves it back.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets as _random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import sqlalchemy as sa

from pyscone.cas.integrity import Anchor, Keys, Tampered

CHALLENGE_TTL = 60.0  # seconds an attestation nonce stays valid
SCHEMA = 2  # 2: sealed and MAC'd rows with generations, pins per volume, an audit chain per session

meta = sa.MetaData()
schema = sa.Table("pyscone_schema", meta, sa.Column("version", sa.Integer, primary_key=True))
platforms = sa.Table(
    "platforms",
    meta,
    sa.Column("platform_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("trusted", sa.Boolean, nullable=False),  # a distrusted platform keeps its row, one generation on
    sa.Column("gen", sa.Integer, nullable=False),
    sa.Column("added", sa.Float, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)
sessions = sa.Table(
    "sessions",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("gen", sa.Integer, nullable=False),
    sa.Column("policy", sa.LargeBinary, nullable=False),  # sealed: a policy may hold an FSPF key
    sa.Column("secrets", sa.LargeBinary, nullable=False),  # sealed JSON {values, kinds}
    sa.Column("updated", sa.Float, nullable=False),
)
volumes = sa.Table(
    "volumes",
    meta,
    sa.Column("session", sa.String(64), primary_key=True),
    sa.Column("volume", sa.String(64), primary_key=True),  # SHA-256 of the FSPF's path
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("tags", sa.Text, nullable=False),  # JSON list: the FSPF tags a start may use
    sa.Column("gen", sa.Integer, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)
runs = sa.Table(
    "runs",  # the latest attested run of each service: who may report tags, and how far it got
    meta,
    sa.Column("session", sa.String(64), primary_key=True),
    sa.Column("service", sa.String(64), primary_key=True),
    sa.Column("volume", sa.String(64), nullable=False),  # "" if the service has no FSPF
    sa.Column("run_id", sa.String(32), nullable=False),  # "" once ended
    sa.Column("run_key", sa.LargeBinary, nullable=True),  # sealed
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)
challenges = sa.Table(
    "challenges",
    meta,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)
requests = sa.Table(
    "requests",  # owner requests already used (the digest of what was signed), until too old anyway
    meta,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("expires", sa.Float, nullable=False),
)
audit = sa.Table(
    "audit",  # one hash chain per session: event n MACs event n-1's MAC
    meta,
    sa.Column("session", sa.String(64), primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)

T = TypeVar("T")


class Conflict(Exception):
    """A change lost a race or named a stale predecessor."""


class StoreError(Exception):
    """The database cannot be used by this CAS (one line)."""


@dataclass(frozen=True)
class SessionRow:
    name: str
    owner: str
    version: str
    policy: str
    values: dict[str, str]
    kinds: dict[str, str]


@dataclass(frozen=True)
class Run:
    key: bytes
    seq: int
    volume: str  # the volume id, or ""


def volume_id(path: str) -> str:
    """The id of the volume (FSPF) at ``path`` within a session."""
    return hashlib.sha256(path.encode()).hexdigest()


class Store:
    def __init__(self, url: str, master_key: bytes, anchor: Path | None = None) -> None:
        """Open (or create) the CAS's database.

        Args:
            anchor: the file where this CAS remembers the newest generation of each record
                (``DIR/anchor.json``); ``None`` keeps it in memory only.

        Raises:
            StoreError: the database was made by an earlier CAS with another schema.
            Tampered: the anchor file cannot be read.
        """
        self.keys = Keys(master_key)
        self.anchor = Anchor(anchor)
        # One writer at a time per chain within this process: concurrent attestations of one
        # session all append to its audit chain, and retrying losers would starve (other CAS
        # processes on the same database still race, and _retry handles them).
        self._append = threading.Lock()
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # the driver pyscone installs
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._check_schema()

    def _check_schema(self) -> None:
        names = set(sa.inspect(self.engine).get_table_names())
        if "sessions" in names and "pyscone_schema" not in names:
            raise StoreError("the database was made by an earlier pyscone CAS (schema 1); this one needs a new one")
        for i in range(10):
            try:
                meta.create_all(self.engine)
                break
            except sa.exc.DatabaseError:
                # Another CAS process (a replica started at the same time) created some of the
                # tables after this one found them missing: look again.
                if i == 9:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (i + 1))
        with self.engine.begin() as db:
            found = db.execute(sa.select(schema.c.version)).scalars().all()
            if not found:
                try:
                    with db.begin_nested():
                        db.execute(schema.insert().values(version=SCHEMA))
                except sa.exc.IntegrityError:
                    pass  # another CAS process created it first
            elif found != [SCHEMA]:
                raise StoreError(f"the database has schema {found}, this CAS needs schema {SCHEMA}")

    def _retry(self, attempt: Callable[[], T], tries: int = 16) -> T:
        """Run a read-then-write transaction again when a concurrent one took the row first
        (with a short random back-off, so that racing writers spread out)."""
        for i in range(tries):
            try:
                return attempt()
            except (sa.exc.IntegrityError, Conflict):
                if i == tries - 1:
                    raise
                time.sleep(random.uniform(0, 0.002 * (i + 1)))
        raise AssertionError("unreachable")

    # -- platforms ----------------------------------------------------------------------------

    def _platform_mac(self, pid: str, pem: str, note: str, trusted: bool, gen: int) -> str:
        return self.keys.mac("platform", pid, pem, note, trusted, gen)

    def _verified_platform(self, mark: dict[str, int], r: Any) -> Any:
        what = f"platform {r.platform_id[:16]}"
        self.keys.check(r.mac, what, "platform", r.platform_id, r.public_key, r.note, bool(r.trusted), r.gen)
        key = f"platform/{r.platform_id}"
        self.anchor.check(mark, key, r.gen, f"{what}: an older record of it was put back (re-trusted?)")
        return r

    def _set_platform(self, platform_id: str, pem: str | None, note: str) -> bool:
        """Trust (``pem``) or distrust (``None``) a platform; returns whether it was trusted."""
        key = f"platform/{platform_id}"

        def attempt() -> bool:
            mark = self.anchor.snapshot()
            with self.engine.begin() as db:
                r = db.execute(sa.select(platforms).where(platforms.c.platform_id == platform_id)).first()
                if r is not None:
                    self._verified_platform(mark, r)
                was = bool(r is not None and r.trusted)
                if pem is None and not was:
                    return False
                gen = (r.gen if r is not None else mark.get(key, 0)) + 1
                if pem is not None:
                    row_pem, row_note = pem, note
                else:
                    assert r is not None  # it was trusted
                    row_pem, row_note = r.public_key, r.note
                values = {
                    "public_key": row_pem,
                    "note": row_note,
                    "trusted": pem is not None,
                    "gen": gen,
                    "added": time.time(),
                    "mac": self._platform_mac(platform_id, row_pem, row_note, pem is not None, gen),
                }
                if r is None:
                    db.execute(platforms.insert().values(platform_id=platform_id, **values))
                else:
                    done = db.execute(
                        platforms.update()
                        .where(platforms.c.platform_id == platform_id, platforms.c.gen == r.gen)
                        .values(**values)
                    )
                    if done.rowcount != 1:
                        raise Conflict("a concurrent change of the platform")
            self.anchor.advance(key, gen)
            return was

        return self._retry(attempt)

    def trust_platform(self, platform_id: str, public_key_pem: str, note: str) -> None:
        self._set_platform(platform_id, public_key_pem, note)

    def distrust_platform(self, platform_id: str) -> bool:
        return self._set_platform(platform_id, None, "")

    def platforms(self) -> dict[str, str]:
        """The trusted platforms (id -> public key PEM), every row verified.

        Raises:
            Tampered: a platform row was forged, altered or put back.
        """
        mark = self.anchor.snapshot()
        with self.engine.connect() as db:
            rows = db.execute(sa.select(platforms)).all()
        return {r.platform_id: r.public_key for r in rows if self._verified_platform(mark, r).trusted}

    # -- sessions -----------------------------------------------------------------------------

    def session(self, name: str) -> SessionRow | None:
        """The session ``name``, verified, or None if it does not exist.

        Raises:
            Tampered: its row was altered, moved back to an older version, or deleted.
        """
        key, what = f"session/{name}", f"session {name!r}"
        mark = self.anchor.snapshot()
        with self.engine.connect() as db:
            r = db.execute(sa.select(sessions).where(sessions.c.name == name)).first()
        if r is None:
            if mark.get(key):
                raise Tampered(f"{what} was deleted from the database")
            return None
        bound = (name, r.owner, r.version, r.gen)
        doc = json.loads(self.keys.open(r.secrets, what, "secrets", *bound))
        policy = self.keys.open(r.policy, what, "policy", *bound).decode()
        self.anchor.check(mark, key, r.gen, f"{what}: an older version of it was put back")
        return SessionRow(r.name, r.owner, r.version, policy, doc["values"], doc["kinds"])

    def put_session(
        self,
        name: str,
        owner: str,
        version: str,
        policy: str,
        values: dict[str, str],
        kinds: dict[str, str],
        replaces: str | None,
    ) -> None:
        """Create a session (``replaces`` None) or replace version ``replaces`` of it.

        Raises:
            Conflict: the session exists (create), or its version is no longer ``replaces``.
            Tampered: the session's row is not intact (or was deleted).
        """
        key = f"session/{name}"
        mark = self.anchor.snapshot()
        with self.engine.begin() as db:
            if replaces is None:
                gen = 1
            else:
                r = db.execute(
                    sa.select(sessions.c.gen).where(sessions.c.name == name, sessions.c.version == replaces)
                ).first()
                if r is None:
                    raise Conflict("the session's current version is not the predecessor named")
                gen = r.gen + 1
            bound = (name, owner, version, gen)
            row = {
                "owner": owner,
                "version": version,
                "gen": gen,
                "policy": self.keys.seal(policy.encode(), "policy", *bound),
                "secrets": self.keys.seal(json.dumps({"values": values, "kinds": kinds}).encode(), "secrets", *bound),
                "updated": time.time(),
            }
            if replaces is None:
                try:
                    db.execute(sessions.insert().values(name=name, **row))
                except sa.exc.IntegrityError:
                    raise Conflict("the session exists") from None
                if mark.get(key):  # (the insert is rolled back)
                    raise Tampered(f"session {name!r} was deleted from the database")
            else:
                done = db.execute(
                    sessions.update()
                    .where(sessions.c.name == name, sessions.c.version == replaces, sessions.c.gen == gen - 1)
                    .values(**row)
                )
                if done.rowcount != 1:
                    raise Conflict("the session's current version is not the predecessor named")
        self.anchor.advance(key, gen)

    # -- owner requests -----------------------------------------------------------------------

    def use_request(self, digest: str, expires: float) -> bool:
        """Record an owner request (the digest of what it signed) as used: False if it was
        used before (a replay).

        In the database, so every CAS process on it refuses a replay, not just the one that
        saw the request first.
        """
        with self.engine.begin() as db:
            db.execute(requests.delete().where(requests.c.expires < time.time()))
            try:
                with db.begin_nested():
                    db.execute(requests.insert().values(digest=digest, expires=expires))
            except sa.exc.IntegrityError:
                return False
        return True

    # -- attestation challenges ---------------------------------------------------------------

    def new_challenge(self, session: str, service: str) -> str:
        nonce = _random.token_hex(32)
        now = time.time()
        with self.engine.begin() as db:
            db.execute(challenges.delete().where(challenges.c.created < now - 10 * CHALLENGE_TTL))
            db.execute(
                challenges.insert().values(nonce=nonce, session=session, service=service, created=now, used=False)
            )
        return nonce

    def take_challenge(self, nonce: str, session: str, service: str) -> bool:
        """Use a nonce once: True only for the first use, within its lifetime, for its service."""
        with self.engine.begin() as db:
            done = db.execute(
                challenges.update()
                .where(
                    challenges.c.nonce == nonce,
                    challenges.c.session == session,
                    challenges.c.service == service,
                    challenges.c.used.is_(False),
                    challenges.c.created >= time.time() - CHALLENGE_TTL,
                )
                .values(used=True)
            )
            return bool(done.rowcount == 1)

    # -- volumes (FSPF pins) and runs -----------------------------------------------------------

    def _volume_mac(self, session: str, vid: str, path: str, tags: list[str], gen: int) -> str:
        return self.keys.mac("volume", session, vid, path, tags, gen)

    def _volume(self, mark: dict[str, int], db: sa.Connection, session: str, vid: str) -> tuple[list[str], int] | None:
        """A volume's pinned tags and generation, verified; None if it has none yet."""
        r = db.execute(sa.select(volumes).where(volumes.c.session == session, volumes.c.volume == vid)).first()
        key, what = f"volume/{session}/{vid}", f"the FSPF pin of session {session!r}"
        if r is None:
            if mark.get(key):
                raise Tampered(f"{what} ({vid[:16]}) was deleted from the database")
            return None
        tags = json.loads(r.tags)
        self.keys.check(r.mac, f"{what} ({r.path})", "volume", session, vid, r.path, tags, r.gen)
        self.anchor.check(mark, key, r.gen, f"{what} ({r.path}): an older pin was put back (a rollback)")
        return tags, int(r.gen)

    def _put_volume(
        self,
        mark: dict[str, int],
        db: sa.Connection,
        session: str,
        vid: str,
        path: str,
        tags: list[str],
        old_gen: int | None,
    ) -> int:
        """Write a volume's pin, conditional on its generation (None: it has no row yet)."""
        gen = (old_gen if old_gen is not None else mark.get(f"volume/{session}/{vid}", 0)) + 1
        values = {"path": path, "tags": json.dumps(tags), "gen": gen}
        values["mac"] = self._volume_mac(session, vid, path, tags, gen)
        if old_gen is None:
            db.execute(volumes.insert().values(session=session, volume=vid, **values))
        elif (
            db.execute(
                volumes.update()
                .where(volumes.c.session == session, volumes.c.volume == vid, volumes.c.gen == old_gen)
                .values(**values)
            ).rowcount
            != 1
        ):
            raise Conflict("a concurrent change of the pin")
        return gen

    def _run_values(
        self, session: str, service: str, vid: str, run_id: str, key: bytes | None, seq: int
    ) -> dict[str, Any]:
        sealed = self.keys.seal(key, "run", session, service, vid, run_id) if key is not None else None
        mac = self.keys.mac("run", session, service, vid, run_id, sealed is not None, seq)
        return {"volume": vid, "run_id": run_id, "run_key": sealed, "seq": seq, "mac": mac}

    def _run(self, db: sa.Connection, session: str, service: str) -> Any:
        r = db.execute(sa.select(runs).where(runs.c.session == session, runs.c.service == service)).first()
        if r is not None:
            what = f"the run of {session}/{service}"
            self.keys.check(r.mac, what, "run", session, service, r.volume, r.run_id, r.run_key is not None, r.seq)
        return r

    def start_run(
        self, session: str, service: str, volume_path: str | None, initial_tags: list[str]
    ) -> tuple[list[str], str, bytes]:
        """A new attested run of a service: the FSPF tags its volume accepts (``initial_tags``
        if the volume has no pin yet), its run id and key.  Ends the service's previous run."""
        run_id, run_key = _random.token_hex(16), _random.token_bytes(32)
        vid = volume_id(volume_path) if volume_path is not None else ""

        def attempt() -> tuple[list[str], int | None]:
            mark = self.anchor.snapshot()
            with self.engine.begin() as db:
                tags, gen = initial_tags, None
                if vid:
                    assert volume_path is not None
                    found = self._volume(mark, db, session, vid)
                    if found is None:
                        gen = self._put_volume(mark, db, session, vid, volume_path, initial_tags, None)
                    else:
                        tags = found[0]
                values = self._run_values(session, service, vid, run_id, run_key, 0)
                where = (runs.c.session == session, runs.c.service == service)
                if db.execute(runs.update().where(*where).values(**values)).rowcount == 0:
                    db.execute(runs.insert().values(session=session, service=service, **values))
            return tags, gen

        tags, gen = self._retry(attempt)  # the first runs of a service (or volume) may race to insert
        if gen is not None:
            self.anchor.advance(f"volume/{session}/{vid}", gen)
        return tags, run_id, run_key

    def run_key(self, session: str, service: str, run_id: str) -> Run | None:
        """The key of run ``run_id`` of a service, if it is still its latest run."""
        with self.engine.connect() as db:
            r = self._run(db, session, service)
        if r is None or r.run_id != run_id or r.run_key is None:
            return None
        key = self.keys.open(
            r.run_key, f"the run key of {session}/{service}", "run", session, service, r.volume, run_id
        )
        return Run(key, int(r.seq), r.volume)

    def pin_tags(
        self, session: str, service: str, run_id: str, seq: int, tags: Sequence[str], after: str | None = None
    ) -> str | None:
        """Move the pin of the run's volume to ``tags``: ``[new]`` after ``after`` (a commit),
        or (``after`` None) ``[old, new]`` / ``[new]``, whose first tag must be pinned.

        Returns:
            None if it moved, else why not: the report is stale (not newer than the run's
            last, or the run is no longer the service's latest), or does not follow the chain
            of commits (its first tag is not one the pin accepts).
        """

        def attempt() -> tuple[str | None, str, int]:
            mark = self.anchor.snapshot()
            with self.engine.begin() as db:
                r = self._run(db, session, service)
                if r is None or r.run_id != run_id or r.seq >= seq:
                    return "stale report", "", 0
                if not r.volume:
                    return "the service has no FSPF", "", 0
                found = self._volume(mark, db, session, r.volume)
                if found is None:
                    return "the volume has no pin", "", 0
                pinned, old_gen = found
                follows = after if after is not None else (tags[0] if tags else None)
                if not tags or follows not in pinned:
                    return f"{follows or '(none)'} is not a version the pin accepts", "", 0
                path = db.execute(
                    sa.select(volumes.c.path).where(volumes.c.session == session, volumes.c.volume == r.volume)
                ).scalar_one()
                gen = self._put_volume(mark, db, session, r.volume, path, list(tags), old_gen)
                key = self.keys.open(
                    r.run_key, f"the run key of {session}/{service}", "run", session, service, r.volume, run_id
                )
                done = db.execute(
                    runs.update()
                    .where(runs.c.session == session, runs.c.service == service, runs.c.seq == r.seq)
                    .values(**self._run_values(session, service, r.volume, run_id, key, seq))
                )
                if done.rowcount != 1:
                    raise Conflict("a concurrent report of the run")
            return None, r.volume, gen

        why, vid, gen = self._retry(attempt)
        if why is None:
            self.anchor.advance(f"volume/{session}/{vid}", gen)
        return why

    def reset_volume(self, session: str, path: str, tags: list[str]) -> None:
        """The owner named a new FSPF tag in the policy: its volume starts from it, and the
        runs on it end (their reports no longer count)."""
        vid = volume_id(path)

        def attempt() -> int:
            mark = self.anchor.snapshot()
            with self.engine.begin() as db:
                found = self._volume(mark, db, session, vid)
                gen = self._put_volume(mark, db, session, vid, path, tags, found[1] if found else None)
                for r in db.execute(sa.select(runs).where(runs.c.session == session, runs.c.volume == vid)).all():
                    self._run(db, session, r.service)
                    db.execute(
                        runs.update()
                        .where(runs.c.session == session, runs.c.service == r.service)
                        .values(**self._run_values(session, r.service, vid, "", None, 0))
                    )
            return gen

        self.anchor.advance(f"volume/{session}/{vid}", self._retry(attempt))

    # -- audit --------------------------------------------------------------------------------

    def _event_mac(self, r: Any, prev: str) -> str:
        """An event's MAC covers its fields and its predecessor's MAC (``prev``)."""
        return self.keys.mac("audit", r.session, r.n, r.time, r.service, r.event, bool(r.ok), r.detail, prev)

    def log(self, session: str, service: str, event: str, ok: bool, detail: str) -> None:
        """Append an event to the session's audit chain (only for a session that exists:
        nothing is stored for a name someone made up).

        Raises:
            Tampered: the chain's newest events were altered or deleted.
        """
        key = f"audit/{session}"

        def attempt() -> int:
            mark = self.anchor.snapshot()
            with self.engine.begin() as db:
                head = db.execute(
                    sa.select(audit).where(audit.c.session == session).order_by(audit.c.n.desc()).limit(2)
                ).all()
                n, prev = (head[0].n, head[0].mac) if head else (0, "")
                if head:
                    before = head[1].mac if len(head) > 1 and head[1].n == n - 1 else ("" if n == 1 else None)
                    if before is None or self._event_mac(head[0], before) != head[0].mac:
                        raise Tampered(f"the audit of session {session!r}: its newest events were altered")
                self.anchor.check(mark, key, n, f"the audit of session {session!r}: its newest events were deleted")
                row = SimpleNamespace(
                    session=session, n=n + 1, time=time.time(), service=service, event=event, ok=ok, detail=detail
                )
                db.execute(audit.insert().values(**vars(row), mac=self._event_mac(row, prev)))
            return n + 1

        with self._append:
            self.anchor.advance(key, self._retry(attempt))

    def audit_of(self, session: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The session's newest ``limit`` events, newest first, after verifying its whole chain.

        Raises:
            Tampered: an event was altered, inserted or deleted.
        """
        mark = self.anchor.snapshot()
        with self.engine.connect() as db:
            rows = db.execute(sa.select(audit).where(audit.c.session == session).order_by(audit.c.n)).all()
        what = f"the audit of session {session!r}"
        prev = ""
        for i, r in enumerate(rows, 1):
            if r.n != i:
                raise Tampered(f"{what}: event {i} was deleted")
            if self._event_mac(r, prev) != r.mac:
                raise Tampered(f"{what}: event {i} was altered")
            prev = r.mac
        self.anchor.check(mark, f"audit/{session}", len(rows), f"{what}: its newest events were deleted")
        return [
            {"time": r.time, "service": r.service, "event": r.event, "ok": bool(r.ok), "detail": r.detail}
            for r in reversed(rows[-limit:])
        ]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()

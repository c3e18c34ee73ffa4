"""The CAS's storage: trusted platforms, sessions, attestation challenges, FSPF pins, audit.

SQLAlchemy Core over SQLite (the default, one file) or PostgreSQL (``postgresql://…``,
for a replicated CAS).  Every change that must not race is one transaction whose
conditions are in its ``WHERE`` clause (a session update names the version it
replaces; a challenge is taken only if unused and fresh), so two CAS processes on
one PostgreSQL database, or many threads on one SQLite file, cannot both win.

Policies (which may hold FSPF keys), secret values and run keys are stored encrypted
(AES-256-GCM) under the CAS's master key, with the session (and service) as associated
data, so a copy of the database alone reveals no secret and a ciphertext cannot be
moved to another session.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CHALLENGE_TTL = 60.0  # seconds an attestation nonce stays valid

meta = sa.MetaData()
platforms = sa.Table(
    "platforms",
    meta,
    sa.Column("platform_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("added", sa.Float, nullable=False),
)
sessions = sa.Table(
    "sessions",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("policy", sa.LargeBinary, nullable=False),  # encrypted: a policy may hold an FSPF key
    sa.Column("secrets", sa.LargeBinary, nullable=False),  # encrypted JSON {values, kinds}
    sa.Column("updated", sa.Float, nullable=False),
)
services = sa.Table(
    "services",
    meta,
    sa.Column("session", sa.String(64), primary_key=True),
    sa.Column("service", sa.String(64), primary_key=True),
    sa.Column("tags", sa.Text, nullable=False),  # JSON list: the FSPF tags a start may use
    sa.Column("run_id", sa.String(32), nullable=False, default=""),
    sa.Column("run_key", sa.LargeBinary, nullable=True),  # encrypted
    sa.Column("seq", sa.Integer, nullable=False, default=0),
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
    "requests",  # owner requests already used, until they could no longer be replayed anyway
    meta,
    sa.Column("signature", sa.String(64), primary_key=True),
    sa.Column("expires", sa.Float, nullable=False),
)
audit = sa.Table(
    "audit",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)


class Conflict(Exception):
    """A change lost a race or named a stale predecessor."""


@dataclass(frozen=True)
class SessionRow:
    name: str
    owner: str
    version: str
    policy: str
    values: dict[str, str]
    kinds: dict[str, str]


class Store:
    def __init__(self, url: str, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key is 32 bytes")
        self._aead = AESGCM(master_key)
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # the driver pyscone installs
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        meta.create_all(self.engine)

    # -- encryption at rest ----------------------------------------------------------------

    def _seal(self, data: bytes, ad: str) -> bytes:
        iv = os.urandom(12)
        return iv + self._aead.encrypt(iv, data, ad.encode())

    def _open(self, blob: bytes, ad: str) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], ad.encode())

    # -- platforms ----------------------------------------------------------------------------

    def trust_platform(self, platform_id: str, public_key_pem: str, note: str) -> None:
        with self.engine.begin() as db:
            db.execute(platforms.delete().where(platforms.c.platform_id == platform_id))
            db.execute(
                platforms.insert().values(
                    platform_id=platform_id, public_key=public_key_pem, note=note, added=time.time()
                )
            )

    def distrust_platform(self, platform_id: str) -> bool:
        with self.engine.begin() as db:
            return bool(db.execute(platforms.delete().where(platforms.c.platform_id == platform_id)).rowcount)

    def platforms(self) -> dict[str, str]:
        with self.engine.connect() as db:
            return {r.platform_id: r.public_key for r in db.execute(sa.select(platforms))}

    # -- sessions -----------------------------------------------------------------------------

    def session(self, name: str) -> SessionRow | None:
        with self.engine.connect() as db:
            r = db.execute(sa.select(sessions).where(sessions.c.name == name)).first()
        if r is None:
            return None
        doc = json.loads(self._open(r.secrets, "session:" + name))
        policy = self._open(r.policy, "policy:" + name).decode()
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
        """
        blob = self._seal(json.dumps({"values": values, "kinds": kinds}).encode(), "session:" + name)
        sealed_policy = self._seal(policy.encode(), "policy:" + name)
        row = {"owner": owner, "version": version, "policy": sealed_policy, "secrets": blob, "updated": time.time()}
        with self.engine.begin() as db:
            if replaces is None:
                try:
                    db.execute(sessions.insert().values(name=name, **row))
                except sa.exc.IntegrityError:
                    raise Conflict("the session exists") from None
                return
            done = db.execute(
                sessions.update().where(sessions.c.name == name, sessions.c.version == replaces).values(**row)
            )
            if done.rowcount != 1:
                raise Conflict("the session's current version is not the predecessor named")

    # -- owner requests -----------------------------------------------------------------------

    def use_request(self, signature_hash: str, expires: float) -> bool:
        """Record an owner request as used: False if it was used before (a replay).

        In the database, so every CAS process on it refuses a replay, not just the one that
        saw the request first.
        """
        with self.engine.begin() as db:
            db.execute(requests.delete().where(requests.c.expires < time.time()))
            try:
                with db.begin_nested():
                    db.execute(requests.insert().values(signature=signature_hash, expires=expires))
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

    # -- services: FSPF pins and runs ---------------------------------------------------------

    def start_run(self, session: str, service: str, initial_tags: list[str]) -> tuple[list[str], str, bytes]:
        """A new attested run of a service: its accepted FSPF tags, its run id and key."""
        run_id, run_key = _random.token_hex(16), _random.token_bytes(32)
        values = {"run_id": run_id, "run_key": self._seal(run_key, f"run:{session}/{service}"), "seq": 0}
        where = (services.c.session == session, services.c.service == service)
        for attempt in range(3):
            try:
                with self.engine.begin() as db:
                    r = db.execute(sa.select(services.c.tags).where(*where)).first()
                    if r is None:
                        tags = initial_tags
                        db.execute(
                            services.insert().values(session=session, service=service, tags=json.dumps(tags), **values)
                        )
                    else:
                        tags = json.loads(r.tags)
                        db.execute(services.update().where(*where).values(**values))
                return tags, run_id, run_key
            except sa.exc.IntegrityError:
                if attempt == 2:
                    raise
                # The first runs of a service raced to insert its row: now it exists, update it.
        raise AssertionError("unreachable")

    def run_key(self, session: str, service: str, run_id: str) -> tuple[bytes, int] | None:
        with self.engine.connect() as db:
            r = db.execute(
                sa.select(services).where(
                    services.c.session == session, services.c.service == service, services.c.run_id == run_id
                )
            ).first()
        if r is None or r.run_key is None:
            return None
        return self._open(r.run_key, f"run:{session}/{service}"), int(r.seq)

    def pin_tags(self, session: str, service: str, run_id: str, seq: int, tags: list[str]) -> bool:
        """Record the tags a run now accepts, if ``seq`` is newer than its last report."""
        with self.engine.begin() as db:
            done = db.execute(
                services.update()
                .where(
                    services.c.session == session,
                    services.c.service == service,
                    services.c.run_id == run_id,
                    services.c.seq < seq,
                )
                .values(tags=json.dumps(tags), seq=seq)
            )
            return bool(done.rowcount == 1)

    def reset_tags(self, session: str, service: str, tags: list[str]) -> None:
        """The owner named a new FSPF tag in the policy: start from it (and end the current run)."""
        where = (services.c.session == session, services.c.service == service)
        with self.engine.begin() as db:
            done = db.execute(
                services.update().where(*where).values(tags=json.dumps(tags), run_id="", run_key=None, seq=0)
            )
            if done.rowcount == 0:
                db.execute(services.insert().values(session=session, service=service, tags=json.dumps(tags), seq=0))

    # -- audit --------------------------------------------------------------------------------

    def log(self, session: str, service: str, event: str, ok: bool, detail: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                audit.insert().values(
                    time=time.time(), session=session, service=service, event=event, ok=ok, detail=detail
                )
            )

    def audit_of(self, session: str, limit: int = 1000) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(audit).where(audit.c.session == session).order_by(audit.c.id.desc()).limit(limit)
            )
            return [
                {"time": r.time, "service": r.service, "event": r.event, "ok": r.ok, "detail": r.detail} for r in rows
            ]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()

"""``pyscone cas …``: serve the CAS, trust a platform, and the owner's session commands."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8081"


class CliError(Exception):
    """One ``error:`` line."""


def default_dir() -> Path:
    env = os.environ.get("PYSCONE_CAS_DIR")
    return Path(env) if env else Path.home() / ".pyscone" / "cas"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cas = sub.add_parser("cas", help="the configuration and attestation service (CAS) and its client")
    csub = cas.add_subparsers(dest="cas_command", required=True)
    s = csub.add_parser("serve", help="run the CAS over HTTPS (keys made on first start; SQLite by default)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    s.add_argument("--db", help="a database URL, e.g. postgresql://user@host/cas (default DIR/cas.db)")
    s.add_argument("--name", action="append", default=[], help="another host name for the certificate")
    s.add_argument(
        "--admin",
        metavar="KEY",
        help="the CAS admin's key (PEM; its public half is kept): may trust platforms remotely",
    )
    t = csub.add_parser(
        "trust",
        help="trust a platform: its LAS public key (pyscone las --show); with --key, remotely as the CAS admin, "
        "else directly in the CAS's database",
    )
    t.add_argument("platform_key", help="the platform's public key, PEM")
    t.add_argument("--note", default="", help="what this platform is")
    d = csub.add_parser("distrust", help="stop trusting a platform (its id, or its public key PEM); like trust")
    d.add_argument("platform_key", metavar="platform", help="the platform's id (hex) or public key (PEM file)")
    for p in (t, d):
        p.add_argument("--db", help="the CAS's database URL (default DIR/cas.db)")
    for p in (s, t, d):
        p.add_argument("--dir", help="the CAS's directory (default ~/.pyscone/cas)  [PYSCONE_CAS_DIR]")
    se = csub.add_parser("session", help="create, update or show a session (you are its owner)")
    ssub = se.add_subparsers(dest="session_command", required=True)
    clients = []
    for verb, what in (
        ("create", "a new session from a policy"),
        ("update", "a session (the policy names its predecessor)"),
    ):
        p = ssub.add_parser(verb, help=what)
        p.add_argument("policy", help="the policy, YAML")
        clients.append(p)
    sh = ssub.add_parser("show", help="print a session's policy and version")
    sh.add_argument("name")
    sh.add_argument(
        "--ca",
        action="store_true",
        help="print the session's CA certificate instead (PEM: what clients of its x509 secrets trust)",
    )
    au = csub.add_parser("audit", help="the attestations and changes of a session")
    au.add_argument("name")
    for p in (*clients, sh, au, t, d):
        p.add_argument(
            "--cas",
            default=os.environ.get("PYSCONE_CAS", f"https://{DEFAULT_LISTEN}"),
            help="the CAS URL  [PYSCONE_CAS]",
        )
        p.add_argument(
            "--cas-cert",
            default=os.environ.get("PYSCONE_CAS_CERT"),
            help="the CAS's certificate (default DIR/cas-cert.pem)  [PYSCONE_CAS_CERT]",
        )
        p.add_argument(
            "--key",
            default=os.environ.get("PYSCONE_OWNER_KEY"),
            help="your owner key (pyscone keygen)  [PYSCONE_OWNER_KEY]",
        )
    for p in (t, d):  # remote only when the admin's key is named, never from the environment
        p.set_defaults(key=None)


def run(a: argparse.Namespace) -> int:
    if a.cas_command == "serve":
        from pyscone.cas import server

        try:
            admin = Path(a.admin).read_bytes() if a.admin else None
            return server.serve(Path(a.dir) if a.dir else default_dir(), a.listen, a.db, a.name, admin)
        except OSError as e:
            raise CliError(f"--admin {a.admin}: {e.strerror}") from None
        except server.CasError as e:
            raise CliError(str(e)) from None
    if a.cas_command in ("trust", "distrust") and not a.key:
        return _trust(a)
    return _owner(a)


def _platform_id(a: argparse.Namespace) -> tuple[str, str]:
    """(platform id, public key PEM or "") named on the command line: an id, or a PEM file."""
    from pyscone.platform import keys, quote

    if a.cas_command == "distrust" and re.fullmatch(r"[0-9a-fA-F]{64}", a.platform_key):
        return a.platform_key.lower(), ""
    try:
        key = keys.load_public(Path(a.platform_key).read_bytes())
    except OSError as e:
        raise CliError(f"{a.platform_key}: {e.strerror}") from None
    except ValueError as e:
        raise CliError(f"{a.platform_key}: {e}") from None
    return quote.platform_id(key).hex(), keys.public_pem(key).decode()


def _trust(a: argparse.Namespace) -> int:
    """``trust`` / ``distrust`` directly in the CAS's database (on the CAS machine)."""
    from pyscone.cas import server
    from pyscone.cas.integrity import Tampered
    from pyscone.cas.store import Store, StoreError

    pid, pem = _platform_id(a)
    directory = Path(a.dir) if a.dir else default_dir()
    try:
        _, _, master = server.ensure_identity(directory, ["localhost", "127.0.0.1"])
        store = Store(a.db or f"sqlite:///{directory / 'cas.db'}", master, directory / server.ANCHOR_FILE)
        if a.cas_command == "trust":
            store.trust_platform(pid, pem, a.note)
            print(f"trusted platform {pid}")
        elif store.distrust_platform(pid):
            print(f"distrusted platform {pid}")
        else:
            raise CliError(f"platform {pid} is not trusted")
    except (server.CasError, StoreError, Tampered) as e:
        raise CliError(str(e)) from None
    return 0


def _owner(a: argparse.Namespace) -> int:
    from pyscone.cas.client import Client, ClientError
    from pyscone.host.identity import IdentityError, read_signer_key

    cert = a.cas_cert or str(default_dir() / "cas-cert.pem")
    if not a.key:
        raise CliError("an owner key is needed: --key FILE or PYSCONE_OWNER_KEY (make one with pyscone keygen)")
    try:
        client = Client(a.cas, cert, read_signer_key(a.key))
        if a.cas_command == "audit":
            for e in reversed(client.audit(a.name)["events"]):
                when = datetime.datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds")
                result = "ok" if e["ok"] else "REFUSED"
                print(f"{when}  {e['service'] or '-':<12} {e['event']:<7} {result:<8} {e['detail']}")
            return 0
        if a.cas_command == "trust":
            print(f"trusted platform {client.trust_platform(_platform_id(a)[1], a.note)['platform_id']}")
            return 0
        if a.cas_command == "distrust":
            print(f"distrusted platform {client.distrust_platform(_platform_id(a)[0])['platform_id']}")
            return 0
        if a.session_command == "show":
            doc = client.session(a.name)
            if a.ca:
                if not doc.get("ca"):
                    raise CliError(f"session {a.name} has no CA yet (it has no x509 secret)")
                sys.stdout.write(doc["ca"])
                return 0
            print(f"# session {doc['name']}, version {doc['version']}")
            sys.stdout.write(doc["policy"])
            return 0
        try:
            text = Path(a.policy).read_text()
        except OSError as e:
            raise CliError(f"{a.policy}: {e.strerror}") from None
        doc = client.put_session(text)
        print(f"session {doc['name']}: version {doc['version']}")
        return 0
    except (ClientError, IdentityError) as e:
        raise CliError(str(e)) from None

"""The network shield's rules: their parser, the dev-mode file, and what an unlisted socket gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_enclave, write_app

from pyscone.protect import netpolicy

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_the_rules_parse_and_default_to_refusing() -> None:
    rules = netpolicy.parse(
        {
            "listen": [{"port": 8443, "cert": PEM, "key": PEM}, {"path": "/run/a.sock", "cert": PEM, "key": PEM}],
            "connect": [
                {"to": "DB.internal.:5432", "ca": PEM},
                {"to": "[::1]:6379", "ca": PEM, "cert": PEM, "key": PEM},
                {"to": "/run/pg.sock", "ca": PEM, "server_name": "pg"},
            ],
        }
    )
    assert (rules.unlisted, rules.udp) == ("refuse", "refuse")
    assert rules.listen_rule(port=8443) is rules.listen[0] and rules.listen_rule(path="/run/a.sock") is rules.listen[1]
    assert [(c.host, c.port, c.path, c.server_name) for c in rules.connect] == [
        ("db.internal", 5432, None, "db.internal"),
        ("::1", 6379, None, "::1"),
        (None, None, "/run/pg.sock", "pg"),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "network: expected a mapping"),
        ({"listen": [{"port": 0, "cert": PEM, "key": PEM}]}, "listen[0].port: expected a port from 1 to 65535"),
        ({"listen": [{"port": 1, "cert": PEM}]}, "listen[0]: missing 'key'"),
        ({"listen": [{"port": 1, "path": "/x", "cert": PEM, "key": PEM}]}, "listen[0]: give either 'port' or 'path'"),
        ({"listen": [{"port": 1, "cert": PEM, "key": PEM}] * 2}, "listen: port 1 is listed twice"),
        ({"connect": [{"to": "db", "ca": PEM}]}, "connect[0].to: expected host:port"),
        ({"connect": [{"to": "db:1", "ca": PEM, "cert": PEM}]}, "a client identity needs both 'cert' and 'key'"),
        ({"connect": [{"to": "/run/x.sock", "ca": PEM}]}, "a Unix socket destination needs 'server_name'"),
        ({"connect": [{"to": "bad host!:1", "ca": PEM}]}, "is not an IP address or a host name"),
        ({"unlisted": "maybe"}, "unlisted: expected refuse or allow"),
        ({"udp": True}, "udp: expected refuse or allow"),
        ({"listn": []}, "unknown key 'listn'"),
    ],
)
def test_bad_rules_say_where_and_why(spec: object, message: str) -> None:
    with pytest.raises(netpolicy.NetPolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        netpolicy.parse(spec)


def test_a_bad_net_shield_file_is_one_error_line(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print('ran')")
    (tmp_path / "net.yaml").write_text("listen:\n  - port: 8443\n    cert: missing.pem\n    key: missing.key\n")
    r = run_enclave("--net-shield", "net.yaml", app, cwd=tmp_path)
    assert r.returncode == 2 and "ran" not in r.stdout
    assert r.stderr.strip() == "error: --net-shield net.yaml: listen[0].cert: missing.pem: No such file or directory"
    (tmp_path / "net.yaml").write_text("listen:\n  - port: 8443\n    cert: net.yaml\n    key: net.yaml\n")
    r = run_enclave("--net-shield", "net.yaml", app, cwd=tmp_path)
    assert r.returncode != 0 and "ran" not in r.stdout
    assert "pyscone: network shield: listen port 8443: a certificate, key or CA does not load" in r.stderr, r.stderr


def test_unix_datagrams_abstract_sockets_and_udp_follow_the_policy(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
import socket
def attempt(what, f):
    try:
        f()
        print(what, "allowed")
    except PermissionError as e:
        print(what, "refused", e.errno)
    except OSError as e:
        print(what, "reached the host:", e.errno)
attempt("unix-dgram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", "/dev/log"))
attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\\0pyscone-test-abstract"))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 9)))
attempt("udp-bind", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("127.0.0.1", 0)))
attempt("tcp-bind", lambda: socket.socket().bind(("127.0.0.1", 0)))
""",
    )
    (tmp_path / "refuse.yaml").write_text("unlisted: refuse\nudp: refuse\n")
    r = run_enclave("--net-shield", "refuse.yaml", app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "unix-dgram refused 13",
        "abstract refused 13",
        "udp refused 13",
        "udp-bind refused 13",
        "tcp-bind allowed",
    ]
    assert "refused a datagram to the Unix socket '/dev/log' (not in the policy)" in r.stderr
    (tmp_path / "allow.yaml").write_text("unlisted: allow\nudp: allow\n")
    r = run_enclave("--net-shield", "allow.yaml", app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[2:] == ["udp allowed", "udp-bind allowed", "tcp-bind allowed"], lines
    assert not any("refused" in line for line in lines), lines
    assert "plaintext: a datagram to the Unix socket '/dev/log' (not in the policy)" in r.stderr

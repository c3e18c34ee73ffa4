"""pyscone las end to end: a real service on loopback, real clients, an enclave asking it for a quote."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

from pyscone.platform import keys, quote, sigstruct


class Las:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.proc = subprocess.Popen(
            [*PYSCONE, "las", "--dir", str(directory), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "pyscone las: platform ID listening on 127.0.0.1:PORT"
        assert "listening on" in line, line + self.proc.stderr.read()  # type: ignore[union-attr]
        self.platform_id = line.split()[3]
        self.port = int(line.rsplit(":", 1)[1])

    def ask(self, *lines: bytes) -> list[dict[str, object]]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s, s.makefile("rb") as f:
            out = []
            for line in lines:
                s.sendall(line)
                out.append(json.loads(f.readline()))
            return out

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=10)


@pytest.fixture
def las(tmp_path: Path) -> Iterator[Las]:
    service = Las(tmp_path / "las")
    yield service
    service.stop()


def _public_key(service: Las) -> quote.ec.EllipticCurvePublicKey:
    shown = subprocess.run([*PYSCONE, "las", "--dir", str(service.dir), "--show"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return keys.load_public(shown.stdout.encode())


def test_the_platform_key_is_made_once_and_kept(las: Las) -> None:
    key_file = las.dir / "platform-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    public = _public_key(las)
    assert quote.platform_id(public).hex() == las.platform_id
    assert las.stop() == 0  # SIGTERM: a clean exit
    again = Las(las.dir)
    try:
        assert again.platform_id == las.platform_id  # a restart keeps the platform's identity
    finally:
        again.stop()


def test_quotes_verify_and_bad_requests_get_an_error_on_a_live_connection(las: Las) -> None:
    report = quote.Report(bytes(32), bytes(range(32)), 7, 2, False, quote.report_data(b"pk", b"nonce"))
    bad_report = report.pack()[:-1].hex()
    answers = las.ask(
        b"not json\n",
        b'{"op": "dance"}\n',
        json.dumps({"op": "quote", "report": bad_report}).encode() + b"\n",
        json.dumps({"op": "quote", "report": report.pack().hex()}).encode() + b"\n",
        b'{"op": "platform"}\n',
    )
    assert answers[0] == {"error": "not a JSON request"}
    assert answers[1] == {"error": "unknown op 'dance'"}
    assert str(answers[2]["error"]).startswith("bad report")
    trusted = {bytes.fromhex(las.platform_id): _public_key(las)}
    assert quote.verify_quote(bytes.fromhex(str(answers[3]["quote"])), trusted) == report
    assert answers[4]["platform_id"] == las.platform_id
    assert answers[4]["public_key"] == keys.public_pem(_public_key(las)).decode()
    # A line longer than the limit is refused; the service lives on.
    with socket.create_connection(("127.0.0.1", las.port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(b"x" * (100 * 1024) + b"\n")
        assert json.loads(f.readline()) == {"error": "request too long"}
    assert las.ask(b'{"op": "platform"}\n')[0]["platform_id"] == las.platform_id


ENCLAVE_APP = """
    import sys
    from pyscone.enclave import attest
    from pyscone.platform import keys
    nonce = bytes.fromhex(sys.argv[2])
    key = keys.generate()
    try:
        blob = attest.request_quote(("127.0.0.1", int(sys.argv[1])), attest.my_report(
            attest.quote.report_data(keys.public_der(key), nonce)))
    except attest.AttestationError as e:
        print("ERR", e)
    else:
        print(keys.public_der(key).hex(), blob.hex())
"""


def test_an_enclave_gets_a_quote_that_names_it(las: Las, tmp_path: Path) -> None:
    assert subprocess.run([*PYSCONE, "keygen", "signer.pem"], cwd=tmp_path, capture_output=True).returncode == 0
    signed = subprocess.run(
        [*PYSCONE, "sign", "--key", "signer.pem", "--product-id", "7", "--svn", "2", "-o", "app.sig"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert signed.returncode == 0, signed.stderr
    write_app(tmp_path, ENCLAVE_APP)
    nonce = "00112233445566778899aabbccddeeff"
    r = run_enclave("--signature", "app.sig", "app.py", str(las.port), nonce, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    public_hex, blob_hex = r.stdout.split()
    trusted = {bytes.fromhex(las.platform_id): _public_key(las)}
    report = quote.verify_quote(bytes.fromhex(blob_hex), trusted)
    sig = sigstruct.decode((tmp_path / "app.sig").read_bytes())
    assert report.mrenclave == sig.mrenclave
    assert report.mrsigner == sig.mrsigner
    assert (report.product_id, report.svn, report.debug) == (7, 2, False)
    assert report.report_data == quote.report_data(bytes.fromhex(public_hex), bytes.fromhex(nonce))
    # With the LAS gone the enclave is told so, in one line.
    port = las.port
    las.stop()
    r = run_enclave("--signature", "app.sig", "app.py", str(port), nonce, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"ERR the LAS at 127.0.0.1:{port} cannot be reached")


def test_an_unusable_key_or_address_is_one_error_line(tmp_path: Path) -> None:
    d = tmp_path / "las"
    d.mkdir()
    (d / "platform-key.pem").write_text("garbage")
    for args in (["--dir", str(d), "--show"], ["--dir", str(tmp_path / "new"), "--listen", "nowhere"]):
        r = subprocess.run([*PYSCONE, "las", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr

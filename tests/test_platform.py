"""The attestation formats (sans-IO): measurement, enclave signatures, reports and quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.platform import keys, measure, quote, sigstruct
from pyscone.platform.measure import TcbFile
from pyscone.platform.quote import Expected, QuoteError, Report
from pyscone.platform.sigstruct import SignatureError

FILES = [
    TcbFile("interpreter", "/usr/bin/python3", 10, "aa" * 32),
    TcbFile("module:json", "/lib/json/__init__.py", 20, "bb" * 32),
    TcbFile("extension:_ssl.so", "/lib/_ssl.so", 30, "cc" * 32),
]
CONFIG = {"heap": 1 << 30, "syscalls": "async", "preload": [], "slots": 1024, "slot_data": 65536, "cas": None}


# -- measurement ---------------------------------------------------------------------------------


def test_mrenclave_covers_contents_and_identity_config_but_not_paths_or_order() -> None:
    base = measure.mrenclave(FILES, CONFIG)
    assert len(base) == 32
    assert measure.mrenclave(list(reversed(FILES)), CONFIG) == base
    moved = [TcbFile(f.name, "/elsewhere" + f.path, f.size, f.sha256) for f in FILES]
    assert measure.mrenclave(moved, CONFIG) == base  # the same files in another directory
    assert measure.mrenclave(FILES, {**CONFIG, "spin_us": 5, "stats": True}) == base  # host tuning
    changed = [FILES[0], TcbFile("module:json", FILES[1].path, 20, "bd" * 32), FILES[2]]
    assert measure.mrenclave(changed, CONFIG) != base
    assert measure.mrenclave(FILES[:2], CONFIG) != base
    renamed = [FILES[0], TcbFile("module:jsonx", FILES[1].path, 20, "bb" * 32), FILES[2]]
    assert measure.mrenclave(renamed, CONFIG) != base
    for key, value in (("heap", 1 << 29), ("syscalls", "sync"), ("preload", ["x"]), ("slots", 8), ("cas", "c")):
        assert measure.mrenclave(FILES, {**CONFIG, key: value}) != base, key
    with pytest.raises(ValueError):
        measure.mrenclave([*FILES, FILES[0]], CONFIG)


# -- enclave signatures -------------------------------------------------------------------------

KEY = keys.generate()
OTHER_KEY = keys.generate()
MRE = bytes(range(32))


def test_a_signature_round_trips_and_names_its_signer() -> None:
    s = sigstruct.sign(MRE, KEY, product_id=7, svn=3, debug=False)
    back = sigstruct.decode(s.encode())
    assert back == s
    assert back.mrsigner == sigstruct.mrsigner_of(KEY) != sigstruct.mrsigner_of(OTHER_KEY)
    assert keys.load_private(keys.private_pem(KEY)).private_numbers() == KEY.private_numbers()


@pytest.mark.parametrize(
    ("field", "value"),
    [("mrenclave", "00" * 32), ("product_id", 8), ("svn", 4), ("debug", True), ("signer", None), ("signature", None)],
)
def test_an_altered_signature_is_refused(field: str, value: object) -> None:
    doc = json.loads(sigstruct.sign(MRE, KEY, product_id=7, svn=3, debug=False).encode())
    if field == "signer":  # another signer's key: the signature no longer verifies under it
        value = json.loads(sigstruct.sign(MRE, OTHER_KEY, product_id=7, svn=3, debug=False).encode())["signer"]
    elif field == "signature":  # a valid signature, but over other fields
        value = json.loads(sigstruct.sign(MRE, KEY, product_id=7, svn=4, debug=False).encode())["signature"]
    doc[field] = value
    with pytest.raises(SignatureError):
        sigstruct.decode(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "blob",
    [b"", b"not json", b"[]", b'{"version": 2}', b'{"version": 1}'],
)
def test_a_malformed_signature_is_refused(blob: bytes) -> None:
    with pytest.raises(SignatureError):
        sigstruct.decode(blob)


def test_signature_field_types_and_ranges_are_checked() -> None:
    doc = json.loads(sigstruct.sign(MRE, KEY, product_id=7, svn=3, debug=False).encode())
    for field, value in (("svn", "3"), ("debug", 1), ("product_id", 70000), ("mrenclave", "00")):
        with pytest.raises(SignatureError):
            sigstruct.decode(json.dumps({**doc, field: value}).encode())
    with pytest.raises(ValueError):
        sigstruct.sign(MRE, KEY, product_id=-1, svn=0, debug=False)
    with pytest.raises(ValueError):
        keys.load_private(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


# -- reports and quotes -------------------------------------------------------------------------

PLATFORM = keys.generate()
ROGUE = keys.generate()
TRUSTED = {quote.platform_id(PLATFORM.public_key()): PLATFORM.public_key()}


def _report(**kw: object) -> Report:
    fields: dict[str, object] = {
        "mrenclave": MRE,
        "mrsigner": sigstruct.mrsigner_of(KEY),
        "product_id": 7,
        "svn": 3,
        "debug": False,
        "report_data": quote.report_data(b"enclave public key", b"nonce"),
    }
    fields.update(kw)
    return Report(**fields)  # type: ignore[arg-type]


def test_a_quote_round_trips() -> None:
    r = _report()
    assert quote.verify_quote(quote.sign_quote(r, PLATFORM), TRUSTED) == r
    assert Report.unpack(r.pack()) == r


def test_every_flipped_byte_of_a_quote_is_refused() -> None:
    blob = quote.sign_quote(_report(), PLATFORM)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(QuoteError):
            quote.verify_quote(bytes(bad), TRUSTED)
    for cut in (0, 4, 100, len(blob) - 1):
        with pytest.raises(QuoteError):
            quote.verify_quote(blob[:cut], TRUSTED)
    with pytest.raises(QuoteError):
        quote.verify_quote(blob + b"\0", TRUSTED)


def test_a_quote_from_an_untrusted_platform_is_refused() -> None:
    blob = quote.sign_quote(_report(), ROGUE)
    with pytest.raises(QuoteError, match="untrusted platform"):
        quote.verify_quote(blob, TRUSTED)
    # A rogue key that claims a trusted platform's id: the signature fails.
    forged = bytearray(blob)
    start = len(quote.MAGIC) + quote.REPORT_SIZE
    forged[start : start + 32] = quote.platform_id(PLATFORM.public_key())
    with pytest.raises(QuoteError, match="does not verify"):
        quote.verify_quote(bytes(forged), TRUSTED)


@settings(max_examples=50, deadline=None)
@given(
    key=st.binary(max_size=100),
    nonce=st.binary(max_size=40),
    key2=st.binary(max_size=100),
    nonce2=st.binary(max_size=40),
)
def test_report_data_binds_key_and_nonce(key: bytes, nonce: bytes, key2: bytes, nonce2: bytes) -> None:
    same = quote.report_data(key, nonce) == quote.report_data(key2, nonce2)
    assert same == ((key, nonce) == (key2, nonce2))


def test_what_a_verifier_expects() -> None:
    signer = sigstruct.mrsigner_of(KEY)
    by_mrenclave = Expected(mrenclaves=frozenset({MRE}))
    by_signer = Expected(mrsigner=signer, product_id=7, min_svn=3)
    by_mrenclave.check(_report())
    by_signer.check(_report())
    by_signer.check(_report(svn=9))
    cases = [
        (by_mrenclave, _report(mrenclave=bytes(32)), "MRENCLAVE"),
        (by_signer, _report(mrsigner=sigstruct.mrsigner_of(OTHER_KEY)), "MRSIGNER"),
        (by_signer, _report(product_id=8), "product id"),
        (by_signer, _report(svn=2), "security version 2 is below the minimum 3"),
        (by_signer, _report(debug=True), "debug enclave"),
    ]
    for expected, report, reason in cases:
        with pytest.raises(QuoteError, match=reason):
            expected.check(report)
    Expected(mrsigner=signer, product_id=7, allow_debug=True).check(_report(debug=True))


def test_report_fields_are_range_checked() -> None:
    for kw in ({"svn": 1 << 16}, {"mrenclave": b"short"}, {"report_data": b"x"}):
        with pytest.raises(ValueError):
            _report(**kw).pack()
    body = bytearray(_report().pack())
    body[0:2] = b"\0\x02"  # version 2
    with pytest.raises(QuoteError, match="version"):
        Report.unpack(bytes(body))
    body = bytearray(_report().pack())
    body[70] |= 0x80  # an unknown flag
    with pytest.raises(QuoteError, match="flags"):
        Report.unpack(bytes(body))


# -- what the measuring loader hashes: code objects, and the libraries beside a wheel's extension --


def test_the_code_digest_and_not_how_a_file_was_loaded_is_measured() -> None:
    base = measure.mrenclave(FILES, CONFIG)
    coded = [*FILES, TcbFile("module:helper", "/app/helper.py", 40, "dd" * 32, code="ee" * 32, how="cached")]
    with_code = measure.mrenclave(coded, CONFIG)
    assert with_code != base
    relabeled = [
        *FILES,
        TcbFile("module:helper", "/elsewhere/helper.py", 40, "dd" * 32, code="ee" * 32, how="compiled"),
    ]
    assert measure.mrenclave(relabeled, CONFIG) == with_code  # cold or warm cache, any directory
    other_code = [*FILES, TcbFile("module:helper", "/app/helper.py", 40, "dd" * 32, code="ef" * 32)]
    assert measure.mrenclave(other_code, CONFIG) != with_code  # same source, other code ran


CODE_SOURCE = """
import os
NAMES = frozenset({"alpha", "beta", "gamma", "delta", "epsilon"})
def f(a, b=1.5, *, c=None):
    x = a + b
    def inner():
        return x, c
    return inner() if a in {"one", "two", "three"} else (NAMES, b"bytes", -0.0, 3j)
"""


def test_code_digest_is_of_what_runs() -> None:
    import marshal

    from pyscone.enclave import loader

    code = compile(CODE_SOURCE, "/a/helper.py", "exec", dont_inherit=True)
    digest = loader.code_digest(code)
    assert loader.code_digest(marshal.loads(marshal.dumps(code))) == digest  # what a .pyc holds
    assert loader.code_digest(compile(CODE_SOURCE, "/b/elsewhere.py", "exec", dont_inherit=True)) == digest
    f = next(c for c in code.co_consts if isinstance(c, type(code)))
    changed = [
        CODE_SOURCE.replace("1.5", "2.5"),  # a default
        CODE_SOURCE.replace("x, c", "c, x"),  # the bytecode
        CODE_SOURCE.replace('"gamma"', '"gamma2"'),  # a frozenset member
        CODE_SOURCE.replace("-0.0", "0.0"),  # a constant that compares equal
        CODE_SOURCE.replace("f(a, b", "f(b, a"),  # the order of the locals
    ]
    for source in changed:
        assert loader.code_digest(compile(source, "/a/helper.py", "exec", dont_inherit=True)) != digest, source
    # A field no source change reaches directly, in a nested code object.
    bumped = code.replace(
        co_consts=tuple(f.replace(co_stacksize=f.co_stacksize + 1) if c is f else c for c in code.co_consts)
    )
    assert loader.code_digest(bumped) != digest


def test_code_digest_does_not_depend_on_the_hash_seed() -> None:
    # Frozenset constants iterate in an order that depends on the (per-process) hash seed.
    script = (
        "import sys; from pyscone.enclave import loader\n"
        f"print(loader.code_digest(compile({CODE_SOURCE!r}, 'x.py', 'exec', dont_inherit=True)))\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(digests) == 1 and len(digests.pop().strip()) == 64


def test_elf_names_the_libraries_a_wheel_keeps_beside_its_extension() -> None:
    import glob
    import importlib.util

    from pyscone.enclave import elf

    spec = importlib.util.find_spec("psycopg_binary")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("psycopg[binary] is not installed")
    (ext,) = glob.glob(os.path.join(spec.submodule_search_locations[0], "pq.*.so"))
    fd = os.open(ext, os.O_RDONLY)
    try:
        deps = elf.origin_dependencies(fd, os.path.dirname(ext))
    finally:
        os.close(fd)
    assert any(os.path.basename(d).startswith("libpq-") for d in deps), deps
    assert all(d.startswith(os.path.dirname(os.path.dirname(ext))) and os.path.isfile(d) for d in deps)
    with open(sys.executable, "rb") as f:  # an object with no $ORIGIN run path
        assert elf.origin_dependencies(f.fileno(), "/") == []

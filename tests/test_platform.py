"""The attestation formats (sans-IO): measurement, enclave signatures, reports and quotes."""

from __future__ import annotations

import json

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

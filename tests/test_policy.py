"""Session policies (sans-IO): what parses, what is refused and where, and secret references."""

from __future__ import annotations

import pytest

from pyscone.cas import policy, secrets
from pyscone.cas.policy import PolicyError

GOOD = (
    """\
name: shop
predecessor: null
services:
  api:
    mrenclaves: ['0000000000000000000000000000000000000000000000000000000000000001']
    mrsigner: "SIGNER"
    product_id: 7
    min_svn: 2
    argv: [api.py, "--db-password=${secret:db}"]
    env: {KEY: "${secret:sign}", PUB: "${secret:sign.public}", CERT: "${secret:tls.cert}"}
    files: {/run/ca.pem: "${secret:tls.ca}"}
    fspf: {path: /data/app.fspf, key: "FSPFKEY", tag: "FSPFTAG"}
secrets:
  db: {kind: password, length: 20}
  sign: {kind: ecdsa}
  tls: {kind: x509, common_name: api.shop}
""".replace("SIGNER", "ab" * 32)
    .replace("FSPFKEY", "11" * 32)
    .replace("FSPFTAG", "0" * 32)
)


def test_a_good_policy_parses_and_renders() -> None:
    p = policy.parse(GOOD)
    assert p.name == "shop" and p.predecessor is None and p.platforms is None
    api = p.services["api"]
    assert api.expected.mrenclaves == {bytes.fromhex("00" * 31 + "01")}  # an all-digit MRENCLAVE keeps its zeros
    assert api.expected.mrsigner == bytes.fromhex("ab" * 32) and api.expected.min_svn == 2
    assert api.fspf is not None and api.fspf.tag == "0" * 32
    assert len(p.version) == 64 and p.version == policy.version_of(GOOD)
    values: dict[str, str] = {}
    for spec in p.secrets.values():
        secrets.generate(spec, values, p.name)
    assert len(values["db"]) == 20
    assert values["tls.ca"] == values[secrets.CA_CERT] and "BEGIN CERTIFICATE" in values["tls.cert"]
    assert policy.render(api.argv[1], values) == "--db-password=" + values["db"]
    kept = secrets.fill(dict(p.secrets), values, {n: s.kind for n, s in p.secrets.items()}, p.name)
    assert kept == values  # an update keeps every secret whose kind did not change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("name: shop", "name: 'bad name'"), "line 1: name: expected a name"),
        (("    product_id: 7", "    product_id: seven"), "line 7: services.api.product_id: expected an integer"),
        (("    min_svn: 2", "    min_svn: 2\n    colour: blue"), "line 9: services.api.colour: unknown key"),
        (("${secret:db}", "${secret:nope}"), "line 9: services.api.argv[1]: refers to an undefined secret 'nope'"),
        (
            ("${secret:tls.cert}", "${secret:tls.pem}"),
            "line 10: services.api.env.CERT: a x509 secret has no part 'pem'",
        ),
        (("/run/ca.pem", "run/ca.pem"), "line 11: services.api.files.run/ca.pem: an injected file's path is absolute"),
        (("kind: ecdsa", "kind: rsa"), "line 15: secrets.sign.kind: unknown kind"),
        (("predecessor: null", "predecessor: 12"), "line 2: predecessor: expected the 64-hex-digit version"),
        (("    argv: [api", "    argv: [api"), None),
        (
            ("    argv: [api", "    cwd: srv/api\n    argv: [api"),
            "line 9: services.api.cwd: the working directory is an absolute",
        ),
    ],
)
def test_mistakes_name_their_line(change: tuple[str, str], message: str | None) -> None:
    text = GOOD.replace(*change)
    if message is None:
        policy.parse(text)
        return
    with pytest.raises(PolicyError) as e:
        policy.parse(text)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "text",
    ["", "name: x", "- a list", "name: x\nservices: {}", "name: x\nservices:\n  a: {argv: [x]}", "{", "name: [1"],
)
def test_broken_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError, match=r"^line \d+: "):
        policy.parse(text)


def test_the_working_directory_is_the_policys_with_a_default_of_root() -> None:
    assert policy.parse(GOOD).services["api"].cwd == "/"
    assert (
        policy.parse(GOOD.replace("    argv: [api", "    cwd: /srv/./api/\n    argv: [api")).services["api"].cwd
        == "/srv/api"
    )

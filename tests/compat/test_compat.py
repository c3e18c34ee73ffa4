"""The compatibility matrix under pytest: every case natively (must work) and in the enclave.

A case that ``expected.json`` (written by ``report.py`` from a run) says works in the enclave and
now fails is a regression: the test fails.  A case expected to fail is ``xfail(strict=False)``: a fix
elsewhere that makes it work shows as XPASS, not as a broken build.  Run alone: ``pytest -m compat``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from matrix import CASES, Case, Env, expected, run_case

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def compat_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield Env(Path(tmp_path_factory.mktemp("compat")))


# Each case bounds its own runs (case.timeout, natively and in the enclave); the test's bound covers both.
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=pytest.mark.timeout(2 * c.timeout + 30)) for c in CASES]
)
def test_case(case: Case, compat_env: Env, request: pytest.FixtureRequest) -> None:
    native = run_case(case, "native", compat_env)
    assert native.ok, f"{case.name} fails natively, so the case itself is wrong: {native.error}\n{native.detail}"
    today = expected().get(case.name, {})
    if today.get("enclave") == "fails":
        request.applymarker(pytest.mark.xfail(strict=False, reason=f"fails today: {today.get('error', '')}"))
    enclave = run_case(case, "enclave", compat_env)
    assert enclave.ok, f"{case.name} works natively but not in the enclave: {enclave.error}\n{enclave.detail}"

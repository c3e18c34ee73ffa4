"""A CAS session's argv is python's command line too: ``-c CODE`` and ``-m MODULE``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_cas import World, _service


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cas-cli"))
    (w.root / "tool.py").write_text("import sys\nprint('tool', sys.argv[1:])\n")
    yield w
    w.stop()


def test_a_session_runs_dash_c_and_dash_m(world: World) -> None:
    mre = world.measure()
    code = "import sys; print('code', sys.argv, repr(sys.path[0]))"
    for name, argv in (("code", f'["-c", "{code}", "a", "-q"]'), ("mod", '["-m", "tool", "-w", "1"]')):
        created = world.owner("session", "create", str(world.policy(name, _service(mre, argv))))
        assert created.returncode == 0, created.stderr
    r = world.run("code/app")
    assert (r.returncode, r.stdout) == (0, "code ['-c', 'a', '-q'] ''\n"), r.stderr
    r = world.run("mod/app")
    assert (r.returncode, r.stdout) == (0, "tool ['-w', '1']\n"), r.stderr

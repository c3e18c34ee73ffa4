"""Random-access semantics through the shield equal a plain file system's (hypothesis model test).

One enclave runs ``apps/fs_model_app.py`` over an encrypted region with 64-byte chunks (so small
files span many chunks); the same operations run in-process on a plain temporary directory.
Every result — data read, positions, sizes, errors — must match, and so must the files at the end.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYSCONE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyscone.host import fspf_tool as tool

APP = Path(__file__).parent / "apps" / "fs_model_app.py"
_spec = importlib.util.spec_from_file_location("fs_model_app", APP)
assert _spec is not None and _spec.loader is not None
model_app = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_app)


class Enclave:
    def __init__(self, root: Path) -> None:
        region = root / "enc"
        region.mkdir()
        paths = tool.Paths.of(str(root / "fs.fspf"))
        tool.create(paths)
        tool.add_region(paths, str(region), "encrypted", 64)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.proc = subprocess.Popen(
            [*PYSCONE, "run", "--fspf", paths.fspf, APP, str(region), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        listener.settimeout(30)
        self.conn, _ = listener.accept()
        listener.close()
        self.stream = self.conn.makefile("rwb")

    def run(self, ops: list[list[Any]]) -> list[Any]:
        self.stream.write(json.dumps(ops).encode() + b"\n")
        self.stream.flush()
        line = self.stream.readline()
        if not line:
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the enclave stopped: {err.decode()[-3000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> str:
        self.stream.close()
        self.conn.close()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err.decode()
        return err.decode()


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enclave]:
    e = Enclave(tmp_path_factory.mktemp("model"))
    yield e
    err = e.close()
    assert "refused" not in err, err


names = st.sampled_from(["a", "b"])
handles = st.integers(0, 2)
operation = st.one_of(
    st.tuples(
        st.just("open"), handles, names, st.sampled_from(["rb", "r+b", "wb", "w+b", "ab", "a+b", "xb"]),
        st.sampled_from([0, -1, 32]),
    ),
    st.tuples(st.just("read"), handles, st.integers(-1, 300)),
    st.tuples(st.just("write"), handles, st.binary(min_size=0, max_size=200).map(bytes.hex)),
    st.tuples(st.just("seek"), handles, st.integers(-80, 400), st.integers(0, 2)),
    st.tuples(st.just("tell"), handles),
    st.tuples(st.just("truncate"), handles, st.one_of(st.none(), st.integers(0, 400))),
    st.tuples(st.just("flush"), handles),
    st.tuples(st.just("fsync"), handles),
    st.tuples(st.just("close"), handles),
    st.tuples(st.just("stat"), handles, names),
    st.tuples(st.just("unlink"), handles, names),
    st.tuples(st.just("rename"), handles, names, names),
    st.tuples(st.just("listdir"), handles),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, max_size=40))
def test_the_shield_behaves_like_a_plain_file_system(
    enclave: Enclave, tmp_path: Path, ops: list[tuple[Any, ...]]
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir(exist_ok=True)
    native = model_app.Files(str(plain))
    native.reset()
    # Close everything at the end, then read each file back whole: the committed state must match too.
    tail = [["close", h] for h in range(3)] + [["listdir", 0]]
    tail += [x for n in ("a", "b") for x in (["open", 0, n, "rb", -1], ["read", 0, -1], ["close", 0])]
    script = [["reset", 0], *map(list, ops), *tail]
    expected = [native.run(op) for op in script]
    got = enclave.run(script)
    for op, want, have in zip(script, expected, got, strict=True):
        assert have == want, f"{op}: enclave {have} != native {want}\nops: {script}"

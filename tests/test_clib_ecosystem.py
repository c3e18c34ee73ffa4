"""C extensions that do their own I/O, in the enclave (issue 11): lxml's libxml2 and zlib, Pillow's
encoders, numpy's ``fromfile`` on a tampered file, and uvloop (refused at import, with the reason).

libxml2 as lxml's manylinux wheel links it in (statically, with zlib) was built against an old
glibc: it calls ``stat`` through ``__xstat64`` and hands zlib a ``dup`` of every file it reads
(``gzdopen``).  Before the libc layer interposed both (pyscone/enclave/clib/shim.c), writing a
file worked but ``lxml.etree.parse(path)`` failed with EPERM from the barrier.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, run_native, write_app
from test_fs_shield import FS

from pyscone.protect.pfile import record_offset

SECRET = "xml-text-the-host-must-never-read"

# Every way of reading and writing an XML file by path that an lxml user meets first.  What is
# printed is what the parsed trees hold, so a wrong tree cannot hide behind "no error".
LXML_APP = f"""
    import os, sys
    from lxml import etree
    d = sys.argv[1]
    root = etree.Element("catalog", version="2")
    for i in range(400):  # ~17 kB: several chunks of the FS shield, several reads of libxml2
        etree.SubElement(root, "item", id=str(i)).text = "{SECRET}-%d" % i
    tree = etree.ElementTree(root)
    tree.write(os.path.join(d, "plain.xml"))
    tree.write(os.path.join(d, "decl.xml"), xml_declaration=True, encoding="utf-8")
    tree.write(os.path.join(d, "doc.xml.gz"), compression=6)  # zlib's own gzopen writes it
    for name in ("plain.xml", "decl.xml", "doc.xml.gz"):
        t = etree.parse(os.path.join(d, name))
        r = t.getroot()
        print("parse", name, r.tag, r.get("version"), len(r), r[399].text, t.docinfo.encoding,
              etree.tostring(r) == etree.tostring(root))
    events = [(ev, el.get("id")) for ev, el in etree.iterparse(os.path.join(d, "decl.xml"), tag="item")]
    print("iterparse", len(events), events[0], events[-1])
    try:
        etree.parse(os.path.join(d, "missing.xml"))
    except OSError as e:
        print("missing", type(e).__name__)
"""


@pytest.fixture
def fs(tmp_path: Path) -> FS:
    return FS(tmp_path)


def _native(tmp_path: Path) -> tuple[str, Path]:
    d = tmp_path / "native"
    d.mkdir()
    r = run_native(write_app(tmp_path, LXML_APP, "native_lxml.py"), str(d), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("\nparse ") == 2, r.stderr
    return r.stdout, d


def test_lxml_parses_and_writes_files_on_an_unprotected_path_as_natively(tmp_path: Path) -> None:
    pytest.importorskip("lxml")
    native, native_dir = _native(tmp_path)
    d = tmp_path / "enclave"
    d.mkdir()
    r = run_enclave(write_app(tmp_path, LXML_APP), str(d), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, native), r.stderr
    for name in ("plain.xml", "decl.xml"):  # (the .gz holds a timestamp)
        assert (d / name).read_bytes() == (native_dir / name).read_bytes(), name


def test_lxml_in_an_encrypted_region_gives_the_native_trees_and_seals_the_files(fs: FS) -> None:
    pytest.importorskip("lxml")
    native, _ = _native(fs.root)
    r = fs.run(write_app(fs.root, LXML_APP), str(fs.enc))
    assert (r.returncode, r.stdout) == (0, native), r.stderr
    host = {p.name: p.read_bytes() for p in fs.enc.iterdir() if p.is_file()}
    assert set(host) == {"plain.xml", "decl.xml", "doc.xml.gz"}
    for name, data in host.items():
        assert SECRET.encode() not in data and b"<catalog" not in data and b"<?xml" not in data, name
        assert not data.startswith(b"\x1f\x8b"), name  # not even the gzip header reaches the host


@pytest.mark.parametrize("name", ["decl.xml", "doc.xml.gz"])
def test_a_tampered_encrypted_xml_file_is_an_error_never_a_wrong_tree(fs: FS, name: str) -> None:
    pytest.importorskip("lxml")
    app = write_app(
        fs.root,
        """
        import sys
        from lxml import etree
        try:
            r = etree.parse(sys.argv[1]).getroot()
            print("tree", len(r), r[-1].text)
        except (etree.XMLSyntaxError, OSError) as e:
            print("refused", type(e).__name__)
        """,
        "read_xml.py",
    )
    assert fs.run(write_app(fs.root, LXML_APP), str(fs.enc)).returncode == 0
    p = fs.enc / name
    assert fs.run(app, str(p)).stdout == f"tree 400 {SECRET}-399\n"
    data = bytearray(p.read_bytes())
    chunk = 2 if name == "decl.xml" else 0  # a middle chunk; the whole .gz is one chunk
    flipped = 0
    for slot in (0, 1):  # every slot of that chunk's record that the file has
        at = record_offset(4096, chunk, slot) + 200
        if at < len(data):
            data[at] ^= 0x01
            flipped += 1
    assert flipped
    p.write_bytes(bytes(data))
    r = fs.run(app, str(p))
    assert r.stdout.startswith("refused "), (r.stdout, r.stderr)
    assert "tree" not in r.stdout
    assert "pyscone: fs shield:" in r.stderr and "refused" in r.stderr, r.stderr


def test_import_uvloop_is_an_import_error_that_says_why(tmp_path: Path) -> None:
    # Before the refusal the import worked and uvloop.Loop() died at the barrier (EPERM from libuv's epoll_create).
    pytest.importorskip("uvloop")
    app = write_app(
        tmp_path,
        """
        try:
            import uvloop
            print("imported", uvloop.new_event_loop())
        except ImportError as e:
            print("ImportError", e.name, e)
        try:
            import uvloop.loop
        except ImportError as e:
            print("ImportError", e.name)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, (r.stdout, r.stderr)
    assert lines[0].startswith("ImportError uvloop pyscone: uvloop is not supported inside a pyscone enclave: ")
    assert "libuv" in lines[0] and "system calls" in lines[0] and "asyncio" in lines[0], lines[0]
    assert lines[1] == "ImportError uvloop"  # (its parent first, as python imports it)
    assert r.stderr.count("uvloop is not supported") == 1, r.stderr  # said once, not per import


def test_uvicorn_with_uvloop_installed_falls_back_to_asyncio_and_serves(tmp_path: Path, server: list[Server]) -> None:
    pytest.importorskip("uvloop")
    pytest.importorskip("uvicorn")
    write_app(
        tmp_path,
        """
        import asyncio

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            loop = type(asyncio.get_running_loop())
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": f"served by {loop.__module__}.{loop.__name__}".encode()})
        """,
        "asgi_app.py",
    )
    port = free_port()
    # uvicorn's defaults: --loop auto, which tries uvloop first.
    server.append(Server(["-m", "uvicorn", "asgi_app:app", "--port", str(port)], tmp_path, port))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        status, body = resp.status, resp.read().decode()
    assert (status, body) == (200, "served by asyncio.unix_events._UnixSelectorEventLoop")
    _, _, err = server[0].stop()
    assert "uvloop is not supported inside a pyscone enclave" in err, err
    assert "Uvicorn running on" in err, err


# Pillow's encoders write to the file's descriptor from C (ImageFile._save: encode_to_file(fileno)),
# its decoders read through the Python file.  The compatibility matrix's "pillow" case covers an
# unprotected working directory; this is the encrypted region.
PILLOW_APP = """
    import hashlib, os, sys
    from PIL import Image, ImageDraw
    d = sys.argv[1]
    im = Image.new("RGB", (640, 480), "white")  # large enough for many encoder buffers
    draw = ImageDraw.Draw(im)
    for i in range(0, 640, 16):
        draw.line((i, 0, 640 - i, 480), fill=(i % 256, 80, 255 - i % 256), width=3)
    im.save(os.path.join(d, "a.png"))
    im.save(os.path.join(d, "a.jpg"), quality=90)
    im.save(os.path.join(d, "b.jpg"), quality=90, progressive=True, optimize=True)
    for name in ("a.png", "a.jpg", "b.jpg"):
        with Image.open(os.path.join(d, name)) as got:
            print(name, got.format, got.size, got.mode, hashlib.sha256(got.tobytes()).hexdigest()[:16])
"""


def test_pillow_saves_and_opens_jpeg_and_png_in_an_encrypted_region_as_natively(fs: FS) -> None:
    pytest.importorskip("PIL")
    native_dir = fs.root / "native"
    native_dir.mkdir()
    native = run_native(write_app(fs.root, PILLOW_APP, "native_pillow.py"), str(native_dir), cwd=fs.root)
    assert native.returncode == 0 and native.stdout.count("\n") == 3, native.stderr
    r = fs.run(write_app(fs.root, PILLOW_APP), str(fs.enc))
    assert (r.returncode, r.stdout) == (0, native.stdout), r.stderr
    for name in ("a.png", "a.jpg", "b.jpg"):
        data = (fs.enc / name).read_bytes()
        assert b"PNG" not in data[:64] and b"JFIF" not in data[:64] and not data.startswith(b"\xff\xd8"), name
        assert data != (native_dir / name).read_bytes()


def test_numpy_fromfile_of_a_tampered_chunk_raises_and_the_open_file_stays_refused(fs: FS) -> None:
    # numpy never asks ferror after its fread: before the shield refused seeks on an open file
    # whose read met a refused chunk, fromfile(path) returned 100000 elements, the last
    # 94880 of them zeros (tests/test_clib_stdio.py has the C-level view of the same read).
    pytest.importorskip("numpy")
    app = write_app(
        fs.root,
        """
        import sys
        import numpy as np
        p = sys.argv[1]
        if sys.argv[2] == "write":
            np.arange(1, 100001, dtype=np.int64).tofile(p)
        for how in ("path", "count", "open-file"):
            try:
                if how == "open-file":
                    with open(p, "rb") as f:
                        got = np.fromfile(f, dtype=np.int64)
                else:
                    got = np.fromfile(p, dtype=np.int64, count=100000 if how == "count" else -1)
                print(how, len(got), int(got[-1]))
            except OSError as e:
                print(how, "refused", e)
        with open(p, "rb", buffering=0) as f:  # the Python layer: the same rule
            print("head", int.from_bytes(f.read(8), "little"))
            try:
                f.read()
            except OSError as e:
                print("read", e.errno)
            try:
                f.seek(0)
            except OSError as e:
                print("seek", e.errno)
        """,
        "np_tamper.py",
    )
    p = fs.enc / "a.bin"
    r = fs.run(app, str(p), "write")
    assert r.stdout.splitlines()[:3] == ["path 100000 100000", "count 100000 100000", "open-file 100000 100000"], (
        r.stderr
    )
    data = bytearray(p.read_bytes())
    for slot in (0, 1):
        data[record_offset(4096, 10, slot) + 100] ^= 0x01
    p.write_bytes(bytes(data))
    r = fs.run(app, str(p), "read")
    assert r.stdout.splitlines() == [
        "path refused seeking file failed",
        "count refused seeking file failed",
        "open-file refused seeking file failed",
        "head 1",
        "read 5",
        "seek 5",
    ], (r.stdout, r.stderr)


@pytest.mark.parametrize("where", ["unprotected", "encrypted"])
def test_dup_and_the_old_stat_names_from_c_go_through_the_layer(fs: FS, where: str) -> None:
    # What libxml2 does, without lxml: a C dup shares the open file (its offset), outlives the
    # close of the original, and is refused for a number that names nothing, as dup(2) is;
    # __xstat64/__fxstat64 (the pre-2.33 stat of manylinux2014 wheels) answer the enclave's view.
    d = fs.enc if where == "encrypted" else fs.root
    app = write_app(
        fs.root,
        f"""
        import ctypes, errno, os, stat
        libc = ctypes.CDLL(None, use_errno=True)
        libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        libc.read.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        libc.read.restype = ctypes.c_ssize_t
        buf = ctypes.create_string_buffer(64)
        path = os.path.join({str(d)!r}, "f.txt")
        with open(path, "w") as f:
            f.write("0123456789abcdef")
        fd = libc.open(path.encode(), os.O_RDONLY, 0)
        print("read", libc.read(fd, buf, 4), buf.raw[:4])
        fd2 = libc.dup(fd)
        print("dup", fd2 not in (-1, fd), libc.read(fd2, buf, 4), buf.raw[:4])
        print("close original", libc.close(fd), libc.read(fd2, buf, 64), buf.raw[:8], libc.close(fd2))
        print("dup of nothing", libc.dup(fd), errno.errorcode[ctypes.get_errno()])
        st = (ctypes.c_char * 144)()  # struct stat on x86-64
        size = lambda: int.from_bytes(bytes(st)[48:56], "little")  # st_size
        mode = lambda: int.from_bytes(bytes(st)[24:28], "little")  # st_mode
        print("xstat", libc.__xstat64(1, path.encode(), st), size(), stat.S_ISREG(mode()))
        fd = libc.open(path.encode(), os.O_RDONLY, 0)
        print("fxstat", libc.__fxstat64(1, fd, st), size(), libc.close(fd))
        print("lxstat missing", libc.__lxstat64(1, path.encode() + b".none", st), errno.errorcode[ctypes.get_errno()])
        """,
        "cdup.py",
    )
    r = fs.run(app)
    assert r.stdout.splitlines() == [
        "read 4 b'0123'",
        "dup True 4 b'4567'",
        "close original 0 8 b'89abcdef' 0",
        "dup of nothing -1 EBADF",
        "xstat 0 16 True",
        "fxstat 0 16 0",
        "lxstat missing -1 ENOENT",
    ], (r.stdout, r.stderr)

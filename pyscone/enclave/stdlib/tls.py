"""``ssl`` for apps: contexts that load their files through the enclave, sockets over enclave sockets.

OpenSSL opens CA bundles, certificate chains and keys itself, with ``open(2)``, which the
barrier refuses (and which would bypass the file-system shield).  So :class:`EnclaveSSLContext`
reads every such file with the enclave's file layer (shielded regions included) and hands
the bytes to OpenSSL in memory:

* CA certificates (``load_verify_locations``, ``set_default_verify_paths``, and so
  ``create_default_context``/``load_default_certs``) go in as ``cadata``;
* a certificate chain and its private key (``load_cert_chain``) are parsed from memory BIOs
  and installed on the context's own ``SSL_CTX`` through the very libssl that ``_ssl`` uses
  (bound with ``ctypes`` before lockdown).  The key exists only in enclave memory: never in
  a file, never on the host.

:class:`EnclaveSSLSocket` is the stdlib ``SSLSocket`` (so its logic -- handshakes on connect
and accept, ``makefile``, ``sendall``, ``unwrap``, ragged EOFs -- is the stdlib's own) whose
TLS engine is an ``SSLObject`` on two ``MemoryBIO``\\ s, pumped over the enclave socket: the
host carries only ciphertext.  ``asyncio`` already runs TLS on ``SSLObject`` over its
transports and needs nothing more than the contexts.
"""

from __future__ import annotations

import _ssl
import ctypes
import errno
import os
import re
import ssl
from typing import Any

from pyscone.enclave.stdlib import files, interpose
from pyscone.enclave.stdlib.sockets import EnclaveSocket
from pyscone.enclave.stdlib.threads import Lock

_READ_SIZE = 65536
_HEADER = 5  # bytes of a TLS record header
# libssl, bound before lockdown (dlopen of the already loaded _ssl: no file is opened).
_lib: ctypes.CDLL | None = None
# Offset of ``SSL_CTX *ctx`` in CPython's PySSLContext: the first field after the object
# header.  Checked at install against SSL_CTX_get_options; if it does not hold, load_cert_chain
# is refused (ENOSYS) rather than guessed.
_CTX_OFFSET = object.__basicsize__
_ctx_ok = False
# The password of the key being loaded, for the one C callback made before lockdown
# (libffi may need to map a closure, which the barrier could refuse later).
_password: bytes | None = None
_password_cb: Any = None
#: CA bundles read so far, by path, with the (size, mtime) they had.
_bundles: dict[str, tuple[tuple[int, int], str]] = {}

_SSL_CTRL_CHAIN = 88
_SSL_CTRL_CHAIN_CERT = 89
_HASHED = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"


def _read(path: Any) -> bytes:
    """The bytes of ``path``, read by the enclave (the FS shield serves protected regions)."""
    return files.read_whole(os.fspath(path))


def _unsupported(what: str) -> OSError:
    return OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")


def _ssl_error(what: str) -> ssl.SSLError:
    return ssl.SSLError(errno.EINVAL, f"{what} (pyscone enclave)")


def _pem_certs(data: bytes) -> str:
    """A bundle as ``cadata`` text, if it holds PEM certificates ("" if not): OpenSSL's PEM
    reader skips the comments and other blocks between them, as it does reading the file."""
    if _BEGIN_CERT not in data:
        return ""
    return data.decode("latin-1")


_Base: Any = _ssl._SSLContext


class EnclaveSSLContext(ssl.SSLContext):
    """What ``ssl.SSLContext`` becomes: its file-loading methods read the files in the enclave
    and give OpenSSL the bytes.  (Installed *on* ``ssl.SSLContext``, not as a subclass bound to
    the name: ssl.py's own properties call ``super(SSLContext, SSLContext)`` by that name.)
    """

    def load_verify_locations(self, cafile: Any = None, capath: Any = None, cadata: Any = None) -> None:
        if cafile is None and capath is None and cadata is None:
            raise TypeError("cafile, capath and cadata cannot be all omitted")
        if cafile is not None:
            data = _read(cafile)
            pem = _pem_certs(data)
            if pem:
                _Base.load_verify_locations(self, cadata=pem)
            elif data.strip():
                _Base.load_verify_locations(self, cadata=data)  # DER, as OpenSSL would try
            else:
                raise _ssl_error(f"no certificate found in {os.fspath(cafile)!r}")
        if capath is not None:
            self._load_capath(os.fspath(capath), strict=True)
        if cadata is not None:
            _Base.load_verify_locations(self, cadata=cadata)

    def _load_capath(self, capath: Any, strict: bool) -> int:
        """Load a hashed CA directory eagerly (OpenSSL would look certificates up lazily)."""
        d = os.fsdecode(capath)
        try:
            names = sorted(files.listdir(d))
        except OSError:
            if strict:
                raise
            return 0
        loaded = 0
        for name in names:
            if not _HASHED.match(name):
                continue
            pem = _cached_bundle(os.path.join(d, name))
            if pem:
                _Base.load_verify_locations(self, cadata=pem)
                loaded += 1
        return loaded

    def set_default_verify_paths(self) -> None:
        """The default CA bundle, read through the enclave: ``SSL_CERT_FILE`` (the enclave's
        environment) or OpenSSL's default file; its hashed directory only if there is no file."""
        paths = ssl.get_default_verify_paths()
        cafile = os.environ.get(paths.openssl_cafile_env) or paths.openssl_cafile
        capath = os.environ.get(paths.openssl_capath_env) or paths.openssl_capath
        pem = _cached_bundle(cafile) if cafile else ""
        if pem:
            _Base.load_verify_locations(self, cadata=pem)
        elif capath:
            self._load_capath(capath, strict=False)

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        global _password
        chain = _read(certfile)
        key = chain if keyfile is None else _read(keyfile)
        if callable(password):
            password = password()
        if password is not None and not isinstance(password, (str, bytes, bytearray)):
            raise TypeError("password should be a string or callable")
        if isinstance(password, str):
            password = password.encode("utf-8")
        if password is not None and len(password) > 1024:  # the stdlib's PEM_BUFSIZE bound
            raise ValueError("password cannot be longer than 1024 bytes")
        _password = None if password is None else bytes(password)
        try:
            _use_chain_and_key(self, chain, key)
        finally:
            _password = None

    def load_dh_params(self, path: Any) -> None:
        raise _unsupported("SSLContext.load_dh_params")

    @property  # type: ignore[override]
    def keylog_filename(self) -> None:
        return None

    @keylog_filename.setter
    def keylog_filename(self, value: Any) -> None:
        if value is not None:
            raise _unsupported("SSLContext.keylog_filename")

    def _wrap_socket(
        self, sock: Any, server_side: bool, server_hostname: Any = None, *, owner: Any = None, session: Any = None
    ) -> _Engine:
        return _Engine(self, sock, server_side, server_hostname, owner, session)


def _cached_bundle(path: str) -> str:
    """A CA bundle's PEM text, read through the enclave once per (size, mtime); "" if absent."""
    try:
        st = files.stat(path)
    except OSError:
        return ""
    key = (st.st_size, st.st_mtime_ns)
    hit = _bundles.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        pem = _pem_certs(_read(path))
    except OSError:
        return ""
    _bundles[path] = (key, pem)
    return pem


# -- certificate chains and keys, in memory ----------------------------------------------------


def _bind() -> None:
    """Bind the libssl of ``_ssl`` (and check where PySSLContext keeps its SSL_CTX)."""
    global _lib, _ctx_ok, _password_cb
    lib = ctypes.CDLL(_ssl.__file__)
    p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "BIO_new_mem_buf": (p, [c, i]),
        "BIO_free": (i, [p]),
        "PEM_read_bio_X509_AUX": (p, [p, p, p, p]),
        "PEM_read_bio_X509": (p, [p, p, p, p]),
        "PEM_read_bio_PrivateKey": (p, [p, p, p, p]),
        "X509_free": (None, [p]),
        "EVP_PKEY_free": (None, [p]),
        "SSL_CTX_use_certificate": (i, [p, p]),
        "SSL_CTX_use_PrivateKey": (i, [p, p]),
        "SSL_CTX_check_private_key": (i, [p]),
        "SSL_CTX_ctrl": (ctypes.c_long, [p, i, ctypes.c_long, p]),
        "SSL_CTX_get_options": (ctypes.c_uint64, [p]),
        "ERR_clear_error": (None, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_char), ctypes.c_int, ctypes.c_int, ctypes.c_void_p)

    def password_cb(buf: Any, size: int, _rwflag: int, _u: Any) -> int:
        if _password is None or len(_password) > size:
            return -1  # no password: fail, never prompt on a terminal
        ctypes.memmove(buf, _password, len(_password))
        return len(_password)

    _password_cb = cb_type(password_cb)
    _lib = lib
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    before = probe.options
    probe.options = before ^ ssl.OP_NO_TICKET
    _ctx_ok = _options(probe) == int(probe.options) and int(probe.options) != int(before)


def _options(ctx: ssl.SSLContext) -> int:
    assert _lib is not None
    return int(_lib.SSL_CTX_get_options(_ctx_ptr(ctx)))


def _ctx_ptr(ctx: ssl.SSLContext) -> int:
    return int(ctypes.c_void_p.from_address(id(ctx) + _CTX_OFFSET).value or 0)


def _use_chain_and_key(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """What SSL_CTX_use_certificate_chain_file + use_PrivateKey_file + check_private_key do,
    from memory."""
    lib = _lib
    if lib is None or not _ctx_ok or _options(ctx) != int(ctx.options):
        raise _unsupported("SSLContext.load_cert_chain (no in-memory route to this OpenSSL)")
    sctx = _ctx_ptr(ctx)
    lib.ERR_clear_error()
    bio = lib.BIO_new_mem_buf(chain, len(chain))
    if not bio:
        raise MemoryError
    try:
        leaf = lib.PEM_read_bio_X509_AUX(bio, None, None, None)
        if not leaf:
            raise _ssl_error("[SSL] PEM lib: no certificate in the certificate chain")
        ok = lib.SSL_CTX_use_certificate(sctx, leaf)
        lib.X509_free(leaf)  # the context holds its own reference
        if ok != 1:
            raise _ssl_error("[SSL] the certificate was refused")
        lib.SSL_CTX_ctrl(sctx, _SSL_CTRL_CHAIN, 0, None)  # clear the previous chain
        while cert := lib.PEM_read_bio_X509(bio, None, None, None):
            if lib.SSL_CTX_ctrl(sctx, _SSL_CTRL_CHAIN_CERT, 0, cert) != 1:  # add0: the context owns it
                lib.X509_free(cert)
                raise _ssl_error("[SSL] an intermediate certificate was refused")
    finally:
        lib.BIO_free(bio)
    lib.ERR_clear_error()  # the end of the chain is a "no start line" error, as in OpenSSL
    bio = lib.BIO_new_mem_buf(key, len(key))
    if not bio:
        raise MemoryError
    try:
        pkey = lib.PEM_read_bio_PrivateKey(bio, None, _password_cb, None)
    finally:
        lib.BIO_free(bio)
    if not pkey:
        lib.ERR_clear_error()
        raise _ssl_error("[SSL] PEM lib: no private key, or a wrong password")
    ok = lib.SSL_CTX_use_PrivateKey(sctx, pkey)
    lib.EVP_PKEY_free(pkey)
    if ok != 1 or lib.SSL_CTX_check_private_key(sctx) != 1:
        lib.ERR_clear_error()
        raise _ssl_error("[SSL: KEY_VALUES_MISMATCH] key values mismatch")


# -- the TLS engine of an SSLSocket ------------------------------------------------------------


class _Engine:
    """What ``SSLSocket`` expects of ``context._wrap_socket``: an ``_ssl._SSLSocket``.  Here an
    in-memory one, whose records travel over the (enclave) socket it belongs to."""

    def __init__(
        self, ctx: EnclaveSSLContext, sock: Any, server_side: bool, server_hostname: Any, owner: Any, session: Any
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = _ssl._SSLContext._wrap_bio(  # type: ignore[attr-defined]
            ctx, self._in, self._out, server_side, server_hostname, owner=owner, session=session
        )
        object.__setattr__(self, "_obj", obj)
        self._sock = sock
        self._unsent = b""
        # One lthread may read while another writes (a websocket, a chat): records must reach
        # the socket in the order the engine made them, and the bytes of two receives enter
        # the engine in the order they came (a host call switches lthreads mid-send).
        self._send_lock, self._recv_lock = Lock(), Lock()
        # Records are received one at a time, header then body, as OpenSSL reads a kernel fd
        # (read-ahead off): what the engine holds never includes a record the app could wait
        # for with select(), nor the plain bytes after a close_notify (unwrap).
        self._header = b""
        self._body_left = 0
        self._fills = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("context", "session"):
            setattr(self._obj, name, value)
        else:
            object.__setattr__(self, name, value)

    def _flush(self) -> None:
        with self._send_lock:
            self._send()

    def _send(self) -> None:
        data = self._unsent + self._out.read()
        self._unsent = b""
        view, sent = memoryview(data), 0
        try:
            while sent < len(view):
                sent += EnclaveSocket.send(self._sock, view[sent:])
        except BlockingIOError:
            self._unsent = bytes(view[sent:])
            raise ssl.SSLWantWriteError(ssl.SSL_ERROR_WANT_WRITE, "The operation did not complete (write)") from None

    def _fill(self) -> None:
        seen, t = self._fills, self._sock.gettimeout()
        if not (self._recv_lock.acquire(False) if t == 0.0 else self._recv_lock.acquire(True, -1 if t is None else t)):
            if t == 0.0:
                raise ssl.SSLWantReadError(ssl.SSL_ERROR_WANT_READ, "The operation did not complete (read)")
            raise TimeoutError("The read operation timed out")
        if self._fills != seen:
            # Another lthread received while this one waited: what it brought may be what
            # this operation lacks, so the caller tries again before receiving more.
            self._recv_lock.release()
            return
        try:
            want = self._body_left or _HEADER - len(self._header)
            data = EnclaveSocket.recv(self._sock, min(want, _READ_SIZE))
            self._fills += 1
            if data:
                self._in.write(data)
                self._account(data)
            elif not self._in.eof:
                self._in.write_eof()
        except BlockingIOError:
            raise ssl.SSLWantReadError(ssl.SSL_ERROR_WANT_READ, "The operation did not complete (read)") from None
        finally:
            self._recv_lock.release()

    def _account(self, data: bytes) -> None:
        if self._body_left:
            self._body_left -= len(data)
            return
        self._header += data
        if len(self._header) == _HEADER:
            # A record: type, version, length (RFC 8446 5.1).  OpenSSL judges the header; a
            # bad one fails the operation before its "body" is ever waited for.
            self._body_left = int.from_bytes(self._header[3:5], "big")
            self._header = b""

    def _run(self, fn: Any, *args: Any) -> Any:
        while True:
            if self._unsent:
                self._flush()
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            except ssl.SSLError:
                try:
                    self._flush()  # the alert that tells the peer why
                except OSError:
                    pass
                raise
            self._flush()
            return result

    def do_handshake(self) -> None:
        self._run(self._obj.do_handshake)

    def read(self, n: int, buffer: Any = None) -> Any:
        if buffer is None:
            return self._run(self._obj.read, n)
        return self._run(self._obj.read, n, buffer)

    def write(self, data: Any) -> int:
        return int(self._run(self._obj.write, data))

    def shutdown(self) -> Any:
        self._run(self._obj.shutdown)
        return self._sock


# SSLSocket.accept returns an SSLSocket, EnclaveSocket.accept an EnclaveSocket: this is both.
class EnclaveSSLSocket(ssl.SSLSocket, EnclaveSocket):  # type: ignore[misc]
    """The stdlib ``SSLSocket`` on an enclave socket, its TLS engine in enclave memory."""


def install() -> None:
    """Interpose ``ssl`` (before lockdown: binding libssl maps nothing new, but may allocate)."""
    _bind()
    methods = {name: EnclaveSSLContext.__dict__[name] for name in _CONTEXT_METHODS}
    interpose(ssl.SSLContext, sslsocket_class=EnclaveSSLSocket, **methods)


#: What ``ssl.SSLContext`` does differently in the enclave (everything else is in memory already).
_CONTEXT_METHODS = (
    "load_verify_locations",
    "_load_capath",
    "set_default_verify_paths",
    "load_cert_chain",
    "load_dh_params",
    "keylog_filename",
    "_wrap_socket",
)

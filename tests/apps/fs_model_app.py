"""Runs file operations sent as JSON lines over a socket (inside an enclave), or in-process
(natively): the shield is then compared with a plain file system, operation by operation."""

import errno
import json
import os
import socket
import sys


class Files:
    def __init__(self, root):
        self.root = root
        self.handles = {}

    def reset(self):
        for f in self.handles.values():
            try:
                f.close()
            except OSError:
                pass
        self.handles = {}
        for name in os.listdir(self.root):
            os.unlink(os.path.join(self.root, name))
        return None

    def run(self, op):
        try:
            return {"ok": self._run(op)}
        except OSError as e:
            return {"err": errno.errorcode.get(e.errno, str(e.errno))}
        except (ValueError, io_unsupported()) as e:
            return {"err": type(e).__name__}

    def _run(self, op):
        kind, h = op[0], op[1]
        f = self.handles.get(h)
        if kind == "reset":
            return self.reset()
        if kind == "open":
            if f is not None:
                f.close()
            _, _, name, mode, buffering = op
            self.handles[h] = open(os.path.join(self.root, name), mode, buffering=buffering)
            return None
        if kind == "stat":
            return os.stat(os.path.join(self.root, op[2])).st_size
        if kind == "unlink":
            return os.unlink(os.path.join(self.root, op[2]))
        if kind == "listdir":
            return sorted(os.listdir(self.root))
        if kind == "rename":
            return os.replace(os.path.join(self.root, op[2]), os.path.join(self.root, op[3]))
        if f is None:
            return "no handle"
        if kind == "read":
            return f.read(op[2]).hex()
        if kind == "write":
            return f.write(bytes.fromhex(op[2]))
        if kind == "seek":
            return f.seek(op[2], op[3])
        if kind == "tell":
            return f.tell()
        if kind == "truncate":
            return f.truncate(op[2])
        if kind == "flush":
            return f.flush()
        if kind == "fsync":
            f.flush()
            return os.fsync(f.fileno())
        if kind == "close":
            del self.handles[h]
            return f.close()
        raise AssertionError(op)


def io_unsupported():
    import io

    return io.UnsupportedOperation


def main():
    root, port = sys.argv[1], int(sys.argv[2])
    files = Files(root)
    with socket.create_connection(("127.0.0.1", port)) as s, s.makefile("rwb") as stream:
        for line in stream:
            ops = json.loads(line)
            results = [files.run(op) for op in ops]
            stream.write(json.dumps(results).encode() + b"\n")
            stream.flush()


if __name__ == "__main__":
    main()

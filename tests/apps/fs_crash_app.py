"""Crash-consistency workload: rewrite files version after version, in place and by atomic
rename, printing each version once it is committed.  ``check`` prints each file's version."""

import hashlib
import os
import sys

FILES = ("inplace0", "inplace1", "renamed")


def content(name, v):
    size = 3000 + (v * 7919) % 20000
    out, block = [], 0
    seed = f"{name}:{v}".encode()
    while sum(map(len, out)) < size:
        out.append(hashlib.sha256(seed + block.to_bytes(4, "little")).digest())
        block += 1
    return f"v={v:08d};".encode() + b"".join(out)[: size - 11]


def version(root, name):
    try:
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    v = int(data[2:10])
    if data != content(name, v):
        raise SystemExit(f"BAD {name}: content is not version {v}")
    return v


def write_in_place(path, name, v):
    new = content(name, v)
    with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
        # Three pieces in a scrambled order, then the length: a kill can land between any two.
        third = len(new) // 3
        for start, end in ((third, 2 * third), (2 * third, len(new)), (0, third)):
            f.seek(start)
            f.write(new[start:end])
        f.truncate(len(new))
        f.flush()
        os.fsync(f.fileno())


def write_renamed(path, name, v):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content(name, v))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    mode, root = sys.argv[1], sys.argv[2]
    versions = {name: version(root, name) for name in FILES}
    print(" ".join(f"{n}={v}" for n, v in versions.items()), flush=True)
    if mode == "check":
        return
    while True:
        for name in FILES:
            v = versions[name] + 1
            path = os.path.join(root, name)
            (write_renamed if name == "renamed" else write_in_place)(path, name, v)
            versions[name] = v
            print(f"committed {name} {v}", flush=True)


if __name__ == "__main__":
    main()

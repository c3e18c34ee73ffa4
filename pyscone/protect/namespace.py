"""What exists in the protected regions of an FSPF: its file tree, from the FSPF alone (sans-IO).

Inside an ``authenticated`` or ``encrypted`` region the host's directory tree decides
nothing: a path is a file if the FSPF lists it, and a directory if it is

* the prefix of a protected region (a region always exists, like a mount point),
* a directory the FSPF records (``FSPF.dirs``: made by the app, or kept when its last
  file went), or
* an ancestor, inside the region, of any of these, of a listed file, or of the prefix
  of another region (so the way down to a nested region exists).

Nothing else exists there: no host directory, symlink, fifo or "this is a directory"
answer.  :class:`Tree` indexes that once per FSPF change, so a lookup or a listing
costs a dictionary access, not a pass over every protected file.

:func:`anchors` names the paths that lead to a shielded region (its prefix and every
ancestor): the enclave never reports a host symlink there, so resolving a path
(``os.path.realpath``, ``Path.resolve``) stays lexical and cannot leave a region.
"""

from __future__ import annotations

import posixpath

from pyscone.protect.fspf import FSPF

DT_REG, DT_DIR = 1, 2  # as pyscone.abi's directory-entry types (this module stays I/O-free)
PROTECTED = ("authenticated", "encrypted")


class Tree:
    """The directories and files of an FSPF's protected regions."""

    __slots__ = ("children", "files")

    def __init__(self, table: FSPF) -> None:
        self.files = table.files
        #: every directory -> its entries (name -> DT_REG or DT_DIR)
        self.children: dict[str, dict[str, int]] = {}
        protected = [r for r in table.regions if r.kind in PROTECTED]
        for r in protected:
            self.children.setdefault(r.prefix, {})

        def protected_prefix(path: str) -> str | None:
            r = table.region_for(path)
            return r.prefix if r.kind in PROTECTED else None

        linked: set[str] = set()

        def link_up(path: str, dtype: int) -> None:
            # Enter ``path`` in its parent, and the parent in its own, up to the region's prefix.
            while path != "/":
                parent = posixpath.dirname(path)
                top = protected_prefix(parent)
                if top is None:
                    return  # the parent is not in a protected region: the host's business
                self.children.setdefault(parent, {})[posixpath.basename(path)] = dtype
                if parent == top or parent in linked:
                    return  # a region's top is linked by its own entry; the rest once
                linked.add(parent)
                path, dtype = parent, DT_DIR

        for d in sorted(table.dirs):
            self.children.setdefault(d, {})
            link_up(d, DT_DIR)
        for r in table.regions:
            if r.prefix != "/":
                link_up(r.prefix, DT_DIR)
        for f in table.files:
            link_up(f, DT_REG)

    def is_dir(self, path: str) -> bool:
        return path in self.children

    def is_file(self, path: str) -> bool:
        return path in self.files

    def exists(self, path: str) -> bool:
        return path in self.children or path in self.files

    def listing(self, path: str) -> dict[str, int] | None:
        """The entries of directory ``path``, or ``None`` if it is not one."""
        return self.children.get(path)

    def empty(self, path: str) -> bool:
        return not self.children.get(path)

    # Kept in step with the FSPF by the shield, so a new file costs no rebuild.

    def add(self, path: str, dtype: int) -> None:
        """A new file or directory, in a directory that exists."""
        self.children[posixpath.dirname(path)][posixpath.basename(path)] = dtype
        if dtype == DT_DIR:
            self.children.setdefault(path, {})

    def remove(self, path: str) -> None:
        """A file, or an empty directory, is gone."""
        self.children[posixpath.dirname(path)].pop(posixpath.basename(path), None)
        self.children.pop(path, None)


def anchors(table: FSPF) -> frozenset[str]:
    """The prefixes of shielded (not ``unprotected``) regions and all their ancestors."""
    out: set[str] = set()
    for r in table.regions:
        if r.kind == "unprotected":
            continue
        p = r.prefix
        while p not in out:
            out.add(p)
            if p == "/":
                break
            p = posixpath.dirname(p)
    return frozenset(out)

"""The process family: what the enclaves of one family share, and the fork hooks.

A family is the enclave ``pyscone run`` started and every enclave it forks or
spawns, and theirs.  Its members trust each other (the same measured runtime, the
same configuration) and nobody else: what they send each other through the host
(pipes, socketpairs, ``multiprocessing`` connections) is sealed with the family
key, which never leaves enclave memory.  A forked child inherits it with the rest
of its parent's memory; a spawned child receives it from its parent over an
attested channel (never from the host).

``member`` names this process among the family's writers (a sealed record carries
it, so two members never use one nonce); a forked child draws a new one before
anything else runs.  Modules that keep per-process state register hooks here
rather than being imported by the fork code:

- ``prepare``: in the parent, before the host is asked for the child's lane (state
  that must be shared across the fork moves to the host now, e.g. in-enclave pipes);
- ``parent``: in the parent after the fork, with the child's pid (or -1 if it failed);
- ``child``: in the child, once it runs on its own lane, before the app continues.
"""

from __future__ import annotations

import os
from collections.abc import Callable

KEY_SIZE = 32
MEMBER_SIZE = 8

#: The family key (set at boot: drawn by the family's first enclave, received by a spawned one).
key: bytes = b""
#: This process's writer id within the family: unique per member.
member: bytes = b""

_prepare: list[Callable[[], None]] = []
_parent: list[Callable[[int], None]] = []
_child: list[Callable[[], None]] = []


def start(family_key: bytes | None = None) -> None:
    """At boot: join the family with ``family_key`` (a spawned child), or found one."""
    global key, member
    if family_key is not None and len(family_key) != KEY_SIZE:
        raise ValueError("the family key must be 32 bytes")
    key = family_key if family_key is not None else os.urandom(KEY_SIZE)
    member = os.urandom(MEMBER_SIZE)


def register(
    *,
    prepare: Callable[[], None] | None = None,
    parent: Callable[[int], None] | None = None,
    child: Callable[[], None] | None = None,
) -> None:
    """Run these around every fork (in registration order; ``child`` hooks too)."""
    if prepare is not None:
        _prepare.append(prepare)
    if parent is not None:
        _parent.append(parent)
    if child is not None:
        _child.append(child)


def run_prepare() -> None:
    for hook in _prepare:
        hook()


def run_parent(pid: int) -> None:
    for hook in _parent:
        hook(pid)


def run_child() -> None:
    global member
    member = os.urandom(MEMBER_SIZE)
    for hook in _child:
        hook()

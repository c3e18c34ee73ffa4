"""The secure standard library interface: the stdlib, interposed (DESIGN.md section 5)."""

from __future__ import annotations


def interpose(module: object, **replacements: object) -> None:
    """Replace attributes of a standard-library module.

    The one place where pyscone writes into the standard library, so what is
    interposed can be read off the ``install`` functions that call it.
    """
    for name, value in replacements.items():
        setattr(module, name, value)

"""Build of pyscone's one C component: the libc layer's shim (pyscone/enclave/clib/shim*.c).

Everything else is in pyproject.toml.  The shim is a plain shared library, not a Python
extension: the enclave launcher preloads it (LD_PRELOAD) and the runtime talks to it through
ctypes, so it is named ``libpyscone-shim.so`` (the importer never takes it for a module) and
links against nothing but libc.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SHIM = "pyscone.enclave.clib.libpyscone-shim"
_SHIM_BASE = SHIM.rpartition(".")[2]


class BuildShim(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # Called with the dotted name and with its last part: no ABI tag either way (the shim
        # is loaded by path, never imported).
        if fullname in (SHIM, _SHIM_BASE):
            return os.path.join(*fullname.split(".")) + ".so"
        return str(super().get_ext_filename(fullname))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return [] if ext.name == SHIM else list(super().get_export_symbols(ext))


setup(
    ext_modules=[
        Extension(
            SHIM,
            sources=[
                "pyscone/enclave/clib/shim.c",
                "pyscone/enclave/clib/shim_stdio.c",
                "pyscone/enclave/clib/shim_net.c",
            ],
            depends=["pyscone/enclave/clib/shim.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=default"],
            libraries=["dl"],
        )
    ],
    cmdclass={"build_ext": BuildShim},
)

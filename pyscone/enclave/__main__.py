"""Entry point of the enclave process (started by ``pyscone run``, never by hand)."""

from pyscone.enclave.boot import main

main()

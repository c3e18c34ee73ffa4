"""Sans-IO protection formats shared by the enclave and the tools: sealed file chunks and the FSPF.

Nothing in this package touches a file, a socket or a clock.
"""

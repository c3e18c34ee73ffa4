"""Secure container images (host side, untrusted): reproducible OCI layouts and archives."""

# certifi's public roots must load, and must refuse a server whose certificate no public CA signed.
import ssl
import sys

import certifi
import urllib3

ctx = ssl.create_default_context(cafile=certifi.where())
roots = ctx.cert_store_stats()["x509_ca"]
http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), retries=False)
try:
    http.request("GET", sys.argv[1] + "/hello", timeout=10)
except urllib3.exceptions.SSLError as e:
    verdict = "rejected" if "CERTIFICATE_VERIFY_FAILED" in str(e) else f"other: {e}"
else:
    verdict = "accepted"
print(f"roots>100={roots > 100} private server {verdict}")

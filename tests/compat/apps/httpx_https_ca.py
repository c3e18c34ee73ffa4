import ssl
import sys

import httpx

url, cafile = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with httpx.Client(verify=ctx, timeout=10) as client:
    r = client.get(url + "/hello")
    r.raise_for_status()
    print(r.status_code, r.text)

import sys

import httpx

with httpx.Client(timeout=10) as client:
    r = client.get(sys.argv[1] + "/hello")
    r.raise_for_status()
    print(r.status_code, r.text)

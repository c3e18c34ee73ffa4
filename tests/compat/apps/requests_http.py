import sys

import requests

with requests.Session() as session:
    r = session.get(sys.argv[1] + "/hello", timeout=10)
    r.raise_for_status()
    print(r.status_code, r.text)

import sys

import requests

url, cafile = sys.argv[1], sys.argv[2]
r = requests.get(url + "/hello", verify=cafile, timeout=10)
r.raise_for_status()
print(r.status_code, r.text)

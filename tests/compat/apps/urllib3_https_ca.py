import sys

import urllib3

url, cafile = sys.argv[1], sys.argv[2]
http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=cafile)
r = http.request("GET", url + "/hello", timeout=10)
print(r.status, r.data.decode())

import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1] + "/hello", timeout=10) as r:
    print(r.status, r.read().decode())

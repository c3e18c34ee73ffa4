import dbm
import shelve

with shelve.open("store") as db:
    db["config"] = {"retries": 3, "hosts": ["a", "b"]}
    db["count"] = 41
with shelve.open("store") as db:
    db["count"] += 1
    print("shelve", db["count"], db["config"]["hosts"])
with dbm.open("plain", "c") as d:
    d[b"k"] = b"v"
print("dbm", dbm.whichdb("plain"))

import datetime

import orjson

data = {"n": 1, "f": 2.5, "s": "héllo", "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "l": list(range(3))}
raw = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
back = orjson.loads(raw)
print(raw.decode(), back["l"] == [0, 1, 2])

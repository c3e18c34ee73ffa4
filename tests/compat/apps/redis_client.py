import sys

import redis

r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), decode_responses=True)
r.set("compat:greeting", "hello from redis")
r.rpush("compat:list", *range(5))
with r.pipeline() as pipe:
    pipe.incr("compat:counter").incr("compat:counter")
    pipe.execute()
print(r.get("compat:greeting"), r.llen("compat:list"), r.get("compat:counter"))

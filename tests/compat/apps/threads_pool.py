import concurrent.futures
import hashlib
import queue
import threading

q = queue.Queue()
lock = threading.Lock()
total = 0


def work(n):
    global total
    digest = hashlib.sha256(str(n).encode()).hexdigest()
    with lock:
        total += n
    q.put(digest)
    return len(digest)


with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    lengths = list(pool.map(work, range(100)))
print("threads", total, q.qsize(), set(lengths))

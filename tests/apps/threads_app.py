import concurrent.futures
import queue
import threading
import time

q = queue.Queue()
results = []
lock = threading.Lock()
cond = threading.Condition()
ev = threading.Event()


def worker(i):
    time.sleep(0.01 * (5 - i))
    with lock:
        results.append(i)
    q.put(i)


ts = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
t0 = time.monotonic()
for t in ts:
    t.start()
for t in ts:
    t.join()
print("order", results, "elapsed<0.1", time.monotonic() - t0 < 0.1)
print(sorted(q.get() for _ in range(5)))


def waiter():
    with cond:
        cond.wait_for(lambda: ev.is_set(), timeout=2)
        print("cond woke", ev.is_set())


w = threading.Thread(target=waiter)
w.start()
time.sleep(0.05)
ev.set()
with cond:
    cond.notify_all()
w.join()
print("event timeout:", threading.Event().wait(0.05))
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    print(list(ex.map(lambda x: x * x, range(6))))
tl = threading.local()
tl.x = 1


def f():
    tl.x = 2
    print("local in thread", tl.x)


t = threading.Thread(target=f)
t.start()
t.join()
print("local in main", tl.x)
print(threading.current_thread().name, threading.main_thread() is threading.current_thread())
timer = threading.Timer(0.02, lambda: print("timer fired"))
timer.start()
timer.join()
d = threading.Thread(target=lambda: time.sleep(100), daemon=True)
d.start()
print("done")

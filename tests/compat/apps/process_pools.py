import concurrent.futures
import multiprocessing
import sys


def square(x):
    return x * x


if __name__ == "__main__":
    method = sys.argv[1]
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        total = sum(pool.map(square, range(100)))
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        again = sum(ex.map(square, range(100), chunksize=10))
    queue = ctx.Queue()
    p = ctx.Process(target=queue.put, args=("from a child",))
    p.start()
    got = queue.get(timeout=30)
    p.join()
    print(method, total, again, got, p.exitcode)

import sys

from aiohttp import web


async def handle(request):
    return web.Response(text="hello from aiohttp")


app = web.Application()
app.add_routes([web.get("/", handle)])

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)

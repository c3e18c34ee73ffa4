import asyncio
import sys

import uvicorn


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    loop = type(asyncio.get_running_loop())
    body = f"hello from uvicorn on {loop.__module__}.{loop.__name__}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    # loop="auto" (uvicorn's default): uvloop if it imports, else asyncio.
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="auto", log_level="warning")

import asyncio
import sys

from fastapi import FastAPI
from hypercorn.asyncio import serve
from hypercorn.config import Config

app = FastAPI()


@app.get("/")
async def read_root():
    return {"hello": "from fastapi on hypercorn"}


if __name__ == "__main__":
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    asyncio.run(serve(app, config))

import asyncio
import sys

import aiohttp


async def main():
    async with aiohttp.ClientSession() as session:
        async with session.get(sys.argv[1] + "/hello") as response:
            print(response.status, await response.text())


asyncio.run(main())

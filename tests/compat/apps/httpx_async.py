import asyncio
import sys

import httpx


async def main():
    async with httpx.AsyncClient(timeout=10) as client:
        responses = await asyncio.gather(*(client.get(sys.argv[1] + f"/hello?i={i}") for i in range(5)))
    for r in responses:
        r.raise_for_status()
    print(len(responses), responses[0].text)


asyncio.run(main())

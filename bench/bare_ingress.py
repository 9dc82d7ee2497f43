"""The ingress baseline: a bare aiohttp handler that parses the JSON body and does one XADD.

python -m bench.bare_ingress REDIS_URL PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web
from redis.asyncio import Redis


def main(url: str, port: int) -> None:
    redis = Redis.from_url(url)

    async def handle(request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        entry_id = await redis.xadd("bench:bare", {"body": json.dumps(payload)})
        return web.json_response({"execution_id": entry_id.decode()}, status=202)

    app = web.Application()
    app.router.add_post("/hooks/{path:.+}", handle)
    print("flowchat: bare ingress ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

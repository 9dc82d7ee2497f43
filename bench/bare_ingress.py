"""The ingress baselines: bare aiohttp handlers that parse, authenticate and do one XADD.

python -m bench.bare_ingress REDIS_URL PORT TWILIO_TOKEN

- ``POST /hooks/{path}``: parse the JSON body, one XADD, 202 with the entry id.
- ``POST /twilio/message``: parse the form as ours does, check ``X-Twilio-Signature``
  with twilio's RequestValidator, one XADD, the empty TwiML answer.

It runs on the event loop ``flowchat serve`` runs on (uvloop where installed), so the ratio
compares the handlers, not the loops.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import parse_qsl

from aiohttp import web
from redis.asyncio import Redis
from twilio.request_validator import RequestValidator

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def main(url: str, port: int, token: str) -> None:
    redis = Redis.from_url(url)
    validator = RequestValidator(token)

    async def hook(request: web.Request) -> web.Response:
        payload = json.loads(await request.read())
        entry_id = await redis.xadd("bench:bare", {"body": json.dumps(payload)})
        return web.json_response({"execution_id": entry_id.decode()}, status=202)

    async def twilio(request: web.Request) -> web.Response:
        params = dict(parse_qsl((await request.read()).decode("utf-8", "replace"), keep_blank_values=True))
        if not validator.validate(str(request.url), params, request.headers.get("X-Twilio-Signature", "")):
            return web.Response(status=403, text="bad signature")
        await redis.xadd("bench:bare", {"body": json.dumps(params)})
        return web.Response(text=TWIML_EMPTY, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/hooks/{path:.+}", hook)
    app.router.add_post("/twilio/message", twilio)
    print("flowchat: bare ingress ready", flush=True)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])

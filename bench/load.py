"""Load generator, in its own process: POST signed requests and report rate and latency.

    python -m bench.load URL SECRET COUNT CONCURRENCY [--rate R] [--twilio] [--first N] [--warmup W]

Without ``--rate`` it sends as fast as CONCURRENCY connections allow (closed loop); with
it, requests are paced at R per second (open loop). By default each request is a JSON
webhook signed with ``X-FlowChat-Signature``; with ``--twilio`` it is an inbound WhatsApp
message as Twilio posts it (form body, ``X-Twilio-Signature`` made with twilio's
RequestValidator under the auth token SECRET), each from a distinct sender
(``--first`` numbers them, so runs can use fresh senders). Bodies and signatures are
made before the clock starts; ``--warmup`` sends W requests first, unmeasured. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
import uuid
from urllib.parse import urlencode

import aiohttp
from twilio.request_validator import RequestValidator

TWILIO_TO = "whatsapp:+14155238886"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def sender(n: int) -> str:
    """A distinct, valid US number per n (area code 201, exchanges 200-999)."""
    return f"+1201{200 + n // 10_000:03d}{n % 10_000:04d}"


def webhook_request(secret: str, n: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"phone": "+14155550123", "name": "Ada", "n": n}).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-FlowChat-Signature": signature}


def twilio_request(validator: RequestValidator, url: str, n: int) -> tuple[bytes, dict[str, str]]:
    phone = sender(n)
    params = {
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "AccountSid": "AC" + "0" * 32,
        "From": f"whatsapp:{phone}",
        "To": TWILIO_TO,
        "Body": "Hi, I'd like to know more",
        "ProfileName": f"Customer {n}",
        "WaId": phone[1:],
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsStatus": "received",
        "ApiVersion": "2010-04-01",
    }
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": validator.compute_signature(url, params),
    }
    return urlencode(params).encode(), headers


async def main(args: argparse.Namespace) -> None:
    latencies: list[float] = []
    ids: list[str] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    total = args.warmup + args.count
    if args.twilio:
        validator = RequestValidator(args.secret)
        requests = [twilio_request(validator, args.url, args.first + n) for n in range(total)]
    else:
        requests = [webhook_request(args.secret, n) for n in range(total)]
    connector = aiohttp.TCPConnector(limit=args.concurrency)

    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(n: int) -> None:
            body, headers = requests[n]
            started = time.perf_counter()
            async with http.post(args.url, data=body, headers=headers) as response:
                reply = await response.read()
            latencies.append(time.perf_counter() - started)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 202:
                ids.append(json.loads(reply)["execution_id"])

        async def closed_loop() -> None:
            while True:
                n = await queue.get()
                if n < 0:
                    return
                await one(n)

        if args.warmup:
            await asyncio.gather(*(one(args.count + n) for n in range(args.warmup)))
            latencies.clear()
            ids.clear()
            statuses.clear()
        started = time.perf_counter()
        if args.rate is None:
            for n in range(args.count):
                queue.put_nowait(n)
            for _ in range(args.concurrency):
                queue.put_nowait(-1)
            await asyncio.gather(*(closed_loop() for _ in range(args.concurrency)))
        else:
            tasks = []
            for n in range(args.count):
                delay = started + n / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started

    print(
        json.dumps(
            {
                "requests": args.count,
                "seconds": elapsed,
                "rate": args.count / elapsed,
                "p50_ms": percentile(latencies, 0.50) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "statuses": statuses,
                "ids": ids,
            }
        ),
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("secret")
    parser.add_argument("count", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--rate", type=float, help="requests per second (open loop)")
    parser.add_argument("--twilio", action="store_true", help="Twilio inbound messages instead of JSON webhooks")
    parser.add_argument("--first", type=int, default=0, help="number of the first sender (--twilio)")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent first and not measured")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

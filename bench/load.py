"""Load generator, in its own process: POST signed requests and report rate and latency.

    python -m bench.load URL SECRET COUNT CONCURRENCY [--rate R] [--twilio] [--first N] [--warmup W]

Without ``--rate`` it sends as fast as CONCURRENCY connections allow (closed loop); with
it, requests are paced at R per second (open loop). By default each request is a JSON
webhook signed with ``X-FlowChat-Signature``; with ``--twilio`` it is an inbound WhatsApp
message as Twilio posts it (form body, ``X-Twilio-Signature`` made with twilio's
RequestValidator under the auth token SECRET), each from a distinct sender
(``--first`` numbers them, so runs can use fresh senders). Requests, bytes on the wire
included, are made before the clock starts; ``--warmup`` sends W requests first, unmeasured.
Prints JSON.

The client is a minimal HTTP/1.1 one over CONCURRENCY keep-alive connections (prepared
bytes out, status line, ``Content-Length`` and body in): on a 2-core machine the client
shares the CPU with the server it measures, and aiohttp's client cost about as much CPU
per request as the bare server handlers themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

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


def wire(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A POST as it goes on the wire (HTTP/1.1, keep-alive)."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection: a prepared request out, (status, body) back; reopened when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None or self.reader.at_eof() or self.writer.is_closing():
            await self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.reader, self.writer
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length, close = parse_head(head)
        body = await reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, whether the server closes the connection) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
        elif name == "transfer-encoding":
            raise ValueError(f"the server answered with Transfer-Encoding: {value.strip()} (not supported here)")
    return status, length, close


def prepare(args: argparse.Namespace) -> list[bytes]:
    """Every request (warm-up ones last), as bytes on the wire."""
    total = args.warmup + args.count
    if args.twilio:
        validator = RequestValidator(args.secret)
        made = [twilio_request(validator, args.url, args.first + n) for n in range(total)]
    else:
        made = [webhook_request(args.secret, n) for n in range(total)]
    return [wire(args.url, body, headers) for body, headers in made]


async def main(args: argparse.Namespace) -> None:
    latencies: list[float] = []
    ids: list[str] = []
    statuses: dict[int, int] = {}
    requests = prepare(args)
    parts = urlsplit(args.url)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(args.concurrency):
        idle.put_nowait(Connection(parts.hostname or "127.0.0.1", parts.port or 80))

    async def one(n: int) -> None:
        started = time.perf_counter()
        connection = await idle.get()  # waiting for a free connection counts, as in a client's pool
        try:
            status, reply = await connection.exchange(requests[n])
        finally:
            idle.put_nowait(connection)
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            ids.append(json.loads(reply)["execution_id"])

    if args.warmup:
        await asyncio.gather(*(one(args.count + n) for n in range(args.warmup)))
        latencies.clear()
        ids.clear()
        statuses.clear()
    started = time.perf_counter()
    if args.rate is None:
        await closed_loop(one, args.count, args.concurrency)
    else:
        await open_loop(one, args.count, args.rate, started)
    elapsed = time.perf_counter() - started
    while not idle.empty():
        await idle.get_nowait().close()
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


async def closed_loop(one: Callable[[int], Awaitable[None]], count: int, concurrency: int) -> None:
    """``concurrency`` senders, each sending its next request when the last one was answered."""
    numbers = iter(range(count))

    async def sender() -> None:
        for n in numbers:
            await one(n)

    await asyncio.gather(*(sender() for _ in range(concurrency)))


async def open_loop(one: Callable[[int], Awaitable[None]], count: int, rate: float, started: float) -> None:
    """Request n sent at ``started + n / rate``, answered or not."""
    tasks = []
    for n in range(count):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)


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

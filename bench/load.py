"""Load generator, in its own process: POST signed webhooks and report rate and latency.

    python -m bench.load URL SECRET COUNT CONCURRENCY [RATE]

Without RATE it sends as fast as CONCURRENCY connections allow (closed loop); with
RATE it paces requests at that many per second (open loop). Prints JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time

import aiohttp


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def main(url: str, secret: str, count: int, concurrency: int, rate: float | None) -> None:
    latencies: list[float] = []
    ids: list[str] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(n: int) -> None:
            body = json.dumps({"phone": "+14155550123", "name": "Ada", "n": n}).encode()
            signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers = {"Content-Type": "application/json", "X-FlowChat-Signature": signature}
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as response:
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

        started = time.perf_counter()
        if rate is None:
            for n in range(count):
                queue.put_nowait(n)
            for _ in range(concurrency):
                queue.put_nowait(-1)
            await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
        else:
            tasks = []
            for n in range(count):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started

    print(
        json.dumps(
            {
                "requests": count,
                "seconds": elapsed,
                "rate": count / elapsed,
                "p50_ms": percentile(latencies, 0.50) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "statuses": statuses,
                "ids": ids,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else None
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), rate))

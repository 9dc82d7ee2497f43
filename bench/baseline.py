"""The baseline: a bare Redis Streams loop, producer and consumer in two processes.

python -m bench.baseline produce URL N      XADD pipelined in batches of 500
python -m bench.baseline consume URL N      XREADGROUP COUNT 100, one XACK per batch
"""

from __future__ import annotations

import json
import sys
import time

import redis

STREAM, GROUP = "bench:baseline", "g"


def produce(url: str, count: int) -> None:
    client = redis.Redis.from_url(url)
    sent = 0
    while sent < count:
        pipe = client.pipeline(transaction=False)
        for n in range(sent, min(count, sent + 500)):
            pipe.xadd(STREAM, {"e": n})
        pipe.execute()
        sent = min(count, sent + 500)


def consume(url: str, count: int) -> None:
    client = redis.Redis.from_url(url)
    seen, started = 0, None
    while seen < count:
        reply = client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=100, block=1000)
        if not reply:
            continue
        started = started or time.time()
        ids = [message_id for _, entries in reply for message_id, _ in entries]
        client.xack(STREAM, GROUP, *ids)
        seen += len(ids)
    print(json.dumps({"consumed": seen, "first_read": started, "last_ack": time.time()}), flush=True)


if __name__ == "__main__":
    role, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    produce(url, n) if role == "produce" else consume(url, n)

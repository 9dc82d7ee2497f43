"""What the bench reads back from the queue's Redis: execution ids and their summaries, of either stored form."""

from __future__ import annotations

from typing import Any

import redis as sync_redis

from flowchat.codec import SUMMARY_FIELDS, decode_summary
from flowchat.keys import Keys
from flowchat.queue import FINISHED, LIVE


def indexed_ids(client: sync_redis.Redis | sync_redis.RedisCluster, keys: Keys) -> list[str]:
    """Every execution id in the queue's per-flow, per-status indexes."""
    ids: list[str] = []
    for flow in client.smembers(keys.indexed_flows):  # type: ignore[union-attr]
        for status in (*LIVE, *FINISHED):
            ids += [i.decode() for i in client.zrange(keys.index(flow.decode(), status), 0, -1)]  # type: ignore[union-attr]
    return ids


def summaries(
    client: sync_redis.Redis | sync_redis.RedisCluster, keys: Keys, ids: list[str], batch: int = 5000
) -> list[dict[str, Any]]:
    """Each execution's meta (times, status, flow) as listings show it; expired ones left out."""
    metas: list[dict[str, Any]] = []
    for start in range(0, len(ids), batch):
        pipe = client.pipeline(transaction=False)
        chunk = ids[start : start + batch]
        for execution_id in chunk:
            pipe.hmget(keys.execution(execution_id), list(SUMMARY_FIELDS))
        for execution_id, raw in zip(chunk, pipe.execute(), strict=True):
            meta = decode_summary(execution_id, raw)
            if meta is not None:
                metas.append(meta)
    return metas

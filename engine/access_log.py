"""The access log: one line per HTTP request, rejected ones included.

Shape (text format): ``POST /hooks/{path} 202 3.1ms execution=019… from 10.0.0.7``. Bodies are
never logged; phone numbers in paths are masked by the log formatter like everywhere else.
With ``--log-format json`` the same facts are fields: ``method``, ``route``, ``status``,
``duration_ms``, ``execution_id``, ``remote``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

log = logging.getLogger("flowchat.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if log.isEnabledFor(logging.INFO):
            _line(request, status, (time.perf_counter() - started) * 1000, _execution_id(response))


def _line(request: web.Request, status: int, duration_ms: float, execution_id: str) -> None:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    extra = {
        "method": request.method,
        "route": route,
        "status": status,
        "duration_ms": round(duration_ms, 1),
        "execution_id": execution_id,
        "remote": request.remote or "",
    }
    suffix = f" execution={execution_id}" if execution_id else ""
    log.info(
        "%s %s %d %.1fms%s from %s", request.method, route, status, duration_ms, suffix, request.remote, extra=extra
    )


def _execution_id(response: web.StreamResponse | None) -> str:
    """The ``execution_id`` of a small JSON answer (what ingress returns on acceptance)."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or len(body) > 4096 or not body.startswith(b"{"):
        return ""
    try:
        value = orjson.loads(body).get("execution_id", "")
    except orjson.JSONDecodeError:
        return ""
    return value if isinstance(value, str) else ""

"""``http.request``: call an HTTP API through the runtime's shared session."""

from __future__ import annotations

import json
import time
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
from pydantic import Field, model_validator

from flowchat import Duration, Node, NodeConfig, NodeContext, NodeError, RetryableError, RetryPolicy, register


@register
class HttpRequest(Node):
    """Send an HTTP request; 5xx, 429 and connection errors are retried, other 4xx fail."""

    type = "http.request"
    retry = RetryPolicy(max_attempts=3, backoff=1.0, max_backoff=60.0)

    class Config(NodeConfig):
        method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = Field("GET", description="HTTP method.")
        url: str = Field(pattern=r"^https?://", description="Absolute http(s) URL.")
        headers: dict[str, str] = Field(default_factory=dict, description="Request headers.")
        json_: Any = Field(None, alias="json", description="JSON body.")
        body: str | None = Field(None, description="Raw text body.")
        timeout: Duration = Field(10.0, description="Timeout of one request.")
        max_response: int = Field(1024 * 1024, ge=1, description="Largest response body kept, in bytes.")

        @model_validator(mode="after")
        def _one_body(self) -> HttpRequest.Config:
            if self.json_ is not None and self.body is not None:
                raise ValueError("give json or body, not both")
            return self

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        session = ctx.services.http
        request: dict[str, Any] = {"headers": config.headers, "timeout": aiohttp.ClientTimeout(total=config.timeout)}
        if config.json_ is not None:
            request["json"] = config.json_
        elif config.body is not None:
            request["data"] = config.body.encode()
        try:
            async with session.request(config.method, config.url, **request) as response:
                body = await response.content.read(config.max_response + 1)
                if len(body) > config.max_response:
                    raise NodeError(
                        f"{config.method} {config.url}: response is over max_response ({config.max_response} bytes)",
                        code="http-response-too-large",
                    )
                return _result(response, body.decode(response.charset or "utf-8", errors="replace"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(
                f"{config.method} {config.url}: {type(exc).__name__}: {exc}", code="http-connection"
            ) from exc


def _result(response: aiohttp.ClientResponse, text: str) -> dict[str, Any]:
    status = response.status
    where = f"{response.method} {response.url}"
    if status >= 500 or status == 429:
        raise RetryableError(f"{where} answered {status}", code=f"http-{status}", retry_after=_retry_after(response))
    if status >= 400:
        raise NodeError(f"{where} answered {status}: {text[:200]}", code=f"http-{status}")
    # the multidict itself: the output boundary lower-cases names and keeps repeated headers
    result: dict[str, Any] = {"status": status, "headers": response.headers.copy(), "text": text}
    if "json" in response.headers.get("Content-Type", ""):
        try:
            result["json"] = json.loads(text)
        except ValueError:
            result["json"] = None
    return result


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())

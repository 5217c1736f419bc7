"""An HTTP receiver standing in for Slack, PagerDuty, webhooks and the API in tests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    base: str = ""
    requests: list[Received] = field(default_factory=list)
    # path -> statuses answered in turn (the last one repeats); default 200
    statuses: dict[str, list[int]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)  # paths that never answer
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                await request.read(),
            )
        )
        if request.path in self.hang:
            await self.released.wait()
        plan = self.statuses.get(request.path)
        status = (plan.pop(0) if len(plan) > 1 else plan[0]) if plan else 200
        if status == 429:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "0"})
        return web.Response(status=status, text="ok" if status < 300 else f"error {status}")

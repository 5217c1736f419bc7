"""The HTTP intake under load from many clients, for the chaos suite (issue 6, part 5).

`HttpIntakeLoad` runs `clients` asyncio tasks in the controller's process. Each POSTs
small batches (1..20 lines) of sequence-numbered chaos lines to the daemon's
`POST /logs/ingest`, in one of three body forms (a JSON array, NDJSON, text/plain
sniffed), with a bearer token, one TCP connection per request (so a refused
connection always means the request was not sent), while the suite kills and restarts
the daemon and PostgreSQL. A client's lines are `http_line(c, n, ...)`: meta
{seq, w = HTTP_W0 + c, n, c}, message "h<c> n<n> seq=<seq> ...", stored under the
configured service `HTTP_SERVICE`, so they cannot be taken for a file writer's.

What a client does with each answer (docs/guarantees.md, "HTTP intake"):

* 202 {"accepted": k}: acknowledged. Journaled; each of its lines must be stored
  exactly once.
* 503 or 429: nothing stored. Wait Retry-After, send the same batch again.
* connection refused (the daemon is down or starting) or a connect timeout: the
  request was not sent. Wait a little, send the same batch again.
* no answer after the request was sent (connection reset, server disconnected, read
  timeout): in doubt, since the daemon may have spooled it before dying. Not retried
  (requests carry no idempotency key, so a retry could store it twice); journaled
  as in doubt: each of its lines may be stored at most once.
* any other answer (400, 401, 413, 415, 500...): a failure of the run; the lines are
  treated as in doubt for counting.
* at the end no new batch starts; a batch being retried still is, for up to
  `STOP_GRACE_S` (the daemon may be restarting), then it is abandoned: never
  acknowledged, so none of its lines may be stored.

The journal (`<workdir>/http.journal`, one JSON object per batch) is for post-mortems;
`verify` works on the in-memory copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

HTTP_SERVICE = "chaos_http"
HTTP_SOURCE = "chaos_http"
HTTP_W0 = 1000  # client c writes as w = HTTP_W0 + c: seq numbers apart from the writers'
EVENT = "chaos.seq"
MAX_BATCH = 20
REFUSED_BACKOFF_S = (0.05, 0.25)
STOP_GRACE_S = 15.0
BODY_FORMS = ("json", "ndjson", "text")
CONTENT_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "text": "text/plain",  # what navigator.sendBeacon sends; the intake sniffs it
}


def http_seq(c: int, n: int) -> int:
    return (HTTP_W0 + c) * 10**12 + n


def http_message_prefix(c: int, n: int) -> str:
    return f"h{c} n{n} seq={http_seq(c, n)}"


def http_line(c: int, n: int, pad: str, level: str) -> bytes:
    """One record of client c (no newline): the intake's JSON fields, seq in meta and
    in the message."""
    return orjson.dumps(
        {
            "level": level,
            "event": EVENT,
            "message": f"{http_message_prefix(c, n)} {pad}",
            "meta": {"seq": http_seq(c, n), "w": HTTP_W0 + c, "n": n, "c": c},
        }
    )


def encode_body(records: list[bytes], form: str) -> bytes:
    if form == "json":
        return b"[" + b",".join(records) + b"]"
    return b"\n".join(records) + b"\n"  # ndjson, and text/plain (sniffed as NDJSON...)


@dataclass(slots=True)
class Batch:
    client: int
    first: int
    last: int
    outcome: str  # "ack", "doubt", "unexpected", "abandoned"
    t_start: float
    t_end: float
    attempts: int
    detail: str = ""


@dataclass
class HttpFigures:
    """Filled by the load and by `verify`; copied into the suite's Figures."""

    requests: int = 0  # every POST attempt that reached the point of connecting
    acknowledged_requests: int = 0
    acknowledged_lines: int = 0
    retries_503: int = 0
    retries_429: int = 0
    retries_refused: int = 0  # connection refused / connect timeout: not sent
    in_doubt_requests: int = 0
    in_doubt_lines: int = 0
    in_doubt_stored: int = 0  # in-doubt lines found stored (once)
    abandoned_lines: int = 0  # waiting for a retry when the run ended
    unexpected_answers: dict[str, int] | None = None
    rows: int = 0  # rows with the intake's service
    lost: int = 0  # acknowledged, not stored
    duplicated: int = 0  # rows beyond the first of an acknowledged or in-doubt line
    other_rows: int = 0  # intake rows that are no acknowledged or in-doubt line
    examples: list[str] | None = None


class HttpIntakeLoad:
    """`clients` concurrent clients POSTing chaos lines to the intake (issue 6, part 5)."""

    def __init__(
        self,
        clients: int,
        *,
        url: str = "",
        token: str = "",
        rate: float = 10.0,
        seed: int = 0,
        journal: Path | None = None,
        log: Callable[[str], None] = lambda _: None,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.clients = clients
        self.url = url
        self.token = token
        self.rate = rate  # requests per second per client (when every answer is 202)
        self.seed = seed
        self.journal_path = journal
        self.log = log
        self.request_timeout_s = request_timeout_s
        self.fig = HttpFigures(unexpected_answers={}, examples=[])
        self.batches: list[Batch] = []
        self.next_n = [0] * clients
        self._stop = asyncio.Event()
        self._give_up_at = float("inf")  # monotonic; set by stop()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: Any = None
        self._journal: Any = None

    # -- the load ------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.clients:
            return
        import aiohttp

        # force_close: one connection per request. A refused connect then always means
        # "not sent"; a kept-alive connection to a killed daemon would blur that.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=5.0, sock_read=self.request_timeout_s
            ),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
        )
        if self.journal_path is not None:
            self._journal = self.journal_path.open("ab", buffering=0)
        self._tasks = [
            asyncio.create_task(self._client(c), name=f"http-client-{c}")
            for c in range(self.clients)
        ]

    async def stop(self) -> None:
        """Let every request in flight get its answer, then stop (no new batches)."""
        if not self.clients:
            return
        self._give_up_at = time.monotonic() + STOP_GRACE_S
        self._stop.set()
        failed: BaseException | None = None
        if self._tasks:
            done, pending = await asyncio.wait(
                self._tasks, timeout=STOP_GRACE_S + self.request_timeout_s + 15
            )
            for task in pending:  # should not happen: a request hung past its timeout
                task.cancel()
                failed = failed or RuntimeError(f"{task.get_name()} did not stop")
            for task in done:
                failed = failed or task.exception()
            self._tasks = []
        await self.aclose()
        if failed is not None:
            raise failed

    async def aclose(self) -> None:
        """Release everything now (the clean-up after a failed run); idempotent."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    async def _client(self, c: int) -> None:
        rng = random.Random(self.seed * 104_729 + c)  # the batches: fixed by the seed
        jitter = random.Random()  # retry delays depend on timing anyway
        pads = ["", "y" * 10, "y" * 40, "y" * 120, "y" * 300]
        levels = ["info"] * 6 + ["warn", "warning", "error", "ERROR"]
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            k = rng.randint(1, MAX_BATCH)
            form = rng.choice(BODY_FORMS)
            records = [http_line(c, n + j, rng.choice(pads), rng.choice(levels)) for j in range(k)]
            body = encode_body(records, form)
            t0 = time.monotonic()
            outcome, attempts, detail = await self._send(body, CONTENT_TYPES[form], k, jitter)
            batch = Batch(c, n, n + k - 1, outcome, t0, time.monotonic(), attempts, detail)
            self._record(batch)
            n += k
            self.next_n[c] = n
            next_at += 1 / self.rate
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()  # fell behind (retries): do not burst to catch up
            elif delay > 0:
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _send(
        self, body: bytes, content_type: str, k: int, jitter: random.Random
    ) -> tuple[str, int, str]:
        """(outcome, attempts, detail) for one batch, retried while it is safe to."""
        import aiohttp

        attempts = 0
        while True:
            if attempts and time.monotonic() > self._give_up_at:
                return "abandoned", attempts, "the run ended while it waited for a retry"
            attempts += 1
            self.fig.requests += 1
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": content_type}
                ) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    try:
                        answer = await resp.read()
                    except (aiohttp.ClientError, TimeoutError):
                        answer = b""  # the status line arrived: the answer is known
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # Not connected, so not sent: the daemon is down or starting.
                self.fig.retries_refused += 1
                await asyncio.sleep(jitter.uniform(*REFUSED_BACKOFF_S))
                continue
            except (aiohttp.ClientError, TimeoutError) as e:
                # Sent, and no answer: the daemon may have spooled it. Never retried.
                return "doubt", attempts, type(e).__name__
            if status == 202:
                accepted = _accepted(answer)
                if accepted is not None and accepted != k:
                    return "unexpected", attempts, f"202 accepted {accepted} of {k}"
                return "ack", attempts, ""
            if status in (429, 503):
                if status == 429:
                    self.fig.retries_429 += 1
                else:
                    self.fig.retries_503 += 1
                wait_s = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
                await asyncio.sleep(wait_s)
                continue
            return "unexpected", attempts, f"{status} {answer[:200].decode(errors='replace')}"

    def _record(self, b: Batch) -> None:
        self.batches.append(b)
        k = b.last - b.first + 1
        if b.outcome == "ack":
            self.fig.acknowledged_requests += 1
            self.fig.acknowledged_lines += k
        elif b.outcome == "doubt":
            self.fig.in_doubt_requests += 1
            self.fig.in_doubt_lines += k
            self.log(f"http client {b.client}: n{b.first}..n{b.last} in doubt ({b.detail})")
        elif b.outcome == "abandoned":
            self.fig.abandoned_lines += k
        else:
            assert self.fig.unexpected_answers is not None
            key = b.detail.split(" ", 1)[0]
            self.fig.unexpected_answers[key] = self.fig.unexpected_answers.get(key, 0) + 1
            self.log(f"http client {b.client}: n{b.first}..n{b.last} answered {b.detail}")
        if self._journal is not None:
            self._journal.write(
                orjson.dumps(
                    {
                        "c": b.client,
                        "first": b.first,
                        "last": b.last,
                        "outcome": b.outcome,
                        "t_start": b.t_start,
                        "t_end": b.t_end,
                        "attempts": b.attempts,
                        "detail": b.detail,
                    }
                )
                + b"\n"
            )

    # -- the verdict ---------------------------------------------------------------------

    def new_counts(self) -> list[bytearray]:
        return [bytearray(n) for n in self.next_n]

    def count_row(self, counts: list[bytearray], row: Any) -> None:
        """One system_logs row with the intake's service (event, message, w, n, seq)."""
        self.fig.rows += 1
        w, n = row["w"], row["n"]
        c = None if w is None else w - HTTP_W0
        if (
            row["event"] != EVENT
            or c is None
            or n is None
            or not 0 <= c < len(counts)
            or not 0 <= n < len(counts[c])
            or row["seq"] != http_seq(c, n)
            or not (row["message"] or "").startswith(http_message_prefix(c, n) + " ")
        ):
            self.fig.other_rows += 1
            self._example(f"other row: {str(row['message'])[:80]!r}")
            return
        if counts[c][n] < 255:
            counts[c][n] += 1

    def judge_counts(self, counts: list[bytearray]) -> None:
        f = self.fig
        for b in self.batches:
            for n in range(b.first, b.last + 1):
                seen = counts[b.client][n]
                if b.outcome == "ack":
                    if seen == 0:
                        f.lost += 1
                        self._example(f"lost: h{b.client} n{n} (acknowledged at {b.t_end:.3f})")
                    elif seen > 1:
                        f.duplicated += seen - 1
                        self._example(f"duplicated: h{b.client} n{n} x{seen} (acknowledged)")
                elif b.outcome in ("doubt", "unexpected"):
                    if seen >= 1:
                        f.in_doubt_stored += 1
                    if seen > 1:
                        f.duplicated += seen - 1
                        self._example(f"duplicated: h{b.client} n{n} x{seen} (in doubt)")
                elif seen:  # abandoned: refused every time, never acknowledged
                    f.other_rows += seen
                    self._example(f"stored though never acknowledged: h{b.client} n{n} x{seen}")

    def _example(self, text: str) -> None:
        assert self.fig.examples is not None
        if len(self.fig.examples) < 8:
            self.fig.examples.append(text)


def _accepted(answer: bytes) -> int | None:
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    n = value.get("accepted") if isinstance(value, dict) else None
    return n if isinstance(n, int) else None

"""Send chat completions at a per-minute limit, as a user of the official SDK would write it.

Usage: token_bucket_client.py BASE_URL PER_MINUTE MAX_SECONDS

The client uses together.AsyncTogether (together==3.1.1) with asyncio and a token bucket of
one second's worth of requests (PER_MINUTE / 60 tokens), refilled at PER_MINUTE / 60 per second. The main loop
takes a token, then starts the request as its own task, so the bucket alone sets the pace. A
request that gets a 429 sleeps for the response's Retry-After (1 s when absent), takes a new
token and tries again. The SDK's own retries are off, so every retry passes the bucket.

When its standard input closes, or after MAX_SECONDS, the client stops starting requests,
cancels those under way, and prints one JSON line on stdout: {"answered", "mismatched",
"rate_limited", "failed", "failures"}. An answer is mismatched when its content does not start
with its own question, as every answer of the simulator does.
BASE_URL may end in /v1: the SDK 3.1.1 puts /v1 into every path itself, so the script strips it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import together

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
# Failure messages printed in the summary at most; the rest are only counted.
MAX_FAILURES_SHOWN = 5


class TokenBucket:
    """A token bucket: `capacity` tokens at most, refilled at `rate` tokens per second."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        # The lock queues waiters in arrival order, so retries and new requests take turns.
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass
class Counts:
    answered: int = 0
    mismatched: int = 0
    rate_limited: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def record_failure(self, message: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_SHOWN:
            self.failures.append(message)


def retry_after_secs(error: together.RateLimitError) -> float:
    value = error.response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else 1.0
    except ValueError:
        return 1.0


async def ask(client: together.AsyncTogether, bucket: TokenBucket, question: str, counts: Counts) -> None:
    while True:
        try:
            completion = await client.chat.completions.create(
                model=CHAT_MODEL,
                messages=[{"role": "user", "content": question}],
                max_tokens=64,
            )
        except together.RateLimitError as error:
            counts.rate_limited += 1
            await asyncio.sleep(retry_after_secs(error))
            await bucket.acquire()
            continue
        except together.APIError as error:
            counts.record_failure(f"{question}: {error!r}")
            return
        content = completion.choices[0].message.content if completion.choices else None
        if content is not None and content.startswith(question):
            counts.answered += 1
        else:
            counts.mismatched += 1
        return


async def feed(client: together.AsyncTogether, bucket: TokenBucket, counts: Counts, tasks: set[asyncio.Task[None]]) -> None:
    index = 0
    while True:
        await bucket.acquire()
        task = asyncio.create_task(ask(client, bucket, f"bench question {index}", counts))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1


async def wait_for_eof() -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def run(base_url: str, per_minute: int, max_seconds: float) -> Counts:
    origin = base_url.rstrip("/").removesuffix("/v1")
    client = together.AsyncTogether(api_key="bench", base_url=origin, max_retries=0)
    rate = per_minute / 60
    bucket = TokenBucket(rate=rate, capacity=max(rate, 1.0))
    counts = Counts()
    tasks: set[asyncio.Task[None]] = set()
    feeder = asyncio.create_task(feed(client, bucket, counts, tasks))
    try:
        await asyncio.wait_for(wait_for_eof(), timeout=max_seconds)
    except asyncio.TimeoutError:
        pass
    feeder.cancel()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(feeder, *tasks, return_exceptions=True)
    await client.close()
    return counts


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, per_minute, max_seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    counts = asyncio.run(run(base_url, per_minute, max_seconds))
    print(
        json.dumps(
            {
                "answered": counts.answered,
                "mismatched": counts.mismatched,
                "rate_limited": counts.rate_limited,
                "failed": counts.failed,
                "failures": counts.failures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

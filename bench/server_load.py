#!/usr/bin/env python3
"""Load on a running `fulgur serve`: throughput, time to first token and inter-token latency
at several numbers of concurrent streams, with the official `openai` client (asyncio).

Each of C concurrent streams sends --rounds streamed completions one after another, greedy,
--max-tokens each. Prompts differ per request (counting from a different number), so no
lane reuses a cached prompt prefix. Reported per level:
  throughput   completion tokens of all requests / wall time of the level
  TTFT         request sent -> first text chunk, as the client sees it (queue wait included)
  ITL          gaps between successive text chunks of one stream (a chunk is one token,
               except where the server holds text back for a stop string or UTF-8)

    scripts/test-server's venv has the client: .venv-test/bin/pip install openai
    .build/release/fulgur serve --api-key KEY --lanes 2 --max-queue 64 &
    .venv-test/bin/python bench/server_load.py --base-url http://127.0.0.1:8080/v1 --api-key KEY
"""
import argparse
import asyncio
import math
import time
import urllib.request

from openai import AsyncOpenAI


def percentile(values, p):
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def one_request(client, model, start_number, max_tokens):
    prompt = ", ".join(str(start_number + i) for i in range(4)) + ","
    sent = time.perf_counter()
    stamps, tokens = [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return sent, stamps, tokens


async def level(client, model, concurrency, rounds, max_tokens, offset):
    async def stream(s):
        return [await one_request(client, model, offset + 1000 * s + 37 * r, max_tokens) for r in range(rounds)]

    start = time.perf_counter()
    results = await asyncio.gather(*(stream(s) for s in range(concurrency)))
    wall = time.perf_counter() - start
    requests = [r for per_stream in results for r in per_stream]
    ttft = [stamps[0] - sent for sent, stamps, _ in requests if stamps]
    itl = [b - a for _, stamps, _ in requests for a, b in zip(stamps, stamps[1:])]
    tokens = sum(t or 0 for _, _, t in requests)
    return {"concurrency": concurrency, "requests": len(requests), "tokens": tokens, "wall": wall,
            "throughput": tokens / wall, "ttft": ttft, "itl": itl}


def lanes(base_url, api_key):
    request = urllib.request.Request(base_url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("fulgur_lanes "):
                return int(float(line.split()[1]))
    return None


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="requests each stream sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    await one_request(client, model, 10 ** 6, 8)  # warm-up: pages of the weights, connections
    print(f"model {model}, {lanes(args.base_url, args.api_key)} lanes, {args.rounds} requests per stream, "
          f"{args.max_tokens} tokens each, greedy\n")
    print("| streams | requests | completion tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(args.concurrency):
        r = await level(client, model, c, args.rounds, args.max_tokens, offset=100000 * (i + 1))
        print(f"| {c} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['throughput']:.1f} | "
              f"{1000 * percentile(r['ttft'], 50):.0f} | {1000 * percentile(r['ttft'], 99):.0f} | "
              f"{1000 * percentile(r['itl'], 50):.1f} | {1000 * percentile(r['itl'], 99):.1f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

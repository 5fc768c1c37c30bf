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
With --processes P the streams of a level are spread over P client processes, each with its
own event loop and connections, all starting at one instant: one Python process parsing every
chunk of 32 fast streams is itself the bottleneck (it capped a GPU server near 2000 tokens/s).

    scripts/test-server's venv has the client: .venv-test/bin/pip install openai
    .build/release/fulgur serve --api-key KEY --lanes 2 --max-queue 64 &
    .venv-test/bin/python bench/server_load.py --base-url http://127.0.0.1:8080/v1 --api-key KEY
"""
import argparse
import asyncio
import concurrent.futures
import math
import multiprocessing
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


def summarize(concurrency, requests, wall):
    ttft = [stamps[0] - sent for sent, stamps, _ in requests if stamps]
    itl = [b - a for _, stamps, _ in requests for a, b in zip(stamps, stamps[1:])]
    tokens = sum(t or 0 for _, _, t in requests)
    return {"concurrency": concurrency, "requests": len(requests), "tokens": tokens, "wall": wall,
            "throughput": tokens / wall, "ttft": ttft, "itl": itl}


async def streams_of(client, model, streams, rounds, max_tokens, offset):
    async def stream(s):
        return [await one_request(client, model, offset + 1000 * s + 37 * r, max_tokens) for r in range(rounds)]
    results = await asyncio.gather(*(stream(s) for s in streams))
    return [r for per_stream in results for r in per_stream]


async def level(client, model, concurrency, rounds, max_tokens, offset):
    start = time.perf_counter()
    requests = await streams_of(client, model, range(concurrency), rounds, max_tokens, offset)
    return summarize(concurrency, requests, time.perf_counter() - start)


def worker(base_url, api_key, model, streams, rounds, max_tokens, offset, start_at):
    """One client process's streams, from the shared instant `start_at` (perf_counter is
    CLOCK_MONOTONIC on Linux, the same in every process); returns its requests and end time."""
    async def run():
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        requests = await streams_of(client, model, streams, rounds, max_tokens, offset)
        return requests, time.perf_counter()
    return asyncio.run(run())


def level_in_processes(pool, processes, base_url, api_key, model, concurrency, rounds, max_tokens, offset):
    start_at = time.perf_counter() + 1.0  # every process started and waiting by then
    shares = [list(range(concurrency))[p::processes] for p in range(processes)]
    futures = [pool.submit(worker, base_url, api_key, model, share, rounds, max_tokens, offset, start_at) for share in shares if share]
    done = [f.result() for f in futures]
    requests = [r for part, _ in done for r in part]
    return summarize(concurrency, requests, max(end for _, end in done) - start_at)


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
    ap.add_argument("--processes", type=int, default=1, help="client processes the streams of a level are spread over")
    args = ap.parse_args()

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    await one_request(client, model, 10 ** 6, 8)  # warm-up: pages of the weights, connections
    print(f"model {model}, {lanes(args.base_url, args.api_key)} lanes, {args.rounds} requests per stream, "
          f"{args.max_tokens} tokens each, greedy, {args.processes} client process(es)\n")
    pool = concurrent.futures.ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) if args.processes > 1 else None
    print("| streams | requests | completion tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(args.concurrency):
        if pool and c > 1:
            r = level_in_processes(pool, min(args.processes, c), args.base_url, args.api_key, model, c, args.rounds, args.max_tokens,
                                   offset=100000 * (i + 1))
        else:
            r = await level(client, model, c, args.rounds, args.max_tokens, offset=100000 * (i + 1))
        print(f"| {c} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['throughput']:.1f} | "
              f"{1000 * percentile(r['ttft'], 50):.0f} | {1000 * percentile(r['ttft'], 99):.0f} | "
              f"{1000 * percentile(r['itl'], 50):.1f} | {1000 * percentile(r['itl'], 99):.1f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

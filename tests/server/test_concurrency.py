"""Many streaming clients at once: every request completes, no response is mixed with
another, and each greedy response equals the same request served alone, latency first (lanes
and a queue) and throughput first (continuous batching: the requests share forward passes)."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

CLIENTS = 32
REQUESTS_PER_CLIENT = 2


def stream_chat(client, model, prompt):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0, stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length")
    return text


@pytest.mark.parametrize("schedule", ["latency", "throughput"])
def test_32_concurrent_streams_each_equal_the_request_served_alone(request, schedule):
    s = request.getfixturevalue("server" if schedule == "latency" else "throughput_server")
    client = s.client()
    model = client.models.list().data[0].id
    prompts = [[f"Name a fruit whose name starts with the letter {chr(65 + (c * REQUESTS_PER_CLIENT + r) % 26)}."
                for r in range(REQUESTS_PER_CLIENT)] for c in range(CLIENTS)]

    def one_client(own_prompts):
        return [stream_chat(client, model, p) for p in own_prompts]

    running, done = [], threading.Event()

    def watch():
        while not done.wait(0.2):
            running.append(s.metric("fulgur_running_generations"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            concurrent = list(pool.map(one_client, prompts))
    finally:
        done.set()
        watcher.join()
    if schedule == "throughput":
        # Generations ran together, not one after another.
        assert max(running) > 1, running
    alone = {p: stream_chat(client, model, p) for p in sorted({p for own in prompts for p in own})}
    for own_prompts, answers in zip(prompts, concurrent):
        for prompt, answer in zip(own_prompts, answers):
            assert answer == alone[prompt], prompt
    # Different prompts get different answers, so a mixed-up response could not pass unseen.
    assert len(set(alone.values())) > 1

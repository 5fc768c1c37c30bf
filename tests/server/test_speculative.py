"""DFlash decoding per request: `fulgur serve --speculative` with a random drafter for the
default model (written by `fulgur random-drafter`; its guesses are noise, so about one token
a round is accepted, which is what tests of losslessness need) answers exactly what the plain
session server answers, logprobs included, on two lanes at once, and reports its statistics
in the `fulgur` extension field and in /metrics."""
import json
import os
import shutil
import subprocess
import tempfile
import threading

import pytest

from conftest import BINARY, launch

CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="session")
def drafter_dir():
    directory = tempfile.mkdtemp(prefix="fulgur-drafter-")
    path = os.path.join(directory, "drafter")
    run = subprocess.run([BINARY, "random-drafter", "--export", path, "--seed", "1"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "model.safetensors"))
    yield path
    shutil.rmtree(directory)


@pytest.fixture(scope="session")
def speculative_server(drafter_dir):
    # Two lanes, each with a drafter of its own; the session server's other limits.
    s = launch("--lanes", "2", "--speculative", drafter_dir, "--max-queue", "40", "--max-tokens-limit", "512")
    try:
        yield s
    finally:
        s.stop()
        os.unlink(s.log_path)


@pytest.fixture(scope="session")
def fast(speculative_server):
    return speculative_server.client()


def stats(response):
    """The speculative statistics of a response (a whole answer or a finishing chunk)."""
    extra = response.model_extra or {}
    assert "fulgur" in extra, response
    return extra["fulgur"]["speculative"]


def assert_sane(s, completion_tokens, finished_by_length):
    assert s["block_size"] == 8  # the drafter's
    assert s["rounds"] >= 1
    assert s["mean_acceptance"] >= 1
    assert sum(s["acceptance_histogram"]) == s["rounds"]
    assert s["emitted_tokens"] == sum((i + 1) * n for i, n in enumerate(s["acceptance_histogram"]))
    assert s["accepted_tokens"] == s["emitted_tokens"] - s["rounds"]
    assert s["mean_acceptance"] == pytest.approx(s["emitted_tokens"] / s["rounds"])
    assert s["draft_seconds"] >= 0 and s["verify_seconds"] > 0
    # The first token comes from the prompt's forward pass; the rounds emit the rest (and,
    # when a stop ends the text inside a block, a few beyond it).
    if finished_by_length:
        assert s["emitted_tokens"] == completion_tokens - 1
    else:
        assert s["emitted_tokens"] >= completion_tokens - 1


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_equals_plain_decoding_token_for_token(client, fast, model, stream):
    arguments = dict(model=model, messages=CHAT, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**arguments)
    if not stream:
        r = fast.chat.completions.create(**arguments)
        assert r.choices[0].message.content == plain.choices[0].message.content
        assert r.choices[0].finish_reason == plain.choices[0].finish_reason
        assert r.usage == plain.usage
        tokens = [e.token for e in r.choices[0].logprobs.content]
        assert_sane(stats(r), r.usage.completion_tokens, r.choices[0].finish_reason == "length")
        assert "fulgur" not in (plain.model_extra or {})  # plain decoding adds nothing
    else:
        chunks = list(fast.chat.completions.create(**arguments, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == plain.choices[0].finish_reason
        # Only the finishing chunk carries the statistics.
        assert [c for c in chunks if "fulgur" in (c.model_extra or {})] == finishing
        assert chunks[-1].usage == plain.usage
        assert_sane(stats(finishing[0]), plain.usage.completion_tokens, finishing[0].choices[0].finish_reason == "length")
        tokens = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in plain.choices[0].logprobs.content]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_equal_plain_decoding(client, fast, model, stream):
    for prompt in PROMPTS[:2]:
        arguments = dict(model=model, prompt=prompt, max_tokens=20, temperature=0)
        plain = client.completions.create(**arguments)
        if stream:
            chunks = list(fast.completions.create(**arguments, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
            assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
            assert stats(chunks[-1])["rounds"] >= 1
        else:
            r = fast.completions.create(**arguments)
            assert r.choices[0].text == plain.choices[0].text
            assert r.usage == plain.usage
            assert_sane(stats(r), r.usage.completion_tokens, r.choices[0].finish_reason == "length")


def test_logprobs_equal_plain_decodings(client, fast, model):
    arguments = dict(model=model, messages=CHAT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=4)
    plain = client.chat.completions.create(**arguments).choices[0].logprobs.content
    got = fast.chat.completions.create(**arguments).choices[0].logprobs.content
    assert [e.token for e in got] == [e.token for e in plain]
    for g, p in zip(got, plain):
        # The verify pass runs a block of tokens at once: the same logits up to rounding.
        assert g.logprob == pytest.approx(p.logprob, abs=1e-3)
        assert [t.token for t in g.top_logprobs] == [t.token for t in p.top_logprobs]
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([t.logprob for t in p.top_logprobs], abs=1e-3)
    # The legacy shape of completions, with sampling on: logprobs come from the target's logits
    # at the position that emitted each token, whatever the temperature.
    arguments = dict(model=model, prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=5, logprobs=3)
    plain = client.completions.create(**arguments).choices[0].logprobs
    got = fast.completions.create(**arguments).choices[0].logprobs
    assert got.tokens == plain.tokens
    assert got.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-3)


def test_a_seed_reproduces_a_sampled_answer_and_it_is_plain_decodings(client, fast, model):
    arguments = dict(model=model, messages=CHAT, max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    answers = [fast.chat.completions.create(**arguments).choices[0].message.content for _ in range(2)]
    assert answers[0] == answers[1]
    # The sampler draws once per emitted token, in order: the same text as without a drafter.
    assert answers[0] == client.chat.completions.create(**arguments).choices[0].message.content


def test_concurrent_requests_on_two_lanes_each_equal_plain_decoding(client, fast, model, speculative_server):
    expected = [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in PROMPTS]
    rounds_before = speculative_server.metric("fulgur_speculative_rounds_total") or 0
    results, errors = [None] * (2 * len(PROMPTS)), []

    def run(i):
        try:
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                chunks = fast.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
                results[i] = ("".join(c.choices[0].text for c in chunks), None)
            else:
                r = fast.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
                results[i] = (r.choices[0].text, stats(r)["rounds"])
        except Exception as e:  # reported below with its request
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for i, (text, _) in enumerate(results):
        assert text == expected[i % len(PROMPTS)], i
    # Every generation's rounds reached the metrics, and the histogram counted each round.
    metrics = speculative_server.metrics()
    rounds = speculative_server.metric("fulgur_speculative_rounds_total") - rounds_before
    assert rounds >= sum(r for _, r in results if r is not None) + len(results) // 2
    assert speculative_server.metric("fulgur_speculative_acceptance_length_count") >= rounds
    assert 'fulgur_speculative_acceptance_length_bucket{le="1.0"}' in metrics
    assert speculative_server.metric("fulgur_speculative_verify_seconds_total") > 0
    assert speculative_server.metric("fulgur_lanes") == 2


def run_serve(*args):
    return subprocess.run([BINARY, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_throughput_first_refuses_speculative_decoding_with_a_usage_error(drafter_dir):
    # Refused before the model loads: batched steps take one token per generation.
    run = run_serve("--schedule", "throughput", "--speculative", drafter_dir)
    assert run.returncode != 0
    assert "--speculative" in run.stderr and "--schedule throughput" in run.stderr, run.stderr


def test_speculative_flags_are_checked(tmp_path):
    run = run_serve("--block-size", "4")
    assert run.returncode != 0 and "--block-size needs --speculative" in run.stderr, run.stderr
    run = run_serve("--speculative", str(tmp_path / "missing"))
    assert run.returncode != 0 and "missing" in run.stderr, run.stderr

"""Self-distillation data for a DFlash drafter: prompts in three scenarios, the target's own
answers to them, and the target's hidden states over prompt + answer.

- coding: questions about the Python standard library, written from its docstrings (found
  offline with `inspect`, as `pydoc` shows them);
- math: generated arithmetic and word problems;
- chat: user turns that the target itself writes when its chat template is opened at a user
  message and left to run.

Held-out prompts (for evaluation) never share a stdlib function, a math problem or a chat turn
with the training prompts.
"""
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import time
import warnings

import torch

# Modules whose import has no side effects and whose docstrings read well.
STDLIB = """abc argparse array ast asyncio base64 bisect calendar cmath collections collections.abc
colorsys configparser contextlib copy csv dataclasses datetime decimal difflib enum filecmp
fnmatch fractions functools glob graphlib gzip hashlib heapq hmac html html.parser http.client
http.cookies inspect io ipaddress itertools json keyword linecache locale logging lzma math
mimetypes numbers operator os os.path pathlib pickle platform pprint queue random re reprlib
sched secrets selectors shlex shutil signal socket sqlite3 statistics string struct
subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing
unicodedata unittest urllib.parse urllib.request uuid warnings weakref xml.etree.ElementTree
zipfile zlib""".split()

CODING_TEMPLATES = [
    "What does `{name}` do in Python? Explain it and give a short example.",
    "Here is the documentation of `{name}{sig}`:\n\n{doc}\n\nWrite a small Python program that uses it.",
    "Implement a simplified version of `{name}{sig}` in pure Python. It should do this: {summary}",
    "Explain this Python documentation in simple words, then show example code:\n\n{doc}",
    "Write unit tests with `unittest` for `{name}`. What it does: {summary}",
    "I'm new to Python. When would I use `{name}`, and how? {summary}",
    "Write a Python function that wraps `{name}` with input validation and a docstring.",
    "Compare `{name}` with another way to do the same thing in Python, with code for both.",
    "Show three different examples of `{name}`, from simple to advanced, with comments.",
    "What are common mistakes when using `{name}{sig}`? Show wrong and corrected code.",
    "Write a command-line Python script that uses `{name}`. Its purpose: {summary}",
    "Document `{name}{sig}` in Markdown with a parameters table and an example, from this description:\n\n{doc}",
    # Added in the nineteenth session (2026-11-29), for more distinct prompts in new data calls
    # (the first twelve give about 22k); held-out functions stay held out whatever the template.
    "Write a Python class that uses `{name}` internally, with type hints and a usage example. {summary}",
    "Refactor this into clean, idiomatic Python that uses `{name}`:\n\n```python\n# {summary}\nresult = None  # TODO\n```",
    "My code calls `{name}{sig}` and does not do what I expect. What could be wrong? Show how to debug it.",
    "Write a pytest test file for a function that uses `{name}`. What `{name}` does: {summary}",
    "How does `{name}` behave with edge cases (empty input, None, very large values)? Show code.",
    "Write an async Python function that uses `{name}` where it makes sense, and explain the choice.",
    "Give a one-line summary of `{name}{sig}`, then a ten-line Python example that uses it.",
    "Write a Python script that reads input from a file and uses `{name}`. Its job: {summary}",
    "Explain the parameters of `{name}{sig}` one by one, with a code example for each.",
    "Rewrite this description of `{name}` as a Python docstring, then implement a function with it:\n\n{doc}",
    "What is the time and memory cost of `{name}`? Show code that measures it with `timeit`.",
    "Show how to use `{name}` together with another standard-library module in one short program.",
]

NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "coins", "cards", "eggs"]

CHAT_OPENERS = ["", "", "", "Can you", "How do I", "What is", "Why", "Write", "Explain", "Give me", "I need", "Tell me",
                "What are", "Help me", "Please", "Describe", "Compare", "Suggest", "How can", "Is it", "What should"]


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def held_out(key, fraction):
    """A stable split: the same key is always on the same side."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 2**32


def stdlib_entries():
    """(qualified name, signature, docstring) of public functions, classes and methods."""
    out = []
    for module_name in STDLIB:
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:
            continue
        for name, obj in inspect.getmembers(module):
            if name.startswith("_") or (getattr(obj, "__module__", None) or module_name).split(".")[0] != module_name.split(".")[0]:
                continue
            members = [(f"{module_name}.{name}", obj)]
            if inspect.isclass(obj):
                members += [(f"{module_name}.{name}.{m}", f) for m, f in vars(obj).items()
                            if not m.startswith("_") and callable(f)]
            for qualname, f in members:
                if not (inspect.isfunction(f) or inspect.isbuiltin(f) or inspect.isclass(f) or inspect.ismethoddescriptor(f)):
                    continue
                doc = inspect.getdoc(f)
                if not doc or len(doc) < 40:
                    continue
                try:
                    sig = str(inspect.signature(f))
                except (TypeError, ValueError):
                    sig = "(...)"
                out.append((qualname, sig if len(sig) < 120 else "(...)", doc))
    return sorted(set(out))


def coding_prompts(rng, count, fraction_held_out, held):
    """`count` prompts about stdlib functions on one side of the held-out split: every
    (function, template) pair once, in random order, before any pair repeats."""
    entries = [e for e in stdlib_entries() if held_out(e[0], fraction_held_out) == held]
    pairs = [(e, t) for e in entries for t in CODING_TEMPLATES]
    prompts = []
    while len(prompts) < count:
        rng.shuffle(pairs)
        for (name, sig, doc), template in pairs[:count - len(prompts)]:
            summary = doc.split("\n\n")[0].replace("\n", " ")[:300]
            prompts.append(template.format(name=name, sig=sig, doc=doc[:600], summary=summary))
    return prompts


def math_problem(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 30)
    n1, n2 = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kinds = [
        lambda: f"What is {rng.randint(10, 9999)} {rng.choice(['+', '-', '*'])} {rng.randint(10, 999)}?",
        lambda: f"Calculate {a} × {b} step by step.",
        lambda: f"What is {rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75])}% of {rng.randint(20, 2000)}?",
        lambda: f"Simplify the fraction {a * c}/{b * c}.",
        lambda: f"Solve for x: {a}x + {b} = {a * c + b}.",
        lambda: f"What is {rng.randint(100, 9999)} divided by {rng.randint(2, 50)}? Give the quotient and remainder.",
        lambda: f"Is {rng.randint(20, 500)} a prime number? Explain.",
        lambda: f"Find the greatest common divisor of {a * c} and {b * c}.",
        lambda: f"Convert {rng.randint(5, 500)} to binary.",
        lambda: f"What is the average of {', '.join(str(rng.randint(1, 100)) for _ in range(rng.randint(3, 7)))}?",
        lambda: f"What is {a} squared plus {b} squared?",
        lambda: f"{n1} has {a} {item}. {n1} buys {b} more and gives {c} to {n2}. How many {item} does {n1} have now?",
        lambda: f"A train travels at {rng.randint(40, 180)} km per hour for {rng.randint(2, 9)} hours. How far does it go?",
        lambda: f"A shop sells {item} for ${rng.randint(1, 20)} each. How much do {c} {item} cost?",
        lambda: f"{n1} reads {c} pages a day. How many days does it take to finish a {a * c + rng.randint(0, c - 1)}-page book?",
        lambda: f"A rectangle is {a} cm long and {b} cm wide. What are its area and its perimeter?",
        lambda: f"If {c} workers build a wall in {rng.randint(2, 12)} days, how long do {c * 2} workers take?",
        lambda: f"{n1} saves ${c} every week. How much has {n1} saved after {a} weeks?",
        lambda: f"A movie starts at {rng.randint(1, 11)}:{rng.choice(['00', '15', '30', '45'])} and lasts {rng.randint(80, 190)} minutes. When does it end?",
        lambda: f"{n1} and {n2} share {a * 2} {item} so that {n1} gets {c} more than {n2}. How many does each get?",
        lambda: f"A recipe needs {rng.randint(2, 6)} eggs for {rng.randint(2, 6)} people. How many eggs for {rng.randint(7, 30)} people?",
        lambda: f"The price of a {rng.choice(['bike', 'phone', 'lamp', 'jacket'])} is ${a * 10}. It is reduced by {rng.choice([10, 20, 25, 50])}%. What is the new price?",
    ]
    problem = rng.choice(kinds)()
    return problem if "Explain" in problem else problem + rng.choice(["", "", " Show your steps.", " Explain your reasoning."])


def math_prompts(rng, count, fraction_held_out, held):
    prompts, seen = [], set()
    while len(prompts) < count:
        p = math_problem(rng)
        if held_out(p, fraction_held_out) == held and p not in seen:
            seen.add(p)
            prompts.append(p)
    return prompts


def load_target(gguf_parts, device, dtype):
    """The target and its tokenizer from a GGUF file, given whole or as parts to join in order
    (for machines that receive at most about 60 MB per copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_parts[0]
    if len(gguf_parts) > 1:
        path = os.path.join(os.path.dirname(os.path.abspath(gguf_parts[0])), "joined-" + os.path.basename(gguf_parts[0]) + ".gguf")
        with open(path, "wb") as out:
            for part in gguf_parts:
                with open(part, "rb") as f:
                    out.write(f.read())
        log(f"joined {len(gguf_parts)} parts into {path} ({os.path.getsize(path)} bytes)")
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def chat_ids(tokenizer, text):
    """Token ids of a one-turn chat with the default system message, ready for the answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, batch_size, stop_id, temperature=0.0, top_p=1.0, deadline=None, label=""):
    """Continuations of `prompts` (token id lists), batched by length, cut after `stop_id`.
    Batches not started by `deadline` (time.time()) are left out: their entries are None."""
    device = model.device
    # Sorted by length inside windows of 8 batches, not over all prompts: a deadline then cuts
    # every scenario alike (sorting all of them cut the long coding prompts first).
    window = batch_size * 8
    order = [i for w in range(0, len(prompts), window)
             for i in sorted(range(w, min(len(prompts), w + window)), key=lambda i: len(prompts[i]))]
    out = [None] * len(prompts)
    done_tokens, t0 = 0, time.time()
    for start in range(0, len(order), batch_size):
        if deadline is not None and time.time() > deadline:
            log(f"{label}: time is up after {start} of {len(order)} prompts")
            break
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), stop_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                eos_token_id=stop_id, pad_token_id=stop_id, **sampling)
        for r, i in enumerate(rows):
            seq = result[r, width:].tolist()
            out[i] = seq[:seq.index(stop_id) + 1] if stop_id in seq else seq
            done_tokens += len(out[i])
        log(f"{label}: {min(start + batch_size, len(order))}/{len(order)} prompts, {done_tokens} tokens, "
            f"{done_tokens / (time.time() - t0):.0f} tokens/s")
    return out


def sample_user_turns(generate_fn, tokenizer, rng, count, stop_id, deadline=None):
    """User messages written by the target: its chat template opened at a user turn (after an
    optional opening word or two) and sampled to the end of the turn. `generate_fn(prompts,
    max_new_tokens, temperatures, top_p, deadline, label)` is the target's batched decoder."""
    marker = "\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = text[:text.index(marker)]
    openers = [rng.choice(CHAT_OPENERS) for _ in range(count)]
    prompts = [tokenizer.encode(prefix + o, add_special_tokens=False) for o in openers]
    turns = generate_fn(prompts, 48, [1.0] * len(prompts), 0.95, deadline, "user turns")
    out, seen = [], set()
    for opener, t in zip(openers, turns):
        if t is None or not t or t[-1] != stop_id:
            continue
        turn = (opener + tokenizer.decode(t[:-1])).strip()
        if len(turn.split()) >= 3 and turn not in seen:
            seen.add(turn)
            out.append(turn)
    return out


@torch.no_grad()
def target_features(model, sequences, layer_ids, max_batch_tokens, store_device, dtype=torch.bfloat16):
    """For every token of every sequence, the hidden states after each of `layer_ids`
    (decoder layer outputs, before the final norm), concatenated in that order: what Fulgur's
    target hands the drafter. Returns one [len, len(layer_ids) * hidden] tensor per sequence."""
    layers = model.model.layers
    captured = {}

    def hook(i):
        def f(_module, _inputs, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return f

    handles = [layers[i].register_forward_hook(hook(i)) for i in layer_ids]
    out = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        start = 0
        while start < len(order):
            width = len(sequences[order[start]])
            end = start
            while end < len(order) and (end - start + 1) * max(width, len(sequences[order[end]])) <= max_batch_tokens:
                width = max(width, len(sequences[order[end]]))
                end += 1
            end = max(end, start + 1)
            rows = order[start:end]
            width = max(len(sequences[i]) for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, :len(sequences[i])] = 1
            model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False, logits_to_keep=1)
            feats = torch.cat([captured[i] for i in layer_ids], -1)
            for r, i in enumerate(rows):
                out[i] = feats[r, :len(sequences[i])].to(store_device, dtype)
            start = end
    finally:
        for h in handles:
            h.remove()
    return out


def build_prompts(rng, counts, fraction_held_out, held):
    """Coding and math prompts (chat ones need the target: `sample_user_turns`)."""
    return ([("coding", p) for p in coding_prompts(rng, counts["coding"], fraction_held_out, held)]
            + [("math", p) for p in math_prompts(rng, counts["math"], fraction_held_out, held)])


"""Trains a DFlash drafter for a target by self-distillation, start to finish in one run:

 1. prompts: coding questions from the Python standard library's docstrings, generated math
    problems, and chat turns the target writes itself (data.py); two held-out sets per
    scenario: validation (picks the checkpoint) and test (reported, eval_prompts.json);
 2. the target answers them (fastllama.py: batched, static KV cache; mostly greedy, a share
    sampled, whose labels are the target's argmax, block_labels) until the generation time is
    up; held-out answers are greedy and float32;
 3. training: batches of sequences of similar length; the target's hidden states after
    `target_layer_ids` are computed at a sequence's first use and kept on the GPU while memory
    lasts (beyond it, computed at every use, so the data size is not bounded by memory); blocks
    start at random anchors inside answers; the anchor token is given and the rest of the
    block is mask tokens; each block sees the target features strictly before its anchor
    and itself; loss = cross-entropy at the masked positions, position k weighted by
    exp(-(k-1)/gamma); AdamW (default) or Muon for the matrices (`--optimizer muon`;
    `--optimizer adamw,muon` trains both on the same data). Every `--val-every` seconds the
    drafter's acceptance on the validation answers is measured by replaying greedy decoding
    teacher-forced; the best state is kept and exported, and `--patience` stops early;
 4. export in the published drafter format (config.json + bf16 safetensors) that Fulgur loads;
 5. acceptance on the test prompts: the same replay for all of them, and real speculative
    decoding (evaluate.py) for as many as `--eval-minutes` allows.

`--data-only --save-data FILE` stops after step 2; `--data FILE` starts from such a file (the
two halves of a run on one warm machine, each inside a device call's time). A CPU smoke run:

    .venv/bin/python recipes/dflash/train.py --device cpu --prompts 12 --steps 6 --max-new-tokens 48 \\
        --batch 4 --block-tokens 128 --val-every 0 --out /tmp/dflash-smoke
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import build_prompts, chat_ids, generate as hf_generate, load_target, log, sample_user_turns, target_features  # noqa: E402
from evaluate import evaluate  # noqa: E402
from fastllama import FastLlama, Unsupported, check_against  # noqa: E402
from model import (DFlashDrafter, DrafterConfig, gamma_for, init_weights, loss_weights, parameter_count,  # noqa: E402
                   spread_layer_ids, training_mask, training_positions)
from muon import Muon  # noqa: E402

DEFAULT_GGUF = os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf")
SCENARIOS = ["coding", "math", "chat"]


def arguments():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="+", default=[DEFAULT_GGUF], help="the target: a GGUF file, or its parts in order")
    ap.add_argument("--out", help="output folder: the drafter, eval_prompts.json, report.json (not with --data-only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default on --device cpu: 1, since "
                    "oversubscribed threads on a shared machine spin: 8x slower here with 2 on 2 busy cores)")
    ap.add_argument("--budget-minutes", type=float, default=9.1,
                    help="the whole run from here ends by then: training is cut to leave time for the final evaluation")
    # data
    ap.add_argument("--prompts", type=int, default=90000, help="training prompts prepared, split by --shares "
                    "(generation stops at --gen-minutes; coding has about 45k distinct ones, repeats are sampled)")
    ap.add_argument("--shares", default="coding=1,math=1,chat=1", help="relative shares of the training prompts by "
                    "scenario (validation and test prompts are not affected)")
    ap.add_argument("--val-prompts", type=int, help="validation prompts per scenario (default: prompts/24, 1 to 32)")
    ap.add_argument("--eval-prompts", type=int, help="test prompts per scenario (default: prompts/24, 1 to 16)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--sampled-fraction", type=float, default=0.25, help="share of answers sampled at temperature 1")
    ap.add_argument("--gen-engine", default="fast", choices=["fast", "hf"],
                    help="fast: fastllama.py (falls back to hf if it disagrees with transformers); hf: transformers generate")
    ap.add_argument("--gen-batch", type=int, help="rows per generation batch (default: 2048 fast, 512 hf, 8 on cpu)")
    ap.add_argument("--gen-minutes", type=float, default=2.5, help="generation stops starting batches after this")
    ap.add_argument("--turn-share", type=float, default=0.15, help="share of --gen-minutes for writing chat user turns")
    ap.add_argument("--save-data", help="write the prompts and answers to this JSON file")
    ap.add_argument("--data", nargs="+", help="read prompts and answers from --save-data files instead of generating "
                    "them: the first gives the validation and test prompts, the others add training answers only "
                    "(those to held-out prompts and repeated answers are left out)")
    ap.add_argument("--seen-data", nargs="+", default=[], help="with generation: prompts answered in these --save-data "
                    "files count as seen, so they are answered again by sampling (a new answer) instead of greedily")
    ap.add_argument("--data-only", action="store_true", help="stop after generating (with --save-data)")
    ap.add_argument("--relabel", default="all", choices=["all", "missing", "off"],
                    help="with --data: label the training answers (all, or those of files written before the argmax "
                         "was recorded) with the float32 target's argmax, in one teacher-forced pass (relabel)")
    ap.add_argument("--features", default="tf32", choices=["float32", "tf32", "bfloat16"],
                    help="precision of the target's forward that gives the drafter's features (on the CPU always float32)")
    # drafter
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--target-layers", type=int, default=5, help="how many target layers feed the drafter")
    ap.add_argument("--block-sizes", default="8,16", help="block sizes to train on, in turn; config gets the largest")
    ap.add_argument("--mask-token", default="<empty_output>", help="a token (or id) the target never reads")
    # training
    ap.add_argument("--optimizer", default="adamw", help="adamw, muon, or a comma list to train each on the same data "
                    "(the first is exported)")
    ap.add_argument("--steps", type=int, help="training steps (default: as many as --train-minutes allows)")
    ap.add_argument("--train-minutes", type=float, default=4.5, help="per optimizer (cut to fit --budget-minutes); with "
                    "--checkpoint, the length of the whole learning-rate schedule, which may span several calls")
    ap.add_argument("--init", help="start from this exported drafter (config.json + safetensors of the same shape; "
                    "a fresh optimizer and schedule: a lower --adam-lr suits continued training)")
    ap.add_argument("--checkpoint", help="training state file: a call that runs out of --budget-minutes before the "
                    "schedule ends saves it here (and still exports the best state so far); a call that finds it "
                    "resumes from it (same data, one optimizer)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--block-tokens", type=int, default=1024, help="block positions per sequence per step (at most "
                    "the batch's longest answer)")
    ap.add_argument("--length-window", type=int, default=64, help="batches are drawn from windows of this many "
                    "batches sorted by length (1: random batches, padded to their longest sequence)")
    ap.add_argument("--feature-store-gb", type=float, help="GPU memory for the target's features of the training "
                    "sequences, kept after their first pass (default: all free memory but --reserve-gb; 0: none)")
    ap.add_argument("--reserve-gb", type=float, default=40, help="GPU memory left for training by the feature store")
    ap.add_argument("--cross-entropy", choices=["float32", "bfloat16", "fused"],
                    help="how the loss reads the LM head's logits: a float32 copy, as they are, or the float32 one "
                    "compiled (cross_entropy_fn; default: fused on a GPU, float32 on a CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="torch.compile the drafter's layers, dynamic shapes (default: on a GPU)")
    ap.add_argument("--lr", type=float, default=0.02, help="Muon's")
    ap.add_argument("--adam-lr", type=float, default=1e-3, help="AdamW's (all parameters with --optimizer adamw, "
                    "the norm gains with muon)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay on matrices")
    ap.add_argument("--warmup", type=float, default=0.03, help="share of the training time of linear warm-up")
    ap.add_argument("--val-every", type=float, default=10.0, help="seconds between validations (0: every step)")
    ap.add_argument("--export-every", type=float, default=60.0, help="seconds: a new best state is also exported to "
                    "--out during training when the last such export is older (a run whose machine goes back "
                    "before it ends keeps it; 0: only at the end)")
    ap.add_argument("--patience", type=int, default=18, help="stop after this many validations without a new best (0: never)")
    ap.add_argument("--eval-max-new-tokens", type=int, help="default: --max-new-tokens")
    ap.add_argument("--eval-minutes", type=float, default=0.5, help="real speculative decoding of the test prompts, "
                    "per optimizer; prompts not started by then are skipped (the replay covers all of them)")
    ap.add_argument("--save-all", action="store_true", help="also export the drafters of the 2nd, 3rd... optimizer "
                    "(into OUT/NAME; the device tool returns at most 8 files)")
    args = ap.parse_args()
    parse_shares(args.shares)  # refused here, before the target loads
    if args.data_only and not args.save_data:
        ap.error("--data-only needs --save-data")
    if not args.data_only and not args.out:
        ap.error("--out is required (except with --data-only)")
    if args.checkpoint and ("," in args.optimizer or args.steps):
        ap.error("--checkpoint takes one optimizer and a timed schedule (no --steps)")
    # On a GPU both measured faster (bench_step.py, H200, 2026-11-28: with sorted batches and the
    # feature store, a step 54.4 -> 35.5 ms); on a CPU compiling costs more than it saves in a smoke run.
    gpu = args.device.startswith("cuda")
    args.cross_entropy = args.cross_entropy or ("fused" if gpu else "float32")
    args.compile = gpu if args.compile is None else args.compile
    return args


# ----------------------------------------------------------------------------------------------
# the target: decoding and features

@contextlib.contextmanager
def matmul_tf32(on):
    """CUDA float32 products on the tensor cores in TF32 (`on`) or in full float32, restored after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class Target:
    """The target's batched decoder and feature pass: fastllama.py where it agrees with
    transformers on a few prompts, transformers otherwise."""

    def __init__(self, model, args, device, check_prompts):
        self.model, self.args, self.device = model, args, device
        self.fast = self.exact = None
        self.layer_ids = None
        if args.gen_engine == "fast":
            try:
                gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                exact = FastLlama(model, torch.float32)
                diff, agree = check_against(exact, model, check_prompts)
                log(f"fastllama float32 against transformers: max |logit difference| {diff:.2e} of the logits' spread, "
                    f"argmax agrees on {agree:.0%} of {len(check_prompts)} prompts")
                fast = exact if gen_dtype == torch.float32 else FastLlama(model, gen_dtype)
                if fast is not exact:
                    d2, a2 = check_against(fast, model, check_prompts)
                    log(f"fastllama {gen_dtype} against transformers float32: {d2:.2e}, argmax agrees on {a2:.0%}")
                    diff, agree = max(diff, d2 / 4), min(agree, a2)
                if diff < 0.25 and agree >= 0.75:
                    self.fast, self.exact = fast, exact
                else:
                    log("fastllama disagrees with transformers: falling back to transformers generate")
            except Unsupported as e:
                log(f"fastllama does not cover this target ({e}): transformers generate")
        self.batch = args.gen_batch or (8 if device.type == "cpu" else 2048 if self.fast else 512)

    def generate(self, prompts, max_new_tokens, temperatures, top_p=1.0, deadline=None, label="", exact=False,
                 with_argmax=False):
        """Continuations of `prompts`; `with_argmax`: also the target's argmax at each of their
        positions (fastllama only; transformers gives None for each)."""
        if self.fast:
            engine = self.exact if exact else self.fast
            g = torch.Generator(device=self.device).manual_seed(self.args.seed + len(prompts))
            return engine.generate(prompts, max_new_tokens, self.batch, self.stop_id, temperatures, top_p, deadline,
                                   label, g, with_argmax)
        # transformers takes one temperature per call: greedy rows, then sampled ones, sharing the time.
        out = [None] * len(prompts)
        groups = {}
        for i, t in enumerate(temperatures):
            groups.setdefault(t, []).append(i)
        for t, rows in sorted(groups.items()):
            until = None
            if deadline is not None:
                left = sum(len(r) for tt, r in groups.items() if tt >= t)
                until = time.time() + (deadline - time.time()) * len(rows) / left
            answers = hf_generate(self.model, [prompts[i] for i in rows], max_new_tokens, min(self.batch, 512), self.stop_id,
                                  temperature=t, top_p=top_p, deadline=until, label=f"{label} (t={t})")
            for i, a in zip(rows, answers):
                out[i] = a
        return (out, [None] * len(out)) if with_argmax else out

    def features(self, sequences, precision=None):
        """Right-padded features [b, width, len(layer_ids) * hidden] (bf16 on the GPU) of token id
        lists, computed at `precision` (default --features)."""
        precision = precision or self.args.features
        width = max(len(s) for s in sequences)
        store = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.fast:
            ids = torch.zeros((len(sequences), width), dtype=torch.long)
            for r, s in enumerate(sequences):
                ids[r, :len(s)] = torch.tensor(s)
            ids = ids.to(self.device)
            if precision == "bfloat16" and self.device.type == "cuda":
                return self.fast.features(ids, self.layer_ids).to(store)
            with matmul_tf32(precision == "tf32" and self.device.type == "cuda"):
                return self.exact.features(ids, self.layer_ids).to(store)
        rows = target_features(self.model, sequences, self.layer_ids, 1 << 30, self.device, store)
        out = torch.zeros((len(sequences), width, rows[0].shape[-1]), dtype=store, device=self.device)
        for r, f in enumerate(rows):
            out[r, :len(f)] = f
        return out


# ----------------------------------------------------------------------------------------------
# data

def parse_shares(text):
    """{"coding": w, "math": w, "chat": w} from "coding=2,math=1,chat=1" (a scenario left out: 0)."""
    shares = dict.fromkeys(SCENARIOS, 0.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if name.strip() not in shares or weight is None or not math.isfinite(weight):
            raise SystemExit(f"--shares: '{item}' is not SCENARIO=WEIGHT with a scenario of {', '.join(SCENARIOS)}")
        shares[name.strip()] = weight
    if any(w < 0 for w in shares.values()) or sum(shares.values()) <= 0:
        raise SystemExit(f"--shares: weights must be >= 0 and not all 0, got '{text}'")
    return shares


def make_data(args, target, tokenizer, rng):
    """Training, validation and test prompts with the target's answers: lists of dicts with
    scenario, prompt, split, prompt_ids, answer, tokens and prompt_len."""
    t0 = time.time()
    deadline = t0 + args.gen_minutes * 60
    shares = parse_shares(args.shares)
    count = {sc: max(1, int(args.prompts * w / sum(shares.values()))) if w > 0 else 0 for sc, w in shares.items()}
    n_val = args.val_prompts if args.val_prompts is not None else max(1, min(32, args.prompts // 24))
    n_test = args.eval_prompts if args.eval_prompts is not None else max(1, min(16, args.prompts // 24))
    train = build_prompts(rng, {"coding": count["coding"], "math": count["math"]}, 0.1, held=False)
    held = build_prompts(random.Random(args.seed + 1), {"coding": n_val + n_test, "math": n_val + n_test}, 0.1, held=True)
    turns = sample_user_turns(lambda *a: target.generate(*a), tokenizer, rng, int((count["chat"] + n_val + n_test) * 1.3) + 8,
                              target.stop_id, t0 + args.gen_minutes * 60 * args.turn_share)
    log(f"the target wrote {len(turns)} distinct user turns, e.g. {turns[:3]}")
    held += [("chat", t) for t in turns[:n_val + n_test]]
    train += [("chat", t) for t in turns[n_val + n_test:n_val + n_test + count["chat"]]]
    rng.shuffle(train)

    examples = []
    for s in SCENARIOS:  # the first n_test of a scenario are the test set, the rest validation
        mine = [p for sc, p in held if sc == s]
        examples += [dict(scenario=s, prompt=p, split="test" if i < n_test else "val") for i, p in enumerate(mine)]
    seen = set()
    for path in args.seen_data:
        seen.update(e["prompt"] for e in json.load(open(path)) if e["split"] == "train")
    if args.seen_data:
        log(f"{len(seen)} prompts already answered in {', '.join(args.seen_data)}: answered again by sampling")
    for s, p in train:
        # A repeated prompt (coding has about 45k distinct ones) is answered by sampling, so that
        # the answer differs.
        sampled = rng.random() < args.sampled_fraction or p in seen
        seen.add(p)
        examples.append(dict(scenario=s, prompt=p, split="train", temperature=1.0 if sampled else 0.0))
    for e in examples:
        e["prompt_ids"] = chat_ids(tokenizer, e["prompt"])
    held_ex = [e for e in examples if e["split"] != "train"]
    # Held-out answers: greedy, from the float32 target, as evaluate.py and Fulgur's CPU executor decode.
    answers = target.generate([e["prompt_ids"] for e in held_ex], args.max_new_tokens, [0.0] * len(held_ex),
                              label="held-out answers", exact=True)
    for e, a in zip(held_ex, answers):
        e["answer"] = a
    train_ex = [e for e in examples if e["split"] == "train"]
    answers, argmaxes = target.generate([e["prompt_ids"] for e in train_ex], args.max_new_tokens,
                                        [e["temperature"] for e in train_ex], deadline=deadline, label="training answers",
                                        with_argmax=True)
    for e, a, m in zip(train_ex, answers, argmaxes):
        e["answer"] = a
        if m is not None and m != a:  # a sampled answer: the labels greedy verification checks (block_labels)
            e["argmax"] = m
    examples = [e for e in examples if e.get("answer") is not None and len(e["answer"]) >= 2]
    for e in examples:
        e["tokens"] = e["prompt_ids"] + e["answer"]
        e["prompt_len"] = len(e["prompt_ids"])
    log(f"generation took {time.time() - t0:.0f} s")
    return examples


def read_data(paths):
    """The examples of --save-data files: all of the first file's, and the training answers of the
    others that answer no held-out prompt of the first and repeat no earlier (prompt, answer)."""
    examples = json.load(open(paths[0]))
    log(f"read {len(examples)} prompts and answers from {paths[0]}")
    held = {e["prompt"] for e in examples if e["split"] != "train"}
    known = {(e["prompt"], tuple(e["answer"])) for e in examples}
    for path in paths[1:]:
        more = [e for e in json.load(open(path)) if e["split"] == "train"]
        kept = [e for e in more if e["prompt"] not in held and (e["prompt"], tuple(e["answer"])) not in known]
        known.update((e["prompt"], tuple(e["answer"])) for e in kept)
        examples += kept
        log(f"read {len(kept)} more training answers from {path} (left out: {len(more) - len(kept)} to held-out "
            f"prompts or repeated)")
    for e in examples:
        e["tokens"] = e["prompt_ids"] + e["answer"]
        e["prompt_len"] = len(e["prompt_ids"])
    return examples


def relabel(examples, engine, device, which="all", max_tokens=32768):
    """Labels training answers with the target's argmax at each answer position, from one
    teacher-forced pass of `engine` (a FastLlama; the float32 one, as the held-out answers are
    made), as many sequences of similar length a batch as make `max_tokens` positions.
    `which`: "all" the training answers, or "missing" those of data files written before the
    generator recorded the argmax (no "temperature" key; a quarter of those answers were
    sampled, and their own tokens were their labels). An answer keeps an argmax only where it
    differs from the answer, as generation does, and loses one it had where it does not.
    Generation decodes in bf16 on a GPU, so even its greedy answers leave the float32 argmax
    here and there (at 0.4-6% of the positions of 24 of 48 answers checked on a CPU, 15 more
    being sampled ones; recipes/dflash/README.md). Returns how many answers were relabelled, how many of them
    differ from their argmax, and in how many positions."""
    todo = [e for e in examples if e["split"] == "train" and (which == "all" or ("temperature" not in e and "argmax" not in e))]
    todo.sort(key=lambda e: len(e["tokens"]))
    changed = positions = 0
    at = 0
    while at < len(todo):
        end = at + 1  # sorted by length: the batch's width is its last sequence's
        while end < len(todo) and (end + 1 - at) * len(todo[end]["tokens"]) <= max_tokens:
            end += 1
        part = todo[at:end]
        width = len(part[-1]["tokens"])
        ids = torch.zeros((len(part), width), dtype=torch.long)
        for r, e in enumerate(part):
            ids[r, :len(e["tokens"])] = torch.tensor(e["tokens"])
        best = engine.argmax_all(ids.to(device)).cpu()
        for r, e in enumerate(part):
            p, n = e["prompt_len"], len(e["tokens"])
            m = best[r, p - 1:n - 1].tolist()  # the choices for answer positions p .. n-1
            e.pop("argmax", None)
            if m != e["answer"]:
                e["argmax"] = m
                changed += 1
                positions += sum(a != b for a, b in zip(m, e["answer"]))
        at += len(part)
    return len(todo), changed, positions


# ----------------------------------------------------------------------------------------------
# training

def padded_tokens(picked, mask_id, device):
    """Right-padded tokens [b, width], lengths [b], and the greedy labels [b, width] (None when no
    answer carries an argmax): the target's argmax at each answer position of an answer that
    carries one (sampled, or relabelled), the tokens themselves elsewhere."""
    width = max(len(e["tokens"]) for e in picked)
    tokens = torch.full((len(picked), width), mask_id, dtype=torch.long)
    for r, e in enumerate(picked):
        tokens[r, :len(e["tokens"])] = torch.tensor(e["tokens"])
    greedy = None
    if any("argmax" in e for e in picked):
        greedy = tokens.clone()
        for r, e in enumerate(picked):
            if "argmax" in e:
                greedy[r, e["prompt_len"]:len(e["tokens"])] = torch.tensor(e["argmax"])
        greedy = greedy.to(device)
    return tokens.to(device), torch.tensor([len(e["tokens"]) for e in picked], device=device), greedy


class Batches:
    """Training batches of `batch` sequences of similar length, drawn without replacement: each
    epoch shuffles the examples, sorts windows of `batch * window` of them by length, cuts those
    into batches and shuffles the batches. Padding (in the target's feature pass, the drafter's
    context and its attention) is then small, and every example is seen once an epoch; plain
    random batches of 32 are padded to their longest, about 1.5x their mean here.
    `window` 1 gives random batches of unsorted examples."""

    def __init__(self, lengths, batch, generator, window=64):
        self.lengths, self.batch, self.g, self.window = lengths, batch, generator, window
        self.order, self.at = [], 0

    def _epoch(self):
        perm = torch.randperm(len(self.lengths), generator=self.g).tolist()
        span = self.batch * self.window
        batches = []
        for w in range(0, len(perm), span):
            part = sorted(perm[w:w + span], key=lambda i: self.lengths[i]) if self.window > 1 else perm[w:w + span]
            batches += [part[s:s + self.batch] for s in range(0, len(part), self.batch)]
        self.order = [batches[i] for i in torch.randperm(len(batches), generator=self.g).tolist()]
        self.at = 0

    def next(self):
        if self.at >= len(self.order):
            self._epoch()
        self.at += 1
        return self.order[self.at - 1]

    def state(self):
        return dict(order=self.order, at=self.at)

    def load(self, state):
        self.order, self.at = state["order"], state["at"]


class FeatureStore:
    """The target's features of the training sequences, computed at their first use and kept on
    the GPU for the later epochs (the values the per-step pass would give again: the same
    precision, stored bf16 as before). Sequences that do not fit in `budget_bytes` are computed
    at every use, as without the store. Padding positions come out as zeros (a fresh pass gives
    the padding tokens' own features); no block ever attends to them."""

    def __init__(self, target, examples, dim, dtype, budget_bytes, device):
        self.target, self.examples, self.device = target, examples, device
        row = dim * torch.finfo(dtype).bits // 8
        self.offset, self.cached, total = {}, set(), 0
        for i, e in enumerate(examples):
            if (total + len(e["tokens"])) * row > budget_bytes:
                break
            self.offset[i] = total
            total += len(e["tokens"])
        self.buffer = torch.empty((total, dim), dtype=dtype, device=device) if total else None
        self.rows = total
        self.bytes = total * row

    def features(self, indices):
        """Right-padded features [len(indices), width, dim] of the examples at `indices`."""
        todo = [r for r, i in enumerate(indices) if i not in self.cached]
        fresh = self.target.features([self.examples[indices[r]]["tokens"] for r in todo]) if todo else None
        if todo:
            self._keep([indices[r] for r in todo], fresh)
            if len(todo) == len(indices):
                return fresh
        width = max(len(self.examples[i]["tokens"]) for i in indices)
        out = torch.zeros((len(indices), width, self.buffer.shape[1]), dtype=self.buffer.dtype, device=self.device)
        rows, cols, src, skip = [], [], [], set(todo)
        for r, i in enumerate(indices):
            if r not in skip:
                n = len(self.examples[i]["tokens"])
                rows.append(torch.full((n,), r, dtype=torch.long))
                cols.append(torch.arange(n))
                src.append(torch.arange(self.offset[i], self.offset[i] + n))
        rows, cols, src = (torch.cat(x).to(self.device) for x in (rows, cols, src))
        out[rows, cols] = self.buffer[src]
        if todo:
            out[todo, :fresh.shape[1]] = fresh
        return out

    def _keep(self, indices, features):
        for r, i in enumerate(indices):
            if i in self.offset and i not in self.cached:
                n = len(self.examples[i]["tokens"])
                self.buffer[self.offset[i]:self.offset[i] + n] = features[r, :n]
                self.cached.add(i)


def anchors_per_sequence(picked, block, block_tokens):
    """Blocks per sequence in a step: `block_tokens // block`, but no more than the longest answer
    of the batch has anchors (more would be dropped blocks that cost a full forward and backward)."""
    most = max(len(e["tokens"]) - 1 - e["prompt_len"] for e in picked)
    return max(1, min(block_tokens // block, most))


def random_anchors(picked, anchors_per_seq, generator, device):
    """`anchors_per_seq` random anchors per sequence inside its answer (dropped ones flagged in `keep`)."""
    anchors = torch.zeros((len(picked), anchors_per_seq), dtype=torch.long)
    keep = torch.zeros((len(picked), anchors_per_seq), dtype=torch.bool)
    for r, e in enumerate(picked):
        candidates = torch.arange(e["prompt_len"], len(e["tokens"]) - 1)  # an anchor needs at least one token after it
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:anchors_per_seq]].sort().values
        anchors[r, :len(chosen)] = chosen
        keep[r, :len(chosen)] = True
    return anchors.to(device), keep.to(device)


def all_anchors(picked, device):
    """Every answer position of each sequence as an anchor (for the replay)."""
    counts = [len(e["tokens"]) - 1 - e["prompt_len"] for e in picked]
    anchors = torch.zeros((len(picked), max(counts)), dtype=torch.long)
    keep = torch.zeros_like(anchors, dtype=torch.bool)
    for r, (e, n) in enumerate(zip(picked, counts)):
        anchors[r, :n] = torch.arange(e["prompt_len"], e["prompt_len"] + n)
        keep[r, :n] = True
    return anchors.to(device), keep.to(device)


def draft_hidden(drafter, embed, tokens, features, anchors, keep, block, mask_id):
    """The drafter's final hidden states [b, anchors, block, hidden] for blocks at `anchors`."""
    b, n = anchors.shape
    block_ids = torch.full((b, n, block), mask_id, dtype=torch.long, device=tokens.device)
    block_ids[:, :, 0] = tokens.gather(1, anchors)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(b, -1)
    context = drafter.context(features, positions)
    hidden = drafter(embed(block_ids.view(b, n * block)), training_positions(anchors, block), context,
                     training_mask(anchors, keep, tokens.shape[1], block))
    return hidden.view(b, n, block, -1)


def block_labels(tokens, lengths, anchors, keep, block, greedy=None):
    """Labels [b, anchors, block] of the blocks at `anchors` and which of them count. With `greedy`
    (padded_tokens'), a block position is labelled with the target's argmax, and counts only
    while the block's earlier positions hold the target's argmax too: what greedy verification
    accepts after the anchor is the target's greedy continuation, which a sampled answer
    follows only until it first samples another token."""
    b, n = anchors.shape
    label_at = anchors[:, :, None] + torch.arange(block, device=tokens.device)
    valid = keep[:, :, None] & (label_at < lengths[:, None, None])
    at = label_at.clamp(max=tokens.shape[1] - 1).view(b, -1)
    labels = tokens.gather(1, at).view(b, n, block)
    if greedy is not None:
        best = greedy.gather(1, at).view(b, n, block)
        on_path = (labels == best)[:, :, 1:-1].int()  # positions 1 .. block-2 as the context of the next
        valid[:, :, 2:] &= torch.cumprod(on_path, -1).bool()
        labels = best
    return labels, valid


def float_cross_entropy(logits, labels):
    return F.cross_entropy(logits.float(), labels, reduction="none")


@functools.cache
def fused_cross_entropy():
    return torch.compile(float_cross_entropy, dynamic=True)


def cross_entropy_fn(kind):
    """Per-row cross-entropy of the LM head's logits (bf16 on the GPU, 28k rows x 49k a step here):
    float32: through a float32 copy (4 more bytes a logit written and read, and the log-softmax
    kept in float32 for the backward); bfloat16: on the bf16 logits as they are (the log-softmax
    computed in float32 but stored bf16); fused: the float32 one through torch.compile, which reads
    the bf16 logits in its own reduction kernels instead of copying them."""
    if kind == "float32":
        return float_cross_entropy
    if kind == "bfloat16":
        return lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")
    if kind == "fused":
        return fused_cross_entropy()
    raise ValueError(f"cross-entropy '{kind}': float32, bfloat16 or fused")


def block_loss(drafter, lm_head, embed, batch, block, mask_id, cross_entropy="float32"):
    """Weighted cross-entropy over the masked block positions, and per position whether the
    drafter's argmax was right (for the running acceptance estimate); `cross_entropy` as
    cross_entropy_fn takes it."""
    tokens, lengths, features, anchors, keep, greedy = batch
    hidden = draft_hidden(drafter, embed, tokens, features, anchors, keep, block, mask_id)
    labels, valid = block_labels(tokens, lengths, anchors, keep, block, greedy)
    weights = loss_weights(block, gamma_for(block), tokens.device)[None, None, :] * valid
    chosen = weights > 0
    logits = hidden[chosen].to(lm_head.dtype) @ lm_head.T
    ce = cross_entropy_fn(cross_entropy)(logits, labels[chosen])
    loss = (ce * weights[chosen]).sum() / weights[chosen].sum()
    correct = torch.zeros_like(valid)
    correct[chosen] = logits.argmax(-1) == labels[chosen]
    return loss, correct, valid


def acceptance_estimate(correct, valid, keep):
    """Mean tokens per round over random anchors if each kept block were verified (the
    training batch's running number; uniform anchors read higher than decoding does)."""
    leading = torch.cumprod((correct | ~valid)[:, :, 1:].int(), -1) * valid[:, :, 1:]
    return (1 + leading.sum(-1)).float()[keep].mean().item()


@torch.no_grad()
def replay(drafter, lm_head, embed, examples, block, mask_id, autocast, chunk_rows=16384):
    """Greedy speculative decoding replayed over the examples' greedy answers: the drafter
    drafts a block at every answer position at once (teacher-forced: it sees the target's
    features before the anchor, as in decoding), then each answer is walked the way decoding
    goes: at anchor a, k leading right guesses emit k + 1 tokens and the next anchor is
    a + k + 1. What evaluate.py measures at temperature 0, up to floating-point ties, without
    running the target. Returns {scenario: {"tokens", "rounds", "mean"}} and per-example means."""
    by, per_example = {}, []
    for start in range(0, len(examples), 4):
        picked = examples[start:start + 4]
        width = max(len(e["tokens"]) for e in picked)
        tokens = torch.full((len(picked), width), mask_id, dtype=torch.long, device=lm_head.device)
        features = torch.zeros((len(picked), width, picked[0]["_features"].shape[-1]), dtype=picked[0]["_features"].dtype,
                               device=lm_head.device)
        for r, e in enumerate(picked):
            tokens[r, :len(e["tokens"])] = e["_tokens"]
            features[r, :len(e["tokens"])] = e["_features"]
        lengths = torch.tensor([len(e["tokens"]) for e in picked], device=lm_head.device)
        anchors, keep = all_anchors(picked, lm_head.device)
        with autocast:
            hidden = draft_hidden(drafter, embed, tokens, features, anchors, keep, block, mask_id)
        labels, valid = block_labels(tokens, lengths, anchors, keep, block)
        valid[:, :, 0] = False
        correct = torch.zeros_like(valid)
        flat_h, flat_l, idx = hidden[valid], labels[valid], valid.nonzero(as_tuple=True)
        guesses = torch.cat([(flat_h[i:i + chunk_rows].to(lm_head.dtype) @ lm_head.T).argmax(-1)
                             for i in range(0, len(flat_h), chunk_rows)]) if len(flat_h) else flat_l
        correct[idx] = guesses == flat_l
        leading = (torch.cumprod((correct | ~valid)[:, :, 1:].int(), -1) * valid[:, :, 1:]).sum(-1).tolist()
        for r, e in enumerate(picked):
            a, last, rounds, emitted = 0, len(e["tokens"]) - 1 - e["prompt_len"], 0, 0
            while a < last:  # a indexes the anchors: answer positions prompt_len + a
                k = leading[r][a]
                emitted += k + 1
                rounds += 1
                a += k + 1
            s = by.setdefault(e["scenario"], {"tokens": 0, "rounds": 0})
            s["tokens"] += emitted
            s["rounds"] += rounds
            per_example.append(emitted / max(1, rounds))
    for s in by.values():
        s["mean"] = round(s["tokens"] / max(1, s["rounds"]), 3)
    return by, per_example


def replay_all(drafter, lm_head, embed, examples, blocks, mask_id, autocast):
    """{block: {scenario: mean}} and the selection score: the mean over blocks and scenarios."""
    was = drafter.training
    drafter.eval()
    out = {b: {s: v["mean"] for s, v in sorted(replay(drafter, lm_head, embed, examples, b, mask_id, autocast)[0].items())}
           for b in blocks}
    drafter.train(was)
    score = sum(sum(v.values()) / len(v) for v in out.values()) / len(out)
    return out, round(score, 4)


def optimizers(drafter, name, args):
    matrices = [p for p in drafter.parameters() if p.dim() == 2]
    vectors = [p for p in drafter.parameters() if p.dim() != 2]
    if name == "adamw":
        return [torch.optim.AdamW([dict(params=matrices, weight_decay=args.weight_decay),
                                   dict(params=vectors, weight_decay=0.0)], lr=args.adam_lr, betas=(0.9, 0.95))]
    if name != "muon":
        raise SystemExit(f"unknown optimizer '{name}' (muon or adamw)")
    return [Muon(matrices, lr=args.lr), torch.optim.AdamW(vectors, lr=args.adam_lr, betas=(0.9, 0.95), weight_decay=0)]


def schedule(progress, warmup):
    """Learning-rate factor: linear warm-up, then cosine to zero."""
    return min(1.0, progress / max(warmup, 1e-9)) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def no_mark(phases, name):
    """A phase clock that keeps no time (phase_clock's when it is off)."""


def make_batch(examples, indices, block, block_tokens, store, mask_id, generator, device, mark=no_mark, phases=None):
    """A training batch (tokens, lengths, features, anchors, keep, greedy) of the examples at `indices`."""
    picked = [examples[i] for i in indices]
    tokens, lengths, greedy = padded_tokens(picked, mask_id, device)
    anchors, keep = random_anchors(picked, anchors_per_sequence(picked, block, block_tokens), generator, device)
    mark(phases, "batch")
    features = store.features(indices)
    mark(phases, "features")
    return tokens, lengths, features, anchors, keep, greedy


def training_step(drafter, opts, lm_head, embed, batch, block, mask_id, autocast, mark=no_mark, phases=None,
                  cross_entropy="float32"):
    """One optimizer step on `batch`: the loss, and per block position whether the drafter was right and counted."""
    with autocast:
        loss, correct, valid = block_loss(drafter, lm_head, embed, batch, block, mask_id, cross_entropy)
    mark(phases, "forward")
    loss.backward()
    mark(phases, "backward")
    torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    mark(phases, "optimizer")
    return loss, correct, valid


def feature_store(target, examples, config, args, device):
    """The FeatureStore of a run: on a GPU, as much of the training set as fits in the memory left
    after `--reserve-gb` for training (or `--feature-store-gb`); on a CPU, none."""
    dim = len(config.target_layer_ids) * config.hidden_size
    if device.type != "cuda":
        budget = 0
    elif args.feature_store_gb is not None:
        budget = args.feature_store_gb * 2**30
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(0, free - args.reserve_gb * 2**30)
    store = FeatureStore(target, examples, dim, torch.bfloat16 if device.type == "cuda" else torch.float32, budget, device)
    total = sum(len(e["tokens"]) for e in examples)
    log(f"feature store: {store.rows} of {total} training tokens ({store.bytes / 2**30:.1f} GiB) are kept after their "
        f"first pass; the rest are computed at every use")
    return store


def train(name, config, target, examples, val, lm_head, embed, args, device, seconds, store, schedule_seconds=None,
          resume=None, export_to=None):
    """Trains for `seconds` (or --steps) of a learning-rate schedule `schedule_seconds` long
    (default `seconds`), from scratch or from a `resume` checkpoint (a dict saved by an earlier
    call). A new best state is exported to `export_to` (a folder) every --export-every seconds at
    most. Returns the drafter at its best validated state, the history, the best's summary,
    the autocast context, and the checkpoint to save if the schedule did not finish."""
    torch.manual_seed(args.seed)
    drafter = init_weights(DFlashDrafter(config)).to(device).train()
    opts = optimizers(drafter, name, args)
    base = [[grp["lr"] for grp in o.param_groups] for o in opts]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(args.seed)
    batches = Batches([len(e["tokens"]) for e in examples], args.batch, g, args.length_window)
    if args.compile:
        for layer in drafter.layers:
            layer.compile(dynamic=True)
    schedule_seconds = schedule_seconds or seconds
    history, step, trained_before = [], 0, 0.0
    best = dict(score=-1.0)
    since_best, seen = 0, 0
    if args.init and not resume:
        start = DrafterConfig.read(os.path.join(args.init, "config.json"))
        differ = [k for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                              "intermediate_size", "vocab_size", "mask_token_id", "target_layer_ids")
                  if getattr(start, k) != getattr(config, k)]
        if start.num_hidden_layers > config.num_hidden_layers:
            differ.append("num_hidden_layers")
        if differ:
            raise SystemExit(f"--init {args.init}: its " + ", ".join(f"{k} {getattr(start, k)}" for k in differ)
                             + " differ from this run's (" + ", ".join(f"{getattr(config, k)}" for k in differ) + ")")
        grow_from(drafter, DFlashDrafter.load(args.init))
        added = config.num_hidden_layers - start.num_hidden_layers
        log(f"[{name}] starting from the drafter in {args.init}"
            + (f", with {added} new last layer(s) that start as the identity" if added else ""))
    if resume:
        drafter.load_state_dict(resume["drafter"])
        for o, state in zip(opts, resume["optimizers"]):
            o.load_state_dict(state)
        g.set_state(resume["generator"])
        if "batches" in resume:  # saved before batches were sorted by length: they start afresh
            batches.load(resume["batches"])
        history, step, trained_before = resume["history"], resume["step"], resume["trained_seconds"]
        best, since_best, seen = resume["best"], resume["since_best"], resume["seen"]
        log(f"[{name}] resumed at step {step}, {trained_before:.0f} of {schedule_seconds:.0f} s of the schedule, "
            f"best validation so far {best['score']} at step {best.get('step')}")
    log(f"[{name}] drafter: {config.num_hidden_layers} layers, {parameter_count(drafter) / 1e6:.2f} M parameters, "
        f"blocks {blocks}, {len(examples)} training sequences, {len(val)} validation, "
        f"{'%d steps' % args.steps if args.steps else '%.0f s in this call' % seconds}")
    # A resumed state was validated when saved: the next check comes after a step of this call.
    t0, last_val, first_step = time.time(), (trained_before if resume else None), step
    last_export = time.time()
    # Timings once warm (the first ~150 steps run slower while the allocator grows): phases
    # synchronized over 20 steps, then torch.profiler's table of 5 steps.
    phases, profiled = {}, range(step + 200, step + 220) if device.type == "cuda" else range(0)
    profiler, kernel_steps = None, range(step + 230, step + 235) if device.type == "cuda" else range(0)
    while True:
        now = time.time() - t0
        progress = step / args.steps if args.steps else (trained_before + now) / schedule_seconds
        finished = progress >= 1 or (not args.steps and now >= seconds)
        now += trained_before
        if step > first_step and (finished or last_val is None or now - last_val >= args.val_every):
            last_val = now
            acc, score = replay_all(drafter, lm_head, embed, val, blocks, config.mask_token_id, autocast)
            first = correct[:, :, 1][valid[:, :, 1]].float().mean().item()
            entry = dict(step=step, seconds=round(now, 1), epochs=round(seen / max(1, len(examples)), 2),
                         loss=round(loss.item(), 4), first_token_accuracy=round(first, 3),
                         train_acceptance=round(acceptance_estimate(correct, valid, batch[4]), 3),
                         val_acceptance=acc, val_score=score)
            if score > best["score"]:
                best = dict(score=score, step=step, seconds=round(now, 1), acceptance=acc,
                            state={k: v.detach().clone() for k, v in drafter.state_dict().items()})
                since_best = 0
                if export_to and args.export_every and time.time() - last_export >= args.export_every:
                    drafter.save(export_to)  # the live weights are the best state now
                    last_export = time.time()
                    log(f"[{name}] exported this best state to {export_to} (step {step})")
            else:
                since_best += 1
            history.append(entry)
            log(f"[{name}] " + ", ".join(f"{k} {v}" for k, v in entry.items()) + (" (best)" if since_best == 0 else ""))
            if args.patience and since_best >= args.patience:
                log(f"[{name}] no better validation in {args.patience} checks: stopping early")
                break
        if finished:
            break
        for o, lrs in zip(opts, base):
            for grp, lr in zip(o.param_groups, lrs):
                grp["lr"] = lr * schedule(progress, args.warmup)
        block = blocks[step % len(blocks)]
        mark = phase_clock(step in profiled)
        if kernel_steps and step == kernel_steps.start:
            profiler = start_profiler()
        indices = batches.next()
        seen += len(indices)
        batch = make_batch(examples, indices, block, args.block_tokens, store, config.mask_token_id, g, device, mark, phases)
        loss, correct, valid = training_step(drafter, opts, lm_head, embed, batch, block, config.mask_token_id, autocast,
                                             mark, phases, args.cross_entropy)
        step += 1
        if phases and step == profiled.stop:
            log(f"[{name}] a step's phases (mean of {len(profiled)} steps, synchronized): "
                + ", ".join(f"{k} {1000 * v / len(profiled):.1f} ms" for k, v in phases.items()))
        if profiler and step == kernel_steps.stop:
            log(f"[{name}] torch.profiler, steps {kernel_steps.start}-{kernel_steps.stop - 1} (with validation if one fell there):\n"
                + stop_profiler(profiler))
            profiler = None
    if profiler:  # the loop ended inside the profiled steps
        stop_profiler(profiler)
    trained = time.time() - t0
    log(f"[{name}] {step} steps in {trained:.0f} s this call ({seen / max(1, len(examples)):.2f} epochs in all); "
        f"best validation {best['score']} at step {best.get('step')} ({best.get('seconds')} s): {best.get('acceptance')}")
    checkpoint = None
    if not args.steps and trained_before + trained < schedule_seconds:
        # Copies: state_dict() holds the live parameters, which take the best state below.
        checkpoint = dict(drafter={k: v.detach().clone() for k, v in drafter.state_dict().items()}, optimizers=[o.state_dict() for o in opts], generator=g.get_state(),
                          batches=batches.state(),
                          history=history, step=step, trained_seconds=trained_before + trained, best=best,
                          since_best=since_best, seen=seen, schedule_seconds=schedule_seconds)
        if since_best >= args.patience > 0:
            checkpoint = None  # stopped early: nothing left to resume
    drafter.load_state_dict(best["state"])
    summary = {k: v for k, v in best.items() if k != "state"}
    return drafter.eval(), history, summary, autocast, checkpoint


def grow_from(drafter, start):
    """Loads `start`, a drafter with the same shape but maybe fewer layers, into `drafter`: the
    layers it has, then the rest as new last layers whose output projections (attention's o_proj,
    the MLP's down_proj) are zero, so that each adds nothing to the residual stream at first and
    the grown drafter starts out computing what `start` did."""
    missing, unexpected = drafter.load_state_dict(start.state_dict(), strict=False)
    if unexpected:
        raise SystemExit(f"--init: tensors this drafter does not have: {unexpected[:4]}")
    fresh = {int(k.split(".")[1]) for k in missing if k.startswith("layers.")}
    if any(not k.startswith("layers.") for k in missing) or fresh != set(range(len(start.layers), len(drafter.layers))):
        raise SystemExit(f"--init: missing tensors outside the new last layers: {missing[:4]}")
    with torch.no_grad():
        for i in fresh:
            drafter.layers[i].self_attn.o_proj.weight.zero_()
            drafter.layers[i].mlp.down_proj.weight.zero_()


def start_profiler():
    """torch.profiler over CPU and CUDA, started; None if it cannot start (timings are optional)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        p.start()
        return p
    except Exception as e:  # noqa: BLE001
        log(f"torch.profiler did not start: {e}")
        return None


def stop_profiler(p):
    """The profiler's table, operators sorted by their own GPU time (the 30 largest)."""
    try:
        p.stop()
        events = p.key_averages()
        key = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        return events.table(sort_by=key, row_limit=30)
    except Exception as e:  # noqa: BLE001
        return f"(no table: {e})"


def phase_clock(on):
    """A function that adds the seconds since its last call (after a CUDA synchronize) to
    phases[name], when `on`; otherwise it does nothing."""
    if not on:
        return no_mark
    torch.cuda.synchronize()
    last = [time.perf_counter()]

    def mark(phases, name):
        torch.cuda.synchronize()
        t = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + t - last[0]
        last[0] = t
    return mark


# ----------------------------------------------------------------------------------------------

def drafter_config(c, layers, layer_ids, block_size, mask_id, extra=None):
    """The DrafterConfig of a `layers`-layer drafter at the width of a target with transformers
    config `c`, reading the target's layers `layer_ids`."""
    return DrafterConfig(
        hidden_size=c.hidden_size, num_hidden_layers=layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, block_size=block_size, mask_token_id=mask_id,
        target_layer_ids=layer_ids, num_target_layers=c.num_hidden_layers, rms_norm_eps=c.rms_norm_eps,
        rope_theta=(getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        max_position_embeddings=c.max_position_embeddings, extra=extra or {})


def main():
    args = arguments()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        # cuDNN's attention plans every new shape again (30 ms of CPU a call, measured on an H200
        # with bench_step.py): batches sorted by length have many shapes. The other backends do
        # not. Off for every phase since 2026-11-29 (it was off for training only): generation's
        # decode steps read a cache of prompt width + 256 positions, so every batch whose widest
        # prompt is a new width planned all of its step shapes anew (bench_generate.py --sdp).
        torch.backends.cuda.enable_cudnn_sdp(False)
    t_start = time.time()
    end = t_start + args.budget_minutes * 60
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = load_target(args.gguf, device, torch.float32)
    log(f"target: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"vocabulary {model.config.vocab_size}, on {device} ({time.time() - t_start:.0f} s)")
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask_id = int(args.mask_token) if args.mask_token.isdigit() else tokenizer.convert_tokens_to_ids(args.mask_token)
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        raise SystemExit(f"mask token '{args.mask_token}' is not in the target's vocabulary")
    check = [chat_ids(tokenizer, p) for p in ["What is 12 * 7?", "Write a Python function that reverses a string.",
                                              "Explain what a hash map is.", "Tell me a short story about a robot."]]
    target = Target(model, args, device, check)
    target.stop_id = stop_id

    if args.data:
        examples = read_data(args.data)
        if args.relabel != "off" and target.exact:
            t0 = time.time()
            tf32 = args.features == "tf32" and device.type == "cuda"
            with matmul_tf32(tf32):
                count, changed, positions = relabel(examples, target.exact, device, args.relabel)
            log(f"relabel ({args.relabel}, float32{' with tf32' if tf32 else ''}): {count} training answers; {changed} "
                f"of them leave the target's argmax, at {positions} of their answer positions ({time.time() - t0:.0f} s)")
        elif args.relabel != "off":
            log("relabel: skipped (it needs fastllama, which this target does not use); answers keep their labels")
    else:
        examples = make_data(args, target, tokenizer, rng)
    if args.save_data:
        keys = ["scenario", "prompt", "split", "prompt_ids", "answer", "temperature", "argmax"]
        os.makedirs(os.path.dirname(os.path.abspath(args.save_data)), exist_ok=True)
        with open(args.save_data, "w") as f:
            json.dump([{k: e[k] for k in keys if k in e} for e in examples], f)
        log(f"wrote {len(examples)} prompts and answers to {args.save_data}")
    train_ex = [e for e in examples if e["split"] == "train"]
    val = [e for e in examples if e["split"] == "val"]
    test = [e for e in examples if e["split"] == "test"]
    answer_tokens = sum(len(e["answer"]) for e in train_ex)
    counts = {s: sum(e["scenario"] == s for e in train_ex) for s in SCENARIOS}
    log(f"data: {len(train_ex)} training answers ({answer_tokens} tokens; {counts}), {len(val)} validation, "
        f"{len(test)} test ({time.time() - t_start:.0f} s so far)")
    if args.data_only:
        return
    if not train_ex or not val or not test:
        raise SystemExit("no training, validation or test answers: raise --gen-minutes or --prompts")

    n_target = model.config.num_hidden_layers
    layer_ids = spread_layer_ids(n_target, args.target_layers)
    target.layer_ids = layer_ids
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fastllama's float32 passes stay float32 unless --features tf32
    for group in (val, test):  # features of the held-out answers, computed once, float32 like evaluate.py's target
        for start in range(0, len(group), 16):
            part = group[start:start + 16]
            feats = target.features([e["tokens"] for e in part], "float32")
            for e, f in zip(part, feats):
                e["_features"] = f[:len(e["tokens"])].clone()
                e["_tokens"] = torch.tensor(e["tokens"], device=device)

    c = model.config
    blocks = [int(b) for b in args.block_sizes.split(",")]
    config = drafter_config(c, args.layers, layer_ids, max(blocks), mask_id,
                            extra={"bos_token_id": c.bos_token_id, "eos_token_id": stop_id})
    table = model.get_input_embeddings().weight
    lm_head = table.to(torch.bfloat16) if device.type == "cuda" else table
    embed = lambda ids: F.embedding(ids, table)  # noqa: E731

    os.makedirs(args.out, exist_ok=True)
    json.dump([dict(scenario=e["scenario"], prompt=e["prompt"]) for e in test], open(os.path.join(args.out, "eval_prompts.json"), "w"), indent=1)
    report = dict(args=vars(args), target_layer_ids=layer_ids, engine="fastllama" if target.fast else "transformers",
                  training_answers=len(train_ex), answer_tokens=answer_tokens, by_scenario=counts,
                  validation=len(val), test=len(test), runs={})
    names = args.optimizer.split(",")
    store = feature_store(target, train_ex, config, args, device)  # shared by the optimizers' runs
    for i, name in enumerate(names):
        # Leave time for this and the later optimizers' final evaluation (estimated: replay,
        # export, real decoding, 20 s of margin), then share what is left.
        reserve = (len(names) - i) * (args.eval_minutes * 60 + 20)
        seconds = min(args.train_minutes * 60, (end - time.time() - reserve) / (len(names) - i))
        resume, schedule_seconds = None, None
        if args.checkpoint:
            schedule_seconds = args.train_minutes * 60
            if os.path.exists(args.checkpoint):
                resume = torch.load(args.checkpoint, map_location=device, weights_only=False)
                if resume["schedule_seconds"] != schedule_seconds or resume["layers"] != args.layers:
                    raise SystemExit(f"{args.checkpoint} was saved for {resume['schedule_seconds']:.0f} s and "
                                     f"{resume['layers']} layers: pass the same --train-minutes and --layers, or delete it")
            left = schedule_seconds - (resume["trained_seconds"] if resume else 0)
            seconds = min(left, end - time.time() - reserve)
            if seconds < left:  # this call will not finish the schedule: no real decoding at its end
                seconds = min(left, end - time.time() - 45)
        if seconds < 10 and not args.steps:
            log(f"[{name}] only {seconds:.0f} s left for training: lower --gen-minutes or raise --budget-minutes")
            seconds = max(seconds, 10)
        drafter, history, best, autocast, checkpoint = train(name, config, target, train_ex, val, lm_head, embed, args,
                                                             device, seconds, store, schedule_seconds, resume,
                                                             args.out if i == 0 else None)
        if checkpoint and args.checkpoint:
            checkpoint["layers"] = args.layers
            torch.save(checkpoint, args.checkpoint)
            log(f"[{name}] the schedule goes on: training state saved to {args.checkpoint} "
                f"({checkpoint['trained_seconds']:.0f} of {schedule_seconds:.0f} s done); run again with the same arguments")
        elif args.checkpoint and os.path.exists(args.checkpoint):
            os.remove(args.checkpoint)
        directory = args.out if i == 0 else os.path.join(args.out, name) if args.save_all else None
        if directory:
            drafter.save(directory)
            size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
            log(f"[{name}] exported the best state to {directory} ({size / 1e6:.1f} MB of weights)")
        t_rep = time.time()
        test_replay, test_score = replay_all(drafter, lm_head, embed, test, blocks, mask_id, autocast)
        log(f"[{name}] test replay ({len(test)} prompts, {time.time() - t_rep:.0f} s): {test_replay}")
        report["runs"][name] = dict(directory=directory, history=history, best=best, test_replay=test_replay)
        json.dump(report, open(os.path.join(args.out, "report.json"), "w"), indent=1)
        if checkpoint:
            continue  # real decoding when the schedule ends
        acceptance = evaluate(model, tokenizer, drafter.float(), [dict(scenario=e["scenario"], prompt=e["prompt"]) for e in test],
                              blocks, args.eval_max_new_tokens or args.max_new_tokens, {stop_id},
                              deadline=time.time() + args.eval_minutes * 60)
        report["runs"][name]["acceptance"] = acceptance
        json.dump(report, open(os.path.join(args.out, "report.json"), "w"), indent=1)
    log(f"done in {time.time() - t_start:.0f} s; report in {os.path.join(args.out, 'report.json')}")
    for name, run in report["runs"].items():
        for block, by in run["test_replay"].items():
            log(f"  {name}, block {block}, test replay ({len(test)} prompts): " + ", ".join(f"{k} {v:.2f}" for k, v in by.items()))
        for block, by in run.get("acceptance", {}).items():
            log(f"  {name}, block {block}, decoded: " + ", ".join(
                f"{k} {v['mean']:.2f} ({len(v['per_prompt'])} prompts)" for k, v in sorted(by.items())))


if __name__ == "__main__":
    main()

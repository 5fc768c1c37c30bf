"""Trains a DFlash drafter for a target by self-distillation, start to finish in one run:

 1. prompts: coding questions from the Python standard library's docstrings, generated math
    problems, and chat turns the target writes itself (data.py); a held-out set per scenario;
 2. the target answers them (batched generation; mostly greedy, a share sampled), and one more
    forward over prompt + answer gives its hidden states after `target_layer_ids`;
 3. training: blocks start at random anchors inside answers; the anchor token is given and the
    rest of the block is mask tokens; each block sees the target features strictly before its
    anchor and itself; loss = cross-entropy at the masked positions, position k weighted by
    exp(-(k-1)/gamma); Muon for the drafter's matrices and AdamW for its norm gains (or AdamW
    for everything, `--optimizer adamw`; `--optimizer muon,adamw` trains both on the same data);
 4. export in the published drafter format (config.json + bf16 safetensors) that Fulgur loads;
 5. acceptance length on the held-out prompts by scenario at each block size (evaluate.py).

The full run on one H100 (defaults) takes about 8 minutes; a CPU smoke run:

    .venv/bin/python recipes/dflash/train.py --device cpu --prompts 8 --steps 5 --max-new-tokens 48 \
        --batch 4 --block-tokens 128 --out /tmp/dflash-smoke
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import build_prompts, chat_ids, generate, load_target, log, sample_user_turns, target_features  # noqa: E402
from evaluate import evaluate  # noqa: E402
from model import (DFlashDrafter, DrafterConfig, gamma_for, init_weights, loss_weights, parameter_count,  # noqa: E402
                   spread_layer_ids, training_mask, training_positions)
from muon import Muon  # noqa: E402

DEFAULT_GGUF = os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def arguments():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="+", default=[DEFAULT_GGUF], help="the target: a GGUF file, or its parts in order")
    ap.add_argument("--out", required=True, help="output folder: the drafter, eval_prompts.json, report.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default on --device cpu: 1, since "
                    "oversubscribed threads on a shared machine spin: 8x slower here with 2 on 2 busy cores)")
    # data
    ap.add_argument("--prompts", type=int, default=6144, help="training prompts, a third per scenario")
    ap.add_argument("--eval-prompts", type=int, help="held-out prompts per scenario (default: prompts/24, 1 to 10)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--sampled-fraction", type=float, default=0.25, help="share of answers sampled at temperature 1")
    ap.add_argument("--gen-batch", type=int, default=512)
    ap.add_argument("--save-data", help="write the prompts and answers to this JSON file")
    ap.add_argument("--data", help="read prompts and answers from a --save-data file instead of generating them")
    ap.add_argument("--gen-minutes", type=float, default=2.0, help="generation stops starting batches after this")
    # drafter
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--target-layers", type=int, default=5, help="how many target layers feed the drafter")
    ap.add_argument("--block-sizes", default="8,16", help="block sizes to train on, in turn; config gets the largest")
    ap.add_argument("--mask-token", default="<empty_output>", help="a token (or id) the target never reads")
    # training
    ap.add_argument("--optimizer", default="muon", help="muon, adamw, or a comma list to train each on the same data")
    ap.add_argument("--steps", type=int, help="training steps (default: as many as --train-minutes allows)")
    ap.add_argument("--train-minutes", type=float, default=3.0, help="per optimizer")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--block-tokens", type=int, default=1024, help="block positions per sequence per step")
    ap.add_argument("--lr", type=float, default=0.02, help="Muon's")
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--eval-max-new-tokens", type=int, help="default: --max-new-tokens")
    ap.add_argument("--eval-minutes", type=float, default=1.5, help="per optimizer; prompts not started by then are skipped")
    ap.add_argument("--save-all", action="store_true", help="also export the drafters of the 2nd, 3rd... optimizer "
                    "(into OUT/NAME; the device tool returns at most 8 files)")
    return ap.parse_args()


def make_data(args, target, tokenizer, device, stop_id, rng):
    """Training and held-out prompts with the target's answers: lists of dicts with scenario,
    prompt, tokens (prompt + answer) and prompt_len."""
    deadline = time.time() + args.gen_minutes * 60
    third = max(1, args.prompts // 3)
    n_eval = args.eval_prompts if args.eval_prompts is not None else max(1, min(10, args.prompts // 24))
    train = build_prompts(rng, {"coding": third, "math": third}, 0.1, held=False)
    held = build_prompts(random.Random(args.seed + 1), {"coding": n_eval, "math": n_eval}, 0.1, held=True)
    turns = sample_user_turns(target, tokenizer, rng, int((third + n_eval) * 1.5) + 8, stop_id, args.gen_batch, deadline)
    log(f"the target wrote {len(turns)} distinct user turns, e.g. {turns[:3]}")
    held += [("chat", t) for t in turns[:n_eval]]
    train += [("chat", t) for t in turns[n_eval:n_eval + third]]
    rng.shuffle(train)

    examples = [dict(scenario=s, prompt=p, held_out=False) for s, p in train] + \
               [dict(scenario=s, prompt=p, held_out=True) for s, p in held]
    for e in examples:
        e["prompt_ids"] = chat_ids(tokenizer, e["prompt"])
        # Held-out answers are greedy: they also serve the teacher-forced estimate while training.
        e["temperature"] = 1.0 if not e["held_out"] and rng.random() < args.sampled_fraction else 0.0
    # The held-out answers first and whole; the training ones share what is left of the time.
    share = (deadline - time.time()) * (1 - args.sampled_fraction)
    for label, temperature, until, keep in [("held-out answers", 0.0, None, lambda e: e["held_out"]),
                                            ("greedy answers", 0.0, time.time() + share, lambda e: not e["held_out"]),
                                            ("sampled answers", 1.0, deadline, lambda e: True)]:
        group = [e for e in examples if e["temperature"] == temperature and keep(e) and "answer" not in e]
        answers = generate(target, [e["prompt_ids"] for e in group], args.max_new_tokens, args.gen_batch, stop_id,
                           temperature=temperature, deadline=until, label=label)
        for e, a in zip(group, answers):
            e["answer"] = a
    examples = [e for e in examples if e.get("answer") is not None and len(e["answer"]) >= 2]
    for e in examples:
        e["tokens"] = e["prompt_ids"] + e["answer"]
        e["prompt_len"] = len(e["prompt_ids"])
    return [e for e in examples if not e["held_out"]], [e for e in examples if e["held_out"]]


def batch_of(picked, block, anchors_per_seq, mask_id, generator, device):
    """Padded tokens and features of the `picked` examples, and `anchors_per_seq` random
    anchors per sequence inside its answer (dropped ones flagged in `keep`)."""
    count = len(picked)
    width = max(len(e["tokens"]) for e in picked)
    tokens = torch.full((count, width), mask_id, dtype=torch.long, device=device)
    features = torch.zeros((count, width, picked[0]["features"].shape[-1]), dtype=picked[0]["features"].dtype, device=device)
    anchors = torch.zeros((count, anchors_per_seq), dtype=torch.long)
    keep = torch.zeros((count, anchors_per_seq), dtype=torch.bool)
    lengths = torch.tensor([len(e["tokens"]) for e in picked], device=device)
    for r, e in enumerate(picked):
        n = len(e["tokens"])
        tokens[r, :n] = e["token_tensor"]
        features[r, :n] = e["features"]
        candidates = torch.arange(e["prompt_len"], n - 1)  # an anchor needs at least one token after it
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:anchors_per_seq]].sort().values
        anchors[r, :len(chosen)] = chosen
        keep[r, :len(chosen)] = True
    return tokens, features, anchors.to(device), keep.to(device), lengths


def block_loss(drafter, lm_head, embed, batch, block, mask_id):
    """Weighted cross-entropy over the masked block positions, and per position whether the
    drafter's argmax was right (for the running acceptance estimate)."""
    tokens, features, anchors, keep, lengths = batch
    b, n = anchors.shape
    block_ids = torch.full((b, n, block), mask_id, dtype=torch.long, device=tokens.device)
    block_ids[:, :, 0] = tokens.gather(1, anchors)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(b, -1)
    context = drafter.context(features, positions)
    hidden = drafter(embed(block_ids.view(b, n * block)), training_positions(anchors, block), context,
                     training_mask(anchors, keep, tokens.shape[1], block)).view(b, n, block, -1)
    label_at = anchors[:, :, None] + torch.arange(block, device=tokens.device)
    valid = keep[:, :, None] & (label_at < lengths[:, None, None])
    weights = loss_weights(block, gamma_for(block), tokens.device)[None, None, :] * valid
    chosen = weights > 0
    labels = tokens.gather(1, label_at.clamp(max=tokens.shape[1] - 1).view(b, -1)).view(b, n, block)[chosen]
    logits = hidden[chosen].to(lm_head.dtype) @ lm_head.T
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    loss = (ce * weights[chosen]).sum() / weights[chosen].sum()
    correct = torch.zeros_like(valid)
    correct[chosen] = logits.argmax(-1) == labels
    return loss, correct, valid


def acceptance_estimate(correct, valid, keep):
    """Mean tokens per round if each kept block were verified: the given token's successor is
    always emitted, plus one per leading right guess (a teacher-forced proxy for evaluate.py)."""
    leading = torch.cumprod((correct | ~valid)[:, :, 1:].int(), -1) * valid[:, :, 1:]
    return (1 + leading.sum(-1)).float()[keep].mean().item()


def optimizers(drafter, name, args):
    if name == "adamw":
        return [torch.optim.AdamW(drafter.parameters(), lr=args.adam_lr, betas=(0.9, 0.95), weight_decay=0.01)]
    if name != "muon":
        raise SystemExit(f"unknown optimizer '{name}' (muon or adamw)")
    matrices = [p for p in drafter.parameters() if p.dim() == 2]
    vectors = [p for p in drafter.parameters() if p.dim() != 2]
    return [Muon(matrices, lr=args.lr), torch.optim.AdamW(vectors, lr=args.adam_lr, betas=(0.9, 0.95), weight_decay=0)]


def schedule(progress):
    """Learning-rate factor: 3% linear warm-up, then cosine to zero."""
    import math
    return min(1.0, progress / 0.03) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def validate(drafter, lm_head, embed, examples, blocks, mask_id, device, autocast):
    out = {}
    g = torch.Generator().manual_seed(1234)
    for block in blocks:
        estimates = []
        for start in range(0, len(examples), 16):
            batch = batch_of(examples[start:start + 16], block, 64, mask_id, g, device)
            with autocast:
                _, correct, valid = block_loss(drafter, lm_head, embed, batch, block, mask_id)
            estimates.append(acceptance_estimate(correct, valid, batch[3]))
        out[block] = round(sum(estimates) / len(estimates), 3)
    return out


def train(name, config, examples, held, lm_head, embed, args, device):
    torch.manual_seed(args.seed)
    drafter = init_weights(DFlashDrafter(config)).to(device).train()
    opts = optimizers(drafter, name, args)
    base = [[grp["lr"] for grp in o.param_groups] for o in opts]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    g = torch.Generator().manual_seed(args.seed)
    log(f"[{name}] drafter: {config.num_hidden_layers} layers, {parameter_count(drafter) / 1e6:.2f} M parameters, "
        f"blocks {blocks}, {len(examples)} training sequences")
    history, step, t0, last_log = [], 0, time.time(), 0.0
    while True:
        progress = step / args.steps if args.steps else (time.time() - t0) / (args.train_minutes * 60)
        if progress >= 1:
            break
        for o, lrs in zip(opts, base):
            for grp, lr in zip(o.param_groups, lrs):
                grp["lr"] = lr * schedule(progress)
        block = blocks[step % len(blocks)]
        picked = [examples[int(i)] for i in torch.randint(len(examples), (args.batch,), generator=g)]
        batch = batch_of(picked, block, max(1, args.block_tokens // block), config.mask_token_id, g, device)
        with autocast:
            loss, correct, valid = block_loss(drafter, lm_head, embed, batch, block, config.mask_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        step += 1
        now = time.time() - t0
        if now - last_log >= 15 or step == 1 or (args.steps and step == args.steps):
            last_log = now
            est = acceptance_estimate(correct, valid, batch[3])
            first = (correct[:, :, 1][valid[:, :, 1]]).float().mean().item()
            entry = dict(step=step, seconds=round(now, 1), block=block, loss=round(loss.item(), 4),
                         first_token_accuracy=round(first, 3), train_acceptance=round(est, 3))
            if step > 1:
                drafter.eval()
                entry["held_out_acceptance"] = validate(drafter, lm_head, embed, held, blocks, config.mask_token_id, device, autocast)
                drafter.train()
            history.append(entry)
            log(f"[{name}] " + ", ".join(f"{k} {v}" for k, v in entry.items()))
    log(f"[{name}] {step} steps in {time.time() - t0:.0f} s")
    return drafter.eval(), history


def main():
    args = arguments()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target, tokenizer = load_target(args.gguf, device, gen_dtype)
    log(f"target: {target.config.num_hidden_layers} layers, hidden {target.config.hidden_size}, "
        f"vocabulary {target.config.vocab_size}, on {device} ({time.time() - t_start:.0f} s)")
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask_id = int(args.mask_token) if args.mask_token.isdigit() else tokenizer.convert_tokens_to_ids(args.mask_token)
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        raise SystemExit(f"mask token '{args.mask_token}' is not in the target's vocabulary")

    if args.data:
        saved = json.load(open(args.data))
        examples, held = [e for e in saved if not e["held_out"]], [e for e in saved if e["held_out"]]
        log(f"read {len(saved)} prompts and answers from {args.data}")
    else:
        examples, held = make_data(args, target, tokenizer, device, stop_id, rng)
    if args.save_data:
        keys = ["scenario", "prompt", "held_out", "prompt_ids", "answer", "tokens", "prompt_len"]
        json.dump([{k: e[k] for k in keys} for e in examples + held], open(args.save_data, "w"))
    if not examples or not held:
        raise SystemExit("no training or held-out answers: raise --gen-minutes or --prompts")
    answer_tokens = sum(len(e["answer"]) for e in examples)
    log(f"data: {len(examples)} training answers ({answer_tokens} tokens), {len(held)} held-out "
        f"({time.time() - t_start:.0f} s so far)")

    # Features from a float32 target, as Fulgur computes them; generation above ran in bf16.
    # (A model loaded from GGUF refuses .float(), so its tensors are cast one by one.)
    for p in target.parameters():
        p.data = p.data.float()
    n_target = target.config.num_hidden_layers
    layer_ids = spread_layer_ids(n_target, args.target_layers)
    # Kept on the device, in bf16 where training runs under bf16 autocast (about 12 GB for the defaults).
    feats = target_features(target, [e["tokens"] for e in examples + held], layer_ids, 16384, device,
                            torch.bfloat16 if device.type == "cuda" else torch.float32)
    for e, f in zip(examples + held, feats):
        e["features"] = f
        e["token_tensor"] = torch.tensor(e["tokens"], device=device)
    log(f"features of target layers {layer_ids} ({time.time() - t_start:.0f} s so far)")

    c = target.config
    blocks = [int(b) for b in args.block_sizes.split(",")]
    config = DrafterConfig(
        hidden_size=c.hidden_size, num_hidden_layers=args.layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, block_size=max(blocks), mask_token_id=mask_id,
        target_layer_ids=layer_ids, num_target_layers=n_target, rms_norm_eps=c.rms_norm_eps,
        rope_theta=(getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        max_position_embeddings=c.max_position_embeddings,
        extra={"bos_token_id": c.bos_token_id, "eos_token_id": stop_id})
    table = target.get_input_embeddings().weight
    lm_head = table.to(torch.bfloat16) if device.type == "cuda" else table
    embed = lambda ids: F.embedding(ids, table)  # noqa: E731

    os.makedirs(args.out, exist_ok=True)
    json.dump([dict(scenario=e["scenario"], prompt=e["prompt"]) for e in held], open(os.path.join(args.out, "eval_prompts.json"), "w"), indent=1)
    report = dict(args=vars(args), target_layer_ids=layer_ids, training_answers=len(examples), answer_tokens=answer_tokens,
                  held_out=len(held), runs={})
    names = args.optimizer.split(",")
    for i, name in enumerate(names):
        drafter, history = train(name, config, examples, held, lm_head, embed, args, device)
        directory = args.out if i == 0 else os.path.join(args.out, name) if args.save_all else None
        if directory:
            drafter.save(directory)
            size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
            log(f"[{name}] exported to {directory} ({size / 1e6:.1f} MB of weights)")
        acceptance = evaluate(target, tokenizer, drafter.float(), [dict(scenario=e["scenario"], prompt=e["prompt"]) for e in held],
                              blocks, args.eval_max_new_tokens or args.max_new_tokens, {stop_id},
                              deadline=time.time() + args.eval_minutes * 60)
        report["runs"][name] = dict(directory=directory, history=history, acceptance=acceptance)
        json.dump(report, open(os.path.join(args.out, "report.json"), "w"), indent=1)
    log(f"done in {time.time() - t_start:.0f} s; report in {os.path.join(args.out, 'report.json')}")
    for name, run in report["runs"].items():
        for block, by in run["acceptance"].items():
            log(f"  {name}, block {block}: " + ", ".join(f"{k} {v['mean']:.2f}" for k, v in sorted(by.items())))


if __name__ == "__main__":
    main()

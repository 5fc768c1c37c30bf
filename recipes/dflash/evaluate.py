"""Acceptance length (tokens emitted per draft-and-verify round) of a DFlash drafter on held-out
prompts, by scenario and block size, decoding the way Fulgur's SpeculativeGenerator does: the
prompt's prefill gives the first token and the drafter's context; each round drafts a block
after the last token, the target verifies it in one forward, the longest prefix that matches
the target's own choices is kept plus the target's next token, the target's cache is cut back
to it and the drafter gets the kept tokens' features. At temperature 0 the output is the
target's greedy text, so the numbers must agree with `fulgur generate --speculative` up to
floating-point ties; `--fulgur BIN` runs that and prints both side by side.

    python recipes/dflash/evaluate.py --drafter DIR --prompts DIR/eval_prompts.json \
        --gguf ~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf [--blocks 8,16] [--fulgur .build/release/fulgur]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import chat_ids, load_target, log  # noqa: E402
from model import DFlashDrafter, DrafterCache  # noqa: E402


class FeatureTap:
    """Keeps the outputs of the target's `layer_ids` decoder layers from its last forward."""

    def __init__(self, model, layer_ids):
        self.layer_ids, self.out = layer_ids, {}
        self.handles = [model.model.layers[i].register_forward_hook(self.hook(i)) for i in layer_ids]

    def hook(self, i):
        def f(_module, _inputs, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output
        return f

    def features(self):
        return torch.cat([self.out[i] for i in self.layer_ids], -1)[0]

    def close(self):
        for h in self.handles:
            h.remove()


def choose(logits, temperature, generator):
    if temperature == 0:
        return int(logits.argmax())
    p = torch.softmax(logits.float() / temperature, -1)
    return int(torch.multinomial(p, 1, generator=generator))


@torch.no_grad()
def speculative_decode(target, drafter, prompt, block, max_new_tokens, stop_ids, temperature=0.0, generator=None):
    """Returns (emitted tokens, acceptance length of every round)."""
    from transformers import DynamicCache
    device = target.device
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    tap = FeatureTap(target, drafter.config.target_layer_ids)
    try:
        cache = DynamicCache()
        out = target(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
        context = DrafterCache(drafter)
        context.extend(tap.features().to(drafter.fc.weight.dtype))
        token = choose(out.logits[0, -1], temperature, generator)
        tokens, lengths = [token], []
        while token not in stop_ids and len(tokens) < max_new_tokens:
            size = min(block, max_new_tokens - len(tokens))
            draft = context.propose(token, size - 1, embed, lm_head) if size > 1 else []
            out = target(input_ids=torch.tensor([[token] + draft], device=device), past_key_values=cache, use_cache=True)
            emitted = []
            for i in range(len(draft) + 1):
                emitted.append(choose(out.logits[0, i], temperature, generator))
                if i == len(draft) or emitted[-1] != draft[i]:
                    break
            lengths.append(len(emitted))
            if len(emitted) < size:
                cache.crop(-(size - len(emitted)))
            context.extend(tap.features()[:len(emitted)].to(drafter.fc.weight.dtype))
            for t in emitted:
                tokens.append(t)
                if t in stop_ids:
                    break
            token = tokens[-1]
        return tokens, lengths
    finally:
        tap.close()


def evaluate(target, tokenizer, drafter, prompts, blocks, max_new_tokens, stop_ids, temperature=0.0, seed=0, deadline=None):
    """{block: {scenario: {"mean": tokens per round, "rounds", "tokens", "per_prompt": [...]}}}.
    With a `deadline` (time.time()), each block size gets an equal share of the time left and
    skips the prompts it has not started by then (the scenarios take turns, so each keeps some)."""
    generator = torch.Generator(device=target.device).manual_seed(seed)
    by_scenario = {}
    for p in prompts:
        by_scenario.setdefault(p["scenario"], []).append(p)
    interleaved = [p for group in zip(*by_scenario.values()) for p in group]
    interleaved += [p for p in prompts if p not in interleaved]
    report = {}
    for b, block in enumerate(blocks):
        by = {}
        t0 = time.time()
        until = None if deadline is None else t0 + (deadline - t0) / (len(blocks) - b)
        for p in interleaved:
            if until is not None and time.time() > until:
                log(f"block {block}: time is up, {sum(len(s['per_prompt']) for s in by.values())} of {len(prompts)} prompts done")
                break
            tokens, lengths = speculative_decode(target, drafter, chat_ids(tokenizer, p["prompt"]), block, max_new_tokens,
                                                 stop_ids, temperature, generator)
            s = by.setdefault(p["scenario"], {"rounds": 0, "tokens": 0, "per_prompt": []})
            s["rounds"] += len(lengths)
            s["tokens"] += sum(lengths)
            s["per_prompt"].append(round(sum(lengths) / max(1, len(lengths)), 3))
        for s in by.values():
            s["mean"] = round(s["tokens"] / max(1, s["rounds"]), 3)
        report[block] = by
        log(f"acceptance at block {block}, temperature {temperature} ({time.time() - t0:.0f} s): "
            + ", ".join(f"{k} {v['mean']:.2f}" for k, v in sorted(by.items())))
    return report


def fulgur_acceptance(binary, drafter_dir, prompt, block, max_new_tokens):
    """Mean acceptance that `fulgur generate --speculative` reports for one greedy chat answer."""
    r = subprocess.run([binary, "generate", "--chat", "--temperature", "0", "--max-tokens", str(max_new_tokens),
                        "--speculative", drafter_dir, "--block-size", str(block), "--", prompt],
                       capture_output=True, text=True)
    m = re.search(r"speculative: block \d+, (\d+) rounds, mean acceptance ([\d.]+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"fulgur printed no speculative summary (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--prompts", required=True, help="eval_prompts.json written by train.py")
    ap.add_argument("--gguf", nargs="+", default=[os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf")])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", default="8,16")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per scenario (0: all)")
    ap.add_argument("--fulgur", help="a fulgur binary: also run each greedy prompt through it and compare")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    prompts = json.load(open(args.prompts))
    if args.limit:
        kept = {}
        prompts = [p for p in prompts if kept.setdefault(p["scenario"], []).append(p) or len(kept[p["scenario"]]) <= args.limit]
    target, tokenizer = load_target(args.gguf, args.device, torch.float32)
    drafter = DFlashDrafter.load(args.drafter, device=args.device).eval()
    stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    blocks = [int(b) for b in args.blocks.split(",")]
    report = evaluate(target, tokenizer, drafter, prompts, blocks, args.max_new_tokens, stop_ids, args.temperature)
    print(json.dumps(report, indent=1))
    if args.fulgur and args.temperature == 0:
        for block in blocks:
            print(f"block {block}: scenario, torch, fulgur (mean acceptance per prompt)")
            seen = {}
            for p in prompts:
                i = seen.setdefault(p["scenario"], 0)
                seen[p["scenario"]] += 1
                ours = report[block][p["scenario"]]["per_prompt"][i]
                theirs = fulgur_acceptance(args.fulgur, args.drafter, p["prompt"], block, args.max_new_tokens)
                print(f"  {p['scenario']:7s} {ours:6.2f} {theirs:6.2f}{'' if abs(ours - theirs) < 0.01 else '  differs'}")


if __name__ == "__main__":
    main()

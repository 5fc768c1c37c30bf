#!/usr/bin/env python3
"""Hugging Face transformers as Fulgur's peer: greedy decode speed and first-step logits.

Loads a checkpoint exported by `fulgur random-model PRESET --export DIR` (or any Hugging Face
checkpoint directory; nothing is fetched), then:

1. runs the prompt once and writes its logits ([T, vocab], float32), with the prompt ids,
   to --logits-out, so Fulgur's logits on the same weights can be compared in the same run;
2. decodes greedily at batch 1: --warmup tokens untimed, then --new-tokens timed between
   CUDA synchronizations (the next token stays on the device, so the loop never waits on
   the host), and reports tokens/s and per-step time as one JSON line (also --json-out).

Modes: `eager` (transformers' dynamic KV cache, the usual way to run it); `static` (a
preallocated StaticCache, the prerequisite of compilation); `compile` (static cache plus
torch.compile of the forward, mode reduce-overhead: CUDA graphs). MoE layers route on data,
so compilation may break the graph or fail; the error is reported as such.

For correctness, compare logits in float32 (--dtype float32): on the tiny models Fulgur and
transformers then agree to about 1e-6 relative. In BF16 most positions differ by about 1%,
and a position where BF16 rounding flips a near-tied expert choice by far more.

gpt-oss's MXFP4 experts are dequantized to BF16 at load (transformers' MXFP4 kernels come
from the Hub, which the GPU machine cannot reach); --mxfp4-kernels asks for them anyway.

Usage:
  python recipes/peer/transformers_decode.py DIR [--device cuda] [--dtype bfloat16]
      [--mode eager|static|compile] [--new-tokens 128] [--warmup 16]
      [--prompt-ids 1,2,3 | --prompt-len 16 --seed 0] [--logits-out FILE] [--json-out FILE]
"""

import argparse
import json
import os
import sys
import time

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--mode", default="eager", choices=["eager", "static", "compile"])
    ap.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=16, help="untimed decode steps first")
    ap.add_argument("--prompt-ids", help="comma-separated token ids (default: --prompt-len random ids from --seed)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' choice)")
    ap.add_argument("--experts", default=None, help="experts_implementation (default: transformers' choice)")
    ap.add_argument("--mxfp4-kernels", action="store_true", help="do not dequantize MXFP4 experts at load")
    ap.add_argument("--logits-out", help="write input_ids and the prompt's logits here (safetensors)")
    ap.add_argument("--json-out", help="also write the result JSON here")
    return ap.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(args, device, dtype):
    config = AutoConfig.from_pretrained(args.checkpoint)
    kwargs = {"dtype": dtype}
    if args.attn:
        kwargs["attn_implementation"] = args.attn
    if args.experts:
        kwargs["experts_implementation"] = args.experts
    quant = getattr(config, "quantization_config", None) or {}
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant_method == "mxfp4" and not args.mxfp4_kernels:
        from transformers import Mxfp4Config
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight to the GPU, not through host memory
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    # Dequantized MXFP4 experts come out BF16 whatever dtype was asked for.
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model.eval()


def prompt_ids(args, vocab):
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
    bad = [i for i in ids if not 0 <= i < vocab]
    if not ids or bad:
        sys.exit(f"prompt ids must be a non-empty list in 0..<{vocab}; bad: {bad}")
    return ids


@torch.no_grad()
def main():
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = load(args, device, dtype)
    load_seconds = time.perf_counter() - t0
    vocab = model.config.vocab_size
    ids = prompt_ids(args, vocab)
    total = len(ids) + args.warmup + args.new_tokens

    cache = StaticCache(config=model.config, max_cache_len=total) if args.mode != "eager" else None
    forward = model.forward
    if args.mode == "compile":
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)

    def step(tokens, position, past):
        positions = torch.arange(position, position + tokens.shape[1], device=device)
        out = forward(input_ids=tokens, past_key_values=past, cache_position=positions,
                      position_ids=positions[None], use_cache=True)
        return out.logits, out.past_key_values

    # Prefill: the prompt's logits are the first step's, the ones compared with Fulgur.
    x = torch.tensor([ids], device=device)
    logits, past = step(x, 0, cache)
    if args.logits_out:
        save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logits": logits[0].float().cpu().contiguous()},
                  args.logits_out, metadata={"generator": f"recipes/peer/transformers_decode.py {args.checkpoint}, "
                                                          f"transformers {transformers.__version__}, {args.dtype}"})
    token = logits[:, -1:].argmax(-1)
    generated = [token]
    position = len(ids)

    def decode(n):
        nonlocal token, past, position
        for _ in range(n):
            logits, past = step(token, position, past)
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
            position += 1

    try:
        decode(args.warmup)
        sync(device)
        start = time.perf_counter()
        decode(args.new_tokens)
        sync(device)
        seconds = time.perf_counter() - start
    except Exception as e:  # torch.compile of data-dependent MoE routing may not work
        sys.exit(f"{args.mode} decode failed: {type(e).__name__}: {e}")

    tokens = torch.cat(generated, dim=1)[0].tolist()
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "mode": args.mode,
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(load_seconds, 1),
        "prompt_tokens": len(ids), "warmup_tokens": args.warmup, "timed_tokens": args.new_tokens,
        "tokens_per_second": args.new_tokens / seconds if seconds > 0 else None,
        "ms_per_token": 1000 * seconds / max(args.new_tokens, 1),
        "tokens": tokens,
    }
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

"""How fast fastllama.py answers the recipe's prompts, with and without dropping finished rows
(`generate_batch(compact_below=...)`), on the real target. Same prompts, same batches, each
setting in turn, twice; prints answer tokens per second per setting and batch.

Why: the data call of 2026-11-28 (seventeenth session, the first with rows dropped) made
15-17k answer tokens/s on an H200, against 30-37k the session before, without it; on a CPU
dropping rows measured faster. This separates the code from the machine.

A later reading of both calls' logs (2026-11-29) found another cause: with cuDNN's attention, a
batch whose widest prompt has a width new to the process took about 18 s and one with a width
seen before about 5 s (each width gives its own sequence of decode-step shapes, which cuDNN plans
anew), and the seventeenth call ran only new widths. `--sdp cudnn,nocudnn` times both backends;
the first round is what a data call sees (new widths), the second what a repeated width costs.
train.py now turns cuDNN's attention off for every phase.

    python3 recipes/dflash/bench_generate.py --gguf MODEL.gguf [--rows 2048] [--batches 2]

On the GPU machine after scripts/stage-dflash's four calls (the fourth one runs it):
    PYTHONPATH=/tmp/site python3 recipes/dflash/bench_generate.py --gguf "$(scripts/device-model)"
(with the gguf wheel installed into /tmp/site as scripts/dflash-gpu does).
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import build_prompts, chat_ids, load_target, log  # noqa: E402
from fastllama import FastLlama  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="+", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=2048, help="rows per batch (train.py's default on a GPU)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--sampled-fraction", type=float, default=0.25)
    ap.add_argument("--settings", default="0,0.5", help="compact_below values (0: never drop rows)")
    ap.add_argument("--sdp", default="nocudnn", help="attention backends to time, comma-separated: cudnn "
                    "(torch's default) and nocudnn (train.py's choice)")
    args = ap.parse_args()
    sdps = args.sdp.split(",")
    if set(sdps) - {"cudnn", "nocudnn"}:
        ap.error(f"--sdp takes cudnn and nocudnn, got {args.sdp}")
    device = torch.device(args.device)
    model, tokenizer = load_target(args.gguf, device, torch.float32)
    fast = FastLlama(model, torch.bfloat16 if device.type == "cuda" else torch.float32)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(0)
    n = args.rows * args.batches
    prompts = [chat_ids(tokenizer, p) for _, p in build_prompts(rng, {"coding": n // 2, "math": n - n // 2}, 0.1, held=False)]
    rng.shuffle(prompts)
    temps = [1.0 if rng.random() < args.sampled_fraction else 0.0 for _ in prompts]
    # Batches of similar prompt lengths, as FastLlama.generate makes them.
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    batches = [order[s:s + args.rows] for s in range(0, n, args.rows)]
    log(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {n} prompts, "
        f"{sum(map(len, prompts)) / n:.0f} prompt tokens on average")
    fast.generate_batch([prompts[i] for i in batches[0][:64]], 16, stop, [0.0] * 64)  # warm-up
    rows = []
    for round_, sdp in [(r, sdp) for r in range(2) for sdp in sdps]:
        torch.backends.cuda.enable_cudnn_sdp(sdp == "cudnn")
        for setting in [float(x) for x in args.settings.split(",")]:
            for b, batch in enumerate(batches):
                g = torch.Generator(device=device).manual_seed(b)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.time()
                answers, _ = fast.generate_batch([prompts[i] for i in batch], args.max_new_tokens, stop,
                                                 [temps[i] for i in batch], generator=g, compact_below=setting)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.time() - t
                tokens = sum(map(len, answers))
                longest = max(map(len, answers))
                rows.append((round_, sdp, setting, b, seconds, tokens, longest))
                log(f"round {round_}, {sdp}, compact_below {setting}, batch {b}: {seconds:.2f} s, {tokens} tokens "
                    f"({tokens / seconds:.0f}/s), longest answer {longest}")
    # Round 0 meets each width for the first time (as a data call does); round 1 repeats them.
    # cuDNN plans a shape once a process, so only its first setting's round 0 pays for new
    # widths in full; the other backends plan nothing.
    print("\n| attention | compact_below | batch | answer tokens | round 0: s (tokens/s) | round 1: s (tokens/s) |")
    print("|---|---|---|---|---|---|")
    for sdp in sdps:
        for setting in sorted({r[2] for r in rows}):
            for b in range(len(batches)):
                mine = sorted((r for r in rows if r[1] == sdp and r[2] == setting and r[3] == b), key=lambda r: r[0])
                print(f"| {sdp} | {setting} | {b} | {mine[0][5]} | "
                      + " | ".join(f"{r[4]:.2f} ({r[5] / r[4]:.0f})" for r in mine) + " |")


if __name__ == "__main__":
    main()

"""Where a training step of the DFlash recipe (train.py) spends its time, on the GPU, without
the real target or its data: a random-weight target of SmolLM2-135M-Instruct's shape and random
sequences whose lengths resemble the recipe's data (prompts of 20-60 tokens; answers of 16 to
--max-new-tokens, a quarter at the cap: about 200 tokens a sequence, as the real 10.6 M tokens
over 55k answers). Each variant of the step runs the same number of steps from the same start
after a warm-up, with train.py's own functions (make_batch, training_step); time is the wall
clock between synchronizations. Variants differ in rows per step (a short batch has fewer
anchors), so throughput is counted in trained block positions (loss rows) per second.

Variant names join parts with '+':
  random   batches drawn at random, padded to their longest (the recipe before 2026-11-28)
  sorted   batches from windows sorted by length (train.py's Batches, --length-window 64)
  nocap    every sequence gets block_tokens / block anchors even past its answer's end (as before)
  store    the target's features kept on the GPU: timed after every sequence's first pass
  compile  torch.compile of the drafter's layers
  bf16loss the cross-entropy reads the bf16 logits as they are (train.py --cross-entropy bfloat16)
  fusedloss the float32 cross-entropy compiled (--cross-entropy fused)
  nocudnn  scaled_dot_product_attention without its cuDNN backend (which plans every new shape
           again, tens of ms on the CPU: sorted batches have many shapes)

    python3 recipes/dflash/bench_step.py --variants random+nocap,sorted,sorted+store --steps 60
"""
import argparse
import contextlib
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from model import DFlashDrafter, init_weights, spread_layer_ids  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def random_target(device):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(c).to(device).eval()
    args = SimpleNamespace(gen_engine="fast", gen_batch=None, features="tf32")
    check = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [20, 21]]
    target = train.Target(model, args, device, check)
    return model, target


def synthetic_examples(n, max_new, generator):
    out = []
    for _ in range(n):
        p = int(torch.randint(20, 61, (1,), generator=generator))
        a = max_new if torch.rand(1, generator=generator).item() < 0.25 else int(torch.randint(16, max_new + 1, (1,), generator=generator))
        tokens = torch.randint(100, 49000, (p + a,), generator=generator).tolist()
        out.append(dict(tokens=tokens, prompt_len=p))
    return out


def run_variant(name, target, model, examples, args, device):
    parts = set(name.split("+"))
    unknown = parts - {"random", "sorted", "nocap", "store", "compile", "bf16loss", "fusedloss", "nocudnn"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}")
    c = model.config
    layer_ids = spread_layer_ids(c.num_hidden_layers, 5)
    target.layer_ids = layer_ids
    config = train.drafter_config(c, args.layers, layer_ids, 16, 2)
    cuda = device.type == "cuda"
    torch.manual_seed(1)
    drafter = init_weights(DFlashDrafter(config)).to(device).train()
    if "compile" in parts:
        for layer in drafter.layers:
            layer.compile(dynamic=True)
    opt_args = SimpleNamespace(weight_decay=0.01, adam_lr=1e-4, lr=0.02)
    opts = train.optimizers(drafter, "adamw", opt_args)
    table = model.get_input_embeddings().weight
    lm_head = table.detach().to(torch.bfloat16 if cuda else torch.float32)
    embed = lambda ids: F.embedding(ids, table.detach())  # noqa: E731
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    g = torch.Generator().manual_seed(2)
    batches = train.Batches([len(e["tokens"]) for e in examples], args.batch, g, 1 if "random" in parts else 64)
    dim = len(layer_ids) * c.hidden_size
    budget = 1 << 40 if "store" in parts else 0
    store = train.FeatureStore(target, examples, dim, torch.bfloat16 if cuda else torch.float32, budget, device)
    if "store" in parts:  # steady state: every sequence already through its first pass
        for s in range(0, len(examples), 64):
            store.features(list(range(s, min(len(examples), s + 64))))
        idx = batches.next()
        ref = target.features([examples[i]["tokens"] for i in idx])
        got = store.features(idx)
        # Only the real tokens: padding's features differ (zeros here) and no block ever sees them.
        diff = max((ref[r, :len(examples[i]["tokens"])].float() - got[r, :len(examples[i]["tokens"])].float()).abs().max().item()
                   for r, i in enumerate(idx))
        log(f"{name}: stored features against a fresh pass of one batch, real tokens: max |difference| {diff:.3g}")
    torch.backends.cuda.enable_cudnn_sdp("nocudnn" not in parts)
    cap = train.anchors_per_sequence
    if "nocap" in parts:
        train.anchors_per_sequence = lambda picked, block, block_tokens: max(1, block_tokens // block)
    blocks = [8, 16]
    phases, counts = {}, dict(rows=0, padded=0, real=0)  # kept on the device: no host sync a step

    def one(step, timed):
        block = blocks[step % 2]
        mark = train.phase_clock(timed and args.phases)
        idx = batches.next()
        batch = train.make_batch(examples, idx, block, args.block_tokens, store, 2, g, device, mark, phases)
        _, _, valid = train.training_step(drafter, opts, lm_head, embed, batch, block, 2, autocast, mark, phases,
                                          "bfloat16" if "bf16loss" in parts else "fused" if "fusedloss" in parts else "float32")
        if timed:
            counts["rows"] += valid[:, :, 1:].sum()
            counts["padded"] += batch[0].numel()
            counts["real"] += batch[1].sum()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(args.warmup):
            one(step, False)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            one(step, True)
        sync()
        seconds = time.perf_counter() - t0
        if args.profile_steps and name in args.profile.split(","):
            profiler = train.start_profiler()
            for step in range(args.profile_steps):
                one(step, False)
            log(f"{name}: torch.profiler, {args.profile_steps} steps:\n" + train.stop_profiler(profiler))
    finally:
        train.anchors_per_sequence = cap
    rows, padded, real = int(counts["rows"]), counts["padded"], int(counts["real"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    result = dict(variant=name, ms_per_step=1000 * seconds / args.steps, rows_per_s=rows / seconds,
                  rows_per_step=rows / args.steps, padding=padded / max(1, real), peak_gib=peak,
                  phases={k: round(1000 * v / args.steps, 1) for k, v in phases.items()})
    log(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="random+nocap,random,sorted,sorted+store,sorted+store+compile")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the variants run (use small sizes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=8192)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--phases", action="store_true", help="also time the phases (synchronizes inside each step)")
    ap.add_argument("--profile", default="random+nocap", help="variants to profile after their timed steps")
    ap.add_argument("--profile-steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    model, target = random_target(device)
    examples = synthetic_examples(args.examples, args.max_new_tokens, torch.Generator().manual_seed(3))
    log(f"{len(examples)} synthetic sequences, {sum(len(e['tokens']) for e in examples)} tokens")
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(name, target, model, examples, args, device))
        except Exception as e:  # noqa: BLE001  (one variant failing, e.g. compile, leaves the others)
            log(f"{name}: failed: {type(e).__name__}: {e}")
    base = results[0]["rows_per_s"] if results else 1
    print("\n| variant | ms a step | loss rows a step | loss rows/s | vs first | padding | peak GiB | phases (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['rows_per_step']:.0f} | {r['rows_per_s']:.0f} | "
              f"{r['rows_per_s'] / base:.2f}x | {r['padding']:.2f} | {r['peak_gib']:.1f} | {r['phases'] or '-'} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

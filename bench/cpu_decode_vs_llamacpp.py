#!/usr/bin/env python3
"""Decode speed of the default model on this machine's CPU: Fulgur against llama.cpp.

Both run the same GGUF file (SmolLM2-135M-Instruct, Q4_1) with the same thread count, the
same prompt and greedy decoding of the same number of tokens (EOS ignored), in one run,
alternating engines over several rounds. Decode tokens/s counts the tokens after the first
one over the time after the first one, so prompt processing is excluded for both.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install llama-cpp-python
    swift build -c release
    .venv-bench/bin/python bench/cpu_decode_vs_llamacpp.py [--threads 2] [--tokens 128]
"""
import argparse, json, os, platform, re, statistics, subprocess, sys, time

PROMPT = "The history of the printing press begins"


def fulgur_once(binary, model, threads, tokens):
    env = dict(os.environ, FULGUR_THREADS=str(threads))
    out = subprocess.run([binary, "generate", "--model", model, "--temperature", "0", "--max-tokens", str(tokens),
                          "--ignore-eos", PROMPT], env=env, capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) generated, time to first token (\d+) ms, ([\d.]+) tokens/s", out.stderr)
    if not m:
        sys.exit("could not read Fulgur's summary line:\n" + out.stderr)
    return int(m.group(1)), float(m.group(3))


def llamacpp_once(llm, tokens):
    stamps = []
    # EOS is masked (as Fulgur's --ignore-eos does) so both engines decode the same count.
    for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1, stream=True,
                                   logit_bias={llm.token_eos(): -1e9}):
        stamps.append(time.perf_counter())
    n = len(stamps)
    return n, (n - 1) / (stamps[-1] - stamps[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--binary", default=".build/release/fulgur")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from llama_cpp import Llama, llama_cpp
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                verbose=False)

    # One untimed round each: page in the weights, warm the caches.
    fulgur_once(args.binary, args.model, args.threads, 16)
    llamacpp_once(llm, 16)
    results = {"fulgur": [], "llama.cpp": []}
    for _ in range(args.rounds):
        results["fulgur"].append(fulgur_once(args.binary, args.model, args.threads, args.tokens))
        results["llama.cpp"].append(llamacpp_once(llm, args.tokens))

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, threads: {args.threads}, model: {os.path.basename(args.model)}, "
          f"greedy, {args.tokens} tokens requested, {args.rounds} rounds, {time.strftime('%Y-%m-%d')}")
    print(f"{'engine':<10} {'tokens':>7} {'decode tok/s (median)':>22} {'all rounds':>30}")
    summary = {}
    for name, runs in results.items():
        med = statistics.median(r[1] for r in runs)
        summary[name] = med
        print(f"{name:<10} {runs[0][0]:>7} {med:>22.1f} {', '.join(f'{r[1]:.1f}' for r in runs):>30}")
    print(f"fulgur / llama.cpp = {summary['fulgur'] / summary['llama.cpp']:.2f}")
    print(json.dumps({"threads": args.threads, "tokens": args.tokens, "decode_tokens_per_s": summary,
                      "llama_cpp_version": getattr(llama_cpp, "__version__", None)}))


if __name__ == "__main__":
    main()

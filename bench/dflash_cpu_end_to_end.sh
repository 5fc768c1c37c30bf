#!/usr/bin/env bash
# DFlash end to end on the CPU: the default model, greedy, chat template, 200 tokens past EOS,
# on three prompts (the ones the GPU tables of BENCHMARKS.md use), plain decoding against the
# drafter at each block size. Prints fulgur's own speed line for each run, the mean tokens a
# round, and whether the text equals --no-speculative's (it must: greedy DFlash is lossless).
# Exits 1 if any text differs. Run it on a quiet machine: the tokens/s are wall-clock.
# Usage: bench/dflash_cpu_end_to_end.sh [DRAFTER_DIR] [BLOCKS...]
#   (default: the bundled drafter, blocks 2 4 8 16; FULGUR=path picks the binary)
set -uo pipefail
cd "$(dirname "$0")/.."
drafter=${1:-Drafters/SmolLM2-135M-Instruct-DFlash}
shift || true
blocks=${*:-2 4 8 16}
fulgur=${FULGUR:-.build/release/fulgur}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(generate --device cpu --temperature 0 --max-tokens 200 --ignore-eos --chat)
echo "# $fulgur ${common[*]} [--no-speculative | --speculative $drafter --block-size B] ($(nproc) cores, $(date -u +%F))"
status=0
for prompt in "Write a Python function that checks whether a number is prime." \
              "What is 17 times 23? Explain step by step." \
              "Write a function that merges two sorted lists in Python."; do
    echo "== $prompt"
    "$fulgur" "${common[@]}" --no-speculative "$prompt" > "$tmp/plain.txt" 2> "$tmp/plain.err" || { cat "$tmp/plain.err"; exit 2; }
    echo "plain: $(grep -oE '\[[0-9]+ prompt tokens.*\]' "$tmp/plain.err")"
    for b in $blocks; do
        "$fulgur" "${common[@]}" --speculative "$drafter" --block-size "$b" "$prompt" > "$tmp/spec.txt" 2> "$tmp/spec.err" \
            || { cat "$tmp/spec.err"; exit 2; }
        same=same-text
        cmp -s "$tmp/plain.txt" "$tmp/spec.txt" || { same=TEXT-DIFFERS; status=1; }
        echo "block $b: $(grep -oE '\[[0-9]+ prompt tokens.*\]' "$tmp/spec.err") | $(grep -oE 'mean acceptance [0-9.]+' "$tmp/spec.err") $same"
    done
done
exit $status

#!/usr/bin/env bash
# Mean DFlash acceptance (tokens per round) of a drafter on held-out prompts, on the CPU:
# the first N prompts of each scenario in the drafter's eval_prompts.json (not used in
# training), chat template, at temperature 0 and 1 (top-p 1, seed 1), blocks 8 and 16.
# Usage: bench/dflash_acceptance.sh DRAFTER_DIR [N] [MAX_TOKENS]
# PROMPTS=FILE takes the held-out prompts from FILE instead (the bundled drafter has none: its
# run's eval_prompts.json is kept under bench/results/). TEMPERATURES="0" and BLOCKS="8" narrow
# the runs (default "0 1" and "8 16").
set -euo pipefail
cd "$(dirname "$0")/.."
drafter=$1; n=${2:-3}; max=${3:-128}
fulgur=${FULGUR:-.build/release/fulgur}
python3 - "${PROMPTS:-$drafter/eval_prompts.json}" "$n" > /tmp/dflash-prompts.tsv <<'PY'
import json, sys
prompts, n = json.load(open(sys.argv[1])), int(sys.argv[2])
seen = {}
for p in prompts:
    if seen.get(p["scenario"], 0) < n:
        seen[p["scenario"]] = seen.get(p["scenario"], 0) + 1
        print(p["scenario"] + "\t" + p["prompt"].replace("\t", " ").replace("\n", " "))
PY
echo "scenario temperature block mean_acceptance prompt"
while IFS=$'\t' read -r scenario prompt; do
    for t in ${TEMPERATURES:-0 1}; do
        for b in ${BLOCKS:-8 16}; do
            a=$("$fulgur" generate --device cpu --chat --temperature $t --top-p 1 --seed 1 --max-tokens "$max" \
                --speculative "$drafter" --block-size $b "$prompt" 2>&1 >/dev/null | grep -oE "mean acceptance [0-9.]+" | grep -oE "[0-9.]+$" || echo nan)
            echo "$scenario $t $b $a ${prompt:0:40}"
        done
    done
done < /tmp/dflash-prompts.tsv

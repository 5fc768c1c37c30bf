#!/usr/bin/env bash
# Resident memory of a quantized checkpoint in use, against its packed size on disk.
#
# Two models, each in bf16 and as quantized by `fulgur quantize`:
#  - the default model (a real trained 135M Llama) exported to bf16 safetensors; it has no
#    experts, so only FP8 128x128 applies (155 MB quantized);
#  - a random-weight Qwen3-MoE of 1.4 GB bf16 (8 layers, 32 experts x 768, top-8): MXFP4
#    experts plus FP8 attention (about 520 MB quantized).
# Each runs a short greedy generation with --prefault (every weight page read at load, the
# worst case for resident memory) while /usr/bin/time records the peak resident set. Weights
# are memory-mapped and read in their stored formats, so the peak should be the file size
# plus the runtime's own few tens of MB, never an f32 expansion (4x for FP8, 7.5x for MXFP4).
#
#     .venv/bin/pip install "transformers==5.17.0" torch gguf    # for the export
#     swift build -c release && bench/quantized_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/fulgur-memory-bench}
bin=.build/release/fulgur
mkdir -p "$work"
[ -f "$work/bf16/model.safetensors" ] || .venv/bin/python recipes/export_default_model.py "$work/bf16" >/dev/null 2>&1
[ -f "$work/moe-bf16/config.json" ] || .venv/bin/python recipes/make_synthetic_moe.py "$work/moe-bf16" --tokenizer "$work/bf16" >/dev/null 2>&1
for m in bf16 moe-bf16; do
    rm -rf "$work/$m-quantized"
    "$bin" quantize "$work/$m" "$work/$m-quantized" --no-report >/dev/null
done

peak_kib() {  # peak RSS of a greedy 32-token generation, in KiB
    /usr/bin/time -f "%M" "$bin" generate -m "$1" --prefault --context 256 --temperature 0 --max-tokens 32 --ignore-eos \
        "The history of the printing press" 2>&1 >/dev/null | tail -1
}
baseline=$(/usr/bin/time -f "%M" "$bin" --help 2>&1 >/dev/null | tail -1)
printf "%-20s %12s %12s %8s\n" model "file MiB" "peak RSS MiB" "ratio"
for m in bf16 bf16-quantized moe-bf16 moe-bf16-quantized; do
    file=$(du -k --apparent-size "$work/$m"/*.safetensors | awk '{s += $1} END {print s}')
    peak=$(peak_kib "$work/$m")
    awk -v m="$m" -v f="$file" -v p="$peak" 'BEGIN { printf "%-20s %12.1f %12.1f %8.2f\n", m, f/1024, p/1024, p/f }'
done
echo "(the binary alone, printing --help: $((baseline / 1024)) MiB; $(date -u +%F), $(nproc) cores)"

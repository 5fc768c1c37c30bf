#!/usr/bin/env python3
"""Writes the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) as a Hugging Face bf16
safetensors checkpoint, with its tokenizer: a small *trained* model in the format
`fulgur quantize` reads, for quality reports (the GGUF's Q4_1 weights are dequantized by
transformers, then rounded to bf16).

    .venv/bin/python recipes/export_default_model.py OUT_DIR [--gguf PATH]
"""
import argparse, json, os, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    if not os.path.exists(args.gguf):
        sys.exit(f"{args.gguf} not found: run `fulgur pull` first")
    d, f = os.path.split(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
    # A model loaded from GGUF is marked quantized and refuses save_pretrained; its weights
    # are plain bf16 tensors by now, so move them into a fresh model of the same config.
    config = loaded.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out)
    # save_pretrained writes `quantization_config: null` back; drop the key so readers see an
    # ordinary bf16 checkpoint.
    path = os.path.join(args.out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("quantization_config", None)
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

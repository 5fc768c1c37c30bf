#!/usr/bin/env python3
"""Writes a random-weight Qwen3-MoE checkpoint of about 1.4 GB (bf16) for memory and speed
benchmarks of quantized MoE models: 8 layers, hidden 1024, 32 experts x 768, top-8, with the
SmolLM2 tokenizer (exported by recipes/export_default_model.py) so prompts are text.

    .venv/bin/python recipes/make_synthetic_moe.py OUT_DIR --tokenizer DIR_WITH_TOKENIZER_JSON
"""
import argparse, os, shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=49152, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, intermediate_size=3072, moe_intermediate_size=768,
        num_experts=32, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, name), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How far a data file's training answers are from the float32 target's argmax: `relabel` on a
random sample of them, on the CPU. Prints how many answers differ and, per differing answer,
the share of its positions that do (greedy answers decoded in bf16 differ at a few; sampled
ones at many). Usage:

    python recipes/dflash/relabel_probe.py DATA.json MODEL.gguf [N]
"""
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from fastllama import FastLlama  # noqa: E402

data, gguf = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 48
model, _ = train.load_target([gguf], torch.device("cpu"), torch.float32)
examples = [e for e in json.load(open(data)) if e["split"] == "train"]
random.Random(0).shuffle(examples)
examples = examples[:n]
for e in examples:
    e["tokens"], e["prompt_len"] = e["prompt_ids"] + e["answer"], len(e["prompt_ids"])
t0 = time.time()
count, changed, positions = train.relabel(examples, FastLlama(model, torch.float32), torch.device("cpu"), "all", 4096)
print(f"{count} answers, {changed} differ from the argmax somewhere, at {positions} of "
      f"{sum(len(e['answer']) for e in examples)} positions ({time.time() - t0:.0f} s)")
shares = sorted(sum(a != b for a, b in zip(e["argmax"], e["answer"])) / len(e["answer"]) for e in examples if "argmax" in e)
print("share of positions off the argmax, per differing answer:", " ".join(f"{x:.3f}" for x in shares))

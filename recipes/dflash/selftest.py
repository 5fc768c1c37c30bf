"""CPU checks of the recipe's pieces that a training run cannot show went wrong (each prints
what it compared and exits non-zero on a failure). Run with a Python that has torch and
transformers (the recipe's own):

    python recipes/dflash/selftest.py

1. fastllama's batched decoding drops finished rows as the batch thins out: greedy answers, and
   the argmax it reports, equal those of the same batch decoded without dropping; the argmax of
   a sampled row equals transformers' argmax over that row's own prefix.
2. block_labels with greedy labels: a block position is labelled with the argmax and counts only
   while the positions between it and the anchor follow the argmax.
3. read_data: the first file's splits, the others' training answers without held-out prompts or
   repeats.
4. grow_from (--init from a drafter with fewer layers): the grown drafter starts out computing
   exactly what the smaller one did.
5. relabel: with "missing", greedy answers of a file without the argmax get none, sampled ones
   the argmax the generator reported for them, and answers that carry a temperature are left
   alone; with "all", every training answer is labelled again.
6. --shares: weights by scenario, a scenario left out gets none, a malformed one is refused.
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastllama import FastLlama  # noqa: E402
import train  # noqa: E402

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(c).eval()


def check_generation():
    model = tiny_llama()
    fast = FastLlama(model, torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in [3, 7, 5, 9, 4, 6, 8, 2]]
    # A stop token that ends some rows early and leaves others running: compaction happens.
    for stop in range(40):
        kept, kept_best = fast.generate_batch(prompts, 64, stop, [0.0] * 8, compact_below=0)
        lengths = sorted(len(a) for a in kept)
        if lengths[len(lengths) // 2] <= 32 and lengths[-1] == 64:
            break
    else:
        check("a stop token that ends rows at different steps", False)
        return
    dropped, dropped_best = fast.generate_batch(prompts, 64, stop, [0.0] * 8, compact_below=1.0)
    check("greedy answers with finished rows dropped equal those without", dropped == kept,
          f"lengths {[len(a) for a in kept]}")
    check("a greedy row's argmax is the row itself", dropped_best == dropped and kept_best == kept)
    answers, best = fast.generate_batch(prompts, 64, stop, [0.0, 1.0] * 4, compact_below=1.0,
                                        generator=torch.Generator().manual_seed(3))
    check("some sampled rows leave the argmax", any(a != b for a, b in zip(answers[1::2], best[1::2])))
    with torch.no_grad():
        for r in range(1, 8, 2):
            logits = model(torch.tensor([prompts[r] + answers[r]])).logits[0, len(prompts[r]) - 1:-1]
            check(f"sampled row {r}: argmax equals transformers' over its own prefix",
                  logits.argmax(-1).tolist() == best[r])


def check_labels():
    # One sequence: prompt of 2 tokens, answer at positions 2-9; the sampled answer leaves the
    # argmax at positions 5 (13, not 30) and 8 (16, not 31).
    tokens = torch.tensor([[1, 2, 10, 11, 12, 13, 14, 15, 16, 17]])
    greedy = tokens.clone()
    greedy[0, 5] = 30
    greedy[0, 8] = 31
    anchors, keep = torch.tensor([[2, 4]]), torch.tensor([[True, True]])
    labels, valid = train.block_labels(tokens, torch.tensor([10]), anchors, keep, 5, greedy)
    check("labels are the argmax", labels[0, 0].tolist() == [10, 11, 12, 30, 14] and labels[0, 1].tolist() == [12, 30, 14, 15, 31],
          str(labels.tolist()))
    # Block at anchor 2 (positions 2-6): 3, 4 and 5 count (their contexts follow the argmax), 6 does not (5 left it).
    # Block at anchor 4 (positions 4-8): 5 counts (its context is the anchor), 6-8 do not.
    check("positions after a step off the argmax do not count",
          valid[0, 0].tolist() == [True, True, True, True, False] and valid[0, 1].tolist() == [True, True, False, False, False],
          str(valid.tolist()))
    plain, plain_valid = train.block_labels(tokens, torch.tensor([10]), anchors, keep, 5)
    check("without greedy labels, the tokens", plain[0, 1].tolist() == [12, 13, 14, 15, 16] and bool(plain_valid.all()))


def check_read_data():
    first = [dict(scenario="coding", prompt="a", split="train", prompt_ids=[1], answer=[5, 6]),
             dict(scenario="coding", prompt="held", split="test", prompt_ids=[2], answer=[7, 8])]
    second = [dict(scenario="coding", prompt="a", split="train", prompt_ids=[1], answer=[5, 6]),  # a repeat
              dict(scenario="coding", prompt="a", split="train", prompt_ids=[1], answer=[5, 9], argmax=[5, 6]),
              dict(scenario="chat", prompt="held", split="train", prompt_ids=[2], answer=[3, 3]),  # held out in the first
              dict(scenario="chat", prompt="new", split="val", prompt_ids=[4], answer=[3, 4])]  # not the first's split
    with tempfile.TemporaryDirectory() as d:
        paths = [os.path.join(d, "1.json"), os.path.join(d, "2.json")]
        for p, data in zip(paths, [first, second]):
            json.dump(data, open(p, "w"))
        examples = train.read_data(paths)
    got = [(e["prompt"], e["split"], e["answer"]) for e in examples]
    check("read_data", got == [("a", "train", [5, 6]), ("held", "test", [7, 8]), ("a", "train", [5, 9])], str(got))
    check("read_data keeps the argmax and builds tokens", examples[2].get("argmax") == [5, 6]
          and examples[2]["tokens"] == [1, 5, 9] and examples[2]["prompt_len"] == 1)


def check_grow():
    from transformers import LlamaConfig
    from model import DFlashDrafter, init_weights
    c = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    small = init_weights(DFlashDrafter(train.drafter_config(c, 2, [1, 4], 8, 3))).eval()
    grown = init_weights(DFlashDrafter(train.drafter_config(c, 3, [1, 4], 8, 3))).eval()
    train.grow_from(grown, small)
    table = torch.randn(40, 64)
    embed = lambda ids: torch.nn.functional.embedding(ids, table)  # noqa: E731
    tokens = torch.randint(0, 40, (2, 30))
    features = torch.randn(2, 30, 128)
    anchors, keep = torch.tensor([[3, 10, 20], [5, 6, 21]]), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        a = train.draft_hidden(small, embed, tokens, features, anchors, keep, 8, 3)
        b = train.draft_hidden(grown, embed, tokens, features, anchors, keep, 8, 3)
    check("a drafter grown by a layer starts out as the one it grew from", torch.equal(a, b),
          f"max |difference| {(a - b).abs().max().item():.3g}")
    check("its new layer still trains (q/k/v and MLP weights random)",
          grown.layers[2].self_attn.q_proj.weight.abs().sum().item() > 0 and grown.layers[2].mlp.down_proj.weight.abs().sum().item() == 0)


def check_relabel():
    model = tiny_llama()
    fast = FastLlama(model, torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in [3, 7, 5, 9, 4, 6, 8, 2]]
    temperatures = [0.0, 1.0] * 4
    answers, best = fast.generate_batch(prompts, 24, 39, temperatures, generator=torch.Generator().manual_seed(6))
    old = [dict(split="train", prompt_ids=p, answer=a, tokens=p + a, prompt_len=len(p)) for p, a in zip(prompts, answers)]
    new = dict(split="train", prompt_ids=prompts[1], answer=answers[1], tokens=prompts[1] + answers[1],
               prompt_len=len(prompts[1]), temperature=1.0)  # a file with the argmax recorded: left alone
    held = dict(split="test", prompt_ids=prompts[0], answer=answers[0], tokens=prompts[0] + answers[0], prompt_len=len(prompts[0]))
    examples = old + [new, held]
    # max_tokens small enough that the answers go in several batches of different widths.
    count, changed, positions = train.relabel(examples, fast, torch.device("cpu"), "missing", max_tokens=40)
    check("relabel takes the training answers without a temperature", count == 8, f"{count}")
    check("greedy answers get no argmax", all("argmax" not in e for e, t in zip(old, temperatures) if t == 0))
    sampled = [(e, b) for e, b, t in zip(old, best, temperatures) if t > 0]
    check("sampled answers that leave the argmax get the generator's argmax",
          all(e.get("argmax", e["answer"]) == b for e, b in sampled) and any("argmax" in e for e, _ in sampled))
    check("relabel's counts", changed == sum("argmax" in e for e in old)
          and positions == sum(sum(x != y for x, y in zip(e["argmax"], e["answer"])) for e in old if "argmax" in e),
          f"{changed} answers, {positions} positions")
    check("answers with a temperature and held-out ones are left alone", "argmax" not in new and "argmax" not in held)
    new["argmax"] = [0] * len(new["answer"])  # a wrong recorded argmax: "all" replaces it
    count, _, _ = train.relabel(examples, fast, torch.device("cpu"), "all", max_tokens=40)
    check("relabel all takes every training answer and replaces a recorded argmax", count == 9
          and new.get("argmax", new["answer"]) == best[1] and "argmax" not in held, f"{count}")


def check_shares():
    check("--shares parses weights and leaves out what it does not name",
          train.parse_shares("coding=2, math=1") == {"coding": 2.0, "math": 1.0, "chat": 0.0})
    for bad in ["code=1", "coding", "coding=abc", "coding=nan", "coding=inf", "coding=-1,math=2", "coding=0"]:
        try:
            train.parse_shares(bad)
            refused = False
        except SystemExit:
            refused = True
        check(f"--shares refuses '{bad}'", refused)


if __name__ == "__main__":
    check_generation()
    check_labels()
    check_read_data()
    check_grow()
    check_relabel()
    check_shares()
    print(f"{len(failures)} failed" if failures else "all passed")
    sys.exit(1 if failures else 0)

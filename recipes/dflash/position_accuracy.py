"""Per-position accuracy of DFlash drafters on held-out answers, on the CPU (float32, greedy):
at every answer position of the first N coding and math test prompts of an eval_prompts.json,
the drafter drafts a block of 8 (teacher-forced, as train.py's replay) and this prints, for
k = 1..7, P(position k right | positions 1..k-1 right). Where a drafter loses its rounds:
early positions (capacity for the next token) or late ones (looking further ahead).

    python3 recipes/dflash/position_accuracy.py N EVAL_PROMPTS_JSON DRAFTER_DIR [DRAFTER_DIR ...]

Anchors are every answer position alike, so the implied tokens a round read higher than
decoding's walk, which starts its next round right after a miss.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from data import chat_ids, load_target  # noqa: E402
from fastllama import FastLlama  # noqa: E402
from model import DFlashDrafter, DrafterConfig  # noqa: E402


def main():
    n, prompts_file, drafters = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(2)
    dev = torch.device("cpu")
    gguf = os.environ.get("GGUF", os.path.expanduser("~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model, tok = load_target([gguf], dev, torch.float32)
    fast = FastLlama(model, torch.float32)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    config = DrafterConfig.read(os.path.join(drafters[0], "config.json"))  # all must share target layers and mask
    prompts = json.load(open(prompts_file))
    examples = []
    for scenario in ["coding", "math"]:
        mine = [p for p in prompts if p["scenario"] == scenario][:n]
        ids = [chat_ids(tok, p["prompt"]) for p in mine]
        answers = fast.generate(ids, 256, 8, stop, [0.0] * len(ids), label=scenario)
        for i, a in zip(ids, answers):
            tokens = torch.tensor([i + a])
            examples.append(dict(scenario=scenario, tokens=i + a, prompt_len=len(i), _tokens=tokens[0],
                                 _features=fast.features(tokens, config.target_layer_ids)[0]))
    table = model.get_input_embeddings().weight
    embed = lambda ids: F.embedding(ids, table)  # noqa: E731
    for d in drafters:
        drafter = DFlashDrafter.load(d).eval()
        for scenario in ["coding", "math"]:
            right, seen = torch.zeros(8), torch.zeros(8)
            with torch.no_grad():
                for e in [e for e in examples if e["scenario"] == scenario]:
                    tokens, lengths = e["_tokens"][None], torch.tensor([len(e["tokens"])])
                    anchors, keep = train.all_anchors([e], dev)
                    hidden = train.draft_hidden(drafter, embed, tokens, e["_features"][None], anchors, keep, 8,
                                                config.mask_token_id)
                    labels, valid = train.block_labels(tokens, lengths, anchors, keep, 8)
                    correct = ((hidden @ table.T).argmax(-1) == labels) & valid
                    ok = torch.ones(correct.shape[:2], dtype=torch.bool)
                    for k in range(1, 8):
                        m = ok & valid[:, :, k]
                        seen[k] += m.sum()
                        right[k] += (m & correct[:, :, k]).sum()
                        ok = ok & correct[:, :, k]
            acc = (right[1:] / seen[1:]).tolist()
            print(f"{os.path.basename(d.rstrip('/'))} {scenario}: P(k right | 1..k-1 right), k = 1..7: "
                  + " ".join(f"{a:.3f}" for a in acc), flush=True)


if __name__ == "__main__":
    main()

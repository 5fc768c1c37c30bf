"""A plain PyTorch forward for Llama-shaped targets (SmolLM2 and its kin) built for the two
bulk jobs of the recipe, where Hugging Face `generate` spends most of its time in Python:

- `generate`: batched decoding with a static KV cache (left padding, one cache index shared
  by all rows, positions per row), per-row temperature (0: greedy; >0: Gumbel-max sampling,
  the same distribution as softmax sampling), optional top-p; finished rows are dropped as the
  batch thins out, and the target's argmax at every position is returned beside the answer;
- `features`: the hidden states after chosen decoder layers for right-padded sequences (causal
  attention only: a real token never sees the padding after it), stopping after the last
  layer asked for.

The weights are copied from a loaded `LlamaForCausalLM` (so the GGUF loader's dequantization
and q/k permutation are reused) in the dtype asked for. `check_against` compares the last-token
logits with the Hugging Face model's on a few prompts; train.py falls back to HF `generate`
if they disagree. Only default RoPE, no biases, SiLU MLP: anything else raises `Unsupported`.
"""
import time

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    pass


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


class FastLlama:
    def __init__(self, model, dtype):
        c = model.config
        if getattr(c, "model_type", None) not in ("llama", "smollm", "mistral", "qwen2") or c.hidden_act != "silu":
            raise Unsupported(f"model_type {getattr(c, 'model_type', None)}, act {c.hidden_act}")
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise Unsupported(f"rope {rope}")
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise Unsupported("biases")
        self.theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.dtype = c.rms_norm_eps, dtype
        self.device = model.device
        w = lambda t: t.detach().to(self.device, dtype).contiguous()  # noqa: E731
        self.embed = w(model.get_input_embeddings().weight)
        self.lm_head = w(model.get_output_embeddings().weight)
        self.norm = w(model.model.norm.weight)
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            if any(getattr(p, "bias", None) is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
                raise Unsupported("attention biases")
            self.layers.append(dict(
                ln1=w(layer.input_layernorm.weight), ln2=w(layer.post_attention_layernorm.weight),
                qkv=w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), o=w(a.o_proj.weight),
                gate_up=w(torch.cat([m.gate_proj.weight, m.up_proj.weight])), down=w(m.down_proj.weight)))
        d = self.head_dim
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float().to(self.device) / d))

    # pieces, as transformers' Llama computes them
    def rms(self, x, weight):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    def cos_sin(self, positions):
        """cos, sin [*positions.shape, head_dim] in the weights' dtype (angles in float32)."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def split_qkv(self, x, layer):
        """q [.., heads, d], k and v [.., kv_heads, d] of normed x [.., hidden]."""
        qkv = x @ layer["qkv"].T
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (kv, d)), v.unflatten(-1, (kv, d))

    def mlp(self, x, layer):
        gate, up = (x @ layer["gate_up"].T).chunk(2, -1)
        return (F.silu(gate) * up) @ layer["down"].T

    def full_attention(self, x, layer, cos, sin, mask):
        """Self-attention over a whole [b, t, hidden] input; `mask` None means causal.
        Returns the output and the rotated keys and values [b, kv_heads, t, d]."""
        q, k, v = self.split_qkv(self.rms(x, layer["ln1"]), layer)
        q = self.rotate(q.transpose(1, 2), cos[:, None], sin[:, None])
        k = self.rotate(k.transpose(1, 2), cos[:, None], sin[:, None])
        v = v.transpose(1, 2)
        group = self.heads // self.kv_heads
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2).flatten(2) @ layer["o"].T, k, v

    @torch.no_grad()
    def features(self, ids, layer_ids):
        """Hidden states [b, t, len(layer_ids) * hidden] after `layer_ids` for right-padded ids [b, t]."""
        t = ids.shape[1]
        cos, sin = self.cos_sin(torch.arange(t, device=self.device)[None])
        x = self.embed[ids]
        wanted, out = set(layer_ids), {}
        for i, layer in enumerate(self.layers[:max(layer_ids) + 1]):
            a, _, _ = self.full_attention(x, layer, cos, sin, None)
            x = x + a
            x = x + self.mlp(self.rms(x, layer["ln2"]), layer)
            if i in wanted:
                out[i] = x
        return torch.cat([out[i] for i in layer_ids], -1)

    @torch.no_grad()
    def final_hidden(self, ids):
        """The final-normed hidden states [b, t, hidden] of ids [b, t], in one causal pass."""
        cos, sin = self.cos_sin(torch.arange(ids.shape[1], device=self.device)[None])
        x = self.embed[ids]
        for layer in self.layers:
            x = x + self.full_attention(x, layer, cos, sin, None)[0]
            x = x + self.mlp(self.rms(x, layer["ln2"]), layer)
        return self.rms(x, self.norm)

    @torch.no_grad()
    def argmax_all(self, ids, chunk_rows=8192):
        """The target's argmax [b, t] after each position of right-padded ids [b, t], all in one
        causal pass (teacher forcing): entry j is its greedy choice for position j + 1. Logits are
        made `chunk_rows` positions at a time (49k of them a position here)."""
        h = self.final_hidden(ids).flatten(0, 1)
        best = [(h[i:i + chunk_rows] @ self.lm_head.T).float().argmax(-1) for i in range(0, h.shape[0], chunk_rows)]
        return torch.cat(best).view(ids.shape)

    @torch.no_grad()
    def last_logits(self, prompts):
        """Float32 logits after the last token of each prompt (a list of id lists), one by one."""
        return torch.stack([(self.final_hidden(torch.tensor([p], device=self.device))[0, -1] @ self.lm_head.T).float()
                            for p in prompts])

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens, stop_id, temperatures, top_p=1.0, generator=None,
                       prefill_rows=256, compact_below=0.5):
        """Continuations of one batch of prompts (id lists) with a static cache; each is cut
        after `stop_id`. `temperatures`: one per row (0 greedy). Returns the continuations and,
        per row, the target's argmax at each of their positions (for a greedy row, the row itself).

        Every 16 steps, once no more than `compact_below` of the rows still decoding are
        unfinished, the finished rows are dropped from the cache and the step tensors: a batch
        otherwise runs every row until its longest one ends. 0 never drops rows. On a CPU this
        measured faster (same answers); on an H200 the first data call with it ran at half the
        tokens/s of the call before, unexplained (bench_generate.py compares the two)."""
        b, dev = len(prompts), self.device
        width = max(len(p) for p in prompts)
        total = width + max_new_tokens
        ids = torch.full((b, width), stop_id, dtype=torch.long)
        pad = torch.tensor([width - len(p) for p in prompts])
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
        ids, pad = ids.to(dev), pad.to(dev)
        cache = [(torch.zeros((b, self.kv_heads, total, self.head_dim), dtype=self.dtype, device=dev),
                  torch.zeros((b, self.kv_heads, total, self.head_dim), dtype=self.dtype, device=dev)) for _ in self.layers]
        valid = torch.arange(total, device=dev)[None, :] >= pad[:, None]  # [b, total]: keys that are real tokens

        # Prefill in slices of rows (bounded attention memory); pad queries see themselves so
        # that nothing is NaN.
        last = torch.empty((b, self.embed.shape[1]), dtype=self.dtype, device=dev)
        j = torch.arange(width, device=dev)
        for s in range(0, b, prefill_rows):
            rows = slice(s, min(b, s + prefill_rows))
            positions = (j[None, :] - pad[rows, None]).clamp(min=0)
            cos, sin = self.cos_sin(positions)
            mask = (j[None, :, None] >= j[None, None, :]) & (valid[rows, None, :width] | (j[:, None] == j[None, :])[None])
            mask = mask[:, None]  # [rows, 1, width, width]
            x = self.embed[ids[rows]]
            for i, layer in enumerate(self.layers):
                a, k, v = self.full_attention(x, layer, cos, sin, mask)
                cache[i][0][rows, :, :width] = k
                cache[i][1][rows, :, :width] = v
                x = x + a
                x = x + self.mlp(self.rms(x, layer["ln2"]), layer)
            last[rows] = x[:, -1]

        temps = torch.tensor(temperatures, dtype=torch.float32, device=dev)
        sampled = temps > 0
        any_sampled = bool(sampled.any())
        inv_t = torch.where(sampled, 1.0 / temps.clamp(min=1e-6), torch.ones_like(temps))[:, None]
        out = torch.full((b, max_new_tokens), stop_id, dtype=torch.long, device=dev)
        greedy = torch.full((b, max_new_tokens), stop_id, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        row = torch.arange(b, device=dev)  # the batch row of each row still in the step tensors
        group = self.heads // self.kv_heads
        x = last
        for step in range(max_new_tokens):
            logits = (self.rms(x, self.norm) @ self.lm_head.T).float()
            best = logits.argmax(-1)
            if any_sampled:
                scores = logits * inv_t
                if top_p < 1.0:
                    sorted_scores, order = scores.sort(-1, descending=True)
                    cut = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1) > top_p
                    sorted_scores[cut] = float("-inf")
                    scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
                u = torch.rand(scores.shape, device=dev, generator=generator).clamp_(1e-20, 1.0)
                scores = torch.where(sampled[:, None], scores - torch.log(-torch.log(u)), logits)
                token = scores.argmax(-1)
            else:
                token = best
            token = torch.where(done, torch.full_like(token, stop_id), token)
            out[row, step] = token
            greedy[row, step] = best
            done |= token == stop_id
            if step == max_new_tokens - 1:
                break
            if step % 16 == 15:
                alive = (~done).nonzero().squeeze(1)
                if len(alive) == 0:
                    break
                if len(alive) <= compact_below * len(done):
                    for i, (kc, vc) in enumerate(cache):
                        cache[i] = (kc[alive], vc[alive])
                    del kc, vc
                    token, done, row, valid, pad = token[alive], done[alive], row[alive], valid[alive], pad[alive]
                    sampled, inv_t = sampled[alive], inv_t[alive]
                    any_sampled = bool(sampled.any())
                    b = len(alive)
            t = width + step  # cache index of this token
            positions = t - pad
            cos, sin = self.cos_sin(positions)  # [b, d]
            x = self.embed[token]
            mask = valid[:, None, None, :t + 1]
            for i, layer in enumerate(self.layers):
                q, k, v = self.split_qkv(self.rms(x, layer["ln1"]), layer)  # [b, h, d], [b, kv, d]
                q = self.rotate(q, cos[:, None], sin[:, None])
                k = self.rotate(k, cos[:, None], sin[:, None])
                kc, vc = cache[i]
                kc[:, :, t] = k
                vc[:, :, t] = v
                # The query heads of one KV head stand in the "query length" slot: no copy of the cache.
                a = F.scaled_dot_product_attention(q.view(b, self.kv_heads, group, self.head_dim), kc[:, :, :t + 1],
                                                   vc[:, :, :t + 1], attn_mask=mask)
                x = x + a.reshape(b, -1) @ layer["o"].T
                x = x + self.mlp(self.rms(x, layer["ln2"]), layer)
        result, argmaxes = [], []
        for answer, best in zip(out.tolist(), greedy.tolist()):
            n = answer.index(stop_id) + 1 if stop_id in answer else len(answer)
            result.append(answer[:n])
            argmaxes.append(best[:n])
        return result, argmaxes

    def generate(self, prompts, max_new_tokens, batch_size, stop_id, temperatures, top_p=1.0, deadline=None, label="",
                 generator=None, with_argmax=False):
        """Continuations of `prompts` in the given order, batched by length inside windows of
        8 batches (a deadline then cuts every kind of prompt alike). Batches not started by
        `deadline` (time.time()) are left out: their entries are None. `with_argmax`: also
        the target's argmax at every position of each continuation (generate_batch's)."""
        out, best = [None] * len(prompts), [None] * len(prompts)
        done_tokens, t0 = 0, time.time()
        window = batch_size * 8
        for w in range(0, len(prompts), window):
            order = sorted(range(w, min(len(prompts), w + window)), key=lambda i: len(prompts[i]))
            for s in range(0, len(order), batch_size):
                if deadline is not None and time.time() > deadline:
                    log(f"{label}: time is up after {sum(o is not None for o in out)} of {len(prompts)} prompts")
                    return (out, best) if with_argmax else out
                rows = order[s:s + batch_size]
                answers, argmaxes = self.generate_batch([prompts[i] for i in rows], max_new_tokens, stop_id,
                                                        [temperatures[i] for i in rows], top_p, generator)
                for i, a, m in zip(rows, answers, argmaxes):
                    out[i], best[i] = a, m
                    done_tokens += len(a)
                log(f"{label}: {sum(o is not None for o in out)}/{len(prompts)} prompts, {done_tokens} tokens, "
                    f"{done_tokens / (time.time() - t0):.0f} tokens/s")
        return (out, best) if with_argmax else out


def check_against(fast, model, prompts):
    """Max |difference| of last-token logits against the Hugging Face model (relative to the
    logits' spread) and the share of equal argmaxes."""
    with torch.no_grad():
        ours = fast.last_logits(prompts)
        ref = torch.stack([model(input_ids=torch.tensor([p], device=model.device)).logits[0, -1].float() for p in prompts])
    diff = ((ours - ref).abs().max() / ref.std()).item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return diff, agree

"""The DFlash drafter (z-lab's `DFlashDraftModel`, arXiv 2602.06036) in PyTorch, exactly as
Fulgur's Sources/Fulgur/Models/DFlashDrafter.swift runs it: the reference for its forward
pass (recipes/fixtures/make_drafter_reference.py), the model that recipes/dflash/train.py
trains, and the drafter that recipes/dflash/evaluate.py decodes with.

The drafter has no embedding or LM head of its own; the target's are used. Its context is the
target's hidden states after `target_layer_ids` (the output of those decoder layers, before
any final norm), concatenated per token, projected by `fc` and RMS-normed by `hidden_norm`.
Every decoder layer turns that fused feature into keys and values with its own k_proj/v_proj
(k_norm, then RoPE at the token's position; no input_layernorm), and those are cached. A block
is [last accepted token, mask, mask, ...] at the positions that follow the context; its
Qwen3-style layers attend to all cached context and to the whole block (no causal mask), and
`norm` + the target's LM head give a logit row per block position.

Tensor names are the published ones (fc.weight, hidden_norm.weight, norm.weight,
layers.N.{input_layernorm,post_attention_layernorm}.weight,
layers.N.self_attn.{q,k,v,o}_proj.weight, layers.N.self_attn.{q,k}_norm.weight,
layers.N.mlp.{gate,up,down}_proj.weight), so `state_dict()` is the checkpoint.

Not covered: the sliding-window / sink variant (dflash_config.use_swa) that Fulgur also reads.
"""
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DrafterConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 8192
    extra: dict = field(default_factory=dict)  # other target keys kept in config.json (bos/eos ids)

    @staticmethod
    def read(path):
        c = json.load(open(path))
        if c.get("architectures") != ["DFlashDraftModel"]:
            raise ValueError(f"{path}: architectures {c.get('architectures')} is not ['DFlashDraftModel']")
        d = c["dflash_config"]
        if d.get("use_swa"):
            raise ValueError(f"{path}: the sliding-window drafter (use_swa) is not implemented here")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: only default RoPE is implemented here, got {rope}")
        heads = c["num_attention_heads"]
        return DrafterConfig(
            hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads", heads), head_dim=c.get("head_dim", c["hidden_size"] // heads),
            intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
            block_size=d.get("block_size", c.get("block_size", 16)), mask_token_id=d["mask_token_id"],
            target_layer_ids=list(d["target_layer_ids"]), num_target_layers=c.get("num_target_layers", 0),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            max_position_embeddings=c.get("max_position_embeddings", 4096))

    def to_json(self):
        """The published config format (Qwen3 keys + block_size + dflash_config)."""
        layers = self.num_hidden_layers
        return {
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
            "hidden_size": self.hidden_size, "num_hidden_layers": layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "intermediate_size": self.intermediate_size, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False, "tie_word_embeddings": False,
            "layer_types": ["full_attention"] * layers, "use_sliding_window": False, "sliding_window": None,
            "block_size": self.block_size, "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids},
            "dtype": "bfloat16",
            **self.extra,
        }


def spread_layer_ids(num_target_layers, count):
    """`count` target layers spread evenly from the 2nd to the 3rd-to-last (z-lab's choice)."""
    if count == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (count - 1))) for i in range(count)]


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float() if x.element_size() < 4 else x  # statistics in float32 at least
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary:
    """cos and sin of RoPE angles at `positions` [batch, tokens] (NeoX halves, as Qwen3 and
    Llama in transformers), computed once for a pass and shared by every layer. Angles in
    float64, as Fulgur computes them (transformers uses float32: a few 1e-4 radians apart at
    position 8192); cast to each dtype asked for on first use."""

    def __init__(self, positions, dim, theta):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
        angles = positions.to(torch.float64)[:, None, :, None] * inv  # [batch, 1, tokens, dim/2]
        self.cos, self.sin, self.cast = angles.cos(), angles.sin(), {}

    def tables(self, dtype):
        if dtype not in self.cast:
            self.cast[dtype] = (torch.cat([self.cos, self.cos], -1).to(dtype), torch.cat([self.sin, self.sin], -1).to(dtype))
        return self.cast[dtype]


def rope(x, rotary):
    """Rotates `x` [batch, heads, tokens, head_dim] by a `Rotary` of its positions."""
    cos, sin = rotary.tables(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def split(self, x, heads):
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)  # [batch, heads, tokens, head_dim]

    def keys_values(self, x, rotary):
        """Keys (k_norm, then RoPE by `rotary`, a `Rotary` of x's positions) and values of `x`
        [batch, tokens, hidden]: the context's (from the fused target feature) and the block's own."""
        k = rope(self.k_norm(self.split(self.k_proj(x), self.kv_heads)), rotary)
        return k, self.split(self.v_proj(x), self.kv_heads)

    def forward(self, x, rotary, context, mask):
        q = rope(self.q_norm(self.split(self.q_proj(x), self.heads)), rotary)
        k, v = self.keys_values(x, rotary)
        if context is not None:
            k, v = torch.cat([context[0], k], 2), torch.cat([context[1], v], 2)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        # No causal mask: the block sees all of the context and all of itself. A training batch
        # passes `mask` to keep each block to its own anchor's past and to itself.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, rotary, context, mask):
        x = x + self.self_attn(self.input_layernorm(x), rotary, context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def context(self, features, positions):
        """Per layer, the keys and values of target features [batch, tokens, len(ids) * hidden]
        at `positions` [batch, tokens]: what the drafter's cache holds."""
        fused = self.hidden_norm(self.fc(features))
        rotary = self.rotary(positions)
        return [layer.self_attn.keys_values(fused, rotary) for layer in self.layers]

    def rotary(self, positions):
        return Rotary(positions, self.config.head_dim, self.config.rope_theta)

    def forward(self, block_embeddings, positions, context, mask=None):
        """Final-normed hidden states of the block [batch, tokens, hidden] (embedded by the
        target) at `positions`, attending to `context` (from `context()`, or None)."""
        x, rotary = block_embeddings, self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, context[i] if context is not None else None, mask)
        return self.norm(x)

    @staticmethod
    def load(directory, device="cpu", dtype=torch.float32):
        from safetensors.torch import load_file
        c = DrafterConfig.read(os.path.join(directory, "config.json"))
        model = DFlashDrafter(c)
        state = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors") and name != "reference.safetensors":
                state.update(load_file(os.path.join(directory, name)))
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype)

    def save(self, directory, shard_bytes=15 * 2**20):
        """config.json and bf16 safetensors, in shards of at most `shard_bytes` (with the
        usual model.safetensors.index.json) when one file would be larger."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config.to_json(), f, indent=2)
            f.write("\n")
        state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in self.state_dict().items()}
        shards, size = [[]], 0
        for name, t in state.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        if len(shards) == 1:
            save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in names}, os.path.join(directory, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in names})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class DrafterCache:
    """The drafter's context during decoding, as Fulgur keeps it: per layer, keys and values of
    the accepted tokens' target features, at positions 0, 1, 2, ..."""

    def __init__(self, drafter: DFlashDrafter):
        self.drafter = drafter
        self.kv = None
        self.length = 0

    def extend(self, features):
        """Appends features [tokens, len(ids) * hidden] of the next accepted tokens."""
        n = features.shape[0]
        positions = torch.arange(self.length, self.length + n, device=features.device)[None]
        new = self.drafter.context(features[None], positions)
        self.kv = new if self.kv is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(self.kv, new)]
        self.length += n

    def block_logits(self, tokens, embed, lm_head):
        """Logits [len(tokens), vocab] of a block that starts at position `length` (the block
        does not enter the cache)."""
        positions = torch.arange(self.length, self.length + len(tokens), device=embed.weight.device)[None]
        x = embed(torch.tensor(tokens, device=embed.weight.device)[None]).to(self.drafter.fc.weight.dtype)
        return lm_head(self.drafter(x, positions, self.kv)[0].to(lm_head.weight.dtype))

    def propose(self, token, count, embed, lm_head):
        """The drafter's guesses for the `count` tokens after `token` (at position `length`)."""
        mask = self.drafter.config.mask_token_id
        logits = self.block_logits([token] + [mask] * count, embed, lm_head)
        return logits[1:].argmax(-1).tolist()


def training_mask(anchors, keep, context_len, block):
    """Attention mask [batch, 1, anchors * block, context_len + anchors * block] for many blocks
    of one sequence drafted at once: block i sees the context strictly before its anchor (at
    inference the anchor's own features are not known yet) and all of itself, and nothing of
    the other blocks; dropped blocks (`keep` False) see only themselves."""
    b, n = anchors.shape
    device = anchors.device
    q_block = torch.arange(n * block, device=device) // block  # [Q]
    kv = torch.arange(context_len + n * block, device=device)  # [K]
    anchor_of_q = anchors[:, q_block]  # [b, Q]
    sees_context = (kv[None, None, :] < context_len) & (kv[None, None, :] < anchor_of_q[:, :, None]) & keep[:, q_block][:, :, None]
    kv_block = (kv - context_len).div(block, rounding_mode="floor")
    sees_block = (kv[None, :] >= context_len) & (kv_block[None, :] == q_block[:, None])
    return (sees_context | sees_block[None]).unsqueeze(1)


def training_positions(anchors, block):
    """Positions [batch, anchors * block] of the blocks: anchor, anchor + 1, ..."""
    return (anchors[:, :, None] + torch.arange(block, device=anchors.device)).flatten(1)


def loss_weights(block, gamma, device):
    """Weight of block position k (0 is the given token, never predicted): exp(-(k-1)/gamma),
    so that early positions, which every accepted run needs, count most."""
    k = torch.arange(block, device=device, dtype=torch.float32)
    w = torch.exp(-(k - 1).clamp(min=0) / gamma)
    w[0] = 0
    return w


def gamma_for(block):
    """The decay z-lab's paper uses: 7 at block 16, 5 at 10, 4 at 8 (else block / 2)."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block, block / 2)


def init_weights(model, std=0.02):
    for name, p in model.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=std)
        else:
            nn.init.ones_(p)
    return model


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


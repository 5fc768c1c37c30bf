"""Muon (Keller Jordan, 2024): SGD with Nesterov momentum whose update for a weight matrix is
replaced by the nearest semi-orthogonal matrix, found with a few Newton-Schulz iterations.
Every direction of the update then moves by about the same amount, which suits the hidden
matrices of a transformer; vectors (norm gains) stay with AdamW.
"""
import torch


def orthogonalize(g, steps=5):
    """About U V^T for g = U S V^T: a quintic Newton-Schulz iteration tuned to push singular
    values into [0.7, 1.2] quickly rather than exactly to 1, run in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # singular values now at most 1
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """For 2-D parameters only. The update is scaled by sqrt(max(1, rows / cols)) so that its
    per-element size does not shrink for tall matrices."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(g) * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])

"""Reptile (Nichol et al. 2018), first-order meta-learning, written for a data-parallel engine.

Per outer step on each rank: copy θ0 into a plain module, take k optimizer steps on the rank's
task (``inner_loop``), and hand the pseudo-gradient g = θ0 − θk to the engine through
``surrogate_loss``: its gradient w.r.t. θ is exactly g, so the engine's all-reduce averages g over
ranks and its outer optimizer (SGD, lr ε) applies θ ← θ0 − ε·mean_r(g_r) = θ0 + ε·mean_r(θk − θ0).
With k = 1 and plain SGD this is ordinary data-parallel multi-task training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


def inner_loop(work: nn.Module, theta0: list[torch.Tensor], batches: Iterator, num_steps: int,
               optimizer: torch.optim.Optimizer, loss_fn: Callable) -> list[torch.Tensor]:
    """Load θ0 into ``work``, take ``num_steps`` steps of ``optimizer`` on ``batches``; return θ0 − θk."""
    with torch.no_grad():
        for p, p0 in zip(work.parameters(), theta0):
            p.copy_(p0)
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(work, next(batches))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return [p0 - p for p, p0 in zip(work.parameters(), theta0)]


def scale_task_heads(pseudo_grads: list[torch.Tensor], names: list[str], head_prefix: str,
                     task: str, factor: float) -> None:
    """Multiply the pseudo-gradient of ``task``'s head by ``factor`` = R / n_τ in place.

    The engine averages over all R ranks, but only n_τ of them trained this head; rescaling makes the
    head's step the mean over the ranks that trained it, independent of cluster size. Heads of other
    tasks have g = 0 already (the inner loop never touched them)."""
    for name, grad in zip(names, pseudo_grads):
        if name.startswith(f"{head_prefix}{task}."):
            grad.mul_(factor)


def surrogate_loss(params: list[torch.Tensor], pseudo_grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i ⟨p_i, g_i⟩ with g detached: ∂/∂p_i = g_i, every parameter touched in a fixed order
    (the same autograd graph on every rank, which ZeRO-2 needs)."""
    return sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, pseudo_grads))

"""The one outer step (mlfound/meta/methods.py), written for a data-parallel engine; pure torch.

Per outer step on each rank: copy θ0 into a plain module, take k steps of the inner optimizer on the rank's
task (``inner_loop``), and hand the engine what its outer optimizer steps on (``pseudo_gradient``) through
``surrogate_loss``: its gradient w.r.t. θ is exactly that tensor, so the engine's all-reduce averages it over
ranks and the outer optimizer applies it. Reptile (Nichol et al. 2018) is k Adam steps inside and SGD at lr ε
on θ0 − θk outside: θ ← θ0 + ε·mean_r(θk − θ0). Joint training is one SGD step at lr 1 inside, whose
pseudo-gradient is the gradient bit for bit, and Adam outside.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from mlfound.config import InnerOptimizerConfig


def inner_optimizer(inner: InnerOptimizerConfig, parameters) -> torch.optim.Optimizer:
    if inner.name == "sgd":
        return torch.optim.SGD(parameters, lr=inner.lr)
    return torch.optim.Adam(parameters, lr=inner.lr, betas=inner.betas)


def inner_loop(work: nn.Module, theta0: list[torch.Tensor], batches: Iterator, num_steps: int,
               optimizer: torch.optim.Optimizer, loss_fn: Callable) -> list[torch.Tensor]:
    """Load θ0 into ``work``, take ``num_steps`` steps of ``optimizer`` on ``batches``; return θ0 − θk.

    Under plain SGD (no momentum) that is lr·Σ∇, summed as the steps go rather than subtracted at the end, so
    it carries no rounding of θ: one step at lr 1 returns the gradient exactly."""
    with torch.no_grad():
        for p, p0 in zip(work.parameters(), theta0):
            p.copy_(p0)
    sgd_lr = _plain_sgd_lr(optimizer)
    summed = [torch.zeros_like(p0) for p0 in theta0] if sgd_lr is not None else None
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(work, next(batches))
        loss.backward()
        if summed is not None:
            with torch.no_grad():
                for total, p in zip(summed, work.parameters()):
                    if p.grad is not None:
                        total.add_(p.grad, alpha=sgd_lr)
        optimizer.step()
    if summed is not None:
        return summed
    with torch.no_grad():
        return [p0 - p for p, p0 in zip(work.parameters(), theta0)]


def _plain_sgd_lr(optimizer: torch.optim.Optimizer) -> float | None:
    group = optimizer.param_groups[0]
    plain = (type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1 and not group["momentum"]
             and not group["weight_decay"] and not group["maximize"])
    return group["lr"] if plain else None


def pseudo_gradient(displacement: list[torch.Tensor], inner_lr: float, outer: str) -> list[torch.Tensor]:
    """What the outer optimizer steps on: θ0 − θk itself for ``interpolation`` (its lr is Reptile's ε), else
    the pseudo-gradient (θ0 − θk) / inner lr, which for one plain SGD step is the gradient."""
    if outer == "interpolation":
        return displacement
    return [d.div_(inner_lr) for d in displacement]


def scale_task_heads(pseudo_grads: list[torch.Tensor], names: list[str], head_prefix: str, factor: float) -> None:
    """Multiply the pseudo-gradient of a task's head (parameters named ``head_prefix``..., see
    ``Potential.head_prefix``) by ``factor`` = R / n_τ in place.

    The engine averages over all R ranks, but only n_τ of them trained this head; rescaling makes the
    head's step the mean over the ranks that trained it, independent of cluster size. Heads of other
    tasks have g = 0 already (the inner loop never touched them)."""
    for name, grad in zip(names, pseudo_grads):
        if name.startswith(head_prefix):
            grad.mul_(factor)


def surrogate_loss(params: list[torch.Tensor], pseudo_grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i ⟨p_i, g_i⟩ with g detached: ∂/∂p_i = g_i, every parameter touched in a fixed order
    (the same autograd graph on every rank, which ZeRO-2 needs)."""
    return sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, pseudo_grads))

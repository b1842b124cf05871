"""The pretraining methods: named points of the one outer step every run takes.

An outer step on each rank: k inner steps of the inner optimizer on a copy of the weights θ0, on the rank's
task; the pseudo-gradient g = (θ0 − θk) / inner lr, averaged over ranks; one step of the outer optimizer on g
(``interpolation`` instead moves θ0 the fraction lr of the way to the ranks' mean θk: Reptile's update).
With k = 1 and plain SGD at lr 1 inside, g is the gradient itself, so joint multi-task training is this
same step with an outer Adam, not another program. A method sets the ``meta`` fields below; a config may
still set any of them by hand, and the run's ``config.json`` records the values it used.

The trainer (``meta.method``), the paper experiment (``pretrain.methods``) and the documentation read this
one table, so a name means the same everywhere.
"""
from __future__ import annotations

_REPTILE_INNER = {"name": "adam", "lr": 3e-3, "betas": (0.0, 0.999), "persist": False}
_REPTILE_OUTER = {"name": "interpolation", "lr": 1.0, "lr_final": 0.0}
_JOINT_INNER = {"name": "sgd", "lr": 1.0, "persist": False}  # one plain step at lr 1: g is the gradient
_JOINT_OUTER = {"name": "adam", "lr": 2e-3, "lr_final": 2e-4, "betas": (0.9, 0.999)}
_JOINT = {"inner_steps": 1, "inner": _JOINT_INNER, "outer": _JOINT_OUTER, "rescale_heads": False}


def _reptile(k: int) -> dict:
    return {"description": f"Reptile as the seed paper runs it: {k} inner Adam step{'s' * (k > 1)} (beta1 0, "
                           "fresh each outer step), outer interpolation annealed from 1 to 0, head steps rescaled"
                           + (" (not joint: its one step is about lr·sign(g))" if k == 1 else ""),
            "meta": {"inner_steps": k, "inner": _REPTILE_INNER, "outer": _REPTILE_OUTER, "rescale_heads": True}}


# adam_outer's inner SGD rate, chosen on E1's fine-tuning validation (seed 0, N = 10 and 50) among 0.003, 0.01 and
# 0.03 (0.1 diverged): docs/results/e1-e2.md, "Equal optimizers"
_ADAM_OUTER_INNER_LR = 3e-3


def _adam_outer(k: int) -> dict:
    inner = {"name": "sgd", "lr": _ADAM_OUTER_INNER_LR, "persist": False}
    joint_itself = " (k = 1: joint itself)" if k == 1 else ""
    return {"description": f"{k} inner SGD steps (lr {_ADAM_OUTER_INNER_LR:g}), then joint's outer Adam on the "
                           f"pseudo-gradient: differs from joint in k alone{joint_itself}",
            "meta": {**_JOINT, "inner_steps": k, "inner": inner}}


METHODS: dict[str, dict] = {
    "joint": {"description": "multi-task training: each rank one gradient step on its own task's batch, the "
                             "gradients averaged, Adam", "meta": _JOINT},
    "single": {"description": "joint on one task (meta.single_task) on every rank", "meta": _JOINT},
    **{f"reptile_k{k}": _reptile(k) for k in (1, 5, 20)},
    **{f"adam_outer_k{k}": _adam_outer(k) for k in (1, 5, 20)},
}


def method_fields(name: str) -> dict:
    """The ``meta`` fields method ``name`` sets; an unknown name is a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {sorted(METHODS)} (mlfound/meta/methods.py)")
    return METHODS[name]["meta"]


# The keys of configs written before this table (meta.mode and flat learning rates): checkpoints and releases
# of older runs still hold them, and are read as the point they ran.
_OLDER_KEYS = {"mode", "inner_lr", "outer_lr", "outer_lr_final"}


def from_older_form(meta: dict) -> dict:
    """``meta`` of an older config (mode, inner_lr, outer_lr, outer_lr_final, with their old defaults: k 10, inner
    Adam 1e-3, outer 1 -> 0) as the method and fields it ran; any other ``meta`` as it is."""
    older = _OLDER_KEYS & meta.keys()
    if not older:
        return meta
    if {"method", "inner", "outer"} & meta.keys():
        raise ValueError(f"meta: {sorted(older)} are the older form of meta.method, meta.inner and meta.outer; "
                         "use one form, not both")
    rest = {key: value for key, value in meta.items() if key not in _OLDER_KEYS}
    outer_lrs = {"lr": meta.get("outer_lr", 1.0), "lr_final": meta.get("outer_lr_final", 0.0)}
    mode = meta.get("mode", "reptile")
    if mode not in ("reptile", "joint", "single"):
        raise ValueError(f"meta.mode {mode!r} is not one of reptile, joint, single (older configs; now meta.method)")
    if mode in ("joint", "single"):  # their inner_steps and inner_lr never did anything
        rest.pop("inner_steps", None)
        return {**rest, "method": mode, "outer": {"name": "adam", **outer_lrs}}
    k = rest.setdefault("inner_steps", 10)
    return {**rest, "method": f"reptile_k{k}" if f"reptile_k{k}" in METHODS else "reptile_k5",
            "inner": {"name": "adam", "lr": meta.get("inner_lr", 1e-3)},
            "outer": {"name": "interpolation", **outer_lrs}}

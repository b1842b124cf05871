"""mlfound: pretrain one interatomic potential on many levels of theory, fine-tune it, run it in ASE.

    import mlfound
    release = mlfound.load("demo-reptile")                     # a release file or a registry name
    calc = mlfound.MLFoundCalculator(release, head="pbe0_631gs")
    mlfound.export("runs/demo/pretrain", "model.safetensors")  # a training run's latest checkpoint

The names below are imported on first use, so ``import mlfound.data`` stays light (no e3nn, no ASE).
Fine-tuning and evaluation live in ``mlfound.finetune`` and ``mlfound.evaluate``.
"""
import importlib

_LAZY = {"load": "mlfound.release", "Release": "mlfound.release", "MLFoundCalculator": "mlfound.calculator",
         "export": "mlfound.train.export"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlfound' has no attribute {name!r}")

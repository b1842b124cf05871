"""One small readout per task on the shared trunk.

Every head runs on every atom and a fixed one-hot mask selects each atom's task: the autograd
graph is then identical on every rank, which ZeRO-1/2 needs: with rank-dependent sets of used parameters,
DeepSpeed 0.19's ZeRO-1/2 silently corrupts gradients (no error), measured on our machines.
"""
import torch
from torch import nn

from mlfound.model.ops import one_hot


class TaskHeads(nn.Module):
    def __init__(self, task_names: list[str], channels: int, hidden: int):
        super().__init__()
        self.task_names = list(task_names)
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            for name in self.task_names})

    def forward(self, features_NC: torch.Tensor, task_index_N: torch.Tensor) -> torch.Tensor:
        """(N, C) invariant features, (N,) task positions -> (N,) per-atom outputs of each atom's head."""
        outputs_TN = torch.stack([self.heads[name](features_NC).squeeze(-1) for name in self.task_names])
        mask_TN = one_hot(task_index_N, len(self.task_names), outputs_TN.dtype).T
        return (outputs_TN * mask_TN).sum(0)

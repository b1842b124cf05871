"""Small tensor helpers the model shares."""
import torch

# e3nn compiles each tensor product into a torch.fx GraphModule whose constants (Clebsch-Gordan blocks for l >= 2
# paths) are plain attributes, but a deepcopy (ema-pytorch's, fine-tuning's) registers them as buffers: they are
# rebuilt from the architecture, so state dicts neither write nor expect them (else a copied model's release would
# not load into a fresh one), and the compiled force graph keeps them as constants
COMPILED_CONSTANT = "._compiled_main_"


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the identity: ``torch.nn.functional.one_hot`` without its check of the largest index, which reads a
    value on the host and so stops ``make_fx`` from tracing the force graph (mlfound.model.compiled); callers check
    the indices on the host (unknown elements in ``Potential.species``, tasks in the collate)."""
    return torch.eye(num_classes, dtype=dtype, device=index.device)[index]

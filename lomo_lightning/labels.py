"""What a label means to the losses: :data:`IGNORE_INDEX`, the label of a token that no loss counts.

The data modules write it (prompt tokens, padding), the losses and metrics skip it; both import it from
here, a module that imports nothing, so that neither depends on the other for it.
"""

# PyTorch's cross_entropy default ignore_index, and Hugging Face's label for "not a target"
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX"]

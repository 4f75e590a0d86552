"""Sparse fine-tuning as SpIEL does it (Ansell et al., 2024; reference: AlanAnsell/peft ``tuners/sft``).

- :mod:`.config`: :class:`SFTConfig`, the budget, targets, schedule and base quantization.
- :mod:`.layer`: :class:`SparseDeltaLinear`, a frozen base weight plus fp32 values at ``k`` indices.
- :mod:`.regrowth`: pruning and regrowth of one layer (accumulated gradients, or SM3 accumulators).
- :mod:`.quantize`: the frozen base stored weight-only quantized (qSpIEL).
- :mod:`.model`: :class:`SparseFineTuning`, which applies all of it to a model and runs the schedule.
"""

from lomo_lightning.selection.sft.config import SFTConfig, SftConfig
from lomo_lightning.selection.sft.layer import SparseDeltaLinear
from lomo_lightning.selection.sft.model import SparseFineTuning, apply_sparse_delta, delta_size_report, merge_sparse_deltas

__all__ = [
    "SFTConfig",
    "SftConfig",
    "SparseDeltaLinear",
    "SparseFineTuning",
    "apply_sparse_delta",
    "delta_size_report",
    "merge_sparse_deltas",
]

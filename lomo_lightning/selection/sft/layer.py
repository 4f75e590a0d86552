"""A linear layer that learns a sparse, fp32 delta on top of a frozen (possibly quantized) base weight."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomo_lightning._compat import csr_row_pointers, version_counter
from lomo_lightning.layout import MATRIX_ENTRIES
from lomo_lightning.selection.sft.quantize import dense_weight

# Called once per autograd node with the layer's output gradient and input as 2-D (tokens x features)
# matrices, inside its backward: what a growth rule needs beyond the gradient of the active values.
GradientObserver = Callable[[Tensor, Tensor], None]


def index_dtype(numel: int) -> torch.dtype:
    """int32 for flat indices into a tensor of fewer than 2^31 entries, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


class SparseDeltaLinear(nn.Module):
    r"""``y = x (W_0 + \Delta)^T + b``: a frozen base weight and a trainable delta at ``k`` of its entries.

    ``weight`` is the base :math:`W_0`, frozen, in any dtype or weight-only quantized; ``values`` is an
    fp32 ``nn.Parameter`` of ``k`` entries; ``indices`` (a buffer, int32 below 2^31 entries, sorted)
    says where they sit in the flattened weight. :math:`\Delta` is zero elsewhere, so every inactive
    entry of the effective weight is exactly :math:`W_0`'s, and weight decay of the values pulls the
    weight toward :math:`W_0`. The state dict keeps ``weight`` and ``bias`` under the names of the
    ``nn.Linear`` it replaces.

    Forward and backward each form the merged weight :math:`W_0 + \Delta` in :math:`W_0`'s dtype (the
    base dequantized) and free it before returning: nothing the size of the weight is saved between them.
    Backward returns the gradient of ``values`` without the dense weight gradient: it samples
    :math:`G^T X` at the active entries (``torch.sparse.sampled_addmm``, in fp32, as the custom operator
    ``lomo_lightning::sampled_gradient``, whose fake implementation lets fake tensors run the backward). A
    ``gradient_observer`` (set by accumulated-gradient regrowth during its window) is handed :math:`G`
    and :math:`X` once per autograd node, so a second backward over the same graph (the norm-measuring
    pass of two-pass clipping) is not counted twice.

    ``values`` carries ``matrix_entries`` (see :func:`lomo_lightning.layout.matrix_entries`), so that
    SM3 keeps row and column accumulators of the whole matrix for it.
    """

    indices: Tensor  # a buffer (register_buffer)

    def __init__(self, base: nn.Linear, indices: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = self.weight.device
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device))
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype(self.weight.numel())).sort().values)
        self.gradient_observer: GradientObserver | None = None
        self._pattern: tuple[Tensor, int, CsrIndices] | None = None
        self._link_values()

    def forward(self, input: Tensor) -> Tensor:
        self._link_values()  # deepcopy and parameter swaps drop a parameter's attributes
        return _SparseDeltaLinearFunction.apply(input, self.weight, self.values, self.indices, self.bias, self)

    def merged_weight(self) -> Tensor:
        """``W0 + Delta`` as a new dense tensor in the base's dtype (what forward multiplies by)."""
        return merged_weight(self.weight, self.values.detach(), self.indices)

    def sparsity_pattern(self) -> CsrIndices:
        """The active entries as the indices of an ``(out, in)`` CSR matrix, rebuilt only after ``indices`` changed."""
        if self._pattern is None or self._pattern[0] is not self.indices or self._pattern[1] != version_counter(self.indices):
            self._pattern = (self.indices, version_counter(self.indices), csr_indices(self.indices, self.weight_shape))
        return self._pattern[2]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.values.numel()}, bias={self.bias is not None}"

    def _matrix_entries(self) -> tuple[Tensor, tuple[int, int]]:
        return self.indices, self.weight_shape

    def _link_values(self) -> None:
        if getattr(self.values, MATRIX_ENTRIES, None) is None:
            setattr(self.values, MATRIX_ENTRIES, self._matrix_entries)


def merged_weight(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``dense(W0)`` with ``values`` added at the flat ``indices``, as a new tensor in ``W0``'s dtype."""
    base = dense_weight(weight)
    merged = base.detach().clone(memory_format=torch.contiguous_format) if base is weight else base.contiguous()
    merged.view(-1).index_add_(0, indices, values.to(merged.dtype))
    return merged


class CsrIndices(NamedTuple):
    """The sparsity pattern of an ``(out, in)`` matrix in CSR form: row offsets and column indices, dense tensors.

    Dense, not a sparse CSR tensor, so that fake tensors (which have no sparse layouts) can carry it too.
    """

    crow_indices: Tensor
    col_indices: Tensor


def csr_indices(indices: Tensor, shape: tuple[int, int]) -> CsrIndices:
    """The CSR pattern of the sorted flat ``indices`` into a matrix of ``shape``."""
    rows = torch.div(indices, shape[1], rounding_mode="floor")
    cols = indices - rows * shape[1]
    crow = csr_row_pointers(rows, shape[0], out_int32=indices.dtype == torch.int32)
    return CsrIndices(crow, cols)


def sampled_weight_gradient(grad_output: Tensor, input: Tensor, pattern: CsrIndices) -> Tensor:
    """``(G^T X)`` at the entries of ``pattern`` (row-major order), in fp32, without forming ``G^T X``."""
    return torch.ops.lomo_lightning.sampled_gradient(grad_output.float(), input.float(), *pattern)


@torch.library.custom_op("lomo_lightning::sampled_gradient", mutates_args=())
def _sampled_gradient(grad_output: Tensor, input: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """``(G^T X)`` at the CSR pattern's entries: ``grad_output`` is ``tokens x out``, ``input`` ``tokens x in``, fp32."""
    shape = (grad_output.shape[1], input.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow_indices, col_indices, torch.zeros(col_indices.numel(), device=input.device), shape, check_invariants=False
        )  # zeros that sampled_addmm multiplies by beta=0
        return torch.sparse.sampled_addmm(pattern, grad_output.t(), input, beta=0.0).values()


@_sampled_gradient.register_fake
def _(grad_output: Tensor, input: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    # the result only; what the real kernel allocates on the way (the pattern's zero values) is k floats more
    return input.new_empty(col_indices.numel())


class _SparseDeltaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, layer: SparseDeltaLinear) -> Tensor:
        ctx.save_for_backward(input, weight, values, indices, bias)
        ctx.layer = layer
        ctx.observer = layer.gradient_observer
        return F.linear(input, merged_weight(weight, values.detach(), indices), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, values, indices, bias = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        input_2d = input.reshape(-1, input.shape[-1])
        grad_input = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            merged = merged_weight(weight, values.detach(), indices)
            grad_input = (grad_2d @ merged.to(grad_2d.dtype)).view(*input.shape[:-1], merged.shape[1])
            del merged
        if ctx.needs_input_grad[2]:
            grad_values = sampled_weight_gradient(grad_2d, input_2d, layer.sparsity_pattern())
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = grad_2d.sum(0)
        if ctx.observer is not None:
            observer, ctx.observer = ctx.observer, None  # once per node: a retained graph's second pass is not counted
            observer(grad_2d, input_2d)
        return grad_input, None, grad_values, None, grad_bias, None


__all__ = ["CsrIndices", "GradientObserver", "SparseDeltaLinear", "csr_indices", "index_dtype", "merged_weight", "sampled_weight_gradient"]

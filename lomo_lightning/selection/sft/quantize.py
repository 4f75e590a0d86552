"""A frozen base weight stored weight-only quantized (torchao), and read back as a dense tensor.

Sparse fine-tuning never updates the base weight ``W0``: it only reads it, once in forward and once in
backward of its layer, so it can live quantized (qSpIEL, as QLoRA does for LoRA). Both formats are
torchao tensor subclasses that dequantize on any device:

- ``"int8"``: symmetric int8 per output channel (``Int8WeightOnlyConfig``), 1 byte per entry.
- ``"nf4"``: 4-bit NormalFloat in blocks of 64 with double-quantized scales (``to_nf4``, QLoRA's format),
  about 0.53 bytes per entry.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


def quantize_weight(linear: nn.Linear, scheme: str) -> None:
    """Replace ``linear.weight`` by its frozen, weight-only quantized copy (``scheme``: ``"int8"`` or ``"nf4"``)."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ImportError("quantize_base needs torchao: pip install torchao (it must not replace your torch)") from None
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig(), filter_fn=lambda module, _: module is linear)
    elif scheme == "nf4":
        try:
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError:  # torchao >= 0.18 moved it
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        numel = linear.weight.numel()
        if numel % NF4_BLOCK:
            raise ValueError(f"quantize_base='nf4' needs weights whose entry count is a multiple of {NF4_BLOCK}, got {numel}")
        # the scales are quantized again in blocks, which must divide their number
        scaler_block = math.gcd(numel // NF4_BLOCK, NF4_SCALER_BLOCK)
        linear.weight = nn.Parameter(to_nf4(linear.weight.detach(), NF4_BLOCK, scaler_block), requires_grad=False)
    else:
        raise ValueError(f"unknown quantization {scheme!r}: 'int8' or 'nf4'")
    linear.weight.requires_grad_(False)


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensor subclasses."""
    return type(weight).__module__.startswith("torchao.")


def dense_weight(weight: Tensor) -> Tensor:
    """``weight`` as a dense tensor in its original dtype: dequantized when it is quantized, itself otherwise."""
    if not is_quantized(weight):
        return weight
    original = getattr(weight, "get_original_weight", None)  # NF4
    return original() if original is not None else weight.dequantize()


__all__ = ["dense_weight", "is_quantized", "quantize_weight"]

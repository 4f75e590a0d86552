"""Activation offloading: what autograd saves in forward for backward waits in host memory instead of the device's.

Under activation checkpointing what a transformer saves is little: each block's input, kept for its
recomputation, and the tensors around the blocks (embeddings, final norm, LM head). On LLaMA-7B with a batch
of 8 x 512 tokens that is 32 blocks x 32 MiB, a gigabyte that sits idle from the block's forward to its backward.
Offloaded, each is copied to pinned host memory as it is saved (on a side stream, so the copy overlaps the next
block's compute) and copied back when backward reaches it: the device holds a block's input only while the
block runs. As torchtune's ``OffloadActivations`` does, parameters (and gathered FSDP2 parameters, which are
parameters too) and tensors under ``min_bytes`` stay where they are.

It pays where device memory is scarce and the host's is not, the copies small against the compute: an
accelerator with activation checkpointing on. On a CPU the host memory *is* the device's, so ``"auto"`` leaves
it off there (:func:`offloading_pays`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

# Saved tensors smaller than this stay on the device: copying them costs more than it frees (torchtune's 1 KiB).
MIN_OFFLOAD_BYTES = 1024


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    """A context in which every tensor autograd saves (but parameters and small ones) goes to ``host`` memory.

    Usage: ``with ActivationOffloading(): loss = model(**batch).loss`` then ``loss.backward()`` anywhere; the
    hooks travel with the saved tensors. Results are those of training without it, bit for bit: the values are
    copied, not changed.

    Args:
        host: where the saved tensors wait; ``"cpu"`` (the default, pinned when an accelerator exists).
            Another device (``"meta"``) lets a fake-tensor estimate count the device's bytes apart from them.
        min_bytes: tensors smaller than this are kept where they are.
        pin_memory: page-locked host buffers, which accelerators copy to and from asynchronously; default:
            where an accelerator is available.
    """

    def __init__(self, host: str | torch.device = "cpu", min_bytes: int = MIN_OFFLOAD_BYTES, pin_memory: bool | None = None):
        self.host = torch.device(host)
        self.min_bytes = min_bytes
        accelerator = torch.accelerator.is_available()
        self.pin_memory = accelerator and self.host.type == "cpu" if pin_memory is None else pin_memory
        self.offloaded_bytes = 0  # what went to the host in this context: what the device did not hold
        self._in_flight: list[tuple[Tensor, Any]] = []  # device tensors whose copy to the host may not be done
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffloading:  # type: ignore[override]  # the base returns None; "as" gets the statistics
        super().__enter__()
        return self

    def _pack(self, tensor: Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        stream = _copy_stream(tensor.device)
        if stream is None:
            packed = tensor.to(self.host, copy=True)
        else:
            # the copy waits for the tensor to be computed, then runs beside the compute stream; the device tensor
            # is held until the copy is done, so its memory is not reused under it
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, device=self.host, pin_memory=self.pin_memory)
            stream.wait_stream(torch.accelerator.current_stream(tensor.device))
            with torch.accelerator.device_index(tensor.device.index), stream:
                packed.copy_(tensor, non_blocking=True)
            self._in_flight = [(t, e) for t, e in self._in_flight if not e.query()]
            self._in_flight.append((tensor, stream.record_event()))
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return tensor.device, packed

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        device, tensor = packed
        if self._in_flight:  # backward has begun: every copy to the host must be done before one is read back
            torch.accelerator.current_stream(device).wait_stream(_copy_stream(device))  # type: ignore[arg-type]
            self._in_flight.clear()
        return tensor.to(device, non_blocking=self.pin_memory)


_streams: dict[torch.device, torch.Stream] = {}


def _copy_stream(device: torch.device) -> torch.Stream | None:
    """A side stream of ``device`` for the copies to the host, made once per device; ``None`` on a CPU."""
    if device.type in ("cpu", "meta") or not torch.accelerator.is_available():
        return None
    if device not in _streams:
        _streams[device] = torch.Stream(device=device)
    return _streams[device]


def offloading_pays(model: nn.Module) -> bool:
    """``"auto"``: on for a model on an accelerator with activation checkpointing on (what is saved is then the
    blocks' inputs, cheap to move); off on a CPU, and without checkpointing (every activation would cross)."""
    parameter = next(model.parameters(), None)
    on_accelerator = parameter is not None and parameter.device.type not in ("cpu", "meta")
    return on_accelerator and bool(getattr(model, "is_gradient_checkpointing", False))


def saved_activations(model: nn.Module, offloading: bool | str) -> contextlib.AbstractContextManager[Any]:
    """The context a training forward runs in: :class:`ActivationOffloading` if ``offloading`` (``True``, or
    ``"auto"`` where :func:`offloading_pays`), else nothing."""
    if offloading not in (True, False, "auto"):
        raise ValueError(f"activation_offloading must be true, false or auto, got {offloading!r}")
    on = offloading is True or (offloading == "auto" and offloading_pays(model))
    return ActivationOffloading() if on else contextlib.nullcontext()


__all__ = ["MIN_OFFLOAD_BYTES", "ActivationOffloading", "offloading_pays", "saved_activations"]

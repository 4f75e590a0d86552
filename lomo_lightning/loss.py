"""The causal-LM loss without the full logits: the LM head and cross-entropy run a chunk of tokens at a time.

Hugging Face's loss materializes the logits of every token, upcasts them to fp32, and keeps their
gradient: 8 bytes x vocabulary per token (256 KB per token for a 32k vocabulary), often the largest
tensor of fused training once the gradients and optimizer state are gone. Chunked, under activation
checkpointing, forward and backward hold one chunk's logits at a time, and the gradient is the same.
"""

from __future__ import annotations

import types
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Config attributes of models whose logits are not ``lm_head(hidden)``: their own forward must make them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: int = 512,
    **model_kwargs: Any,
) -> Tensor:
    """``model(input_ids, labels=labels).loss``, with at most ``chunk_tokens`` rows of logits alive at once.

    The decoder (``model.base_model``) runs as usual; its hidden states then go through the LM head
    (``model.get_output_embeddings()``) and cross-entropy ``chunk_tokens`` tokens at a time, each chunk
    under non-reentrant activation checkpointing. The loss is the mean over the labelled tokens
    (``labels != -100``, shifted by one as Hugging Face does). The LM head's weight is used by every
    chunk but receives one accumulated gradient, so fused updates see it once.

    Works for models whose logits are ``lm_head(hidden)`` (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...);
    models that scale or cap their logits are refused. ``model_kwargs`` (``attention_mask``, ...) go
    to the decoder. Under FSDP2 (``model`` the ``fully_shard``-ed root) the loss runs as a registered
    forward method of the root, so that its parameters are gathered for it and for its recomputation.
    """
    check_chunked_loss(model, chunk_tokens)
    if _is_fully_sharded(model):
        # FSDP2 gathers the root's parameters (embeddings, final norm, LM head) around the root's forward
        # methods: the loss must be one of them, also for the recomputation of its chunks in backward
        if not getattr(model, "_lomo_chunked_loss_registered", False):
            from torch.distributed.fsdp import register_fsdp_forward_method

            object.__setattr__(model, "lomo_chunked_loss", types.MethodType(_chunked_loss, model))
            register_fsdp_forward_method(model, "lomo_chunked_loss")
            object.__setattr__(model, "_lomo_chunked_loss_registered", True)
        return model.lomo_chunked_loss(input_ids, labels, chunk_tokens, **model_kwargs)
    return _chunked_loss(model, input_ids, labels, chunk_tokens, **model_kwargs)


def _chunked_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: int, **model_kwargs: Any) -> Tensor:
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=input_ids, **model_kwargs)[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # the label of position t is the token at t + 1; the last position of each row predicts nothing
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    total = sum(
        checkpoint(_chunk_loss, head, states, chunk_targets, use_reentrant=False)
        for states, chunk_targets in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))
    )
    return total / (targets != IGNORE_INDEX).sum()


def _is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_chunked_loss(model: nn.Module, chunk_tokens: int) -> nn.Module:
    """Raise a clear error unless :func:`chunked_causal_lm_loss` computes ``model``'s own loss; return its LM head."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(model, "base_model", model) is model:
        raise TypeError(
            f"the chunked loss needs a Hugging Face causal LM with an output embedding and a base model, "
            f"got {type(model).__name__}."
        )
    config = getattr(model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(
            f"{type(model).__name__} transforms its logits ({', '.join(transforms)}): the chunked loss would "
            "compute another loss. Train it without loss chunking."
        )
    return head


def _chunk_loss(head: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    # a Linear head as a function: module hooks (profilers, memory trackers) see one call per step, not per chunk
    logits = F.linear(states, head.weight, head.bias) if type(head) is nn.Linear else head(states)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


__all__ = ["check_chunked_loss", "chunked_causal_lm_loss"]

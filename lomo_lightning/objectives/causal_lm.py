"""Token log-probabilities of a causal LM, optionally without the full logits, and the causal-LM loss built on them.

Hugging Face's loss materializes the logits of every token, upcasts them to fp32, and keeps their
gradient: 8 bytes x vocabulary per token (256 KB per token for a 32k vocabulary), often the largest
tensor of fused training once the gradients and optimizer state are gone. Chunked, under activation
checkpointing, forward and backward hold one chunk's logits at a time, and the gradient is the same.
Every objective (the causal-LM loss here, DPO's sequence log-probabilities) is a sum of these token
log-probabilities, so they all get the chunking from :func:`token_log_probs`.

``chunk_tokens="auto"`` chunks only where it pays: when the batch's logits would take more than
:data:`LOGITS_FRACTION` of the device's memory (:func:`auto_chunk_tokens`).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lomo_lightning.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Config attributes of models whose logits are not ``lm_head(hidden)``: their own forward must make them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")

# "auto" chunks when the fp32 logits of a batch and their gradient (8 bytes x vocabulary a token) would exceed this
# share of the device's memory (490 MiB of a 24 GiB card: LLaMA-7B's 8 x 512 tokens, 1 GiB, are chunked), in
# chunks of about a quarter of it, a multiple of CHUNK_MULTIPLE tokens (512 tokens there: matrix products large
# enough for the LM head to run at full speed).
LOGITS_FRACTION = 0.02
CHUNK_MULTIPLE = 256
_LOGIT_BYTES_PER_ENTRY = 8  # the fp32 logits and their fp32 gradient

ChunkTokens = int | Literal["auto"] | None


def token_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: ChunkTokens = None,
    **model_kwargs: Any,
) -> Tensor:
    """``log p(labels[:, t + 1] | input_ids[:, :t + 1])`` at every position ``t``, in fp32; 0 where that label is -100.

    The result has the shape of ``input_ids``; its last column is 0 (the last position predicts
    nothing). ``model_kwargs`` (``attention_mask``, ...) go to the model.

    With ``chunk_tokens=None`` the model computes its logits as usual. With ``chunk_tokens=n`` the
    decoder (``model.base_model``) runs as usual, and its hidden states then go through the LM head
    (``model.get_output_embeddings()``) and log-softmax ``n`` tokens at a time, each chunk under
    non-reentrant activation checkpointing, so that at most ``n`` rows of logits are alive at once. The
    LM head's weight is used by every chunk but receives one accumulated gradient, so fused updates see
    it once. Chunking needs a model whose logits are ``lm_head(hidden)`` (Llama, Mistral, Qwen2, GPT-2,
    GPT-NeoX, ...; see :func:`check_chunked_loss`). Under FSDP2 (``model`` the ``fully_shard``-ed root)
    the chunked computation runs as a registered forward method of the root, so that its parameters are
    gathered for it and for its recomputation. ``chunk_tokens="auto"``: :func:`auto_chunk_tokens` of the batch.
    """
    return _token_statistics(model, input_ids, labels, chunk_tokens, False, **model_kwargs)[0]


def token_log_probs_and_mean_logits(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: ChunkTokens = None,
    **model_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`token_log_probs`, and (detached, fp32) each position's logits averaged over the vocabulary.

    The second is what TRL's ``logits/chosen`` and ``logits/rejected`` metrics average; it is taken from
    the logits the log-probabilities are computed from, chunk by chunk when chunked, so it costs no
    second pass.
    """
    log_probs, mean_logits = _token_statistics(model, input_ids, labels, chunk_tokens, True, **model_kwargs)
    assert mean_logits is not None  # asked for
    return log_probs, mean_logits


def _token_statistics(
    model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: ChunkTokens, with_mean_logits: bool, **model_kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(model, input_ids)
    if chunk_tokens is None:
        logits = model(input_ids=input_ids, **model_kwargs).logits
        return _log_probs_of_targets(logits.float(), next_token_targets(labels)), _mean_logits(logits, with_mean_logits)
    check_chunked_loss(model, chunk_tokens)
    if _is_fully_sharded(model):
        # FSDP2 gathers the root's parameters (embeddings, final norm, LM head) around the root's forward
        # methods: the chunked head must be one of them, also for the recomputation of its chunks in backward
        if not getattr(model, "_lomo_token_log_probs_registered", False):
            from torch.distributed.fsdp import register_fsdp_forward_method

            object.__setattr__(model, "lomo_token_log_probs", types.MethodType(_chunked_token_log_probs, model))
            register_fsdp_forward_method(model, "lomo_token_log_probs")
            object.__setattr__(model, "_lomo_token_log_probs_registered", True)
        return model.lomo_token_log_probs(input_ids, labels, chunk_tokens, with_mean_logits, **model_kwargs)  # type: ignore[operator]
    return _chunked_token_log_probs(model, input_ids, labels, chunk_tokens, with_mean_logits, **model_kwargs)


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: ChunkTokens = 512,
    **model_kwargs: Any,
) -> Tensor:
    """``model(input_ids, labels=labels).loss``, with at most ``chunk_tokens`` rows of logits alive at once.

    The mean negative log-likelihood of the labelled tokens (``labels != -100``, shifted by one as Hugging
    Face does), from :func:`token_log_probs` with ``chunk_tokens`` (``"auto"``: chunked where it pays,
    ``None``: the model's own logits). Models that scale or cap their logits are refused an explicit chunk size.
    """
    log_probs = token_log_probs(model, input_ids, labels, chunk_tokens, **model_kwargs)
    return -log_probs.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()


def sequence_log_probs(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    chunk_tokens: ChunkTokens = None,
    **model_kwargs: Any,
) -> Tensor:
    """``log p(labelled tokens of row i)`` for every row: :func:`token_log_probs` summed over each row (fp32)."""
    return token_log_probs(model, input_ids, labels, chunk_tokens, **model_kwargs).sum(-1)


def auto_chunk_tokens(model: nn.Module, input_ids: Tensor) -> int | None:
    """The chunk size ``"auto"`` takes for this batch: ``None`` (the model's own logits) unless the batch's fp32
    logits and their gradient would exceed :data:`LOGITS_FRACTION` of the device's memory and the model can be
    chunked; then the multiple of :data:`CHUNK_MULTIPLE` tokens whose logits take closest to a quarter of that."""
    from lomo_lightning.device_memory import device_memory_bytes

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    vocabulary = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocabulary is None:
        return None
    budget = LOGITS_FRACTION * device_memory_bytes(input_ids.device)
    per_token = _LOGIT_BYTES_PER_ENTRY * vocabulary
    if input_ids.numel() * per_token <= budget:
        return None
    try:
        check_chunked_loss(model, CHUNK_MULTIPLE)
    except (TypeError, ValueError):
        return None  # a model that makes its own logits: "auto" leaves it so
    return max(CHUNK_MULTIPLE, round(budget / 4 / per_token / CHUNK_MULTIPLE) * CHUNK_MULTIPLE)


def next_token_targets(labels: Tensor) -> Tensor:
    """The label each position predicts: position ``t`` predicts ``labels[:, t + 1]``; the last position -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _log_probs_of_targets(logits: Tensor, targets: Tensor) -> Tensor:
    # cross-entropy picks the target's log-softmax without another vocabulary-sized tensor, 0 at ignore_index
    flat = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -flat.view_as(targets)


def _mean_logits(logits: Tensor, wanted: bool) -> Tensor | None:
    return logits.detach().float().mean(-1) if wanted else None


def _chunked_token_log_probs(
    model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: int, with_mean_logits: bool, **model_kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    causal_lm = cast("PreTrainedModel", model)  # a Hugging Face causal LM: check_chunked_loss has checked it
    head = causal_lm.get_output_embeddings()
    hidden = causal_lm.base_model(input_ids=input_ids, **model_kwargs)[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = next_token_targets(labels)
    chunks = [
        checkpoint(_chunk_log_probs, head, states, chunk_targets, with_mean_logits, use_reentrant=False)
        for states, chunk_targets in zip(hidden.split(chunk_tokens), targets.reshape(-1).split(chunk_tokens))
    ]
    log_probs = torch.cat([chunk[0] for chunk in chunks]).view_as(targets)
    if not with_mean_logits:
        return log_probs, None
    return log_probs, torch.cat([cast(Tensor, chunk[1]) for chunk in chunks]).view_as(targets)


def _chunk_log_probs(head: nn.Module, states: Tensor, targets: Tensor, with_mean_logits: bool) -> tuple[Tensor, Tensor | None]:
    # a Linear head as a function: module hooks (profilers, memory trackers) see one call per step, not per chunk
    logits = F.linear(states, head.weight, head.bias) if type(head) is nn.Linear else head(states)
    return _log_probs_of_targets(logits.float(), targets), _mean_logits(logits, with_mean_logits)


def _is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_chunked_loss(model: nn.Module, chunk_tokens: int) -> nn.Module:
    """Raise a clear error unless chunked :func:`token_log_probs` computes ``model``'s own; return its LM head."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
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


__all__ = [
    "CHUNK_MULTIPLE",
    "IGNORE_INDEX",
    "LOGITS_FRACTION",
    "ChunkTokens",
    "auto_chunk_tokens",
    "check_chunked_loss",
    "chunked_causal_lm_loss",
    "next_token_targets",
    "sequence_log_probs",
    "token_log_probs",
    "token_log_probs_and_mean_logits",
]

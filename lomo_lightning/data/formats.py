"""TRL's dataset formats: whether a field is a conversation, and a prompt tokenized together with its completions.

A field is either a plain string (TRL's *standard* format), used as it is, or a list of messages
``{"role", "content"}`` (*conversational*), rendered by the tokenizer's chat template. As TRL's trainers
do, a prompt and a completion are tokenized *together* and split where the prompt's own tokens and the
whole sequence's stop agreeing: a chat template may render a prompt alone differently (its generation
prompt), and tokens may merge across the boundary, so the split tokens are those the model sees when it
generates. A standard completion ends with the tokenizer's eos (appended as text, as TRL does); a
conversational one ends with the template's own end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

Messages = list[dict[str, str]]


def is_conversational(value: Any) -> bool:
    """Whether a record's field is a list of messages (TRL's conversational format) rather than a string."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """The number of leading tokens ``ids`` and ``other`` share."""
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages, **options: Any) -> list[int]:
    """The token ids of ``messages`` rendered by ``tokenizer``'s chat template (``options`` go to it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"conversational records need a chat template, and tokenizer {tokenizer.name_or_path!r} has none")
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    return list(cast(dict, encoded)["input_ids"])


def tokenize_prompt_completions(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, completions: Sequence[str | Messages], input: str = ""
) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [completion_ids, ...])``: each completion tokenized after ``prompt`` and split as TRL does.

    With several completions (a preference pair's two) the split is where the prompt parts from the first
    of them, so that every completion follows the same prompt tokens. ``input`` (Alpaca-style context)
    joins a string prompt after a blank line.
    """
    if is_conversational(prompt) or any(is_conversational(completion) for completion in completions):
        if input:
            raise ValueError("'input' applies to plain-string prompts: put the context in the prompt's messages")
        turns = cast(Messages, prompt if is_conversational(prompt) else [{"role": "user", "content": prompt}])
        replies = [c if is_conversational(c) else [{"role": "assistant", "content": c}] for c in completions]
        prompt_ids = conversation_ids(tokenizer, turns, add_generation_prompt=True)
        full = [conversation_ids(tokenizer, turns + cast(Messages, reply)) for reply in replies]
    else:
        text = f"{prompt}\n\n{input}" if input else cast(str, prompt)
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(text)["input_ids"]
        texts = [cast(str, c) for c in completions]
        full = [tokenizer(text + c + ("" if c.endswith(eos) else eos))["input_ids"] for c in texts]
    length = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:length], [ids[length:] for ids in full]


def completion_row(prompt_ids: list[int], completion_ids: list[int], seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` = ``(prompt + completion)[:seq_len]`` (TRL's keep-start truncation) and ``labels`` -100 on the
    prompt; ``None`` when the prompt alone fills ``seq_len`` (no completion token would be left)."""
    if len(prompt_ids) >= seq_len:
        return None
    row = (prompt_ids + completion_ids)[:seq_len]
    return {"input_ids": row, "labels": [IGNORE_INDEX] * len(prompt_ids) + row[len(prompt_ids) :]}


__all__ = [
    "IGNORE_INDEX",
    "Messages",
    "common_prefix_length",
    "completion_row",
    "conversation_ids",
    "is_conversational",
    "tokenize_prompt_completions",
]

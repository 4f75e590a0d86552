"""Half Fine-Tuning: freeze half of every transformer block, category by category.

Hui et al., "HFT: Half Fine-Tuning for Large Language Models" (2024). In each block the parameters fall
into categories (attention projections, FFN matrices, norms); HFT freezes half of each category, so every
block keeps half of its knowledge untouched while the other half learns. Re-drawing the half at each stage
of continual learning spreads the change over the whole model.

Algorithm (per category, e.g. ``attention = {q, k, v, o}``):

1. Visit the blocks in a seeded random order.
2. In each block consider every subset of the category's modules as the trainable set, and score it by how
   far the category's *cumulative* trainable parameter count (over the blocks visited so far, this one
   included) would be from ``ratio`` times their total, in units of this block's category size.
3. Take a subset with the best score; subsets within ``TIE_TOLERANCE`` of the best are near-ties and one of
   them is drawn at random.

For equal-sized members and ``ratio=0.5`` this is exactly the paper's rule: 2 of q/k/v/o, one of the two
norms, and for the three FFN matrices 2 trainable in a random half of the blocks and 1 in the others (the
cumulative score alternates between the two). Because the score counts parameters, grouped-query attention
(small k/v) still lands at ``ratio``: it keeps one large and one small projection rather than q and o.

Frozen means ``requires_grad=False``: no gradient, no fused hook, no optimizer state. Modules outside the
categories (final norm, and by default the embeddings and LM head) stay trainable.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lomo_lightning.selection.base import modules_matching

logger = logging.getLogger(__name__)

TIE_TOLERANCE = 0.01
"""Subsets whose cumulative deviation from ``ratio`` is within this fraction of the block's category size of
the best one are near-ties, drawn from at random."""


@dataclass(frozen=True)
class HFTPatterns:
    """Where the categories of an architecture live.

    ``block`` is a regex matching the module name of one transformer block (searched at the end of the
    name, so wrappers that prefix names, such as a LightningModule's ``model.``, still match).
    ``categories`` maps a category name to module names relative to a block. ``embeddings`` are full module
    names (searched the same way) forming one extra model-level category when ``include_embeddings`` is set.
    """

    block: str
    categories: dict[str, tuple[str, ...]]
    embeddings: tuple[str, ...] = ()


PRESETS: dict[str, HFTPatterns] = {
    "llama": HFTPatterns(
        block=r"model\.layers\.\d+",
        categories={
            "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            "ffn": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
            "norm": ("input_layernorm", "post_attention_layernorm"),
        },
        embeddings=(r"model\.embed_tokens", r"lm_head"),
    ),
    # GPT-2 fuses q, k and v into c_attn, so attention is {c_attn, c_proj}: choose 1 of 2.
    "gpt2": HFTPatterns(
        block=r"transformer\.h\.\d+",
        categories={
            "attention": ("attn.c_attn", "attn.c_proj"),
            "ffn": ("mlp.c_fc", "mlp.c_proj"),
            "norm": ("ln_1", "ln_2"),
        },
        embeddings=(r"transformer\.wte", r"transformer\.wpe", r"lm_head"),
    ),
    "gpt_neox": HFTPatterns(
        block=r"gpt_neox\.layers\.\d+",
        categories={
            "attention": ("attention.query_key_value", "attention.dense"),
            "ffn": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            "norm": ("input_layernorm", "post_attention_layernorm"),
        },
        embeddings=(r"gpt_neox\.embed_in", r"embed_out"),
    ),
}

MODEL_TYPE_PRESETS = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2", "gpt_neox": "gpt_neox"}


@dataclass
class HFTMask:
    """One draw of HFT: module names frozen and trainable (only modules inside the categories)."""

    seed: int
    frozen: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"HFT mask (seed {self.seed}): {len(self.frozen)} modules frozen, {len(self.trainable)} trainable\n"
            f"  frozen: {', '.join(self.frozen)}\n  trainable: {', '.join(self.trainable)}"
        )


@dataclass
class HFTConfig:
    """The settings of :class:`HalfFineTuning`.

    Args:
        ratio: target trainable fraction of each category, by parameter count.
        seed: seed of the first mask; :meth:`HalfFineTuning.resample` without a seed moves on to
            ``seed + 1``, ``seed + 2``...
        include_embeddings: also select among the embeddings and LM head (otherwise they stay trainable).
        preset: ``"auto"`` (from ``model.config.model_type``), a key of :data:`PRESETS`, or ignored when
            ``patterns`` is given.
        patterns: module-name patterns for an architecture without a preset.
    """

    ratio: float = 0.5
    seed: int = 0
    include_embeddings: bool = False
    preset: str = "auto"
    patterns: HFTPatterns | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.patterns is None and self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(
                f"unknown HFT preset {self.preset!r}; choose 'auto', one of {sorted(PRESETS)}, or pass patterns="
            )


class HalfFineTuning:
    """Freeze about ``1 - ratio`` of each transformer block's parameters, per category (see module docstring).

    Args:
        config: an :class:`HFTConfig`; or pass its fields as keyword arguments
            (``HalfFineTuning(ratio=0.5, seed=0)``).
    """

    def __init__(self, config: HFTConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("HalfFineTuning takes a config or keyword arguments, not both")
        self.config = config if config is not None else HFTConfig(**options)
        self.seed = self.config.seed  # the seed of the mask in force: resample() moves it on
        self.mask: HFTMask | None = None

    def apply(self, model: nn.Module) -> HFTMask:
        """Draw the mask for ``self.seed`` and set ``requires_grad`` on every module of the categories."""
        groups = self._category_groups(model)
        rng = random.Random(self.seed)
        frozen: set[str] = set()
        for members_per_block in groups:
            frozen |= self._freeze_in_category(members_per_block, rng)
        names = [name for members_per_block in groups for members in members_per_block for name, _ in members]
        modules = dict(model.named_modules())
        for name in names:
            for parameter in modules[name].parameters():
                parameter.requires_grad_(name not in frozen)
        self.mask = HFTMask(
            seed=self.seed,
            frozen=[n for n in names if n in frozen],
            trainable=[n for n in names if n not in frozen],
        )
        logger.info(self.mask.describe())
        return self.mask

    def resample(
        self, model: nn.Module, seed: int | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> HFTMask:
        """Draw a new mask (``seed``, or the previous seed + 1) and apply it.

        If ``optimizer`` is given, the state of parameters frozen by the new mask is dropped, so that a
        frozen parameter never holds optimizer state. Newly trainable parameters must already be in the
        optimizer: build it over all parameters (frozen ones get no gradient, so torch optimizers skip them).
        """
        self.seed = self.seed + 1 if seed is None else seed
        mask = self.apply(model)
        if optimizer is not None:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if not parameter.requires_grad:
                        optimizer.state.pop(parameter, None)
        return mask

    def apply_mask(self, model: nn.Module, mask: HFTMask | None = None) -> HFTMask:
        """Set ``requires_grad`` on ``model`` as ``mask`` (default: the current one) says, without drawing.

        A mask's module names are those of the model it was drawn on; a name that is not a module of
        ``model`` is matched as a suffix (``model.layers.0.mlp.up_proj`` finds ``model.model.layers.0.mlp.up_proj``
        inside a LightningModule), so a mask drawn on a Hugging Face model applies to its wrapper too.
        """
        mask = self.mask if mask is None else mask
        if mask is None:
            raise ValueError("HalfFineTuning.apply_mask: no mask to apply; draw one with apply() first")
        modules = dict(model.named_modules())
        resolved = {name: _resolve_module(modules, name) for name in [*mask.frozen, *mask.trainable]}
        frozen = set(mask.frozen)
        for name, module in resolved.items():
            for parameter in module.parameters():
                parameter.requires_grad_(name not in frozen)
        self.mask = mask
        return mask

    def state_dict(self) -> dict[str, Any]:
        """What decides the masks: the seed counter and the mask in force (its seed and module names)."""
        return {"seed": self.seed, "mask": None if self.mask is None else asdict(self.mask)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`; with ``model``, also set ``requires_grad`` as the saved mask says.

        The saved mask is applied as saved (:meth:`apply_mask`), not drawn again, so the restored run
        trains exactly the tensors the saved one did.
        """
        missing = {"seed", "mask"} - set(state)
        if missing:
            raise KeyError(f"HalfFineTuning.load_state_dict: the state lacks {sorted(missing)}")
        self.seed = int(state["seed"])
        mask = state["mask"]
        self.mask = None if mask is None else HFTMask(int(mask["seed"]), list(mask["frozen"]), list(mask["trainable"]))
        if model is not None and self.mask is not None:
            self.apply_mask(model)

    def describe(self) -> str:
        return "HFT: no mask drawn yet" if self.mask is None else self.mask.describe()

    def _resolve_patterns(self, model: nn.Module) -> HFTPatterns:
        config = self.config
        if config.patterns is not None:
            return config.patterns
        if config.preset != "auto":
            return PRESETS[config.preset]
        model_type = _model_type(model)
        if model_type not in MODEL_TYPE_PRESETS:
            raise ValueError(
                f"HalfFineTuning has no preset for model_type {model_type!r}. Pass preset= one of "
                f"{sorted(PRESETS)} if its module names match, or patterns=HFTPatterns(block=..., categories=...)."
            )
        return PRESETS[MODEL_TYPE_PRESETS[model_type]]

    def _category_groups(self, model: nn.Module) -> list[list[list[tuple[str, int]]]]:
        """Per category, per block, the (module name, parameter count) of each member."""
        patterns = self._resolve_patterns(model)
        modules = dict(model.named_modules())
        blocks = [name for name, _ in modules_matching(model, [patterns.block], whole_suffix=True)]
        if not blocks:
            raise ValueError(f"no module name matches the HFT block pattern {patterns.block!r}")
        groups = []
        for category, members in patterns.categories.items():
            per_block = []
            for block in blocks:
                names = [f"{block}.{member}" for member in members]
                missing = [name for name in names if name not in modules]
                if missing:
                    raise ValueError(f"HFT category {category!r}: modules {missing} not found in the model")
                per_block.append([(name, _numel(modules[name])) for name in names])
            groups.append(per_block)
        if self.config.include_embeddings:
            embedding_names = [name for name, _ in modules_matching(model, patterns.embeddings, whole_suffix=True)]
            # A tied LM head shares its weight with the input embeddings: count and select it once.
            seen: set[int] = set()
            embeddings: list[tuple[str, int]] = []
            for name in embedding_names:
                ids = {id(p) for p in modules[name].parameters()}
                if not ids <= seen:
                    embeddings.append((name, _numel(modules[name])))
                seen |= ids
            groups.append([embeddings])
        return groups

    def _freeze_in_category(self, members_per_block: list[list[tuple[str, int]]], rng: random.Random) -> set[str]:
        """The greedy cumulative draw of the module docstring, for one category."""
        order = list(range(len(members_per_block)))
        rng.shuffle(order)
        trainable_so_far = total_so_far = 0
        frozen: set[str] = set()
        for index in order:
            members = members_per_block[index]
            block_total = sum(count for _, count in members)
            total = total_so_far + block_total

            # Measured in units of this block's size, so a near-tie means the same thing in every block.
            def distance(subset: tuple[int, ...]) -> float:
                trainable = trainable_so_far + sum(members[i][1] for i in subset)
                return abs(trainable - self.config.ratio * total) / block_total if block_total else 0.0

            subsets = [s for size in range(len(members) + 1) for s in itertools.combinations(range(len(members)), size)]
            best = min(distance(s) for s in subsets)
            chosen = rng.choice([s for s in subsets if distance(s) <= best + TIE_TOLERANCE])
            trainable_so_far += sum(members[i][1] for i in chosen)
            total_so_far = total
            frozen |= {name for i, (name, _) in enumerate(members) if i not in chosen}
        return frozen


def _resolve_module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The module called ``name``, else the one module whose name ends with ``.name``."""
    if name in modules:
        return modules[name]
    matches = [key for key in modules if key.endswith(f".{name}")]
    if len(matches) != 1:
        found = "no module" if not matches else f"{len(matches)} modules ({', '.join(matches[:3])})"
        raise ValueError(
            f"HFT mask names module {name!r}, but {found} of the model match it: "
            "was the mask drawn on a model of another architecture?"
        )
    return modules[matches[0]]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of ``model`` or of the first submodule that has one (e.g. inside a LightningModule)."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type is not None:
            return model_type
    return None


# The name before one casing of acronyms (issue 20), still importable: it was public.
HftConfig = HFTConfig

__all__ = ["HFTConfig", "HFTMask", "HFTPatterns", "PRESETS", "HalfFineTuning", "HftConfig"]

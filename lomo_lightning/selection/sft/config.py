"""What a sparse fine-tuning run is: its budget, its targets, its reselection schedule, its base."""

from __future__ import annotations

from dataclasses import dataclass

REGROWTH_RULES = ("accumulated_gradients", "sm3")
PRUNE_SCHEDULES = ("linear", "cosine")
BASE_QUANTIZATIONS = ("int8", "nf4")


@dataclass
class SFTConfig:
    """The settings of :class:`~lomo_lightning.selection.sft.SparseFineTuning` (SpIEL's ``SFTConfig``).

    Args:
        density: the budget as a fraction of **all** the model's parameters (tied ones counted once),
            in (0, 1]; the budget is spread over the target weights in proportion to their size.
        num_tunable_weights: the budget as a number of entries, exactly (overrides ``density``), e.g.
            LoRA's trainable count for a comparison at equal budget.
        regrowth: ``"accumulated_gradients"`` (SpIEL-AG) or ``"sm3"`` (SpIEL-MA; the values' rule must
            then be :class:`~lomo_lightning.optim.sm3.SM3`, whose accumulators score growth).
        reselection_steps: ``R``; entries are pruned and regrown after step ``R * n + A``, ``n = 0, 1, ...``.
        selection_accumulation_steps: ``A``, in ``[1, R - 2]``: the offset of each reselection, and
            for AG the steps over which the candidates' gradients are accumulated.
        prune_schedule: how the pruned fraction decays after the first reselection (which prunes every
            entry): ``"linear"``, ``p = initial_prune_fraction * (1 - t / total_steps)``, or ``"cosine"``.
        initial_prune_fraction: the fraction the decay starts from.
        targets: regexes searched in module names; default every ``nn.Linear`` except the LM head.
        seed: seed of the initial random active sets.
        total_steps: length of training (no reselection after it); ``SFTReselectionCallback`` sets it.
        quantize_base: store the frozen base of every target weight-only quantized, ``"int8"`` (torchao,
            per output channel) or ``"nf4"`` (torchao's 4-bit NormalFloat, QLoRA's format): qSpIEL.
    """

    density: float = 0.01
    num_tunable_weights: int | None = None
    regrowth: str = "accumulated_gradients"
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    prune_schedule: str = "linear"
    initial_prune_fraction: float = 0.2
    targets: list[str] | None = None
    seed: int = 0
    total_steps: int | None = None
    quantize_base: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.num_tunable_weights is not None and self.num_tunable_weights < 1:
            raise ValueError(f"num_tunable_weights must be >= 1 or None, got {self.num_tunable_weights}")
        if self.regrowth not in REGROWTH_RULES:
            raise ValueError(f"unknown regrowth {self.regrowth!r}; choose one of {REGROWTH_RULES}")
        if self.prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"unknown prune_schedule {self.prune_schedule!r}; choose one of {PRUNE_SCHEDULES}")
        if not 0.0 <= self.initial_prune_fraction <= 1.0:
            raise ValueError(f"initial_prune_fraction must be in [0, 1], got {self.initial_prune_fraction}")
        # AG's window opens after step R*n - 1 and closes at R*n + A: it must close before the next one opens
        if not 1 <= self.selection_accumulation_steps <= self.reselection_steps - 2:
            raise ValueError(
                f"selection_accumulation_steps must be in [1, reselection_steps - 2 = {self.reselection_steps - 2}], "
                f"got {self.selection_accumulation_steps} (reselection_steps={self.reselection_steps})"
            )
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {self.total_steps}")
        if self.quantize_base not in (None, *BASE_QUANTIZATIONS):
            raise ValueError(f"unknown quantize_base {self.quantize_base!r}; choose one of {BASE_QUANTIZATIONS} or null")


# The name before one casing of acronyms (issue 20), still importable: it was public.
SftConfig = SFTConfig

__all__ = ["BASE_QUANTIZATIONS", "PRUNE_SCHEDULES", "REGROWTH_RULES", "SFTConfig", "SftConfig"]

"""Third-party messages that tell this app's users nothing, silenced where they come from, each by name.

Every filter names one logger (or one warning) and one message; everything else those libraries say still
reaches the user. Importing this module installs them (it imports nothing else): :mod:`lomo_lightning.train`
imports it before Lightning and transformers, whose import-time messages are among them, so every ``lomo-train``
process, those a distributed run starts included, is quiet. The library itself leaves the user's logging and
warnings alone.
"""

from __future__ import annotations

import logging
import re
import warnings

# logger -> a pattern of the messages it drops
NOISY_LOGGERS = {
    # on every Trainer: an advertisement for Lightning's cloud logger
    "lightning.pytorch.utilities.rank_zero": re.compile(r"💡 Tip: For seamless cloud logging"),
    # torchao (installed for qSpIEL, imported by transformers) on a CPU-only torch: its CUDA kernels do not load
    "torchao": re.compile(r"Failed to load .*\.so"),
    # torchao's own enums registered with torch.compile, on import
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    # Optuna with storage=sqlite: Alembic's migration bookkeeping, seven lines
    "alembic.runtime.migration": re.compile(r"Context impl |Will assume |Running (upgrade|stamp_revision) "),
}
# (category, message pattern) of warnings that say nothing the user can act on
NOISY_WARNINGS = [
    # Lightning's own pytree helper uses a torch name torch deprecated, on every fit
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
]


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def silence_third_party_noise() -> None:
    """Install the filters (once: a second call changes nothing)."""
    for name, pattern in NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


silence_third_party_noise()

__all__ = ["NOISY_LOGGERS", "NOISY_WARNINGS", "silence_third_party_noise"]

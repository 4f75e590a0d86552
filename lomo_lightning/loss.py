"""The chunked causal-LM loss; it lives in :mod:`lomo_lightning.objectives.causal_lm`, and this import path keeps working."""

from lomo_lightning.objectives.causal_lm import check_chunked_loss, chunked_causal_lm_loss

__all__ = ["check_chunked_loss", "chunked_causal_lm_loss"]

"""Fused AdaLomo with plain Lightning (no Hydra): a LightningModule with the fused-optimization mixin.

    python examples/lightning_adalomo.py        # tiny Llama on the standard library's source, offline, CPU

The only differences from ordinary Lightning code: ``FusedOptimizationMixin`` in the bases (manual
optimization with a default ``training_step`` around your ``compute_loss``), and ``strategy="lomo"``.
Automatic optimization works too: keep your own ``training_step`` and just pass ``strategy="lomo"``.
"""

from __future__ import annotations

import lightning as L
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, get_cosine_schedule_with_warmup

from lomo_lightning import AdaLomo, FusedOptimizationMixin
from lomo_lightning.data import PythonStdlibDataModule


class FusedCausalLM(FusedOptimizationMixin, L.LightningModule):
    def __init__(self, vocab_size: int, lr: float = 1e-2, total_steps: int = 100):
        super().__init__()
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
        self.model = AutoModelForCausalLM.from_config(config)
        self.lr, self.total_steps = lr, total_steps

    def compute_loss(self, batch):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.compute_loss(batch), prog_bar=True)

    def configure_optimizers(self):
        optimizer = AdaLomo(self.parameters(), lr=self.lr)
        schedule = get_cosine_schedule_with_warmup(optimizer, self.total_steps // 10, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main() -> None:
    torch.manual_seed(0)
    data = PythonStdlibDataModule(seq_len=128, batch_size=8, vocab_size=4096, max_files=200, max_val_blocks=64)
    module = FusedCausalLM(vocab_size=len(data.tokenizer), total_steps=100)
    trainer = L.Trainer(
        strategy="lomo",  # or LomoStrategy(clip_grad_norm=1.0); Trainer(gradient_clip_val=...) works in automatic mode
        accelerator="auto",
        devices=1,
        max_steps=100,
        val_check_interval=50,
        precision="32-true",  # "bf16-mixed" / "bf16-true" / "16-mixed" (GPU) work as well
        default_root_dir="lightning_logs/example",
    )
    trainer.validate(module, datamodule=data)
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()

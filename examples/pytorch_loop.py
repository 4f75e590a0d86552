"""Fused AdaLomo in a plain PyTorch loop: no Lightning, no Hydra.

    python examples/pytorch_loop.py            # a tiny Llama on the standard library's source, offline, ~1 min on CPU

``FusedUpdater.backward(loss)`` replaces ``loss.backward(); optimizer.step(); optimizer.zero_grad()``:
each parameter is updated inside backward the moment its gradient is ready, and the gradient is freed.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lomo_lightning import AdaLomo, FusedUpdater
from lomo_lightning.data import PythonStdlibDataModule


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader, batches: int) -> float:
    model.eval()
    losses = [model(**batch).loss.item() for batch, _ in zip(loader, range(batches))]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--clip-grad-norm", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = PythonStdlibDataModule(seq_len=128, batch_size=8, vocab_size=4096, max_files=200, max_val_blocks=64)
    data.prepare_data()
    data.setup("fit")
    config = LlamaConfig(
        vocab_size=len(data.tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=data.tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    optimizer = AdaLomo(model.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    updater = FusedUpdater(model, optimizer, clip_grad_norm=args.clip_grad_norm)

    val_loader = data.val_dataloader()
    print(f"validation loss before: {validation_loss(model, val_loader, 8):.3f}")
    step = 0
    while step < args.steps:
        for batch in data.train_dataloader():
            loss = model(**batch).loss
            updater.backward(loss)  # forward is yours; backward and the update are fused
            schedule.step()
            step += 1
            if step % 20 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}")
            if step == args.steps:
                break
    print(f"validation loss after:  {validation_loss(model, val_loader, 8):.3f}  (skipped steps: {updater.skipped_steps})")


if __name__ == "__main__":
    main()

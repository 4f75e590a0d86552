"""The small Llama's cached base (``quality_sft_vs_lora.py`` starts from it). The further-pre-training study this
script ran is superseded by ``claims_smollm2.py optimizers`` on the real model: benchmarks/README.md."""

BASE = dict(subset="first_half", steps=600, lr=3e-3)

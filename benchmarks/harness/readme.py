"""The figures of ``README.md`` and ``benchmarks/README.md``, rendered from ``benchmarks/results/*.json``.

A figure sits between ``<!-- figures:NAME -->`` and ``<!-- /figures -->``; ``python -m benchmarks.harness.readme``
rewrites every marked block from its results file, ``--check`` only says which differ (``tests/test_readme.py``
runs that check: a hand-edited figure or a stale results file fails the suite). One results file per figure.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"  # the committed results, whatever LOMO_BENCH_RESULTS says
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
BLOCK = re.compile(r"(<!-- figures:(\w+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def rows(name: str) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in json.loads((RESULTS / f"{name}.json").read_text())["results"] if "error" not in r}


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def mib(row: dict[str, Any], key: str = "peak_bytes") -> str:
    return f"{row[key] / 2**20:.1f}"


def memory_speed_small() -> str:
    """The 110M Llama, every full-parameter method and LoRA: peak, and step time against the floor."""
    by = rows("memory_speed_small_head")
    floor, adamw = by["floor"], by["adamw"]
    labels = {"floor": "floor (backward only)", "adamw": "AdamW (standard)", "sgd": "SGD (standard)", "lomo": "LOMO (fused)",
              "adalomo": "**AdaLomo (fused)**", "adalomo_hft": "AdaLomo + HFT (fused)",
              "lora": f"LoRA r=8 + AdamW (peft), {by['lora']['trainable'] / 1e6:.1f}M trainable",
              "lomo_optim_adalomo": "AdaLomo, reference `lomo-optim` (`.cuda()` mapped to a no-op)"}
    body = [[label, mib(by[m]), f"{by[m]['peak_bytes'] / floor['peak_bytes']:.3f}", f"{by[m]['peak_bytes'] / adamw['peak_bytes']:.3f}",
             f"{by[m]['step_time_s']:.2f}", f"{by[m]['step_time_s'] / floor['step_time_s']:.2f}"] for m, label in labels.items()]
    return table(["method", "peak MiB", "peak / floor", "peak / AdamW", "step s", "step / floor"], body)


def peers_smollm2() -> str:
    data = json.loads((RESULTS / "peers_smollm2.json").read_text())
    body = []
    for r in data["results"]:
        if "error" in r:
            continue
        c = {k: f"{v / 2**20:.1f}" for k, v in r["peak_by_category_bytes"].items()}
        part = f" ({r['trainable_now'] / r['parameters']:.1%} of the weights)" if r["method"] in ("badam", "lora") else ""
        label = LABELS_PEERS[r["method"]] + part
        body.append([label, mib(r), c["parameters"], c["gradients"], c["optimizer_state"], c["activations"], c["temporaries"],
                     f"{r['peak_over_floor']:.3f}", f"{r['step_over_floor']:.2f}", f"{r['changed_tensors']}/{r['parameter_tensors']}"])
    return table(["method", "peak MiB", "weights", "grads", "opt state", "activations", "temps", "peak / floor", "step / floor",
                  "changed tensors"], body)


LABELS_PEERS = {"floor": "floor (backward, gradients dropped, no update)", "adalomo": "**AdaLomo, fused (ours)**",
                "lomo": "LOMO, fused (ours)", "adamw": "AdamW, standard", "lomo_optim_lomo": "LOMO (lomo-optim)",
                "lomo_optim_adalomo": "AdaLomo (lomo-optim)", "optimi_adamw": "AdamW + gradient release (torch-optimi)",
                "torchtune_adamw": "AdamW in backward (torchtune)", "galore_layerwise": "GaLore-AdamW, layer-wise (galore-torch)",
                "galore8bit_layerwise": "GaLore-AdamW 8-bit, layer-wise (galore-torch)",
                "apollo_layerwise": "APOLLO-AdamW, layer-wise (apollo-torch)", "adam_mini": "Adam-mini (adam-mini)",
                "badam": "BAdam, one block per step (badam)", "lora": "LoRA r=8 + AdamW (peft)",
                "floor_bf16": "floor, bf16", "optimi_adamw_bf16_kahan": "AdamW + gradient release, bf16 + Kahan (torch-optimi)",
                "floor_repeat": "floor, run again last"}


def sft_vs_lora_smollm2() -> str:
    """SFT against LoRA on SmolLM2: MemTracker peak (memory_speed.py) and step time in turns (sft_vs_lora_smollm2.py)."""
    by = rows("memory_speed_smollm2")
    steps = json.loads((RESULTS / "sft_vs_lora_smollm2.json").read_text())["timing"]["median_s"]
    body = []
    for m, label in [("lora", "LoRA + AdamW (peft)"), ("sft_ag", "SFT-AG + SFTAdamW (fused)"), ("sft_sm3", "SFT-MA + SM3 (fused)")]:
        ratio = by[m]["peak_bytes"] / by["lora"]["peak_bytes"]
        body.append([label, mib(by[m]), f"{ratio:.3f}" + (" (FAIL)" if ratio > 1 else ""), f"{steps[m] / steps['lora']:.3f}"])
    return table(["", "peak MiB (MemTracker)", "peak / LoRA (target ≤ 1)", "step / LoRA (target ≤ 1.2)"], body)


def memory_speed_smollm2() -> str:
    by = rows("memory_speed_smollm2")
    labels = {"floor": "floor (full backward, gradients dropped)", "lora": "LoRA + AdamW (peft)",
              "sft_ag": "SFT-AG + SFTAdamW (fused)", "sft_sm3": "SFT-MA + SM3 (fused)"}
    body = []
    for m, label in labels.items():
        c = {k: f"{v / 2**20:.1f}" for k, v in by[m]["peak_by_category_bytes"].items()}
        body.append([label, mib(by[m]), c["parameters"], c["optimizer_state"], c["activations"], c["temporaries"], c["other"],
                     f"{by[m]['peak_bytes'] / by['lora']['peak_bytes']:.3f}"])
    return table(["method", "peak (MiB)", "params", "opt state", "activations", "temps", "other (buffers)", "peak / LoRA"], body)


def memory_sweep_size() -> str:
    data = json.loads((RESULTS / "memory_sweep_size.json").read_text())
    body = []
    for hidden, *_ in data["sizes"]:
        r = {x["method"]: x for x in data["results"] if x.get("hidden") == hidden and "error" not in x}
        a, f, w = (r[m]["peak_bytes"] for m in ("adalomo", "floor", "adamw"))
        body.append([f"{r['adamw']['parameters'] / 1e6:.1f}M", f"{w / 2**20:.0f}", f"{a / 2**20:.0f}", f"{f / 2**20:.0f}",
                     f"{a / w:.3f}", f"{a / f:.3f}"])
    return table(["parameters", "AdamW peak (MiB)", "AdaLomo peak (MiB)", "floor peak (MiB)", "AdaLomo / AdamW", "AdaLomo / floor"], body)


def chunked_loss() -> str:
    """Full logits against the chunked loss, every method: the ``long`` and ``small`` presets."""
    long, chunked = rows("memory_speed_long"), rows("memory_speed_long_chunked")
    small, small_chunked = rows("memory_speed_small_head"), rows("memory_speed_small_chunked")
    ratio = f"({chunked['adalomo']['peak_bytes'] / chunked['adamw']['peak_bytes']:.3f}x AdamW, was " \
            f"{long['adalomo']['peak_bytes'] / long['adamw']['peak_bytes']:.3f}x)"

    def pair(a: dict, b: dict, m1: str, m2: str) -> list[str]:
        return [f"{mib(a[m1])} / {mib(a[m2])}", f"{mib(b[m1])} / {mib(b[m2])}"]

    body = [["`long` (11.4M Llama, hidden 256, vocab 32000, 4 × 1024 tokens): floor", mib(long["floor"]), mib(chunked["floor"])],
            ["AdamW", mib(long["adamw"]), mib(chunked["adamw"])],
            ["**AdaLomo (fused)**", f"**{mib(long['adalomo'])}**", f"**{mib(chunked['adalomo'])}** {ratio}"],
            ["SFT-SM3 + AdaLomo (before #11) / LoRA + AdamW", *pair(long, chunked, "sft_sm3", "lora")],
            ["`small` (109.5M, 2 × 256 tokens, chunks of 128): AdaLomo", mib(small["adalomo"]), mib(small_chunked["adalomo"])],
            ["SFT-SM3 + AdaLomo (before #11) / LoRA + AdamW", *pair(small, small_chunked, "sft_sm3", "lora")]]
    return table(["peak MiB", "full logits", "chunks of 512 tokens"], body)


def distributed() -> str:
    summary = json.loads((RESULTS / "distributed.json").read_text())["summary"]
    labels = {"fsdp_fused_adamw": "AdamW run in the fused hooks (the hooks' own cost)", "fsdp_fused_adalomo": "AdaLomo (fused)",
              "fsdp_fused_lomo": "LOMO (fused)", "fsdp_fused_sft_adalomo": "SFT 1% + AdaLomo (fused; route tensors counted)"}
    body = []
    for mode, label in labels.items():
        row = summary[mode]
        same = row.get("per_rank_vs_one_process_same_rule")
        body.append([label, "— (no state)" if same is None else f"{same:.3f}", f"{row['step_time_vs_fsdp_adamw']:.2f}"])
    return table(["`lomo_fsdp`", "per-rank params + state vs one process, same rule (target ≤ 0.6)",
                  "step time vs plain FSDP2 + AdamW (target ≤ 1.10)"], body)


FIGURES: dict[str, Callable[[], str]] = {f.__name__: f for f in (
    memory_speed_small, peers_smollm2, sft_vs_lora_smollm2, memory_speed_smollm2, memory_sweep_size, chunked_loss, distributed)}


def render(text: str) -> str:
    """``text`` with every marked block rewritten from its results file."""
    return BLOCK.sub(lambda m: m.group(1) + FIGURES[m.group(2)]() + m.group(4), text)


def main() -> None:
    stale = []
    for readme in READMES:
        text = readme.read_text()
        if render(text) != text:
            stale.append(str(readme.relative_to(ROOT)))
            if "--check" not in sys.argv:
                readme.write_text(render(text))
    print(("differ from results/*.json: " if "--check" in sys.argv else "rewritten: ") + (", ".join(stale) or "none"))
    sys.exit(1 if stale and "--check" in sys.argv else 0)


if __name__ == "__main__":
    main()

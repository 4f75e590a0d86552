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
        label = PEER_LABELS[r["method"]].join(["**"] * 2 if r["method"] == "adalomo" else ["", ""]) + part
        body.append([label, mib(r), c["parameters"], c["gradients"], c["optimizer_state"], c["activations"], c["temporaries"],
                     f"{r['peak_over_floor']:.3f}", f"{r['step_over_floor']:.2f}", f"{r['changed_tensors']}/{r['parameter_tensors']}"])
    return table(["method", "peak MiB", "weights", "grads", "opt state", "activations", "temps", "peak / floor", "step / floor",
                  "changed tensors"], body)


PEER_LABELS = {"floor": "floor (backward, gradients dropped, no update)", "adalomo": "AdaLomo, fused (ours)",
               "lomo": "LOMO, fused (ours)", "adamw": "AdamW, standard", "lomo_optim_lomo": "LOMO (lomo-optim)",
               "lomo_optim_adalomo": "AdaLomo (lomo-optim)", "optimi_adamw": "AdamW + gradient release (torch-optimi)",
               "torchtune_adamw": "AdamW in backward (torchtune)", "galore_layerwise": "GaLore-AdamW, layer-wise (galore-torch)",
               "galore8bit_layerwise": "GaLore-AdamW 8-bit, layer-wise (galore-torch)",
               "apollo_layerwise": "APOLLO-AdamW, layer-wise (apollo-torch)", "adam_mini": "Adam-mini (adam-mini)",
               "badam": "BAdam, one block per step (badam)", "lora": "LoRA r=8 + AdamW (peft)",
               "floor_bf16": "floor, bf16", "optimi_adamw_bf16_kahan": "AdamW + gradient release, bf16 + Kahan (torch-optimi)",
               "floor_repeat": "floor, run again last"}  # peers.py's labels too


def sft_vs_lora_smollm2() -> str:
    """SFT against LoRA on SmolLM2: MemTracker peak (memory_speed.py) and step time in turns (claims_smollm2.py sft_lora --timing)."""
    by = rows("memory_speed_smollm2")
    steps = json.loads((RESULTS / "claims_sft_lora_timing.json").read_text())["median_s"]
    body = []
    for m, label in [("lora", "LoRA + AdamW (peft)"), ("sft_ag", "SFT-AG + SFTAdamW (fused)"), ("sft_sm3", "SFT-MA + SM3 (fused)")]:
        ratio = by[m]["peak_bytes"] / by["lora"]["peak_bytes"]
        body.append([label, mib(by[m]), f"{ratio:.3f}" + (" (FAIL)" if ratio > 1 else ""), f"{steps[m.replace('sft_sm3', 'sft_ma')] / steps['lora']:.3f}"])
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


def sweep_table(data: dict[str, Any]) -> str:
    """``memory_speed.py --sweep-size``: the peaks of AdamW, AdaLomo and the floor per model size (complete sizes only)."""
    body = []
    for hidden, *_ in data["sizes"]:
        r = {x["method"]: x for x in data["results"] if x.get("hidden") == hidden and "error" not in x}
        if len(r) < 3:
            continue
        a, f, w = (r[m]["peak_bytes"] for m in ("adalomo", "floor", "adamw"))
        body.append([f"{r['adamw']['parameters'] / 1e6:.1f}M", f"{w / 2**20:.0f}", f"{a / 2**20:.0f}", f"{f / 2**20:.0f}",
                     f"{a / w:.3f}", f"{a / f:.3f}"])
    return table(["parameters", "AdamW peak (MiB)", "AdaLomo peak (MiB)", "floor peak (MiB)", "AdaLomo / AdamW", "AdaLomo / floor"], body)


def memory_sweep_size() -> str:
    return sweep_table(json.loads((RESULTS / "memory_sweep_size.json").read_text()))


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


SCALE_LABELS = {"floor": "floor (backward, gradients dropped, no update)", "adamw": "AdamW, fp32 master weights (standard)",
                "sgd": "SGD, fp32 master weights (standard)", "lomo": "LOMO (fused)", "adalomo": "AdaLomo (fused)",
                "hft": "HFT + AdaLomo (fused)", "sft": "SFT-MA + SM3 (fused), LoRA's budget", "lora": "LoRA r=8 (peft) + AdamW"}
SCALE_CATEGORIES = ["parameters", "gathered_parameters", "gradients", "optimizer_state", "activations", "temporaries"]


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _estimates(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["size"], e["method"]): e for e in report["estimates"] if "error" not in e}


def _option(report: dict[str, Any], size: str, method: str, option: str, world: int = 1) -> dict[str, Any] | None:
    return next((o for o in report["options"] if (o["size"], o["method"], o["option"], o["world"]) == (size, method, option, world)
                 and "error" not in o), None)


def scale_7b(report: dict[str, Any]) -> str:
    """``memory_scale.py``: LLaMA-7B on one device against the LOMO paper's Table 1, with each memory option off."""
    by, paper = _estimates(report), report["paper_7b_gib"]
    options = ["offloading off", "offloading off, full logits"]
    body = []
    for method in report["methods"]:
        if ("7b", method) not in by:
            continue
        e, p = by[("7b", method)], paper.get(method)
        cells = [gib(e["peak_by_category_bytes"].get(c, 0)) for c in SCALE_CATEGORIES if c != "gathered_parameters"]
        off = [gib(o["peak_bytes"]) if (o := _option(report, "7b", method, name)) else "" for name in options]
        versus = [f"{p['total']:.2f}", f"{e['peak_bytes'] / 2**30 / p['total']:.3f}"] if p else ["–", "–"]
        body.append([SCALE_LABELS[method], f"**{gib(e['peak_bytes'])}**", *cells, *off, *versus])
    return table(["method (7B)", "peak", "parameters", "gradients", "optimizer state", "activations", "temporaries",
                  *options, "paper", "peak / paper"], body) if body else ""


def scale_sizes(report: dict[str, Any]) -> str:
    """``memory_scale.py``: every size and method on one device."""
    by, sizes = _estimates(report), report["sizes"]
    body = [[SCALE_LABELS[m], *(f"{by[(s, m)]['peak_bytes'] / 2**30:.1f}" if (s, m) in by else "error" for s in sizes)]
            for m in report["methods"]]
    parameters = {e["size"]: e["parameters"] for e in by.values()}
    body.append(["parameters (billions)", *(f"{parameters[s] / 1e9:.2f}" if s in parameters else "" for s in sizes)])
    return table(["peak, GiB", *(s.upper() for s in sizes)], body)


def _unit(row: dict[str, Any]) -> str:
    """``auto (projection)``: the unit asked for, and the one ``auto`` took."""
    chosen = row.get("fsdp_unit") or next((m.get("fsdp_unit") for m in row.get("measured", [row.get("full_depth", {})]) if m.get("fsdp_unit")), None)
    return f"{row['fsdp_units']} ({chosen})" if row["fsdp_units"] == "auto" and chosen else row["fsdp_units"]


def scale_fsdp(report: dict[str, Any]) -> str:
    """``memory_scale.py``: per rank under ``lomo_fsdp`` (FSDP2 over a fake process group)."""
    if not report.get("fsdp"):
        return ""
    w, body = report["fsdp"]["setting"], []
    for e in report["fsdp"]["estimates"]:
        if "error" in e:
            body.append([e["size"].upper(), SCALE_LABELS[e["method"]], e["fsdp_units"], f"error: {e['error']}", *[""] * 7])
            continue
        cells = [gib(e["peak_by_category_bytes"].get(c, 0)) for c in SCALE_CATEGORIES]
        body.append([e["size"].upper(), SCALE_LABELS[e["method"]], _unit(e), f"**{gib(e['peak_bytes'])}**", *cells,
                     "yes" if e["peak_bytes"] < 24 * 2**30 else "no"])
    return (f"{w['world']} ranks, {w['dtype']}, {w['batch']} x {w['seq']} tokens a rank; depths {report['fsdp']['depths']}.\n\n"
            + table(["model", "method", "FSDP2 unit", "per rank", "sharded parameters", "gathered parameters", "gradients",
                     "optimizer state", "activations", "temporaries", "under 24 GiB"], body))


def scale_options(report: dict[str, Any]) -> str:
    """``memory_scale.py``: the same step with one of the defaults' memory options off, and what the option saves."""
    defaults = {(e["size"], e["method"], 1): e for e in report["estimates"] if "error" not in e}
    defaults.update({(e["size"], e["method"], report["fsdp"]["setting"]["world"]): e for e in (report.get("fsdp") or {}).get("estimates", [])
                     if e["fsdp_units"] == "auto" and "error" not in e})
    body = []
    for row in report["options"]:
        where = "one device" if row["world"] == 1 else f"per rank of {row['world']}"
        default = defaults.get((row["size"], row["method"], row["world"]))
        cells = (["error: " + row["error"], "", ""] if "error" in row else [f"**{gib(row['peak_bytes'])}**"]
                 + ([gib(default["peak_bytes"]), gib(row["peak_bytes"] - default["peak_bytes"])] if default else ["–", "–"]))
        body.append([row["size"].upper(), SCALE_LABELS[row["method"]], where, row["option"], *cells])
    return table(["model", "method", "where", "option", "estimate", "with the defaults", "the option saves"], body) if body else ""


def scale_checks(report: dict[str, Any]) -> str:
    """``memory_scale.py``: the extrapolations against full-depth runs, AdaLomo's enlarged row blocks against the library's."""
    body = []
    for c in report["full_depth_checks"]:
        where = f" per rank of {c['world']}, FSDP2 unit {_unit(c)}" if c.get("world", 1) > 1 else ""
        full = c["full_depth"]
        body.append([f"{c['size'].upper()} {SCALE_LABELS[c['method']]}{where}, all {full['layers']} blocks ({full['wall_s']:.0f} s)",
                     f"{c['extrapolated_bytes'] / 2**30:.3f}", f"{full['peak_bytes'] / 2**30:.3f}", f"{100 * c['relative_error']:+.3f}%"])
    if b := report.get("adalomo_block_check"):
        body.append([f"{b['size'].upper()} AdaLomo at 1 block: the library's row blocks vs enlarged ones", f"{b['enlarged']['peak_bytes'] / 2**30:.4f}",
                     f"{b['exact']['peak_bytes'] / 2**30:.4f}", f"{b['difference_bytes'] / 2**20:+.1f} MiB"])
    return table(["check", "extrapolated", "measured", "error"], body) if body else ""


def _scale() -> dict[str, Any]:
    return json.loads((RESULTS / "memory_scale.json").read_text())


def memory_scale_claims() -> str:
    """The figures the READMEs' prose quotes: 7B fused AdaLomo against the paper's LOMO, 65B per rank of 8 x 24 GiB."""
    report = _scale()
    by, paper = _estimates(report), report["paper_7b_gib"]
    ada, lomo = by[("7b", "adalomo")]["peak_bytes"], by[("7b", "lomo")]["peak_bytes"]
    no_offload, full_logits = (_option(report, "7b", "adalomo", o)["peak_bytes"] for o in ("offloading off", "offloading off, full logits"))  # type: ignore[index]
    fsdp = {e["method"]: e for e in report["fsdp"]["estimates"] if e["fsdp_units"] == "auto" and "error" not in e}
    world = report["fsdp"]["setting"]["world"]
    off = _option(report, "65b", "lomo", "offloading off", world)
    matched = ", ".join(f"{SCALE_LABELS[m].split(',')[0].split(' (')[0]} {by[('7b', m)]['peak_bytes'] / 2**30 / paper[m]['total']:.3f}x" for m in ("adamw", "sgd", "lomo"))
    return (f"Fused AdaLomo on LLaMA-7B with the defaults holds **{gib(ada)} GiB** (LOMO {gib(lomo)}), against the paper's "
            f"{paper['lomo']['total']:.2f} for LOMO (target <= 14.0: {'met' if ada < 14 * 2**30 else 'missed'}): activation offloading "
            f"saves {gib(no_offload - ada)} GiB, the chunked loss {gib(full_logits - no_offload)} GiB more. The matched 7B figures "
            f"against the paper's: {matched}. Per rank under `lomo_fsdp` on {world} ranks with its defaults (65B, "
            f"{report['fsdp']['setting']['batch']} x {report['fsdp']['setting']['seq']} tokens a rank, fp16), `unit=\"auto\"` takes a unit per "
            f"{_unit(fsdp['lomo']).split('(')[-1].rstrip(')')} on a 24 GiB card: fused LOMO holds **{gib(fsdp['lomo']['peak_bytes'])} GiB**, AdaLomo "
            f"**{gib(fsdp['adalomo']['peak_bytes'])} GiB** (target <= 22, goal <= 20: "
            f"{'met' if fsdp['adalomo']['peak_bytes'] <= 20 * 2**30 else 'missed'}), {gib(off['peak_bytes']) if off else '–'} GiB without offloading.\n")


FIGURES: dict[str, Callable[[], str]] = {f.__name__: f for f in (
    memory_speed_small, peers_smollm2, sft_vs_lora_smollm2, memory_speed_smollm2, memory_sweep_size, chunked_loss, distributed,
    memory_scale_claims)} | {f"memory_scale_{part}": lambda f=f: f(_scale()) for part, f in
                             (("7b", scale_7b), ("sizes", scale_sizes), ("fsdp", scale_fsdp))}


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

"""The benchmarks' one harness: what every study in ``benchmarks/`` shares.

- :mod:`.env`: where results go, :func:`environment` (recorded in every results file), :func:`quiet`, the writers.
- :mod:`.methods`: a method built as ``lomo-train`` builds it, from ``conf/`` with overrides
  (``method=adalomo selection=hft``), by the app's own builders; the floor, LoRA, the models.
- :mod:`.memory`: MemTracker's peak by category, the per-method worker processes, step timing, plots.
- :mod:`.training`: the SmolLM2 fine-tuning run of the claims studies (fixed batches, LR schedule, held-out loss).
- :mod:`.readme`: the figures of ``README.md`` and ``benchmarks/README.md``, rendered from ``results/*.json``.

Scripts in ``benchmarks/`` import it as ``harness`` (their folder is first on ``sys.path``).
"""

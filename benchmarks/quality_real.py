"""One SmolLM2 fine-tuning run with the general-ability probes, for ``claims_smollm2.py`` (:mod:`harness.training`).

The study this script ran (every method, one seed, a learning-rate grid each) is superseded by
``claims_smollm2.py``'s studies over seeds: benchmarks/README.md.
"""

from harness.training import forgetting_at  # noqa: F401
from harness.training import smollm2_run as run  # noqa: F401

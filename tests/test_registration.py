"""Strategy names: ``Trainer(strategy="lomo")`` works in any import order, and no name Lightning owns is taken.

Import order is only real in a fresh interpreter, so these run their imports in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

OUR_NAMES = {"lomo", "lomo_ddp", "lomo_fsdp", "lomo_fsdp_unfused"}
# names newer Lightning releases register (its main branch: FSDP2Strategy), which this package must never take
LIGHTNING_NAMES_TO_COME = {"fsdp2", "fsdp2_cpu_offload"}


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


FIT_WITH_LOMO = """
import torch
import lightning.pytorch as pl

class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return AdaLomo(self.parameters(), lr=1e-2)

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
module = Regression()
before = module.layer.weight.detach().clone()
trainer = pl.Trainer(strategy="lomo", max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
assert trainer.global_step == 3 and not torch.equal(before, module.layer.weight)
print(type(trainer.strategy).__name__)
"""


def test_importing_lomo_lightning_before_lightning_still_registers_lomo():
    """``from lomo_lightning import AdaLomo`` loads no Lightning; importing Lightning afterwards registers "lomo"."""
    code = (
        "import sys\n"
        "from lomo_lightning import AdaLomo\n"
        "assert 'lightning.pytorch' not in sys.modules\n" + FIT_WITH_LOMO
    )
    assert python(code) == "LomoStrategy"


def test_importing_lightning_first_registers_lomo_too():
    assert python("import lightning\nfrom lomo_lightning import AdaLomo\n" + FIT_WITH_LOMO) == "LomoStrategy"


def test_the_import_hook_leaves_lightning_as_it_found_it():
    """After the hook ran, Lightning's module keeps its own loader and the hook is gone from ``sys.meta_path``."""
    code = (
        "import sys\n"
        "import lomo_lightning\n"
        "hooks = [f for f in sys.meta_path if type(f).__module__ == 'lomo_lightning.registration']\n"
        "import lightning.pytorch as pl\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "left = [f for f in sys.meta_path if type(f).__module__ == 'lomo_lightning.registration']\n"
        "loader = type(pl.__loader__).__module__\n"
        "print(len(hooks), len(left), loader, 'lomo' in StrategyRegistry)"
    )
    hooks, left, loader, registered = python(code).split()
    assert (hooks, left, registered) == ("1", "0", "True")
    assert not loader.startswith("lomo_lightning"), loader


def test_no_registered_name_is_one_of_lightnings_own():
    """The names this package adds to the registry are its own, and none is a name Lightning registers."""
    code = (
        "import json\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "lightnings = set(StrategyRegistry)\n"
        "import lomo_lightning.strategies\n"
        "print(json.dumps([sorted(lightnings), sorted(set(StrategyRegistry) - lightnings)]))"
    )
    lightnings, ours = json.loads(python(code))
    assert set(ours) == OUR_NAMES
    assert not set(ours) & (set(lightnings) | LIGHTNING_NAMES_TO_COME)


def test_a_name_that_belongs_to_lightning_is_refused():
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    from lomo_lightning.strategies import LomoStrategy
    from lomo_lightning.strategies.base import register_own_name

    class Squatter(LomoStrategy):
        strategy_name = "ddp"
        description = "takes Lightning's name"

    with pytest.raises(ValueError, match="strategy name 'ddp' already belongs to lightning.pytorch.strategies.ddp.DDPStrategy"):
        register_own_name(Squatter, StrategyRegistry)
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy

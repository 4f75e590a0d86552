"""Every Python snippet of README.md runs as written, in order, as a reader would run them.

What the README leaves to the reader is given here, small: ``model`` (a tiny Llama, new for each snippet),
``loader`` / ``datamodule`` / ``batch`` (its batches), ``name`` (a saved tiny checkpoint) and ``module``.
Names a snippet defines (``MyLM``) stay for the snippets after it. A snippet that needs a GPU runs only
where there is one. Everything runs in a temporary directory: nothing is written into the checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import batches, tiny_llama
from torch.utils.data import DataLoader

README = Path(__file__).parent.parent / "README.md"
SNIPPETS = [
    (README.read_text()[: match.start()].count("\n") + 1, match.group(1))
    for match in re.finditer(r"```python\n(.*?)```", README.read_text(), re.S)
]


class Batches(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(batches(3), batch_size=None)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        from lomo_lightning import AdaLomo

        return AdaLomo(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory) -> dict:
    """The reader's names, shared by the snippets in order (module scope: ``MyLM`` of one snippet serves the next)."""
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    tiny_llama().save_pretrained(checkpoint)
    return {"loader": batches(3), "batch": batches(1)[0], "datamodule": Batches(), "name": str(checkpoint)}


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 6 and any("strategy=\"lomo\"" in code for _, code in SNIPPETS)


@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"README.md:{line}" for line, _ in SNIPPETS])
def test_each_readme_snippet_runs_as_written(line, code, namespace, tmp_path, monkeypatch):
    if 'accelerator="gpu"' in code and not torch.cuda.is_available():
        pytest.skip(f"README.md:{line} trains on GPUs")
    monkeypatch.chdir(tmp_path)  # Lightning's logs, the snippets' own files
    namespace.update(model=tiny_llama(), module=Module())
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_the_readme_figures_are_what_their_results_json_renders(monkeypatch):
    """Every table between ``<!-- figures:NAME -->`` markers equals its rendering from ``benchmarks/results/*.json``:
    a figure edited by hand, or a results file changed without ``python -m benchmarks.harness.readme``, fails here."""
    monkeypatch.syspath_prepend(str(README.parent))
    from benchmarks.harness import readme

    blocks = 0
    for path in readme.READMES:
        text = path.read_text()
        blocks += len(readme.BLOCK.findall(text))
        assert readme.render(text) == text, f"{path.name}: run python -m benchmarks.harness.readme"
    assert blocks >= len(readme.FIGURES)

"""Every private upstream API behind lomo_lightning._compat still does what the package relies on.

One test per accessor, against the installed torch, Lightning, omegaconf and datasets: an upstream release
that renames or changes one fails here, by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lomo_lightning import _compat


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_local_shard_offsets_of_a_dtensor(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    tensor = distribute_tensor(torch.arange(12.0).view(4, 3), mesh, [Shard(0)])
    assert _compat.local_shard_offsets(tensor) == (0, 0)


def test_ddp_reducer_can_be_rearmed_for_a_second_backward_of_the_same_forward(one_rank):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(nn.Linear(3, 2), gradient_as_bucket_view=True)
    loss = model(torch.ones(4, 3)).sum()
    loss.backward(retain_graph=True)
    _compat.rearm_ddp_reducer(model)
    loss.backward()
    assert torch.equal(model.module.bias.grad, torch.full((2,), 8.0)), "the second pass accumulates into the buckets"


def test_marking_the_optimizer_stepped_keeps_lr_schedulers_quiet():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    _compat.mark_optimizer_stepped(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        scheduler.step()


def test_csr_row_pointers_match_torch_sparse():
    rows, cols = torch.tensor([0, 0, 2, 3, 3]), torch.tensor([1, 2, 0, 1, 3])
    expected = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(5), (4, 4)).to_sparse_csr().crow_indices()
    assert torch.equal(_compat.csr_row_pointers(rows, 4, out_int32=False), expected)


def test_version_counter_counts_in_place_changes():
    tensor = torch.zeros(2)
    before = _compat.version_counter(tensor)
    tensor.add_(1)
    assert _compat.version_counter(tensor) == before + 1


def test_grad_scaler_scale_before_and_after_its_first_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert _compat.grad_scaler_scale(scaler) == 8.0
    scaler.scale(torch.ones(()))
    assert _compat.grad_scaler_scale(scaler) == 8.0


def test_lightning_module_trainer_and_device_mesh():
    from lightning.pytorch import LightningModule, Trainer

    module = LightningModule()
    assert _compat.trainer_of(module) is None
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert _compat.trainer_of(module) is trainer
    mesh = object()
    _compat.set_device_mesh(module, mesh)
    assert module.device_mesh is mesh


def test_lightning_materializes_and_moves():
    with torch.device("meta"):
        module = nn.Linear(3, 2)
    _compat.materialize_distributed_module(module, torch.device("cpu"))
    assert module.weight.device.type == "cpu" and torch.isfinite(module.weight).all()
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    _compat.optimizers_to_device([optimizer], torch.device("cpu"))
    assert optimizer.state[module.weight]["exp_avg"].device.type == "cpu"


def test_local_paths_and_remote_ones(tmp_path):
    assert _compat.is_local_path(tmp_path / "last.ckpt")
    assert not _compat.is_local_path("s3://bucket/last.ckpt")


def test_full_key_of_an_omegaconf_node():
    from omegaconf import OmegaConf

    config = OmegaConf.create({"method": {"optimizer": {"lr": 1.0}}})
    assert _compat.full_key(config.method.optimizer) == "method.optimizer"


def test_dataset_fingerprint_follows_the_data():
    from datasets import Dataset

    records = Dataset.from_dict({"text": ["a", "b"]})
    assert _compat.dataset_fingerprint(records) != _compat.dataset_fingerprint(records.map(lambda r: {"text": r["text"] * 2}))

"""The chunked causal-LM loss: Hugging Face's loss and gradients, without the full logits."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import VOCAB, batches, tiny_llama

from lomo_lightning import AdaLomo, FusedUpdater, chunked_causal_lm_loss
from lomo_lightning.module import CausalLMModule


def padded_batch() -> dict[str, torch.Tensor]:
    """Two rows, the second padded at the end; prompt tokens of the first row are not labelled."""
    (batch,) = batches(1, batch_size=2, seq_len=16)
    attention_mask = torch.ones_like(batch["input_ids"])
    attention_mask[1, 11:] = 0
    labels = batch["labels"].clone()
    labels[0, :5] = -100
    labels[1, 11:] = -100
    return {**batch, "labels": labels, "attention_mask": attention_mask}


def tiny_gpt2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **no_dropout)
    return AutoModelForCausalLM.from_config(config)


MODELS = {
    "llama_untied": lambda: tiny_llama(tie=False),
    "llama_tied": lambda: tiny_llama(tie=True),
    "gpt2": tiny_gpt2,  # another architecture: tied head, its own final norm
}


@pytest.mark.parametrize("architecture", sorted(MODELS))
@pytest.mark.parametrize("chunk_tokens", [1, 7, 32, 1000])
def test_chunked_loss_equals_the_model_loss_and_gradients(architecture, chunk_tokens):
    batch = padded_batch()
    reference, chunked = MODELS[architecture](), MODELS[architecture]()
    expected = reference(**batch).loss
    got = chunked_causal_lm_loss(chunked, chunk_tokens=chunk_tokens, **batch)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    expected.backward()
    got.backward()
    for (name, p), q in zip(reference.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_training_with_the_chunked_loss_and_clipping_equals_unfused_training():
    """Each parameter's hook fires once per pass (the LM head is used by every chunk), also when clipping
    runs two backward passes over the checkpointed chunks."""
    models = [tiny_llama(tie=True), tiny_llama(tie=True)]
    optimizers = [AdaLomo(model.parameters(), lr=1e-2) for model in models]
    updater = FusedUpdater(models[1], optimizers[1], clip_grad_norm=0.5)
    for batch in batches(3, batch_size=2, seq_len=16):
        models[0](**batch).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.5)
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        assert updater.backward(chunked_causal_lm_loss(models[1], chunk_tokens=8, **batch))
        torch.testing.assert_close(updater.last_grad_norm, norm, rtol=1e-5, atol=0)
    assert norm > 0.5, "the case must exercise clipping"
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_only_one_chunk_of_logits_is_alive_at_a_time():
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens, vocabulary = 2 * 64, VOCAB
    logits_bytes = tokens * vocabulary * 4

    def peak(loss_fn) -> int:
        model = tiny_llama()
        (batch,) = batches(1, batch_size=2, seq_len=64)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss_fn(model, batch).backward()
        (snapshot,) = tracker.get_tracker_snapshot("peak").values()
        return snapshot["Total"]

    full = peak(lambda model, batch: model(**batch).loss)
    chunked = peak(lambda model, batch: chunked_causal_lm_loss(model, chunk_tokens=16, **batch))
    print(f"peak: {full} B with the full logits, {chunked} B chunked; one copy of the logits is {logits_bytes} B")
    assert full - chunked > logits_bytes


def test_models_that_transform_their_logits_are_refused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        chunked_causal_lm_loss(model, chunk_tokens=8, **padded_batch())
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(tiny_llama(), chunk_tokens=0, **padded_batch())
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        chunked_causal_lm_loss(torch.nn.Linear(4, 4), chunk_tokens=8, **padded_batch())


def test_the_module_computes_the_same_loss_with_and_without_chunks():
    batch = padded_batch()
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    plain = CausalLMModule(tiny_llama(), optimizer=optimizer)
    chunked = CausalLMModule(tiny_llama(), optimizer=optimizer, loss_chunk_tokens=5)
    torch.testing.assert_close(chunked.compute_loss(batch), plain.compute_loss(batch), rtol=1e-6, atol=1e-6)
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="transforms its logits"):
        CausalLMModule(model, optimizer=optimizer, loss_chunk_tokens=5)


def llama_7b_head_on_meta() -> torch.nn.Module:
    """LLaMA-7B's vocabulary and width with one block, on the meta device: its shapes, no memory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "card_gib, expected", [(24, 512), (80, None)], ids=["24gib-chunked-by-512", "80gib-whole"]
)
def test_auto_chunks_llama_7b_batch_of_8x512_where_its_logits_exceed_a_share_of_the_card(card_gib, expected):
    from lomo_lightning.device_memory import assumed_device_memory
    from lomo_lightning.objectives.causal_lm import auto_chunk_tokens

    input_ids = torch.zeros(8, 512, dtype=torch.long, device="meta")  # the LOMO paper's batch: 1 GiB of fp32 logits + gradient
    with assumed_device_memory(card_gib * 2**30):
        assert auto_chunk_tokens(llama_7b_head_on_meta(), input_ids) == expected


def test_auto_chunks_exactly_past_the_share_and_computes_the_same_loss():
    from lomo_lightning.device_memory import assumed_device_memory
    from lomo_lightning.objectives.causal_lm import CHUNK_MULTIPLE, LOGITS_FRACTION, auto_chunk_tokens

    batch = padded_batch()
    logits_bytes = batch["input_ids"].numel() * VOCAB * 8  # fp32 logits and their gradient
    at_share = int(logits_bytes / LOGITS_FRACTION) + 1
    model = tiny_llama()
    with assumed_device_memory(at_share):
        assert auto_chunk_tokens(model, batch["input_ids"]) is None
    with assumed_device_memory(at_share - 1000):
        assert auto_chunk_tokens(model, batch["input_ids"]) == CHUNK_MULTIPLE
        optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
        auto = CausalLMModule(tiny_llama(), optimizer=optimizer).compute_loss(batch)  # loss_chunk_tokens="auto", the default
    torch.testing.assert_close(auto, model(**batch).loss, rtol=1e-6, atol=1e-6)
    softcapped = tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    with assumed_device_memory(1):
        assert auto_chunk_tokens(softcapped, batch["input_ids"]) is None, "a model making its own logits is left whole"

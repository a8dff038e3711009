"""Soft prompts against the base run on inputs_embeds with the prompt concatenated (ALGORITHMS.md §4, prompt.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from tests import tiny
from tests.reference.handmade import WordTokenizer, logits


def widened(prompt: torch.Tensor, embed: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    b, length = ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(b, -1, -1), embed(ids)], 1)
    return embeds, torch.cat([torch.ones(b, length, dtype=mask.dtype), mask], 1)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_prompt_equals_concatenated_embeddings(arch):
    base = tiny.BUILDERS[arch]()
    model = ph.attach(base, ph.Prompt(length=3))
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    assert prompt.shape == (3, 32) and prompt.abs().max() <= 0.5            # init "random": U(-0.5, 0.5)
    batch = tiny.batch(arch)
    embeds, mask = widened(prompt, base.get_input_embeddings(), batch["input_ids"], batch["attention_mask"])
    ref = logits(tiny.BUILDERS[arch](), inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(logits(model, **batch), ref, atol=1e-5, rtol=1e-5)


def test_bert_token_types_get_type_zero_for_the_prompt():
    base = tiny.bert()
    base.config.type_vocab_size = 2
    model = ph.attach(base, ph.Prompt(length=2))
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    batch = tiny.batch("bert")
    types = torch.ones_like(batch["input_ids"])
    embeds, mask = widened(prompt, base.get_input_embeddings(), batch["input_ids"], batch["attention_mask"])
    ref = logits(tiny.bert(), inputs_embeds=embeds, attention_mask=mask,
                 token_type_ids=torch.cat([torch.zeros(3, 2, dtype=torch.long), types], 1))
    torch.testing.assert_close(logits(model, **batch, token_type_ids=types), ref, atol=1e-5, rtol=1e-5)


def test_t5_prompt_goes_to_the_encoder_only():
    base = tiny.t5()
    model = ph.attach(base, ph.Prompt(length=4))
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    batch = tiny.batch("t5")
    embeds, mask = widened(prompt, base.get_input_embeddings(), batch["input_ids"], batch["attention_mask"])
    ref = logits(tiny.t5(), inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=batch["decoder_input_ids"])
    torch.testing.assert_close(logits(model, **batch), ref, atol=1e-5, rtol=1e-5)


def test_gpt2_labels_of_prompt_positions_are_ignored():
    base = tiny.gpt2()
    model = ph.attach(base, ph.Prompt(length=3))
    prompt = model.adapters["default"]["prompt"].embeddings.detach()
    batch = tiny.batch("gpt2")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    embeds, mask = widened(prompt, base.get_input_embeddings(), batch["input_ids"], batch["attention_mask"])
    full = logits(tiny.gpt2(), inputs_embeds=embeds, attention_mask=mask)
    # next-token loss over the real tokens only: position L-1+i predicts token i (the last prompt one the first)
    expected = F.cross_entropy(full[:, 2:-1].reshape(-1, tiny.VOCAB), labels.reshape(-1), ignore_index=-100)
    with torch.no_grad():
        got = model(**batch, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_prompt_from_text_equals_the_text_before_the_input(arch):
    text = "say yes or no"
    base = tiny.BUILDERS[arch]()
    model = ph.attach(base, ph.Prompt(length=4, init="text", text=text), tokenizer=WordTokenizer())
    batch = tiny.batch(arch)
    s = torch.tensor(WordTokenizer()(text)["input_ids"]).expand(3, -1)
    joined = dict(batch, input_ids=torch.cat([s, batch["input_ids"]], 1),
                  attention_mask=torch.cat([torch.ones_like(s), batch["attention_mask"]], 1))
    ref = logits(tiny.BUILDERS[arch](), **joined)
    got = logits(model, **batch)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)   # decoder-only: logits of all L + n positions


def test_init_and_length_arguments():
    emb = tiny.bert().get_input_embeddings().weight
    cycled = ph.attach(tiny.bert(), ph.Prompt(length=6, init="text", text="one two four"), tokenizer=WordTokenizer())
    ids = WordTokenizer()("one two four")["input_ids"]
    assert torch.equal(cycled.adapters["default"]["prompt"].embeddings, emb[torch.tensor(ids * 2)])
    torch.manual_seed(0)
    vocab = ph.attach(tiny.bert(), ph.Prompt(length=40, init="vocab", vocab_top=7)).adapters["default"]["prompt"]
    rows = vocab.embeddings.detach()
    assert rows.shape == (40, 32)
    matches = (rows[:, None] == emb[None]).all(-1)                 # (40, vocab): which embedding row each is
    assert matches.any(1).all() and matches.nonzero()[:, 1].max() < 7
    assert len(set(matches.nonzero()[:, 1].tolist())) > 1
    random = ph.attach(tiny.bert(), ph.Prompt(length=200)).adapters["default"]["prompt"].embeddings.detach()
    assert -0.5 <= random.min() < -0.45 and 0.45 < random.max() <= 0.5
    assert not (random[:, None] == emb[None]).all(-1).any()

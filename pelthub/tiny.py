"""Tiny randomly initialised models of each family, built from configs (no downloads).

Used by `pelthub doctor` and the test suite: two layers, width 32, a 96-token vocabulary.
"""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification, T5Config,
                          T5ForConditionalGeneration)

VOCAB = 96


def bert(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def roberta(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=130, num_labels=num_labels,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return RobertaForSequenceClassification(cfg).eval()


def t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


BUILDERS = {"bert": bert, "roberta": roberta, "t5": t5, "gpt2": gpt2, "llama": llama}


def batch(arch: str, b: int = 3, n: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with some padding (right padding), valid for the architecture."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (b, 4), generator=g)
    return out


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every module tensor of a ModularModel away from its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)

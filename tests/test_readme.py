"""The README's quickstart runs as written, once its model path names a (tiny) model folder.

Its Hub calls go to a local Hub server (HF_ENDPOINT), where "someone" pushed a hotels prompt first.
"""
import re
from pathlib import Path

import pytest
import torch

import pelthub as ph
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)

README = Path(__file__).resolve().parents[1] / "README.md"
PATH_LINE = 'path = "path/or/hub-id"'


def quickstart() -> str:
    section = README.read_text().split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_model_folder(folder: Path) -> Path:
    """A tiny BERT classifier and a word-level tokenizer covering the built-in tasks, saved like a Hub model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from pelthub.tasks import list_tasks, load_task
    words = sorted({w for t in list_tasks() for e in load_task(t, 32, 0, 0).train
                    for w in re.findall(r"[a-z]+", f"{e.text} {e.text_pair or ''}".lower())})
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_quickstart_runs_as_written(local_hub, tmp_path, monkeypatch):  # noqa: F811
    code = quickstart()
    assert PATH_LINE in code
    folder = tiny_model_folder(tmp_path / "model")
    from huggingface_hub import constants
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.endpoint)  # read once, when huggingface_hub is imported
    from transformers import AutoModelForSequenceClassification
    someone = ph.Registry(tmp_path / "someone")
    hotels = ph.attach(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2),
                       ph.Prompt(length=20), head=True)
    someone.push(someone.add(hotels, name="hotels-prompt", task="sentiment_hotels"), "someone/hotels-prompt")
    import pelthub.tasks
    full = pelthub.tasks.load_task
    monkeypatch.setattr(pelthub.tasks, "load_task", lambda name, n_train=64, n_dev=64, n_test=64, seed=0: full(
        name, n_train=min(n_train, 64), n_dev=min(n_dev, 64), n_test=min(n_test, 64), seed=seed))  # same calls, less data
    namespace: dict = {}
    exec(compile(code.replace(PATH_LINE, f"path = {str(folder)!r}"), str(README), "exec"), namespace)
    assert namespace["poly"](**namespace["batch"], task_ids=["a", "c", "b"]).logits.shape == (3, 2)
    assert isinstance(namespace["model"], ph.ModularModel) and namespace["ranking"].rows

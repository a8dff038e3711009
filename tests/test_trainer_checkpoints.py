"""Trainer's saves load with ph.from_pretrained: the expected outputs are the trained model's own, taken at each save."""
import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError, ModuleFormatError
from tests import tiny
from tests.test_trainer import rows

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

CONFIGS = {"lora": ph.LoRA(r=2), "poly": ph.Poly(tasks=("a", "b"), skills=2, rank=2)}


def logits(model, task_ids):
    """Eval-mode logits on the training rows; the model's train/eval mode is put back."""
    data = rows()
    batch = {k: torch.stack([r[k] for r in data]) for k in ("input_ids", "attention_mask")}
    was = model.training
    model.eval()
    out = tiny.run(model, batch, **({"task_ids": torch.tensor([r["task_ids"] for r in data])} if task_ids else {}))
    model.train(was)
    return out


class Record(transformers.TrainerCallback):
    """The model's outputs at every checkpoint, taken when Trainer saves it."""

    def __init__(self, task_ids):
        self.task_ids, self.seen = task_ids, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = logits(model, self.task_ids)


def train(model, out, callbacks):
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=6,
                                          per_device_train_batch_size=8, save_steps=3, learning_rate=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows(), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", CONFIGS)
def test_save_model_and_every_checkpoint_load_with_from_pretrained(kind, tmp_path):
    task_ids = kind == "poly"
    model = ph.attach(tiny.bert(), CONFIGS[kind], head=True)
    record = Record(task_ids)
    trainer = train(model, tmp_path / "out", [ph.SaveModulesCallback(), record])
    trainer.save_model()
    final = logits(model, task_ids)
    assert not torch.equal(record.seen[3], final)  # the checkpoints differ, so loading the wrong one fails
    for folder, expected in ((tmp_path / "out", final), (tmp_path / "out" / "checkpoint-3", record.seen[3]),
                             (tmp_path / "out" / "checkpoint-6", record.seen[6])):
        assert not (folder / "modules.safetensors").exists()  # read from Trainer's own model.safetensors
        loaded = ph.from_pretrained(tiny.bert(), folder)
        torch.testing.assert_close(logits(loaded, task_ids), expected, rtol=0, atol=0)


def test_a_trainer_save_without_the_callback_is_refused_naming_the_fix(tmp_path):
    model = ph.attach(tiny.bert(), ph.LoRA(r=2), head=True)
    transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True)).save_model(str(tmp_path / "final"))
    base = tiny.bert()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ModuleFormatError, match="Trainer save.*SaveModulesCallback"):
        ph.from_pretrained(base, tmp_path / "final")
    assert [n for n, _ in base.named_modules()] == names and not base._forward_hooks  # nothing left attached


def test_the_callback_refuses_a_model_that_is_not_modular(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = transformers.Trainer(model=tiny.bert(), args=args, train_dataset=rows(),
                                   callbacks=[ph.SaveModulesCallback()])
    with pytest.raises(ConfigError, match="ph.attach"):
        trainer.train()

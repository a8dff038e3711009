"""transformers.Trainer with default arguments: the expected values come from the same data without Trainer."""
import os

import pytest
import torch
from safetensors.torch import load_file

import pelthub as ph
from tests import tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def rows(n=24, seed=0):
    """A separable task for tiny BERT: the label is whether token 5 appears; some rows padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(6, tiny.VOCAB, (8,), generator=g)
        label = i % 2
        if label:
            ids[3] = 5
        mask = torch.ones(8, dtype=torch.long)
        if i % 3 == 0:
            mask[-2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(label), "task_ids": i % 2})
    return out


def trainer(model, tmp_path, **args):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=6,
                    per_device_train_batch_size=8, save_steps=3, logging_steps=1)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**defaults, **args}),
                                train_dataset=rows())


CONFIGS = {"lora": ph.LoRA(r=2), "prompt": ph.Prompt(length=2), "ia3": ph.IA3(),
           "bottleneck": ph.Bottleneck(reduction=4), "compacter": ph.Compacter(reduction=4),
           "prefix": ph.Prefix(length=2), "ln": ph.LNTuning(),
           "poly": ph.Poly(tasks=("a", "b"), skills=2, rank=2),
           "unipelt": ph.UniPELT(lora=ph.LoRA(r=2), adapter=ph.Bottleneck(reduction=4)),
           "attempt": ph.AttentionMix([torch.randn(2, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)],
                                      target=ph.Prompt(length=2), tasks=("a", "b"))}


def loss_on(model, data):
    """The mean loss over `data` in eval mode, computed here (not by Trainer)."""
    batch = {k: torch.stack([r[k] for r in data]) if k != "task_ids" else torch.tensor([r[k] for r in data])
             for k in data[0]}
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was)
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONFIGS)
def test_trainer_with_defaults_trains_only_the_modules_and_sees_masks_and_task_ids(kind, tmp_path):
    model = ph.compose(tiny.bert(), CONFIGS[kind], head=True)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    seen = []
    model.base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    before, start = loss_on(model, rows()), {n: p.clone() for n, p in model.module_parameters() if p.requires_grad}
    t = trainer(model, tmp_path, learning_rate=1e-2)  # only the step size is not a default: 6 steps must show
    result = t.train()
    assert result.training_loss > 0
    assert all(not torch.equal(p, start[n]) for n, p in model.module_parameters() if p.requires_grad)
    if kind != "prompt":  # 2 prompt tokens on a random 2-layer BERT leave the loss at chance (0.6932 -> 0.6934)
        assert loss_on(model, rows()) < before  # the loss fell
    assert all(m is not None for m in seen)  # Trainer kept the attention mask (it drops unnamed columns)
    assert any((m == 0).any() for m in seen)
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    saved = load_file(os.path.join(tmp_path, "out", "checkpoint-6", "model.safetensors"))
    assert saved and all(k.startswith(("adapters.", "heads.")) for k in saved)  # module weights only
    own = model.state_dict()
    assert sorted(saved) == sorted(own)
    for k in saved:
        torch.testing.assert_close(saved[k], own[k], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_from_checkpoint_restores_the_modules_exactly(tmp_path):
    model = ph.compose(tiny.bert(), ph.LoRA(r=2), head=True)
    trainer(model, tmp_path).train()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = ph.compose(tiny.bert(), ph.LoRA(r=2), head=True)
    trainer(fresh, tmp_path).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    for k, v in fresh.state_dict().items():  # resumed at step 3 and ran to 6: the same end point
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gpt2_with_tied_embeddings_checkpoints(tmp_path):
    model = ph.attach(tiny.gpt2(), ph.LoRA(r=2))
    data = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": r["input_ids"]}
            for r in rows()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                          max_steps=2, save_steps=1)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()


def test_state_dict_holds_module_tensors_only_and_round_trips():
    model = ph.attach(tiny.bert(), ph.LoRA(r=2), head=True)
    tiny.perturb(model)
    state = model.state_dict()
    assert state and all(k.startswith(("adapters.", "heads.")) for k in state)
    other = ph.attach(tiny.bert(), ph.LoRA(r=2), head=True)
    other.load_state_dict(state)
    inputs = tiny.batch("bert")
    torch.testing.assert_close(tiny.run(other, inputs), tiny.run(model, inputs), rtol=0, atol=0)
    with pytest.raises(ph.PeltError, match="does not match"):
        other.load_state_dict({**state, "base.extra": torch.zeros(1)})


def test_trainer_asks_the_wrapped_model_what_it_would_ask_the_base(tmp_path):
    """Whether Trainer passes `num_items_in_batch` (and rescales the loss) follows the base, also when it opts out."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for base in (tiny.bert(), tiny.gpt2()):
        bare = transformers.Trainer(model=base, args=args).model_accepts_loss_kwargs
        assert transformers.Trainer(model=ph.attach(base, ph.LoRA(r=2)), args=args).model_accepts_loss_kwargs == bare
    opted_out = tiny.llama()
    opted_out.accepts_loss_kwargs = False
    assert transformers.Trainer(model=ph.attach(opted_out, ph.LoRA(r=2)), args=args).model_accepts_loss_kwargs is False

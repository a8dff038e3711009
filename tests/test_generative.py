"""Generative tasks on causal LMs and seq2seq models: encoding, training, evaluation, many sets at once.

References are computed here, one example at a time on unpadded inputs: the target's
log-probabilities from the model's logits by hand (input and target tokenised apart, the
target closed by EOS), and module sets or tasks evaluated each on its own model.
"""
from functools import partial

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import pelthub as ph
from pelthub.errors import ConfigError, DataError
from pelthub.generative import choice_scores, evaluate, generate_texts
from pelthub.model import ModularModel
from pelthub.routing.tasks import PerTask
from pelthub.tasks.generative import GenerativeExample as G, encode, generative_examples, is_generative
from pelthub.training import fit
from tests import tiny
from tests.tiny import perturb

BUILDERS = {"gpt2": tiny.gpt2, "llama": tiny.llama, "qwen2": partial(tiny.family, "qwen2"), "t5": tiny.t5}
DATA = [G("a b c d", "e f", choices=("e f", "g", "h i j")), G("k l", "m", choices=("n o", "m")),
        G("p q r", "s t u", choices=("s t u", "v", "w", "x")), G("w", "x y", choices=("x y", "z 1"))]
SETS = {"a": [ph.LoRA(r=2)], "b": [ph.IA3()], "c": [ph.LoRA(r=4, targets=("o", "up"))]}


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over 96 ids (tiny.VOCAB): <pad> 0, </s> 1, <unk> 2, then letters and numbers."""
    words = ["<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", *map(str, range(67))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sets_model(arch: str, names=tuple(SETS)) -> ModularModel:
    model = ModularModel(BUILDERS[arch]())
    for name in names:
        model.add(name, SETS[name])
    perturb(model, seed=3, scale=0.5)
    return model.eval()


def alone(model: ModularModel, arch: str, name: str) -> ModularModel:
    """A fresh base holding only set `name` of `model` (the same weights)."""
    ref = ModularModel(BUILDERS[arch]())
    ref.add("only", [m.config for m in model.adapters[name].values()], init=False)
    ref.adapters["only"].load_state_dict(model.adapters[name].state_dict())
    return ref.eval()


def target_logprobs(model, arch, tok, example: G, **route) -> torch.Tensor:
    """log p(target token | input, earlier target tokens) for each target token, EOS included, by hand."""
    prompt = tok(example.input)["input_ids"]
    answer = tok(example.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        if arch == "t5":
            start = model.config.decoder_start_token_id
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + answer[:-1]]),
                           **route).logits[0]
        else:
            # from the end: a soft prompt lengthens the logits at the front
            logits = model(input_ids=torch.tensor([prompt + answer]), **route).logits[0, -len(answer) - 1:-1]
    return logits.double().log_softmax(-1)[torch.arange(len(answer)), torch.tensor(answer)]


def hand_loss(model, arch, tok, data, **route) -> float:
    """Mean negative log-likelihood per target token over the whole data."""
    found = [target_logprobs(model, arch, tok, e, **route) for e in data]
    return float(-torch.cat(found).mean())


# ------------------------------------------------------------------ encoding and data
@pytest.mark.parametrize("arch", BUILDERS)
def test_masked_loss_equals_hand_cross_entropy_over_target_tokens_only(arch, tok):
    model = ph.attach(BUILDERS[arch](), ph.LoRA(r=2)).eval()
    perturb(model, scale=0.5)
    batch = encode(tok, DATA, arch == "t5")
    with torch.no_grad():
        loss = float(model(**batch).loss)
    want = hand_loss(model, arch, tok, DATA)
    assert loss == pytest.approx(want, abs=1e-5)
    assert evaluate(model, DATA, tok, batch_size=3)["loss"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kind", [ph.Prompt(length=3), ph.Prefix(length=2, hidden=None)], ids=["prompt", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_target_loss_under_soft_prompts_and_prefixes(arch, kind, tok):
    model = ph.attach(BUILDERS[arch](), kind).eval()
    perturb(model, scale=0.5)
    want = hand_loss(model, arch, tok, DATA)
    with torch.no_grad():
        assert float(model(**encode(tok, DATA, arch == "t5")).loss) == pytest.approx(want, abs=1e-5)
    assert evaluate(model, DATA, tok, batch_size=3)["loss"] == pytest.approx(want, abs=1e-5)


def test_causal_encoding_masks_prompt_and_padding_and_left_pads_for_generation(tok):
    batch = encode(tok, DATA[:2], encoder_decoder=False)
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7, 8, 1], [13, 14, 15, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100] * 4 + [7, 8, 1], [-100, -100, 15, 1, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    prompts = encode(tok, DATA[:2], encoder_decoder=False, targets=False)
    assert prompts["input_ids"].tolist() == [[3, 4, 5, 6], [0, 0, 13, 14]]
    assert prompts["attention_mask"].tolist() == [[1] * 4, [0, 0, 1, 1]]
    seq2seq = encode(tok, DATA[:2], encoder_decoder=True)
    assert seq2seq["labels"].tolist() == [[7, 8, 1], [15, 1, -100]]
    assert seq2seq["input_ids"].tolist() == [[3, 4, 5, 6], [13, 14, 0, 0]]


def test_causal_truncation_keeps_the_target(tok):
    batch = encode(tok, [G("a b c d e f", "g h")], encoder_decoder=False, max_length=5)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 1]] and batch["labels"].tolist() == [[-100, -100, 9, 10, 1]]


def test_chat_template_renders_the_input_when_asked(tok):
    chatty = tok.__class__(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>")
    chatty.chat_template = ("{% for m in messages %}u {{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}b{% endif %}")
    batch = encode(chatty, generative_examples(DATA[1:2], chat=True), encoder_decoder=False)
    assert batch["input_ids"].tolist() == [tok("u k l b")["input_ids"] + [15, 1]]
    assert batch["labels"].tolist() == [[-100] * 4 + [15, 1]]
    with pytest.raises(ConfigError, match="chat_template"):
        encode(tok, generative_examples(DATA[1:2], chat=True), encoder_decoder=False)


def test_rows_tables_and_task_mappings_become_examples():
    import datasets
    table = datasets.Dataset.from_dict({"question": ["a b", "c"], "answer": ["d", "e"], "options": [["d", "f"],
                                                                                                    ["e", "g"]]})
    got = generative_examples(table, columns={"input": "question", "target": "answer", "choices": "options"})
    assert got == [G("a b", "d", ("d", "f")), G("c", "e", ("e", "g"))]
    assert generative_examples({"t": [{"input": "a", "target": "b"}]}) == [G("a", "b", task="t")]
    assert is_generative(datasets.Dataset.from_dict({"input": ["a"], "target": ["b"]}))
    assert is_generative({"t": DATA}) and not is_generative(ph.tasks.load_task("sentiment_hotels", 4, 0, 0).train)


def test_bad_generative_input_is_refused_with_the_fix(tok):
    with pytest.raises(DataError, match="not one of the choices"):
        G("a", "b", choices=("c", "d"))
    with pytest.raises(DataError, match=r"row 1 has no \['target'\]"):
        generative_examples([{"input": "a", "target": "b"}, {"input": "c"}])
    with pytest.raises(ConfigError, match="unknown fields"):
        generative_examples(DATA, columns={"answer": "x"})
    model = ph.attach(tiny.gpt2(), ph.LoRA(r=2))
    with pytest.raises(DataError, match="needs answer choices"):
        evaluate(model, [G("a", "b")], tok, metrics=["rank"])
    with pytest.raises(ConfigError, match="does not route"):
        evaluate(model, [G("a", "b", task="t")], tok)
    with pytest.raises(ConfigError, match="unknown metrics"):
        evaluate(model, DATA, tok, metrics=["bleu"])
    with pytest.raises(ConfigError, match="routes none"):
        evaluate(model, DATA, tok, tasks=["p"])
    with pytest.raises(ConfigError, match="once"):
        evaluate(model, DATA, tok, adapters=["default", "default"])


# ------------------------------------------------------------------ evaluation against hand references
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_rank_classification_equals_hand_length_normalised_log_likelihoods(arch, tok):
    model = ph.attach(BUILDERS[arch](), ph.LoRA(r=2)).eval()
    perturb(model, scale=1.0)
    want = torch.full((len(DATA), 4), float("-inf"), dtype=torch.double)
    for i, e in enumerate(DATA):
        for j, choice in enumerate(e.choices):
            want[i, j] = target_logprobs(model, arch, tok, G(e.input, choice)).mean()
    got = choice_scores(model, DATA, tok, batch_size=5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    right = (want.argmax(-1) == torch.tensor([e.choices.index(e.target) for e in DATA])).double().mean()
    assert evaluate(model, DATA, tok, metrics=["rank"])["rank"] == float(right)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_evaluating_n_sets_in_one_pass_equals_n_separate_evaluations(arch, tok):
    model = sets_model(arch)
    names = ["a", "b", "__base__"]
    # targets set to what set "a" writes alone, so exact match tells the sets apart
    written = generate_texts(alone(model, arch, "a"), DATA, tok, max_new_tokens=3)
    data = [G(e.input, w, choices=tuple(dict.fromkeys((w, *e.choices)))) for e, w in zip(DATA, written)]
    metrics = ["loss", "perplexity", "rank", "exact_match"]
    together = evaluate(model, data, tok, metrics, adapters=names, batch_size=3, max_new_tokens=3)
    for name in names:
        ref = ModularModel(BUILDERS[arch]()).eval() if name == "__base__" else alone(model, arch, name)
        separate = evaluate(ref, data, tok, metrics, batch_size=3, max_new_tokens=3)
        assert together[name] == pytest.approx(separate, rel=1e-5, abs=1e-5), name
        assert together[name]["loss"] == pytest.approx(hand_loss(ref, arch, tok, data), abs=1e-5)
    assert together["a"]["exact_match"] == 1.0 and together["b"]["exact_match"] < 1.0


@pytest.mark.parametrize("routed", [PerTask((ph.LoRA(r=2),), tasks=["p", "q", "r"]),
                                    ph.Poly(tasks=["p", "q", "r"], skills=2, rank=2)], ids=["pertask", "poly"])
def test_evaluating_the_tasks_of_a_routed_model_equals_each_task_alone(routed, tok):
    model = ph.compose(tiny.llama(), routed).eval()
    perturb(model, scale=0.5)
    metrics = ["loss", "rank", "exact_match"]
    together = evaluate(model, DATA, tok, metrics, tasks=["r", "p"], max_new_tokens=3)
    texts = generate_texts(model, DATA, tok, tasks=["r", "p"], max_new_tokens=3)
    for task in ("r", "p"):
        tagged = generative_examples({task: DATA})
        assert together[task] == pytest.approx(evaluate(model, tagged, tok, metrics, max_new_tokens=3), rel=1e-5, abs=1e-5)
        assert together[task]["loss"] == pytest.approx(hand_loss(model, "llama", tok, DATA, task_ids=[task]), abs=1e-5)
        assert texts[task] == generate_texts(model, tagged, tok, max_new_tokens=3, batch_size=1)
    assert texts["r"] != texts["p"]


# ------------------------------------------------------------------ serving: mixed batches generate as each alone
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "t5"])
def test_mixed_adapter_names_generate_as_each_example_alone(arch, beams, tok):
    model = sets_model(arch)
    chosen = ["c", "a", "__base__", "b"]
    prompts = encode(tok, DATA, arch == "t5", targets=False)   # left-padded for causal LMs, lengths differ
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
    got = model.generate(**prompts, adapter_names=chosen, **kw)
    for i, name in enumerate(chosen):
        ref = ModularModel(BUILDERS[arch]()).eval() if name == "__base__" else alone(model, arch, name)
        ids = torch.tensor([tok(DATA[i].input)["input_ids"]])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        assert got[i, -want.shape[1]:].tolist() == want[0].tolist(), name


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("arch", ["qwen2", "t5"])
def test_mixed_task_ids_generate_as_each_example_alone(arch, beams, tok):
    model = ph.compose(BUILDERS[arch](), PerTask((ph.LoRA(r=2),), tasks=["p", "q"])).eval()
    perturb(model, scale=0.5)
    chosen = ["q", "p", "p", "q"]
    prompts = encode(tok, DATA, arch == "t5", targets=False)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
    got = model.generate(**prompts, task_ids=chosen, **kw)
    for i, task in enumerate(chosen):
        ids = torch.tensor([tok(DATA[i].input)["input_ids"]])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), task_ids=[task], **kw)
        assert got[i, -want.shape[1]:].tolist() == want[0].tolist(), task


# ------------------------------------------------------------------ training
def test_fit_trains_a_seq2seq_task(tok):
    model = ph.attach(tiny.t5(), ph.LoRA(r=4))
    before = evaluate(model, DATA, tok)["loss"]
    fit(model, DATA, tok, steps=10, batch_size=4, lr=3e-2, progress=False)
    assert evaluate(model, DATA, tok)["loss"] < before - 1.0


def test_fit_on_a_datasets_table_equals_fit_on_the_example_list(tok):
    import datasets
    table = datasets.Dataset.from_dict({"input": [e.input for e in DATA], "target": [e.target for e in DATA]})
    runs = []
    for data in (DATA, table, {"p": table}):
        model = ph.compose(tiny.gpt2(), PerTask((ph.LoRA(r=2),), tasks=["p"])) if isinstance(data, dict) \
            else ph.attach(tiny.gpt2(), ph.LoRA(r=2))
        runs.append(fit(model, data, tok, steps=3, batch_size=2, lr=1e-2, progress=False))
    assert runs[1] == runs[0] and runs[2] == pytest.approx(runs[0], abs=1e-5)


def test_fit_routes_per_task_examples_to_their_task(tok):
    model = ph.compose(BUILDERS["qwen2"](), PerTask((ph.LoRA(r=4),), tasks=["p", "q"]))
    before = evaluate(model, DATA, tok, tasks=["p", "q"])
    fit(model, {"p": DATA}, tok, steps=10, batch_size=4, lr=3e-2, progress=False)
    after = evaluate(model, DATA, tok, tasks=["p", "q"])
    assert after["p"]["loss"] < before["p"]["loss"] - 0.2
    assert after["q"]["loss"] == before["q"]["loss"]   # task q's LoRA never saw data

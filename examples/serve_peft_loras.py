"""Train one LoRA per task on a causal LM in mixed batches, export each in PEFT's format, serve them together.

    python examples/serve_peft_loras.py --tiny     # a tiny random Llama built from a config (seconds)
    python examples/serve_peft_loras.py --model PATH --tokenizer PATH   # any causal LM folder

`PerTask` trains three task LoRAs in one mixed batch (each example reaches only its task's LoRA),
`save_tasks` registers each as a plain LoRA, and `export` writes each as an `adapter_config.json` +
`adapter_model.safetensors` folder: the layout LoRA serving engines load (vLLM's `LoRARequest`,
TGI/LoRAX adapters, PEFT). Here PEFT plays the serving engine: one base, the three adapters loaded
side by side, a mixed batch routed per request with `adapter_names`. Its greedy generations must
equal pelthub's own mixed-batch `generate(..., task_ids=...)`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _setup import load  # noqa: F401  (sets offline mode and the import path, so it comes first)

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.hub import export  # noqa: E402
from pelthub.routing.tasks import save_tasks  # noqa: E402
from pelthub.tasks.generative import GenerativeExample, encode  # noqa: E402
from pelthub.training import fit  # noqa: E402

LETTERS = "abcdefgh"
TASKS = {"copy": lambda w: w, "reverse": lambda w: w[::-1], "first": lambda w: w[:1]}


def task_data(seed: int = 0, n: int = 32) -> dict[str, list[GenerativeExample]]:
    """Three toy tasks over letter strings: copy them, reverse them, keep the first letter."""
    g = torch.Generator().manual_seed(seed)
    words = [[LETTERS[i] for i in torch.randint(len(LETTERS), (3,), generator=g).tolist()] for _ in range(n)]
    return {t: [GenerativeExample(" ".join(w), " ".join(f(w))) for w in words] for t, f in TASKS.items()}


def tiny_model():
    """A word-level tokenizer over the letters and a tiny random Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pelthub.tiny import llama
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *LETTERS])},
                                       unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return tokenizer, lambda: llama(seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random Llama and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--model", help="a causal LM folder (default: the tiny Llama)")
    parser.add_argument("--tokenizer", help="its tokenizer folder (default: --model)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 200, tiny 20)")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        fresh_base = lambda: AutoModelForCausalLM.from_pretrained(args.model)  # noqa: E731
    else:
        tokenizer, fresh_base = tiny_model()
    steps = args.steps or (20 if args.tiny else 200)

    model = ph.compose(fresh_base(), ph.PerTask(ph.LoRA(r=4), tasks=list(TASKS)))
    fit(model, task_data(), tokenizer, steps=steps, batch_size=12, lr=1e-2, progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        registry = ph.Registry(Path(tmp) / "registry")
        refs = save_tasks(model, registry)                          # {task: ref}, each a plain LoRA
        folders = {t: export(ref, Path(tmp) / t, registry=registry, task_type="CAUSAL_LM") for t, ref in refs.items()}
        print("exported:", ", ".join(f"{t} -> {f.name}/{{{', '.join(sorted(p.name for p in f.iterdir()))}}}"
                                     for t, f in folders.items()))

        names = list(TASKS)                                          # the serving side: one base, three adapters
        served = PeftModel.from_pretrained(fresh_base(), folders[names[0]], adapter_name=names[0])
        for t in names[1:]:
            served.load_adapter(folders[t], adapter_name=t)
        served.eval()

        requests = [(GenerativeExample("a b c", "?"), t) for t in names] + [(GenerativeExample("h g f", "?"), "reverse")]
        batch = encode(tokenizer, [e for e, _ in requests], encoder_decoder=False, targets=False)
        tasks = [t for _, t in requests]
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            theirs = served.generate(**batch, adapter_names=tasks, **settings)
            ours = model.eval().generate(**batch, task_ids=[names.index(t) for t in tasks], **settings)
    prompt = batch["input_ids"].shape[1]
    for (example, task), row in zip(requests, theirs[:, prompt:]):
        print(f"{task:>8}: {example.input!r} -> {tokenizer.decode(row, skip_special_tokens=True)!r}")
    same = torch.equal(theirs, ours)
    print("PEFT serving the exported LoRAs (mixed adapter_names) equals pelthub's mixed task_ids:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

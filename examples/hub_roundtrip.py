"""Push a module to a Hub, pull it into a second registry, find it, and hand it to PEFT.

    python examples/hub_roundtrip.py                       # a local Hub-API server on 127.0.0.1 (no network)
    HF_TOKEN=hf_... python examples/hub_roundtrip.py --repo me/pelthub-demo --private   # the real Hub

Without HF_TOKEN/--token and --endpoint it starts tests/hubserver.py's LocalHub, so
it runs offline in seconds. The token is read from --token or HF_TOKEN and never printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pelthub as ph  # noqa: E402
from pelthub.hub import export, search  # noqa: E402


def tiny_base(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def local_hub(stack: ExitStack, home: Path) -> str:
    """Start the test suite's LocalHub (plain LFS uploads, caches under `home`); returns its endpoint."""
    os.environ["HF_HOME"] = str(home)
    from huggingface_hub import constants

    from tests.hubserver import LocalHub
    constants.HF_HUB_DISABLE_XET = True
    return stack.enter_context(LocalHub()).endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default="demo/pelthub-roundtrip", help="Hub repo to push to")
    parser.add_argument("--endpoint", help="Hub URL (default: a local server unless a token is given)")
    parser.add_argument("--token", help="Hub token with write access (default: $HF_TOKEN)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("HF_TOKEN")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        endpoint = args.endpoint or (None if token else local_hub(stack, tmp / "hf"))
        print(f"hub: {endpoint or 'https://huggingface.co'}")

        model = ph.attach(tiny_base(), ph.LoRA(r=4), head=True).eval()
        with torch.no_grad():  # stand-in for training
            for _, p in model.module_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        mine, theirs = ph.Registry(tmp / "mine"), ph.Registry(tmp / "theirs")
        ref = mine.add(model, name="demo-lora", task="demo", metrics={"accuracy": 0.5})
        commit = mine.push(ref, args.repo, private=args.private, token=token, endpoint=endpoint)
        print(f"pushed {ref} -> {args.repo} @ {commit[:12]}")

        pulled = theirs.pull(args.repo, revision=commit, token=token, endpoint=endpoint)
        batch = {"input_ids": torch.randint(3, 96, (2, 8))}
        with torch.no_grad():
            same = torch.allclose(theirs.load(pulled, tiny_base())(**batch).logits, model(**batch).logits)
        print(f"pulled {args.repo} as {pulled}: {'same outputs' if same else 'OUTPUTS DIFFER'}")

        found = search(kind="lora", task="demo", endpoint=endpoint, token=token)
        print(f"hub search kind=lora task=demo: {[m.repo_id for m in found]}")

        folder = export(pulled, tmp / "peft", registry=theirs)
        try:
            from peft import PeftModel
        except ImportError:
            print(f"exported PEFT files {sorted(p.name for p in folder.iterdir())} (install peft to load them)")
            return 0 if same else 1
        with torch.no_grad():
            peft_logits = PeftModel.from_pretrained(tiny_base(), folder).eval()(**batch).logits
        print(f"PEFT loads the export: max |Δ| = {(peft_logits - model(**batch).logits).abs().max():.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

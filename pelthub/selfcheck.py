"""`pelthub doctor` and `ph.doctor()`: the installed versions, the supported range, and a few seconds of exactness checks.

A user who upgrades transformers (or torch, or PEFT) runs this to learn at once
whether pelthub still holds on that release. Each check builds a tiny model of
one family from a config and compares pelthub against a reference computed
here from the math (not from another pelthub path):

- every module kind attaches, changes the output once moved off its init, and
  `detach()` gives the base's outputs bit for bit;
- LoRA equals the base with W replaced by W + (α/r)·B·A;
- a prefix reaches the model (the output moves, its gradient is non-zero);
- UniPELT's prefix gate runs in every layer and receives a gradient.

A failed check prints its name and the reason, and `run` returns 1.
"""
from __future__ import annotations

import copy
import importlib.metadata as metadata
import platform
import re
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import tiny
from .model import attach
from .model.compat import cache_keyword
from .model.modular import FrozenHeadWarning
from .modules import IA3, Bottleneck, Compacter, LNTuning, LoRA, Prefix, Prompt
from .modules.base import is_conv1d
from .routing.gates import UniPELT

PACKAGES = ("torch", "transformers", "huggingface-hub", "safetensors", "networkx", "scipy", "peft")
FAMILIES = ("bert", "gpt2", "llama", "t5")
KINDS = {"lora": LoRA(r=2), "bottleneck": Bottleneck(reduction=4), "compacter": Compacter(n=2, reduction=4),
         "prompt": Prompt(length=3), "prefix": Prefix(length=2, hidden=None), "ia3": IA3(), "ln": LNTuning()}


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str = ""


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def supported() -> dict[str, str]:
    """The ranges pelthub declares (its package metadata), by package name."""
    out: dict[str, str] = {}
    for requirement in metadata.requires("pelthub") or []:
        spec = requirement.split(";")[0].strip()
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", spec)
        if match and match.group(1).lower() in PACKAGES:
            out[match.group(1).lower()] = match.group(2) or "any"
    return out


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def check_kind(family: str, kind: str) -> None:
    base = tiny.BUILDERS[family]()
    inputs = tiny.batch(family)
    before = _logits(base, inputs)
    model = attach(base, KINDS[kind])
    tiny.perturb(model, scale=0.3)
    after = _logits(model, inputs)[..., -before.shape[-2]:, :] if before.dim() == 3 else _logits(model, inputs)
    assert not torch.allclose(after, before, atol=1e-4), "the module does not change the output"
    assert torch.equal(_logits(model.detach(), inputs), before), "detach() does not restore the base bit for bit"


def check_lora_formula(family: str) -> None:
    base = tiny.BUILDERS[family]()
    inputs = tiny.batch(family)
    reference = copy.deepcopy(base)
    model = attach(base, LoRA(r=2, alpha=3.0))
    tiny.perturb(model, scale=0.3)
    with torch.no_grad():
        for key, layer in model.adapters["default"]["lora"].layers.items():
            target = reference.get_submodule(key.replace("-", "."))
            delta = (3.0 / 2) * layer.lora_b @ layer.lora_a  # (out, in)
            target.weight += delta.T if is_conv1d(target) else delta
    got, want = _logits(model, inputs), _logits(reference, inputs)
    assert torch.allclose(got, want, atol=1e-5), f"LoRA differs from W + (α/r)·B·A by {(got - want).abs().max():.2e}"


def check_prefix_applied(family: str) -> None:
    base = tiny.BUILDERS[family]()
    inputs = tiny.batch(family)
    before = _logits(base, inputs)
    cache_keyword(base)
    model = attach(base, Prefix(length=2, hidden=None))
    tiny.perturb(model, scale=0.3)
    out = model(**inputs).logits
    assert not torch.allclose(out.detach(), before, atol=1e-4), "the prefix does not reach the model"
    out.square().sum().backward()
    grads = [p.grad for _, p in model.module_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), "the prefix gets no gradient"


def check_unipelt_prefix_gate(family: str) -> None:
    model = attach(tiny.BUILDERS[family](), UniPELT(prefix=Prefix(length=2, hidden=None)))
    tiny.perturb(model, scale=0.3)
    model(**tiny.batch(family)).logits.square().sum().backward()
    unipelt = model.adapters["default"]["unipelt"]
    gated = [site for site, parts in unipelt.gate_values().items() if "prefix" in parts]
    assert len(gated) == len(unipelt.prefix_layers), f"the prefix gate ran in {len(gated)} of " \
                                                     f"{len(unipelt.prefix_layers)} layers"
    grads = [p.grad for p in unipelt.gates["prefix"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads), "the prefix gates get no gradient"


def checks(quick: bool = False) -> list[tuple[str, Callable[[], None]]]:
    families = FAMILIES[:2] if quick else FAMILIES
    found: list[tuple[str, Callable[[], None]]] = []
    for family in families:
        for kind in KINDS:
            found.append((f"{kind} on {family}", lambda f=family, k=kind: check_kind(f, k)))
        found.append((f"LoRA formula on {family}", lambda f=family: check_lora_formula(f)))
        found.append((f"prefix applied on {family}", lambda f=family: check_prefix_applied(f)))
        found.append((f"UniPELT prefix gate on {family}", lambda f=family: check_unipelt_prefix_gate(f)))
    return found


def run_checks(quick: bool = False) -> list[Result]:
    results = []
    for name, check in checks(quick):
        try:
            with warnings.catch_warnings():  # the tiny models' heads are random on purpose
                warnings.simplefilter("ignore", FrozenHeadWarning)
                check()
            results.append(Result(name, True))
        except Exception as e:  # a doctor reports every failure, whatever it is
            where = traceback.extract_tb(e.__traceback__)[-1]
            results.append(Result(name, False, f"{type(e).__name__}: {e} ({where.filename}:{where.lineno})"))
    return results


def report(quick: bool = False, out: Callable[[str], None] = print) -> int:
    """Print versions, the supported range and the checks; 0 when every check holds, else 1."""
    start = time.perf_counter()
    out(f"pelthub {metadata.version('pelthub')} on Python {platform.python_version()}")
    ranges = supported()
    for name, version in versions().items():
        out(f"  {name:<16} {version or 'not installed':<14} supported: {ranges.get(name, 'optional (dev)')}")
    results = run_checks(quick)
    for r in results:
        out(f"  [{'ok' if r.ok else 'FAIL'}] {r.name}{': ' + r.detail if r.detail else ''}")
    failed = [r.name for r in results if not r.ok]
    out(f"{len(results) - len(failed)}/{len(results)} checks hold ({time.perf_counter() - start:.1f} s)")
    if failed:
        out(f"FAILED: {', '.join(failed)}; pelthub is not exact on these versions. Install the tested lock "
            "(requirements-lock.txt) or report the versions above")
        return 1
    return 0

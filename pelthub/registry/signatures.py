"""Routing signatures of registered LoRAs, and search by example texts.

A LoRA's signature is, per adapted layer, the top right singular vector of its ΔW: the
prototype Arrow routes by (`pelthub.routing.arrow`). `record` computes it when a module
holding one LoRA is added, keyed by the sha256 of its weights file (so re-registering the same
weights under another name reuses it), in `signatures.sqlite` beside the registry's index;
`stored` gives it back, so Arrow over registry refs builds without SVDs.

`search` ranks the LoRAs trained on a base model for a handful of example texts, with no
training, by how often Arrow would route to them:

    score_e = #{(token, layer): e among the top_k of |h·p| at that layer} / #{(token, layer)}

where h runs over the examples' real (unpadded) tokens at the input of every layer some
candidate adapts, and at a layer only the candidates adapting it compete. `route_fractions`
is that count on one stacked prototype matrix per layer: the part that grows with the registry.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError, ModuleFormatError, RegistryError
from ..model.io import WEIGHTS_FILE, read_description, read_header
from ..model.modular import ModularModel
from ..modules.base import site_name
from ..modules.lora import top_right_singular
from .ranking import Ranking

if TYPE_CHECKING:
    from .registry import Registry

FILE = "signatures.sqlite"
DELETE = f"delete it (and {FILE}-wal): pelthub recomputes the signatures from the registry's blobs"
LAYERS = ".lora.layers."
METRIC = "arrow_routing"
Signature = dict[str, torch.Tensor]            # site → prototype (in,)
Table = dict[str, tuple[torch.Tensor, torch.Tensor]]  # site → (candidate indices (n,), prototypes (n, in))


@contextmanager
def _connect(root: Path) -> Iterator[sqlite3.Connection]:
    """The signatures database, closed afterwards; its damage is a RegistryError naming the fix.

    It holds only what `compute` derives from the blobs, so deleting it loses nothing.
    """
    path = root / FILE
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS signatures (weights TEXT, site TEXT, vec BLOB, "
                       "PRIMARY KEY (weights, site))")
            yield db
    except sqlite3.Error as e:
        raise RegistryError(f"cannot use {path} ({e}): it is damaged or was not written by pelthub; {DELETE}") from None


def compute(directory: str | Path) -> Signature | None:
    """The signature of a saved module holding exactly one LoRA (None for any other module)."""
    info = read_description(directory)
    sets = [(name, configs) for name, configs in info["modules"].items()]
    if len(sets) != 1 or [c.get("kind") for c in sets[0][1]] != ["lora"]:
        return None
    prefix = f"adapters.{sets[0][0]}{LAYERS}"
    weights = Path(directory) / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        keys = [k[len(prefix):-len(".lora_a")] for k in sorted(names) if k.startswith(prefix) and k.endswith(".lora_a")]
        return {site_name(k): top_right_singular(*_factors(f, names, f"{prefix}{k}", weights)) for k in keys}


def _factors(f: Any, names: set[str], key: str, weights: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) of one layer, or ModuleFormatError naming the tensors that disagree."""
    if f"{key}.lora_b" not in names:
        raise ModuleFormatError(f"{weights}: {key}.lora_a has no {key}.lora_b beside it; save the module again "
                                "(model.save_pretrained) or re-export it")
    a, b = f.get_tensor(f"{key}.lora_a"), f.get_tensor(f"{key}.lora_b")
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or not a.shape[0]:
        raise ModuleFormatError(f"{weights}: {key}.lora_a {list(a.shape)} and .lora_b {list(b.shape)} are not a LoRA "
                                "pair (A is (r, in), B is (out, r), r > 0); save the module again or re-export it")
    return a.float(), b.float()


def record(root: Path, directory: str | Path, weights_sha: str) -> Signature | None:
    """Compute and store the signature of a module being added (nothing for non-LoRA modules)."""
    signature = compute(directory)
    if signature:
        with _connect(root) as db, db:
            db.executemany("INSERT OR REPLACE INTO signatures VALUES (?, ?, ?)",
                           [(weights_sha, site, v.float().numpy().tobytes()) for site, v in signature.items()])
    return signature


def stored(registry: "Registry", ref: str) -> Signature | None:
    """The stored signature of a registered module (computed now if it was added before signatures),
    checked against the widths its weights file declares."""
    card = registry.get(ref)
    sha = card.files[WEIGHTS_FILE]["sha256"]
    signature = _read(registry.root, "WHERE weights = ?", (sha,)).get(sha)
    if signature is None:
        return record(registry.root, registry.path(card.ref), sha)
    widths = {site_name(name.split(LAYERS, 1)[1][:-len(".lora_a")]): shape[-1]
              for name, (shape, _) in read_header(registry.blobs.path(sha)).items()
              if LAYERS in name and name.endswith(".lora_a")}
    if {site: len(v) for site, v in signature.items()} != widths:
        raise RegistryError(f"{registry.root / FILE}: the signature of {card.ref} does not fit its weights (sites or "
                            f"widths differ); {DELETE}")
    return signature


def stored_by_weights(root: Path) -> dict[str, Signature]:
    """{weights sha256: signature} of every module the registry at `root` holds a signature for, in one query."""
    return _read(root)


def _read(root: Path, where: str = "", args: tuple = ()) -> dict[str, Signature]:
    """{weights sha256: signature} of the rows selected."""
    with _connect(root) as db:
        rows = db.execute(f"SELECT weights, site, vec FROM signatures {where}", args).fetchall()
    out: dict[str, Signature] = {}
    for sha, site, vec in rows:
        if not (isinstance(sha, str) and isinstance(site, str) and isinstance(vec, bytes) and vec
                and len(vec) % 4 == 0):
            raise RegistryError(f"{root / FILE} holds a damaged row (weights {str(sha)[:16]}..., site "
                                f"{str(site)[:80]}); {DELETE}")
        out.setdefault(sha, {})[site] = torch.from_numpy(np.frombuffer(vec, dtype=np.float32).copy())
    return out


def table(signatures: Sequence[Signature]) -> Table:
    """Stack signatures into one prototype matrix per site, with the candidates that adapt it."""
    members: dict[str, list[int]] = {}
    for i, sig in enumerate(signatures):
        for site in sig:
            members.setdefault(site, []).append(i)
    widths = {site: {len(signatures[i][site]) for i in ids} for site, ids in members.items()}
    for site, found in widths.items():
        if len(found) > 1:  # one base model, one width per site: a stored row was damaged
            raise RegistryError(f"the stored signatures of {site} differ in width ({sorted(found)}); {FILE} is "
                                f"damaged: {DELETE}")
    return {site: (torch.tensor(ids), torch.stack([signatures[i][site] for i in ids])) for site, ids in members.items()}


def route_fractions(hidden: dict[str, torch.Tensor], prototypes: Table, n: int, top_k: int = 1) -> torch.Tensor:
    """score_e (n,) of the module docstring for hidden states {site: (tokens, in)}."""
    counts, pairs = torch.zeros(n, dtype=torch.float64), 0
    for site, h in hidden.items():
        if site not in prototypes or not h.shape[0]:
            continue
        ids, p = prototypes[site]
        chosen = (h.to(p.dtype) @ p.T).abs().topk(min(top_k, len(ids)), dim=1).indices
        counts.index_add_(0, ids[chosen.reshape(-1)], torch.ones(chosen.numel(), dtype=torch.float64))
        pairs += h.shape[0]
    return counts / max(pairs, 1)


@torch.no_grad()
def hidden_states(base: nn.Module, tokenizer: Any, examples: Sequence[str], sites: Sequence[str],
                  max_length: int = 128) -> dict[str, torch.Tensor]:
    """Inputs (real tokens only, (tokens, in)) of `sites` when `base` reads the examples.

    An encoder-decoder model also reads each example as its decoder input.
    """
    batch = tokenizer(list(examples), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(base.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if getattr(base.config, "is_encoder_decoder", False):
        inputs.update(decoder_input_ids=inputs["input_ids"], decoder_attention_mask=inputs["attention_mask"])
    keep = inputs["attention_mask"].bool().reshape(-1)
    found: dict[str, torch.Tensor] = {}
    names = dict(base.named_modules())
    handles = [names[s].register_forward_hook(
        lambda _m, args, _out, s=s: found.__setitem__(s, args[0].reshape(-1, args[0].shape[-1])[keep].float().cpu()))
        for s in sites if s in names]
    training = base.training
    try:
        base.eval()(**inputs)
    finally:
        base.train(training)
        for h in handles:
            h.remove()
    return found


def search(registry: "Registry", examples: Sequence[str], tokenizer: Any, base_model: nn.Module,
           top: int | None = None, top_k: int = 1, max_length: int = 128) -> Ranking:
    """Registered LoRAs trained on `base_model`, ranked for `examples` by Arrow routing (module docstring).

    base_model: the plain base model (no modules attached). top: keep the best `top` rows.
    top_k: the sources a token routes to. Non-LoRA modules are not candidates.
    """
    if tokenizer is None or not isinstance(base_model, nn.Module) or isinstance(examples, str) or not examples:
        raise ConfigError("search(examples=...) ranks LoRAs for a list of example texts and needs tokenizer= and "
                          "base_model= (the base model itself, without modules attached)")
    if isinstance(base_model, ModularModel):
        base_model = base_model.base
    cards = [c for c in registry.search(kind="lora", base_model=base_model, compatible_only=True)
             if c.kinds == ["lora"]]
    signatures, refs, excluded, known = [], [], [], stored_by_weights(registry.root)
    for card in cards:
        sig = known.get(card.files[WEIGHTS_FILE]["sha256"]) or stored(registry, card.ref)
        if sig:
            signatures.append(sig)
            refs.append(card.ref)
        else:
            excluded.append((card.ref, "holds more than one module; Arrow routes over single LoRAs"))
    prototypes = table(signatures)
    hidden = hidden_states(base_model, tokenizer, examples, list(prototypes), max_length)
    scores = route_fractions(hidden, prototypes, len(refs), top_k).tolist()
    rows = sorted(zip(refs, scores), key=lambda r: (-r[1], r[0]))[:top]
    return Ranking(METRIC, rows, excluded, {ref: ref for ref, _ in rows})


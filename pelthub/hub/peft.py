"""PEFT's adapter format, both ways, for LoRA, IA3, prompt tuning, prefix tuning and Poly.

`export(ref, dir, format="peft")` writes `adapter_config.json`,
`adapter_model.safetensors` and a README.md that `peft.PeftModel.from_pretrained`
loads; `from_peft(dir_or_repo, base)` attaches a PEFT adapter to a model as
pelthub modules and `import_peft(dir_or_repo)` registers it. Neither needs
the `peft` package: the format is plain JSON and safetensors.

PEFT keeps one adapter of one method per folder, so a module set holding one
kind (plus, optionally, its trained task head, which PEFT calls
`modules_to_save`) converts; composed modules and kinds PEFT lacks
(bottleneck adapters, Compacter, UniPELT, ...) stay in pelthub's format.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, ModuleFormatError, PeltError
from ..model import ModularModel
from ..model.io import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, read_description
from ..modules.base import site_key, site_name
from ..modules import jsonsafe
from ..modules.config import MAX_LAYERS, MAX_SIZE, MAX_VOCAB, one_of
from ..registry import Registry, require_registry
from ..registry.card import HUB_ID_RE
from .client import bounded, endpoint_of, resolve
from .wire import origin
from .fetch import download
from .peft_methods import FROM_PEFT, PEFT_TYPES, PREFIX, PROMPT_LEARNING, TO_PEFT, Tensors
from .sync import refuse_squatting, write_folder

FORMATS = ("peft", "pelthub")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
ENCODER_DECODER = {"t5", "mt5", "bart", "mbart"}
DECODER_ONLY = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}
HEAD_TASKS = {"classifier": "SEQ_CLS", "score": "SEQ_CLS", "qa_outputs": "QUESTION_ANS"}
TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


# ----- pelthub → PEFT -----
def export(source: str | os.PathLike | ModularModel, directory: str | os.PathLike, format: str = "peft",
           registry: Registry | None = None, task_type: str | None = None) -> Path:
    """Write a module to `directory` as "peft" (PEFT's adapter folder) or "pelthub" (module files + card README).

    source: a registry ref, a folder written by `save_pretrained`, or (for
    "peft") a ModularModel. task_type: PEFT's task type (SEQ_CLS, CAUSAL_LM,
    ...), by default read from the trained head or the model family.
    """
    one_of("export", "format", format, FORMATS)
    if format == "pelthub":
        if not isinstance(source, str):
            raise ConfigError("export(format='pelthub') takes a registry ref; write a model's files with "
                              "model.save_pretrained(dir)")
        reg = require_registry(registry, f"export({source!r})")
        return write_folder(reg, reg.get(source), Path(directory))
    with _pelthub_folder(source, registry) as (folder, title):
        return to_peft(folder, directory, task_type=task_type, title=title)


@contextmanager
def _pelthub_folder(source: Any, registry: Registry | None) -> Iterator[tuple[Path, str]]:
    if isinstance(source, ModularModel):
        with tempfile.TemporaryDirectory() as tmp:
            source.save_pretrained(tmp)
            yield Path(tmp), "a pelthub model"
    elif isinstance(source, (str, os.PathLike)) and (Path(source) / CONFIG_FILE).is_file():
        yield Path(source), Path(source).name
    elif isinstance(source, str):
        reg = require_registry(registry, f"export({source!r})")
        card = reg.get(source)
        yield reg.path(card.ref), card.ref
    else:
        raise ConfigError(f"export() takes a registry ref, a module folder or a ModularModel, got "
                          f"{type(source).__name__}")


def to_peft(folder: str | os.PathLike, directory: str | os.PathLike, task_type: str | None = None,
            title: str = "a pelthub module") -> Path:
    """Convert a pelthub module folder (pelthub.json + modules.safetensors) into a PEFT adapter folder."""
    description = read_description(folder)
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    sets = description["modules"]
    if len(sets) != 1 or len(next(iter(sets.values()))) != 1:
        raise ConfigError(f"PEFT keeps one adapter of one method per folder; {title} holds "
                          f"{ {s: [c['kind'] for c in cs] for s, cs in sets.items()} }: export it with "
                          "format='pelthub', or export a module of a single kind")
    set_name, (config,) = next(iter(sets.items()))
    kind, base = config["kind"], description["base_model"]
    fp = base["fingerprint"]
    if kind not in TO_PEFT:
        raise ConfigError(f"PEFT has no format for pelthub's {kind!r} modules (it has {sorted(TO_PEFT)}); "
                          "export with format='pelthub'")
    if kind == "prefix" and fp.get("model_type") in ENCODER_DECODER:
        raise ConfigError("an encoder-decoder prefix differs between the two: pelthub prefixes the decoder "
                          "self-attention only, PEFT the encoder and the decoder; export with format='pelthub'")
    fields, state = TO_PEFT[kind](config, _under(tensors, f"adapters.{set_name}.{kind}."), fp)
    heads = _under(tensors, f"heads.{set_name}.")
    head_names = sorted({site_name(k.split(".")[0]) for k in heads})
    prefix = "base_model." if kind in PROMPT_LEARNING else PREFIX  # where PeftModel keeps the wrapped model
    state.update({f"{prefix}{site_name(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": t for k, t in heads.items()})
    task_type = task_type or _task_type(head_names, fp.get("model_type"))
    one_of("export", "task_type", task_type, TASK_CLASSES)
    if kind == "prefix" and task_type in PEFT_PREFIX_NEEDS_PAST and peft_refuses_cache_prefix():
        warnings.warn(f"PEFT (0.21.x and older) refuses prefix tuning with task_type={task_type!r} on transformers "
                      f"{transformers.__version__}, whose models take the cache as `cache=`, not `past_key_values=` "
                      "(\"Model does not support past key values\"). The exported files are correct: they load and "
                      "run in PEFT on transformers 5.23 and older, and in pelthub on any release",
                      PeftCompatibilityWarning, stacklevel=2)
    adapter = {"peft_type": PEFT_TYPES[kind], "task_type": task_type, "base_model_name_or_path": base["name"] or None,
               "revision": base.get("revision"), "inference_mode": True, "modules_to_save": head_names or None,
               **fields}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True), encoding="utf-8")
    (out / "README.md").write_text(_readme(adapter, kind, title), encoding="utf-8")
    return out


# PEFT's task classes whose forward looks for `past_key_values` in the backbone's signature (peft_model.py).
PEFT_PREFIX_NEEDS_PAST = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


class PeftCompatibilityWarning(UserWarning):
    """An exported adapter that the installed PEFT will refuse to run, though its files are correct."""


def backbone_takes_past_key_values() -> bool:
    """Whether this transformers' backbones still name `past_key_values` in their forward (PEFT checks that)."""
    return "past_key_values" in inspect.signature(transformers.BertModel.forward).parameters


def peft_refuses_cache_prefix() -> bool:
    """Whether the installed PEFT refuses a SEQ_CLS-style prefix on this transformers: PEFT up to 0.21.x
    requires a backbone forward that names `past_key_values` (transformers 5.24 renamed it `cache`);
    0.22 accepts either. Without PEFT installed, the files go to whichever PEFT the user has: warn."""
    if backbone_takes_past_key_values():
        return False
    try:
        installed = Version(importlib.metadata.version("peft"))
    except importlib.metadata.PackageNotFoundError:
        return True
    return installed < Version("0.22.0")


def _under(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _task_type(heads: list[str], model_type: str | None) -> str:
    """PEFT's task type for a module: from its trained head, else from the family.

    Without a trained head an encoder gets FEATURE_EXTRACTION, not SEQ_CLS:
    PEFT's SEQ_CLS treats the classifier as trained and refuses to load an
    adapter that does not carry its weights.
    """
    if heads and heads[0] in HEAD_TASKS:
        return HEAD_TASKS[heads[0]]
    if model_type in ENCODER_DECODER:
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM" if model_type in DECODER_ONLY or heads == ["lm_head"] else "FEATURE_EXTRACTION"


def _readme(adapter: dict[str, Any], kind: str, title: str) -> str:
    base = adapter["base_model_name_or_path"]
    hub_base = base if base and HUB_ID_RE.match(base) else None
    tags = [*([f"base_model:adapter:{hub_base}"] if hub_base else []), kind, "transformers", "pelthub"]
    front = "\n".join(["---", "library_name: peft", *([f"base_model: {hub_base}"] if hub_base else []), "tags:",
                       *(f"- {t}" for t in tags), "---"])
    return (f"{front}\n\n# {kind} adapter (PEFT format)\n\nExported by pelthub from {title}; trained on "
            f"{base or 'an unnamed base model'}.\n\n```python\nfrom peft import PeftModel\n"
            "model = PeftModel.from_pretrained(base, path_or_repo_id)   # base: the model named above\n```\n")


# ----- PEFT → pelthub -----
@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter read from a folder or a Hub repo (verified against the Hub's sha256)."""

    config: dict[str, Any]
    state: Tensors
    source: dict[str, Any]
    name: str


def from_peft(source: str | os.PathLike, base: nn.Module, name: str = "default", revision: str | None = None,
              endpoint: str | None = None, token: str | None = None, tasks: Iterable[str] | None = None,
              timeout: float | None = None) -> ModularModel:
    """Attach a PEFT adapter (folder or Hub repo id) to `base` as pelthub modules named `name`.

    tasks: names for a Poly adapter's tasks (PEFT only numbers them: "0", "1", ...).
    """
    with read_peft(source, revision, endpoint, token, timeout) as adapter:
        return _attach(base, adapter, name, tasks)


def import_peft(source: str | os.PathLike, registry: Registry | None = None, name: str | None = None,
                base: nn.Module | str | None = None, task: str | None = None, tags: Iterable[str] | str | None = None,
                revision: str | None = None, endpoint: str | None = None, token: str | None = None,
                tasks: Iterable[str] | None = None, timeout: float | None = None) -> str:
    """Register a PEFT adapter (folder or Hub repo id) in the registry; returns its ref.

    The registry records the base model's architecture fingerprint: from
    `base` if given (a model, or a folder / Hub id whose config builds a
    weightless copy), else from a weightless copy of `base_model_name_or_path`
    built from its config (a local path, or a Hub id read from HF_ENDPOINT).
    """
    registry = require_registry(registry, "import_peft")
    with read_peft(source, revision, endpoint, token, timeout, workdir=registry.blobs.tmp) as adapter:
        if name is None and "repo_id" in adapter.source:  # the name comes from the repo: another's may hold it
            refuse_squatting(registry, _safe_name(adapter.name), adapter.source,
                             f"pass name= to register it under another name, e.g. import_peft({str(source)!r}, "
                             "name='<new name>') (`pelthub import --name`)")
        # the base's config is read from the default Hub: a token= paired with another endpoint stays there
        base_token = token if origin(endpoint_of(endpoint)) == origin(endpoint_of(None)) else None
        model = ModularModel(_base_for(adapter, base, base_token, timeout))
        try:
            _attach(model, adapter, "default", tasks)
            return registry.add(model, name=name or _safe_name(adapter.name), task=task, tags=tags,
                                source=adapter.source)
        finally:
            model.detach()


@contextmanager
def read_peft(source: str | os.PathLike, revision: str | None = None, endpoint: str | None = None,
              token: str | None = None, timeout: float | None = None,
              workdir: Path | None = None) -> Iterator[PeftAdapter]:
    """The adapter in a local folder, or in a Hub repo (downloaded to a temporary folder and verified).

    workdir: where that temporary folder goes (a registry's tmp/, so gc reclaims it after a crash).
    """
    path = Path(source)
    if path.is_dir():
        yield _read_folder(path, {"format": "peft", "path": str(path.resolve())}, path.resolve().name)
        return
    repo_id = str(source)
    if not HUB_ID_RE.match(repo_id):
        raise ConfigError(f"{repo_id!r} is neither a folder nor a Hub repo id ('user/name')")
    commit, siblings = resolve(repo_id, revision, endpoint, token, timeout)
    if ADAPTER_CONFIG not in siblings:
        hint = (f"it holds a pelthub module: Registry.pull({repo_id!r})" if CONFIG_FILE in siblings
                else f"it holds {', '.join(sorted(siblings)) or 'nothing'}")
        raise ModuleFormatError(f"{repo_id} is not a PEFT adapter (no {ADAPTER_CONFIG}); {hint}")
    files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS if ADAPTER_WEIGHTS in siblings else PICKLED]
    if files[1] not in siblings:
        raise ModuleFormatError(f"{repo_id} has no {ADAPTER_WEIGHTS}")
    _refuse_pickle(files[1], repo_id)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{os.getpid()}-") as tmp:
        snap = download(repo_id, commit, siblings, files, Path(tmp), endpoint, token, timeout,
                        max_bytes={ADAPTER_CONFIG: MAX_CONFIG_BYTES})
        yield _read_folder(snap.directory, {"format": "peft", "repo_id": repo_id, "commit": commit,
                                            "endpoint": snap.endpoint}, repo_id.rsplit("/", 1)[-1])


def _refuse_pickle(weights: str, where: str) -> None:
    if weights == PICKLED:
        raise ModuleFormatError(f"{where} stores its weights as {PICKLED} (pickle), which pelthub never reads; "
                                "save it with safetensors (PEFT's default: model.save_pretrained(dir))")


def _read_folder(folder: Path, source: dict[str, Any], name: str) -> PeftAdapter:
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModuleFormatError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        _refuse_pickle(PICKLED if (folder / PICKLED).is_file() else "", str(folder))
        raise ModuleFormatError(f"{folder} has no {ADAPTER_WEIGHTS}")
    config = jsonsafe.read(folder / ADAPTER_CONFIG, ModuleFormatError, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ModuleFormatError(f"{folder / ADAPTER_CONFIG} must hold a JSON object")
    _check_fields(config, folder / ADAPTER_CONFIG)
    return PeftAdapter(config, load_file(str(folder / ADAPTER_WEIGHTS)), source, name)


_NONE = type(None)
# The adapter_config.json fields pelthub reads, and the JSON types each may hold. Ranges are
# checked where the values become pelthub configs (LoRA, Poly, ...), which name the field too.
ADAPTER_FIELDS: dict[str, tuple[type, ...]] = {
    "peft_type": (str, _NONE), "task_type": (str, _NONE), "base_model_name_or_path": (str, _NONE),
    "revision": (str, _NONE), "modules_to_save": (list, _NONE), "bias": (str, _NONE),
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float, _NONE), "use_rslora": (bool, _NONE),
    "num_transformer_submodules": (int, _NONE), "n_tasks": (int,), "n_skills": (int,), "n_splits": (int,)}


def _check_fields(config: dict[str, Any], path: Path) -> None:
    """Refuse a field of the wrong JSON type (true is not a rank, "16" is not an alpha), naming it."""
    for key, types in ADAPTER_FIELDS.items():
        if key not in config:
            continue
        value = config[key]
        wrong = not isinstance(value, types) or isinstance(value, bool) and bool not in types
        if wrong or key == "modules_to_save" and value and not all(isinstance(m, str) for m in value):
            allowed = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise ModuleFormatError(f"{path}: field {key!r} must be {allowed}"
                                    f"{' (of strings)' if key == 'modules_to_save' else ''}, got {value!r:.80}")


def _attach(base: nn.Module, adapter: PeftAdapter, name: str, tasks: Iterable[str] | None) -> ModularModel:
    cfg = adapter.config
    peft_type = cfg.get("peft_type")
    if peft_type not in FROM_PEFT:
        raise ConfigError(f"PEFT {peft_type} adapters have no pelthub equivalent; pelthub reads "
                          f"{', '.join(sorted(FROM_PEFT))}")
    try:
        config, own, used = FROM_PEFT[peft_type](cfg, adapter.state, tasks)
    except PeltError as e:  # name the adapter: the config's fields and tensors come from its files
        raise type(e)(f"{adapter.source.get('path') or adapter.source.get('repo_id')}: {e}") from None
    prompt_learning = config.kind in PROMPT_LEARNING
    heads = _heads(cfg, {k: v for k, v in adapter.state.items() if k not in used}, prompt_learning)
    model = base if isinstance(base, ModularModel) else ModularModel(base)
    head = next(iter(heads), None)
    model.add(name, [config], init=False, head=head or False)
    try:
        _load(model.adapters[name][config.kind], own, peft_type)
        if head:
            trained = model.heads[name][site_key(head)]
            if any(p.is_meta for p in trained.parameters()):  # a copy of a weightless base's head
                trained.to_empty(device="cpu")
            _load(trained, heads[head], f"{peft_type} {head}")
    except BaseException:
        model.remove(name)
        raise
    return model


def _heads(cfg: dict[str, Any], rest: Tensors, prompt_learning: bool) -> dict[str, Tensors]:
    """The modules PEFT saved besides the adapter (`modules_to_save`): a task head, for pelthub."""
    prefix = "base_model." if prompt_learning else PREFIX
    names = sorted(cfg.get("modules_to_save") or [], key=len, reverse=True)
    heads: dict[str, Tensors] = {}
    for key, tensor in rest.items():
        inner = key[len(prefix):] if key.startswith(prefix) else ""
        head = next((m for m in names if inner.startswith(m + ".")), None)
        if head is None:
            raise ModuleFormatError(f"PEFT weight {key!r} belongs neither to the {cfg.get('peft_type')} layers nor "
                                    f"to modules_to_save {cfg.get('modules_to_save')}; pelthub cannot place it")
        heads.setdefault(head, {})[inner[len(head) + 1:]] = tensor
    if len(heads) > 1:
        raise ConfigError(f"this PEFT adapter also trains {sorted(heads)}; a pelthub module carries one task head")
    return heads


def _load(module: nn.Module, tensors: Tensors, what: str) -> None:
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise ModuleFormatError(f"the PEFT {what} weights do not fit this base model "
                                f"({str(e).splitlines()[-1].strip()[:200]}); pass the base it was trained on") from None


def _base_for(adapter: PeftAdapter, base: nn.Module | str | None, token: str | None,
              timeout: float | None = None) -> nn.Module:
    """`base` itself, or a weightless copy of `base` (a name) or of the adapter's base model, built from its config."""
    if isinstance(base, nn.Module):
        return base.base if isinstance(base, ModularModel) else base
    cfg = adapter.config
    name = base or cfg.get("base_model_name_or_path")
    if not name:
        raise ConfigError("this PEFT adapter does not name its base model; pass base= (the model it was trained on)")
    revision = None if base else cfg.get("revision")
    return weightless_base(name, TASK_CLASSES.get(cfg.get("task_type") or "", "AutoModel"), revision, token, timeout)


def weightless_base(name: str, cls: str = "AutoModel", revision: str | None = None, token: str | None = None,
                    timeout: float | None = None) -> nn.Module:
    """A meta-device model built from the config at `name` (a folder or Hub id): its architecture, no weights.

    Enough for the architecture fingerprint the registry records and searches by. With no
    class asked for (`AutoModel`), the checkpoint's own class (`config.architectures`) is
    built, so module names match those of the model as it was saved.
    """
    try:
        with bounded(timeout, None, token):
            config = transformers.AutoConfig.from_pretrained(name, revision=revision, token=token)
        check_sizes(config.to_dict(), f"the config of base model {name!r}")
        saved = (getattr(config, "architectures", None) or [""])[0]
        with torch.device("meta"):
            if cls == "AutoModel" and saved and hasattr(transformers, saved):
                return getattr(transformers, saved)(config)
            return getattr(transformers, cls).from_config(config)
    except PeltError:
        raise
    except (OSError, ValueError, TypeError, RecursionError) as e:
        problem = (str(e) or type(e).__name__).splitlines()[0][:160]
        raise ConfigError(f"cannot read the config of base model {name!r} ({problem}); pass "
                          "base= (--base on the command line): the model, folder or Hub id it was trained on") from None


# Size fields of transformers configs (across families) and their caps: a weightless copy is still built
# layer by layer, and a 3,000-layer config takes minutes to build and fingerprint, so it is refused first.
SIZE_FIELDS = {**dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                                "decoder_layers", "num_decoder_layers"), MAX_LAYERS),
               **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "intermediate_size", "d_ff", "n_inner",
                                "hidden_dim", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "num_attention_heads",
                                "n_head", "n_heads", "num_key_value_heads", "d_kv", "head_dim"), MAX_SIZE),
               "vocab_size": MAX_VOCAB}


def check_sizes(config: dict[str, Any], what: str) -> None:
    """Refuse a base config whose layers, widths or vocabulary exceed pelthub's caps, before building it.

    Nested configs (an encoder-decoder's parts, a multimodal model's text_config) are checked too.
    """
    stack = [config]
    while stack:
        fields = stack.pop()
        stack.extend(v for v in fields.values() if isinstance(v, dict))
        for key, maximum in SIZE_FIELDS.items():
            value = fields.get(key)
            if value is not None and (type(value) is not int or not 0 <= value <= maximum):
                raise ConfigError(f"{what}: {key} must be an integer from 0 to {maximum:,} (pelthub's cap, above "
                                  f"every released model, checked before building it), got {value!r:.80}")


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).replace("..", ".").strip("-._")
    return cleaned[:100] or "peft-adapter"

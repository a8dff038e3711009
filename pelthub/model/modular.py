"""The wrapped model: a frozen base plus named sets of modules.

`ModularModel` never edits the base. Module kinds reach it through hooks and
parametrisations (installed once, at attach), prompts through `inputs_embeds`
and prefixes through a pre-filled cache (built per call). `detach()` removes
every hook and parametrisation and restores the `requires_grad` flags, so the
base computes exactly what it computed before.
"""
from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DuplicateNameError, ModuleFormatError, RoutingError, UnsupportedModelError
from ..modules.base import CallContext, CallState, Handle, PeltModule, site_key, site_name
from ..modules.config import Buildable
from ..modules.grouped import as_ids
from ..sites import Sites
from .compat import cache_keyword, disable_checkpointing, enable_checkpointing, is_checkpointing
from .generation import generate
from .inputs import add_prefix, input_embeddings, prefix_cache, prepend_prompt
from .io import is_dtensor, save_modules
from .select import Selection, release as release_selection, selected_ids, set_adapter

# Bases that carry a ModularModel's hooks right now (weakly held: a dropped model frees its base).
_WRAPPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs", "lm_head")


class LoadResult(NamedTuple):
    """What `load_state_dict` could not match, as torch reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(frozen=True)
class TrainableParameters:
    """How many parameters train, out of all the wrapped model computes with."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


class ModularModel(nn.Module):
    """A base transformers model with pelthub modules attached.

    Call it like the base model; add `task_ids=` (ints or task names) for
    routed modules. `adapters[name][kind]` holds the module objects.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        _WRAPPED.add(base)
        self.base = base
        self.sites = Sites(base)
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.ctx = CallContext()
        self.selection = Selection()  # the `adapter_names` bank, built on first use under its lock
        self.task_names: list[str] = []
        self.parents: list[dict[str, Any]] = []  # registry modules this one was composed from (ref, sha256)
        self.composition: list[dict[str, Any]] = []  # the composition blocks as data, with the sets each became
        self.privacy: dict[str, Any] | None = None  # the (ε, δ) of the DP training that set the modules (`privacy`)
        self._handles: dict[str, list[Handle]] = {}
        self._grad_flags = {name: p.requires_grad for name, p in base.named_parameters()}
        base.requires_grad_(False)

    # ----- building -----
    def add(self, name: str, configs: Sequence[Buildable], head: bool | str = False,
            tokenizer: Any = None, init: bool = True) -> "ModularModel":
        """Attach one named set of modules (one per kind)."""
        if not name or "." in name or "/" in name:
            raise ConfigError(f"module name {name!r} must be non-empty without '.' or '/'")
        if name in self.adapters:
            raise DuplicateNameError(f"a module set named {name!r} is already attached; "
                                     "pick another name= or model.remove(name) first")
        if sharded_weights(self.base):  # new modules would be plain tensors each rank trains on its own
            raise ConfigError(f"cannot attach {name!r} to a sharded base (FSDP2 DTensors or DeepSpeed ZeRO-3 "
                              "partitions): attach or load every module set first, then fully_shard / "
                              "deepspeed.initialize")
        kinds = [c.kind for c in configs]
        if len(set(kinds)) != len(kinds) or not configs:
            raise ConfigError(f"one set holds one module per kind (at least one), got kinds {kinds}; "
                              "attach further modules of a kind under another name=")
        built = nn.ModuleDict({c.kind: c.build(self.base, self.sites, tokenizer=tokenizer, init=init)
                               for c in configs})
        prefixes = [m for m in [*self.modules_of("prefix"), *built.values()] if _provides(m, "prefix")]
        if len(prefixes) > 1:
            raise ConfigError("only one module may provide a prefix (past_key_values) at a time")
        tasks = [tuple(c.tasks) for c in configs if getattr(c, "tasks", None)]
        if tasks and self.task_names and list(tasks[0]) != self.task_names:
            raise RoutingError(f"modules routed over tasks {list(tasks[0])} cannot join modules routed over "
                               f"{self.task_names}; use the same task list")
        previous_tasks = self.task_names
        if tasks:
            self.task_names = list(tasks[0])
        # on the base's device; a weightless (meta) base keeps real module tensors on the CPU
        self.adapters[name] = built if self.device.type == "meta" else built.to(self.device)
        self._handles[name] = self._install(name)
        if head:
            try:
                self._add_head(name, head)
            except Exception:
                self.remove(name)
                self.task_names = previous_tasks
                raise
        elif init and not self.heads:  # loading saved modules (init=False) is not where a head is chosen
            warn_if_random_head(self.base)
        return self

    def _add_head(self, name: str, head: bool | str) -> None:
        """A trainable copy of the base's task head; a hook swaps its output in."""
        names = [head] if isinstance(head, str) else [n for n in HEAD_NAMES if n in dict(self.base.named_children())]
        if not names or names[0] not in self.sites.names:
            raise ConfigError(f"no task head {head!r} on {type(self.base).__name__}; "
                              f"pass head='<module name>', e.g. one of {list(dict(self.base.named_children()))}")
        key = site_key(names[0])
        if any(key in h for h in self.heads.values()):
            raise DuplicateNameError(f"head {names[0]!r} is already trained by another module set")
        trained = copy.deepcopy(self.base.get_submodule(names[0])).requires_grad_(True)
        self.heads[name] = nn.ModuleDict({key: trained})
        self._handles[name].append(self._head_hook(key, trained))

    def _head_hook(self, key: str, trained: nn.Module) -> Handle:
        """The base head's output replaced by its trained copy's."""
        def hook(_m: nn.Module, args: tuple, out: Any) -> Any:
            return out if self.ctx.bare else trained(*args)
        return self.base.get_submodule(site_name(key)).register_forward_hook(hook)

    def _install(self, name: str) -> list[Handle]:
        """Hooks of one module set (and its head); installing after removing is exact."""
        handles = [h for m in self.adapters[name].values() for h in m.install(self.base, self.ctx)]
        if name in self.heads:
            handles += [self._head_hook(key, trained) for key, trained in self.heads[name].items()]
        return handles

    def remove(self, name: str) -> None:
        """Detach one module set."""
        if name not in self.adapters:
            raise KeyError(f"no module set {name!r}; attached: {list(self.adapters)}")
        for handle in reversed(self._handles.pop(name)):
            handle.remove()
        del self.adapters[name]
        if name in self.heads:
            del self.heads[name]
        self.composition = [b for b in self.composition if name not in b["sets"]]

    def detach(self) -> nn.Module:
        """Remove every module and return the base exactly as it was."""
        release_selection(self)
        for name in list(self.adapters):
            self.remove(name)
        for pname, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(pname, p.requires_grad))
        _WRAPPED.discard(self.base)
        return self.base

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold every module into the base weights (LoRA, IA3, LN, DSEE, KAdaptation) and return the base.

        Every module is checked before anything is detached: a refusal leaves the model as it was.
        """
        modules = [m for s in self.adapters.values() for m in s.values()]
        for m in modules:
            if not _provides(m, "merge_into"):
                m.merge_into(self.base)  # raises the explanatory ConfigError
            m.check_merge(self.base)
        packed = quantized_layers(self.base)
        if modules and packed:
            raise UnsupportedModelError(
                f"merge_and_unload cannot fold modules into quantized weights ({', '.join(packed[:3])}"
                f"{', ...' if len(packed) > 3 else ''} hold packed integers, not a dense matrix to add to); load the "
                "base without quantization (no quantization_config), ph.from_pretrained the saved modules onto it, "
                "and merge there, or keep the modules attached")
        split = sharded_weights(self.base)
        if modules and split:
            raise UnsupportedModelError(
                f"merge_and_unload cannot fold modules into sharded weights ({', '.join(split[:3])}"
                f"{', ...' if len(split) > 3 else ''} hold one rank's part: FSDP2 DTensors or DeepSpeed ZeRO-3 "
                "partitions); save the modules (model.save_pretrained on every rank) and merge on an unsharded "
                "base with ph.from_pretrained, or, under ZeRO-3, merge on every rank inside "
                "deepspeed.zero.GatheredParameters(every parameter, modifier_rank=0) (LoRA and IA3; LN-tuning's "
                "norms stay partitioned there)")
        heads = {site_name(k): h for hs in self.heads.values() for k, h in hs.items()}
        self.detach()
        for m in modules:
            m.merge_into(self.base)
        for name, head in heads.items():
            self.base.get_submodule(name).load_state_dict(head.state_dict())
        return self.base

    # ----- what the ecosystem (Trainer, accelerate, generate callers) reads -----
    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The base's compute dtype (module weights stay fp32; see `prefix_cache` and the README)."""
        return getattr(self.base, "dtype", next(self.base.parameters()).dtype)

    @property
    def generation_config(self) -> Any:
        return getattr(self.base, "generation_config", None)

    @property
    def main_input_name(self) -> str:
        return getattr(self.base, "main_input_name", "input_ids")

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Trainer's question (does forward normalise the loss by `num_items_in_batch`?), answered as for the base."""
        if hasattr(self.base, "accepts_loss_kwargs"):
            return bool(self.base.accepts_loss_kwargs)
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(self.base.forward).parameters.values())

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def can_generate(self) -> bool:
        return bool(getattr(self.base, "can_generate", lambda: False)())

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters())

    def set_adapter(self, name: str | None) -> None:
        """Run the module set `name` alone in every later call (PEFT's name); None: every set again."""
        set_adapter(self, name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base for the calls made inside the block (PEFT's name).

        The switch is this thread's call state (`CallState.bare`), not the hooks: another thread's
        calls meanwhile keep every module, and the hooks stay installed.
        """
        with self.ctx.bound(CallState(bare=True)):
            yield

    # ----- running -----

    def modules_of(self, method: str) -> list[PeltModule]:
        return [m for s in self.adapters.values() for m in s.values() if _provides(m, method)]

    @torch.compiler.disable  # reads the ids on the host: checked before the compiled region
    def task_index(self, task_ids: Any, batch: int | None = None) -> torch.Tensor | None:
        """Task ids as an int64 tensor, one per example; names are looked up in `task_names`.

        Integers (or names) only: a float or bool id is refused, never truncated (`grouped.as_ids`).
        """
        if task_ids is None:
            return None
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids] * (batch or 1)
        ids = as_ids(task_ids, len(self.task_names) or None, "tasks in task_ids", self.task_names)
        if batch is not None and ids.shape[0] != batch:
            raise RoutingError(f"task_ids holds {ids.shape[0]} ids for a batch of {batch}; give one per example")
        device = self.device  # meta where accelerate offloads the first weight: the ids stay, each module moves them
        return ids if device.type == "meta" else ids.to(device)

    @contextmanager
    def bind(self, task_ids: Any = None, attention_mask: torch.Tensor | None = None,
             batch: int | None = None) -> Iterator[CallState]:
        """Bind a fresh call state (task ids, mask) for one forward or generate call; inside
        `disable_adapter` it is bare."""
        state = CallState(task_ids=self.task_index(task_ids, batch), attention_mask=attention_mask,
                          bare=self.ctx.bare)
        with self.ctx.bound(state):
            yield state

    def prepare_inputs(self, kwargs: dict[str, Any], state: CallState) -> dict[str, Any]:
        """Apply prompts and prefixes to one call's keyword arguments (the prefix cache goes into `state`)."""
        if state.bare:
            return kwargs
        prompters, prefixers = self.modules_of("prompt"), self.modules_of("prefix")
        g = self.sites.geometry
        if prompters:
            embeds = input_embeddings(kwargs, self.base.get_input_embeddings())
            for m in prompters:
                kwargs = prepend_prompt(kwargs, embeds, m.prompt(embeds, kwargs.get("attention_mask"), self.ctx), g)
                embeds = kwargs["inputs_embeds"]
        if prefixers:
            self._refuse_checkpointed_prefix()
            batch = _batch_size(kwargs)
            state.cache = prefix_cache(prefixers[0].prefix(batch, self.ctx), g, self.dtype)
            kwargs = add_prefix(kwargs, state.cache, cache_keyword(self.base), g, batch, self.base.device)
        return kwargs

    @torch.compiler.disable(recursive=False)
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                task_ids: Any = None, adapter_names: Any = None, pixel_values: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the modules applied; `task_ids` (names or indices) route per example,
        `adapter_names` (PEFT's name) runs each example with one module set alone (`pelthub.model.select`).

        The named arguments are the ones `transformers.Trainer` looks for in the signature
        (it drops dataset columns the forward does not name), images and audio features
        included; anything else passes through.
        """
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "position_ids": position_ids, "inputs_embeds": inputs_embeds, "labels": labels,
                 "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
                 "pixel_values": pixel_values, "input_features": input_features}
        kwargs.update({k: v for k, v in named.items() if v is not None})
        batch = _batch_size(kwargs)
        with self.bind(task_ids, kwargs.get("attention_mask"), batch) as state:
            state.selected = selected_ids(self, adapter_names, batch)
            out = self.ctx.run(state, lambda: self.base(**self.prepare_inputs(kwargs, state)))
            for m in [] if state.bare else self.modules_of("check_call"):
                m.check_call(state)
            return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 task_ids: Any = None, adapter_names: Any = None, **kwargs: Any) -> torch.Tensor:
        """`base.generate` with prompts and prefixes injected once, at the first step.

        Returns the input ids followed by the new tokens for decoder-only models,
        like transformers does.
        """
        with self.bind(task_ids, attention_mask, input_ids.shape[0]) as state:
            state.selected = selected_ids(self, adapter_names, input_ids.shape[0])
            if state.bare:  # with generate's default mask: every token counts
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                return self.base.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            return generate(self, state, input_ids, attention_mask, **kwargs)

    # ----- gradient (activation) checkpointing -----
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Checkpoint the base's layers; the recomputed forward sees the same call state (task ids, masks).

        Non-reentrant checkpointing (transformers' default) is used with a `context_fn`
        that re-binds the state captured at forward time. Reentrant checkpointing has no
        such hook, so it is refused for modules that read the call state inside a layer.
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            readers = sorted({type(m).__name__ for m in self.modules_of("reads_call_state")})
            if readers:
                raise ConfigError(f"{', '.join(readers)} read per-call state (task ids, masks) inside the layers, "
                                  "which reentrant checkpointing cannot restore on recompute; use "
                                  "use_reentrant=False (the default)")
        else:
            kwargs["context_fn"] = self._checkpoint_contexts
        enable_checkpointing(self.base, kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The pre-5.24 name of `activation_checkpointing_enable` (Trainer calls either)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable_checkpointing(self.base)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return is_checkpointing(self.base)

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint `context_fn`: (forward context, recompute context)."""
        state = self.ctx.current()
        return nullcontext(), (nullcontext() if state is None else self.ctx.bound(state))

    def _refuse_checkpointed_prefix(self) -> None:
        """transformers drops the cache inside checkpointed layers, so a prefix would silently vanish."""
        if self.training and torch.is_grad_enabled() and is_checkpointing(self.base):
            raise ConfigError("prefix modules cannot train under gradient checkpointing: transformers drops the "
                              "cache (which carries the prefix) inside checkpointed layers. Disable it with "
                              "model.gradient_checkpointing_disable(), or use LoRA / prompts, which checkpoint fine")

    def trainable_parameters(self) -> TrainableParameters:
        own = {id(p): p for p in self.parameters()}
        trainable = sum(p.numel() for p in own.values() if p.requires_grad)
        return TrainableParameters(trainable, sum(p.numel() for p in own.values()))

    def module_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every module and head: the tensors that are saved."""
        yield from self.adapters.named_parameters(prefix="adapters")
        yield from self.heads.named_parameters(prefix="heads")

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Module and head tensors only: the base is never saved (Trainer checkpoints hold just these)."""
        out = {} if destination is None else destination
        self.adapters.state_dict(destination=out, prefix=f"{prefix}adapters.", keep_vars=keep_vars)
        self.heads.state_dict(destination=out, prefix=f"{prefix}heads.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load what `state_dict()` wrote (module and head tensors); base keys are refused as unexpected."""
        parts = {"adapters.": self.adapters, "heads.": self.heads}
        missing, unexpected = [], [k for k in state_dict if not k.startswith(tuple(parts))]
        for head, part in parts.items():
            sub = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
            result = part.load_state_dict(sub, strict=False, assign=assign)
            missing += [head + k for k in result.missing_keys]
            unexpected += [head + k for k in result.unexpected_keys]
        if strict and (missing or unexpected):
            raise ModuleFormatError(f"checkpoint does not match this model's modules: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}; build the model with the same modules first")
        return LoadResult(missing, unexpected)

    def save_pretrained(self, directory: str, **meta: Any) -> None:
        """Write pelthub.json + modules.safetensors; `parents` and `privacy` default to the model's own."""
        if self.parents:
            meta.setdefault("parents", self.parents)
        if self.privacy:
            meta.setdefault("privacy", self.privacy)
        save_modules(self, directory, **meta)


def quantized_layers(base: nn.Module) -> list[str]:
    """Names of layers whose weight is stored quantized, so a weight update cannot be added to it: integers,
    bitsandbytes' packed 4-bit in a float storage dtype (Params4bit, Int8Params), or a torchao tensor subclass
    (Int8Tensor and kin report a float dtype; `tests/test_quantized.py` fails if these names change)."""
    return [name for name, m in base.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and (not m.weight.is_floating_point() or type(m.weight).__name__ in ("Params4bit", "Int8Params")
                 or type(m.weight).__module__.startswith("torchao."))]


def sharded_weights(base: nn.Module) -> list[str]:
    """Names of weights that hold one rank's part only: FSDP2's DTensors, DeepSpeed ZeRO-3's parameters while
    partitioned (they carry their whole size as `ds_numel`; inside `GatheredParameters` they hold it)."""
    return [name for name, p in base.named_parameters()
            if is_dtensor(p) or p.numel() != getattr(p, "ds_numel", p.numel())]


class StackedHooksWarning(UserWarning):
    """A base wrapped while another ModularModel still hooks it: both models' modules run."""


def warn_if_wrapped(base: nn.Module) -> None:
    """attach/compose on a base another ModularModel still hooks: both models' modules would run."""
    if base in _WRAPPED:
        warnings.warn(f"this {type(base).__name__} already carries pelthub modules from another ModularModel, "
                      "whose hooks would run too. Add to that model instead (ph.attach(model, ...) or "
                      "ph.compose(model, ...)), call .detach() on it first, or load a fresh base",
                      StackedHooksWarning, stacklevel=3)


class FrozenHeadWarning(UserWarning):
    """A classification head that was never trained stays frozen: the model would train modules behind a random head."""


def warn_if_random_head(base: nn.Module) -> None:
    """Warn when the base's task head was not loaded from a checkpoint and `head=True` was not passed.

    transformers records the class a checkpoint was saved from in `config.architectures`: a
    head class missing there (or a model built from a config) has a freshly initialised head.
    """
    heads = [n for n in HEAD_NAMES[:-1] if n in dict(base.named_children())]  # lm_head: tied or pretrained
    loaded_as = getattr(base.config, "architectures", None) or []
    if heads and type(base).__name__ not in loaded_as and next(base.parameters()).device.type != "meta":
        source = f"the checkpoint holds {loaded_as}" if loaded_as else "the model was built from a config"
        warnings.warn(f"{type(base).__name__}.{heads[0]} was not loaded from a checkpoint ({source}): it holds "
                      f"random weights and stays frozen. Pass head=True to train a copy of it with the modules",
                      FrozenHeadWarning, stacklevel=4)


def _provides(module: nn.Module, method: str) -> bool:
    """Whether a module offers one of PeltModule's optional capabilities (`PeltModule.provides`)."""
    return module.provides(method) if isinstance(module, PeltModule) else False


# What a model reads first: token ids or embeddings, images (ViT, CLIP), audio features (Whisper), waveforms.
MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def _batch_size(kwargs: dict[str, Any]) -> int:
    for key in MAIN_INPUTS:
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ConfigError(f"pass one of {', '.join(MAIN_INPUTS)} (the model's input) to the call")

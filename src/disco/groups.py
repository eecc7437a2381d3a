"""Parameter routing: which parameter gets which norm, backend and algorithm.

``create_disco_param_groups(model, optimizer_kwargs)`` splits a model's trainable parameters into optimizer
parameter groups. Every group is a dict with ``params`` (tensors), ``param_names`` (their names, same order)
and the per-group overrides of the optimizer's defaults (``algorithm``, ``norm_factor``, ``backend``, ``lr``).

Order of decisions for each trainable parameter (frozen ones are skipped, tied ones appear once):

1. ``extra_param_group_split_rules``: a list of dicts, each with a regex ``str_match`` (``re.search`` against
   every name of the parameter; tied weights have several) plus overrides. The first matching rule wins and
   the parameter joins that rule's group. A rule that matches nothing warns.
2. Otherwise the parameter is routed automatically:

   - 0-D / 1-D (biases, norm gains): ``norm_factor="bias_rms", backend="identity"``, or ``algorithm=<vector
     algorithm>`` when ``optimizer_kwargs["vector_algorithm"]`` is ``"adamw"`` or ``"lion"``;
   - embeddings (weights of ``nn.Embedding`` / ``nn.EmbeddingBag``, or whose name has the dotted component
     path ``name_of_embedding``): ``embed_sqrt`` + ``identity``;
   - the output head (a 2-D weight whose module or own name is ``output`` / ``lm_head``, or as set by
     ``name_of_output``: names, or dotted module paths such as ``cls.predictions.decoder``; when no parameter is
     named so, the last ``nn.Linear`` whose ``out_features`` equals an embedding's vocabulary size, which warns
     since it is a guess): ``unembed_sqrt`` + ``identity``;
   - convolution weights (``nn.Conv1d/2d/3d`` and the transposed ones): ``conv_spectral``;
   - other weights of 4 or more dims (not owned by a conv module): ``conv_spectral``, with a warning;
   - 3-D weights: a batch of expert matrices, the default group (the optimizer's default norm);
   - other 2-D weights: the default group (no overrides).

**Orientation.** Norm factors, the semi-orthogonal init and the tracked norms read a matrix as
``fan_out x fan_in`` (``nn.Linear``'s layout). Layer types that store the transpose, ``fan_in x fan_out``, are
recognised by the name of their class (or of a base class), without importing their library:
:data:`TRANSPOSED_MODULE_TYPES` (Hugging Face's GPT-2 ``Conv1D``; add your own names to the set). Their
2-D ``weight`` is routed like any other matrix, into a group of its own with ``transposed=True``: the LMO, its
norm factor (``spectral`` is ``sqrt(fan_out / fan_in)`` = ``sqrt(shape[1] / shape[0])`` here), the init
(``disco.init``'s ``transposed=``) and the tracked norms then work on the ``fan_out x fan_in`` view. A rule may
set ``"transposed": True`` / ``False`` itself.

**Tied weights.** A tensor with several names (``named_modules(remove_duplicate=False)``) is routed once, under
its first name, and every name is matched by the rules. Routed automatically, a weight that is both an
embedding and the output head (GPT-2's ``wte`` / ``lm_head``) goes **to the head's route** (``unembed_sqrt``):
of the two LMOs the head's is the one that bounds how far one step moves the logits (``embed_sqrt``'s update
has an ``rms -> inf`` norm ``dim`` times larger), so the shared matrix cannot destabilise the output. Any other
tied weight takes the route of its first name. Either way the parameter gets a group of its own with
``tied_with`` (its other names), which :func:`routing_table` shows, and a warning names the names and the
route taken; a rule matching one of the names makes the choice explicit and silences the warning.

Empty groups are dropped. Groups appear in the order of their first parameter in the model.

``routing_table(groups)`` renders the result; ``python -m disco groups MODULE:FACTORY`` prints it for a model.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import re
import sys
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .ops import BACKENDS, get_norm

#: keys of ``optimizer_kwargs`` that only steer routing; ``create_disco_param_groups`` removes them.
ROUTING_KEYS = ("extra_param_group_split_rules", "vector_algorithm", "name_of_output")

#: values of a group's ``algorithm`` (those ``disco.optim``'s optimizers accept).
ALGORITHMS = ("disco", "muon", "scion", "normuon", "dion", "dion2", "adamw", "lion", "sign")

#: element-wise algorithms that ``vector_algorithm`` may name.
VECTOR_ALGORITHMS = ("adamw", "lion")

DEFAULT_OUTPUT_NAMES = ("output", "lm_head")

#: Class names of layers whose 2-D ``weight`` is stored ``fan_in x fan_out`` (the transpose of ``nn.Linear``).
#: Matched against the names of the module's class and its bases, so no import of their library is needed.
#: ``Conv1D``: Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ImageGPT, DecisionTransformer...).
TRANSPOSED_MODULE_TYPES: set[str] = {"Conv1D"}

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)

# Automatic categories, each with its overrides (vectors are filled in per call).
_AUTO = {
    "default": {},
    "conv": {"norm_factor": "conv_spectral"},
    "embedding": {"norm_factor": "embed_sqrt", "backend": "identity"},
    "output": {"norm_factor": "unembed_sqrt", "backend": "identity"},
    "vector": {"norm_factor": "bias_rms", "backend": "identity"},
}


def _validate_overrides(overrides: dict[str, Any], where: str) -> None:
    if "norm_factor" in overrides and overrides["norm_factor"] is not None:
        try:
            get_norm(overrides["norm_factor"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if "backend" in overrides and overrides["backend"] is not None and overrides["backend"] not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {overrides['backend']!r}; valid: {sorted(BACKENDS)}")
    if "algorithm" in overrides and overrides["algorithm"] is not None and overrides["algorithm"] not in ALGORITHMS:
        raise ValueError(f"{where}: unknown algorithm {overrides['algorithm']!r}; valid: {list(ALGORITHMS)}")
    if "transposed" in overrides and not isinstance(overrides["transposed"], bool):
        raise ValueError(f"{where}: 'transposed' must be True or False, got {overrides['transposed']!r}")


def _compile_rules(rules: Any) -> list[tuple[re.Pattern[str], dict[str, Any], str]]:
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = json.loads(rules)
    if isinstance(rules, dict):
        rules = [rules]
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or "str_match" not in rule:
            raise ValueError(f"extra_param_group_split_rules[{i}] must be a dict with a 'str_match' regex: {rule!r}")
        where = f"extra_param_group_split_rules[{i}] (str_match={rule['str_match']!r})"
        try:
            pattern = re.compile(rule["str_match"])
        except re.error as e:
            raise ValueError(f"{where}: invalid regex: {e}") from None
        overrides = {k: v for k, v in rule.items() if k != "str_match"}
        if "params" in overrides or "param_names" in overrides or "tied_with" in overrides:
            raise ValueError(f"{where}: a rule may not set 'params', 'param_names' or 'tied_with'")
        _validate_overrides(overrides, where)
        out.append((pattern, overrides, where))
    return out


def _component_re(names: Iterable[str]) -> re.Pattern[str] | None:
    names = [n for n in names if n]
    if not names:
        return None
    alt = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(^|\.)({alt})(\.|$)")


def _as_names(value: Any, default: Sequence[str]) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return list(value)


def is_transposed_module(module: nn.Module) -> bool:
    """Whether ``module`` stores its 2-D ``weight`` as ``fan_in x fan_out`` (:data:`TRANSPOSED_MODULE_TYPES`).

    Hugging Face's ``Conv1D`` also records ``nx`` (in) and ``nf`` (out); when a module has both, its weight must
    be ``nx x nf``, so a same-named layer of another library with another layout is not mistaken for it.
    """
    if not any(c.__name__ in TRANSPOSED_MODULE_TYPES for c in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int):
        return tuple(weight.shape) == (nx, nf)
    return True


def create_disco_param_groups(
    model: nn.Module, optimizer_kwargs: dict[str, Any], *, only: Collection[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Route ``model``'s trainable parameters into parameter groups; see the module docstring.

    Returns ``(param_groups, cleaned_kwargs)`` where ``cleaned_kwargs`` is a copy of ``optimizer_kwargs``
    without the routing-only keys (:data:`ROUTING_KEYS`), ready for ``Disco(param_groups, **cleaned_kwargs)``.
    ``optimizer_kwargs`` itself is not modified.

    ``only``: route just the parameters with one of these names (``model.named_parameters()``'s, or any name
    of a tied weight), e.g. those a TorchTitan ``ParamGroupConfig`` pattern claimed; the whole model is still
    read to recognise embeddings, heads, layer types and ties.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_disco_param_groups needs an nn.Module, got {type(model).__name__}")
    kwargs = dict(optimizer_kwargs)
    rules = _compile_rules(kwargs.pop("extra_param_group_split_rules", None))
    vector_algorithm = kwargs.pop("vector_algorithm", None)
    output_names = _as_names(kwargs.pop("name_of_output", None), DEFAULT_OUTPUT_NAMES)
    if vector_algorithm is not None and vector_algorithm not in VECTOR_ALGORITHMS:
        raise ValueError(f"unknown vector_algorithm {vector_algorithm!r}; valid: {list(VECTOR_ALGORITHMS)}")
    _validate_overrides(kwargs, "optimizer_kwargs")
    embed_re = _component_re(_as_names(kwargs.get("name_of_embedding"), ()))

    # Every name of every parameter (tied weights have several), and the modules that own it.
    names: dict[int, list[str]] = {}
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    transposed_ids: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            names.setdefault(id(p), [])
            if full not in names[id(p)]:
                names[id(p)].append(full)
            owners.setdefault(id(p), []).append((mod_name, module))
            if attr == "weight" and is_transposed_module(module):
                transposed_ids.add(id(p))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # deduplicated, first name
    if only is not None:
        wanted = set(only)
        params = [(n, p) for n, p in params if any(a in wanted for a in names.get(id(p), [n]))]

    vocab_sizes = set()
    for _, module in model.named_modules():
        if isinstance(module, _EMBED_TYPES):
            vocab_sizes.add(module.num_embeddings)
    if embed_re is not None:
        for _, p in model.named_parameters():
            if p.dim() == 2 and any(embed_re.search(a) for a in names[id(p)]):
                vocab_sizes.add(p.shape[0])

    dotted_outputs = [n for n in output_names if "." in n]

    def is_output_by_name(p: torch.Tensor) -> bool:
        for alias in names[id(p)]:
            parts = alias.split(".")
            if parts[-1] in output_names or (len(parts) > 1 and parts[-2] in output_names):
                return True
            if any(alias == n or alias.rpartition(".")[0] == n for n in dotted_outputs):
                return True  # a dotted module path (e.g. Hugging Face's get_output_embeddings()'s)
        return False

    # Without a head named as such, guess: the last nn.Linear whose out_features is a vocabulary size.
    guessed_head: int | None = None
    if not any(p.dim() == 2 and is_output_by_name(p) for p in model.parameters()):
        for _, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.out_features in vocab_sizes:
                guessed_head = id(module.weight)

    # group key -> (overrides, params, names); rule groups keyed by index, auto ones by category
    groups: dict[Any, tuple[dict[str, Any], list[torch.Tensor], list[str]]] = {}
    rule_hits = [0] * len(rules)
    guessed: list[str] = []
    guessed_conv: list[str] = []
    tied_auto: list[str] = []

    def add(key: Any, overrides: dict[str, Any], name: str, p: torch.Tensor, aliases: list[str]) -> None:
        overrides = dict(overrides)
        if p.dim() >= 2 and id(p) in transposed_ids and "transposed" not in overrides:
            overrides["transposed"] = True
        if overrides.get("transposed") and p.dim() not in (2, 3):
            raise ValueError(
                f"parameter {name!r} with shape {tuple(p.shape)}: 'transposed' needs a matrix (2-D, or a 3-D stack)"
            )
        key = (key, bool(overrides.get("transposed")))
        if len(aliases) > 1:  # a tied weight: a group of its own, marked with its other names
            overrides["tied_with"] = [a for a in aliases if a != name]
            key = (key, "tied", name)
        g = groups.setdefault(key, (overrides, [], []))
        g[1].append(p)
        g[2].append(name)

    vector_overrides = {"algorithm": vector_algorithm} if vector_algorithm else dict(_AUTO["vector"])
    for name, p in params:
        aliases = names.get(id(p), [name])
        rule = next((i for i, (pat, _, _) in enumerate(rules) if any(pat.search(a) for a in aliases)), None)
        if rule is not None:
            rule_hits[rule] += 1
            add(("rule", rule), rules[rule][1], name, p, aliases)
            continue
        mods = [m for _, m in owners.get(id(p), [])]
        is_embedding = any(isinstance(m, _EMBED_TYPES) for m in mods) or (
            embed_re is not None and any(embed_re.search(a) for a in aliases)
        )
        is_head = p.dim() == 2 and (is_output_by_name(p) or id(p) == guessed_head)
        if p.dim() < 2:
            category = "vector"
        elif is_head and (not is_embedding or len(aliases) > 1):  # tied to an embedding: the head's route
            category = "output"
            if id(p) == guessed_head and not is_output_by_name(p):
                guessed.append(name)
        elif is_embedding:
            category = "embedding"
        elif any(isinstance(m, _CONV_TYPES) for m in mods):
            category = "conv"
        elif p.dim() >= 4:
            guessed_conv.append(name)
            category = "conv"
        else:  # 2-D matrices and 3-D expert stacks
            category = "default"
        if len(aliases) > 1:
            role = "the output head (tied to an embedding)" if is_head and is_embedding else f"a {category} weight"
            tied_auto.append(f"{' = '.join(aliases)} -> {role}")
        add(category, vector_overrides if category == "vector" else _AUTO[category], name, p, aliases)

    for hits, (_, _, where) in zip(rule_hits, rules):
        if hits == 0:
            warnings.warn(f"{where} matches no trainable parameter", UserWarning, stacklevel=2)
    if guessed:
        warnings.warn(
            "routed as output head by shape (out_features == an embedding's vocabulary size), not by name: "
            f"{guessed}; set 'name_of_output' or add an extra_param_group_split_rules entry to be explicit",
            UserWarning,
            stacklevel=2,
        )
    if guessed_conv:
        warnings.warn(
            f"routed as convolution weights (conv_spectral) by their >= 4 dims only: {guessed_conv}",
            UserWarning,
            stacklevel=2,
        )
    if tied_auto:
        warnings.warn(
            f"tied weights, each routed once: {'; '.join(tied_auto)} (a weight shared by an embedding and the "
            "output head takes the head's route); add an extra_param_group_split_rules entry matching one of "
            "the names to choose another",
            UserWarning,
            stacklevel=2,
        )

    param_groups = [
        {"params": ps, "param_names": ns, **overrides} for overrides, ps, ns in groups.values() if ps
    ]  # dict order = order of each group's first parameter
    return param_groups, kwargs


def split_vector_params(
    param_group: dict[str, Any], vector_overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Split a plain parameter group (e.g. one of Hugging Face ``Trainer``'s weight-decay groups, which mix
    matrices with biases and norm gains) into its matrices and its 0-D / 1-D tensors.

    The vectors get ``vector_overrides`` (default ``{"norm_factor": "bias_rms", "backend": "identity"}``, as
    :func:`create_disco_param_groups` routes them); every other key of the group is kept on both parts. A group
    that already chose a norm or an algorithm for its members (``norm_factor`` or ``algorithm`` set), or that
    holds no vector, is returned unchanged (as the one element of the list). ``param_names``, when present,
    are split alongside. A group of vectors only comes back as one group with ``vector_overrides`` added.
    """
    if "norm_factor" in param_group or "algorithm" in param_group:
        return [param_group]
    params = param_group["params"]
    if not isinstance(params, (torch.Tensor, list, tuple)):  # a generator (model.parameters()): read it once
        param_group = {**param_group, "params": list(params)}
        params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    named = bool(params) and all(isinstance(p, tuple) for p in params)
    names = param_group.get("param_names")
    tensors = [p[1] if named else p for p in params]
    vec = [i for i, t in enumerate(tensors) if t.dim() < 2]
    if not vec:
        return [param_group]
    vec_set = set(vec)
    mat = [i for i in range(len(params)) if i not in vec_set]
    rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
    vector = dict(_AUTO["vector"]) if vector_overrides is None else dict(vector_overrides)
    out = []
    for idx, extra in ((mat, {}), (vec, vector)):
        if idx:
            g = {**rest, **extra, "params": [params[i] for i in idx]}
            if names is not None:
                g["param_names"] = [list(names)[i] for i in idx]
            out.append(g)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _note(group: dict[str, Any]) -> str:
    notes = []
    if group.get("transposed"):
        notes.append("stored in x out (transposed)")
    if group.get("tied_with"):
        notes.append("tied: " + ", ".join(group["tied_with"]))
    return "; ".join(notes)


def routing_table(param_groups: Sequence[dict[str, Any]], defaults: dict[str, Any] | None = None) -> str:
    """A fixed-width table, one row per parameter: group, name, shape, algorithm, norm_factor, backend, lr, note.

    A value the group does not set comes from ``defaults`` (e.g. the optimizer kwargs), else shows ``-``. The
    note says when a weight is stored ``fan_in x fan_out`` (``transposed``) and which names a tied weight has.
    """
    defaults = defaults or {}
    header = ("group", "name", "shape", "algorithm", "norm_factor", "backend", "lr", "note")
    rows = []
    for gi, group in enumerate(param_groups):
        params = list(group["params"])
        pnames = list(group.get("param_names", [f"<param {i}>" for i in range(len(params))]))
        cols = [_fmt(group.get(k, defaults.get(k))) for k in ("algorithm", "norm_factor", "backend", "lr")]
        for name, p in zip(pnames, params):
            rows.append((str(gi), name, "x".join(str(s) for s in p.shape) or "scalar", *cols, _note(group)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = sum(len(g["params"]) for g in param_groups)
    numel = sum(math.prod(p.shape) for g in param_groups for p in g["params"])
    lines.append(f"{n} parameters ({numel:,} elements) in {len(param_groups)} groups")
    return "\n".join(lines)


def _optimizer_defaults() -> dict[str, Any]:
    """``Disco``'s defaults (``disco.optim.defaults``), for the table's unset cells."""
    from .optim.defaults import DISCO_DEFAULTS

    return {"algorithm": "disco", **DISCO_DEFAULTS.as_dict()}


def _load_factory(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FACTORY (or path/to/file.py:FACTORY), got {spec!r}")
    mod_spec, attr = spec.rsplit(":", 1)
    if mod_spec.endswith(".py") or "/" in mod_spec:
        path = Path(mod_spec)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {mod_spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # like `python -m`, let the current directory's modules be found
        module = importlib.import_module(mod_spec)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m disco groups MODULE:FACTORY [--kwargs JSON]``: print the routing table of a model."""
    parser = argparse.ArgumentParser(
        prog="python -m disco groups",
        description="Print how create_disco_param_groups routes a model's parameters.",
    )
    parser.add_argument("factory", help="MODULE:FACTORY (or path/to/file.py:FACTORY); called with no arguments")
    parser.add_argument("--kwargs", default=None, help="optimizer_kwargs as JSON (routing rules included)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        model = _load_factory(args.factory)()
    except (ImportError, AttributeError, ValueError) as e:
        print(f"error: cannot load {args.factory!r}: {e}", file=sys.stderr)
        return 2
    if not isinstance(model, nn.Module):
        print(f"error: {args.factory} returned {type(model).__name__}, not an nn.Module", file=sys.stderr)
        return 2
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups, cleaned = create_disco_param_groups(model, kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(routing_table(groups, {**_optimizer_defaults(), **cleaned}))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

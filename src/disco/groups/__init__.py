"""Parameter routing: which parameter gets which norm, backend and algorithm.

``create_disco_param_groups(model, optimizer_kwargs)`` splits a model's trainable parameters into optimizer
parameter groups. Every group is a dict with ``params`` (tensors), ``param_names`` (their names, same order)
and the per-group overrides of the optimizer's defaults (``algorithm``, ``norm_factor``, ``backend``, ``lr``).

Routing is three steps, each a module of this package:

1. **classify** (:mod:`.roles`): every trainable parameter gets a :class:`Role` (vector, embedding, output head,
   conv, hidden matrix, expert stack), read from the whole model, plus whether it is tied or transposed;
   :func:`classify_parameters`.
2. **route** (:mod:`.rules`, :mod:`.routing`): ``extra_param_group_split_rules`` are validated into
   :class:`SplitRule` s; each parameter joins the group of the first rule that matches it, else its role's
   automatic route; :func:`route_parameters`.
3. **explain** (:mod:`.explain`): :func:`routing_table` renders the groups.

Order of decisions for each trainable parameter (frozen ones are skipped, tied ones appear once):

1. ``extra_param_group_split_rules``: a list of dicts (or :class:`SplitRule` s), each with a regex
   ``str_match`` (``re.search`` against every name of the parameter; tied weights have several) plus
   overrides, each a group setting (:data:`GROUP_SETTINGS`; an unknown or ill-typed one is refused, naming the
   rule). The first matching rule wins and the parameter joins that rule's group. A rule that matches nothing
   warns.
2. Otherwise the parameter is routed automatically, by its role:

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

from .explain import _optimizer_defaults, main, routing_table
from .roles import (
    DEFAULT_OUTPUT_NAMES,
    TRANSPOSED_MODULE_TYPES,
    ClassifiedParam,
    Role,
    classify_parameters,
    is_transposed_module,
)
from .routing import AUTO_ROUTES, RoutingNotes, create_disco_param_groups, route_parameters, split_vector_params
from .rules import (
    ROUTING_KEYS,
    SplitRule,
    compile_split_rules,
    group_settings,
    known_algorithms,
    number_settings,
    vector_algorithms,
)


def __getattr__(name: str) -> object:
    # ALGORITHMS, VECTOR_ALGORITHMS, GROUP_SETTINGS: read from the rule registry when asked
    from . import rules

    return getattr(rules, name)


__all__ = [
    "ALGORITHMS",
    "AUTO_ROUTES",
    "DEFAULT_OUTPUT_NAMES",
    "GROUP_SETTINGS",
    "ROUTING_KEYS",
    "TRANSPOSED_MODULE_TYPES",
    "VECTOR_ALGORITHMS",
    "ClassifiedParam",
    "Role",
    "RoutingNotes",
    "SplitRule",
    "_optimizer_defaults",
    "classify_parameters",
    "compile_split_rules",
    "group_settings",
    "known_algorithms",
    "number_settings",
    "vector_algorithms",
    "create_disco_param_groups",
    "is_transposed_module",
    "main",
    "route_parameters",
    "routing_table",
    "split_vector_params",
]

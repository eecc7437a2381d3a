"""Newton-Schulz / Polar Express coefficient tables.

Each table is a list of quintic tuples ``(a, b, c)`` for the iteration
``A = X X^T; X <- a X + (b A + c A^2) X`` on the wide orientation, plus the normalisation
``X / (||X||_F * safety + eps)`` applied before the first step and the rule for steps beyond the list
(``cycle`` or ``repeat_last``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

Coefficients = tuple[float, float, float]
MODES = ("cycle", "repeat_last")


@dataclass(frozen=True)
class CoefficientTable:
    """A named list of ``(a, b, c)`` tuples with its normalisation and its rule beyond the list."""

    name: str
    tuples: tuple[Coefficients, ...]
    mode: str = "cycle"
    safety: float = 1.0
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"coefficient table {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if not self.tuples or any(len(t) != 3 for t in self.tuples):
            raise ValueError(f"coefficient table {self.name!r}: needs at least one (a, b, c) tuple")

    def at(self, step: int) -> Coefficients:
        if step < len(self.tuples):
            return self.tuples[step]
        if self.mode == "cycle":
            return self.tuples[step % len(self.tuples)]
        return self.tuples[-1]


#: What ``get_table`` accepts: a table name, a table, one ``(a, b, c)`` tuple or a list of them.
CoefficientSpec = str | CoefficientTable | Sequence[float] | Sequence[Sequence[float]]


def _with_safety(tuples: Sequence[Coefficients], safety: float, n_scaled: int) -> tuple[Coefficients, ...]:
    # Polar Express divides (a, b, c) by (s, s^3, s^5) so that the iteration stays stable after normalising
    # by s * ||X||_F.
    out = []
    for i, (a, b, c) in enumerate(tuples):
        if i < n_scaled:
            out.append((a / safety, b / safety**3, c / safety**5))
        else:
            out.append((a, b, c))
    return tuple(out)


# KellerJordan/Muon and torch.optim.Muon default: designed not to converge; singular values end in
# about [0.68, 1.14] on Gaussian inputs (measured in tests/test_ops_orthogonalize.py).
_KELLER = ((3.4445, -4.7750, 2.0315),)

# modded-nanogpt GPT-2-medium record 4 (Jiacheng You); Emerging-Optimizers "quintic".
_YOU = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express, arXiv 2505.16932, Algorithm 1 (8 iterations, safety 1.01 on the first 7).
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# modded-nanogpt: Polar Express computed for 5 iterations with safety 2e-2 baked into the tuples.
_POLAR_EXPRESS_5 = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

TABLES: dict[str, CoefficientTable] = {
    "keller": CoefficientTable("keller", _KELLER, "cycle"),
    "you": CoefficientTable("you", _YOU, "cycle"),
    "polar_express": CoefficientTable(
        "polar_express", _with_safety(_POLAR_EXPRESS, 1.01, 7), "repeat_last", safety=1.01, eps=1e-7
    ),
    "polar_express_5": CoefficientTable("polar_express_5", _POLAR_EXPRESS_5, "repeat_last", safety=1.02, eps=1e-6),
}
ALIASES = {"simple": "keller", "quintic": "you"}


def table_names() -> list[str]:
    return sorted([*TABLES, *ALIASES])


def get_table(spec: CoefficientSpec, *, mode: str | None = None) -> CoefficientTable:
    """Resolve a table by name, pass a ``CoefficientTable`` through, or wrap user tuples.

    ``mode``, when given with a table name, overrides the table's rule beyond its list.

    A single ``(a, b, c)`` tuple (as ``torch.optim.Muon``'s ``ns_coefficients``) needs no mode; a list of
    several tuples needs an explicit ``mode`` (``"cycle"`` or ``"repeat_last"``), since the two differ
    beyond the list.
    """
    if isinstance(spec, CoefficientTable):
        return spec
    if isinstance(spec, str):
        key = ALIASES.get(spec, spec)
        if key not in TABLES:
            raise ValueError(f"unknown coefficient table {spec!r}; valid: {table_names()}")
        table = TABLES[key]
        return table if mode is None or mode == table.mode else replace(table, mode=mode)
    items: list[float | Sequence[float]] = list(spec)
    scalars = [x for x in items if isinstance(x, (int, float))]
    if len(items) == 3 and len(scalars) == 3:
        a, b, c = (float(x) for x in scalars)
        return CoefficientTable("custom", ((a, b, c),), mode or "cycle")
    tuples: list[Coefficients] = []
    for t in items:
        if isinstance(t, (int, float)):  # not a tuple: the TypeError that iterating it raised
            raise TypeError(f"coefficient tuples must be (a, b, c), got the number {t!r}")
        row = [float(x) for x in t]
        if len(row) != 3:
            raise ValueError(f"coefficient tuples must be (a, b, c), got {tuple(row)}")
        tuples.append((row[0], row[1], row[2]))
    if len(tuples) > 1 and mode is None:
        raise ValueError(f"a user list of {len(tuples)} coefficient tuples needs an explicit mode: one of {MODES}")
    return CoefficientTable("custom", tuple(tuples), mode or "cycle")

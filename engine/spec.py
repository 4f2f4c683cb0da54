"""The one description of a reduction request: what pykeops' Genred takes, plus whether `ranges` come with it.

Every layer speaks it: the engine's front ends (`GenredBase.spec`), the remote LazyTensor (`request_of` turns a Plan
back into one), the client (its JSON body), the service (its pydantic `ReductionSpec` becomes one, `to_spec`) and
the caches (`key`). Construction checks the cheap things (types, axis, dtype_acc, aliases as a tuple of strings);
`plan()` parses and checks the rest (K included), once per spec where callers cache plans by `key`.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, asdict, dataclass, fields

from .errors import ArgumentError
from .plan import DTYPE_ACC, Plan, make_plan


@dataclass(frozen=True)
class Spec:
    formula: str
    aliases: tuple[str, ...] = ()
    reduction_op: str = "Sum"
    axis: int = 0
    opt_arg: int | None = None
    formula2: str | None = None
    dtype_acc: str = "auto"
    _: KW_ONLY                    # (the flags by name: a field added above them must not shift a caller's meaning)
    fast_math: bool = True        # pykeops' use_fast_math (the GPU's fast exp); part of the plan
    ranges: bool = False          # pykeops' block-sparse `ranges` 6-tuple travels with the arrays (data, not plan)

    def __post_init__(self):
        aliases = (self.aliases,) if isinstance(self.aliases, str) else tuple(self.aliases)
        object.__setattr__(self, "aliases", aliases)
        for name in ("formula", "reduction_op"):
            _expect(name, getattr(self, name), str)
        _expect("formula2", self.formula2, (str, type(None)))
        if not all(isinstance(a, str) for a in aliases):
            raise ArgumentError(f"aliases must be strings such as 'x = Vi(3)', got {list(aliases)!r}")
        if isinstance(self.axis, bool) or self.axis not in (0, 1):
            raise ArgumentError(f"axis must be 0 (reduce over i) or 1 (reduce over j), got {self.axis!r}")
        if self.dtype_acc not in DTYPE_ACC:
            raise ArgumentError(f"dtype_acc must be one of {', '.join(DTYPE_ACC)}, got {self.dtype_acc!r}")
        _expect("fast_math", self.fast_math, bool)
        _expect("ranges", self.ranges, bool)

    @property
    def key(self) -> tuple:
        """What the plan depends on (not `ranges`, which is data): the key of every plan cache."""
        return (self.formula, self.aliases, self.reduction_op, self.axis, self.opt_arg, self.formula2, self.dtype_acc,
                self.fast_math)

    def plan(self) -> Plan:
        """Parse and check (engine.plan.make_plan)."""
        return make_plan(self.formula, list(self.aliases), self.reduction_op, self.axis, self.opt_arg, self.formula2,
                         self.dtype_acc, self.fast_math)

    def to_json(self) -> dict:
        """The request's JSON fields (the body the service's `ReductionSpec` reads)."""
        return asdict(self) | {"aliases": list(self.aliases)}

    @classmethod
    def from_fields(cls, source) -> "Spec":
        """A Spec from any object (a pydantic model) or mapping carrying these fields."""
        get = source.get if isinstance(source, dict) else lambda name, default: getattr(source, name, default)
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})


def _expect(name: str, value, types) -> None:
    if not isinstance(value, types):
        raise ArgumentError(f"{name} has the wrong type: {value!r}")

"""The one description of a reduction request, and the one way from it to a Plan (`make_plan`).

`Spec` holds what pykeops' Genred takes, plus whether `ranges` come with the arrays. Every layer builds one and
nothing else: the engine's front ends (`GenredBase.spec`), `Cluster.submit`, job files (`JobSpec` embeds its
fields), the client (its JSON body, `to_json`), the service (its pydantic request models are generated from these
fields, `service/schemas.py`) and the remote LazyTensor (`request_of` turns a Plan back into one).

Construction normalises, so that two spellings of one request are one Spec with one `key` (the key of every plan
cache): aliases are rewritten as `name = Vi(pos, dim)` (`x=Vi(3)` at index 0 and `x = Vi(0, 3)` are the same),
LogSumExp with `formula2` becomes LogSumExpWeight (pykeops reads formula2 of a LogSumExp as its weight), `opt_arg`
is dropped by reductions that take no K, and the cheap checks (types, axis, dtype_acc) are made. `make_plan` parses
the formulas, once per key.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, asdict, dataclass, fields
from typing import Literal

from . import limits
from .errors import ArgumentError
from .formula import CATEGORY_NAMES, parse_alias, parse_request
from .plan import DTYPE_ACC, Plan, plan_bytes, plan_from_nodes
from .reductions import REDUCTIONS, as_k, called


@dataclass(frozen=True)
class Spec:
    formula: str
    aliases: tuple[str, ...] = ()
    reduction_op: str = "Sum"
    axis: Literal[0, 1] = 0
    opt_arg: int | None = None
    formula2: str | None = None
    dtype_acc: Literal["auto", "float32", "float64"] = "auto"
    _: KW_ONLY                    # (the flags by name: a field added above them must not shift a caller's meaning)
    fast_math: bool = True        # pykeops' use_fast_math (the GPU's fast exp); part of the plan
    ranges: bool = False          # pykeops' block-sparse `ranges` 6-tuple travels with the arrays (data, not plan)

    def __post_init__(self):
        for name in ("formula", "reduction_op"):
            _expect(name, getattr(self, name), str)
        _expect("formula2", self.formula2, (str, type(None)))
        if isinstance(self.axis, bool) or self.axis not in (0, 1):
            raise ArgumentError(f"axis must be 0 (reduce over i) or 1 (reduce over j), got {self.axis!r}")
        object.__setattr__(self, "axis", int(self.axis))
        if self.dtype_acc not in DTYPE_ACC:
            raise ArgumentError(f"dtype_acc must be one of {', '.join(DTYPE_ACC)}, got {self.dtype_acc!r}")
        _expect("fast_math", self.fast_math, bool)
        _expect("ranges", self.ranges, bool)
        object.__setattr__(self, "aliases", normal_aliases(self.aliases))
        object.__setattr__(self, "reduction_op", called(self.reduction_op, self.formula2 is not None))
        known = REDUCTIONS.get(self.reduction_op)
        opt_arg = self.opt_arg
        if known is not None and not known.needs_k:
            opt_arg = None                          # (pykeops ignores it there too)
        else:
            opt_arg = as_k(opt_arg)                 # a numpy integer or 0-d tensor is K too (bind checks the range)
        object.__setattr__(self, "opt_arg", opt_arg)

    @property
    def key(self) -> tuple:
        """What the plan depends on (not `ranges`, which is data): the key of every plan cache. The fields are
        normalised and type-checked, so equal keys are equal requests (axis=True is refused, never read as 1)."""
        return (self.formula, self.aliases, self.reduction_op, self.axis, self.opt_arg, self.formula2, self.dtype_acc,
                self.fast_math)

    def plan(self) -> Plan:
        """Parse and check: `make_plan(self)`."""
        return make_plan(self)

    def replace(self, **changes) -> Spec:
        """This request with some fields changed (normalised again)."""
        return Spec(**(self.fields() | changes))

    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def options(self) -> dict:
        """The fields after formula and aliases, less `ranges` (data): the keywords of `reduce`/`Genred` calls."""
        return {k: v for k, v in self.fields().items() if k not in ("formula", "aliases", "ranges")}

    def to_json(self) -> dict:
        """The request's JSON fields (the body the service's request models read)."""
        return asdict(self) | {"aliases": list(self.aliases)}

    @classmethod
    def from_fields(cls, source) -> Spec:
        """A Spec from any object (a pydantic model) or mapping carrying these fields."""
        get = source.get if isinstance(source, dict) else lambda name, default: getattr(source, name, default)
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})


def normal_aliases(aliases) -> tuple[str, ...]:
    """Aliases as `name = Vi(pos, dim)`, positions made explicit (the name kept as written: the parser reports two
    spellings of one NFKC name)."""
    if isinstance(aliases, str):
        aliases = (aliases,)
    try:
        aliases = tuple(aliases)
    except TypeError:
        raise ArgumentError(f"aliases must be a list of strings such as 'x = Vi(3)', got {aliases!r}") from None
    if not all(isinstance(a, str) for a in aliases):
        raise ArgumentError(f"aliases must be strings such as 'x = Vi(3)', got {list(aliases)!r}")
    normal = []
    for index, text in enumerate(aliases):
        _, node = parse_alias(text, index)
        pos, dim, cat = node.params
        normal.append(f"{text.partition('=')[0].strip()} = {CATEGORY_NAMES[cat]}({pos}, {dim})")
    return tuple(normal)


def _expect(name: str, value, types) -> None:
    if not isinstance(value, types):
        raise ArgumentError(f"{name} has the wrong type: {value!r}")


# Building plans ----------------------------------------------------------------------------------------

# make_plan's results by Spec.key, least recently used dropped first (KRED_MAX_PLANS, KRED_MAX_PLAN_BYTES)
_PLANS = limits.BoundedLRU(limits.PLANS, limits.PLAN_BYTES, getsizeof=plan_bytes)


def make_plan(spec: Spec) -> Plan:
    """Parse a request into a Plan (plans are immutable: the same request gives the cached one)."""
    if not isinstance(spec, Spec):
        raise ArgumentError(f"make_plan takes a Spec, got {type(spec).__name__}")
    plan = _PLANS.get(spec.key)
    if plan is None:
        plan = _PLANS[spec.key] = _build(spec)
    return plan


def cached_plan(spec: Spec) -> Plan | None:
    """The plan of `spec` if one was built in this process (the service builds plans in worker processes)."""
    return _PLANS.get(spec.key)


def keep_plan(spec: Spec, plan: Plan) -> None:
    """Remember a plan of `spec` built elsewhere (a plan worker process), under the same key."""
    _PLANS[spec.key] = plan


def _build(spec: Spec) -> Plan:
    f, f2, names = parse_request(spec.formula, spec.formula2, spec.aliases)   # names: aliases + inline variables
    return plan_from_nodes(f, f2, spec.reduction_op, spec.axis, spec.opt_arg, spec.dtype_acc, names,
                           fast_math=spec.fast_math)

"""`Spec` as a pydantic model: the request models of the service and of job files are generated from Spec's fields
(names, types, defaults), each reader adding only its own limits and fields, so no reader lists them again.

    ReductionSpec = spec_model("ReductionSpec", limits={"aliases": Field(max_length=256)}, grad=(GradSpec | None, None))

A model's `spec` is its Spec, built once (normalised as Spec normalises; its errors are the engine's KredErrors,
raised when first asked for, so the service answers them with their own kind).
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, create_model

from .spec import Spec


class SpecModel(BaseModel):
    """Base of the generated models: unknown fields are refused; `spec` is the request as the engine reads it."""
    model_config = ConfigDict(extra="forbid")
    _spec: Spec | None = PrivateAttr(None)

    @property
    def spec(self) -> Spec:
        if self._spec is None:
            self._spec = Spec(**{f.name: getattr(self, f.name) for f in fields(Spec) if f.name in type(self).model_fields})
        return self._spec

    def to_spec(self) -> Spec:
        return self.spec


def spec_model(name: str, *, base: type[BaseModel] = SpecModel, limits: dict[str, Any] | None = None,
               exclude: tuple[str, ...] = (), doc: str | None = None, **extra) -> type[BaseModel]:
    """A pydantic model with Spec's fields (less `exclude`), each annotated with `limits[field]` (pydantic
    `Field(...)`s or other metadata), plus the `extra` fields given as (type, default)."""
    hints = typing.get_type_hints(Spec)
    limits = limits or {}
    defined: dict[str, Any] = {}
    for f in fields(Spec):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        if f.name == "aliases":
            kind = list[str]                       # JSON arrays (Spec makes them a tuple)
        meta = limits.get(f.name, ())
        meta = meta if isinstance(meta, tuple) else (meta,)
        annotated = Annotated[(kind, *meta)] if meta else kind
        defined[f.name] = (annotated, ... if f.default is MISSING else f.default)
    model = create_model(name, __base__=base, __doc__=doc, **defined, **extra)
    return model

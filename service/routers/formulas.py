"""POST /v1/formulas/validate: parse and check a reduction without data."""
from __future__ import annotations

from fastapi import APIRouter, Request

from kred.engine.formula import CATEGORY_NAMES, to_text

from .. import transport
from ..context import ServiceDep
from ..schemas import ArgInfo, ErrorBody, OutputInfo, ReductionSpec, Validation

router = APIRouter(prefix="/v1/formulas", tags=["formulas"])


SPEC = {"required": True, "content": {transport.JSON: {"schema": ReductionSpec.model_json_schema(
    ref_template="#/components/schemas/{model}")}}}


@router.post("/validate", response_model=Validation, responses={422: {"model": ErrorBody}},
             openapi_extra={"requestBody": SPEC})
async def validate(request: Request, service: ServiceDep) -> Validation:
    """The normalised formula, its arguments and outputs; or a 422 saying precisely what is wrong (with the column)."""
    spec = transport.validate_json(ReductionSpec, await transport.read_body(request))   # parsed once, after auth
    plan = await service.planner.plan(spec)
    return Validation(
        formula=to_text(plan.formula),
        formula2=to_text(plan.formula2) if plan.formula2 is not None else None,
        reduction_op=plan.reduction.name, axis=plan.axis,
        args=[ArgInfo(position=a.pos, name=a.name, category=CATEGORY_NAMES[a.cat], dim=a.dim) for a in plan.args],
        outputs=[OutputInfo(name=kind, kind=kind, dim=width) for kind, width in plan.reduction.outputs],
    )

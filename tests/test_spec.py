"""engine.spec.Spec: the one description of a request, read by the front ends, the client and the service."""
from __future__ import annotations

import httpx
import pytest

from kred.client import Client
from kred.engine.errors import ArgumentError
from kred.engine.numpy import Genred
from kred.engine.spec import Spec, make_plan
from kred.service.schemas import ReductionSpec

FORMULA, ALIASES = "Exp(-SqDist(x, y)) * b", ("x = Vi(3)", "y = Vj(3)", "b = Vj(2)")


def test_the_service_schema_the_client_body_and_the_front_end_agree():
    spec = Spec(FORMULA, ALIASES, "KMin", 1, 3, None, "float64", ranges=True)
    wire = ReductionSpec.model_validate(spec.to_json())              # the client's JSON, read by the service
    assert wire.to_spec() == spec
    assert Genred(FORMULA, list(ALIASES), "KMin", 1, opt_arg=3, dtype_acc="float64").spec == \
        Spec(FORMULA, ALIASES, "KMin", 1, 3, None, "float64")
    assert spec.key == Spec(FORMULA, list(ALIASES), "KMin", 1, 3, None, "float64").key     # ranges: data, not plan
    assert spec.plan().key == make_plan(Spec(FORMULA, list(ALIASES), "KMin", 1, 3, None, "float64")).key


@pytest.mark.parametrize("fields,match", [
    (dict(axis=2), "axis must be 0"), (dict(axis=True), "axis must be 0"), (dict(dtype_acc="float16"), "dtype_acc"),
    (dict(aliases=["x = Vi(3)", 3]), "aliases must be strings"),
    (dict(formula=None), "formula"), (dict(ranges="yes"), "ranges"),
])
def test_bad_fields_are_named(fields, match):
    with pytest.raises(ArgumentError, match=match):
        Spec(**({"formula": FORMULA, "aliases": ALIASES} | fields))


def test_the_client_checks_the_spec_before_sending():
    sent = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(500))
    with Client("http://kred", transport="arrow", http_transport=transport) as c:
        with pytest.raises(ArgumentError, match="axis"):
            c.reduce(FORMULA, ALIASES, axis=3)
    assert sent == []

"""The client protocol on its own (client/protocol.py): its flows driven by a fake sender, no socket and no httpx.
What each operation asks of the server, in which order, how big a reply it accepts, and what it makes of replies."""
from __future__ import annotations

import json

import numpy as np
import pytest
from kred.client.errors import JobFailed, LimitExceeded
from kred.client.protocol import (
    MAX_REPLY_BYTES,
    REPLY_SLACK,
    Call,
    Protocol,
    Reply,
    Sleep,
)
from kred.engine.errors import ArgumentError

from kred.wire import arrow


def drive(flow, answer):
    """Run `flow`, answering each Call with `answer(call)`; returns (result, the steps it yielded)."""
    steps = []
    try:
        step = next(flow)
        while True:
            steps.append(step)
            step = flow.send(None if isinstance(step, Sleep) else answer(step))
    except StopIteration as stop:
        return stop.value, steps


def json_reply(body, status: int = 200) -> Reply:
    return Reply(status, {"content-type": "application/json"}, json.dumps(body).encode())


def arrow_reply(arrays) -> Reply:
    return Reply(200, {"content-type": arrow.CONTENT_TYPE}, bytes(arrow.encode({"names": ["value"]}, arrays)))


def test_an_arrow_reduction_is_one_call_capped_at_its_expected_output():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 5, 7, 3)), rng.normal(size=(1, 6, 3))      # batch (2, 5), rows 7, columns 6
    expected = np.exp(-((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)).sum(-1, keepdims=True)

    def answer(call):
        meta, (xs, ys) = arrow.decode(call.content.tobytes())
        assert meta["formula"] == "Exp(-SqDist(x,y))" and meta["axis"] == 1 and meta["grad"] is None
        d = np.exp(-((xs[..., :, None, :] - ys[..., None, :, :]) ** 2).sum(-1)).sum(-1, keepdims=True)
        return arrow_reply([d])
    flows = Protocol("http://kred/", None, "arrow")
    result, steps = drive(flows.reduce("Exp(-SqDist(x,y))", ["x = Vi(3)", "y = Vj(3)"], [x, y], options={"axis": 1}),
                          answer)
    np.testing.assert_allclose(result, expected)
    (call,) = steps
    assert (call.method, call.path, call.headers["Content-Type"]) == ("POST", "/v1/reduce", arrow.CONTENT_TYPE)
    out_bytes = 2 * 5 * 7 * 1 * 8                                 # (batch x rows) x width x float64
    assert out_bytes + REPLY_SLACK <= call.limit <= 2 * out_bytes + REPLY_SLACK
    assert flows.url == "http://kred"


def test_a_gradient_reply_is_capped_at_the_argument_and_unknown_formulas_at_the_setting():
    flows = Protocol("http://kred", None, "arrow", max_reply_bytes=12345)
    x, y, g = np.ones((40, 2)), np.ones((30, 2)), np.ones((40, 1))
    _, (call,) = drive(flows.reduce("SqDist(x,y)", ["x = Vi(2)", "y = Vj(2)"], [x, y, g], options={"axis": 1},
                                    grad="y"), lambda call: arrow_reply([np.zeros((30, 2))]))
    assert y.nbytes + REPLY_SLACK <= call.limit <= 2 * y.nbytes + REPLY_SLACK
    _, (call,) = drive(flows.reduce("NotAnOp(x)", ["x = Vi(2)"], [x]), lambda call: arrow_reply([x]))
    assert call.limit == 12345
    assert Protocol("http://kred", None, "arrow").max_reply_bytes == MAX_REPLY_BYTES


def test_auto_transport_probes_shared_memory_once_then_uses_arrow():
    x = np.arange(6.0).reshape(3, 2)

    def answer(call):
        if call.path == "/v1/shm/probe":
            return json_reply({"shared_memory": False, "sha256": None})
        return arrow_reply([arrow.decode(call.content.tobytes())[1][0].sum(0, keepdims=True)])
    flows = Protocol("http://kred", "t0k", "auto")
    for _ in range(2):
        result, steps = drive(flows.reduce("x", ["x = Vi(2)"], [x]), answer)
        np.testing.assert_array_equal(result, x.sum(0, keepdims=True))
        assert flows.headers == {"Authorization": "Bearer t0k"}
    assert [s.path for s in steps] == ["/v1/reduce"]                  # the probe was the first call's only
    flows.close()


def test_an_error_status_raises_the_clients_exception():
    flows = Protocol("http://kred", None, "arrow")
    with pytest.raises(LimitExceeded, match="too many pairs"):
        drive(flows.reduce("x", ["x = Vi(1)"], [np.ones((2, 1))]),
              lambda call: json_reply({"error": "limit", "detail": "too many pairs"}, 422))


def test_job_polling_is_a_flow_of_status_calls_and_sleeps_with_its_progress_bar():
    states = iter([("queued", 0.0), ("running", 0.4), ("running", 0.9), ("done", 1.0)])

    class Bar:
        n = 0

        def update(self, by):
            self.n += by
            seen.append(self.n)

        def close(self):
            seen.append("closed")
    seen: list = []

    def answer(call):
        if call.path.endswith("/result"):
            return arrow_reply([np.full((3, 1), 7.0)])
        state, progress = next(states)
        return json_reply({"id": "j1", "state": state, "progress": progress})
    flows = Protocol("http://kred", None, "arrow")
    result, steps = drive(flows.job_result("j1", None, 24, timeout=None, bar=Bar()), answer)
    np.testing.assert_array_equal(result, np.full((3, 1), 7.0))
    kinds = [s.path if isinstance(s, Call) else "sleep" for s in steps]
    assert kinds == ["/v1/jobs/j1", "sleep", "/v1/jobs/j1", "sleep", "/v1/jobs/j1", "sleep", "/v1/jobs/j1",
                     "/v1/jobs/j1/result"]
    assert seen == [0, 40, 90, 100, "closed"]
    assert steps[-1].limit == 24 + 3 + REPLY_SLACK


def test_a_failed_job_raises_and_a_cancel_waits_until_it_stopped():
    flows = Protocol("http://kred", None, "arrow")
    with pytest.raises(JobFailed, match="boom"):
        drive(flows.job_result("j1", None, None, timeout=None),
              lambda call: json_reply({"id": "j1", "state": "failed", "progress": 0.3, "error": "boom"}))
    replies = iter([{"id": "j1", "state": "running", "progress": 0.3}, {"id": "j1", "state": "running"},
                    {"id": "j1", "state": "cancelled", "progress": 0.3}])
    info, steps = drive(flows.job_cancel("j1", wait=True, timeout=30), lambda call: json_reply(next(replies)))
    assert info["state"] == "cancelled"
    assert [(s.method, s.path) for s in steps if isinstance(s, Call)] == [
        ("DELETE", "/v1/jobs/j1"), ("GET", "/v1/jobs/j1"), ("GET", "/v1/jobs/j1")]


def test_a_submitted_job_carries_its_expected_reply_size_and_a_checked_id():
    flows = Protocol("http://kred", None, "arrow")
    (info, like, expected), steps = drive(
        flows.submit("x", ["x = Vi(2)"], [np.ones((5, 2))]),
        lambda call: json_reply({"id": "j1", "state": "queued", "progress": 0.0}, 202))
    assert info["id"] == "j1" and like is None and 16 <= expected <= 64      # 1 row (no j variable) x 2 x 8, aligned
    assert steps[0].idempotent is False
    with pytest.raises(ArgumentError, match="job id"):
        drive(flows.submit("x", ["x = Vi(2)"], [np.ones((5, 2))]),
              lambda call: json_reply({"id": "../admin", "state": "queued"}, 202))

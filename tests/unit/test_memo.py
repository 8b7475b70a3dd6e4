"""``RequestMemo``'s template is immutable: what ``rebuild`` shares between the requests
of one connection (shapes, parameters, the outputs) refuses every change, a mutable copy
of it changes nothing in the template, and the next rebuilt request is as the client
sent it. Checked through both codecs that keep a memo (HTTP binary, gRPC)."""

from __future__ import annotations

import msgspec
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from despina.services.frontend.grpc import converters
from despina.services.frontend.http.codec import decode_infer_request
from despina.services.frontend.inference import (
    FrozenList,
    FrozenOutputRequest,
    FrozenParams,
    InferenceRequest,
    OutputRequest,
    RequestMemo,
)


def http_body(a: np.ndarray) -> tuple[bytes, int]:
    """A binary-input HTTP infer body: one FP32 input, two outputs, request parameters."""
    header = orjson.dumps(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True, "priority": 2},
            "inputs": [
                {
                    "name": "A",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": 16},
                }
            ],
            "outputs": [{"name": "O", "parameters": {"binary_data": True}}, {"name": "P"}],
        }
    )
    return header + a.tobytes(), len(header)


def grpc_message(a: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="m", id="x")
    request.inputs.add(name="A", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(a.tobytes())
    request.outputs.add(name="O").parameters["classification"].int64_param = 2
    request.parameters["priority"].int64_param = 1
    return request.SerializeToString()


def http_decode(a: np.ndarray, memo: RequestMemo) -> InferenceRequest:
    body, header_length = http_body(a)
    return decode_infer_request(body, header_length, "m", "1", memo)


def grpc_decode(a: np.ndarray, memo: RequestMemo) -> InferenceRequest:
    return converters.decode_message(grpc_message(a), memo)


def fields(request: InferenceRequest) -> tuple:
    return (
        request.model,
        request.id,
        [(t.name, t.datatype, list(t.shape), dict(t.parameters)) for t in request.inputs],
        [(o.name, o.binary, dict(o.parameters)) for o in request.outputs],
        dict(request.parameters),
        request.binary_output,
    )


MUTATIONS = {
    "request parameter set": lambda r: r.parameters.__setitem__("leak", "yes"),
    "request parameter update": lambda r: r.parameters.update(leak="yes"),
    "request parameter removed": lambda r: r.parameters.pop("priority"),
    "request parameters cleared": lambda r: r.parameters.clear(),
    "output appended": lambda r: r.outputs.append(OutputRequest("LEAK")),
    "output removed": lambda r: r.outputs.pop(),
    "outputs extended": lambda r: r.outputs.extend([OutputRequest("LEAK")]),
    "output renamed": lambda r: setattr(r.outputs[0], "name", "LEAK"),
    "output made binary": lambda r: setattr(r.outputs[-1], "binary", True),
    "output parameter set": lambda r: r.outputs[0].parameters.__setitem__("leak", 1),
    "input shape changed": lambda r: r.inputs[0].shape.__setitem__(0, 99),
    "input shape appended": lambda r: r.inputs[0].shape.append(1),
    "input parameter set": lambda r: r.inputs[0].parameters.__setitem__("leak", 1),
}


@pytest.mark.parametrize("decode", [http_decode, grpc_decode], ids=["http", "grpc"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_rebuilt_request_cannot_change_the_template(decode, mutation):
    memo = RequestMemo()
    a = np.arange(4, dtype=np.float32)
    first = decode(a, memo)
    assert memo.total > 0
    expected = fields(first)
    second = decode(a * 2, memo)
    assert second.checked is first.checked  # rebuilt from the template, not decoded
    assert fields(second) == expected
    with pytest.raises(TypeError, match="request memo"):
        MUTATIONS[mutation](second)
    third = decode(a * 3, memo)
    assert third.checked is first.checked
    assert fields(third) == expected
    assert bytes(third.inputs[0].data) == (a * 3).tobytes()


@pytest.mark.parametrize("decode", [http_decode, grpc_decode], ids=["http", "grpc"])
def test_a_copy_of_a_rebuilt_request_changes_nothing_in_the_next(decode):
    memo = RequestMemo()
    a = np.arange(4, dtype=np.float32)
    expected = fields(decode(a, memo))
    second = decode(a + 1, memo)
    # What a consumer that must change a request does: copy, then change the copy.
    second.parameters = {**second.parameters, "leak": "yes"}
    second.outputs = [*second.outputs, OutputRequest("LEAK")]
    second.inputs[0].shape = [*second.inputs[0].shape, 1]
    second.inputs[0].parameters = {**second.inputs[0].parameters, "leak": 1}
    assert second.parameters["leak"] == "yes"
    third = decode(a + 2, memo)
    assert fields(third) == expected
    assert "leak" not in third.parameters
    assert [o.name for o in third.outputs] == [o[0] for o in expected[3]]
    assert list(third.inputs[0].shape) == [1, 4]


def test_frozen_template_values_still_encode_and_compare_as_their_kinds():
    params = FrozenParams({"priority": 2, "s": "v"})
    shape = FrozenList([1, 4])
    output = FrozenOutputRequest.__new__(FrozenOutputRequest)
    for name, value in (("name", "O"), ("binary", True), ("parameters", FrozenParams())):
        object.__setattr__(output, name, value)
    # msgspec (the wire) and orjson (HTTP JSON) take them as a dict and a list.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params)) == {"priority": 2, "s": "v"}
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(shape)) == [1, 4]
    assert orjson.loads(orjson.dumps({"p": params, "s": shape})) == {
        "p": {"priority": 2, "s": "v"},
        "s": [1, 4],
    }
    assert shape == [1, 4] and params == {"priority": 2, "s": "v"}
    assert output == OutputRequest("O", True, {}) and OutputRequest("O", True, {}) == output
    assert output != OutputRequest("O", False, {})
    copy = dict(params)
    copy["x"] = 1
    assert "x" not in params


def test_the_lean_grpc_transport_keeps_one_memo_per_connection():
    """Each HTTP/2 connection gets its own object from ``connection_state`` (the
    servicer's ``new_memo``), and its unary starts receive that one."""
    import asyncio

    from despina.services.frontend.grpc.h2.connection import H2Connection
    from despina.services.frontend.grpc.h2.server import H2Server

    async def scenario() -> tuple[list, list]:
        made: list[RequestMemo] = []

        def new_memo() -> RequestMemo:
            made.append(RequestMemo())
            return made[-1]

        server = H2Server({}, 1 << 20, 1 << 20, connection_state=new_memo)
        first, second = H2Connection(server), H2Connection(server)
        plain = H2Connection(H2Server({}, 1 << 20, 1 << 20))
        return made, [first.calls.state, second.calls.state, plain.calls.state]

    made, states = asyncio.run(scenario())
    assert len(made) == 2 and made[0] is not made[1]
    assert states[0] is made[0] and states[1] is made[1] and states[2] is None

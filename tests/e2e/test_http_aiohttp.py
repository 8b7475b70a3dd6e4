"""``DESPINA_HTTP_TRANSPORT=aiohttp``: the HTTP frontend on aiohttp, the fallback to the
default lean transport, answers the same way (the rest of the suite runs on lean)."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import serve_shipped_over


@pytest.fixture(scope="module")
def aiohttp_server(tmp_path_factory):
    srv = serve_shipped_over("aiohttp", tmp_path_factory, ("simple", "identity_fp32"))
    yield srv
    assert srv.stop() == 0


def test_aiohttp_transport_serves_the_same_api(aiohttp_server):
    frontend = aiohttp_server.child_pids("despina.services.frontend")[0]
    assert "aiohttp/_http_parser" in open(f"/proc/{frontend}/maps").read()
    client = httpclient.InferenceServerClient(aiohttp_server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_model_config("simple")["name"] == "simple"
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for binary in (False, True):
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for inp in inputs:
            inp.set_data_from_numpy(a, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        result = client.infer("simple", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    big = np.random.default_rng(0).random((1, 1 << 19), dtype=np.float32)  # 2 MiB each way
    inp = httpclient.InferInput("INPUT0", list(big.shape), "FP32")
    inp.set_data_from_numpy(big, binary_data=True)
    result = client.infer("identity_fp32", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in info.value.message()
    client.close()
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(f"http://{aiohttp_server.url}/v2/nowhere", timeout=5)
    assert http_info.value.code == 404

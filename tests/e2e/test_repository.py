"""Model repository behaviour through the real server: version policies, several
instances of a model running side by side, and models loaded from two repositories."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import SHIPPED_REPOSITORY, DespinaServer


def with_policy(root, name: str, policy: str, versions: list[int]):
    model = root / name
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", model)
    for v in versions:
        if v != 1:
            shutil.copytree(model / "1", model / str(v))
    config = (model / "config.pbtxt").read_text().replace('"identity_fp32"', f'"{name}"')
    (model / "config.pbtxt").write_text(config + policy)


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory, generator):
    root = tmp_path_factory.mktemp("policies")
    with_policy(root, "latest_default", "", [1, 2, 3])
    with_policy(root, "latest_two", "version_policy: { latest: { num_versions: 2 } }\n", [1, 2, 3])
    with_policy(root, "all_versions", "version_policy: { all: {} }\n", [1, 3, 10])
    with_policy(root, "specific", "version_policy: { specific: { versions: [1, 3] } }\n", [1, 2, 3])
    generator.python_slow(root, "slow_pair")
    config = (root / "slow_pair" / "config.pbtxt").read_text().replace("count: 1", "count: 2")
    assert "count: 2" in config
    (root / "slow_pair" / "config.pbtxt").write_text(config)
    second = tmp_path_factory.mktemp("second_repo")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", second / "simple")
    srv = DespinaServer(
        root, tmp_path_factory.mktemp("logs") / "serve.log", [f"--model-repository={second}"]
    ).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "model,versions",
    [
        ("latest_default", ["3"]),
        ("latest_two", ["2", "3"]),
        ("all_versions", ["1", "3", "10"]),
        ("specific", ["1", "3"]),
    ],
)
def test_version_policies(policy_server, model, versions):
    client = httpclient.InferenceServerClient(policy_server.url)
    meta = client.get_model_metadata(model)
    assert sorted(meta["versions"], key=int) == versions
    for v in ("1", "2", "3", "10"):
        assert client.is_model_ready(model, v) == (v in versions), (model, v)
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp])
    assert result.get_response()["model_version"] == max(versions, key=int)
    for v in versions:
        result = client.infer(model, [inp], model_version=v)
        assert result.get_response()["model_version"] == v
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    client.close()


def test_two_instances_run_side_by_side(policy_server):
    """instance_group { count: 2 }: two requests run at once, in two processes."""

    def slow(ms: int):
        client = httpclient.InferenceServerClient(policy_server.url, network_timeout=30)
        inp = httpclient.InferInput("SLEEP_MS", [1], "INT32")
        inp.set_data_from_numpy(np.array([ms], np.int32))
        result = client.infer("slow_pair", [inp])
        client.close()
        return int(result.as_numpy("PID")[0])

    slow(1)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pids = list(pool.map(slow, [800, 800]))
    elapsed = time.monotonic() - started
    assert len(set(pids)) == 2
    assert elapsed < 1.5, elapsed  # not 1.6 s one after the other
    config = httpclient.InferenceServerClient(policy_server.url).get_model_config("slow_pair")
    assert config["instance_group"][0]["count"] == 2


def test_models_from_two_repositories(policy_server):
    client = httpclient.InferenceServerClient(policy_server.url)
    assert client.is_model_ready("simple")
    assert client.is_model_ready("latest_two")
    names = {entry["name"] for entry in client.get_model_repository_index()}
    assert {"simple", "latest_two", "slow_pair"} <= names
    client.close()


def test_quick_models_answer_right_on_the_loop_and_on_threads(policy_server):
    """The ONNX host runs several instances: a quick model's executions move from its
    thread onto the loop once they prove quick, and back to the thread while another
    execution is running. Every answer stays right through both placements."""

    def quick(i: int) -> None:
        client = httpclient.InferenceServerClient(policy_server.url)
        for j in range(50):
            a = np.full((1, 16), i * 100 + j, np.int32)
            inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(np.ones((1, 16), np.int32))
            result = client.infer("simple", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 1)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - 1)
        client.close()

    def identity(i: int) -> None:
        client = httpclient.InferenceServerClient(policy_server.url)
        for j in range(50):
            data = np.full((1, 64), i * 100 + j, np.float32)
            inp = httpclient.InferInput("INPUT0", [1, 64], "FP32")
            inp.set_data_from_numpy(data)
            result = client.infer("latest_default", [inp])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        client.close()

    for i in range(4):  # one after the other: the model proves quick
        quick(i)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(quick, i) for i in range(4)]
        futures += [pool.submit(identity, i) for i in range(4)]
        for future in futures:
            future.result()

"""The container flavour served by a real tritonserver: front models that batch requests across clients and run
them on per-bucket fixed-shape models through BLS, and the SDK unchanged against it.

This machine's tritonserver (the nvidia-pytriton build) has the Python backend only, so the per-bucket models are
built with `bucket_backend="python"`: graph_model.py over the bucket's one ONNX file stands in for the native
onnxruntime backend, with the same names, tensors and static shapes (their native configurations are checked against
the graphs in tests/test_repository.py). Everything else is what the official container would run.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from trident.serving.client import TridentClient
from trident.serving.server.launcher import ServerConfig, TritonServer
from trident.serving.manifest import load_export
from trident.serving.server.repository import MARKER, bucket_config, build_options, build_repository, to_pbtxt
from trident.serving.spec import (DECODER, ENCODER, GENERATOR, SAMPLING_LOOP, SAMPLING_LOOP_STREAM, UNET, export_card,
                                  graph_spec_of)

from conftest import settled
from test_repository import Oracle, assert_outputs_close, infer, read_meta, triton_client, valid_inputs

MAX_BATCH = 8  # the front models' max_batch_size: twice the largest test bucket (4), so a batch can span two chunks
QUEUE_DELAY_US = 20_000  # long enough on this busy 2-core machine for concurrent clients' requests to meet


@pytest.fixture(scope="module")
def container_repository(export_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("container") / "model_repository"
    build_repository(list(export_dirs.values()), out, flavour="container", bucket_backend="python",
                     intra_op_threads=1, max_batch_size=MAX_BATCH, max_queue_delay_us=QUEUE_DELAY_US)
    return out


@pytest.fixture(scope="module")
def server(container_repository):
    with TritonServer(ServerConfig(container_repository, http_port=0, grpc_port=0, metrics_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def ort_client(export_dirs):
    with TridentClient.from_onnx(list(export_dirs.values()), threads=1) as client:
        yield client


@pytest.fixture(scope="module")
def oracle(export_dirs) -> Oracle:
    return Oracle(export_dirs)


def statistics(server, model: str) -> dict:
    with triton_client("http", server.http_url) as client:
        return client.get_inference_statistics(model)["model_stats"][0]


def requests_and_executions(server, model: str) -> tuple[int, int]:
    stats = statistics(server, model)
    return stats["inference_stats"]["success"]["count"], stats["execution_count"]


def test_container_repository_is_front_models_over_python_stand_ins_when_built_with_bucket_backend_python(
        container_repository, export_dirs):
    marker = json.loads((container_repository / MARKER).read_text())
    assert (marker["flavour"], marker["bucket_backend"]) == ("container", "python")
    graphs = (UNET, GENERATOR, DECODER, ENCODER)
    assert marker["models"] == sorted((*graphs, SAMPLING_LOOP, SAMPLING_LOOP_STREAM,
                                       *(f"{g}_b{n}" for g in graphs for n in (1, 4))))
    for g in graphs:
        stand_in = (container_repository / f"{g}_b4" / "config.pbtxt").read_text()
        assert 'backend: "python"' in stand_in and "max_batch_size: 0" in stand_in
        assert sorted(p.name for p in (container_repository / f"{g}_b4" / "1").glob("*.onnx")) == [f"{g}_b4.onnx"]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sdk_samples_from_the_container_flavour_what_it_samples_in_process(server, ort_client, protocol):
    """One code path: the same TridentClient calls as against the embedded flavour, the same images as in-process
    ONNX Runtime (the U-Net through the front model, the whole loop through the sampling loop model's BLS calls)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    with TridentClient.connect(url, protocol) as client:
        assert client.card("diffusion") == ort_client.card("diffusion")  # read from the front model's configuration
        kw = dict(classes=["sneaker", "bag", 0, "ankle boot", "dress"], steps=4, guidance=3.0, seed=3, raw=True)
        want = ort_client.sample(**kw)
        np.testing.assert_allclose(client.sample(**kw), want, rtol=0, atol=1e-5)  # 10 rows a step: 4 + 4 + 2
        np.testing.assert_allclose(client.sample(**kw, loop="server"), want, rtol=0, atol=1e-5)
        if protocol == "grpc":  # the streamed loop, its U-Net calls through BLS too
            steps = []
            streamed = client.sample(**kw, loop="server", callback=lambda i, *rest: steps.append(i))
            np.testing.assert_allclose(streamed, want, rtol=0, atol=1e-5)
            assert steps == [0, 1, 2, 3]
        np.testing.assert_allclose(client.generate(["coat"] * 6, seed=1, raw=True),
                                   ort_client.generate(["coat"] * 6, seed=1, raw=True), rtol=0, atol=1e-5)
        images = client.generate_vae(9, seed=2)
        np.testing.assert_array_equal(images, ort_client.generate_vae(9, seed=2))
        np.testing.assert_allclose(client.encode(images), ort_client.encode(images), rtol=0, atol=1e-5)


@pytest.mark.server
def test_eight_concurrent_clients_are_batched_across_clients_and_each_gets_its_own_images(server, ort_client):
    """The done-when of the container flavour: 8 clients sampling at once; Triton's statistics of the front model show
    more than one request per execution, and every client gets exactly what it gets alone in-process."""
    before = requests_and_executions(server, UNET)
    clients = 8
    start = threading.Barrier(clients)
    results, errors = {}, []

    def draw(i: int):
        try:
            with TridentClient.connect(server.grpc_url, "grpc") as client:
                start.wait(timeout=60)
                results[i] = client.sample([i % 10], steps=6, guidance=3.0, seed=100 + i, raw=True)
        except Exception as e:  # reported below, with the client's number
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for i in range(clients):
        want = ort_client.sample([i % 10], steps=6, guidance=3.0, seed=100 + i, raw=True)
        np.testing.assert_allclose(results[i], want, rtol=0, atol=1e-5, err_msg=f"client {i}")
    now = settled(lambda: requests_and_executions(server, UNET), lambda now: now[0] - before[0] >= clients * 6)
    requests, executions = (after - was for after, was in zip(now, before))
    assert requests == clients * 6  # one request of 2 rows ([cond; null]) per step per client
    assert executions < requests, f"{requests} requests ran in {executions} executions: nothing was batched"
    print(f"\n{requests} U-Net requests from {clients} clients ran in {executions} executions of the front model")


@pytest.mark.server
def test_front_model_splits_rows_over_the_largest_bucket_and_pads_the_rest(server, export_dirs, oracle):
    """7 rows in one request (max_batch_size 8, buckets 1 and 4): two calls of the 4-row model, the second padded."""
    meta = read_meta(export_dirs["diffusion"])
    spec = graph_spec_of(UNET, export_card(meta))
    arrays = valid_inputs(spec, meta, 7, seed=7)
    b4_before, b1_before = (statistics(server, f"{UNET}_b{n}")["execution_count"] for n in (4, 1))
    got = infer("grpc", server.grpc_url, spec, arrays)
    assert_outputs_close(got, oracle(spec, arrays))
    b4_after = settled(lambda: statistics(server, f"{UNET}_b4")["execution_count"], lambda now: now - b4_before >= 2)
    assert b4_after - b4_before == 2
    assert statistics(server, f"{UNET}_b1")["execution_count"] == b1_before


@pytest.mark.server
def test_front_model_refuses_a_bad_request_naming_the_input_and_keeps_serving(server, export_dirs, oracle):
    from tritonclient.utils import InferenceServerException

    meta = read_meta(export_dirs["gan"])
    spec = graph_spec_of(GENERATOR, export_card(meta))
    arrays = valid_inputs(spec, meta, 2, seed=1)
    bad = [a.copy() for a in arrays]
    bad[1][1] = 10  # class_label: 10 classes, no null class in a GAN
    with pytest.raises(InferenceServerException, match=r"gan_generator: input 'class_label' must be in \[0, 10\)"):
        infer("http", server.http_url, spec, bad)
    bad = [a.copy() for a in arrays]
    bad[0][0, 3] = np.inf
    with pytest.raises(InferenceServerException, match="'latent' holds NaN or Inf"):
        infer("grpc", server.grpc_url, spec, bad)
    assert_outputs_close(infer("grpc", server.grpc_url, spec, arrays), oracle(spec, arrays))


# A per-bucket model that fails the way a native one can (an error answer; an answer without the output asked for),
# behind the real front model: what bls.BucketModels does with it is what reaches the client. Written here because
# no model the build makes answers that way on purpose.
FAILING_BUCKET_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.bucket = args["model_name"].rsplit("_b", 1)[1]

    def execute(self, requests):
        if self.bucket == "4":
            error = pb_utils.TritonError("the device ran out of memory")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[]) for _ in requests]
"""


@pytest.fixture(scope="module")
def failing_buckets_server(container_repository, export_dirs, tmp_path_factory):
    """The container flavour's gan_generator front model, as built, over per-bucket models that fail: bucket 4
    answers an error, bucket 1 answers without the 'image' output."""
    repo = tmp_path_factory.mktemp("failing_buckets") / "model_repository"
    shutil.copytree(container_repository / GENERATOR, repo / GENERATOR)
    export, options = load_export(export_dirs["gan"]), build_options("container", bucket_backend="python")
    for bucket in (1, 4):  # the per-bucket models' names and tensors, on the Python backend, running the model above
        config = {**bucket_config(export, GENERATOR, bucket, options), "backend": "python", "parameters": {}}
        del config["model_warmup"]  # an answer that fails its warm-up would fail the load
        (repo / config["name"] / "1").mkdir(parents=True)
        (repo / config["name"] / "config.pbtxt").write_text(to_pbtxt(config))
        (repo / config["name"] / "1" / "model.py").write_text(FAILING_BUCKET_MODEL)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as srv:
        yield srv


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_front_model_answers_a_per_bucket_error_or_missing_output_as_its_own_failure_and_keeps_serving(
        failing_buckets_server, export_dirs, protocol):
    """bls.py: a per-bucket model's error answer, or an answer without the output asked for, fails the request with
    the per-bucket model's name and what went wrong (an internal error, not the client's INVALID_ARG); the front model
    answers the next request the same way (it is not wedged)."""
    from tritonclient.utils import InferenceServerException

    meta = read_meta(export_dirs["gan"])
    spec = graph_spec_of(GENERATOR, export_card(meta))
    url = failing_buckets_server.http_url if protocol == "http" else failing_buckets_server.grpc_url
    expected = {3: "gan_generator: the per-bucket model failed: gan_generator_b4: the device ran out of memory",
                1: "gan_generator: the per-bucket model failed: gan_generator_b1 answered without output 'image'"}
    for rows in (3, 1, 3):
        with pytest.raises(InferenceServerException) as failed:
            infer(protocol, url, spec, valid_inputs(spec, meta, rows, seed=rows))
        assert failed.value.message() == expected[rows]
        assert failed.value.status() in ("500", "StatusCode.INTERNAL"), failed.value.status()

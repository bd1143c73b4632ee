"""A distilled diffusion student served end to end beside its teacher (issue 19 item 3): its export with the guidance
input, in-process sampling with one network row per image per step, both repository flavours on the real bundled
tritonserver (sync and asyncio SDK; the client loop, the server loop and the streamed loop), and a guidance scale
outside the student's range refused with a 4xx naming the input and the range.

The student is conftest's tiny built one (`student_checkpoint`: a step-distilled card, 4 DDIM steps, guidance range
[1, 5]), so what is checked here does not hang on the committed student's weights (tests/test_quality.py judges those).
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from conftest import STUDENT_GUIDANCE, STUDENT_STEPS
from test_repository import served_runtime
from trident.serving import sampling
from trident.serving.client import AsyncTridentClient, TridentClient
from trident.serving.errors import InvalidArgumentError
from trident.serving.graph_runtime import GUIDANCE, GraphRuntime
from trident.serving.manifest import load_export
from trident.serving.server.launcher import ServerConfig, TritonServer
from trident.serving.server.repository import MARKER, build_repository
from trident.serving.server.runtime import protocol as P
from trident.serving.spec import (SAMPLING_LOOP, STUDENT_SAMPLING_LOOP, STUDENT_SAMPLING_LOOP_STREAM, STUDENT_UNET,
                                  UNET)

STUDENT = "diffusion_student"
CLASSES = ["sneaker", "bag", 0]
TOLERANCE = 1e-5  # the same graphs in other bucket layouts


@pytest.fixture(scope="module")
def student_client(student_export):
    with TridentClient.from_onnx([student_export], threads=1) as client:
        yield client


# ---------------------------------------------------------------------------------------------------------------------
# Export and in-process sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_student_export_has_the_guidance_input_its_card_and_int8_calibrated_with_w(student_export):
    export = load_export(student_export)
    card = export.card
    assert (card.kind, card.guidance_range, card.distilled_steps) == (STUDENT, STUDENT_GUIDANCE, STUDENT_STEPS)
    graph = export.graphs[STUDENT_UNET]
    assert [(t.name, t.dtype, t.shape, t.role) for t in graph.spec.inputs][-1] == ("guidance", "float32", (), GUIDANCE)
    assert set(graph.files) == {"fp32", "int8"}
    with np.load(student_export / graph.parity_inputs) as parity:  # the precision gate's batch feeds w too
        w = parity["guidance"]
    assert w.min() >= STUDENT_GUIDANCE[0] and w.max() <= STUDENT_GUIDANCE[1] and w.std() > 0


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_draws_with_one_row_per_image_per_step_what_its_torch_module_draws(student_client, student_checkpoint,
                                                                                   steps):
    kw = dict(classes=CLASSES, steps=steps, guidance=3.0, seed=1, raw=True, model=STUDENT)
    images = student_client.sample(**kw)
    stats = student_client.last_stats
    assert (stats.calls, stats.rows) == (steps, steps * len(CLASSES))  # no [cond; null] pair at guidance 3
    with TridentClient.from_torch([student_checkpoint]) as torch_client:  # the PyTorch module as the oracle
        np.testing.assert_allclose(images, torch_client.sample(**kw), rtol=0, atol=1e-4)


def test_student_defaults_to_ddim_on_the_trailing_grid_at_its_distilled_steps_and_w_changes_what_it_draws(
        student_client):
    default = student_client.sample(CLASSES, seed=2, raw=True, model=STUDENT)
    assert student_client.last_stats.calls == STUDENT_STEPS
    explicit = student_client.sample(CLASSES, sampler="ddim", steps=STUDENT_STEPS, spacing="trailing", seed=2,
                                     raw=True, model=STUDENT)
    np.testing.assert_array_equal(default, explicit)
    stronger = student_client.sample(CLASSES, guidance=5.0, seed=2, raw=True, model=STUDENT)
    assert np.abs(stronger - default).max() > 1e-3  # w reaches the network


def test_student_refuses_a_guidance_outside_its_range_in_process_naming_the_range(student_client):
    with pytest.raises(InvalidArgumentError, match=r"guidance must be in \[1, 5\] for this student.*got 7"):
        student_client.sample(CLASSES, guidance=7.0, model=STUDENT)
    spec = student_client.backend.specs[STUDENT_UNET]
    feed = spec.feed({"noisy_sample": np.zeros((2, 1, 28, 28)), "timestep": np.zeros(2), "class_label": np.zeros(2),
                      "guidance": np.array([2.0, 9.0])})
    with pytest.raises(InvalidArgumentError, match=r"input 'guidance' must be in \[1.0, 5.0\] .*got 9.0 at row 1"):
        student_client.backend.run(STUDENT_UNET, feed)
    with pytest.raises(InvalidArgumentError, match="model must be one of"):
        student_client.sample(CLASSES, model="student")


# ---------------------------------------------------------------------------------------------------------------------
# Served beside the teacher: embedded flavour
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(export_dirs, student_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("student_embedded") / "model_repository"
    build_repository([export_dirs["diffusion"], student_export], repo, intra_op_threads=1, shard_limit=0)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield repo, server


@pytest.fixture(scope="module")
def teacher_client(export_dirs):
    with TridentClient.from_onnx([export_dirs["diffusion"]], threads=1) as client:
        yield client


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.server
def test_embedded_repository_serves_the_student_under_its_own_names_beside_the_teacher(embedded):
    repo, _ = embedded
    marker = json.loads((repo / MARKER).read_text())
    student_models = {STUDENT_UNET, STUDENT_SAMPLING_LOOP, STUDENT_SAMPLING_LOOP_STREAM}
    assert student_models | {UNET, SAMPLING_LOOP, "diffusion_sampler_stream"} == set(marker["models"])
    runtime: GraphRuntime = served_runtime(repo / STUDENT_UNET)
    guidance = runtime.ranges["guidance"]
    assert (guidance.low, guidance.high, guidance.closed) == (*STUDENT_GUIDANCE, True)
    # a warm-up with guidance 0 would be refused: it reads the range's low end from the model's warmup/ folder
    files = sorted(p.name for p in (repo / STUDENT_UNET / "warmup").iterdir())
    assert files == ["guidance_x1"]
    assert np.frombuffer((repo / STUDENT_UNET / "warmup" / "guidance_x1").read_bytes(), np.float32).tolist() == [1.0]
    assert not (repo / UNET / "warmup").exists()  # the teacher's configuration is what it was
    text = (repo / STUDENT_SAMPLING_LOOP / "config.pbtxt").read_text()
    assert P.MAX_IMAGES in text and '\\"guidance_range\\":[1.0,5.0]' in text


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sync_sdk_samples_the_student_with_every_loop_as_in_process_and_the_teacher_unchanged(
        embedded, student_client, teacher_client, protocol):
    _, server = embedded
    kw = dict(classes=CLASSES, steps=2, guidance=2.5, seed=4, raw=True, model=STUDENT)
    want = student_client.sample(**kw)
    with TridentClient.connect(_url(server, protocol), protocol) as client:
        assert client.card(STUDENT) == student_client.card(STUDENT)
        np.testing.assert_allclose(client.sample(**kw), want, rtol=0, atol=TOLERANCE)
        assert (client.last_stats.calls, client.last_stats.rows) == (2, 2 * len(CLASSES))
        np.testing.assert_allclose(client.sample(**kw, loop="server"), want, rtol=0, atol=TOLERANCE)
        interval = dict(kw, guidance_t_min=600)  # of the 2 trailing steps (t = 999, 499) the second gets w = 1
        want_interval = student_client.sample(**interval)
        assert np.abs(want_interval - want).max() > 1e-3
        np.testing.assert_allclose(client.sample(**interval, loop="server"), want_interval, rtol=0, atol=TOLERANCE)
        if protocol == "grpc":  # the streamed loop of the student's own streaming model
            steps = []
            streamed = client.sample(**kw, loop="server", callback=lambda i, *rest: steps.append(i))
            np.testing.assert_allclose(streamed, want, rtol=0, atol=TOLERANCE)
            assert steps == [0, 1]
        teacher = dict(classes=["coat"], steps=2, guidance=3.0, seed=0, raw=True)  # the teacher's names, as before
        np.testing.assert_allclose(client.sample(**teacher), teacher_client.sample(**teacher), rtol=0, atol=TOLERANCE)
        assert client.last_stats.rows == 2 * 2  # [cond; null] per step: the teacher's guidance is unchanged


@pytest.mark.server
def test_asyncio_sdk_samples_the_student_with_every_loop_as_in_process(embedded, student_client):
    _, server = embedded
    kw = dict(classes=CLASSES, steps=1, guidance=4.0, seed=5, raw=True, model=STUDENT)
    want = student_client.sample(**kw)
    interval = dict(kw, steps=2, guidance_t_min=600)  # w = 1 at the second step (t = 499)
    want_interval = student_client.sample(**interval)

    async def draw():
        async with AsyncTridentClient.connect(server.grpc_url, "grpc") as client:
            steps = []
            return await asyncio.gather(client.sample(**kw), client.sample(**kw, loop="server"),
                                        client.sample(**kw, loop="server", callback=lambda i, *r: steps.append(i)),
                                        client.sample(**interval),
                                        client.sample(**interval, loop="server", callback=lambda *r: None)), steps

    drawn, steps = asyncio.run(draw())
    for images in drawn[:3]:
        np.testing.assert_allclose(images, want, rtol=0, atol=TOLERANCE)
    for images in drawn[3:]:  # the streamed loop took the interval too
        np.testing.assert_allclose(images, want_interval, rtol=0, atol=TOLERANCE)
    assert steps == [0]


def _raw_infer(protocol: str, url: str, model: str, arrays: dict[str, tuple[np.ndarray, str]]):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    inputs = []
    for name, (array, datatype) in arrays.items():
        entry = module.InferInput(name, list(array.shape), datatype)
        entry.set_data_from_numpy(array)
        inputs.append(entry)
    client = module.InferenceServerClient(url)
    try:
        return client.infer(model, inputs)
    finally:
        client.close()


def _unet_request(w: float) -> dict:
    return {"sample": (np.zeros((2, 1, 28, 28), np.float32), "FP32"), "timestep": (np.zeros((2, 1), np.float32), "FP32"),
            "class_label": (np.zeros((2, 1), np.int64), "INT64"),
            "guidance": (np.array([[2.0], [w]], np.float32), "FP32")}


def _loop_request(w: float) -> dict:
    config = sampling.SamplingConfig(sampler="ddim", steps=1, guidance=min(w, sampling.MAX_GUIDANCE))
    feed = sampling.loop_request(config, np.array([1, 2]), seed=0, max_seconds=0.0, stream=False)
    feed["guidance"] = np.array([w], np.float64)
    dtypes = {"int64": "INT64", "float64": "FP64", "object": "BYTES"}
    return {name: (a, dtypes[a.dtype.name]) for name, a in feed.items()}


def _status(protocol: str) -> str:
    import grpc

    return "400" if protocol == "http" else str(grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_out_of_range_guidance_is_a_4xx_naming_the_input_and_range_and_the_server_keeps_serving(embedded, protocol):
    from tritonclient.utils import InferenceServerException

    _, server = embedded
    url = _url(server, protocol)
    with pytest.raises(InferenceServerException) as refused:
        _raw_infer(protocol, url, STUDENT_UNET, _unet_request(9.0))
    assert refused.value.status() == _status(protocol), refused.value
    assert "input 'guidance' must be in [1.0, 5.0]" in refused.value.message() and "got 9.0 at row 1" in \
        refused.value.message(), refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        _raw_infer(protocol, url, STUDENT_SAMPLING_LOOP, _loop_request(0.5))
    assert refused.value.status() == _status(protocol), refused.value
    assert f"{STUDENT_SAMPLING_LOOP}: guidance must be in [1, 5]" in refused.value.message(), refused.value.message()
    result = _raw_infer(protocol, url, STUDENT_UNET, _unet_request(5.0))  # the edge of the range is in it
    assert result.as_numpy("noise_pred").shape == (2, 1, 28, 28)
    assert _raw_infer(protocol, url, STUDENT_SAMPLING_LOOP, _loop_request(1.0)).as_numpy("image").shape == (2, 1, 28, 28)
    with TridentClient.connect(url, protocol) as client:  # the SDK's own check names it before any request
        with pytest.raises(InvalidArgumentError, match=r"guidance must be in \[1, 5\]"):
            client.sample(CLASSES, guidance=6.0, model=STUDENT, loop="server")


# ---------------------------------------------------------------------------------------------------------------------
# Container flavour (per-bucket models on the Python backend, as tests serve it)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(student_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("student_container") / "model_repository"
    build_repository([student_export], repo, flavour="container", bucket_backend="python", intra_op_threads=1)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield repo, server


@pytest.mark.server
def test_container_flavour_serves_the_student_with_every_loop_and_refuses_out_of_range_guidance(container,
                                                                                               student_client):
    from tritonclient.utils import InferenceServerException

    repo, server = container
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {
        STUDENT_UNET, f"{STUDENT_UNET}_b1", f"{STUDENT_UNET}_b4", STUDENT_SAMPLING_LOOP, STUDENT_SAMPLING_LOOP_STREAM}
    kw = dict(classes=CLASSES, steps=2, guidance=1.5, seed=6, raw=True, model=STUDENT)
    want = student_client.sample(**kw)
    with TridentClient.connect(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.sample(**kw), want, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(client.sample(**kw, loop="server"), want, rtol=0, atol=TOLERANCE)
        steps = []
        streamed = client.sample(**kw, loop="server", callback=lambda i, *rest: steps.append(i))
        np.testing.assert_allclose(streamed, want, rtol=0, atol=TOLERANCE)
        assert steps == [0, 1]
    for protocol in ("http", "grpc"):
        with pytest.raises(InferenceServerException) as refused:
            _raw_infer(protocol, _url(server, protocol), STUDENT_UNET, _unet_request(9.0))  # the front model's check
        assert refused.value.status() == _status(protocol) and "input 'guidance' must be in [1.0, 5.0]" in \
            refused.value.message(), refused.value
    with TridentClient.connect(server.http_url, "http") as client:  # still serving
        np.testing.assert_allclose(client.sample(**kw), want, rtol=0, atol=TOLERANCE)


@pytest.mark.server
def test_cli_draws_the_student_at_its_distilled_steps_with_one_call_per_step(embedded, tmp_path, capsys):
    from trident.serving.client.cli import main

    _, server = embedded
    out = tmp_path / "student.png"
    assert main(["--model", STUDENT, "--class", "bag", "--n", "2", "--url", server.http_url, "--out", str(out)]) == 0
    assert f"{STUDENT_STEPS} model calls ({STUDENT_STEPS} steps)" in capsys.readouterr().out and out.is_file()
    assert main(["--model", STUDENT, "--guidance", "9", "--url", server.http_url, "--out", str(out)]) == 2
    assert "guidance must be in [1, 5]" in capsys.readouterr().err


@pytest.mark.server
def test_evaluate_across_seeds_takes_the_ratio_to_the_teacher_seed_by_seed(embedded, tmp_path):
    """`trident evaluate --seeds 0,1 --against diffusion`: each seed's figures are what one measurement at that seed
    gives, the ratio and the difference are taken within a seed, and the spread is over the seeds."""
    from pathlib import Path

    from trident.benchmarks.evaluate import Clients, Setting, across_seeds, measure
    from trident.training import quality as q

    _, server = embedded
    classifier = Path(__file__).resolve().parents[1] / "checkpoints" / "classifier" / "model.safetensors"
    ref = q.RealReference.build(q.FeatureNet(classifier), test_limit=2000, train_limit=2000, cache_dir=tmp_path / "q")
    # the teacher guided at t >= 500 only: of its 4 steps, those below send one row per image, so 4 < nfe < 8
    student, teacher = (Setting(STUDENT, "ddim", STUDENT_STEPS, 3.0),
                        Setting("diffusion", "dpmpp-2m", 4, 3.0, guidance_t_min=500))
    clients = Clients({}, tmp_path, url=server.http_url)
    try:
        r = across_seeds(clients, student, ref, 20, [0, 1], batch=20, against=teacher)
        alone, other = (measure(clients, s, ref, 20, seed=1, batch=20) for s in (student, teacher))
    finally:
        clients.close()
    assert r["seeds"] == [0, 1] and [row["seed"] for row in r["per_seed"]] == [0, 1] and r["n"] == 20
    row = r["per_seed"][1]
    assert row["fd"] == pytest.approx(alone["fd"]) and row["against"]["fd"] == pytest.approx(other["fd"])
    assert row["fd_ratio"] == pytest.approx(alone["fd"] / other["fd"])
    assert row["agreement_diff"] == pytest.approx(alone["agreement"] - other["agreement"])
    assert row["fd_floor"] == pytest.approx(ref.floor(20, 1))
    assert r["per_seed"][0]["fd"] != row["fd"]  # another seed: other noise, other real images to compare with
    for key in ("fd", "agreement", "recall", "fd_ratio", "agreement_diff"):
        values = [x[key] for x in r["per_seed"]]
        assert r["spread"][key] == pytest.approx({"mean": np.mean(values), "min": min(values), "max": max(values)})
    assert r["against"]["label"] == teacher.label and r["against"]["spread"]["fd"]["max"] == pytest.approx(
        max(x["against"]["fd"] for x in r["per_seed"]))
    assert 4 < other["nfe"] < 8 and r["against"]["nfe"] == other["nfe"]  # the rows sent, not 2 x steps
    assert r["nfe"] == alone["nfe"] == STUDENT_STEPS


@pytest.mark.server
def test_evaluate_draws_the_student_at_each_step_count_with_one_row_per_image_per_step(embedded, student_checkpoint,
                                                                                       tmp_path):
    """`trident evaluate`'s code path for a student (the figures themselves come from the harness on a real one)."""
    from trident.benchmarks.evaluate import Clients, Setting, default_sampling, draw, sweep_settings

    _, server = embedded
    assert default_sampling(STUDENT, student_checkpoint) == {"sampler": "ddim", "steps": STUDENT_STEPS,
                                                            "spacing": "trailing"}
    student = [s for s in sweep_settings(include_ddpm_1000=False, student=True) if s.model == STUDENT]
    assert sorted({s.steps for s in student}) == [1, 2, 4, 8] and {s.guidance for s in student} == {1.5, 3.0}
    assert [s.nfe for s in student[:4]] == [1, 2, 4, 8] and student[0].label == "student ddim-1 g1.5"
    clients = Clients({}, tmp_path, url=server.http_url)
    try:
        for steps in (1, 2, 4, 8):
            images, labels = draw(clients, Setting(STUDENT, "ddim", steps, 3.0), n=4, batch=4)
            assert images.shape == (4, 1, 28, 28) and np.isfinite(images).all() and labels.tolist() == [0, 1, 2, 3]
            assert clients.get(STUDENT).last_stats.rows == 4 * steps
        interval = Setting(STUDENT, "ddim", 4, 3.0, guidance_t_min=300)  # w = 1 at its last step (t = 249)
        assert interval.label == "student ddim-4 g3 t>=300"
        rows: list[int] = []
        images, _ = draw(clients, interval, n=4, batch=4, rows=rows)
        assert rows == [4 * 4]  # still one row per image per step
        assert np.abs(images - draw(clients, Setting(STUDENT, "ddim", 4, 3.0), n=4, batch=4)[0]).max() > 1e-3
    finally:
        clients.close()

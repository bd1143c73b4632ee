"""A server exposed beyond loopback (serving/server/launcher.py admin_lock, GrpcTls; the SDK's TLS): on a real
tritonserver bound to the wildcard address (reached over 127.0.0.1), with the admin APIs behind a key and gRPC over
TLS with certificates made here by openssl."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import settled

from trident.serving.client import TLS, TridentClient
from trident.serving.errors import InvalidArgumentError, ServerUnreachableError
from trident.serving.server.launcher import (ADMIN_APIS, ADMIN_KEY_HEADER, MAX_INPUT_OPTION, GrpcTls, ServerConfig,
                                              TritonServer, admin_lock, find_tritonserver, repository_request_limit,
                                              tritonserver_options)
from trident.serving.server.request_limits import HEADER_BYTES, JSON_BYTES_PER_ELEMENT

KEY = "test-admin-key-0123456789"
GRPC_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"  # Triton's gRPC prefix for a restricted-protocol key


# ---------------------------------------------------------------------------------------------------------------------
# admin_lock: what `trident serve` locks, from which key (no server needed)
# ---------------------------------------------------------------------------------------------------------------------

def test_admin_lock_locks_off_loopback_with_a_new_private_key_when_none_is_given(tmp_path):
    generated = tmp_path / "admin-key"
    lock = admin_lock("0.0.0.0", None, None, False, generated)
    assert lock["restricted_apis"] == ADMIN_APIS and lock["admin_key"] == generated.read_text().strip()
    assert stat.S_IMODE(generated.stat().st_mode) == 0o600 and len(lock["admin_key"]) >= 32
    assert any(str(generated) in note for note in lock["notes"])
    assert "inference" not in ADMIN_APIS and "model-config" not in ADMIN_APIS and "health" not in ADMIN_APIS


def test_admin_lock_takes_the_key_from_a_file_or_the_environment_and_opens_only_when_asked(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert admin_lock("10.1.2.3", key_file, "ignored-because-file-wins", False)["admin_key"] == KEY
    assert admin_lock("::", None, KEY, False)["admin_key"] == KEY
    assert admin_lock("127.0.0.1", None, None, False)["restricted_apis"] == ()  # loopback: open unless a key is given
    assert admin_lock("127.0.0.1", key_file, None, False)["restricted_apis"] == ADMIN_APIS
    opened = admin_lock("0.0.0.0", key_file, None, True)
    assert opened["restricted_apis"] == () and opened["notes"][0].startswith("WARNING")
    with pytest.raises(ValueError, match="at least 16 characters"):
        ServerConfig(Path("/m"), restricted_apis=ADMIN_APIS, admin_key="short")
    with pytest.raises(ValueError, match="not Triton APIs"):
        ServerConfig(Path("/m"), restricted_apis=("everything",), admin_key=KEY)
    config = ServerConfig(Path("/m"), restricted_apis=ADMIN_APIS, admin_key=KEY)
    assert KEY not in repr(config)  # the key stays out of logs and tracebacks that print the config


def test_serve_refuses_half_a_tls_configuration_before_starting(tmp_path, capsys):
    from trident.serving.server.launcher import main

    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert main(["--model-repository", str(tmp_path), "--grpc-tls-cert", str(cert)]) == 2
    assert "needs both --grpc-tls-cert and --grpc-tls-key" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# A real server: wildcard bind, admin APIs locked, gRPC over TLS
# ---------------------------------------------------------------------------------------------------------------------

def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost (openssl, one day)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = directory
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=trident-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "1", "-extfile", "san.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "1",
        "-subj", "/CN=someone-else")
    return {name: d / f"{name}.pem" for name in ("ca", "server", "other")} | {"server_key": d / "server.key"}


@pytest.fixture(scope="module")
def exposed(export_dirs, tmp_path_factory):
    from trident.serving.server.repository import build_repository

    root = tmp_path_factory.mktemp("exposed")
    certs = _certificates(root)
    repository = root / "repository"
    build_repository([export_dirs["gan"]], repository, shard_limit=0)
    config = ServerConfig(repository, host="0.0.0.0", http_port=0, grpc_port=0, metrics_port=0,
                          restricted_apis=ADMIN_APIS, admin_key=KEY,
                          grpc_tls=GrpcTls(certs["server"], certs["server_key"]),
                          max_input_bytes=repository_request_limit(repository))
    with TritonServer(config) as server:
        yield server, certs


def _http(server, method: str, path: str, body: dict | None = None, key: bool = False) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method,
                                     headers={ADMIN_KEY_HEADER: KEY} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


# One call of each locked API; each must be refused without the key and served with it.
HTTP_ADMIN_CALLS = {
    "statistics": ("GET", "/v2/models/stats", None),
    "shared-memory (system, register)": ("POST", "/v2/systemsharedmemory/region/trident_test/register",
                                         {"key": "/trident_test_region", "offset": 0, "byte_size": 64}),
    "shared-memory (cuda, status)": ("GET", "/v2/cudasharedmemory/status", None),
    "model-repository (index)": ("POST", "/v2/repository/index", {}),
    "model-repository (unload)": ("POST", "/v2/repository/models/gan_generator/unload", {}),
    "logging": ("GET", "/v2/logging", None),
    "trace": ("GET", "/v2/trace/setting", None),
}


def _grpc_admin_calls(client, region: str):
    return {
        "statistics": lambda h: client.get_inference_statistics(headers=h),
        "shared-memory (system, register)": lambda h: client.register_system_shared_memory(
            "trident_test", region, 64, headers=h),
        "shared-memory (cuda, status)": lambda h: client.get_cuda_shared_memory_status(headers=h),
        "model-repository (index)": lambda h: client.get_model_repository_index(headers=h),
        "logging": lambda h: client.get_log_settings(headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
    }


@pytest.mark.server
def test_exposed_server_refuses_every_admin_call_without_the_key_on_both_protocols(exposed, export_dirs):
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    server, certs = exposed
    region = shm.create_shared_memory_region("trident_test", "/trident_test_region", 64)  # a real region to register
    try:
        accepted = [name for name, call in HTTP_ADMIN_CALLS.items() if _http(server, *call) < 400]
        client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True,
                                                  root_certificates=str(certs["ca"]))
        for name, call in _grpc_admin_calls(client, "/trident_test_region").items():
            try:
                call(None)
                accepted.append(f"grpc {name}")
            except Exception as e:
                assert "restricted" in str(e), (name, e)
        assert accepted == [], f"served without the key: {accepted}"
        # the key opens them (the unload is left out: it would take the model away from the other checks)
        opened = [name for name, call in HTTP_ADMIN_CALLS.items()
                  if "unload" not in name and "register" not in name and _http(server, *call, key=True) >= 400]
        for name, call in _grpc_admin_calls(client, "/trident_test_region").items():
            try:
                call({GRPC_KEY_HEADER: KEY})
            except Exception as e:
                opened.append(f"grpc {name}: {e}")
        client.unregister_system_shared_memory("trident_test", headers={GRPC_KEY_HEADER: KEY})
        assert opened == [], f"refused with the key: {opened}"
    finally:
        shm.destroy_shared_memory_region(region)
    # inference (and the SDK's handshake, which reads the model cards) works without any key, on both protocols
    want = TridentClient.from_onnx([export_dirs["gan"]]).generate([1, 7, 3], seed=5, raw=True)
    with TridentClient.connect(server.http_url, "http") as http:
        np.testing.assert_allclose(http.generate([1, 7, 3], seed=5, raw=True), want, rtol=0, atol=1e-5)
    with TridentClient.connect(server.grpc_url, "grpc", tls=TLS(ca=certs["ca"])) as grpc:
        np.testing.assert_allclose(grpc.generate([1, 7, 3], seed=5, raw=True), want, rtol=0, atol=1e-5)


@pytest.mark.server
def test_tls_server_serves_a_client_that_trusts_its_ca_and_refuses_one_that_does_not(exposed):
    server, certs = exposed
    with pytest.raises(ServerUnreachableError):
        TridentClient.connect(server.grpc_url, "grpc", timeout_s=5, retries=0)  # plaintext against TLS
    with pytest.raises(ServerUnreachableError):
        TridentClient.connect(server.grpc_url, "grpc", timeout_s=5, retries=0, tls=TLS(ca=certs["other"]))
    with TridentClient.connect(server.grpc_url, "grpc", tls=TLS(ca=certs["ca"])) as client:
        assert client.card("gan").kind == "gan"
    with pytest.raises(InvalidArgumentError, match="Triton's HTTP endpoint has no TLS"):
        TridentClient.connect(server.http_url, "http", tls=TLS(ca=certs["ca"]))
    with pytest.raises(InvalidArgumentError, match="needs its key"):
        TLS(ca=certs["ca"], cert=certs["server"])


# ---------------------------------------------------------------------------------------------------------------------
# Bounded requests: the largest valid request, and what Triton answers to requests it refuses
# ---------------------------------------------------------------------------------------------------------------------

def test_the_recorded_request_limit_is_the_biggest_batch_of_the_biggest_graph(export_dirs, tmp_path):
    from trident.serving.server.repository import build_repository

    build_repository([export_dirs["gan"], export_dirs["vae"]], tmp_path / "repo", shard_limit=0, server_loop=False)
    record = json.loads((tmp_path / "repo" / "trident_repository.json").read_text())["largest_request"]
    meta = json.loads((export_dirs["gan"] / "metadata.json").read_text())
    rows = max(meta["card"]["buckets"]["gan_generator"])
    latent = meta["card"]["latent_dim"]
    # the generator (latent + label per row) outweighs the decoder (latent) and the encoder (an image: 784 floats per
    # row, but JSON counts elements: 784 > 65, so the encoder is the largest as JSON text)
    encoder_elements = rows * 28 * 28
    assert record["model"] == "vae_encoder" and record["rows"] == rows
    assert record["binary_bytes"] == rows * 28 * 28 * 4 + HEADER_BYTES
    assert record["json_bytes"] == encoder_elements * JSON_BYTES_PER_ELEMENT + HEADER_BYTES
    assert record["limit_bytes"] >= record["json_bytes"] and record["limit_bytes"] % (1 << 20) == 0
    assert latent + 1 < 28 * 28
    assert repository_request_limit(tmp_path / "repo") == record["limit_bytes"]
    assert repository_request_limit(tmp_path / "nowhere") is None
    config = ServerConfig(tmp_path / "repo", max_input_bytes=record["limit_bytes"])
    assert config.to_args()[config.to_args().index(MAX_INPUT_OPTION) + 1] == str(record["limit_bytes"])
    with pytest.raises(ValueError, match="max_input_bytes must be >= 1"):
        ServerConfig(tmp_path / "repo", max_input_bytes=0)


@pytest.mark.server
def test_a_tritonserver_without_the_size_option_still_starts_and_says_it_reads_bodies_whole(exposed):
    server, _ = exposed
    binary, _, env = find_tritonserver()
    supported = MAX_INPUT_OPTION in tritonserver_options(binary, tuple(sorted(env.items())))
    assert "--http-restricted-api" in tritonserver_options(binary, tuple(sorted(env.items())))  # the help was read
    assert server.requested_config.max_input_bytes is not None
    assert (server.config.max_input_bytes is not None) == supported
    assert any(MAX_INPUT_OPTION in note for note in server.notes) == (not supported)


# What Triton 2.51 answers (README "Exposing the server" lists the same): a batch over the largest bucket and a
# missing input are refused with 400 by Triton before any model runs, and what the models check (NaN, a class out of
# range) with 400 by the model before it computes anything; what Triton's own JSON parser cannot read answers 500,
# and no option or model configuration of 2.51 changes that.
HTTP_REFUSALS = {
    "more rows than the largest batch": (400, "batch-size must be <="),
    "a missing input": (400, "expected 2 inputs but got 1"),
    "not JSON": (500, "failed to parse the request JSON"),
    "a shape that disagrees with the data": (500, "Shape does not match"),
    "a datatype that disagrees with the data": (500, "Unable to parse 'data'"),
    "NaN": (400, "holds NaN or Inf"),  # from here on the model's own checks
    "a class out of range": (400, "must be in [0, 10)"),
}


def _gan_request(rows: int, **change) -> bytes:
    inputs = [{"name": "latent", "shape": [rows, 64], "datatype": "FP32", "data": [[0.0] * 64] * rows},
              {"name": "class_label", "shape": [rows, 1], "datatype": "INT64", "data": [[1]] * rows}]
    for name, fields in change.items():
        if fields is None:
            inputs = [t for t in inputs if t["name"] != name]
        else:
            next(t for t in inputs if t["name"] == name).update(fields)
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.server
def test_refused_requests_get_the_documented_status_before_any_model_runs_and_the_server_serves_on(exposed):
    import tritonclient.grpc as grpcclient

    server, certs = exposed
    rows = json.loads((server.config.model_repository / "trident_repository.json").read_text())[
        "largest_request"]["rows"]
    bodies = {
        "more rows than the largest batch": _gan_request(100 * rows),
        "a missing input": _gan_request(1, class_label=None),
        "not JSON": b"this is not JSON",
        "a shape that disagrees with the data": _gan_request(2, latent={"shape": [3, 64]}),
        "a datatype that disagrees with the data": _gan_request(1, latent={"datatype": "INT8"}),
        "NaN": _gan_request(1).replace(b"0.0", b"NaN", 1),
        "a class out of range": _gan_request(1, class_label={"data": [[99]]}),
    }
    client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(certs["ca"]))

    def executions() -> int:
        stats = client.get_inference_statistics("gan_generator", headers={GRPC_KEY_HEADER: KEY}, as_json=True)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    before = executions()
    answers, reached = {}, {}
    for name, body in bodies.items():
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/gan_generator/infer", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answers[name] = (answer.status, "")
        except urllib.error.HTTPError as e:
            answers[name] = (e.code, e.read().decode())
        reached[name] = settled(executions, timeout_s=2.0) - before
    got = {name: (status, expected in text) for (name, (status, text)), (_, expected)
           in zip(answers.items(), HTTP_REFUSALS.values())}
    assert got == {name: (status, True) for name, (status, _) in HTTP_REFUSALS.items()}, answers
    # gRPC: the same oversized batch is INVALID_ARGUMENT
    latent = grpcclient.InferInput("latent", [100 * rows, 64], "FP32")
    latent.set_data_from_numpy(np.zeros((100 * rows, 64), np.float32))
    label = grpcclient.InferInput("class_label", [100 * rows, 1], "INT64")
    label.set_data_from_numpy(np.ones((100 * rows, 1), np.int64))
    with pytest.raises(Exception, match="INVALID_ARGUMENT.*batch-size must be <="):
        client.infer("gan_generator", [latent, label])
    model_checks = ("NaN", "a class out of range")
    assert reached == {name: 2 if name == "a class out of range" else 1 if name == "NaN" else 0 for name in bodies}, \
        f"requests that reached the model (cumulative): {reached}; only {model_checks} should"
    assert settled(executions, timeout_s=2.0) - before == 2, "the oversized gRPC batch reached the model"
    with TridentClient.connect(server.http_url, "http") as http:  # and the server serves on
        assert http.generate([1, 2], seed=0).shape == (2, 28, 28, 1)

"""The Kubernetes files of the container flavour (serving/server/deploy.py, deploy/): no cluster runs here, so what
can be checked is checked: the committed files are what `trident serve deploy` writes, they parse, and every port,
probe path, repository path and image in them is the one the launcher and the builder use."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trident.serving.server import deploy
from trident.serving.server.launcher import HEALTH_READY, ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def _objects(text: str) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(text)}


def test_committed_deploy_files_equal_a_fresh_render():
    for name, text in deploy.render().items():
        assert (ROOT / "deploy" / name).read_text() == text, f"deploy/{name}: run `trident serve deploy` and commit"


def test_deployment_runs_the_launchers_tritonserver_command_on_the_repository_the_image_holds():
    objects = _objects(deploy.render()["kubernetes.yaml"])
    pod = objects[("Deployment", "trident")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert container["command"] == ["tritonserver"]
    assert args == ServerConfig(model_repository=Path("/models"), host="0.0.0.0", exit_timeout_s=30).to_args()
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--model-repository"] == deploy.REPOSITORY_IN_IMAGE
    dockerfile = deploy.render()["Dockerfile"]
    assert re.search(rf"^FROM {re.escape(deploy.TRITON_IMAGE)}$", dockerfile, re.M)
    assert re.search(rf"^COPY {deploy.CONTAINER_REPOSITORY} {deploy.REPOSITORY_IN_IMAGE}$", dockerfile, re.M)
    # the README's build command writes the folder the Dockerfile copies, and runs the same image by hand
    readme = (ROOT / "README.md").read_text()
    assert f"--flavour container --out {deploy.CONTAINER_REPOSITORY}" in readme and deploy.TRITON_IMAGE in readme
    assert flags["--strict-readiness"] == "true" and flags["--model-control-mode"] == "none"
    assert pod["terminationGracePeriodSeconds"] > int(flags["--exit-timeout-secs"])


def test_ports_probes_and_services_agree_with_the_launcher():
    objects = _objects(deploy.render()["kubernetes.yaml"])
    default = ServerConfig(model_repository=Path("/models"))
    container = objects[("Deployment", "trident")]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": default.http_port, "grpc": default.grpc_port, "metrics": default.metrics_port}
    flags = dict(zip(container["args"][::2], container["args"][1::2]))
    assert [int(flags[f"--{k}-port"]) for k in ("http", "grpc", "metrics")] == [ports[k] for k in
                                                                                ("http", "grpc", "metrics")]
    assert container["readinessProbe"]["httpGet"] == {"path": HEALTH_READY, "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == HEALTH_READY
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    labels = objects[("Deployment", "trident")]["spec"]["template"]["metadata"]["labels"]
    for name in ("trident", "trident-headless"):
        service = objects[("Service", name)]["spec"]
        assert service["selector"] == labels
        assert all(p["targetPort"] in ports and p["port"] == ports[p["targetPort"]] for p in service["ports"])
    assert objects[("Service", "trident-headless")]["spec"]["clusterIP"] == "None"
    annotations = objects[("Deployment", "trident")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_autoscaler_scales_the_deployment_on_the_metric_the_adapter_rule_makes():
    objects = _objects(deploy.render()["kubernetes.yaml"])
    hpa = objects[("HorizontalPodAutoscaler", "trident")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "trident"}
    (metric,) = hpa["metrics"]
    rule = yaml.safe_load(deploy.render()["prometheus-adapter.yaml"])["rules"][0]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == deploy.QUEUE_METRIC
    # queue time per request: Triton's cumulative queue microseconds over its successful requests, per pod
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]


def test_deploy_options_are_checked_and_the_cli_writes_every_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="replicas must be in"):
        deploy.DeployOptions(replicas=9, max_replicas=8)
    assert deploy.main(["--out", str(tmp_path), "--gpu", "--replicas", "3", "--model-image", "r/m:1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(deploy.FILES)
    objects = _objects((tmp_path / "kubernetes.yaml").read_text())
    container = objects[("Deployment", "trident")]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == "r/m:1"
    assert deploy.main(["--out", str(tmp_path), "--replicas", "0"]) == 2
    assert "replicas must be in" in capsys.readouterr().err

"""Kubernetes files for the container flavour: `trident serve deploy --out deploy/`.

    trident serve build --flavour container --out model_repository_container   # the repository
    docker build -f deploy/Dockerfile -t REGISTRY/trident-models:TAG .           # it, on the official Triton image
    kubectl apply -f deploy/kubernetes.yaml                                      # Deployment, Services, HPA

Why these choices:
- The official Triton image (TRITON_IMAGE), which the container flavour is built for, with the model repository
  baked into an image layer on top (deploy/Dockerfile): the repository is small, versioned with the image tag, and
  every replica starts from the same bytes with no volume to provision or keep in sync. (A PersistentVolume or an init
  container that downloads the repository would add credentials and a second place that can drift.)
- A plain Deployment rather than a KServe InferenceService: it needs nothing installed in the cluster but the
  Prometheus adapter for the autoscaler, and every field below is one an operator can read and change.
- Probes on Triton's own health endpoints: readiness on /v2/health/ready (strict readiness: every model loaded),
  liveness on /v2/health/live, and a startup probe that gives the models time to load.
- Two Services: `trident` (ClusterIP) for clients behind one address, and `trident-headless` (clusterIP None) whose
  DNS name resolves to every ready pod, for clients that balance per request themselves (gRPC round_robin).
- A HorizontalPodAutoscaler on the queue time per request (Triton's nv_inference_queue_duration_us over
  nv_inference_request_success, per pod, through the Prometheus adapter rule in prometheus-adapter.yaml). Queue time
  grows only when requests wait for a busy instance, so it tracks load directly; CPU utilisation saturates with one
  large batch already and compute time per request moves with batch size, not with load.

The tritonserver command line is the launcher's own (ServerConfig.to_args), so `trident serve` and the pods run
Triton with the same settings. Build data, then write: render() returns the files' text, write() writes them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_file
from .launcher import HEALTH_READY, ServerConfig

# The official Triton container release the container flavour targets: 24.10 ships Triton 2.51, the tritonserver that
# the nvidia-pytriton wheel bundles for `trident serve`.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
REPOSITORY_IN_IMAGE = "/models"         # where deploy/Dockerfile puts the model repository
CONTAINER_REPOSITORY = "model_repository_container"  # `trident serve build --flavour container --out` in the README
HEALTH_LIVE = "/v2/health/live"
QUEUE_METRIC = "trident_queue_time_us_per_request"  # the Prometheus adapter's name for the HPA's metric
FILES = ("kubernetes.yaml", "prometheus-adapter.yaml", "Dockerfile")


@dataclass(frozen=True)
class DeployOptions:
    """What an operator chooses; the defaults are what `trident serve deploy` writes into deploy/."""

    name: str = "trident"
    model_image: str = "registry.example.com/trident-models:latest"
    replicas: int = 2
    max_replicas: int = 8
    queue_us_target: int = 20000     # average queue time per request above which the HPA adds replicas
    cpu: str = "2"
    memory: str = "2Gi"
    memory_limit: str = "4Gi"
    gpu: bool = False                # one nvidia.com/gpu per pod (repository built with --gpu)
    exit_timeout_s: int = 30         # Triton's drain on SIGTERM; the pod's grace period is a little longer

    def __post_init__(self):
        if not 1 <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas must be in [1, max_replicas={self.max_replicas}], got {self.replicas}")
        if self.queue_us_target <= 0:
            raise ValueError(f"queue_us_target must be > 0, got {self.queue_us_target}")


def server_config(options: DeployOptions) -> ServerConfig:
    """The launcher's configuration of the server in each pod: every interface (the pod's), the usual ports."""
    return ServerConfig(model_repository=Path(REPOSITORY_IN_IMAGE), host="0.0.0.0",
                        exit_timeout_s=options.exit_timeout_s)


def manifests(options: DeployOptions = DeployOptions()) -> list[dict]:
    """The Kubernetes objects: Deployment, Service, headless Service, HorizontalPodAutoscaler."""
    server = server_config(options)
    name = options.name
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "triton"}
    ports = [{"name": "http", "containerPort": server.http_port}, {"name": "grpc", "containerPort": server.grpc_port},
             {"name": "metrics", "containerPort": server.metrics_port}]
    resources = {"requests": {"cpu": options.cpu, "memory": options.memory},
                 "limits": {"memory": options.memory_limit}}
    if options.gpu:
        resources["limits"]["nvidia.com/gpu"] = 1
    container = {
        "name": "triton",
        "image": options.model_image,
        "command": ["tritonserver"],
        "args": server.to_args(),
        "ports": ports,
        "resources": resources,
        "readinessProbe": {"httpGet": {"path": HEALTH_READY, "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": HEALTH_LIVE, "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": HEALTH_READY, "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": 60},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(server.metrics_port),
                                             "prometheus.io/path": "/metrics"}},
                "spec": {"terminationGracePeriodSeconds": options.exit_timeout_s + 10,
                         "containers": [container]},
            },
        },
    }
    service_ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in ports]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"selector": labels, "ports": service_ports}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{name}-headless", "labels": labels},
                "spec": {"clusterIP": "None", "selector": labels,
                         "ports": [p for p in service_ports if p["name"] in ("http", "grpc")]}}
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": options.replicas, "maxReplicas": options.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                                  "target": {"type": "AverageValue",
                                                             "averageValue": str(options.queue_us_target)}}}],
        },
    }
    return [deployment, service, headless, hpa]


def adapter_rules() -> dict:
    """The Prometheus adapter's rule that turns Triton's counters into QUEUE_METRIC per pod."""
    matchers = "<<.LabelMatchers>>"
    query = (f"sum(rate(nv_inference_queue_duration_us{{{matchers}}}[1m])) by (<<.GroupBy>>) / "
             f"clamp_min(sum(rate(nv_inference_request_success{{{matchers}}}[1m])) by (<<.GroupBy>>), 1e-9)")
    return {"rules": [{
        "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "nv_inference_queue_duration_us", "as": QUEUE_METRIC},
        "metricsQuery": query,
    }]}


def dockerfile() -> str:
    return (f"# The model image: the official Triton container with the container flavour's repository in it.\n"
            f"#   trident serve build --flavour container --out {CONTAINER_REPOSITORY}\n"
            f"#   docker build -f deploy/Dockerfile -t REGISTRY/trident-models:TAG .\n"
            f"FROM {TRITON_IMAGE}\n"
            f"COPY {CONTAINER_REPOSITORY} {REPOSITORY_IN_IMAGE}\n")


def render(options: DeployOptions = DeployOptions()) -> dict[str, str]:
    """{file name: text} of the deploy/ folder."""
    import yaml

    class Dumper(yaml.SafeDumper):  # write shared dicts (the labels) out in full: no &anchors for a reader to chase
        def ignore_aliases(self, data):
            return True

    header = "# Written by `trident serve deploy` (serving/server/deploy.py); re-run it rather than editing by hand.\n"
    return {
        "kubernetes.yaml": header + yaml.dump_all(manifests(options), Dumper=Dumper, sort_keys=False),
        "prometheus-adapter.yaml": header + "# The rule to add to the Prometheus adapter's configuration (rules:).\n"
                                   + yaml.dump(adapter_rules(), Dumper=Dumper, sort_keys=False),
        "Dockerfile": dockerfile(),
    }


def write(out: Path, options: DeployOptions = DeployOptions()) -> list[Path]:
    """Write the files into `out`, each whole or not at all."""
    paths = []
    for name, text in render(options).items():
        with atomic_file(Path(out) / name) as tmp:
            tmp.write_text(text)
        paths.append(Path(out) / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trident serve deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("deploy"))
    defaults = DeployOptions()
    p.add_argument("--name", default=defaults.name)
    p.add_argument("--model-image", default=defaults.model_image, help="the image deploy/Dockerfile builds, pushed")
    p.add_argument("--replicas", type=int, default=defaults.replicas)
    p.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    p.add_argument("--queue-us-target", type=int, default=defaults.queue_us_target)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args(argv)
    try:
        options = DeployOptions(name=args.name, model_image=args.model_image, replicas=args.replicas,
                                max_replicas=args.max_replicas, queue_us_target=args.queue_us_target, gpu=args.gpu)
    except ValueError as e:
        print(f"trident serve deploy: error: {e}", file=sys.stderr)
        return 2
    for path in write(args.out, options):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embedded Triton Inference Server launcher.

Runs a real ``tritonserver`` process over a model repository:

* inside the official Triton container, the ``tritonserver`` on PATH with its own backends;
* elsewhere, the build bundled in the ``nvidia-pytriton`` wheel (Python backend only), whose backend
  directory is prepared once in a cache dir (the stub for the running Python is copied next to
  ``libtriton_python.so``, as pytriton does in ``Triton._prepare_triton_inference_server``).

    with TritonServer(ServerConfig(Path("model_repository"), http_port=0, grpc_port=0, metrics_port=0)) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

Command line (thin wrapper over the same class)::

    python -m trident.serving.server.launcher --model-repository model_repository --free-ports
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TridentError
from .runtime.protocol import STOP_FILE_ENV

__all__ = [
    "ServerConfig",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "main",
]

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
HEALTH_READY = "/v2/health/ready"  # Triton's readiness endpoint: what wait_ready polls and the pods' probes ask
# Triton's APIs that can be put behind a header key (--http-restricted-api / --grpc-restricted-protocol).
RESTRICTABLE_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                     "statistics", "trace", "logging")
# What a non-loopback `trident serve` locks by default: what no client of trident needs. Shared memory would let a
# caller map memory regions of the server's host into requests; model-repository loads and unloads models; trace and
# logging change what the server writes; statistics tell request counts and timings of every model (Prometheus reads
# the metrics port instead). Health, metadata, model-config (the SDK reads the model cards there) and inference stay open.
ADMIN_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
ADMIN_KEY_HEADER = "trident-admin-key"
# Triton's bound on HTTP request bodies (refused with 400 before they are read); newer than the bundled 2.51 and the
# 24.10 container, so the launcher passes it only to a tritonserver whose --help lists it.
MAX_INPUT_OPTION = "--http-max-input-size"
ADMIN_KEY_ENV = "TRIDENT_ADMIN_KEY"


@dataclass(frozen=True)
class GrpcTls:
    """TLS of the gRPC endpoint: the server's certificate and key (PEM files); ca: also require client certificates
    signed by it (mutual TLS). Triton's HTTP endpoint has no TLS: terminate it at a proxy or load balancer."""

    cert: Path
    key: Path
    ca: Path | None = None

    def __post_init__(self):
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"gRPC TLS {name} file {path} does not exist")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")
CONTAINER_BACKEND_DIR = Path("/opt/tritonserver/backends")
SHM_DIR = Path("/dev/shm")
# Set to "bundled" to ignore a tritonserver on PATH, or to a binary path to use that one.
TRITONSERVER_ENV = "TRIDENT_TRITONSERVER"


class TritonServerError(TridentError):
    """tritonserver could not be found, prepared, started, or did not become ready."""


# ---------------------------------------------------------------------------------------------------------------------
# Configuration (data only; nothing here starts a process)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """Command line of one tritonserver process.

    Ports set to 0 are replaced by free ports when the server starts (see ``TritonServer.config``).
    ``log_file`` is where the launcher sends the process' stdout and stderr (Triton's log, plus anything the Python
    backend stubs and ``model.py`` print); it is not passed as ``--log-file``, which would miss both.
    """

    model_repository: Path
    host: str = "127.0.0.1"  # bind address of HTTP, gRPC and metrics; loopback unless asked otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    # "none": every model in the repository is loaded at start and the load/unload API is refused.
    model_control_mode: str = "none"
    strict_readiness: bool = True  # /v2/health/ready only when every model is ready
    allow_metrics: bool = True  # Prometheus endpoint on metrics_port (CPU metrics; GPU ones where there is a GPU)
    exit_on_error: bool = True  # a model that fails to load stops the server instead of leaving it half up
    startup_timeout_s: float = 120.0
    exit_timeout_s: int = 30  # --exit-timeout-secs: how long Triton drains in-flight requests on shutdown
    log_verbose: int = 0
    backend_directory: Path | None = None  # None: the one find_tritonserver() returns
    # Python backend shared-memory prefix; must differ between servers on one machine. None: unique per start.
    shm_region_prefix: str | None = None
    # APIs behind a header key: requests to them must carry `admin_key_header: admin_key` (RESTRICTABLE_APIS)
    restricted_apis: tuple[str, ...] = ()
    admin_key: str | None = field(default=None, repr=False)
    admin_key_header: str = ADMIN_KEY_HEADER
    grpc_tls: GrpcTls | None = None
    # Refuse HTTP request bodies over this many bytes before reading them (--http-max-input-size; the largest valid
    # request of the repository, request_limits.py). Only a tritonserver that has the option gets it (see start()).
    max_input_bytes: int | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {self.model_control_mode!r}"
            )
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535 (0 picks a free port), got {port}")
        if isinstance(self.extra_args, (str, list)):
            raise TypeError("extra_args must be a tuple of separate arguments, e.g. ('--log-info', 'false')")
        unknown = sorted(set(self.restricted_apis) - set(RESTRICTABLE_APIS))
        if unknown:
            raise ValueError(f"restricted_apis {unknown} are not Triton APIs; choose from {RESTRICTABLE_APIS}")
        if self.restricted_apis and not self.admin_key:
            raise ValueError("restricted_apis need an admin_key (the header value that opens them)")
        if self.admin_key is not None and not re.fullmatch(r"[A-Za-z0-9_\-.~]{16,}", self.admin_key):
            raise ValueError("admin_key must be at least 16 characters of letters, digits and -_.~")
        if self.max_input_bytes is not None and self.max_input_bytes < 1:
            raise ValueError(f"max_input_bytes must be >= 1 (None: Triton's default), got {self.max_input_bytes}")

    def to_args(self) -> list[str]:
        """tritonserver arguments (without the binary), in ``--key value`` pairs like pytriton's ``to_args_list``."""
        args = {
            "model-repository": Path(self.model_repository).as_posix(),
            "http-address": self.host,
            "http-port": self.http_port,
            "grpc-address": self.host,
            "grpc-port": self.grpc_port,
            "metrics-address": self.host,
            "metrics-port": self.metrics_port,
            "allow-metrics": self.allow_metrics,
            "model-control-mode": self.model_control_mode,
            "strict-readiness": self.strict_readiness,
            "exit-on-error": self.exit_on_error,
            "exit-timeout-secs": self.exit_timeout_s,
            "log-verbose": self.log_verbose,
            "backend-directory": None if self.backend_directory is None else Path(self.backend_directory).as_posix(),
            "backend-config": None if self.shm_region_prefix is None
            else f"python,shm-region-prefix-name={self.shm_region_prefix}",
        }
        if self.max_input_bytes is not None:
            args[MAX_INPUT_OPTION.lstrip("-")] = self.max_input_bytes
        if self.restricted_apis:
            rule = f"{','.join(self.restricted_apis)}:{self.admin_key_header}={self.admin_key}"
            args.update({"http-restricted-api": rule, "grpc-restricted-protocol": rule})
        if self.grpc_tls is not None:
            tls = self.grpc_tls
            args.update({"grpc-use-ssl": True, "grpc-server-cert": Path(tls.cert).as_posix(),
                         "grpc-server-key": Path(tls.key).as_posix()})
            if tls.ca is not None:
                args.update({"grpc-root-cert": Path(tls.ca).as_posix(), "grpc-use-ssl-mutual": True})
        out: list[str] = []
        for key, value in args.items():
            if value is None:
                continue
            if isinstance(value, bool):  # tritonserver wants true/false, not True/False
                value = "true" if value else "false"
            out += [f"--{key}", str(value)]
        return out + list(self.extra_args)

    @property
    def http_url(self) -> str:
        return f"{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"


def _url_host(host: str) -> str:
    """Host a client should dial for a bind address (a wildcard bind is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; another process may still take it before us)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _with_free_ports(config: ServerConfig) -> ServerConfig:
    taken = {config.http_port, config.grpc_port, config.metrics_port} - {0}
    ports = {}
    for name in ("http_port", "grpc_port", "metrics_port"):
        if getattr(config, name) == 0:
            port = free_port(config.host)
            while port in taken:  # the OS may hand back a port we just closed
                port = free_port(config.host)
            taken.add(port)
            ports[name] = port
    return dataclasses.replace(config, **ports)


# ---------------------------------------------------------------------------------------------------------------------
# Finding tritonserver
# ---------------------------------------------------------------------------------------------------------------------


def _bundle_paths() -> tuple[Path, Path, str]:
    """(tritonserver dir, shared-lib dir, wheel version) of the nvidia-pytriton wheel, without importing pytriton."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "No tritonserver found: none on PATH and the nvidia-pytriton wheel is not installed. "
            "Install it with `pip install -e '.[serve]'` or run inside the Triton container."
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # editable pytriton checkout (pytriton's utils.distribution.get_libs_path)
        libs = root / "tritonserver" / "external_libs"
    return root / "tritonserver", libs, importlib.metadata.version("nvidia-pytriton")


def _cache_root() -> Path:
    if "TRIDENT_CACHE_DIR" in os.environ:
        return Path(os.environ["TRIDENT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trident"


def _prepare_bundled_backends(dist: Path, version: str) -> Path:
    """Backend directory for the bundled server, built once per (wheel version, Python version).

    The wheel ships one Python backend stub per Python version under ``python_backend_stubs/``; the Python backend
    looks for it next to ``libtriton_python.so``. Built in a temp dir and renamed into place, so concurrent
    first runs never see a half-copied directory.
    """
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        shipped = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise TritonServerError(
            f"nvidia-pytriton {version} has no Python backend stub for Python {py} (it ships {shipped}). "
            "Use one of those Python versions or the Triton container."
        )
    root = _cache_root()
    final = root / f"tritonserver-pytriton{version}-py{py}"
    marker = final / "COMPLETE"
    if marker.is_file():
        return final / "backends"

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        shutil.copytree(dist / "backends", tmp / "backends", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        if (dist / "caches").is_dir():
            shutil.copytree(dist / "caches", tmp / "caches")
        (tmp / "COMPLETE").write_text(f"{dist}\n")
        if final.exists() and not marker.is_file():  # left over from a crash before the marker existed
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not marker.is_file():  # not simply another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "backends"


def _bundled_env(libs: Path) -> dict[str, str]:
    """Environment under which the bundled server and its Python backend stubs find their libraries.

    * ``nvidia_pytriton.libs`` on LD_LIBRARY_PATH: the stub copied into the cache can no longer reach it through
      its ``$ORIGIN``-relative rpath.
    * This interpreter's own libpython first: the stub links ``libpython3.X.so.1.0`` by soname, and would otherwise
      embed whatever system libpython the loader finds (e.g. Debian's 3.11.2 under a pyenv 3.11.7 venv).
    * This interpreter's ``bin`` first on PATH: the embedded interpreter locates its prefix by finding ``python3``
      on PATH, so the venv's ``pyvenv.cfg`` is read and the venv's site-packages (numpy, onnxruntime, trident)
      become importable inside ``model.py``.
    """
    env = dict(os.environ)
    lib_dirs = [str(libs)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib_dirs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    return env


@functools.lru_cache(maxsize=8)
def tritonserver_options(binary: Path, env_items: tuple[tuple[str, str], ...] = ()) -> frozenset[str]:
    """The long options a tritonserver binary lists in its --help (cached per binary)."""
    try:
        result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60,
                                env=dict(env_items) or None)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"^\s*(--[a-z0-9-]+)", result.stdout + result.stderr, re.MULTILINE))


def find_tritonserver(prefer_path: bool = True) -> tuple[Path, Path, dict[str, str]]:
    """``(binary, backend_directory, env)`` of the tritonserver to run.

    A ``tritonserver`` on PATH (the Triton container) wins when ``prefer_path``; otherwise the nvidia-pytriton
    bundle is used. ``TRIDENT_TRITONSERVER=bundled`` forces the bundle, ``TRIDENT_TRITONSERVER=/path/to/bin`` a
    specific binary (its backends are looked for in ``../backends``, then /opt/tritonserver/backends).
    """
    choice = os.environ.get(TRITONSERVER_ENV, "")
    dist = libs = version = None
    try:
        dist, libs, version = _bundle_paths()
    except TritonServerError:
        if choice == "bundled":
            raise

    explicit = choice not in ("", "bundled")
    on_path = choice if explicit else shutil.which("tritonserver") if prefer_path and choice != "bundled" else None
    if on_path:
        binary = Path(on_path).resolve()
        if not binary.is_file():
            raise TritonServerError(f"{TRITONSERVER_ENV}={choice!r} is not a file")
        if dist is None or binary != (dist / "bin" / "tritonserver").resolve():
            backends = binary.parent.parent / "backends"
            if not backends.is_dir():
                backends = CONTAINER_BACKEND_DIR
            return binary, backends, dict(os.environ)

    if dist is None:
        _bundle_paths()  # raises the "not installed" error
    binary = dist / "bin" / "tritonserver"
    return binary, _prepare_bundled_backends(dist, version), _bundled_env(libs)


# ---------------------------------------------------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------------------------------------------------

# Triton's glog lines look like "E1129 11:51:17.123456 1234 file.cc:42] message"; "error: creating server: ..."
# is printed on fatal startup errors.
_ERROR_LINE = re.compile(r"^(E\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] .*|error: .*)$")
# Errors that end startup for good (with exit_on_error=false the process would stay up but never be ready).
_FATAL = re.compile(
    r"failed to load|failed to open backend|already in use|address in use|failed to start|creating server"
    r"|unable to find|failed to stat|poll failed|invalid argument|Unexpected argument|unrecognized option",
    re.IGNORECASE,
)
# Logged on every machine without a usable CUDA driver; not a reason to fail.
_NOISE = re.compile(r"CudaDriverHelper has not been initialized")
# Shutdown: Triton logs each model it loads and unloads (model_lifecycle.cc); once every one is unloaded it only
# waits for its next 1-s tick to exit, and TritonServer.stop kills the group then (_wait_drained).
_LIFECYCLE = re.compile(r"successfully (loaded|unloaded) '([^']+)'")
# Per-model status table rows: "| add_one | 1       | UNAVAILABLE: Internal: ... |".
_UNAVAILABLE_ROW = re.compile(r"^\|.*\bUNAVAILABLE: .*\|$")

_LIVE_SERVERS: set["TritonServer"] = set()  # started and not yet stopped; held strongly so atexit finds them


@atexit.register
def _stop_all_servers() -> None:
    for server in list(_LIVE_SERVERS):  # stop() removes it from the set
        server.stop(timeout=10)


def _prctl(option: int, value: int) -> None:
    """prctl(2) on this process (options from linux/prctl.h)."""
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(option, value)


def _set_parent_death_signal() -> None:
    """Runs in the child before exec: SIGTERM it if the launching thread dies (even by SIGKILL)."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A tritonserver process over ``config.model_repository``; a context manager that waits until ready.

    The process runs in its own process group (Ctrl-C in a terminal reaches us, not it; ``stop`` then shuts it down
    in order), and ``stop`` also kills the group so no Python backend stub outlives it. An atexit hook stops any
    server left running.
    """

    def __init__(self, config: ServerConfig):
        self.requested_config = config
        self.config = config  # with ports and the backend dir resolved once started
        self._process: subprocess.Popen | None = None
        self._returncode: int | None = None  # what stop() reports (Triton's exit code, or 0 for a clean drain)
        self._log_path: Path | None = None
        self._log_offset = 0
        self.startup_s: float | None = None  # start() to ready, measured by wait_ready()
        self._started_at = 0.0
        self._own_shm_prefix: str | None = None  # generated by start(), so stop() may delete its regions
        self._stop_file: Path | None = None  # created by stop() before it signals Triton (runtime/protocol.py)
        self.notes: list[str] = []

    # -- properties -------------------------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        return self.config.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.config.metrics_url

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and return at once; call ``wait_ready`` (or use ``with``) before sending requests."""
        if self.is_alive():
            raise TritonServerError(f"tritonserver already running (pid {self.pid}); stop() it first")
        repository = Path(self.requested_config.model_repository).resolve()
        if not repository.is_dir():
            raise TritonServerError(
                f"Model repository {repository} does not exist. Create it (one folder per model with config.pbtxt "
                "and 1/model.py or 1/model.onnx) or pass --model-repository."
            )
        unbuilt = unbuilt_models(repository)
        if unbuilt:
            out = self.requested_config.model_repository
            raise TritonServerError(
                f"Model repository {repository} is not built ({', '.join(unbuilt)}: config.pbtxt but no model "
                f"files): run `trident serve build --out {out}` first (it exports checkpoints/ and writes them)."
            )
        binary, backends, env = find_tritonserver()
        # The sampling loop models stop between steps once this file exists; Triton itself never tells a running
        # execute() that it is shutting down. Inherited by the server and its Python-backend stubs.
        self._stop_file = Path(tempfile.mkdtemp(prefix="trident-run-")) / "stopping"
        env = {**env, STOP_FILE_ENV: str(self._stop_file)}
        config = _with_free_ports(self.requested_config)
        self._own_shm_prefix = None
        if config.shm_region_prefix is None:
            self._own_shm_prefix = f"trident{os.getpid()}_{secrets.token_hex(4)}_"
        config = dataclasses.replace(
            config,
            model_repository=repository,
            backend_directory=config.backend_directory or backends,
            shm_region_prefix=config.shm_region_prefix or self._own_shm_prefix,
        )
        self.notes = []  # what the launcher could not do as asked, for `trident serve` to print
        if config.max_input_bytes is not None and MAX_INPUT_OPTION not in tritonserver_options(
                binary, tuple(sorted(env.items()))):
            self.notes.append(f"this tritonserver has no {MAX_INPUT_OPTION}: it reads a request body whole before it "
                              f"checks it (the largest valid request is {config.max_input_bytes} bytes); bound "
                              "bodies at the proxy in front (README: Exposing the server)")
            config = dataclasses.replace(config, max_input_bytes=None)
        self.config = config

        if config.log_file is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="trident-tritonserver-")) / "tritonserver.log"
        else:
            self._log_path = Path(config.log_file).resolve()
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            self._log_offset = log.tell()
            self._started_at = time.monotonic()
            self.startup_s = None
            self._returncode = None
            self._process = subprocess.Popen(
                [str(binary), *config.to_args()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() can reach the stubs too
                # PDEATHSIG fires when the *thread* that forked exits, so only tie it to the main thread.
                preexec_fn=_set_parent_death_signal if threading.current_thread() is threading.main_thread() else None,
            )
        _LIVE_SERVERS.add(self)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/v2/health/ready`` until the server (and, with strict readiness, every model) is ready.

        Raises TritonServerError with Triton's own error lines as soon as the process exits or logs a fatal error,
        and on timeout (``config.startup_timeout_s`` by default).
        """
        if self._process is None:
            raise TritonServerError("tritonserver was not started; call start() first")
        timeout = self.config.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}{HEALTH_READY}"
        fatal_seen_at = None
        while True:
            if self._process.poll() is not None:
                self._fail(f"tritonserver exited with code {self._process.returncode} during startup")
            # Triton starts gRPC, then HTTP, then metrics, and exits if any of them fails to bind: HTTP being
            # ready is not the end of startup, so the metrics endpoint must answer too and no fatal error show.
            errors = self.error_lines()
            fatal = any(_FATAL.search(line) for line in errors)
            if not fatal and _http_ok(url) and (not self.config.allow_metrics or _http_ok(self.metrics_url)):
                time.sleep(0.05)  # a bind failure is logged right after the listener that lost the race
                if self._process.poll() is None and not any(_FATAL.search(line) for line in self.error_lines()):
                    self.startup_s = time.monotonic() - self._started_at
                    return
                continue
            if fatal:
                # Give the server a moment to exit on its own (exit_on_error) so the log is complete.
                fatal_seen_at = fatal_seen_at or time.monotonic()
                if time.monotonic() - fatal_seen_at > 2.0:
                    self._fail("tritonserver reported an error during startup")
            if time.monotonic() > deadline:
                self._fail(f"tritonserver not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, timeout: float | None = None) -> int | None:
        """Shut down: the stop file (sampling loops in flight end at their next step), SIGINT (Triton drains the
        requests in flight), then SIGKILL to the whole group once the drain is over (_wait_drained), or after
        ``timeout`` seconds.

        Returns the exit code: Triton's own, or 0 where the group was killed after a complete drain (nothing was in
        flight any more: the stop was clean); None if never started. Safe to call twice.
        """
        process = self._process
        if process is None:
            return None
        timeout = self.config.exit_timeout_s + 5 if timeout is None else timeout
        drained = False
        if process.poll() is None:
            self._stop_file.touch()
            process.send_signal(signal.SIGINT)
            drained = self._wait_drained(process, timeout)
        _kill_group(process.pid)  # leftover stubs; also the server itself if it ignored SIGINT
        process.wait()  # reap: no zombie left behind
        if self._returncode is None:
            self._returncode = 0 if drained and process.returncode == -signal.SIGKILL else process.returncode
        _wait_group_gone(process.pid)  # the stubs, orphaned when the server exited, until reaped (here or by init)
        _LIVE_SERVERS.discard(self)
        # The Python backend leaves its regions in /dev/shm when Triton exits on an error (e.g. a port taken
        # after the models loaded) or is killed; the prefix is unique to this start, so they are ours to remove.
        if self._own_shm_prefix:
            for region in SHM_DIR.glob(f"{self._own_shm_prefix}*"):
                region.unlink(missing_ok=True)
        shutil.rmtree(self._stop_file.parent, ignore_errors=True)
        return self._returncode

    def _wait_drained(self, process: subprocess.Popen, timeout: float) -> bool:
        """Wait until Triton exits, or until its log shows every model it loaded unloaded (each instance's finalize
        has run; no request is in flight, or the model would not unload). Past that point Triton only waits for its
        next 1-s tick to exit, so the group is killed instead. True in that case (a clean stop); False where it exited
        by itself or the timeout came first. With Triton's info logging off no line says so, and it waits for the
        exit."""
        deadline = time.monotonic() + timeout
        position, loaded, unloaded = self._log_offset, set(), set()
        while time.monotonic() < deadline and process.poll() is None:
            if self._log_path is not None and self._log_path.exists():
                with open(self._log_path, "rb") as log:
                    log.seek(position)
                    text = log.read()
                end = text.rfind(b"\n") + 1  # whole lines only: the rest is read again next time
                position += end
                for verb, name in _LIFECYCLE.findall(text[:end].decode("utf-8", errors="replace")):
                    (loaded if verb == "loaded" else unloaded).add(name)
                if loaded and loaded <= unloaded:
                    return True
            time.sleep(0.05)
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        return False

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- logs -------------------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything this run wrote to the log file so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with open(self._log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", errors="replace")

    def error_lines(self) -> list[str]:
        """Triton's error lines from this run: E-level log lines, fatal ``error:`` lines, UNAVAILABLE models."""
        lines = self.log_text().splitlines()
        return [
            line
            for line in lines
            if (_ERROR_LINE.match(line) or _UNAVAILABLE_ROW.match(line.strip())) and not _NOISE.search(line)
        ]

    def _fail(self, what: str) -> None:
        errors = self.error_lines()
        self.stop(timeout=10)
        errors = self.error_lines() or errors  # stopping may have flushed more
        if errors:
            detail = "\n".join(f"  {line}" for line in errors[-20:])
        else:
            tail = self.log_text().splitlines()[-20:]
            detail = "\n".join(f"  {line}" for line in tail) or "  (log is empty)"
        raise TritonServerError(
            f"{what} (http {self.http_url}, grpc {self.grpc_url}, metrics {self.metrics_url}).\n"
            f"Triton says:\n{detail}\n{self._hint(errors)}Full log: {self._log_path}"
        )

    def _hint(self, errors: list[str]) -> str:
        if any("unable to find backend library" in line for line in errors):
            backends = Path(self.config.backend_directory or "")
            available = sorted(p.name for p in backends.iterdir() if p.is_dir()) if backends.is_dir() else []
            return (
                f"Backends available in {backends}: {available}. The tritonserver bundled with nvidia-pytriton has "
                "only the Python backend: host ONNX Runtime inside a Python-backend model.py, or run in the Triton "
                "container. A container-flavour repository built with `--bucket-backend python` serves here.\n"
            )
        if any("already in use" in line for line in errors):
            return "Another process holds that port: choose other ports or pass 0 (--free-ports) to pick free ones.\n"
        return ""


def unbuilt_models(repository: Path) -> list[str]:
    """Models of a repository that have a config.pbtxt but no numbered version folder with files in it. A fresh clone
    of this project is like that: its model_repository/ holds only the committed configs, and `trident serve build`
    writes the graphs and model files (Triton itself only says "at least one version must be available")."""
    def has_version(model: Path) -> bool:
        return any(v.is_dir() and v.name.isdigit() and any(v.iterdir()) for v in model.iterdir())

    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt") if not has_version(p.parent))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting, 400 while models load
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of the group is left, zombies included: a killed stub's parent (the server) is gone, so
    init reaps it, which on a loaded machine takes a moment; returning before would leave a caller that checks (or
    reuses the resources) seeing processes that are still there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-pgid, os.WNOHANG)[0]:  # ours to reap where this process is their subreaper (main)
                pass
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)  # succeeds while any member exists, zombies too
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _become_subreaper() -> None:
    """Make this process the one that reaps its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER): the stubs that
    stop() kills are then reaped here at once, not whenever init gets to them (1.6 s after the kill, measured on these
    machines). Only the `trident serve` process does this: it owns its server, where a library caller may not want the
    orphans of its other children."""
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def repository_request_limit(repository: Path) -> int | None:
    """The bound on request bodies that `trident serve build` recorded for the repository (request_limits.py), or
    None for a repository without one (written by hand, or by an older build)."""
    from .repository import MARKER  # the builder's record, named where it is written

    try:
        return int(json.loads((Path(repository) / MARKER).read_text())["largest_request"]["limit_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def admin_lock(host: str, key_file: Path | None, key_env: str | None, open_apis: bool,
               generated: Path = Path(".trident/admin-key")) -> dict:
    """ServerConfig's restricted_apis and admin_key for `trident serve`, and notes to print. Off loopback the admin
    APIs are locked unless open_apis; the key comes from key_file, else the environment, else a new random one
    written (0600) to `generated`. On loopback they are locked only when a key is given. The key never appears on
    trident's own command line; Triton takes it on its own (Triton reads this setting nowhere else), so anyone who
    can list this host's processes can read it there: give the server a host or container of its own."""
    key = None
    if key_file is not None:
        key = Path(key_file).read_text().strip()
    elif key_env:
        key = key_env.strip()
    if open_apis:
        note = ("admin APIs open to every client" if is_loopback(host) else
                f"WARNING: admin APIs ({', '.join(ADMIN_APIS)}) open to anyone who reaches {host}")
        return {"restricted_apis": (), "admin_key": None, "notes": [note]}
    if key is None and is_loopback(host):
        return {"restricted_apis": (), "admin_key": None, "notes": []}
    notes = []
    if key is None:
        key = secrets.token_urlsafe(32)
        generated.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(generated, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        notes.append(f"admin key written to {generated} (mode 0600)")
    notes.append(f"admin APIs ({', '.join(ADMIN_APIS)}) need the header {ADMIN_KEY_HEADER!r}; inference, health, "
                 "metadata and model-config are open")
    return {"restricted_apis": ADMIN_APIS, "admin_key": key, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    """``trident serve``: run Triton over a model repository until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="trident serve", description=main.__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of 8000-8002")
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--admin-key-file", type=Path, default=None,
                        help=f"a file holding the key (16+ characters of letters, digits and -_.~) that opens the "
                             f"admin APIs ({', '.join(ADMIN_APIS)}) in the header {ADMIN_KEY_HEADER!r}; or set "
                             f"${ADMIN_KEY_ENV}. On a non-loopback --host they are locked by default: with neither, "
                             f"a random key is made and written to .trident/admin-key")
    parser.add_argument("--open-admin-apis", action="store_true",
                        help="serve the admin APIs to anyone who reaches the port (not recommended off loopback)")
    parser.add_argument("--grpc-tls-cert", type=Path, default=None, help="gRPC TLS: the server certificate (PEM)")
    parser.add_argument("--grpc-tls-key", type=Path, default=None, help="gRPC TLS: the server's private key (PEM)")
    parser.add_argument("--grpc-tls-ca", type=Path, default=None,
                        help="gRPC mutual TLS: accept only clients whose certificate this CA signed")
    parser.add_argument("--exit-timeout", type=int, default=3,
                        help="seconds Triton lets in-flight requests finish on Ctrl-C/SIGTERM before it exits (a "
                             "U-Net step takes milliseconds; a server-side sampling loop in flight stops at its next "
                             "step, and its client gets ServerUnreachableError)")
    args = parser.parse_args(argv)

    try:
        lock = admin_lock(args.host, args.admin_key_file, os.environ.get(ADMIN_KEY_ENV), args.open_admin_apis)
        tls = None
        if args.grpc_tls_cert or args.grpc_tls_key or args.grpc_tls_ca:
            if not (args.grpc_tls_cert and args.grpc_tls_key):
                raise ValueError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
            tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca)
    except (ValueError, OSError) as error:
        print(f"trident serve: error: {error}", file=sys.stderr)
        return 2
    for line in lock.pop("notes"):
        print(line, flush=True)
    ports = (0, 0, 0) if args.free_ports else (args.http_port, args.grpc_port, args.metrics_port)
    config = ServerConfig(
        model_repository=args.model_repository,
        host=args.host,
        http_port=ports[0],
        grpc_port=ports[1],
        metrics_port=ports[2],
        log_file=args.log_file,
        log_verbose=args.log_verbose,
        startup_timeout_s=args.startup_timeout,
        exit_timeout_s=args.exit_timeout,
        grpc_tls=tls,
        max_input_bytes=repository_request_limit(args.model_repository),
        **lock,
    )

    stop = threading.Event()
    _become_subreaper()
    server = TritonServer(config)

    def on_signal(signum, frame):
        stop.set()
        if server.startup_s is None:  # still starting: interrupt wait_ready
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"tritonserver pid {server.pid}, log {server.log_path}", flush=True)
        for line in server.notes if not is_loopback(args.host) else ():  # what matters off loopback
            print(line, flush=True)
        try:
            server.wait_ready()
        except TritonServerError as error:
            print(error, file=sys.stderr, flush=True)
            return 1
        print(
            f"ready in {server.startup_s:.1f} s\n"
            f"  HTTP     {server.http_url}\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"  log      {server.log_path}\n"
            "Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.is_alive():
                print(f"tritonserver exited unexpectedly; see {server.log_path}", file=sys.stderr, flush=True)
                return 1
        print("shutting down", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted during startup; shutting down", flush=True)
        return 0
    except TritonServerError as error:
        print(error, file=sys.stderr, flush=True)
        return 1
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

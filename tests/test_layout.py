"""The layout's rules (ARCHITECTURE.md), checked on the source: which room may import which.

Rooms: serving core (serving/*.py), the client SDK (serving/client/), operator tools (serving/server/), the files that
run inside Triton (serving/server/runtime/), and the torch side (training/, export/). Imports go one way, towards the
core; serving/ reaches the torch side only through serving/toolchain.py, by name, on first use.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from trident.serving import toolchain
from trident.serving.server.runtime import ALLOWED_IMPORTS, MODEL_FILES, RUNTIME_FILES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_OF = {"serving": "trident.serving", "training": "trident.training", "export": "trident.export",
              "benchmarks": "trident.benchmarks"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    name = ".".join([PACKAGE_OF[parts[0]], *parts[1:]])
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path: Path) -> set[str]:
    """Every module a file imports, relative imports made absolute (anywhere in the file, lazy ones included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from . import sampling` imports a module of the package
                found |= {f"{stem}.{alias.name}" for alias in node.names} if not node.module else {stem}
            else:
                found.add(node.module)
    return found


def room(module: str) -> str:
    for prefix, name in (("trident.serving.server.runtime", "runtime"), ("trident.serving.server", "server"),
                         ("trident.serving.client", "client"), ("trident.serving", "core"),
                         ("trident.training", "training"), ("trident.export", "export"),
                         ("trident.benchmarks", "benchmarks")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "outside"


# room -> rooms of trident it may import. runtime files are checked by their own, stricter rule below.
MAY_IMPORT = {
    "core": {"core"},
    "client": {"core", "client", "runtime"},   # runtime: protocol.py's parameter keys only (checked below)
    "server": {"core", "client", "server", "runtime"},
    "runtime": {"runtime"},
    "training": {"core", "training"},
    "export": {"core", "client", "server", "training", "export"},
}


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


SOURCES = [p for folder in ("serving", "training", "export") for p in python_files(folder)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way_when_parsed(path):
    here = room(module_name(path))
    bad = sorted(m for m in imports(path) if room(m) not in ("outside", *MAY_IMPORT[here]))
    assert not bad, f"{path.relative_to(ROOT)} ({here}) imports {bad}; allowed rooms: {sorted(MAY_IMPORT[here])}"
    if here == "client":
        assert all(m == "trident.serving.server.runtime.protocol" for m in imports(path) if room(m) == "runtime")


def test_serving_reaches_the_torch_side_only_through_the_toolchain_seam():
    torch_side = re.compile(r"trident\.(training|export|benchmarks)\.")  # a module path (not "trident.export" the format)
    for path in python_files("serving"):
        if path.name == "toolchain.py":
            continue
        named = sorted(set(m.group(0) for m in torch_side.finditer(path.read_text())))
        assert not named, f"{path.relative_to(ROOT)} names {named}: go through serving/toolchain.py"
    assert all(torch_side.match(target) for target in toolchain.TORCH_SIDE.values())
    for name, target in toolchain.TORCH_SIDE.items():  # every name the seam declares resolves
        assert callable(toolchain.resolve(name)), name


@pytest.mark.parametrize("name,source", sorted({**RUNTIME_FILES, **{f"{k}_model.py": v for k, v in MODEL_FILES.items()}}
                                                .items()))
def test_runtime_file_imports_only_its_allowed_set(name, source):
    tree = ast.parse(source.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"{name}: relative imports {relative} break when the file is copied into a model folder"
    assert imported <= ALLOWED_IMPORTS, f"{name} imports {sorted(imported - ALLOWED_IMPORTS)}"


def test_every_error_the_package_defines_is_a_trident_error():
    from trident.serving.errors import TridentError

    defined = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id in ("Exception", "RuntimeError"))
                    for b in node.bases):
                defined.append((path, node.name))
    assert len(defined) >= 10
    # copied into Triton (no trident there): plain ValueError by design, see serving/errors.py
    exempt = {"InvalidRequest", "SamplingCancelled"}
    for path, name in defined:
        if name in exempt:
            continue
        module = __import__(module_name(path), fromlist=[name])
        assert issubclass(getattr(module, name), TridentError), f"{path.relative_to(ROOT)}: {name}"


# The contracts between files are types (ARCHITECTURE.md: one tensor spec, one runtime manifest per graph).

SERVING = python_files("serving")


def string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_model_configuration_parameter_keys_are_named_only_in_protocol_when_parsed():
    """A model's configuration carries trident_card, trident_runtime and trident_max_images, named once."""
    from trident.serving.server.runtime import protocol

    keys = {protocol.CARD, protocol.RUNTIME, protocol.MAX_IMAGES}
    for path in SERVING:
        if path.name != "protocol.py":
            assert not keys & string_constants(path), f"{path.relative_to(ROOT)} spells a parameter key"
    # the keys of the configuration before the manifest, retired: nothing writes or reads them any more
    retired = {"trident_onnx_files", "trident_engines", "trident_precision", "trident_input_ranges",
               "trident_bucket_models", "trident_unet_io", "trident_shard_limit", "intra_op_num_threads"}
    assert not any(retired & string_constants(path) for path in SERVING)


def test_only_the_spec_builds_tensor_specs_and_nothing_binds_graph_tensors_by_position_when_parsed():
    """Tensor names live in spec.py; everything else binds a graph's tensors by role (GraphSpec.feed,
    GraphRuntime.feed), so a graph that gains an input is a change to spec.py alone."""
    for path in SERVING:
        tree = ast.parse(path.read_text())
        built = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TensorSpec"]
        assert path.name == "spec.py" or not built, f"{path.relative_to(ROOT)} builds a TensorSpec"
        positional = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                      and isinstance(node.value, ast.Attribute) and node.value.attr in ("inputs", "outputs")
                      and isinstance(node.slice, ast.Constant)]
        assert not positional, f"{path.relative_to(ROOT)} binds tensors by position: {positional}"


def test_graph_runtime_is_copied_into_triton_and_read_by_every_model_that_runs_a_graph():
    from trident.serving.server.runtime import protocol

    assert RUNTIME_FILES["graph_runtime.py"].name == "graph_runtime.py"
    for kind, source in MODEL_FILES.items():
        text = source.read_text()
        assert "GraphRuntime.from_json(" in text and "P.RUNTIME" in text, kind
    assert protocol.RUNTIME == "trident_runtime"

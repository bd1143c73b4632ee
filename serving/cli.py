"""`trident` command line: one entry point, each subcommand a thin main() over importable code.

  trident train diffusion|gan|vae|classifier ...   train a model (torch)
  trident distill guidance|steps TEACHER ...       distil the diffusion teacher into a few-step student (torch)
  trident export CHECKPOINT --out DIR ...          checkpoint -> fixed-shape ONNX graphs + metadata (torch, onnx)
  trident serve build --export DIR ... --out REPO  write a Triton model repository
  trident serve deploy [--out deploy]              Kubernetes files for the container flavour
  trident serve [--model-repository REPO] ...      start the embedded Triton server
  trident sample --model diffusion ...             draw images from a running server (client only)
  trident demo                                     build, serve, sample all three models, write grids
  trident evaluate [--sweep]                       image quality of every generator (torch), the quality report
"""
from __future__ import annotations

import importlib
import sys

from .toolchain import TORCH_SIDE

# subcommand -> "module:function" taking argv (list of str) and returning an exit code. Imported lazily so that
# `trident sample` never imports torch; the torch side's commands come from the one seam (serving/toolchain.py).
COMMANDS = {
    "train": TORCH_SIDE["train"],
    "distill": TORCH_SIDE["distill"],
    "export": TORCH_SIDE["export"],
    "serve": "trident.serving.server.launcher:main",
    "serve build": "trident.serving.server.repository:main",
    "serve deploy": "trident.serving.server.deploy:main",
    "sample": "trident.serving.client.cli:main",
    "demo": "trident.serving.server.demo:main",
    "evaluate": TORCH_SIDE["evaluate"],
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve" and rest[:1] in (["build"], ["deploy"]):
        cmd, rest = f"serve {rest[0]}", rest[1:]
    if cmd not in COMMANDS:
        print(f"trident: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[cmd].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = {"train": "train", "distill": "train", "export": "train", "evaluate": "train"}.get(cmd.split()[0],
                                                                                                   "serve")
        print(f"trident {cmd}: missing dependency {e.name!r}; install it with `pip install -e .[{extra}]`",
              file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Operator tools: build a Triton model repository from exports (repository.py), run the embedded tritonserver
(launcher.py), and the demo (demo.py). What runs *inside* Triton is in runtime/."""

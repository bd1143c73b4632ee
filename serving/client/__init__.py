"""The client SDK (numpy, tritonclient, Pillow; no torch): TridentClient over any Backend.

    from trident.serving.client import TridentClient
    client = TridentClient.connect("127.0.0.1:8000", protocol="grpc")      # or TridentClient.from_onnx([...])
    images = client.sample(classes=["sneaker"] * 8, steps=20, guidance=3.0, seed=0)   # uint8 (8, 28, 28, 1)

    sdk.py       TridentClient: sampling (client loop with batched CFG, or the server's sampling loop), GAN, VAE
    backends.py  the Backend protocol; in-process ONNX Runtime and Triton (HTTP/gRPC) backends
    cli.py       `trident sample`
"""
from ..errors import InferenceError, InvalidArgumentError, ModelNotReadyError, ServerUnreachableError, TridentError
from .sdk import MAX_IMAGES, SampleStats, TridentClient

__all__ = ["TridentClient", "SampleStats", "MAX_IMAGES", "TridentError", "ServerUnreachableError",
           "ModelNotReadyError", "InvalidArgumentError", "InferenceError"]

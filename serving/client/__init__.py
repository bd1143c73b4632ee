"""The client SDK (numpy, tritonclient, Pillow; no torch): TridentClient over any Backend.

    from trident.serving.client import TridentClient
    client = TridentClient.connect("127.0.0.1:8000", protocol="grpc")      # or TridentClient.from_onnx([...])
    images = client.sample(classes=["sneaker"] * 8, steps=20, guidance=3.0, seed=0)   # uint8 (8, 28, 28, 1)

    sdk.py       TridentClient: sampling (client loop with batched CFG, or the server's sampling loop), GAN, VAE
    aio.py       AsyncTridentClient: the same methods as coroutines (tritonclient's asyncio clients)
    base.py      what both clients share: cards, argument checks, the requests each method sends
    backends.py  the Backend protocol; in-process ONNX Runtime and Triton (HTTP/gRPC) backends
    cli.py       `trident sample`
"""
from ..errors import InferenceError, InvalidArgumentError, ModelNotReadyError, ServerUnreachableError, TridentError
from .aio import AsyncTridentClient
from .backends import TLS
from .sdk import MAX_IMAGES, SampleStats, TridentClient

__all__ = ["TridentClient", "AsyncTridentClient", "TLS", "SampleStats", "MAX_IMAGES", "TridentError",
           "ServerUnreachableError", "ModelNotReadyError", "InvalidArgumentError", "InferenceError"]

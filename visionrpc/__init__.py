"""visionrpc: train fastai-style vision models and serve them over gRPC.

The parts are subpackages: ``visionrpc.server``, ``visionrpc.client``,
``visionrpc.training`` and ``visionrpc.protos``. Each lives in the repository's
top-level folder of the same name.
"""

__version__ = "0.1.0"

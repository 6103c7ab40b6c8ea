"""The serving core: model repository, onnxruntime runtime, dynamic batcher, gRPC service.

Importing this package is cheap: training imports ``model_config`` and
``preprocess`` from here without pulling in grpc or onnxruntime.
"""

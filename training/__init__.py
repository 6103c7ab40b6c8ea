"""Offline training: datasets in their native layouts to ONNX models in a repository."""

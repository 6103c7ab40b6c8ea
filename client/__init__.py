"""The visionrpc Python client (sync and asyncio) and the user-facing CLI commands."""

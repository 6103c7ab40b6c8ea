"""Run by test_kserve_client in a process of its own: the KServe SDK's gRPC client.

kserve and tritonclient each register the Open Inference Protocol's messages in
protobuf's default descriptor pool from differently named files, so the two cannot be
imported into one process (the test session imports tritonclient). Prints JSON.

    python tests/oip/kserve_client.py ADDRESS MODEL IMAGE_FILE...
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(address: str, model: str, data: list[bytes]) -> dict[str, Any]:
    client = InferenceGRPCClient(address, retries=0)
    tensor = InferInput("images", [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
    try:
        answer = await client.infer(InferRequest(model, [tensor], parameters={"top_k": 2}))
        outputs = {}
        for output in answer.outputs:
            array = output.as_numpy()
            if array.dtype == np.object_:
                array = np.vectorize(lambda item: bytes(item).decode())(array)
            outputs[output.name] = array.tolist()
        return {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model),
            "outputs": outputs,
        }
    finally:
        await client.close()


if __name__ == "__main__":
    files = [Path(name).read_bytes() for name in sys.argv[3:]]
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], files))))

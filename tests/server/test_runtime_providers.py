"""Which onnxruntime execution providers a model session asks for."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from visionrpc.server.runtime import (
    CPU,
    CUDA,
    ModelLoadError,
    choose_providers,
    cuda_driver_present,
)


def test_auto_asks_for_cuda_only_where_a_driver_and_the_provider_exist() -> None:
    chosen = choose_providers(("auto",))
    cuda_usable = cuda_driver_present() and CUDA in ort.get_available_providers()
    assert chosen == ([CUDA, CPU] if cuda_usable else [CPU])


def test_an_explicit_list_is_kept_in_order() -> None:
    assert choose_providers((CPU,)) == [CPU]


def test_a_provider_this_build_lacks_is_refused_with_the_available_ones() -> None:
    with pytest.raises(ModelLoadError, match=r"NoSuchExecutionProvider.*available: .*CPU"):
        choose_providers(("NoSuchExecutionProvider", CPU))

"""Strict validation of KServe resources against the resource models the kserve package ships.

The kserve SDK's models (``kserve.models``, generated from KServe's CRD OpenAPI) and the
Kubernetes client's (``kubernetes.client.models``) name every field a resource may hold
(``attribute_map``), its type (``openapi_types``) and, in their constructors, which fields
are required and which values an enum allows. ``check`` walks a manifest through them: an
unknown or misspelt field, a wrong type or a missing required field is an error that names
its path, as ``kubectl apply`` against the CRD would refuse it.
"""

from __future__ import annotations

import re
from typing import Any

import kserve.models
import kubernetes.client.models

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
}
# kserve's models write "list[X]", "dict(str, X)"; Kubernetes' "List[X]", "Dict[str, X]".
_LIST = re.compile(r"^[lL]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(|Dict\[)(\w+), (.+)[)\]]$")


class InvalidResource(AssertionError):
    """A manifest the resource models refuse; the message names the field's path."""


def _model_class(type_name: str) -> Any:
    return getattr(kserve.models, type_name, None) or getattr(
        kubernetes.client.models, type_name, None
    )


def check(data: Any, type_name: str, path: str = "") -> None:
    """Raise InvalidResource unless ``data`` (parsed YAML) is a valid ``type_name``."""
    if match := _LIST.match(type_name):
        if not isinstance(data, list):
            raise InvalidResource(f"{path}: expected a list, got {type(data).__name__}")
        for index, item in enumerate(data):
            check(item, match[1], f"{path}[{index}]")
        return
    if match := _DICT.match(type_name):
        if not isinstance(data, dict):
            raise InvalidResource(f"{path}: expected a mapping, got {type(data).__name__}")
        for key, value in data.items():
            check(value, match[2], f"{path}.{key}")
        return
    if type_name == "object":  # int-or-string fields (ports), free-form values
        return
    if type_name in PRIMITIVES:
        allowed = PRIMITIVES[type_name]
        # YAML's true is an int to Python; a bool is no number here.
        if not isinstance(data, allowed) or (isinstance(data, bool) and bool not in allowed):
            raise InvalidResource(f"{path}: expected {type_name}, got {data!r}")
        return
    model = _model_class(type_name)
    if model is None:
        # Quantities (ResourceQuantity, V1beta1MetricQuantity) have no model: "2Gi", "32", 1.
        if isinstance(data, bool) or not isinstance(data, (str, int, float)):
            raise InvalidResource(f"{path}: expected a quantity, got {data!r}")
        return
    if not isinstance(data, dict):
        raise InvalidResource(f"{path}: expected a {type_name} mapping, got {data!r}")
    attributes = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    unknown = sorted(set(data) - set(attributes))
    if unknown:
        raise InvalidResource(f"{path or type_name}: unknown field(s) {unknown} for {type_name}")
    for key, value in data.items():
        check(value, model.openapi_types[attributes[key]], f"{path}.{key}")
    try:
        model(**{attributes[key]: value for key, value in data.items()})
    except ValueError as error:  # a required field missing, or a value outside its enum
        raise InvalidResource(f"{path or type_name}: {error}") from None

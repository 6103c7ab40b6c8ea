"""Test-time views by name: the part of the geometry that model configs name.

Its own module, free of images and of the config schema, so that ``model_config``
(which checks a config's view names) and ``preprocess`` (which applies the views)
both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

# Corner anchors of the zoom views: where the smaller box sits inside the base box.
_ZOOM_ANCHORS = {
    "center": (0.5, 0.5),
    "tl": (0.0, 0.0),
    "tr": (1.0, 0.0),
    "bl": (0.0, 1.0),
    "br": (1.0, 1.0),
}


@dataclass(frozen=True)
class View:
    """A deterministic test-time view: an optional zoom crop, then an optional flip."""

    name: str = "identity"
    flip: bool = False
    zoom: float = 1.0
    anchor: tuple[float, float] = (0.5, 0.5)


IDENTITY = View()


def parse_view(name: str, *, zoom: float) -> View:
    """``identity``, ``flip``, ``zoom_<center|tl|tr|bl|br>``, or ``flip+zoom_<...>``."""
    flip = False
    zoom_factor = 1.0
    anchor = (0.5, 0.5)
    for part in name.split("+"):
        if part == "identity":
            continue
        if part == "flip" and not flip:
            flip = True
        elif part.startswith("zoom_") and part[5:] in _ZOOM_ANCHORS and zoom_factor == 1.0:
            zoom_factor = zoom
            anchor = _ZOOM_ANCHORS[part[5:]]
        else:
            raise ValueError(
                f"unknown view {name!r}: use identity, flip, "
                f"zoom_<{'|'.join(_ZOOM_ANCHORS)}> or flip+zoom_<...>"
            )
    return View(name=name, flip=flip, zoom=zoom_factor, anchor=anchor)

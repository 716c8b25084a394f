"""Pretrained weights from this machine's disk, never from the network: one locator for VGG-19 (the
perceptual and contrastive losses) and the FID InceptionV3.

Each network names, in order, the settings a user may configure (a params key, an environment
variable, an argument) and the caches where other libraries keep the same file. A configured file
that is missing or wrong is an error, not a fallback; otherwise the first cache that holds a file is
read. When nothing is found the result says why, listing every place checked and how to provide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from torch import Tensor


class FoundWeights(NamedTuple):
    """Outcome of a lookup: a state dict and its file, or None and why nothing was found."""

    state_dict: dict[str, Tensor] | None
    source: str | None
    reason: str | None


class Setting(NamedTuple):
    """A place the user configures: its name in messages and its value (None: not set)."""

    name: str
    value: str | Path | None


class Cache(NamedTuple):
    """A place another library downloads to: how messages name it, and the file there, if any."""

    description: str
    find: Callable[[], Path | None]


def locate_weights(
    what: str,
    settings: Sequence[Setting],
    caches: Sequence[Cache],
    read: Callable[[Path], dict[str, Tensor]],
    remedy: str,
) -> FoundWeights:
    """The first configured setting (read, errors raised), else the first cache holding a file, else
    no weights and a reason: ``no <what> found (they are never downloaded). Checked: (a) ...; (b)
    .... <remedy>``."""
    for setting in settings:
        if setting.value is not None and str(setting.value) != "":
            path = Path(setting.value).expanduser()
            return FoundWeights(read(path), str(path), None)
    for cache in caches:
        found = cache.find()
        if found is not None:
            return FoundWeights(read(found), str(found), None)
    checked = [f"{setting.name}: not set" for setting in settings]
    checked += [cache.description for cache in caches]
    places = "; ".join(f"({chr(ord('a') + i)}) {text}" for i, text in enumerate(checked))
    reason = f"no {what} found (they are never downloaded). Checked: {places}. {remedy}"
    return FoundWeights(None, None, reason)


def existing(path: Path) -> Path | None:
    """``path`` when it is a file: the ``find`` of a cache that is one fixed file."""
    return path if path.is_file() else None

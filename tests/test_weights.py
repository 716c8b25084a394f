"""imtok.weights: the order in which pretrained weights are looked for, and the reason when none are."""

from pathlib import Path

import pytest
import torch

from imtok.weights import Cache, Setting, existing, locate_weights


def read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return {"w": torch.tensor([float(path.read_text())])}


def test_a_configured_setting_wins_over_every_cache_and_its_errors_stand(tmp_path):
    configured, cached = tmp_path / "mine.pth", tmp_path / "cache.pth"
    configured.write_text("1")
    cached.write_text("2")
    caches = [Cache(f"cache: {cached}", lambda: existing(cached))]
    found = locate_weights(
        "net weights", [Setting("a.key", None), Setting("ENV", configured)], caches, read, ""
    )
    assert found.source == str(configured) and found.state_dict["w"].item() == 1.0 and found.reason is None
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        locate_weights("net weights", [Setting("a.key", tmp_path / "missing.pth")], caches, read, "")


def test_without_a_setting_the_first_cache_holding_a_file_is_read(tmp_path):
    second = tmp_path / "second.pth"
    second.write_text("3")
    caches = [
        Cache("first", lambda: existing(tmp_path / "absent.pth")),
        Cache("second", lambda: existing(second)),
    ]
    found = locate_weights("net weights", [Setting("a.key", ""), Setting("ENV", None)], caches, read, "")
    assert found.source == str(second) and found.state_dict["w"].item() == 3.0


def test_when_nothing_is_found_the_reason_lists_every_place_in_order_and_the_remedy(tmp_path):
    caches = [Cache(f"hub cache: {tmp_path / 'x.pth'}", lambda: existing(tmp_path / "x.pth"))]
    found = locate_weights(
        "net weights", [Setting("a.key", None), Setting("ENV", None)], caches, read, "Copy it."
    )
    assert found.state_dict is None and found.source is None
    assert found.reason == (
        "no net weights found (they are never downloaded). Checked: (a) a.key: not set; (b) ENV: not set; "
        f"(c) hub cache: {tmp_path / 'x.pth'}. Copy it."
    )

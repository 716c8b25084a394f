"""The tier lists in conftest name modules and tests that exist: a renamed slow test would otherwise
move into `make test-fast` unnoticed."""

from pathlib import Path

from conftest import FULL_TIER_MODULES, FULL_TIER_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_full_tier_module_and_test_exists():
    assert all((TESTS / module).is_file() for module in FULL_TIER_MODULES), FULL_TIER_MODULES
    for entry in FULL_TIER_TESTS:
        module, name = entry.split("::")
        assert f"def {name}(" in (TESTS / module).read_text(), entry

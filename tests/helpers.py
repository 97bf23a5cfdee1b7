"""Shared test helpers: paths of the checkout and the test data (one home for each)."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
README = ROOT / "README.md"
DATA_GROUPING = TESTS / "data_grouping"
DIST_SCRIPTS = TESTS / "dist_scripts"

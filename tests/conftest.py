import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _bpc_cache(tmp_path_factory):
    """Generated modules and builds go to a per-session cache, not the user's."""
    if "BPC_CACHE" not in os.environ:
        os.environ["BPC_CACHE"] = str(tmp_path_factory.mktemp("bpc_cache"))
    yield

import os

import pytest

# torch's OpenMP threads spin while waiting; on a 2-core machine shared with another process that
# makes small ops 10-40x slower. Passive waiting must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def module_oracle_cache(tmp_path_factory):
    """One oracle cache ($SDS3D_CACHE) for a module, so its world renders are made once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SDS3D_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()

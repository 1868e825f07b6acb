import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory: pytest.TempPathFactory):
    """Compiled runs keep their compilations here, not in the user's ~/.cache/sd3booth/compile."""
    os.environ.setdefault("SD3BOOTH_COMPILE_CACHE", str(tmp_path_factory.mktemp("compile-cache")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random SD3 pipeline in diffusers layout, written once per test session."""
    from sd3booth.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-sd3"), "tiny", seed=0, device="cpu")

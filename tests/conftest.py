"""Shared fixtures: the bundled SmolLM2 model and the small random-weight reference models."""
from __future__ import annotations

from pathlib import Path

import pytest
from reference_models import TINY_CONFIGS, build_tiny_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from sarathi_engine.model_store import prepare_default_model

    return prepare_default_model(show_progress=False)


@pytest.fixture(scope="session")
def tiny_models(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind, smollm2_dir) for kind in TINY_CONFIGS}

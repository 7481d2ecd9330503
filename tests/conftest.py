import os
from pathlib import Path

# Tests never reach the network: pretrained downloads must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"


def load_golden(name: str) -> dict:
    return torch.load(DATA / name, map_location="cpu", weights_only=False)


def tiny_overrides(name: str) -> dict:
    """timm overrides that keep each zoo architecture but make it tiny."""
    overrides = dict(embed_dim=32, depth=4, num_heads=2)
    if name.startswith("sam"):
        overrides.update(global_attn_indexes=[1, 3], window_size=2)
    return overrides


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

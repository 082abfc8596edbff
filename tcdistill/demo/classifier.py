"""A small CNN that reads the demo world's attributes from an image: prompt fidelity and Fréchet features.

It plays Inception's role for the synthetic world: its penultimate features give a Fréchet distance between
image sets, and its attribute predictions, compared with the attributes a prompt names, give prompt fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import ATTRIBUTES

FEATURE_DIM = 64


class AttributeClassifier(nn.Module):
    """conv stack -> global average pool (the feature vector) -> one linear head per attribute."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(64, feature_dim, 3, padding=1), nn.ReLU(),
        )
        # Position is an attribute, so the pooled features must keep where things are: pool to 2x2, not 1x1.
        self.proj = nn.Linear(feature_dim * 4, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features of images in [-1, 1], [N, 3, H, W] -> [N, feature_dim]."""
        h = F.adaptive_avg_pool2d(self.body(x), 2).flatten(1)
        return F.relu(self.proj(h))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def train_classifier(pixels: Tensor, labels: dict[str, Tensor], steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> AttributeClassifier:
    """Cross-entropy on every attribute; small pixel noise so decoded (slightly blurry) samples stay in-distribution."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, pixels.shape[0], (batch_size,), generator=gen)
        x = pixels[idx] + 0.05 * torch.randn(pixels[idx].shape, generator=gen)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: AttributeClassifier, pixels: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    """Per-attribute accuracy plus `all` (every attribute right) of predictions against `labels`."""
    out = model(pixels)
    hits = {k: out[k].argmax(1) == labels[k] for k in ATTRIBUTES}
    acc = {k: float(v.float().mean()) for k, v in hits.items()}
    acc["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return acc


def save_classifier(model: AttributeClassifier, path: str | Path, meta: dict | None = None) -> None:
    """Weights as safetensors, the attribute vocabulary beside them (so a reload checks it matches)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path / "classifier.safetensors"))
    (path / "classifier.json").write_text(json.dumps({"attributes": ATTRIBUTES, **(meta or {})}, indent=1))


def load_classifier(path: str | Path) -> AttributeClassifier:
    """Load a classifier saved by `save_classifier`; refuses one trained on another attribute vocabulary."""
    path = Path(path)
    meta = json.loads((path / "classifier.json").read_text())
    if {k: list(v) for k, v in meta["attributes"].items()} != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"classifier at {path} was trained on other attributes")
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return model.eval().requires_grad_(False)


def labels_of(attrs: list[dict[str, str]]) -> dict[str, Tensor]:
    """Class-index tensors from attribute dicts (as `world.parse_caption` returns)."""
    return {k: torch.tensor([ATTRIBUTES[k].index(a[k]) for a in attrs]) for k in ATTRIBUTES}


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

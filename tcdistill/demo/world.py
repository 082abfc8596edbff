"""The demo's synthetic world: captioned images of one shape (shape, colour, position) on a coloured background.

Deterministic from a seed, so a demo run is reproducible end to end; every caption names all four attributes,
so prompts matter and a classifier of the attributes can score prompt fidelity.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated, mutually distant colours so a 32x32 render (and a tiny VAE) keeps them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Object centre as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.29, 0.5),
    "right": (0.71, 0.5),
    "top": (0.5, 0.29),
    "bottom": (0.5, 0.71),
    "center": (0.5, 0.5),
}
# Attribute name -> its values, in a fixed order (the classifier's class indices).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(COLORS),
}
_TEMPLATE = "a {color} {shape} at the {position} on a {background} background"


@dataclass(frozen=True)
class Scene:
    """One image's attributes (named in the caption) and its unnamed nuisance: size and jitter."""

    color: str
    shape: str
    position: str
    background: str
    radius: float = 0.2  # fraction of the side
    dx: float = 0.0  # centre jitter, fraction of the side
    dy: float = 0.0

    @property
    def caption(self) -> str:
        return _TEMPLATE.format(color=self.color, shape=self.shape, position=self.position, background=self.background)

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (ATTRIBUTES order)."""
        return {k: ATTRIBUTES[k].index(v) for k, v in asdict(self).items() if k in ATTRIBUTES}


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes named by a caption of the world's grammar; raises ValueError for anything else."""
    words = caption.strip().lower().split()
    if len(words) != 10 or words[0] != "a" or words[3:5] != ["at", "the"] or words[6:8] != ["on", "a"] or words[9] != "background":
        raise ValueError(f"not a caption of the demo world: {caption!r}")
    attrs = {"color": words[1], "shape": words[2], "position": words[5], "background": words[8]}
    for k, v in attrs.items():
        if v not in ATTRIBUTES[k]:
            raise ValueError(f"unknown {k} {v!r} in caption {caption!r}")
    return attrs


def vocabulary() -> list[str]:
    """Every word a caption can contain (what the demo tokenizer turns into single tokens)."""
    words = {"a", "at", "the", "on", "background"}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)


def sample_scene(rng: random.Random) -> Scene:
    """Draw attributes uniformly (background distinct from the object) and the nuisance variables."""
    color, background = rng.sample(list(COLORS), 2)
    return Scene(
        color=color, shape=rng.choice(SHAPES), position=rng.choice(list(POSITIONS)), background=background,
        radius=rng.uniform(0.2, 0.25), dx=rng.uniform(-0.03, 0.03), dy=rng.uniform(-0.03, 0.03),
    )


def scene_for(attrs: dict[str, str], rng: random.Random) -> Scene:
    """A scene with the given named attributes and freshly drawn nuisance (an image a prompt could mean)."""
    nuisance = sample_scene(rng)
    return Scene(**attrs, radius=nuisance.radius, dx=nuisance.dx, dy=nuisance.dy)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` (4x supersampled, then downscaled for smooth edges)."""
    ss = 4 * size
    img = Image.new("RGB", (ss, ss), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    cx, cy, r = (fx + scene.dx) * ss, (fy + scene.dy) * ss, scene.radius * ss
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        q = 0.85 * r  # same visual area as the circle, roughly
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_scenes(n: int, seed: int) -> list[Scene]:
    """`n` scenes drawn from `random.Random(seed)`: the same seed always gives the same world."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def images_array(scenes: Sequence[Scene], size: int = 32) -> np.ndarray:
    """Render scenes into a uint8 array [N, size, size, 3]."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])


def write_world_shards(out_dir: str | Path, scenes: Sequence[Scene], per_shard: int, size: int = 32) -> list[str]:
    """Write the scenes as webdataset shards of png + txt (lossless: flat colours stay flat), each whole or not at all."""
    import webdataset as wds

    from ..checkpoint import atomic_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(scenes), per_shard)):
        path = out_dir / f"{s:05d}.tar"
        # A demo stopped while writing the last shard left it short (a valid tar after Ctrl-C, a cut one after a kill), and
        # a rerun, finding it, took the world as written and distilled its students from part of it.
        with atomic_file(path) as tmp, wds.TarWriter(str(tmp)) as sink:
            for i, scene in enumerate(scenes[start:start + per_shard]):
                buf = io.BytesIO()
                render(scene, size).save(buf, format="PNG")
                sink.write({"__key__": f"{s:05d}_{i:06d}", "png": buf.getvalue(), "txt": scene.caption})
        paths.append(str(path))
    return paths


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Train byte-pair merges on `words` until each is one symbol (so every caption word becomes one token)."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] if len(w) > 1 else [w + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        # Most frequent pair, ties broken by the pair itself: deterministic across runs.
        best = max(sorted(counts), key=lambda p: counts[p])
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out

"""Helpers that write tiny webdataset tar shards for the data-pipeline tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


def commands_mentioning(text: str) -> list[str]:
    """Command lines of the live processes (zombies have none) whose command line contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in cmd and int(pid) != os.getpid():
            found.append(cmd)
    return found


def image_bytes(img: Image.Image, fmt: str, **save_kw) -> bytes:
    """Encode a PIL image to bytes in the given format."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    """A single-colour image of the given PIL mode and (w, h) size."""
    return Image.new(mode, size, color)


def gray16(size: tuple[int, int], value: int) -> Image.Image:
    """A 16-bit grayscale (I;16) image filled with `value`."""
    return Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint16))


def png_with_trns(img: Image.Image, gray: int) -> bytes:
    """`img` as PNG with a grayscale tRNS chunk (`gray` is transparent), added by hand after the IHDR chunk: Pillow 10.0
    (the lowest pyproject allows) cannot save a 16-bit grayscale PNG with transparency."""
    import struct
    import zlib

    png = image_bytes(img, "PNG")
    at = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, 13 data bytes and CRC
    body = b"tRNS" + struct.pack(">H", gray)
    return png[:at] + struct.pack(">I", 2) + body + struct.pack(">I", zlib.crc32(body)) + png[at:]


def caption_json(text: str, field: str = "caption") -> bytes:
    """A json member carrying the caption in `field`."""
    return json.dumps({field: text, "width": 1}).encode()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes | str]]]) -> str:
    """Write (key, {ext: payload}) samples as a tar shard and return its path as a string."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                data = payload.encode() if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_sample(key: str, caption: str, size: tuple[int, int] = (40, 24)) -> tuple[str, dict[str, bytes | str]]:
    """An RGB jpg + txt sample."""
    return key, {"jpg": image_bytes(solid("RGB", size, (200, 30, 30)), "JPEG"), "txt": caption}


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail the block with TimeoutError after `seconds` (main thread, SIGALRM): a loader that regresses to looping
    over bad or filtered-out data forever (reference defect 4) then fails the test instead of hanging the suite."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: the loader hangs instead of raising")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

"""Shared fixtures: the shared data folder and synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository, or ``$NUCLEUS_SHARED_DATA``."""
    env = os.environ.get("NUCLEUS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; missing data is a test failure, never a skip."""
    root = shared_data_root()
    if not (root / "README.md").is_file():
        pytest.fail(
            f"shared data not found at {root}: tests need ../shared/data (or set NUCLEUS_SHARED_DATA)",
            pytrace=False,
        )
    return root


BACKGROUND = (232, 190, 215)  # pale eosin
NUCLEUS = (70, 45, 130)  # hematoxylin


def disk_centres(
    width: int, height: int, tile_sizes: tuple[int, ...], *, radius: float
) -> np.ndarray:
    """Disk centres (base px) placed on and around tile borders of several grids.

    Centres sit on every tile edge of each grid (straddling it), on corners,
    and a few pixels either side of the edge, spaced so disks never touch.
    """
    rng = np.random.default_rng(0)
    cand = []
    for t in tile_sizes:
        for e in range(t, max(width, height), t):
            for off in (-radius + 1, 0.0, radius - 1):
                for s in np.arange(radius * 3, max(width, height) - radius * 3, radius * 7):
                    cand.append((e + off, s + rng.uniform(-2, 2)))
                    cand.append((s + rng.uniform(-2, 2), e + off))
    cand = np.array(cand)
    ok = (
        (cand[:, 0] > radius + 3)
        & (cand[:, 0] < width - radius - 3)
        & (cand[:, 1] > radius + 3)
        & (cand[:, 1] < height - radius - 3)
    )
    cand = cand[ok]
    chosen: list[np.ndarray] = []
    for c in cand[rng.permutation(len(cand))]:
        if all(np.hypot(*(c - p)) > 2 * radius + 6 for p in chosen):
            chosen.append(c)
    return np.array(chosen)


def draw_disks(width: int, height: int, centres: np.ndarray, radius: float) -> np.ndarray:
    """RGB uint8 image: hematoxylin-coloured disks on a pale eosin background."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    for cx, cy in centres:
        x0, x1 = int(cx - radius - 2), int(cx + radius + 3)
        y0, y1 = int(cy - radius - 2), int(cy + radius + 3)
        sub = (xx[y0:y1, x0:x1] + 0.5 - cx) ** 2 + (yy[y0:y1, x0:x1] + 0.5 - cy) ** 2 <= radius**2
        img[y0:y1, x0:x1][sub] = NUCLEUS
    return img


def write_pyramidal_tiff(path: Path, img: np.ndarray, *, mpp: float | None) -> Path:
    """Tiled pyramidal TIFF (with resolution tags when ``mpp`` is given)."""
    import pyvips

    vimg = pyvips.Image.new_from_memory(
        np.ascontiguousarray(img).data, img.shape[1], img.shape[0], 3, "uchar"
    )
    kw = {"xres": 1000.0 / mpp, "yres": 1000.0 / mpp, "resunit": "cm"} if mpp else {}
    vimg.tiffsave(
        str(path), tile=True, tile_width=128, tile_height=128, pyramid=True, compression="lzw", **kw
    )
    return path


@pytest.fixture(scope="session")
def disk_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, float]:
    """A 1000x800 synthetic slide at 0.5 um/px with disks straddling tile borders."""
    radius = 7.0
    centres = disk_centres(1000, 800, (128, 200, 256), radius=radius)
    img = draw_disks(1000, 800, centres, radius)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("slides") / "disks.tif", img, mpp=0.5)
    return path, centres, radius


def ctrl_c_heard() -> None:
    """In the child: SIGINT as a terminal's job has it. A test run started
    in the background of a non-interactive shell (``cmd &``, nohup) has
    SIGINT ignored, which the child inherits and Python then keeps, so a
    Ctrl-C sent to it would be lost whatever the code does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

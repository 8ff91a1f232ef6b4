"""The tile runner: read ahead, run the model in batches, merge without seams.

Each tile is read with ``overlap`` pixels of context on every side, the model
segments the whole read window, and only nuclei whose centroid lies in the
tile's *core* are kept (cores partition the analysis region; see
:mod:`.tiling`).  Nuclei touching an inner edge of the read window are cut
and dropped: their centroid can only lie in a neighbour's core, where they
are whole.  A nucleus on a seam that two tiles outlined a little
differently, each with its centroid in its own core, is kept once: the
sighting deeper inside its own core.  So every nucleus is reported once,
uncut, whatever the tile size or overlap, as long as the overlap exceeds
the largest nucleus.

Schedulers (HistomicsTK's names): ``""`` serial (reads prefetched on a
thread), ``"multithreading"`` (a thread pool), ``"multiprocessing"`` (a local
dask.distributed cluster of processes) or ``"tcp://host:port"`` (an existing
dask scheduler); and ``"pipeline"``: the network here, post-processing in a
pool of processes (for a GPU).  Dask workers open the slide and build the
model themselves, and pipeline workers get the maps and the model's
post-processing setting, so only small, picklable descriptions travel.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..instances import nuclei_from_labels
from ..types import Nuclei
from .slide import level_multiple
from .tiling import Tile, in_core, polygon_share, seam_duplicates

__all__ = ["TileJob", "run_tiles", "resolve_workers"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs, picklable.

    ``downsample`` is base pixels per analysis pixel; ``image_size`` the
    slide size in analysis pixels, ``base_size`` in base pixels.
    """

    slide_path: str
    input_mpp: float | None
    model_name: str
    model_options: tuple[tuple[str, Any], ...]
    context: dict[str, Any] = field(default_factory=dict)
    downsample: float = 1.0
    image_size: tuple[int, int] = (0, 0)
    analysis_mpp: float = 0.5
    base_size: tuple[int, int] = (0, 0)
    #: the slide's :attr:`~.slide.Slide.white` (from its overview), so a
    #: worker that opens the slide scales its samples as the run did
    white: float | None = None
    #: and its :attr:`~.slide.Slide.alpha_white`
    alpha_white: float | None = None
    #: and its :attr:`~.slide.Slide.frame` (the frame of a multi-frame slide read)
    frame: int | None = None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup quota allows this process (a container started with
    ``--cpus 4``: 4.0), from cgroup v2's ``cpu.max`` or v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None without a quota."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, lowered to a
    cgroup quota (``os.cpu_count()`` counts the host's, so a container
    limited to 4 of 64 cores would start 64 workers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, int(limit))
    return max(1, cores)


def resolve_workers(num_workers: int) -> int:
    """``num_workers`` > 0 as given; 0 = all available cores
    (:func:`available_cores`); < 0 = all minus ``|n|``."""
    cores = available_cores()
    if num_workers > 0:
        return num_workers
    return max(1, cores + num_workers)


@lru_cache(maxsize=4)
def _slide(
    path: str,
    input_mpp: float | None,
    white: float | None = None,
    alpha_white: float | None = None,
    frame: int | None = None,
) -> Any:
    from .slide import open_slide

    slide = open_slide(path, input_mpp=input_mpp)
    slide.white, slide.alpha_white, slide.frame = white, alpha_white, frame
    return slide


_MODEL_LOCK = threading.Lock()


def _model(name: str, options: tuple[tuple[str, Any], ...]) -> Any:
    """The process's one instance of a model, shared by its worker threads.

    Built once even when workers ask at the same moment: besides the
    wasted work, an int8 network is traced with torch.fx while it is
    built, which patches ``torch.nn.Module`` for every thread, so a second
    build (or inference) on another thread meanwhile would break it."""
    with _MODEL_LOCK:
        return _built_model(name, options)


def shared_model(name: str, options: dict[str, Any]) -> Any:
    """The instance of model ``name`` built with ``options`` that this
    process's tile workers use (:func:`_model`): a run that needs the model
    before its tiles (to prepare stain statistics, or to find a
    size-normalised model's scale) asks for it here, so it is built once,
    not once for the run and again for the tiles (0.02 s for a float U-Net
    after the first, 0.1 s for an int8 one, which traces the network again)."""
    return _model(name, tuple(sorted(options.items())))


@lru_cache(maxsize=4)
def _built_model(name: str, options: tuple[tuple[str, Any], ...]) -> Any:
    from ..models import get_model

    return get_model(name, **dict(options))


def _base_window(job: TileJob, tile: Tile) -> tuple[int, int, int, int]:
    """The base pixels a tile's read window is read from: its analysis-pixel
    edges times the downsample, rounded to whole pixels (within the slide:
    its size from ``base_size``, which spares a post-processing process the
    slide's opening)."""
    x0, y0, x1, y1 = tile.read
    d = job.downsample
    width, height = job.base_size
    if width <= 0 or height <= 0:
        slide = _slide(job.slide_path, job.input_mpp, job.white, job.alpha_white, job.frame)
        width, height = slide.width, slide.height
    out_w, out_h = x1 - x0, y1 - y0
    f = 1
    while True:
        # edges on multiples of f base pixels (1: whole pixels; more where the
        # read is from a pyramid level, which large_image floors them to), at
        # least f wide: upsampled, a window of a pixel or two (a tile size of
        # 1, or a last tile one pixel wide without overlap) rounded to none
        bx0, bx1 = _snapped(x0 * d, x1 * d, f, width)
        by0, by1 = _snapped(y0 * d, y1 * d, f, height)
        need = level_multiple(bx1 - bx0, by1 - by0, out_w, out_h)
        if need <= f:  # (powers of two: a multiple of f is one of need)
            return bx0, by0, bx1, by1
        f = need


def _snapped(a0: float, a1: float, f: int, size: int) -> tuple[int, int]:
    """``[a0, a1)`` with its edges rounded to multiples of ``f``, within
    ``[0, size)``: the last edge at most the last multiple of ``f`` in it
    (large_image reads no partial level pixel), where the window is not
    narrower than ``f`` there."""
    last = size - size % f if size >= f else size
    lo = min(f * int(round(a0 / f)), max(last - f, 0))
    hi = min(max(f * int(round(a1 / f)), lo + f), last if last > lo else size)
    return lo, hi


def read_tile(job: TileJob, tile: Tile) -> np.ndarray:
    """Read a tile's window at the analysis resolution."""
    slide = _slide(job.slide_path, job.input_mpp, job.white, job.alpha_white, job.frame)
    x0, y0, x1, y1 = tile.read
    bx0, by0, bx1, by1 = _base_window(job, tile)
    return slide.read_region(bx0, by0, bx1 - bx0, by1 - by0, out_w=x1 - x0, out_h=y1 - y0)


def _tile_nuclei(job: TileJob, tile: Tile, inst: Any) -> Nuclei:
    """Keep the tile's own, uncut nuclei and map them to base pixels (only
    their outlines are traced).

    The window's pixels are mapped back to the base pixels it was read from
    (:func:`_base_window`), not to its edges times the downsample: those are
    rounded to whole base pixels, differently in each tile, so a nucleus on
    a seam was placed up to half a base pixel apart by its two tiles, and
    could be kept by both (or neither)."""
    rx0, ry0, rx1, ry1 = tile.read
    bx0, by0, bx1, by1 = _base_window(job, tile)
    scale = ((bx1 - bx0) / (rx1 - rx0), (by1 - by0) / (ry1 - ry0))  # base px per window px
    W, H = job.image_size

    def own(centroids: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        b = boxes + (rx0, ry0, rx0, ry0)
        # cut at an inner edge of the read window (not at the slide border)
        cut = (
            ((b[:, 0] <= rx0) & (rx0 > 0))
            | ((b[:, 1] <= ry0) & (ry0 > 0))
            | ((b[:, 2] >= rx1) & (rx1 < W))
            | ((b[:, 3] >= ry1) & (ry1 < H))
        )
        # the centroid where it lies on the slide, on the grid the cores partition
        at = (centroids * scale + (bx0, by0)) / job.downsample
        return in_core(at, tile.core) & ~cut

    base_mpp = job.analysis_mpp / job.downsample
    nuc = nuclei_from_labels(
        inst.labels,
        scores=inst.scores,
        classes=inst.classes,
        pixel_area_um2=base_mpp**2 * scale[0] * scale[1],
        keep=own,
    )
    if not len(nuc):
        return nuc
    # area_px counts window pixels: in base pixels, as every coordinate is
    nuc.measurements["area_px"] = nuc.measurements["area_px"] * scale[0] * scale[1]
    return nuc.transformed(scale=scale, offset=(bx0, by0))


def process_tiles(
    job: TileJob, tiles: Sequence[Tile], images: Sequence[np.ndarray] | None = None
) -> tuple[Nuclei, dict[str, float]]:
    """Read (unless given), segment and merge one batch of tiles.

    Returns the nuclei and the seconds spent per stage: ``read``, ``network``
    (model preprocess + forward) and ``postprocess`` (instances, polygons,
    seam rule).
    """
    model = _model(job.model_name, job.model_options)
    t0 = time.perf_counter()
    if images is None:
        images = [read_tile(job, t) for t in tiles]
    t1 = time.perf_counter()
    raw = model.forward(model.preprocess(list(images), job.context))
    t2 = time.perf_counter()
    results = model.postprocess(raw, list(images), job.context)
    nuc = _merged(job, tiles, results)
    t3 = time.perf_counter()
    return nuc, {"read": t1 - t0, "network": t2 - t1, "postprocess": t3 - t2}


def _merged(job: TileJob, tiles: Sequence[Tile], results: Sequence[Any]) -> Nuclei:
    return Nuclei.concat([_tile_nuclei(job, t, r) for t, r in zip(tiles, results, strict=True)])


def postprocess_batch(
    job: TileJob,
    post: Callable[[Any, list[tuple[int, ...]]], Sequence[Any]],
    tiles: Sequence[Tile],
    raw: np.ndarray | tuple[str, tuple[int, ...], str],
    shapes: list[tuple[int, ...]],
) -> tuple[Nuclei, dict[str, float]]:
    """Post-process and merge one batch from the network's raw output
    (a model's :meth:`~nucleus_models.models.base.NucleusModel.postprocessor`),
    in a process of the pipeline's pool. ``raw`` is the array, or the name,
    shape and dtype of the shared memory that holds it (:class:`_SharedBlocks`)."""
    t0 = time.perf_counter()
    if isinstance(raw, tuple):
        raw = _SharedBlocks.get(raw)
    nuc = _merged(job, tiles, post(raw, shapes))
    return nuc, {"postprocess": time.perf_counter() - t0}


def _shm_free_bytes(folder: str = "/dev/shm") -> int | None:
    """Free bytes of the tmpfs behind POSIX shared memory, None where there
    is none to ask (not Linux)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _SharedBlocks:
    """Blocks of shared memory that carry batches' maps to the workers,
    each reused once its batch is done. A batch's maps (2 x 3 x 704 x 704
    float32, 12 MB) took ~50 ms a round trip through the pool's pipe on 2
    cores, about what the watershed takes for them; copying them into a
    fresh block 14 ms (0.41 s per 100 MP, mostly the first touch of new
    pages), into a reused one less. Where ``/dev/shm`` has not twice a new
    block's size free, the maps go through the pipe instead: Docker gives a
    container 64 MB unless told otherwise, and writing past it would kill
    the run (SIGBUS), not fail."""

    def __init__(self) -> None:
        self.idle: list[Any] = []

    def put(self, raw: np.ndarray) -> tuple[Any, np.ndarray | tuple[str, tuple[int, ...], str]]:
        """``raw`` in a block, and what :func:`postprocess_batch` needs to
        find it; or no block and ``raw`` itself."""
        from multiprocessing.shared_memory import SharedMemory

        raw = np.ascontiguousarray(raw)
        fits = [b for b in self.idle if b.size >= raw.nbytes]
        if fits:
            shm = min(fits, key=lambda b: b.size)
            self.idle.remove(shm)
        else:
            free = _shm_free_bytes()
            if free is not None and free < 2 * raw.nbytes:
                return None, raw
            shm = SharedMemory(create=True, size=max(1, raw.nbytes))
        np.ndarray(raw.shape, raw.dtype, buffer=shm.buf)[...] = raw
        return shm, (shm.name, raw.shape, raw.dtype.str)

    @staticmethod
    def get(where: tuple[str, tuple[int, ...], str]) -> np.ndarray:
        """A copy of the array :meth:`put` placed ``where`` (in a worker)."""
        from multiprocessing.shared_memory import SharedMemory

        name, shape, dtype = where
        shm = SharedMemory(name=name)
        try:
            return np.array(np.ndarray(shape, np.dtype(dtype), buffer=shm.buf))
        finally:
            shm.close()

    def done(self, shm: Any) -> None:
        """``shm``'s batch is done: the block may carry another."""
        if shm is not None:
            self.idle.append(shm)

    def close(self, *busy: Any) -> None:
        """Free the idle blocks and ``busy`` ones."""
        for shm in [*self.idle, *busy]:
            if shm is not None:
                shm.close()
                shm.unlink()
        self.idle = []


def _postprocess_worker_init() -> None:
    """A pipeline worker: one thread for OpenCV (the workers are the
    parallelism), and the post-processing's imports done while the network
    starts, not on the first batch."""
    import cv2
    import scipy.ndimage  # noqa: F401
    import skimage.segmentation  # noqa: F401

    cv2.setNumThreads(1)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Give each of several worker threads ``n`` torch threads (cores / workers)
    instead of letting every worker's network use all cores at once: on 2 cores
    two single-threaded workers finish the U-Net's tiles ~20% sooner."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batches(tiles: Sequence[Tile], size: int) -> list[list[Tile]]:
    """``tiles`` in batches of up to ``size`` tiles of one read size each, in
    the order of their first tile.

    A batch is padded to its largest tile, so a narrow tile at the slide's
    right or bottom edge batched with a full one costs a full tile, and its
    nuclei depended on which tile it was batched with.  On a 100 MP 40x
    mosaic (7 x 7 tiles at 0.4 um/px, batches of 2) the network ran on 54.7
    padded megapixels instead of 48.0.

    >>> full, edge = (0, 0, 1120, 1120), (0, 0, 154, 1120)
    >>> ts = [Tile(i, r, r) for i, r in enumerate([full, full, edge, full, full, edge])]
    >>> [[t.index for t in b] for b in _batches(ts, 2)]
    [[0, 1], [2, 5], [3, 4]]
    """
    groups: dict[tuple[int, int], list[tuple[int, Tile]]] = {}
    for pos, t in enumerate(tiles):
        groups.setdefault(t.read_size, []).append((pos, t))
    batches = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
    batches.sort(key=lambda b: b[0][0])
    return [[t for _, t in b] for b in batches]


def _timed_read(job: TileJob, tile: Tile) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    img = read_tile(job, tile)
    return img, time.perf_counter() - t0


def _prefetched(
    job: TileJob, tiles: Sequence[Tile], depth: int, readers: int = 1
) -> Generator[tuple[Tile, np.ndarray, float], None, None]:
    """Yield ``(tile, image, read seconds)``, in order, while ``readers``
    threads read up to ``depth`` tiles ahead."""
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="tile-read") as pool:
        pending: list[tuple[Tile, Future[tuple[np.ndarray, float]]]] = []
        it = iter(tiles)
        for t in it:
            pending.append((t, pool.submit(_timed_read, job, t)))
            if len(pending) >= depth:
                break
        while pending:
            t, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_timed_read, job, nxt)))
            img, secs = fut.result()
            yield t, img, secs


@contextmanager
def _read_ahead(
    job: TileJob,
    batches: list[list[Tile]],
    stages: dict[str, float],
    *,
    depth: int,
    readers: int = 1,
) -> Iterator[Iterator[tuple[list[Tile], list[np.ndarray]]]]:
    """The batches with their tiles' images, read ahead (:func:`_prefetched`),
    their reading time added to ``stages["read"]``; the readers stop when
    the block is left."""
    ordered = [t for b in batches for t in b]
    with closing(_prefetched(job, ordered, depth=depth, readers=readers)) as stream:

        def each() -> Iterator[tuple[list[Tile], list[np.ndarray]]]:
            for b in batches:
                got = list(islice(stream, len(b)))
                stages["read"] += sum(secs for _, _, secs in got)
                yield b, [img for _, img, _ in got]

        yield each()


def run_tiles(
    job: TileJob,
    tiles: Sequence[Tile],
    *,
    scheduler: str = "",
    num_workers: int = 0,
    batch_size: int = 1,
    progress: Progress | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> Nuclei:
    """Run the model over ``tiles`` and return the merged nuclei (base pixels).

    The result is sorted by (y, x) of the centroid, so it does not depend on
    the scheduler or on the order in which tiles finish.  ``stage_seconds``,
    if given, receives the seconds per stage summed over all tiles (with
    parallel workers these add up to more than the wall time).
    """
    batch_size = max(1, int(batch_size))
    batches = _batches(tiles, batch_size)
    total = len(tiles)
    done = 0
    parts: list[Nuclei] = []
    stages = {"read": 0.0, "network": 0.0, "postprocess": 0.0}

    def collect(res: tuple[Nuclei, dict[str, float]], n: int) -> None:
        nonlocal done
        parts.append(res[0])
        for k, v in res[1].items():
            stages[k] += v
        done += n
        if progress is not None:
            progress(done, total)

    sched = (scheduler or "").strip()
    if sched == "":
        torch = sys.modules.get("torch")
        # torch's default counts the host's cores; keep within a container's
        threads = min(torch.get_num_threads(), available_cores()) if torch else 1
        with (
            _torch_threads(threads),
            _read_ahead(job, batches, stages, depth=2 * batch_size) as read,
        ):
            for b, images in read:
                collect(process_tiles(job, b, images), len(b))
    elif sched == "pipeline":
        _run_pipeline(job, batches, resolve_workers(num_workers), batch_size, collect, stages)
    elif sched == "multithreading":
        from concurrent.futures import as_completed

        workers = resolve_workers(num_workers)
        with _torch_threads(max(1, available_cores() // workers)):
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                futs = {pool.submit(process_tiles, job, b): len(b) for b in batches}
                for fut in as_completed(futs):
                    collect(fut.result(), futs[fut])
            finally:
                # an error or SIGTERM: the queued batches are not run first
                pool.shutdown(wait=True, cancel_futures=True)
    elif sched == "multiprocessing" or "://" in sched or ":" in sched:
        _run_dask(job, batches, sched, num_workers, collect)
    else:
        raise ParameterError(
            f"unknown scheduler {scheduler!r}: use '', 'multithreading', 'multiprocessing',"
            " 'pipeline' or tcp://host:port"
        )
    if stage_seconds is not None:
        stage_seconds.update(stages)
    merged = Nuclei.concat(parts)
    if len(merged):
        order = np.lexsort((merged.centroids[:, 0], merged.centroids[:, 1]))
        merged = merged.select(order)
        # (in that order, so which of a seam duplicate's two goes does not
        # depend on the scheduler either)
        twice = seam_duplicates(
            merged.centroids / job.downsample,
            merged.boxes / job.downsample,
            [t.core for t in tiles],
            polygon_share(merged.polygon),
        )
        if twice.any():
            merged = merged.select(~twice)
    return merged


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start processes without the ``__main__`` module: a spawned child
    imports its parent's main script again (to unpickle what it defines), so
    a script that calls :func:`run_tiles` outside ``if __name__ ==
    "__main__":`` would run itself again in every worker, and fail there.
    The workers run only this package's functions, so they need none of it."""
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _run_pipeline(
    job: TileJob,
    batches: list[list[Tile]],
    workers: int,
    batch_size: int,
    collect: Callable[[tuple[Nuclei, dict[str, float]], int], None],
    stages: dict[str, float],
) -> None:
    """The network here, batch after batch (tiles read ahead on reader
    threads), and post-processing in ``workers`` processes meanwhile: what an empty
    scheduler runs on a GPU, whose network outpaces one core's watershed
    many times over. Not threads: post-processing gives the interpreter lock
    back and takes it again around every NumPy/SciPy call, so in a thread
    it runs only as fast as the process's other Python lets it (12 batches:
    2.4-2.6 s alone, ~290 s beside a thread running a Python loop). The
    processes are spawned (a forked child of a process that holds a CUDA
    context or OpenMP threads can hang) and get only the maps, the model's
    setting and the tiles' places; at most two batches a worker wait for
    them, so memory stays bounded however fast the network is."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    model = _model(job.model_name, job.model_options)
    post = model.postprocessor()
    if post is None:
        raise ParameterError(
            f"model {job.model_name} cannot post-process apart from its network:"
            " use the scheduler '' or 'multithreading'"
        )
    # one reader thread read the 100 MP mosaic's 49 tiles in 1.35-1.67 s,
    # two in 1.01-1.07 s (2 cores): with the network on a GPU and the
    # watershed in several processes, reading comes next
    readers = 2 if workers > 1 else 1
    # each batch in flight: its tile count and the shared memory of its maps
    pending: dict[Future[tuple[Nuclei, dict[str, float]]], tuple[int, Any]] = {}

    blocks = _SharedBlocks()

    def drain(most: int) -> None:
        """Collect finished batches until at most ``most`` are in flight."""
        while len(pending) > most:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                n, shm = pending.pop(fut)
                blocks.done(shm)  # the worker copied the maps out before it returned
                collect(fut.result(), n)

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_postprocess_worker_init,
    )
    try:
        with _main_hidden():  # start every worker now, beside the first batches' network
            for _ in range(workers):
                pool.submit(int)
        with (
            # a CPU's network (tests, measurements) leaves the workers their cores
            _torch_threads(max(1, available_cores() - workers)),
            _read_ahead(job, batches, stages, depth=4 * batch_size, readers=readers) as read,
        ):
            for b, images in read:
                t0 = time.perf_counter()
                raw = model.forward(model.preprocess(images, job.context))
                stages["network"] += time.perf_counter() - t0
                shapes = [img.shape[:2] for img in images]
                shm, where = blocks.put(raw)
                try:
                    with _main_hidden():  # submit may start a worker
                        fut = pool.submit(postprocess_batch, job, post, b, where, shapes)
                except BaseException:
                    blocks.done(shm)
                    raise
                pending[fut] = (len(b), shm)
                drain(2 * workers - 1)
        drain(0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        blocks.close(*(shm for _, shm in pending.values()))


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """dask.distributed's INFO lines (ports, nannies, comms: ~30 a run) kept
    out of the job's log; its warnings and errors still show."""
    import distributed  # noqa: F401  (its first import sets its loggers to INFO)

    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        quiet.setLevel(level)


@contextmanager
def _signals_held() -> Iterator[None]:
    """A cancel (SIGTERM) held back while a local dask cluster's scheduler
    starts and its workers are spawned (~0.1 s), then raised as usual, and
    SIGINT ignored meanwhile.

    The worker processes spawned meanwhile inherit that SIGINT is ignored
    (Python leaves an ignored SIGINT so): a terminal's Ctrl-C, sent to the
    whole process group, reached each worker, which printed two screens of
    dask's asyncio traceback; now only this process gets it and stops them
    (a worker its nanny restarts later is set so by ``dask_worker``). A
    Ctrl-C in this short while is lost (press it again); one while the
    workers start stops the run. And a signal raised inside
    ``LocalCluster()`` left a cluster half started and unreachable, closed
    at exit by dask's finalizers with their INFO lines. Outside the main
    thread (a library caller's thread) nothing is held: signals are the
    main thread's."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def note(signum: int, frame: Any) -> None:
        got.append(signum)

    # (a signal can land between any two of these calls: each handler is
    # put back whatever lands, SIGTERM's first, while SIGINT is still ignored)
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, note)
        yield
    finally:
        try:
            signal.signal(signal.SIGTERM, before_term)
        finally:
            signal.signal(signal.SIGINT, before_int)
        if got:
            signal.raise_signal(signal.SIGTERM)  # (its handler raises, or the default ends us)


#: the dask preload run at every start of a local cluster's worker
_WORKER_SETUP = "nucleus_models.wsi.dask_worker"


def _worker_preloads(config: Any) -> dict[str, Any]:
    """``LocalCluster``'s ``preload`` and ``preload_argv``: dask's configured
    worker preloads, then :data:`_WORKER_SETUP`.

    dask takes ``distributed.worker.preload`` as one name or a list, and
    ``preload-argv`` as one argument list for all or one list per preload: a
    name unpacked as a list became one preload per character (``No module
    named 'm'``), and one list per preload was one short (dask's
    "preload and preload_argv have mismatched lengths"): no worker started."""
    preload = config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = config.get("distributed.worker.preload-argv", None) or []
    out: dict[str, Any] = {"preload": [*preload, _WORKER_SETUP]}
    if argv and not isinstance(argv[0], str):  # (one list per preload: none for ours)
        out["preload_argv"] = [*argv, []]
    return out


def _nannies(cluster: Any) -> set[Any]:
    """A local cluster's nannies, those still starting their worker too (a
    cluster lists them in ``workers`` only once all have started)."""
    nannies = set(getattr(cluster, "workers", {}).values())
    nannies.update(getattr(cluster, "_created", ()))
    return nannies


def _start_workers(cluster: Any, n: int) -> concurrent.futures.Future[None]:
    """Start ``n`` workers of a local cluster, not waiting for them (2-5 s),
    once their processes are spawned (~0.1 s, or 10 s at most).

    ``LocalCluster(n_workers=n)`` waited for them with SIGINT ignored (the
    workers inherit it), so a Ctrl-C meanwhile was lost. What
    ``cluster.scale(n)`` starts, but as a future of this caller's: a Ctrl-C
    or cancel that kills the workers as they start fails their start, which
    ``scale`` left to tornado's log (an ERROR traceback of 20 lines)."""
    import asyncio

    for _ in range(n):
        cluster.worker_spec.update(cluster.new_worker_spec())

    async def correct() -> None:
        await cluster._correct_state()

    started = asyncio.run_coroutine_threadsafe(correct(), cluster.loop.asyncio_loop)
    deadline = time.monotonic() + 10
    while sum(1 for nanny in _nannies(cluster) if nanny.pid) < n and not started.done():
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return started


def _stop_workers_now(cluster: Any) -> None:
    """Kill a local cluster's worker processes, not waiting for their tiles:
    on a cancel, ``cluster.close()`` waited for every batch in progress
    (2.5-3 s on 2 busy cores, ~5 s reported on a loaded host, of the 10 s
    docker allows before SIGKILL). Their nannies are told first that the
    workers are going, or they start new ones. Workers still starting are
    killed too (a Ctrl-C or cancel while the cluster starts)."""
    import signal

    for nanny in _nannies(cluster):
        with contextlib.suppress(Exception):  # (a worker not started, or gone)
            nanny.close_gracefully(reason="cancelled")
            pid = nanny.pid
            if pid:
                os.kill(pid, signal.SIGKILL)


def _close_dask(client: Any, cluster: Any) -> None:
    """Close the client, then the local cluster (if any), whatever lands.

    A cancel or Ctrl-C during ``client.close()`` skipped ``cluster.close()``
    and left the worker processes running (until this process's exit; for
    ever in a library caller's). Now an interruption of either close kills
    the workers and closes the cluster with SIGTERM held and SIGINT ignored
    (~0.5 s), and is then raised."""
    try:
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()
    except BaseException:
        if cluster is not None:
            # (a close that failed midway leaves the cluster "closing": waited for at most 5 s)
            with _signals_held(), contextlib.suppress(Exception):
                _stop_workers_now(cluster)
                cluster.close(timeout=5)
        raise


@_quiet_distributed()
def _run_dask(
    job: TileJob,
    batches: list[list[Tile]],
    sched: str,
    num_workers: int,
    collect: Callable[[tuple[Nuclei, dict[str, float]], int], None],
) -> None:
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    client = None
    try:
        if sched == "multiprocessing":
            # the scheduler, and the workers' processes spawned; then their
            # start, when a Ctrl-C or cancel stops the run at once
            with _signals_held():
                cluster = LocalCluster(
                    n_workers=0,
                    threads_per_worker=1,
                    processes=True,
                    # dask's HTTP server runs anyway (no bokeh, no dashboard): on a port
                    # of its own on loopback, not 8787 (taken by another run: a warning)
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.ERROR,
                    # SIGINT ignored in a worker its nanny restarts too (after
                    # those of dask's config, which this argument replaced)
                    **_worker_preloads(dask.config),
                )
                # (before the workers: a client made while they start waited for them)
                client = Client(cluster)
                started = _start_workers(cluster, resolve_workers(num_workers))
            started.result()
        else:
            address = sched if "://" in sched else f"tcp://{sched}"
            try:
                client = Client(address, timeout="20s")
            # (ValueError: an inproc address not of this process)
            except (OSError, ValueError) as exc:
                raise ParameterError(f"cannot reach dask scheduler {address}: {exc}") from exc
        futs = [client.submit(process_tiles, job, b, pure=False) for b in batches]
        sizes = {f.key: len(b) for f, b in zip(futs, batches, strict=True)}
        for fut in as_completed(futs):
            collect(fut.result(), sizes[fut.key])
    except BaseException as exc:
        # a cancel (SIGTERM) or Ctrl-C: this run's own workers go at once
        if not isinstance(exc, Exception) and cluster is not None:
            _stop_workers_now(cluster)
        raise
    finally:
        _close_dask(client, cluster)


def segment_array(
    image: np.ndarray,
    model: Any,
    context: dict[str, Any],
    *,
    tile_size: int,
    overlap: int,
    batch_size: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment an in-memory RGB image (at the model's resolution) tile by tile.

    The same seam rules as :func:`run_tiles`: each tile contributes the uncut
    instances whose centroid lies in its core, and of a nucleus two tiles
    both kept (outlined a little differently) the deeper sighting stays
    (:func:`.tiling.seam_duplicates`, with the overlap from the two tiles'
    label maps).  Returns one ``(H, W)`` int32
    label map (instances numbered in tile order, 1..N) and the per-label
    ``scores`` and ``classes`` (indexed by label id, entry 0 unused).
    """
    from scipy import ndimage as ndi

    from .tiling import tile_grid

    h, w = image.shape[:2]
    tiles = tile_grid((0, 0, w, h), tile_size=tile_size, overlap=overlap, image_size=(w, h))
    out = np.zeros((h, w), np.int32)
    scores: list[np.ndarray] = [np.zeros(1, np.float32)]
    classes: list[np.ndarray] = [np.zeros(1, np.int32)]
    next_id = 1
    found: dict[int, Any] = {}
    for batch in _batches(tiles, max(1, batch_size)):
        crops = [
            np.ascontiguousarray(image[t.read[1] : t.read[3], t.read[0] : t.read[2]]) for t in batch
        ]
        for t, inst in zip(batch, model.predict_batch(crops, context), strict=True):
            found[t.index] = inst
    # each tile's own, uncut instances: (tile, label id, centroid, box, area)
    own: list[tuple[Tile, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for t in tiles:  # numbered in tile order, whatever order the batches ran in
        lab = found[t.index].labels
        n = int(lab.max(initial=0))
        if n == 0:
            continue
        flat = lab.ravel()
        cnt = np.bincount(flat, minlength=n + 1)
        rows, cols = np.indices(lab.shape)
        cy = np.bincount(flat, rows.ravel(), minlength=n + 1) / np.maximum(cnt, 1) + 0.5 + t.read[1]
        cx = np.bincount(flat, cols.ravel(), minlength=n + 1) / np.maximum(cnt, 1) + 0.5 + t.read[0]
        keep = in_core(np.c_[cx, cy], t.core) & (cnt > 0)
        rx0, ry0, rx1, ry1 = t.read
        edge = np.zeros(n + 1, bool)
        if rx0 > 0:
            edge[np.unique(lab[:, 0])] = True
        if ry0 > 0:
            edge[np.unique(lab[0, :])] = True
        if rx1 < w:
            edge[np.unique(lab[:, -1])] = True
        if ry1 < h:
            edge[np.unique(lab[-1, :])] = True
        keep &= ~edge
        keep[0] = False
        ids = np.flatnonzero(keep)
        slices = ndi.find_objects(lab)
        box = np.array(
            [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in (slices[i - 1] for i in ids)],
            np.float64,
        ).reshape(-1, 4) + (rx0, ry0, rx0, ry0)
        own.append((t, ids, np.c_[cx, cy][ids], box, cnt[ids]))
    which = np.array([k for k, o in enumerate(own) for _ in o[1]], np.int64)
    label = np.concatenate([o[1] for o in own]) if own else np.zeros(0, np.int64)
    area = np.concatenate([o[4] for o in own]) if own else np.zeros(0)
    boxes = np.concatenate([o[3] for o in own]).astype(np.int64) if own else np.zeros((0, 4))

    def share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The share of the smaller of instances a[k], b[k] (of two tiles)
        that the other covers, from the two tiles' label maps (where both
        boxes are: each instance lies in its own)."""
        out = np.zeros(len(a))
        for k, (i, j) in enumerate(zip(a, b, strict=True)):
            ti, tj = own[which[i]][0], own[which[j]][0]
            x0, y0 = np.maximum(boxes[i, :2], boxes[j, :2]).tolist()
            x1, y1 = np.minimum(boxes[i, 2:], boxes[j, 2:]).tolist()
            if x1 <= x0 or y1 <= y0:
                continue
            li, lj = found[ti.index].labels, found[tj.index].labels
            mi = li[y0 - ti.read[1] : y1 - ti.read[1], x0 - ti.read[0] : x1 - ti.read[0]]
            mj = lj[y0 - tj.read[1] : y1 - tj.read[1], x0 - tj.read[0] : x1 - tj.read[0]]
            both = np.count_nonzero((mi == label[i]) & (mj == label[j]))
            out[k] = both / max(min(area[i], area[j]), 1)
        return out

    twice = (
        seam_duplicates(
            np.concatenate([o[2] for o in own]),
            boxes.astype(np.float64),
            [t.core for t in tiles],
            share,
        )
        if own
        else np.zeros(0, bool)
    )
    at = 0
    for t, ids, *_ in own:
        gone = twice[at : at + len(ids)]
        at += len(ids)
        ids = ids[~gone]
        lab = found[t.index].labels
        inst = found[t.index]
        remap = np.zeros(int(lab.max()) + 1, np.int32)
        remap[ids] = np.arange(next_id, next_id + len(ids), dtype=np.int32)
        next_id += len(ids)
        scores.append(np.asarray(inst.scores, np.float32)[ids])
        classes.append(np.asarray(inst.classes, np.int32)[ids])
        new = remap[lab]
        rx0, ry0, rx1, ry1 = t.read
        view = out[ry0:ry1, rx0:rx1]
        view[new > 0] = new[new > 0]
    return out, np.concatenate(scores), np.concatenate(classes)

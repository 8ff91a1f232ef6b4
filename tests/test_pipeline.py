"""The ``pipeline`` scheduler: the network in this process, the watershed in a
pool of spawned processes (what an empty scheduler runs on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from nucleus_models.detection import DetectionParams, detect_nuclei, effective_scheduler
from nucleus_models.errors import ParameterError

REPO = Path(__file__).resolve().parents[1]


def _shm_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def _image(shared_data: Path) -> Path:
    return sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))[0]


def _params(image: Path, **kw: object) -> DetectionParams:
    base: dict[str, object] = {
        "inputImageFile": str(image),
        "model": "unet-monuseg",
        "input_mpp": 0.25,
        "device": "cpu",
        "precision": "float32",
        "analysis_tile_size": 256,  # 625 px at 0.4 um/px: 3 x 3 tiles
        "batch_size": 2,
    }
    base.update(kw)
    return DetectionParams(**base)  # type: ignore[arg-type]


def test_pipeline_finds_the_same_nuclei_as_a_serial_run(shared_data: Path) -> None:
    image = _image(shared_data)
    before = _shm_blocks()
    serial = detect_nuclei(_params(image, num_workers=1))
    piped = detect_nuclei(_params(image, scheduler="pipeline", num_workers=2))
    assert (serial.tiles["scheduler"], serial.tiles["workers"]) == ("serial", 1)
    assert (piped.tiles["scheduler"], piped.tiles["workers"]) == ("pipeline", 2)
    assert serial.tiles["total"] == 9 and len(serial.nuclei) > 300
    assert len(piped.nuclei) == len(serial.nuclei)
    np.testing.assert_array_equal(piped.nuclei.polygon_vertices, serial.nuclei.polygon_vertices)
    np.testing.assert_array_equal(piped.nuclei.centroids, serial.nuclei.centroids)
    # the pipeline's network runs on the cores its workers leave (here 1
    # thread, serially 2): float32 sums in another order, maps within 1e-7
    np.testing.assert_allclose(piped.nuclei.scores, serial.nuclei.scores, rtol=1e-6)
    assert piped.timings["postprocess_cpu"] > 0 and piped.timings["network_cpu"] > 0
    # every batch's shared memory is given back
    assert _shm_blocks() - before == set()


def test_without_room_in_shared_memory_the_maps_go_through_the_pipe(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's /dev/shm (Docker: 64 MB unless told otherwise) too
    small for a batch's maps: they travel through the pool's pipe, with the
    same nuclei, instead of a write past the end of /dev/shm (SIGBUS)."""
    from multiprocessing import shared_memory

    from nucleus_models.wsi import runner

    image = _image(shared_data)
    created: list[int] = []
    real = shared_memory.SharedMemory

    def counting(*a: object, **kw: object) -> object:
        if kw.get("create"):
            created.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(shared_memory, "SharedMemory", counting)
    ref = detect_nuclei(_params(image, scheduler="pipeline", num_workers=2, batch_size=1))
    # 9 batches, at most 2 a worker waiting and 1 being filled: blocks are reused
    assert 1 <= len(created) <= 5
    created.clear()
    # a batch's maps are up to 3 x 352 x 352 float32 (1.5 MB): 256 kB free is too little
    monkeypatch.setattr(runner, "_shm_free_bytes", lambda folder="/dev/shm": 1 << 18)
    piped = detect_nuclei(_params(image, scheduler="pipeline", num_workers=2, batch_size=1))
    assert created == []
    assert len(piped.nuclei) == len(ref.nuclei)
    np.testing.assert_array_equal(piped.nuclei.polygon_vertices, ref.nuclei.polygon_vertices)


def test_a_failing_worker_raises_here_and_leaves_no_shared_memory(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in a worker's watershed reaches the caller as itself; the
    maps' shared memory of the batches in flight is freed."""
    from nucleus_models.models.unet import UNetModel, WatershedSetting

    # a setting the workers reject (instances_from_maps: seed_mode must be ...)
    monkeypatch.setattr(UNetModel, "postprocessor", lambda self: WatershedSetting(seed_mode="no"))
    before = _shm_blocks()
    with pytest.raises(ValueError, match="seed_mode must be"):
        detect_nuclei(_params(_image(shared_data), scheduler="pipeline", num_workers=2))
    assert _shm_blocks() - before == set()


def test_a_script_without_a_main_guard_runs_once(shared_data: Path, tmp_path: Path) -> None:
    """Spawned workers do not import the caller's script again: a script
    that runs detection at its top level (no ``if __name__ == "__main__"``)
    runs once and finishes, instead of starting itself in every worker."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from nucleus_models.detection import DetectionParams, detect_nuclei\n"
        "print('script body ran', flush=True)\n"
        f"r = detect_nuclei(DetectionParams(inputImageFile={str(_image(shared_data))!r},"
        " model='unet-monuseg', input_mpp=0.25, device='cpu', precision='float32',"
        " analysis_tile_size=256, scheduler='pipeline', num_workers=2))\n"
        "print(r.tiles['scheduler'], len(r.nuclei) > 300, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("script body ran") == 1, out.stdout
    assert "pipeline True" in out.stdout


def test_an_empty_scheduler_pipelines_on_a_gpu_with_cores_to_spare() -> None:
    with mock.patch("nucleus_models.wsi.runner.available_cores", return_value=64):
        assert effective_scheduler("", 0, "cuda") == ("pipeline", 8)
        assert effective_scheduler("", 4, "cuda") == ("pipeline", 4)
        assert effective_scheduler("", -60, "cuda") == ("pipeline", 3)  # 64 - 60, less the GPU's
        assert effective_scheduler("", 0, "cpu") == ("multithreading", 8)
        # a model whose post-processing needs its network or pixels: serially
        assert effective_scheduler("", 0, "cuda", detachable=False) == ("", 1)
        assert effective_scheduler("", 1, "cuda") == ("", 1)
    with mock.patch("nucleus_models.wsi.runner.available_cores", return_value=2):
        # one core besides the GPU's: one worker process, which is no gain
        assert effective_scheduler("", 0, "cuda:0") == ("", 1)
    with pytest.raises(ParameterError, match="'pipeline' scheduler needs a model"):
        effective_scheduler("pipeline", 2, "cuda", detachable=False)


def test_a_daemonic_process_runs_serially_on_a_gpu() -> None:
    """A dask worker is a daemonic process, which may not start processes."""
    import multiprocessing

    with (
        mock.patch("nucleus_models.wsi.runner.available_cores", return_value=16),
        mock.patch.object(multiprocessing.current_process(), "_config", {"daemon": True}),
    ):
        assert multiprocessing.current_process().daemon
        assert effective_scheduler("", 0, "cuda") == ("", 1)
        with pytest.raises(ParameterError, match="not a daemonic one"):
            effective_scheduler("pipeline", 2, "cuda")


def test_a_model_without_a_detached_postprocessor_is_refused(disk_slide) -> None:
    path, _, _ = disk_slide
    with pytest.raises(ParameterError, match="'pipeline' scheduler needs a model"):
        detect_nuclei(
            DetectionParams(
                inputImageFile=str(path), model="classical-he", scheduler="pipeline", num_workers=2
            )
        )

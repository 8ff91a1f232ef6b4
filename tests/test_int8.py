"""int8 inference of the U-Nets: calibration, its storage, and serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nucleus_models.errors import ModelError, ParameterError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "nucleus_models" / "weights"
SHIPPED_UNETS = ["unet-monuseg", "unet-monuseg-reinhard", "unet-monuseg-fast", "unet-bbbc038"]


def _tiny_net(depth: int = 3):  # type: ignore[no-untyped-def]
    import torch

    from nucleus_models.models.unet import build_unet, fuse_for_inference

    torch.manual_seed(0)
    net = build_unet(base=4, depth=depth)
    # batch norms with non-trivial statistics, as a trained network has
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return fuse_for_inference(net.eval())


def _inputs(n: int = 3, size: int = 48, seed: int = 1):  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size, generator=g) - 0.5 for _ in range(n)]


def test_a_stored_calibration_rebuilds_exactly_the_calibrated_network() -> None:
    """The int8 network made from the stored ``[scale, zero_point]`` pairs is
    the one the calibration run itself converts to (identical outputs), it
    stays close to the float network, and it fits no other network."""
    import torch
    from torch.ao.quantization.quantize_fx import convert_fx

    from nucleus_models.models.int8 import (
        calibrate,
        calibration_sha256,
        prepare_calibration,
        quantize,
    )

    net = _tiny_net()
    prepared = prepare_calibration(net)
    with torch.no_grad():
        for x in _inputs():
            prepared(x)
    calibration = calibrate(prepared, images=3, data="three random inputs")
    assert calibration["images"] == 3 and calibration["engine"] == "x86"
    # JSON round trip, as the weights card stores it
    stored = json.loads(json.dumps(calibration))
    assert calibration_sha256(stored) == calibration_sha256(calibration)
    direct = convert_fx(prepared)
    rebuilt = quantize(net, stored)
    assert rebuilt.stride == net.stride
    x = _inputs(1, 64, seed=7)[0]
    with torch.no_grad():
        a, b, f = direct(x), rebuilt(x), net(x)
    assert torch.equal(a, b)
    err = (torch.sigmoid(b) - torch.sigmoid(f)).abs().mean()
    assert float(err) < 0.03, float(err)
    with pytest.raises(ValueError, match="made for another network"):
        quantize(_tiny_net(depth=4), stored)


def test_a_calibration_that_saw_nothing_is_refused() -> None:
    from nucleus_models.models.int8 import calibrate, prepare_calibration

    with pytest.raises(ValueError, match="saw no data"):
        calibrate(prepare_calibration(_tiny_net()), images=0, data="none")


def test_precision_int8_is_for_cpus_and_auto_takes_it_only_where_the_model_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from nucleus_models.models import unet
    from nucleus_models.models.int8 import int8_available

    assert int8_available()  # the x86 image and this machine have the engine
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=False, cpu_int8=True) == "int8"
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=False, cpu_int8=False) == "float32"
    # int8 comes first on any x86 CPU, with or without hardware bfloat16 (it
    # ran faster than bfloat16 where both run, at the same held-out scores)
    for native_bf16 in (False, True):
        monkeypatch.setattr(unet, "cpu_has_native_bf16", lambda cpuinfo=None, v=native_bf16: v)
        assert unet.pick_precision("auto", "cpu", cpu_bfloat16=True, cpu_int8=True) == "int8"
    # a model without int8 keeps bfloat16 where the CPU has it
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = "bfloat16" if onednn_bf16 else "float32"
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=True, cpu_int8=False) == expected
    # and where PyTorch lacks the x86 engine, a model with both falls back to bfloat16
    monkeypatch.setattr("nucleus_models.models.int8.int8_available", lambda: False)
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=True, cpu_int8=True) == expected
    monkeypatch.setattr(unet, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=True, cpu_int8=True) == "float32"
    monkeypatch.undo()
    assert unet.pick_precision("auto", "cuda", cpu_int8=True) == "float32"
    assert unet.pick_precision("int8", "cpu") == "int8"
    with pytest.raises(ParameterError, match="int8 runs on CPUs only"):
        unet.pick_precision("int8", "cuda")
    with pytest.raises(ParameterError, match="auto, float32, bfloat16, int8"):
        unet.pick_precision("int4", "cpu")


def test_malformed_or_missing_calibrations_are_clear_errors() -> None:
    from nucleus_models.models.int8 import read_calibration
    from nucleus_models.models.registry import get_spec
    from nucleus_models.models.unet import UNetModel

    spec = get_spec("unet-monuseg")
    weights = str(WEIGHTS / "unet-monuseg.pt")
    with pytest.raises(ParameterError, match="has no int8 calibration"):
        UNetModel(spec, weights, int8=None, device="cpu", precision="int8")
    # without a calibration, auto never picks int8
    assert UNetModel(spec, weights, int8=None, device="cpu").precision != "int8"
    with pytest.raises(ModelError, match="no activations table"):
        read_calibration({"engine": "x86"}, "m")
    with pytest.raises(ModelError, match="is not \\[scale, zero_point\\]"):
        read_calibration({"activations": {"activation_post_process_0": [-1.0, 3]}}, "m")
    card = json.loads((WEIGHTS / "unet-monuseg-fast.json").read_text())
    with pytest.raises(ModelError, match="made for another network"):
        # the narrower network's calibration does not fit the default one
        UNetModel(spec, weights, int8=card["int8"], device="cpu", precision="int8")


@pytest.mark.parametrize("name", SHIPPED_UNETS)
def test_each_shipped_unet_carries_a_calibration_of_its_own_network(name: str) -> None:
    from nucleus_models.models import get_model
    from nucleus_models.models.int8 import calibration_sha256

    card = json.loads((WEIGHTS / f"{name}.json").read_text())
    assert card["int8"]["images"] >= 30 and card["int8"]["engine"] == "x86"
    model = get_model(name, device="cpu", precision="int8")
    assert model.precision == "int8"
    assert model.int8_calibration == calibration_sha256(card["int8"])
    md = (WEIGHTS / f"{name}.md").read_text()
    assert md.count("## int8 inference (CPU)") == 1
    # the card says what auto picks as the code now writes it (not stale text)
    from benchmark.training.run import card_with_int8

    assert card_with_int8(md, card["spec"], card["int8"]) == md


def test_calibrate_adds_the_block_and_one_card_section_to_a_shipped_model(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``nucleus-bench calibrate`` on a copy of the shipped weights: the
    card gets the ``int8`` block and, run twice, still one int8 section; the
    rest of the card is kept; corrupt weights are refused first."""
    from benchmark import __main__ as bench
    from benchmark.training import run

    for ext in ("json", "pt", "md"):
        shutil.copy(WEIGHTS / f"unet-monuseg.{ext}", tmp_path / f"unet-monuseg.{ext}")
    md0 = (tmp_path / "unet-monuseg.md").read_text()
    head = md0.split("\n## int8 inference (CPU)")[0]
    real_images = run._images

    def two_images(cfg):  # type: ignore[no-untyped-def]
        return [im for im in real_images(cfg) if im.has_instances][:2]

    monkeypatch.setattr(run, "_images", two_images)
    config = str(REPO / "configs" / "unet-monuseg.toml")
    for _ in range(2):
        assert bench.main(["calibrate", "--config", config, "--weights_dir", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "unet-monuseg.json").read_text())
    assert card["int8"]["images"] == 2
    assert card["int8"]["data"].startswith("the 2 training images of monuseg in ")
    assert set(card["int8"]["activations"]) == set(
        json.loads((WEIGHTS / "unet-monuseg.json").read_text())["int8"]["activations"]
    )
    assert card["spec"] == json.loads((WEIGHTS / "unet-monuseg.json").read_text())["spec"]
    md = (tmp_path / "unet-monuseg.md").read_text()
    assert md.count("## int8 inference (CPU)") == 1 and md.startswith(head)
    assert "calibrated on the 2 training images" in md
    assert md.count("- Inference arithmetic:") == 1
    assert "in int8 on x86 CPUs (`model.cpu_int8`; below), else in bfloat16" in md
    # the config's model.cpu_int8 decides what auto does, and the card says so
    text = (REPO / "configs" / "unet-monuseg.toml").read_text()
    assert "\ncpu_int8 = 1\n" in text
    other = tmp_path / "cfg" / "unet-monuseg.toml"
    other.parent.mkdir()
    other.write_text(text.replace("\ncpu_int8 = 1\n", "\ncpu_int8 = 0\n"))
    assert bench.main(["calibrate", "--config", str(other), "--weights_dir", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "unet-monuseg.json").read_text())["spec"]
    assert "cpu_int8" not in spec["thresholds"]
    md = (tmp_path / "unet-monuseg.md").read_text()
    assert md.count("- Inference arithmetic:") == 1 and "in int8" not in md
    assert "`--precision auto` does not use it" in md
    # another model's config (another resolution, another width) would store
    # another model's ranges in this card: refused in one line, card untouched
    before = (tmp_path / "unet-monuseg.json").read_text()
    for old, new in (("\nmpp = 0.4\n", "\nmpp = 0.8\n"), ("\nbase = 12\n", "\nbase = 8\n")):
        assert old in text
        other.write_text(text.replace(old, new))
        assert (
            bench.main(["calibrate", "--config", str(other), "--weights_dir", str(tmp_path)]) == 2
        )
        assert "is not the config unet-monuseg was trained with" in capsys.readouterr().err
    assert (tmp_path / "unet-monuseg.json").read_text() == before
    pt = tmp_path / "unet-monuseg.pt"
    pt.write_bytes(pt.read_bytes()[:-4] + b"\0\0\0\0")
    rc = bench.main(["calibrate", "--config", config, "--weights_dir", str(tmp_path)])
    assert rc == 2


def test_calibrate_refuses_a_detector_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmark import __main__ as bench

    rc = bench.main(
        [
            "calibrate",
            "--config",
            str(REPO / "configs" / "fcos-monuseg.toml"),
            "--weights_dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and "for U-Nets" in err


def test_int8_maps_are_deterministic_across_loads() -> None:
    """Two loads of the int8 model give the same maps (nothing is calibrated
    at load time)."""
    import torch

    from nucleus_models.models import get_model

    x = torch.from_numpy(
        np.random.default_rng(0).uniform(-0.5, 0.5, (1, 3, 64, 64)).astype(np.float32)
    )
    a = get_model("unet-monuseg", device="cpu", precision="int8").forward(x)
    b = get_model("unet-monuseg", device="cpu", precision="int8").forward(x)
    assert np.array_equal(a, b)


def test_int8_models_built_on_several_threads_at_once_all_work() -> None:
    """torch.fx patches torch.nn.Module for the whole process while it
    traces: int8 builds on concurrent threads take turns (before they did,
    about one CLI run in twelve failed with 'module is not installed as a
    submodule' when its two workers built the model together)."""
    import threading

    import torch

    from nucleus_models.models import get_model

    barrier = threading.Barrier(3)
    built: list = []
    errors: list[BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            built.append(get_model("unet-monuseg-fast", device="cpu", precision="int8"))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    # three rounds: without the lock about one round in five failed
    for _ in range(3):
        threads = [threading.Thread(target=build) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(built) == 9
    x = torch.rand(1, 3, 64, 64)
    outs = [m.net(x) for m in built]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_worker_threads_share_one_model_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile runner's workers ask for the model together; it is built
    once, by one of them at a time, and they all get that instance."""
    import threading
    import time

    from nucleus_models import models
    from nucleus_models.wsi import runner

    inside, most, calls = [0], [0], []
    lock = threading.Lock()

    def slow_build(name: str, **options: object) -> object:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with lock:
            inside[0] -= 1
        calls.append(name)
        return object()

    monkeypatch.setattr(models, "get_model", slow_build)
    runner._built_model.cache_clear()
    barrier = threading.Barrier(4)
    got: list = []

    def ask() -> None:
        barrier.wait()
        got.append(runner._model("some-model", (("precision", "int8"),)))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        runner._built_model.cache_clear()
    assert calls == ["some-model"] and most[0] == 1
    assert len(got) == 4 and all(g is got[0] for g in got)


def test_auto_runs_on_without_int8_where_it_cannot_be_built_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the int8 network cannot be built (a PyTorch whose quantization
    differs from the one the calibration was made with, say), ``auto`` runs
    the next arithmetic it would pick and the run's warnings say why, in the
    output too; ``--precision int8`` asked for is a one-line error."""
    import torch

    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.models import get_model, int8
    from nucleus_models.models.unet import pick_precision
    from nucleus_models.wsi import runner

    def broken(net, calibration):  # type: ignore[no-untyped-def]
        raise RuntimeError("quantized::conv2d_relu has no kernel for this backend")

    monkeypatch.setattr(int8, "quantize", broken)
    model = get_model("unet-monuseg", device="cpu")  # auto
    assert model.precision == pick_precision("auto", "cpu", cpu_bfloat16=True, cpu_int8=False)
    assert model.int8_calibration is None
    assert model.precision_note == (
        f"model unet-monuseg: int8 cannot run with torch {torch.__version__}"
        " (RuntimeError: quantized::conv2d_relu has no kernel for this backend);"
        f" running {model.precision} instead"
    )
    with pytest.raises(ModelError, match=r"^model unet-monuseg: int8 cannot run with torch .*"):
        get_model("unet-monuseg", device="cpu", precision="int8")
    # a run: the nuclei come, and so does the warning (stderr and the output)
    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    runner._built_model.cache_clear()
    try:
        res = detect_nuclei(
            DetectionParams(
                inputImageFile=str(sample), model="unet-monuseg", analysis_roi="0,0,512,512"
            )
        )
    finally:
        runner._built_model.cache_clear()
    assert len(res.nuclei) > 20
    assert res.runtime["precision"] == model.precision
    assert res.warnings == [model.precision_note]
    assert model.precision_note in caplog.text

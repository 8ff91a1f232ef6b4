"""8-bit integer inference of a U-Net on CPUs (post-training static quantization).

A U-Net's convolutions run in int8 (weights per output channel, activations
per tensor) through PyTorch's ``x86`` quantized engine (FBGEMM / oneDNN);
its transposed convolutions and everything after the network stay float32.
The activations' ranges come from a *calibration*: the float network run
on the model's own training images, as inference prepares them, with
PyTorch's histogram observers; they are stored beside the weights (the
``int8`` block of ``<name>.json``) as one ``[scale, zero_point]`` pair per
quantized tensor, so loading an int8 model reads no image and is
deterministic.

Why the transposed convolutions stay float: quantized, torch 2.14's
``x86`` engine made ``unet-monuseg``'s maps differ from float32 by 0.23 on
average (foreground probability, one MoNuSeg tile), whatever weight
observer they used; with them in float32 the maps differ by 0.006.

PyTorch 2.14 marks its quantized tensors (and FX graph mode quantization)
deprecated in favour of torchao; they are what the pinned torch provides.
Where a later PyTorch lacks the ``x86`` engine, :func:`int8_available` is
False and ``auto`` precision falls back to bfloat16 (CPUs with it in
hardware) or float32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "ENGINE",
    "calibrate",
    "calibration_sha256",
    "int8_available",
    "network_fingerprint",
    "prepare_calibration",
    "quantize",
    "read_calibration",
]

#: PyTorch's quantized engine for x86 CPUs (FBGEMM and oneDNN kernels)
ENGINE = "x86"
_INPUT_SIZE = 64  # the example input prepare_fx traces with (any multiple of 8)
# torch.fx tracing (prepare_fx) and convert_fx patch torch.nn.Module's methods
# for the whole process while they run: two at once on two threads break
# each other ("module is not installed as a submodule"), so they take turns
_FX_LOCK = threading.RLock()


def int8_available() -> bool:
    """Whether this PyTorch build runs the ``x86`` quantized engine (not on
    ARM CPUs or builds without FBGEMM)."""
    import torch

    return ENGINE in torch.backends.quantized.supported_engines


def _qconfig_mapping(activation_observer: Any) -> Any:
    from torch import nn
    from torch.ao.quantization import QConfig, QConfigMapping, default_per_channel_weight_observer

    qconfig = QConfig(
        # 7-bit activations (quint8 in 0..127, what reduce_range=True means,
        # spelled as torch asks): FBGEMM's AVX2 kernels, on CPUs without
        # VNNI, would otherwise overflow their 16-bit sums
        activation=activation_observer.with_args(quant_min=0, quant_max=127),
        weight=default_per_channel_weight_observer,
    )
    return QConfigMapping().set_global(qconfig).set_object_type(nn.ConvTranspose2d, None)


def _prepare(net: Any, activation_observer: Any) -> Any:
    import torch
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE
    float_net = copy.deepcopy(net).eval().to(memory_format=torch.contiguous_format)
    example = (torch.zeros(1, 3, _INPUT_SIZE, _INPUT_SIZE),)
    with _FX_LOCK, warnings.catch_warnings():
        # FX graph mode quantization is deprecated in favour of torchao, which
        # the image does not ship; it is what torch 2.14 itself provides
        warnings.simplefilter("ignore")
        with without_stack_traces(getattr(torch.fx, "config", None)):
            prepared: Any = prepare_fx(float_net, _qconfig_mapping(activation_observer), example)
    prepared.stride = getattr(net, "stride", 1)
    prepared.network_fingerprint = network_fingerprint(net)
    return prepared


@contextlib.contextmanager
def without_stack_traces(config: Any) -> Iterator[None]:
    """FX traces without a stack trace per node (debugging aids) while the
    block runs: the first trace of a process would otherwise spend ~1-2 s
    importing what symbolises them.  ``config`` is ``torch.fx.config``;
    ``do_not_emit_stack_traces`` is a switch of recent PyTorch releases,
    and where it is missing (the Docker image's older PyTorch) nothing is
    set and tracing works as it always did.

    >>> from types import SimpleNamespace
    >>> new, old = SimpleNamespace(do_not_emit_stack_traces=False), SimpleNamespace()
    >>> with without_stack_traces(new), without_stack_traces(old):
    ...     new.do_not_emit_stack_traces, vars(old)
    (True, {})
    >>> new.do_not_emit_stack_traces
    False
    """
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def network_fingerprint(net: Any) -> str:
    """sha256 of a network's parameter names and shapes (not values): a
    calibration fits only the network it was made for."""
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    canon = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _observers(prepared: Any) -> dict[str, Any]:
    return {
        name: mod
        for name, mod in prepared.named_modules()
        if name.startswith("activation_post_process_")
    }


def prepare_calibration(net: Any) -> Any:
    """A copy of the float network (eval mode, batch norms folded or not)
    that records its activations' ranges as it runs; run it on calibration
    images (as inference would), then pass it to :func:`calibrate`."""
    from torch.ao.quantization import HistogramObserver

    return _prepare(net, HistogramObserver)


def calibrate(prepared: Any, *, images: int, data: str) -> dict[str, Any]:
    """The calibration a run of :func:`prepare_calibration`'s network
    recorded: ``{"engine", "activations": {name: [scale, zero_point]},
    "images", "data"}`` (``images`` and ``data`` describe what it saw)."""
    import torch

    acts: dict[str, list[float | int]] = {}
    for name, obs in _observers(prepared).items():
        if not torch.isfinite(obs.min_val) or not torch.isfinite(obs.max_val):
            raise ValueError(f"calibration: {name} saw no data (run the network on images first)")
        scale, zero_point = obs.calculate_qparams()
        acts[name] = [float(scale.item()), int(zero_point.item())]
    if not acts:
        raise ValueError("calibration: the network has nothing to quantize")
    return {
        "engine": ENGINE,
        "network": prepared.network_fingerprint,
        "activations": acts,
        "images": int(images),
        "data": str(data),
        "torch": torch.__version__.split("+")[0],
    }


def calibration_sha256(calibration: Mapping[str, Any]) -> str:
    """sha256 of the calibration's ranges (recorded with int8 outputs)."""
    canon = json.dumps(calibration["activations"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def read_calibration(block: Any, model: str) -> dict[str, Any]:
    """``block`` (a weights card's ``int8`` entry) checked: a mapping with an
    ``activations`` table of ``[scale > 0, zero_point]`` pairs."""
    from ..errors import ModelError

    acts = block.get("activations") if isinstance(block, Mapping) else None
    if not isinstance(acts, Mapping) or not acts:
        raise ModelError(f"model {model}: its int8 calibration has no activations table")
    for name, pair in acts.items():
        ok = (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and isinstance(pair[0], int | float)
            and pair[0] > 0
            and isinstance(pair[1], int)
        )
        if not ok:
            raise ModelError(
                f"model {model}: int8 calibration entry {name} is not [scale, zero_point]"
            )
    return dict(block)


def quantize(net: Any, calibration: Mapping[str, Any]) -> Any:
    """The float network ``net`` converted to int8 with the stored
    ``calibration``'s activation ranges (weights quantized per output
    channel from ``net`` itself).  Raises ``ValueError`` when the
    calibration was made for another network."""
    from torch.ao.quantization import MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare(net, MinMaxObserver)
    observers = _observers(prepared)
    acts = calibration["activations"]
    if calibration.get("network") != prepared.network_fingerprint:
        raise ValueError(
            "the int8 calibration was made for another network (its parameters' names"
            " and shapes differ)"
        )
    if set(observers) != set(acts):
        raise ValueError(
            f"the int8 calibration has {len(acts)} activation ranges, the network"
            f" {len(observers)}: it was made for another network"
        )
    for name, obs in observers.items():
        scale, zero_point = acts[name]
        # the range that MinMaxObserver turns back into exactly this scale and zero point
        lo = (obs.quant_min - zero_point) * scale
        hi = (obs.quant_max - zero_point) * scale
        obs.min_val.fill_(lo)
        obs.max_val.fill_(hi)
    with _FX_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qnet: Any = convert_fx(prepared)
    qnet.stride = getattr(net, "stride", 1)
    return qnet

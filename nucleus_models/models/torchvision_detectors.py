"""torchvision's Faster R-CNN, FCOS and Mask R-CNN on a small backbone, as nucleus models.

Network
    ResNet-18 (random initialisation, ``weights=None``; trainable BatchNorm,
    as torchvision does for untrained backbones) cut after ``layer3``, with a
    feature pyramid (``fpn_channels`` wide) on strides 4, 8 and 16 only:
    nuclei are 8-40 px at 0.5 um/px, so coarser levels add cost, not recall.
Anchors
    Two-stage models (Faster/Mask R-CNN): sizes (8, 12) px at stride 4,
    (16, 24) at stride 8 and (32, 48) at stride 16, aspect ratios 0.5, 1 and
    2.  FCOS: one point per location whose size equals the stride (4, 8, 16),
    so a location on the finest level learns boxes whose farthest edge is
    less than 32 px away, the next level up to 64 px, the coarsest the rest.
Scale
    Tiles arrive resampled to ``spec.mpp``, so the torchvision transform keeps
    every image at its size (``keep_scale=True``) instead of rescaling it to
    ``min_size``/``max_size``; it still normalises and pads the batch.
Instances
    Detections are kept when ``score >= score_threshold`` after a
    class-agnostic NMS (``nms_iou``) and painted into a label map in
    descending score order; pixels taken by a higher-scored instance are not
    overwritten, and instances left with fewer than ``min_area`` pixels are
    dropped.  Mask R-CNN paints its mask (the 28x28 probability resampled into
    the box, > ``mask_threshold``).  Box models (Faster R-CNN, FCOS) paint the
    **ellipse inscribed in each box** (axes = box width and height), an outline
    approximation that lets polygons, centroids and tile seams work as for any
    other model (exact for axis-aligned elliptical nuclei, too round for
    elongated nuclei lying diagonally).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from .base import ModelSpec, NucleusModel, TileInstances

__all__ = [
    "ARCHS",
    "build_detector",
    "paint_instances",
    "to_tensors",
    "detect",
    "detections_to_instances",
    "DetectorModel",
]

ARCHS = ("fasterrcnn", "fcos", "maskrcnn")
_LEVELS = ["0", "1", "2"]  # FPN outputs at strides 4, 8, 16
#: architecture options a card may carry in ``spec.thresholds``
NET_OPTIONS = ("fpn_channels", "detections_per_img")
_MEAN, _STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's defaults


class _NoExtraLevel(ExtraFPNBlock):
    """No pooled stride-32 level (torchvision's default ``LastLevelMaxPool``)."""

    def forward(
        self, results: list[torch.Tensor], x: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        return results, names


class _KeepScaleTransform(GeneralizedRCNNTransform):
    """Normalise and batch without rescaling (images are at the model's resolution).

    Because nothing is resized, ``postprocess`` is the identity: Mask R-CNN
    masks stay as box-local 28x28 probabilities (pasted by
    :func:`paint_instances`), which avoids one full-tile float mask per
    detection.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target

    def postprocess(
        self,
        result: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        return result


def _backbone(fpn_channels: int) -> nn.Module:
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=fpn_channels,
        extra_blocks=_NoExtraLevel(),
    )


def build_detector(
    arch: str,
    *,
    num_classes: int = 2,
    min_size: int = 256,
    max_size: int = 2048,
    keep_scale: bool = True,
    fpn_channels: int = 128,
    score_thresh: float = 0.05,
    nms_iou: float = 0.5,
    detections_per_img: int = 1000,
) -> nn.Module:
    """A torchvision detector with a ResNet-18 FPN backbone (random initialisation).

    Parameters
    ----------
    arch : {"fasterrcnn", "fcos", "maskrcnn"}
        Architecture.
    num_classes : int
        Including background (label 0); nuclei are label 1.
    min_size, max_size : int
        torchvision's rescaling range, used only when ``keep_scale`` is False.
    keep_scale : bool
        Keep every image at its own size (the model works at ``spec.mpp``); when
        False, images and outputs follow torchvision (rescaled; Mask R-CNN masks
        pasted into the whole image, which :class:`DetectorModel` does not expect).
    fpn_channels : int
        Width of the feature pyramid and of the heads.
    score_thresh, nms_iou : float
        The network's own score floor and per-class NMS IoU.
    detections_per_img : int
        Most detections per image (a dense 512 px tile holds ~600 nuclei).

    Returns
    -------
    torch.nn.Module
        The detector, in training mode.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    if arch not in ARCHS:
        raise ValueError(f"unknown detector architecture {arch!r}; expected one of {ARCHS}")
    c = int(fpn_channels)
    backbone = _backbone(c)
    if arch == "fcos":
        net: nn.Module = FCOS(
            backbone,
            num_classes,
            min_size=min_size,
            max_size=max_size,
            image_mean=_MEAN,
            image_std=_STD,
            anchor_generator=AnchorGenerator(((4,), (8,), (16,)), ((1.0,),) * 3),
            head=FCOSHead(c, 1, num_classes, num_convs=2),
            score_thresh=score_thresh,
            nms_thresh=nms_iou,
            detections_per_img=detections_per_img,
            topk_candidates=detections_per_img,
        )
    else:
        rep = 256
        kw: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "image_mean": _MEAN,
            "image_std": _STD,
            "rpn_anchor_generator": AnchorGenerator(
                ((8, 12), (16, 24), (32, 48)), ((0.5, 1.0, 2.0),) * 3
            ),
            "rpn_pre_nms_top_n_train": 1000,
            "rpn_post_nms_top_n_train": 1000,
            "rpn_pre_nms_top_n_test": 1000,
            "rpn_post_nms_top_n_test": detections_per_img,
            "box_roi_pool": MultiScaleRoIAlign(_LEVELS, output_size=7, sampling_ratio=2),
            "box_head": TwoMLPHead(c * 7 * 7, rep),
            "box_predictor": FastRCNNPredictor(rep, num_classes),
            "box_batch_size_per_image": 256,
            "box_score_thresh": score_thresh,
            "box_nms_thresh": nms_iou,
            "box_detections_per_img": detections_per_img,
        }
        if arch == "fasterrcnn":
            net = FasterRCNN(backbone, None, **kw)
        else:
            net = MaskRCNN(
                backbone,
                None,
                mask_roi_pool=MultiScaleRoIAlign(_LEVELS, output_size=14, sampling_ratio=2),
                mask_head=MaskRCNNHeads(c, [c, c], 1),
                mask_predictor=MaskRCNNPredictor(c, c, num_classes),
                **kw,
            )
    if keep_scale:
        net.transform = _KeepScaleTransform(min_size, max_size, _MEAN, _STD)
    return net


def _mask_in_box(prob: np.ndarray, box: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sample of a box-local ``(M, M)`` mask at pixel centres ``ys``, ``xs``."""
    from scipy import ndimage as ndi

    m = prob.shape[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    v = (ys + 0.5 - y0) / max(y1 - y0, 1e-6) * m - 0.5
    u = (xs + 0.5 - x0) / max(x1 - x0, 1e-6) * m - 0.5
    vv, uu = np.broadcast_arrays(v, u)
    return ndi.map_coordinates(prob, [vv, uu], order=1, mode="nearest")


def paint_instances(
    shape: tuple[int, int],
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    mask_threshold: float = 0.5,
    min_area: int = 1,
) -> TileInstances:
    """Paint detections (highest score first) into an instance label map.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the tile.
    boxes : ndarray
        ``(N, 4)`` ``x0, y0, x1, y1`` in pixels.
    scores, classes : ndarray
        ``(N,)`` scores and class indices (into ``spec.classes``).
    masks : ndarray, optional
        ``(N, M, M)`` box-local mask probabilities; without them each box
        becomes the ellipse inscribed in it.
    mask_threshold : float
        Mask probability above which a pixel belongs to the instance.
    min_area : int
        Instances with fewer free pixels are dropped.

    Returns
    -------
    TileInstances

    Examples
    --------
    The lower-scored (big) ellipse keeps only the pixels the first one left free:

    >>> boxes = np.array([[2.0, 2.0, 12.0, 8.0], [0.0, 0.0, 20.0, 20.0]])
    >>> inst = paint_instances((20, 20), boxes, np.array([0.9, 0.6]), np.zeros(2, int))
    >>> [int(inst.labels[y, x]) for y, x in ((5, 7), (15, 10), (0, 0))]
    [1, 2, 0]
    >>> [round(float(v), 2) for v in inst.scores], np.bincount(inst.labels.ravel()).tolist()
    ([0.0, 0.9, 0.6], [84, 48, 268])
    """
    h, w = shape
    labels = np.zeros((h, w), np.int32)
    out_scores, out_classes = [0.0], [0]
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        ix0, iy0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
        ix1, iy1 = min(int(math.ceil(x1)), w), min(int(math.ceil(y1)), h)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        ys = np.arange(iy0, iy1, dtype=np.float64)[:, None]
        xs = np.arange(ix0, ix1, dtype=np.float64)[None, :]
        if masks is None:
            a, b = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
            inside = ((xs + 0.5 - (x0 + x1) / 2) / a) ** 2 + (
                (ys + 0.5 - (y0 + y1) / 2) / b
            ) ** 2 <= 1.0
        else:
            inside = _mask_in_box(masks[i], boxes[i], ys, xs) > mask_threshold
        region = labels[iy0:iy1, ix0:ix1]
        new = inside & (region == 0)
        if int(new.sum()) < max(min_area, 1):
            continue
        region[new] = len(out_scores)
        out_scores.append(float(scores[i]))
        out_classes.append(int(classes[i]))
    return TileInstances(
        labels=labels,
        scores=np.asarray(out_scores, np.float32),
        classes=np.asarray(out_classes, np.int32),
    )


def to_tensors(tiles: list[np.ndarray]) -> list[torch.Tensor]:
    """RGB uint8 tiles -> float ``(3, H, W)`` tensors in [0, 1] (sizes may differ)."""
    return [
        torch.from_numpy(np.ascontiguousarray(t[..., :3].transpose(2, 0, 1))).float() / 255.0
        for t in tiles
    ]


def detect(
    net: nn.Module, batch: list[torch.Tensor], device: Any = "cpu"
) -> list[dict[str, np.ndarray]]:
    """Run a detector in eval mode; each image's raw detections as NumPy arrays
    (what :func:`detections_to_instances` takes)."""
    net.eval()
    with torch.inference_mode():
        out = net([x.to(device) for x in batch])
    return [{k: v.float().cpu().numpy() for k, v in d.items()} for d in out]


def detections_to_instances(
    det: dict[str, np.ndarray],
    shape: tuple[int, int],
    *,
    score_threshold: float,
    nms_iou: float,
    mask_threshold: float = 0.5,
    min_area: int = 4,
    n_classes: int = 1,
) -> TileInstances:
    """One image's raw detections (``boxes``, ``scores``, ``labels`` and, for
    Mask R-CNN, ``masks`` ``(N, 1, M, M)``) -> instances: score threshold,
    class-agnostic NMS at ``nms_iou``, then :func:`paint_instances`.

    Inference (:class:`DetectorModel`) and cross-validation both use it, so
    the thresholds a cross-validation chooses mean the same at inference.
    """
    from torchvision.ops import nms

    boxes, scores = det["boxes"].reshape(-1, 4), det["scores"].reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    if len(keep):
        k = nms(torch.from_numpy(boxes[keep]), torch.from_numpy(scores[keep]), nms_iou)
        keep = keep[k.numpy()]
    masks = det["masks"][keep, 0] if "masks" in det else None
    classes = np.clip(det["labels"][keep].astype(np.int64) - 1, 0, n_classes - 1)
    return paint_instances(
        shape,
        boxes[keep],
        scores[keep],
        classes,
        masks,
        mask_threshold=mask_threshold,
        min_area=min_area,
    )


class DetectorModel(NucleusModel):
    """Registered torchvision detector: tiles -> boxes (+ masks) -> painted instances.

    Parameters
    ----------
    spec : ModelSpec
        Its ``thresholds`` hold ``score_threshold``, ``nms_iou``,
        ``mask_threshold``, ``min_area`` and the network options
        (``fpn_channels``, ``detections_per_img``).
    weights_path : str
        ``state_dict`` file, checked against ``spec.sha256``.
    arch : {"fasterrcnn", "fcos", "maskrcnn"}
    device : {"auto", "cpu", "cuda"}, optional
    **options
        Overrides of the post-processing thresholds.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights_path: str,
        *,
        arch: str,
        device: str | None = None,
        **options: Any,
    ) -> None:
        from .unet import pick_device
        from .weights import load_state_dict

        self.spec = spec
        self.arch = arch
        th = {**spec.thresholds, **options}
        self.score_threshold = float(th.get("score_threshold", 0.5))
        self.nms_iou = float(th.get("nms_iou", 0.3))
        self.mask_threshold = float(th.get("mask_threshold", 0.5))
        self.min_area = int(th.get("min_area", 4))
        self.device = pick_device(device)
        self.precision = "float32"  # (no autocast for the detectors)
        net_opts: dict[str, Any] = {
            k: int(spec.thresholds[k]) for k in NET_OPTIONS if k in spec.thresholds
        }
        self.net = build_detector(
            arch,
            num_classes=len(spec.classes) + 1,
            score_thresh=min(0.05, self.score_threshold),
            nms_iou=max(self.nms_iou, 0.5),
            **net_opts,
        )
        self.net.load_state_dict(load_state_dict(weights_path, spec.sha256))
        self.net.eval().to(self.device)

    def preprocess(self, tiles: list[np.ndarray], context: dict[str, Any]) -> list[torch.Tensor]:
        """:func:`to_tensors`."""
        return to_tensors(tiles)

    def forward(self, batch: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """:func:`detect` on the model's device."""
        return detect(self.net, batch, self.device)

    def postprocess(
        self, raw: list[dict[str, np.ndarray]], tiles: list[np.ndarray], context: dict[str, Any]
    ) -> list[TileInstances]:
        """:func:`detections_to_instances` with the model's thresholds, per tile."""
        return [
            detections_to_instances(
                det,
                tile.shape[:2],
                score_threshold=self.score_threshold,
                nms_iou=self.nms_iou,
                mask_threshold=self.mask_threshold,
                min_area=self.min_area,
                n_classes=len(self.spec.classes),
            )
            for det, tile in zip(raw, tiles, strict=True)
        ]

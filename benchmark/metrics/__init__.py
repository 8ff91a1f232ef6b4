"""Pure metric functions for the benchmark harness.

Submodules (import from here, not from them):

* ``detection``: point hit-in-mask, radius matching, box matching, AP, ROC AUC.
* ``instance``: label-map metrics (F1@IoU, DSB2018 mAP, AJI, AJI+, Dice, PQ,
  Kromp et al. error categories, pixel errors near and away from the true
  outlines) and the one-call :func:`instance_metrics`.
* ``agreement``: score agreement (MAE, MSE, Pearson, ICC, Fleiss' kappa,
  Bland-Altman).
* ``stratify``: per-group summaries and detection by local nucleus density.
"""

from .agreement import (
    bland_altman,
    fleiss_kappa,
    icc,
    mae,
    mse,
    pearson_r,
    sd_of_differences,
)
from .detection import (
    PointMatch,
    average_precision,
    box_iou,
    hit_in_mask,
    match_boxes,
    match_points_within_radius,
    mean_average_precision_boxes,
    precision_recall_curve,
    radius_um_to_px,
    roc_auc,
)
from .instance import (
    LabelOverlap,
    aggregated_jaccard_index,
    aji_plus,
    dice,
    dsb2018_mean_ap,
    f1_at_iou,
    instance_metrics,
    kromp_object_categories,
    label_overlap,
    panoptic_quality,
    pixel_error_breakdown,
)
from .stratify import density_bins, detection_by_density, local_density, summarize_by_group

__all__ = [
    "LabelOverlap",
    "PointMatch",
    "aggregated_jaccard_index",
    "aji_plus",
    "average_precision",
    "bland_altman",
    "box_iou",
    "density_bins",
    "detection_by_density",
    "dice",
    "dsb2018_mean_ap",
    "f1_at_iou",
    "fleiss_kappa",
    "hit_in_mask",
    "icc",
    "instance_metrics",
    "kromp_object_categories",
    "pixel_error_breakdown",
    "label_overlap",
    "local_density",
    "mae",
    "match_boxes",
    "match_points_within_radius",
    "mean_average_precision_boxes",
    "mse",
    "panoptic_quality",
    "pearson_r",
    "precision_recall_curve",
    "radius_um_to_px",
    "roc_auc",
    "sd_of_differences",
    "summarize_by_group",
]

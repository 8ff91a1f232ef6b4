"""An OME-TIFF's resolution from its OME-XML (``PhysicalSizeX`` and its
unit), which large_image's tiff and tifffile sources do not read: no
``--input_mpp`` needed, the source recorded, an explicit ``--input_mpp``
still winning and nonsense refused as any slide's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nucleus_models.detection import DetectionParams, detect_nuclei
from nucleus_models.errors import ParameterError, SlideError
from nucleus_models.wsi import open_slide

SIZE = 256
CENTRES = np.array([(x, y) for y in range(30, SIZE, 50) for x in range(30, SIZE, 50)], float)


def _ome(path: Path, size: object = 0.325, unit: str | None = None, **tiff: object) -> Path:
    """A one-channel (DAPI: bright disks) OME-TIFF whose OME-XML gives
    ``PhysicalSizeX``/``Y`` = ``size`` (in ``unit``; None: the default,
    µm), without TIFF resolution tags (unless ``tiff`` gives them)."""
    import tifffile

    yy, xx = np.mgrid[:SIZE, :SIZE]
    plane = np.full((SIZE, SIZE), 100, np.uint16)
    for cx, cy in CENTRES:
        plane[(yy - cy) ** 2 + (xx - cx) ** 2 < 10**2] = 3000
    meta: dict[str, object] = {"axes": "YX", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    tifffile.imwrite(path, plane, ome=True, tile=(128, 128), metadata=meta, **tiff)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("size", "unit"),
    [(0.325, None), (0.325, "\u00b5m"), (0.325, "\u03bcm"), (325, "nm"), (0.000325, "mm"),
     (3.25e-5, "cm"), (3250, "\u00c5")],
)  # fmt: skip
def test_an_ome_tiffs_physical_size_is_its_resolution(
    size: float, unit: str | None, tmp_path: Path
) -> None:
    """large_image reads no resolution from these files (no TIFF resolution
    tags), and they needed --input_mpp; now the OME-XML's PhysicalSizeX,
    converted from its unit, is the slide's."""
    import large_image

    path = _ome(tmp_path / "s.ome.tif", size, unit)
    assert not large_image.open(str(path)).getMetadata().get("mm_x")  # (the source's own: none)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.325, rel=1e-9) and slide.mpp_source == "ome-xml"
    assert slide.metadata_mpp() == (slide.mpp, "ome-xml")


def test_no_input_mpp_is_needed_and_the_source_is_recorded(tmp_path: Path) -> None:
    path = _ome(tmp_path / "dapi.ome.tif", 325, "nm")
    r = detect_nuclei(DetectionParams(str(path), model="unet-bbbc038", precision="float32"))
    assert r.slide["mpp"] == pytest.approx(0.325) and r.slide["mpp_source"] == "ome-xml"
    assert len(r.nuclei) > 0 and r.warnings == []


def test_an_explicit_input_mpp_still_wins(tmp_path: Path) -> None:
    """--input_mpp overrides the OME-XML's (and, 1.5x off it, says so, as
    for any slide's own resolution)."""
    path = _ome(tmp_path / "dapi.ome.tif")
    slide = open_slide(path, input_mpp=0.5)
    assert (slide.mpp, slide.mpp_source) == (0.5, "override")
    assert slide.metadata_mpp() == (pytest.approx(0.325), "ome-xml")
    r = detect_nuclei(
        DetectionParams(str(path), model="unet-bbbc038", precision="float32", input_mpp=0.5)
    )
    assert r.slide["mpp"] == 0.5 and r.slide["mpp_source"] == "override"
    assert any("overrides the slide's own 0.325 um/px (from its ome-xml)" in w for w in r.warnings)


def test_tiff_resolution_tags_keep_precedence_over_the_ome_xml(tmp_path: Path) -> None:
    """Where large_image reads a resolution (the TIFF tags), it is the
    slide's: the OME-XML is only the fallback."""
    path = _ome(tmp_path / "t.ome.tif", resolution=(2000, 2000), resolutionunit="CENTIMETER")
    slide = open_slide(path)
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(5.0), "metadata")


def test_a_nonsense_physical_size_is_refused_as_any_slides(tmp_path: Path) -> None:
    """0.325 m a pixel is no microscope's: the one-line error names where
    it came from and --input_mpp, before any tile is read."""
    path = _ome(tmp_path / "m.ome.tif", 0.325, "m")
    with pytest.raises(ParameterError) as exc:
        detect_nuclei(DetectionParams(str(path), model="unet-bbbc038"))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(
        "resolution 325000 um/px (from the slide's metadata (ome-xml)) is not a microscope's"
    ), msg
    assert "--input_mpp" in msg


@pytest.mark.parametrize(("size", "unit"), [(0, None), (1, "pixel"), ("n/a", None)])
def test_no_length_in_the_ome_xml_leaves_the_resolution_unknown(
    size: object, unit: str | None, tmp_path: Path
) -> None:
    """A size of 0, in pixels, or not a number is no resolution: --input_mpp
    is asked for, as for a slide without any."""
    path = _ome(tmp_path / "u.ome.tif", size, unit)
    slide = open_slide(path)
    assert (slide.mpp, slide.mpp_source) == (None, "unknown")
    with pytest.raises(SlideError, match="resolution unknown .*pass --input_mpp"):
        slide.require_mpp()

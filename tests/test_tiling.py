"""Pure tiling functions: grids, cores, ROI parsing and clipping."""

from __future__ import annotations

import numpy as np
import pytest

from nucleus_models.errors import ParameterError
from nucleus_models.wsi.tiling import Region, clip_region, in_core, parse_roi, tile_grid


@pytest.mark.parametrize("tile,overlap", [(64, 0), (64, 16), (100, 40), (37, 5)])
def test_cores_partition_the_bounds(tile: int, overlap: int) -> None:
    bounds = (13, 7, 250, 190)
    tiles = tile_grid(bounds, tile_size=tile, overlap=overlap, image_size=(300, 200))
    cover = np.zeros((200, 300), int)
    for t in tiles:
        x0, y0, x1, y1 = t.core
        cover[y0:y1, x0:x1] += 1
        # read window = core grown by overlap, clipped to the image
        assert t.read == (
            max(x0 - overlap, 0),
            max(y0 - overlap, 0),
            min(x1 + overlap, 300),
            min(y1 + overlap, 200),
        )
    assert (cover[7:190, 13:250] == 1).all()
    cover[7:190, 13:250] = 0
    assert not cover.any()


def test_grid_counts_and_indices() -> None:
    tiles = tile_grid((0, 0, 250, 100), tile_size=100, overlap=10)
    assert len(tiles) == 3
    assert [t.index for t in tiles] == [0, 1, 2]
    assert tiles[-1].core == (200, 0, 250, 100)
    assert tiles[-1].read == (190, 0, 250, 100)  # clipped to the bounds themselves
    assert tile_grid((5, 5, 5, 9), tile_size=10, overlap=1) == []


@pytest.mark.parametrize("tile,overlap", [(10, 10), (10, 20), (0, 0), (-5, 0)])
def test_tile_size_must_exceed_overlap(tile: int, overlap: int) -> None:
    with pytest.raises(ParameterError):
        tile_grid((0, 0, 100, 100), tile_size=tile, overlap=overlap)


def test_in_core_is_half_open() -> None:
    pts = np.array([[0.0, 0.0], [9.999, 9.999], [10.0, 5.0], [5.0, 10.0], [-0.001, 5.0]])
    assert in_core(pts, (0, 0, 10, 10)).tolist() == [True, True, False, False, False]
    # a centroid on a shared edge belongs to exactly one of two neighbours
    edge = np.array([[10.0, 3.0]])
    assert in_core(edge, (0, 0, 10, 10)).sum() + in_core(edge, (10, 0, 20, 10)).sum() == 1


def test_parse_roi_forms() -> None:
    assert parse_roi("-1,-1,-1,-1").is_whole
    assert parse_roi([]).is_whole
    assert parse_roi([10, 20, 30, 40]).as_list() == [10, 20, 30, 40]
    # HistomicsTK's 6-value form: centre x, y, z and half sizes rx, ry, rz
    assert parse_roi([50, 60, 0, 10, 5, 0]).as_list() == [40, 55, 20, 10]
    poly = parse_roi("10,10, 110,10, 110,60, 10,60, 10,10")
    assert poly.as_list() == [10, 10, 101, 51]
    assert len(poly.polygons) == 1 and len(poly.polygons[0]) == 4  # closing vertex dropped
    multi = parse_roi([0, 0, 10, 0, 10, 10, -1, -1, 20, 20, 30, 20, 30, 30, 20, 30])
    assert len(multi.polygons) == 2 and multi.as_list() == [0, 0, 31, 31]


@pytest.mark.parametrize("bad", ["1,2,3", "a,b,c,d", "0,0,-5,10", [0, 0, 1, 1, 2]])
def test_parse_roi_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ParameterError):
        parse_roi(bad)  # type: ignore[arg-type]


def test_a_wrong_count_of_roi_numbers_names_every_form() -> None:
    """A count like "1,2,3" was answered with the four-number, whole-slide and polygon
    forms only, though six numbers (HistomicsTK's centre and half-size) are
    taken too, and are what a triangle's six read as."""
    with pytest.raises(ParameterError) as info:
        parse_roi("1,2,3")
    msg = str(info.value)
    assert "x,y,z,rx,ry,rz" in msg and "four vertices or more" in msg and "got 3" in msg, msg


def test_clip_region() -> None:
    assert clip_region(Region(-1, -1, -1, -1), 100, 50).as_list() == [0, 0, 100, 50]
    assert clip_region(Region(90, 40, 30, 30), 100, 50).as_list() == [90, 40, 10, 10]
    with pytest.raises(ParameterError, match="outside the slide"):
        clip_region(Region(200, 0, 10, 10), 100, 50)
    # one that only touches the slide's edge holds none of its pixels either
    for touching in (Region(100, 0, 10, 10), Region(-10, 0, 10, 10), Region(0, 50, 10, 5)):
        with pytest.raises(ParameterError, match="outside the slide"):
            clip_region(touching, 100, 50)


@pytest.mark.parametrize(
    "drawn,expected",
    [
        ([600, 600, 800, 600, 800, 800, 600, 800], [600, 600, 201, 201]),  # "Add polygon"
        (
            [600, 600, 800, 600, 800, 800, 600, 800, -1, -1, 900, 900, 950, 900, 950, 950],
            [600, 600, 351, 351],
        ),  # then another "Add polygon"
    ],
)
def test_histomicsui_add_polygon_on_the_whole_slide_region_is_the_drawn_shape(
    drawn: list[float], expected: list[int]
) -> None:
    """HistomicsUI's region widget merges a shape drawn with "Add polygon" into
    the region it holds; still at the whole slide's -1,-1,-1,-1 it is not
    recognised (large_image's ``_mergeRegions`` compares the array by
    identity) and becomes a rectangle's corners at (-1, -1) to (-2, -2) and a
    separator in front of the shape. That triangle was kept: a 200 x 200 px
    square at (600, 600) ran as an 801 x 801 px region from (-2, -2)."""
    merged = [-1, -1, -2, -1, -2, -2, -1, -2, -1, -1, *drawn]
    region = parse_roi(merged)
    assert region.as_list() == expected
    assert region.as_list() == parse_roi(drawn).as_list()
    assert len(region.polygons) == len(parse_roi(drawn).polygons)
    assert all((p >= 600).all() for p in region.polygons)
    # the same as a string, as slicer_cli_web passes it
    assert parse_roi(",".join(str(v) for v in merged)).as_list() == expected


def test_histomicsui_add_polygon_of_a_triangle_on_the_whole_slide_region_is_the_triangle() -> None:
    """A triangle drawn with "Add polygon" after the whole-slide prefix is six
    numbers: vertices, as the prefix says (a shape was merged), not
    HistomicsTK's centre and half-size form, which made the region of
    (600, 600, 800, 600, 700, 800) the box from (0, -100) of 1200 x 1400."""
    merged = [-1, -1, -2, -1, -2, -2, -1, -2, -1, -1, 600, 600, 800, 600, 700, 800]
    region = parse_roi(merged)
    assert region.as_list() == [600, 600, 201, 201]
    assert len(region.polygons) == 1 and len(region.polygons[0]) == 3
    # and two vertices after it are no shape, not a left, top, width, height
    with pytest.raises(ParameterError):
        parse_roi([*merged[:10], 600, 600, 800, 800])


def test_seam_duplicates_leave_one_of_four_sightings_at_a_corner() -> None:
    """Four tiles meeting at (10, 10) each outlined one nucleus there a
    little differently, each centroid in its own core: one stays, the one
    deepest inside its own core. Distinct nuclei of other tiles that touch
    a sighting, or overlap it by a sliver, stay too."""
    from nucleus_models.wsi.tiling import polygon_share, seam_duplicates

    cores = [(0, 0, 10, 10), (10, 0, 20, 10), (0, 10, 10, 20), (10, 10, 20, 20)]
    sq = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    # the sightings' centroids 0.1, 0.2, 0.1 and 0.4 px inside their cores
    corners = [(7.8, 7.9), (8.2, 7.8), (7.7, 8.1), (8.4, 8.5)]
    polys = [sq + c for c in corners]
    polys.append(sq + (12.4, 5.0))  # core 1: touches sighting 3 (core 3), no area
    polys.append(sq + (6.0, 10.5))  # core 2: a fifth of it under sightings 0 and 3
    boxes = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polys])
    cent = boxes.reshape(-1, 2, 2).mean(axis=1)
    drop = seam_duplicates(cent, boxes, cores, polygon_share(polys.__getitem__))
    assert drop.tolist() == [True, True, True, False, False, False]
    # no nucleus reaches out of its core: nothing to compare
    inner = [sq + (1, 1), sq + (11, 1)]
    inner_boxes = np.array([[1, 1, 5, 5], [11, 1, 15, 5]], float)
    assert not seam_duplicates(
        inner_boxes[:, :2] + 2, inner_boxes, cores, polygon_share(inner.__getitem__)
    ).any()


def test_a_blob_between_two_nuclei_in_depth_drops_neither_of_them() -> None:
    """One tile outlined two touching nuclei on a seam as one blob; the
    other tile outlined them apart, one deeper inside its core than the
    blob, the other less deep. The blob is a sighting of each, so one of
    the two sightings it shares a nucleus with goes, but a dropped sighting
    must not drop another: the deeper nucleus is kept, the blob dropped as
    its sighting, and the other nucleus, whose only partner is the dropped
    blob, stays. Handled pair by pair (most overlap first), the blob first
    dropped the shallower nucleus and was then dropped itself: one nucleus
    left of two."""
    from nucleus_models.wsi.tiling import polygon_share, seam_duplicates

    cores = [(0, 0, 10, 20), (10, 0, 20, 20)]
    # core 1: two nuclei apart, centroids 4 and 0.5 px inside it
    deep = np.array([[12, 1], [16, 1], [16, 4], [12, 4]], float)
    shallow = np.array([[8.5, 6], [12.5, 6], [12.5, 9.5], [8.5, 9.5]], float)
    # core 0: the blob over both, its centroid 0.8 px inside its core (x 9.2)
    blob = np.array([[4, 0], [14.4, 0], [14.4, 10], [4, 10]], float)
    polys = [deep, shallow, blob]
    boxes = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polys])
    cent = boxes.reshape(-1, 2, 2).mean(axis=1)
    share = polygon_share(polys.__getitem__)
    # the blob holds 0.6 of the deep nucleus and all of the shallow one
    assert share(np.array([0, 1]), np.array([2, 2])) == pytest.approx([0.6, 1.0])
    drop = seam_duplicates(cent, boxes, cores, share)
    assert drop.tolist() == [False, False, True]


def test_a_sighting_inside_its_own_core_is_one_with_a_bigger_one_across_the_seam() -> None:
    """One tile outlined a nucleus small, wholly inside its own core; the
    other outlined it whole, across the seam (its centroid just in its own
    core). One nucleus: the whole outline covers all of the small one (the
    share is of the smaller), and the small one's box, though inside its
    core, comes within the farthest reach out of a core of its edge. The
    sighting deeper inside its core stays."""
    from nucleus_models.wsi.tiling import polygon_share, seam_duplicates

    cores = [(0, 0, 10, 10), (10, 0, 20, 10)]
    # core 0's, 0.5 px from the seam; the whole one's centroid x 10: core 1's
    small = np.array([[7, 2], [9.5, 2], [9.5, 4.5], [7, 4.5]], float)
    whole = np.array([[6, 1], [14, 1], [14, 7], [6, 7]], float)
    polys = [small, whole]
    boxes = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polys])
    cent = boxes.reshape(-1, 2, 2).mean(axis=1)
    drop = seam_duplicates(cent, boxes, cores, polygon_share(polys.__getitem__))
    # (the small one's centroid 1.75 px inside its core, the whole one's 0)
    assert drop.tolist() == [False, True]

"""choose_grid against the original rule, re-implemented here from the reference text (section 5)."""

import itertools

import pytest

from internvl_jax.processing.tiling import choose_grid, plan_tiles


def reference_grid(width, height, min_num, max_num, image_size=448):
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


# sizes around the area thresholds (0.5 * 448^2 * k) and exact aspect ties (w/h = c/r, and midpoints)
SIZES = sorted(
    set(itertools.product([1, 7, 100, 224, 316, 317, 447, 448, 449, 633, 634, 896, 1000, 1344, 1792, 2240, 4000],
                          [1, 9, 150, 224, 316, 317, 448, 632, 634, 896, 1344, 2000, 3000]))
    | {(5 * k, 4 * k) for k in (1, 50, 100, 200, 400)}  # aspect 1.25: equidistant from 1 and 1.5
    | {(3 * k, 2 * k) for k in (1, 100, 150, 300)}
    | {(k, k) for k in (300, 316, 317, 448, 634, 635, 896, 1100)}
    | set(itertools.product(range(14, 2400, 53), range(14, 2400, 59)))  # a dense sweep
)


@pytest.mark.parametrize("max_tiles", range(1, 41))
def test_choose_grid_equals_the_original_rule(max_tiles):
    for w, h in SIZES:
        assert choose_grid(w, h, max_tiles=max_tiles) == reference_grid(w, h, 1, max_tiles), (w, h)


def test_min_tiles_and_thumbnail():
    assert choose_grid(800, 600, min_tiles=4, max_tiles=6) == reference_grid(800, 600, 4, 6)
    assert plan_tiles(448, 448).num_tiles == 1  # one tile: no thumbnail
    plan = plan_tiles(1344, 448)
    assert (plan.cols, plan.rows, plan.num_tiles) == (3, 1, 4)
    assert plan_tiles(1344, 448, dynamic=False).num_tiles == 1
    with pytest.raises(ValueError, match="positive"):
        choose_grid(0, 10)

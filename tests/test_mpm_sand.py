"""Dry sand column collapse: the settled pile's flank angle matches the friction angle."""

from diffsim.mpm import validation


def test_sand_column_collapse_slope_matches_friction_angle():
    result = validation.sand_column_collapse()
    assert result.passed, (
        f"slope {result.measured:.2f} deg vs friction angle {result.expected:.1f} deg "
        f"(error {result.error:.2f}, tolerance {result.tolerance}); {result.details}"
    )

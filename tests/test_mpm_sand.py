"""Dry sand: a squat column's settled flank matches the friction angle, and a tall planar
column's runout lies in the laboratory band."""

from diffsim.mpm import validation


def test_sand_column_collapse_slope_matches_friction_angle():
    result = validation.sand_column_collapse()
    assert result.passed, (
        f"slope {result.measured:.2f} deg vs friction angle {result.expected:.1f} deg "
        f"(error {result.error:.2f}, tolerance {result.tolerance}); {result.details}"
    )


def test_granular_collapse_runout_lies_in_the_laboratory_band():
    result = validation.granular_runout()
    assert result.details["settled"], f"the collapse had not come to rest: {result.details}"
    assert result.passed, (
        f"runout ratio {result.measured:.2f} vs laboratory {result.expected} +- {result.tolerance}; "
        f"{result.details}"
    )

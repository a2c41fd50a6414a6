"""Test set-up: Warp initialised once, quietly (its banner would clutter the test output)."""

from diffsim.core.device import init_warp

init_warp()

"""Constitutive models of diffsim as Warp functions (elasticity, plasticity, fluids) and named presets.

Solvers call ``constitutive_update`` per particle; users pick a ``Material`` or a preset by name.
"""

from .models import (
    FLUID_MAX_J,
    FLUID_MIN_J,
    HENCKY_MIN_STRETCH,
    NEO_HOOKEAN_MIN_J,
    TAIT_EXPONENT,
    MaterialModel,
    MaterialParams,
    MaterialResponse,
    constitutive_update,
    hencky_kirchhoff_stress,
    lame_parameters,
    strain_energy_density,
)
from .presets import DOUGH, HONEY, PLASTICINE, PRESETS, RUBBER, SAND, SILICONE, WATER, Material, preset
from .svd import SVD3, SVD_GAP_ABSOLUTE, SVD_GAP_RELATIVE, polar_rotation, spectral_rebuild, svd3_guarded

__all__ = [
    "MaterialModel",
    "MaterialParams",
    "MaterialResponse",
    "constitutive_update",
    "strain_energy_density",
    "lame_parameters",
    "hencky_kirchhoff_stress",
    "SVD3",
    "svd3_guarded",
    "polar_rotation",
    "spectral_rebuild",
    "SVD_GAP_RELATIVE",
    "SVD_GAP_ABSOLUTE",
    "HENCKY_MIN_STRETCH",
    "NEO_HOOKEAN_MIN_J",
    "FLUID_MIN_J",
    "FLUID_MAX_J",
    "TAIT_EXPONENT",
    "Material",
    "PRESETS",
    "preset",
    "RUBBER",
    "SILICONE",
    "PLASTICINE",
    "DOUGH",
    "SAND",
    "WATER",
    "HONEY",
]

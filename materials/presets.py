"""Materials as validated Python values (model id + SI parameters) and the named presets.

A ``Material`` is checked when it is created, so a bad value fails here with its name and valid
range instead of producing NaNs deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffsim.errors import ConfigError, InvalidParameter, require_finite

from .models import MaterialModel, MaterialParams

__all__ = [
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

_SOLIDS = (
    MaterialModel.FIXED_COROTATED,
    MaterialModel.NEO_HOOKEAN,
    MaterialModel.VON_MISES,
    MaterialModel.DRUCKER_PRAGER,
)


@dataclass(frozen=True)
class Material:
    """A constitutive model and its parameters, in SI units.

    Fields a model does not use keep their defaults and are ignored by the kernels (they must still
    be finite).

    Attributes:
        model: which constitutive model (``MaterialModel``).
        density: mass density in the reference configuration [kg/m^3].
        young_modulus: Young's modulus [Pa] (solids).
        poisson_ratio: Poisson's ratio [-], in [0, 0.5) (solids).
        yield_stress: von Mises yield stress [Pa] (``VON_MISES``).
        friction_angle: internal friction angle [rad], in (0, pi/2) (``DRUCKER_PRAGER``).
        viscosity: dynamic viscosity [Pa s] (``FLUID``).
        bulk_modulus: bulk modulus [Pa] (``FLUID``).
    """

    model: MaterialModel
    density: float = 1000.0
    young_modulus: float = 1.0e5
    poisson_ratio: float = 0.3
    yield_stress: float = 1.0e3
    friction_angle: float = math.radians(30.0)
    viscosity: float = 0.0
    bulk_modulus: float = 1.0e6

    def __post_init__(self):
        try:
            model = MaterialModel(self.model)
        except ValueError:
            valid = ", ".join(f"{m.name}={m.value}" for m in MaterialModel)
            raise InvalidParameter("model", self.model, f"one of {valid}") from None
        object.__setattr__(self, "model", model)
        self.validate()

    def validate(self) -> None:
        """Raise ``InvalidParameter`` naming the first parameter outside its valid range."""
        for field in dataclasses.fields(self):
            if field.name != "model":
                require_finite(field.name, getattr(self, field.name))
        if self.density <= 0.0:
            raise InvalidParameter("density", self.density, "(0, inf) kg/m^3")
        if self.viscosity < 0.0:
            raise InvalidParameter("viscosity", self.viscosity, "[0, inf) Pa s")
        if self.model in _SOLIDS:
            if self.young_modulus <= 0.0:
                raise InvalidParameter("young_modulus", self.young_modulus, "(0, inf) Pa")
            if not 0.0 <= self.poisson_ratio < 0.5:
                raise InvalidParameter(
                    "poisson_ratio",
                    self.poisson_ratio,
                    "[0, 0.5)",
                    hint="0.5 is incompressible (infinite bulk modulus); use at most about 0.49.",
                )
        if self.model == MaterialModel.VON_MISES and self.yield_stress <= 0.0:
            raise InvalidParameter("yield_stress", self.yield_stress, "(0, inf) Pa")
        if self.model == MaterialModel.DRUCKER_PRAGER and not 0.0 < self.friction_angle < math.pi / 2:
            raise InvalidParameter(
                "friction_angle", self.friction_angle, "(0, pi/2) rad", hint="Give the angle in radians."
            )
        if self.model == MaterialModel.FLUID and self.bulk_modulus <= 0.0:
            raise InvalidParameter("bulk_modulus", self.bulk_modulus, "(0, inf) Pa")

    def lame_parameters(self) -> tuple[float, float]:
        """Lame parameters (mu, lambda) [Pa] from Young's modulus and Poisson's ratio."""
        E, nu = self.young_modulus, self.poisson_ratio
        return E / (2.0 * (1.0 + nu)), E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))

    def wave_speed(self) -> float:
        """Largest elastic wave speed [m/s]: the P-wave speed for solids, sqrt(K / rho) for the fluid."""
        if self.model == MaterialModel.FLUID:
            return math.sqrt(self.bulk_modulus / self.density)
        mu, lam = self.lame_parameters()
        return math.sqrt((lam + 2.0 * mu) / self.density)

    def kinematic_viscosity(self) -> float:
        """viscosity / density [m^2/s], which sets the explicit viscous time-step limit (0 for solids)."""
        if self.model != MaterialModel.FLUID:
            return 0.0
        return self.viscosity / self.density

    def params(self) -> MaterialParams:
        """The parameters as the Warp struct ``constitutive_update`` takes."""
        params = MaterialParams()
        params.young_modulus = self.young_modulus
        params.poisson_ratio = self.poisson_ratio
        params.yield_stress = self.yield_stress
        params.friction_angle = self.friction_angle
        params.viscosity = self.viscosity
        params.bulk_modulus = self.bulk_modulus
        return params

    def with_(self, **changes) -> Material:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)


# Natural and filled rubbers have E ~ 1-10 MPa and nu ~ 0.49; nu = 0.45 is a simulation-scale
# choice that keeps lambda (and the time step) moderate; 1100 kg/m^3 is typical of filled rubber.
RUBBER = Material(MaterialModel.FIXED_COROTATED, density=1100.0, young_modulus=1.0e6, poisson_ratio=0.45)
# Soft silicone elastomer of tactile sensors (E ~ 0.1-1 MPa for Ecoflex/Sylgard-type gels, density
# ~1070 kg/m^3); Neo-Hookean because it handles the large local strains under an indenter.
SILICONE = Material(MaterialModel.NEO_HOOKEAN, density=1070.0, young_modulus=3.0e5, poisson_ratio=0.45)
# PlasticineLab-scale plasticine (simulation-scale, softer than real clay): yields at ~2 % strain and
# holds its shape under gravity up to ~7 cm tall (rho g h < yield); modelling clay is ~1500 kg/m^3.
PLASTICINE = Material(
    MaterialModel.VON_MISES, density=1500.0, young_modulus=5.0e4, poisson_ratio=0.3, yield_stress=1.0e3
)
# Bread dough: shear moduli ~1e3-1e4 Pa and yield stresses ~1e2 Pa are reported; a 2 cm lump
# slowly spreads under its own weight like real dough; density of wheat dough ~1200 kg/m^3.
DOUGH = Material(
    MaterialModel.VON_MISES, density=1200.0, young_modulus=1.0e4, poisson_ratio=0.4, yield_stress=200.0
)
# Dry sand: E = 3.5e5 Pa, nu = 0.3 are the simulation-scale values of Klar et al. 2016 (real grains
# are far stiffer); 30 deg is a typical angle of repose; 1600 kg/m^3 is the bulk density of dry sand.
SAND = Material(
    MaterialModel.DRUCKER_PRAGER,
    density=1600.0,
    young_modulus=3.5e5,
    poisson_ratio=0.3,
    friction_angle=math.radians(30.0),
)
# Water with a reduced bulk modulus (real K = 2.2e9 Pa, c = 1480 m/s): K = 1e6 Pa gives c ~ 32 m/s, a
# ~50x larger explicit time step, while flows up to ~3 m/s stay below Mach 0.1 (density error ~1 %).
WATER = Material(MaterialModel.FLUID, density=1000.0, viscosity=1.0e-3, bulk_modulus=1.0e6)
# Honey: dynamic viscosity ~10 Pa s at room temperature, density ~1420 kg/m^3; same reduced bulk
# modulus as WATER for the same time-step reason.
HONEY = Material(MaterialModel.FLUID, density=1420.0, viscosity=10.0, bulk_modulus=1.0e6)

PRESETS: dict[str, Material] = {
    "rubber": RUBBER,
    "silicone": SILICONE,
    "plasticine": PLASTICINE,
    "dough": DOUGH,
    "sand": SAND,
    "water": WATER,
    "honey": HONEY,
}


def preset(name: str) -> Material:
    """The named preset material (case-insensitive), e.g. ``preset("sand")``."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"Unknown material preset {name!r}; valid names are: {', '.join(sorted(PRESETS))}.")
    return PRESETS[key]

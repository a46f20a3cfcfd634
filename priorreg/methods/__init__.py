"""Registration methods, one file each; `METHODS` maps the CLI's `--method` names to them.

Every method takes `(fixed, moving, **options)` Volumes and returns a `RegistrationResult`;
options a method does not use are ignored by the baselines and rejected by the others.
"""

from .adversarial import register_adversarial
from .airnet import register_airnet
from .baselines import register_centres, register_identity
from .deformgan import register_deformgan
from .dip import register_dip
from .glands import register_glands
from .iterative import register_iterative
from .segreg import register_segreg
from .symmetric import register_symmetric

METHODS = {
    "identity": register_identity,
    "centres": register_centres,
    "iterative": register_iterative,
    "dip": register_dip,
    "adversarial": register_adversarial,
    "airnet": register_airnet,
    "symmetric": register_symmetric,
    "deformgan": register_deformgan,
    "glands": register_glands,
    "segreg": register_segreg,
}

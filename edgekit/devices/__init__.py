"""Device profiles as data (``profiles/*.toml``), checks against them, and a roofline cost model.

``check.check`` and ``cost.estimate`` read a :class:`DeviceProfile`; nothing branches on a device name.
"""

from edgekit.devices.check import DeviceCheck, check
from edgekit.devices.classes import op_class
from edgekit.devices.cost import CostEstimate, estimate
from edgekit.devices.profile import FORMATS, ClassRule, DeviceProfile, list_profiles, load_profile

__all__ = [
    "FORMATS",
    "ClassRule",
    "CostEstimate",
    "DeviceCheck",
    "DeviceProfile",
    "check",
    "estimate",
    "list_profiles",
    "load_profile",
    "op_class",
]

"""Methods: one LightningModule per method, all on the shared :class:`Method` base."""

from ssl_lightning.methods.base import Method, NonFiniteLossError
from ssl_lightning.methods.collision import Collision
from ssl_lightning.methods.fixmatch import FixMatch
from ssl_lightning.methods.infocam import InfoCAM
from ssl_lightning.methods.infomatch import InfoMatch
from ssl_lightning.methods.simmatch import SimMatch
from ssl_lightning.methods.supervised import Supervised
from ssl_lightning.methods.uwbssl import UWBSSL

__all__ = ["Collision", "FixMatch", "InfoCAM", "InfoMatch", "Method", "NonFiniteLossError", "SimMatch", "Supervised", "UWBSSL"]

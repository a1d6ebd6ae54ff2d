"""The built-in privacy engine: exact mixed ghost clipping with book-keeping. No Hydra, no argparse."""

from .engine import CLIPPING, PrivacyEngine
from .errors import CoverageError
from .optimizer import DPOptimizer
from .plan import MODES

__all__ = ["CLIPPING", "MODES", "CoverageError", "DPOptimizer", "PrivacyEngine"]

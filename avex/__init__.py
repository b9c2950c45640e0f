"""avex: Active Visual Exploration on a TORE-backed Vision Transformer, with Gymnasium environments.

``import avex`` registers the environments (``AVE-ImageNet-v0``, ``AVE-FashionMNIST-v0``,
``AVE-ImageFolder-v0``); see :mod:`avex.registration`.
"""

from avex._compat import ensure_timm_importable

ensure_timm_importable()

from avex import registration as _registration  # noqa: E402
from avex.geometry import GlimpseGeometry  # noqa: E402
from avex.model import AggregatorOutput, TokenCache, TOREViT, create_tore  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AggregatorOutput", "GlimpseGeometry", "TOREViT", "TokenCache", "create_tore", "__version__"]

_registration.register_envs()

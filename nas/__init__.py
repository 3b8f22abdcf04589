"""vitnas: hardware-aware architecture search over efficient Vision Transformers."""

__version__ = "0.1.0"

from nas import timm_model as _timm_model  # noqa: E402,F401  registers timm's "vitnas_subnet"

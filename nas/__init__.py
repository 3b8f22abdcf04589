"""vitnas: hardware-aware architecture search over efficient Vision Transformers."""

__version__ = "0.1.0"

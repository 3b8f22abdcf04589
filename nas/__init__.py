"""vitnas: hardware-aware architecture search over efficient Vision Transformers."""

__version__ = "0.1.0"

from nas import timm_registration as _timm_registration  # noqa: E402

_timm_registration.install()  # timm.create_model("vitnas_subnet", ...) once timm is imported

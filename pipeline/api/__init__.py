"""api"""
from pipeline.api.unmix import UnmixCLIP

__all__ = ["UnmixCLIP"]

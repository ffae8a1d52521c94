"""The Python API: `UnmixCLIP` (trained projectors on any image and any words), the names it accepts
(`names`), the defaults and file locations a projectors file's record gives (`record`) and how it
finds its backbone weights (`weights`) and runs images of several shapes (`views`).
`from pipeline.api import UnmixCLIP`.

May import every library layer below it; nothing imports it but the CLI.
"""
from pipeline.api.unmix import UnmixCLIP

__all__ = ["UnmixCLIP"]

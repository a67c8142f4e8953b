"""`minicustom.nf4`, the name the README imports: the module itself lives in quant/nf4.py."""

import sys

from .quant import nf4

sys.modules[__name__] = nf4

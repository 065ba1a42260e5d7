"""Defaults that several entry points share, kept light to import (no torch models, no open_clip).

``SAMPLER_DEFAULTS``: the VxL sampler's options as train.py names them, with the released code's
choices. train.py's flags, ``models.build_model``, the mask-cache key (``models.vxl_cache``) and the
tools take them from here.
"""

SAMPLER_DEFAULTS = dict(keep_ratio=0.3, prompt="{}", vxl_norm="token", clip_input_norm="encoder")

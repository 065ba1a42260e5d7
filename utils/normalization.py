"""The encoder's input normalisation, in one place: to [0, 1], then ``(x - 0.5) / 0.5`` per channel.

Used by the preprocessing (``datasets.transforms``, which re-exports it), by the VxL sampler to undo it
before CLIP's own (``models.vxl_sampler``), and by the pictures (``utils.visualize.denormalize``).
"""

ENCODER_MEAN = (0.5, 0.5, 0.5)
ENCODER_STD = (0.5, 0.5, 0.5)

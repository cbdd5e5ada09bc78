"""The training augmentation's probabilities, the authors' recipe (msta/METHOD.md §3).

One place for the defaults of the transforms, the clip dataset and a dataset's settings in
msta.toml; free of torch, so that reading a config does not import it.
"""
from __future__ import annotations

HFLIP = 0.5          # horizontal flip
COLOR_JITTER = 0.8   # brightness, contrast, saturation, hue jitter, in a random order
GRAYSCALE = 0.2      # grey scale after the jitter

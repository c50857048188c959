"""Real photos for the pictures: ``skimage.data`` samples by name, or any image file by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "load_photo", "square_resize", "to_channels"]

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")


def load_photo(spec: str) -> np.ndarray:
    """RGB float image in [0, 1], shape ``(H, W, 3)``: a ``skimage.data`` name from ``PHOTOS`` or a file path."""
    try:
        import skimage.data
        import skimage.io
    except ImportError:
        raise ValueError("photos need scikit-image: pip install 'attnzoo[viz]'") from None
    if spec in PHOTOS:
        image = getattr(skimage.data, spec)()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--image {spec!r} is neither a photo name ({', '.join(PHOTOS)}) nor an existing file")
        try:
            image = skimage.io.imread(path)
        except Exception as exc:  # any decoder failure is a bad input file
            raise ValueError(f"--image {spec!r} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    image = np.asarray(image)
    if image.dtype.kind in "ui":
        image = image.astype(np.float64) / np.iinfo(image.dtype).max
    image = image.astype(np.float64)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"--image {spec!r} has shape {image.shape}; expected a grey, RGB or RGBA image")
    return np.clip(image[:, :, :3], 0.0, 1.0)


def square_resize(image: np.ndarray, side: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``side × side`` (anti-aliased)."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top : top + s, left : left + s]
    return resize(crop, (side, side), anti_aliasing=True)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W, 3)`` → ``(H, W, channels)``: luminance for 1 channel, RGB for 3."""
    if channels == 3:
        return image
    if channels == 1:
        return (image @ np.array([0.2125, 0.7154, 0.0721]))[:, :, None]
    raise ValueError(f"cannot turn an RGB photo into {channels} input channels (1 or 3 supported)")

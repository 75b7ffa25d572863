"""Five-point face alignment: the similarity warp that puts a face's landmarks (left eye, right
eye, nose, left mouth corner, right mouth corner: the order of landmarks.py) onto the ArcFace
template, as face-recognition data sets are cropped (data.align='arcface', `pacofr data
prepare --align`).

The template is ArcFace's 112 x 112 one; for another output size S it is scaled by S / 112.
Its points are given with pixel centres at integers (OpenCV's convention); here they are moved
by half a pixel into the continuous convention of transforms.py (pixel i covers [i, i + 1)), so
a warp of landmarks given in that convention lands each point where OpenCV's would.

The transform is the least-squares similarity (scale, rotation, shift; no reflection) from the
five points to the template (Umeyama's closed form), and the image is resampled bilinearly.
"""

import numpy as np
from PIL import Image

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_SIZE = 112
ALIGNMENTS = ("none", "arcface")


def template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The five template points [5, 2] for an S x S crop (continuous pixel coordinates)."""
    return (ARCFACE_112 + 0.5) * (size / TEMPLATE_SIZE)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix [sR | t] of the similarity minimizing sum ||s R src_i + t - dst_i||^2,
    R a rotation (det +1). src, dst: [N, 2], N >= 2, src not all one point."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    var = (a * a).sum() / len(src)
    if var <= 0:
        raise ValueError("the source points coincide: no similarity maps them")
    u, sv, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])  # (refuse the reflection)
    rot = u @ np.diag(d) @ vt
    scale = (sv * d).sum() / var
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] through the 2 x 3 matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align(im: Image.Image, points: np.ndarray, size: int = TEMPLATE_SIZE) -> tuple[Image.Image, np.ndarray]:
    """An RGB image and its five landmarks -> (the S x S aligned crop, the landmarks in it,
    float32 [5, 2]). Pixels the warp takes from outside the image are black."""
    matrix = similarity(points, template(size))
    return warp(im, matrix, (size, size)), transform_points(matrix, points).astype(np.float32)


def warp(im: Image.Image, matrix: np.ndarray, size: tuple[int, int], resample=Image.Resampling.BILINEAR,
         fill=0) -> Image.Image:
    """`im` through the 2 x 3 matrix (its pixels -> the output's, continuous coordinates) into a
    width x height image; output pixels the matrix takes from outside `im` are `fill`."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]  # (PIL maps output to input pixels)
    return im.transform(size, Image.Transform.AFFINE, tuple(inverse.ravel()), resample, fillcolor=fill)


__all__ = ["ARCFACE_112", "TEMPLATE_SIZE", "ALIGNMENTS", "template", "similarity", "transform_points", "align", "warp"]

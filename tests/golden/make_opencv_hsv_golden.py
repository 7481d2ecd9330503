"""HSV->RGB of every 8-bit HSV value in the official environment's opencv, at several image widths.

    /work/official-venv/bin/python tests/golden/make_opencv_hsv_golden.py tests/data/opencv_hsv2rgb.json

opencv converts a row's pixels in SIMD blocks and the remainder one by one, with different
rounding, so a colour's RGB depends on where it sits in the row (and thus on the image width);
mmcv's PhotoMetricDistortion inherits that. The file holds the SHA-256 of the (rows, width, 3)
result for each width, with the opencv version that made it: tests/test_transforms.py checks
that reinseg's opencv reproduces them.
"""

import hashlib
import json
import sys

import cv2
import numpy as np

WIDTHS = [8, 16, 17, 31, 32, 37, 64, 76, 96, 127, 256, 466, 512, 513]


def every_hsv_value() -> np.ndarray:
    """``(180 * 256 * 256, 3)`` uint8: every 8-bit HSV value (H 0..179), H slowest."""
    h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    return np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 3)


def hsv_to_rgb_digest(hsv: np.ndarray, width: int) -> str:
    rows = len(hsv) // width
    image = np.ascontiguousarray(hsv[: rows * width].reshape(rows, width, 3))
    return hashlib.sha256(cv2.cvtColor(image, cv2.COLOR_HSV2RGB).tobytes()).hexdigest()


if __name__ == "__main__":
    cv2.setNumThreads(1)
    hsv = every_hsv_value()
    record = dict(opencv=cv2.__version__, sha256={str(w): hsv_to_rgb_digest(hsv, w) for w in WIDTHS})
    with open(sys.argv[1], "w") as f:
        json.dump(record, f, indent=1)
    print(record["opencv"], "ok")

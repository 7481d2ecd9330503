"""OpenCV's image operations under two OpenCV versions (and thread counts): run manually.

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/compare_opencv_versions.py /tmp/cv4.npz 1
    OMP_NUM_THREADS=1 /work/main/.venv/bin/python tests/golden/compare_opencv_versions.py /tmp/cv5.npz 4
    python -c "import numpy as np; a, b = np.load('/tmp/cv4.npz'), np.load('/tmp/cv5.npz'); \
               print([k for k in a if not np.array_equal(a[k], b[k])])"

Saves what reinseg's pipeline uses OpenCV for: INTER_LINEAR resizes (12 sizes, up and down, GTAV
1914x1052 among them), INTER_NEAREST label resizes, HSV->RGB of every 8-bit HSV value, RGB->HSV of
all 2^24 colours, and PNG/JPEG decoding. opencv 4.11 (official environment) and 5.0 (reinseg's)
gave identical arrays, with 1 and 4 threads (2026-11-24), which is why reinseg accepts
``opencv-python-headless>=4.11,<5.1`` (5.1 changes HSV->RGB at some widths:
tests/golden/make_opencv_hsv_golden.py).
"""

import io
import sys

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(int(sys.argv[2]))
rng = np.random.RandomState(0)
out = {}
# a random image and label of odd size
base = rng.randint(0, 256, (157, 283, 3)).astype(np.uint8)
lab = rng.randint(0, 20, (157, 283)).astype(np.uint8)
sizes = [(512, 931), (79, 141), (300, 545), (157, 283), (1052, 1914), (256, 465), (1024, 1862), (61, 113)]
for i, (h, w) in enumerate(sizes):
    out[f"lin{i}"] = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
    out[f"near{i}"] = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
big = rng.randint(0, 256, (1052, 1914, 3)).astype(np.uint8)
for i, (h, w) in enumerate([(512, 931), (720, 1310), (2048, 3725), (256, 465)]):
    out[f"linbig{i}"] = cv2.resize(big, (w, h), interpolation=cv2.INTER_LINEAR)
# every HSV value -> BGR, every BGR (subsample) -> HSV
hh, ss, vv = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
hsv = np.stack([hh, ss, vv], -1).astype(np.uint8).reshape(-1, 256, 3)
out["hsv2bgr"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
out["hsv2rgb"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
allc = np.arange(256**3, dtype=np.uint32)
bgr = np.stack([allc & 255, (allc >> 8) & 255, allc >> 16], -1).astype(np.uint8).reshape(-1, 4096, 3)
out["bgr2hsv"] = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
out["rgb2hsv"] = cv2.cvtColor(bgr, cv2.COLOR_RGB2HSV)
# decoding
buf = io.BytesIO()
Image.fromarray(big[..., ::-1]).save(buf, format="JPEG", quality=90)
out["jpeg_cv2"] = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
out["jpeg_pil"] = np.array(Image.open(io.BytesIO(buf.getvalue())))[..., ::-1]
buf = io.BytesIO()
Image.fromarray(big[..., ::-1]).save(buf, format="PNG")
out["png_cv2"] = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
np.savez_compressed(sys.argv[1], **out)
print(cv2.__version__, "ok")

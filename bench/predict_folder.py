"""Inputs for bench/predict_folder.sh: COUNT JPEGs of photo-like sizes (random crops, scales
and flips of the two fixture photos, 300 to 640 pixels a side) and seeded random RepVGG-A0
weights in the official training-form naming.

    python bench/predict_folder.py OUT_DIR [COUNT]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

out = Path(sys.argv[1])
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
rng = np.random.default_rng(0)
root = Path(__file__).resolve().parent.parent / "fixtures" / "photos"
photos = [Image.open(root / name).convert("RGB") for name in ("chelsea.png", "rocket.jpg")]
images = out / "images"
for k in range(count):
    photo = photos[k % 2]
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    side = int(rng.integers(300, 641))
    scale = side / max(cw, ch)
    img = photo.crop((x, y, x + cw, y + ch)).resize((max(1, int(cw * scale)), max(1, int(ch * scale))))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    folder = images / f"part{k // 500}"
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"img{k:05d}.jpg", quality=90)

# RepVGG-A0: depths 2, 4, 14, 1; widths 48, 96, 192, 1280; stem 48; 1000 classes.
tensors = {}


def conv_bn(prefix, cin, cout, k):
    tensors[f"{prefix}.conv.weight"] = rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32)
    bn(f"{prefix}.bn", cout)


def bn(prefix, c):
    tensors[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    tensors[f"{prefix}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    tensors[f"{prefix}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    tensors[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    tensors[f"{prefix}.num_batches_tracked"] = np.array(0, dtype=np.int64)


def block(prefix, cin, cout, stride):
    conv_bn(f"{prefix}.rbr_dense", cin, cout, 3)
    conv_bn(f"{prefix}.rbr_1x1", cin, cout, 1)
    if cin == cout and stride == 1:
        bn(f"{prefix}.rbr_identity", cout)


block("stage0", 3, 48, 2)
cin = 48
for stage, (depth, width) in enumerate(zip((2, 4, 14, 1), (48, 96, 192, 1280)), start=1):
    for i in range(depth):
        block(f"stage{stage}.{i}", cin, width, 2 if i == 0 else 1)
        cin = width
tensors["linear.weight"] = rng.normal(0, 0.01, (1000, 1280)).astype(np.float32)
tensors["linear.bias"] = np.zeros(1000, dtype=np.float32)
save_file(tensors, out / "a0_train.safetensors")

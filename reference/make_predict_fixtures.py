#!/usr/bin/env python3
"""Generate the prediction fixtures for repvgg-rs: ImageNet class names, CC0 photos, reference
preprocessing and a tiny 1000-class model's reference top-k.

Run from the repository root, inside the reference venv:

    .venv-ref/bin/python reference/make_predict_fixtures.py [--skimage-data DIR]

Writes

  * crates/repvgg-data/src/imagenet_classes.txt     1000 lines, line k = timm's description of class k
  * crates/repvgg-data/src/imagenet_classes.NOTICE  origin and licences of that list
  * fixtures/photos/{chelsea.png,rocket.jpg}         copied byte for byte from scikit-image 0.26.0
  * fixtures/photos/broken.jpg                       the first 40% of rocket.jpg's bytes
  * fixtures/photos/expected/<photo>_<preset>.png    the uint8 crop right before ToTensor
  * fixtures/photos/tiny1000_train_official.safetensors
  * fixtures/photos/expected.json                    presets, crop geometry, top-k of the tiny model

The photos come from the scikit-image wheel (``skimage/data/``); without ``--skimage-data`` the
script runs ``pip download --no-deps scikit-image==0.26.0`` into a temporary folder (PyPI only) and
checks the files' SHA-256 against the values below.  Everything else is deterministic: the
class names come from timm's own ``timm.data.ImageNetInfo``, the crops from torchvision / timm
transforms on the PIL image, the model from ``reference/make_fixtures.py``'s official builder and
seeded random initialisation.  See ``fixtures/README.md`` ("Photos and predictions").
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, JpegImagePlugin, features
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

import timm
from timm.data import ImageNetInfo, create_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (build_official, randomize_, plain_sd, versions)

REPO = mf.REPO
PHOTO_DIR = REPO / "fixtures" / "photos"
EXPECTED_DIR = PHOTO_DIR / "expected"
CLASSES_TXT = REPO / "crates" / "repvgg-data" / "src" / "imagenet_classes.txt"
CLASSES_NOTICE = REPO / "crates" / "repvgg-data" / "src" / "imagenet_classes.NOTICE"

SKIMAGE = "scikit-image==0.26.0"
# name -> (sha256 of the file in the scikit-image 0.26.0 wheel, licence as stated in skimage/data/_fetchers.py)
PHOTOS = {
    "chelsea.png": ("596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                    "CC0 by the photographer (Stefan van der Walt): 'No copyright restrictions.'"),
    "rocket.jpg": ("c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
                   "public domain (SpaceX launch photo of DSCOVR on Falcon 9, released into the public domain)"),
}
# coffee.png (CC0, Rachel Michetti) is 466,706 bytes: with it the photos would exceed the ~600 KB budget,
# so it is left out.
BROKEN = ("broken.jpg", "rocket.jpg", 0.4)  # truncated JPEG: the first floor(0.4 * len) bytes

MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN = torchvision's ImageNet recipe
STD = (0.229, 0.224, 0.225)

# The three reference pipelines.  Each is the full transform (geometry, ToTensor, Normalize).
PRESETS = {
    "official": dict(
        resize=256, crop=224,
        definition="torchvision Compose([Resize(256, interpolation=BILINEAR), CenterCrop(224), ToTensor(), "
                   "Normalize(mean, std)]) (the official RepVGG repo's validation transform)",
        build=lambda: T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                                 T.ToTensor(), T.Normalize(MEAN, STD)]),
    ),
    "timm": dict(
        resize=256, crop=224,
        definition="timm.data.create_transform(input_size=224, crop_pct=0.875, interpolation='bilinear', "
                   "is_training=False) = Resize(floor(224 / 0.875) = 256, bilinear), CenterCrop(224), "
                   "MaybeToTensor(), Normalize(mean, std)",
        build=lambda: create_transform(input_size=224, crop_pct=0.875, interpolation="bilinear",
                                       is_training=False, mean=MEAN, std=STD),
    ),
    "d2se": dict(
        resize=320, crop=320,
        definition="torchvision Compose([Resize(320, interpolation=BILINEAR), CenterCrop(320), ToTensor(), "
                   "Normalize(mean, std)]) (timm's repvgg_d2se pretrained_cfg: 320, crop_pct 1.0, bilinear)",
        build=lambda: T.Compose([T.Resize(320, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(320),
                                 T.ToTensor(), T.Normalize(MEAN, STD)]),
        # cross-check: timm's own transform for the same settings must give the same tensor
        timm_twin=lambda: create_transform(input_size=320, crop_pct=1.0, interpolation="bilinear",
                                           is_training=False, mean=MEAN, std=STD),
    ),
}

MODEL_CFG = dict(name="tiny1000", stem_width=8, depths=[1, 1, 1, 1], widths=[8, 16, 16, 32],
                 groups={}, se=False, num_classes=1000, seed=2001)
MODEL_FILE = "tiny1000_train_official.safetensors"
TOPK = 10
NOISE_TRIALS = 4  # +-1 uint8 perturbations of the crop, to tell a port how robust each top-5 is
NOISE_SEED = 3001


# --------------------------------------------------------------------------- helpers

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    v = mf.versions()
    v.update({"torchvision": torchvision.__version__, "pillow": PIL.__version__,
              "libjpeg (pillow)": features.version("jpg"),
              "libjpeg-turbo (pillow)": features.version("libjpeg_turbo"), "zlib (pillow)": features.version("zlib")})
    return v


def skimage_data(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), SKIMAGE],
                   check=True)
    (wheel,) = tmp.glob("scikit_image-0.26.0-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in PHOTOS:
            z.extract(f"skimage/data/{name}", tmp)
    return tmp / "skimage" / "data"


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------- class names

def make_classes() -> list:
    info = ImageNetInfo()  # timm's own helper: imagenet_synsets.txt joined with imagenet_synset_to_lemma.txt
    assert info.num_classes() == 1000
    names = [info.index_to_description(i) for i in range(1000)]
    for n in names:
        assert n and n == n.strip() and "\n" not in n and "\t" not in n and n.isascii(), repr(n)
    assert names[281] == "tabby, tabby cat" and names[504] == "coffee mug" and names[652] == "military uniform"
    CLASSES_TXT.write_text("".join(n + "\n" for n in names), encoding="utf-8")
    CLASSES_NOTICE.write_text(f"""\
imagenet_classes.txt: the 1000 ImageNet-1k (ILSVRC-2012) class names, one per line, line k (counting
from 0) = class index k.

Generated by reference/make_predict_fixtures.py with timm {timm.__version__}'s own helper,
timm.data.ImageNetInfo().index_to_description(k): the k-th WordNet id of
timm/data/_info/imagenet_synsets.txt looked up in timm/data/_info/imagenet_synset_to_lemma.txt (the
comma-separated WordNet lemmas of that synset).  These are the names timm prints for its ImageNet-1k
models (e.g. 281 "tabby, tabby cat", 504 "coffee mug", 652 "military uniform").

Origin and licences:
  * timm (pytorch-image-models) {timm.__version__}, Copyright 2019 Ross Wightman, licensed under the
    Apache License, Version 2.0: https://www.apache.org/licenses/LICENSE-2.0 (the full text is also in
    timm's wheel, timm-{timm.__version__}.dist-info/licenses/LICENSE).
  * The lemmas come from WordNet 3.0, Copyright 2006 by Princeton University, distributed under the
    WordNet 3.0 license (permissive, BSD-style; no fee, keep the copyright notice):
    https://wordnet.princeton.edu/license-and-commercial-use
  * The class list / order is that of the ImageNet Large Scale Visual Recognition Challenge 2012
    (image-net.org).  No images are included.

Some names repeat: "crane" (134, the bird; 517, the machine); see the lines themselves.
""", encoding="utf-8")
    return names


# --------------------------------------------------------------------------- preprocessing

def split_pipeline(tf: T.Compose) -> tuple:
    """(geometric part, tensor part): everything before the ToTensor step, and the rest."""
    ts = list(tf.transforms)
    i = next(i for i, t in enumerate(ts) if type(t).__name__ in ("ToTensor", "MaybeToTensor"))
    return T.Compose(ts[:i]), T.Compose(ts[i:])


def to_tensor_normalize(u8: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize, written out: (x / 255 - mean) / std, all float32, CHW."""
    x = torch.from_numpy(np.array(u8, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    m = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def torchvision_geometry(w: int, h: int, resize: int, crop: int) -> dict:
    """torchvision's arithmetic: short side -> resize, long side -> int(resize * long / short)
    (truncation); crop offset int(round((size - crop) / 2.0)) with Python's round (half to even)."""
    if w <= h:
        rw, rh = resize, int(resize * h / w)
    else:
        rw, rh = int(resize * w / h), resize
    left = int(round((rw - crop) / 2.0))
    top = int(round((rh - crop) / 2.0))
    return dict(resized_size_wh=[rw, rh], crop_box_ltrb=[left, top, left + crop, top + crop],
                crop_offset_exact=[(rw - crop) / 2.0, (rh - crop) / 2.0])


def preprocess(img: Image.Image, preset: str) -> tuple:
    p = PRESETS[preset]
    tf = p["build"]()
    geom, tens = split_pipeline(tf)
    crop = geom(img)
    assert isinstance(crop, Image.Image) and crop.mode == "RGB", "resize ran on a tensor, not on PIL"
    u8 = np.asarray(crop, dtype=np.uint8).copy()
    assert u8.shape == (p["crop"], p["crop"], 3)
    full = tf(img)  # the whole pipeline in one call
    assert full.dtype == torch.float32 and torch.equal(full, tens(crop))
    # The crop is exactly PIL's resize + crop with torchvision's geometry.
    g = torchvision_geometry(img.width, img.height, p["resize"], p["crop"])
    manual = img.resize(tuple(g["resized_size_wh"]), Image.BILINEAR).crop(tuple(g["crop_box_ltrb"]))
    assert np.array_equal(np.asarray(manual), u8), (preset, "geometry differs from torchvision's")
    if "timm_twin" in p:
        assert torch.equal(p["timm_twin"]()(img), full), (preset, "timm's transform differs")
    return u8, full, g, repr(tf)


# --------------------------------------------------------------------------- model

@torch.no_grad()
def make_model() -> tuple:
    torch.manual_seed(MODEL_CFG["seed"])
    m32 = mf.build_official(MODEL_CFG).eval()
    mf.randomize_(m32, torch.Generator().manual_seed(MODEL_CFG["seed"]), mf.DEFAULT_WEIGHT_GAIN)
    sd = mf.plain_sd(m32)
    path = PHOTO_DIR / MODEL_FILE
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)
    # Reload into a fresh model: the file alone reproduces the reference.
    back = load_file(str(path))
    fresh = mf.build_official(MODEL_CFG).eval()
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    return fresh, copy.deepcopy(fresh).double().eval(), sd


@torch.no_grad()
def noise_check(m64, u8: np.ndarray, logits: torch.Tensor, seed: int) -> dict:
    """Add seeded noise in {-1, 0, +1} to every uint8 value (clamped to 0..255), as a different resize
    implementation might; does the (ordered) top-5 survive?"""
    gen = torch.Generator().manual_seed(seed)
    ref5 = torch.argsort(logits, descending=True, stable=True)[:5].tolist()
    same, same_set, worst = True, True, 0.0
    for _ in range(NOISE_TRIALS):
        d = torch.randint(-1, 2, u8.shape, generator=gen).numpy()
        noisy = np.clip(u8.astype(np.int64) + d, 0, 255).astype(np.uint8)
        lg = m64(to_tensor_normalize(noisy).double().unsqueeze(0))[0]
        t5 = torch.argsort(lg, descending=True, stable=True)[:5].tolist()
        same &= t5 == ref5
        same_set &= set(t5) == set(ref5)
        worst = max(worst, float((lg - logits).abs().max()))
    return {"trials": NOISE_TRIALS, "seed": seed, "top5_same_order_all": same, "top5_same_set_all": same_set,
            "max_abs_logit_change": worst}


@torch.no_grad()
def topk(m64, m32, x: torch.Tensor, names: list) -> dict:
    logits = m64(x.double().unsqueeze(0))[0]
    logits32 = m32(x.unsqueeze(0))[0]
    probs = torch.softmax(logits, dim=0)
    p, idx = torch.sort(probs, descending=True, stable=True)
    lg = logits[idx]
    idx = idx[:TOPK].tolist()
    top32 = torch.argsort(logits32.double(), descending=True, stable=True)[:5].tolist()
    return {
        "top5": [{"index": i, "label": names[i], "prob": float(probs[i])} for i in idx[:5]],
        "top10_indices": idx,
        "top10_probs": [float(v) for v in p[:TOPK]],
        "top10_logits": [float(v) for v in lg[:TOPK]],
        "margin_5_6": float(p[4] - p[5]),
        "logit_margin_5_6": float(lg[4] - lg[5]),
        "max_prob": float(p[0]),
        "f32_model_top5_same": top32 == idx[:5],
        "f32_vs_f64_logits_max_abs": float((logits32.double() - logits).abs().max()),
    }, logits


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skimage-data", help="scikit-image's skimage/data folder (default: pip download the wheel)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    names = make_classes()
    PHOTO_DIR.mkdir(parents=True, exist_ok=True)
    EXPECTED_DIR.mkdir(parents=True, exist_ok=True)

    photo_meta, reprs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        src = skimage_data(args.skimage_data, Path(tmp))
        raw = {name: (src / name).read_bytes() for name in PHOTOS}
    for name, data in raw.items():
        want, _ = PHOTOS[name]
        assert sha256(data) == want, (name, sha256(data))
        write_bytes(PHOTO_DIR / name, data)
    bname, bsrc, frac = BROKEN
    cut = int(len(raw[bsrc]) * frac)
    write_bytes(PHOTO_DIR / bname, raw[bsrc][:cut])

    m32, m64, sd = make_model()

    for name in PHOTOS:
        data = raw[name]
        opened = Image.open(PHOTO_DIR / name)
        fmt, mode, size = opened.format, opened.mode, opened.size
        extra = {}
        if fmt == "JPEG":
            extra["jpeg_subsampling"] = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(
                JpegImagePlugin.get_sampling(opened), "other")
            extra["jpeg_progressive"] = bool(opened.info.get("progressive", 0))
        img = opened.convert("RGB")
        dec = np.asarray(img, dtype=np.uint8)
        entry = {
            "file": name,
            "bytes": len(data),
            "sha256": sha256(data),
            "licence": PHOTOS[name][1],
            "source": f"{SKIMAGE} wheel, skimage/data/{name}",
            "format": fmt,
            "mode": mode,
            "size_wh": list(size),
            "has_icc_profile": "icc_profile" in opened.info,
            **extra,
            "decoded_rgb": {
                "_note": "PIL's decode, Image.open(...).convert('RGB'), HWC uint8; ICC profile ignored",
                "sha256": sha256(dec.tobytes()),
                "sum_per_channel": [int(v) for v in dec.reshape(-1, 3).sum(0, dtype=np.int64)],
            },
            "presets": {},
        }
        stem = Path(name).stem
        for preset in PRESETS:
            u8, x, geom, reprs[preset] = preprocess(img, preset)
            png = EXPECTED_DIR / f"{stem}_{preset}.png"
            Image.fromarray(u8, mode="RGB").save(png, format="PNG", optimize=True)
            os.chmod(png, 0o644)
            back = np.asarray(Image.open(png).convert("RGB"))
            assert np.array_equal(back, u8)
            # ToTensor + Normalize of the PNG == the pipeline's tensor, bit for bit.
            assert torch.equal(to_tensor_normalize(back), x), (name, preset)
            res, logits = topk(m64, m32, x, names)
            noise_seed = NOISE_SEED + 10 * list(PHOTOS).index(name) + list(PRESETS).index(preset)
            entry["presets"][preset] = {
                "png": f"expected/{png.name}",
                "png_sha256": sha256(png.read_bytes()),
                "crop_rgb_sha256": sha256(u8.tobytes()),
                **geom,
                "input_matches_png_exactly": True,
                **res,
                "pm1_pixel_noise": noise_check(m64, u8, logits, noise_seed),
            }
        # timm's 224 preset is the official one, pixel for pixel
        assert entry["presets"]["timm"]["crop_rgb_sha256"] == entry["presets"]["official"]["crop_rgb_sha256"]
        photo_meta[name] = entry

    broken = raw[bsrc][:cut]
    try:
        Image.open(PHOTO_DIR / bname).convert("RGB")
        pil_broken = "decoded (unexpected)"
    except OSError as e:
        pil_broken = f"OSError: {e}"

    pcfg = {}
    for arch in ("repvgg_a0", "repvgg_d2se"):
        c = timm.create_model(arch, pretrained=False).pretrained_cfg
        pcfg[arch] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()
                      if k in ("hf_hub_id", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                               "num_classes", "license")}

    meta = {
        "source": "reference/make_predict_fixtures.py",
        "versions": versions(),
        "mean": list(MEAN),
        "std": list(STD),
        "normalisation": "x = (u8 / 255 - mean) / std per channel, float32, CHW (torchvision ToTensor + Normalize; "
                         "the model input is this float32 tensor cast to float64)",
        "presets": {k: {"resize_short_side": v["resize"], "crop": v["crop"], "interpolation": "bilinear",
                        "definition": v["definition"],
                        "transform_repr": reprs[k].splitlines()} for k, v in PRESETS.items()},
        "geometry_rules": {
            "resize": "PIL Image.resize(BILINEAR) (PIL's bilinear is antialiased: its triangle filter is "
                      "widened by the scale factor when downscaling); short side -> resize, long side -> "
                      "int(resize * long / short) (truncated)",
            "center_crop": "left = int(round((w - crop) / 2.0)), top = int(round((h - crop) / 2.0)) with "
                           "Python's round: half to even (79.5 -> 80, 80.5 -> 80)",
            "decode": "Image.open(path).convert('RGB'); embedded ICC profiles ignored",
        },
        "timm_pretrained_cfg": pcfg,
        "model": {
            "weights": MODEL_FILE,
            "builder": "repvgg_pytorch.repvgg.RepVGG (official), training form, eval(), float64 from the float32 "
                       "weights",
            "spec": {"stem_width": MODEL_CFG["stem_width"], "depths": MODEL_CFG["depths"],
                     "widths": MODEL_CFG["widths"], "groups": {}, "se": False,
                     "num_classes": MODEL_CFG["num_classes"]},
            "seed": MODEL_CFG["seed"],
            "init": "as fixtures/<config>/ (reference/make_fixtures.py randomize_, gain 1.0): conv/linear "
                    "N(0,1)/sqrt(fan_in), linear bias N(0,1)*0.1, BN weight U(0.5,1.5), bias N(0,1)*0.1, "
                    "running_mean N(0,1)*0.1, running_var U(0.5,2.0), num_batches_tracked random int64",
            "tensors": len(sd),
            "prob": "softmax of the float64 logits",
        },
        "photos": photo_meta,
        "broken": {"file": bname, "from": bsrc, "bytes": cut, "of": len(raw[bsrc]), "fraction": frac,
                   "sha256": sha256(broken), "pil": pil_broken},
        "left_out": {"coffee.png": "CC0 (Rachel Michetti), 466,706 bytes: over the ~600 KB budget together "
                                   "with the other photos"},
    }
    (PHOTO_DIR / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")

    for name, e in photo_meta.items():
        for preset, r in e["presets"].items():
            print(f"{name:12s} {preset:9s} crop {r['crop_box_ltrb']} of {r['resized_size_wh']}  top5 "
                  f"{[t['index'] for t in r['top5']]}  p1 {r['max_prob']:.5f}  margin5/6 {r['margin_5_6']:.2e}"
                  f"  logit margin {r['logit_margin_5_6']:.4f}  f32 top5 same {r['f32_model_top5_same']}"
                  f"  +-1 noise: same order {r['pm1_pixel_noise']['top5_same_order_all']}"
                  f" max dlogit {r['pm1_pixel_noise']['max_abs_logit_change']:.1e}")
    print("broken.jpg:", pil_broken)
    return 0


if __name__ == "__main__":
    sys.exit(main())

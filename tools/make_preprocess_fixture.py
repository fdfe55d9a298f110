#!/usr/bin/env python3
"""Regenerate tests/fixtures/preprocess/: the reference outputs that
`src/model/preprocess.rs` must reproduce.

Two kinds of case, listed in `manifest.json`:

* `resize`: Pillow's `Image.resize((w, h), Image.BICUBIC)` on an 8-bit RGB
  image, stored as PNG. The Rust resampler must match it byte for byte.
* `pipeline`: OpenAI CLIP's image transform (torchvision `Resize(size,
  BICUBIC)`, `CenterCrop(size)`, `ToTensor()`, `Normalize(mean, std)`) on the
  same PIL image, stored as raw little-endian f32 in CHW order.

Everything is synthetic and seeded, so rerunning this script gives the same
files for a given Pillow. The Pillow version matters: from Pillow 13 on, a
resize whose height shrinks by more than twice as many pixels as its width
runs the vertical pass first, which can move some pixels by one level; the
Rust code follows Pillow 13 and the manifest records the version used.
Needs pillow, numpy, torch and torchvision:

    python3 tools/make_preprocess_fixture.py
"""

import json
import pathlib

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms

# Must equal CLIP_MEAN / CLIP_STD in src/model/preprocess.rs.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "preprocess"


def noise_with_gradient(rng, w, h):
    """Noise over smooth ramps: exercises every coefficient with varied values."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [
            255.0 * xs / max(w - 1, 1),
            255.0 * ys / max(h - 1, 1),
            127.5 + 127.5 * np.sin(xs * 0.7 + ys * 0.3),
        ],
        axis=-1,
    )
    noisy = base + rng.normal(0.0, 40.0, size=base.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def hard_edges(w, h, block):
    """Saturated blocks: bicubic overshoots at every edge, so clipping to
    [0, 255] in both passes gets tested."""
    ys, xs = np.mgrid[0:h, 0:w]
    checker = ((xs // block + ys // block) % 2).astype(np.uint8) * 255
    return np.stack([checker, 255 - checker, (xs * 255 // max(w - 1, 1)).astype(np.uint8)], axis=-1)


def clip_transform(size):
    # The exact transform of openai/CLIP's `_transform`, minus the RGB
    # conversion (inputs here are RGB already).
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()

    rng = np.random.default_rng(20240611)
    inputs = {
        # 37x23 -> size 16 gives 25x16, crop offset 4.5 which must round to 4.
        "noise_37x23": noise_with_gradient(rng, 37, 23),
        # Portrait; size 24 gives 24x38, crop offset 7.
        "noise_50x81": noise_with_gradient(rng, 50, 81),
        # Upscale; size 16 gives 16x23, crop offset 3.5 which must round to 4.
        "noise_9x13": noise_with_gradient(rng, 9, 13),
        # Strong downscale (wide support); size 16 gives 21x16, offset 2.5 -> 2.
        "noise_120x90": noise_with_gradient(rng, 120, 90),
        # Overshoot and clipping.
        "edges_29x17": hard_edges(29, 17, 4),
        # One pixel wide: every horizontal window holds a single pixel.
        "noise_1x30": noise_with_gradient(rng, 1, 30),
        # Already square at the target size: the transform must not resample.
        "noise_24x24": noise_with_gradient(rng, 24, 24),
        # Taller than 2:1; size 16 gives 16x56, where Pillow >= 13 runs the
        # vertical pass first (height shrinks more than twice the width).
        "noise_20x70": noise_with_gradient(rng, 20, 70),
    }

    resize_targets = {
        "noise_37x23": [(16, 10), (61, 40), (20, 31), (16, 23), (37, 11), (3, 2)],
        "noise_50x81": [(24, 38), (7, 100)],
        "noise_9x13": [(16, 23), (40, 5)],
        "noise_120x90": [(21, 16), (13, 9)],
        "edges_29x17": [(70, 41), (11, 7), (29, 50)],
        "noise_1x30": [(16, 480), (5, 7), (1, 12)],
        "noise_24x24": [(24, 24), (17, 17)],
        "noise_20x70": [(16, 56), (19, 30), (30, 9)],
    }
    pipeline_sizes = {
        "noise_37x23": [16, 24],
        "noise_50x81": [24],
        "noise_9x13": [16],
        "noise_120x90": [16],
        "edges_29x17": [24],
        "noise_1x30": [16],
        "noise_24x24": [24, 16],
        "noise_20x70": [16],
    }

    manifest = {
        "generator": "tools/make_preprocess_fixture.py",
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "resize": [],
        "pipeline": [],
    }

    for name, pixels in inputs.items():
        image = Image.fromarray(pixels)
        input_file = f"{name}.png"
        image.save(OUT / input_file)
        # Read back what was written so the references come from the exact
        # bytes the Rust test will decode.
        image = Image.open(OUT / input_file).convert("RGB")

        for w, h in resize_targets[name]:
            expected = f"resize_{name}_to_{w}x{h}.png"
            image.resize((w, h), Image.BICUBIC).save(OUT / expected)
            manifest["resize"].append(
                {"input": input_file, "width": w, "height": h, "expected": expected}
            )

        for size in pipeline_sizes[name]:
            expected = f"pipeline_{name}_size{size}.f32"
            tensor = clip_transform(size)(image)
            assert tuple(tensor.shape) == (3, size, size), tensor.shape
            tensor.numpy().astype("<f4").tofile(OUT / expected)
            manifest["pipeline"].append({"input": input_file, "size": size, "expected": expected})

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, into {OUT}")


if __name__ == "__main__":
    main()

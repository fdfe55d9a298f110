#!/usr/bin/env python3
"""Times the CLIP ViT-B/16 image encoder in ONNX Runtime and PyTorch (and
OpenVINO when it is installed), f32 and reduced precision, and optionally
`cliper bench --json` in the same run, and prints the ratios.

Peers: `onnxruntime` (f32), `onnxruntime-int8` (`quantize_dynamic`, the
8-bit path ORT documents for transformers on the CPU), `pytorch` (f32),
`pytorch-bf16` (the model cast to bfloat16; oneDNN uses AMX or
AVX512-BF16 where the CPU has them), `openvino` (f32) and `openvino-bf16`
(`INFERENCE_PRECISION_HINT=bf16`; OpenVINO falls back to f32 on a CPU
without bf16 instructions, which the table then shows).

All three use random weights of the real shape (HF
`CLIPVisionModelWithProjection`, 224 px, patch 16, width 768, 12 layers,
projection to 512), the same thread count and the same batch sizes. The
PyTorch model is exported to ONNX once (cached under target/bench-reference/).

    pip install torch transformers onnx onnxruntime openvino
    cargo build --release
    python3 tools/bench_reference.py --threads 2 --batch 1,8 --cliper target/release/cliper \
        --precision f32 q8

Ratios are cliper time / reference time per image: below 1.0 means cliper is
faster. Each figure is the median of --runs timed runs after --warmup runs
(`--stat min`: the fastest of them).
Reduced precisions are also given against the fastest reduced-precision peer
of the same run (ORT int8, PyTorch bf16, OpenVINO bf16).

`--cpu-mask avx2` runs every engine as it runs on a CPU without AVX-512 (a
laptop: AVX2 and FMA; `avx2-vnni` keeps AVX-VNNI where the CPU has it), on
this machine, in the same run: the script builds
tools/cpuid_mask/cpuid_mask.c with gcc and runs itself again under it
(LD_PRELOAD), so that ONNX Runtime, PyTorch, OpenVINO and cliper all read a
CPUID without the AVX-512, AVX512-BF16, VNNI and AMX bits. It needs Linux's
CPUID faulting (`cpuid_fault` in /proc/cpuinfo).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every engine")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="figure of each engine's runs that the table and ratios use: the median, or the fastest "
        "(min: the figure least touched by other tenants of a shared machine, whose speed drifts "
        "while the engines run one after another)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cliper", help="path of the cliper binary to run `bench --json` with (optional)")
    p.add_argument(
        "--precision",
        nargs="+",
        default=["f32"],
        help="cliper precisions to time (f32, q8, bf16, auto); q8:own, q8:onednn, f32:gemm, f32:onednn, "
        "f32:packed force that kernel (CLIPER_Q8 / CLIPER_F32)",
    )
    p.add_argument("--skip-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--skip-reduced", action="store_true", help="do not time the peers' int8/bf16 paths")
    p.add_argument("--cache", default="target/bench-reference", help="where the ONNX export is kept")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--cpu-mask",
        choices=["avx2", "avx2-vnni"],
        help="run every engine as on a CPU without AVX-512/AMX (CPUID masked, see the module doc)",
    )
    return p.parse_args()


CPU_FLAGS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]


def cpu_description():
    """The CPU model and the flags that matter here, as /proc/cpuinfo says
    (the kernel's view, not the masked CPUID)."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags], "cpuid_fault" in flags


def run_masked(mask, cache):
    """Builds the CPUID mask and runs this script again under it."""
    _, _, can_fault = cpu_description()
    if not can_fault:
        sys.exit("--cpu-mask needs CPUID faulting (`cpuid_fault` in /proc/cpuinfo); this CPU or kernel lacks it")
    src = Path(__file__).resolve().parent / "cpuid_mask" / "cpuid_mask.c"
    lib = Path(cache).resolve() / "cpuid_mask.so"
    lib.parent.mkdir(parents=True, exist_ok=True)
    if not lib.exists() or lib.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    preload = " ".join(x for x in [str(lib), os.environ.get("LD_PRELOAD", "")] if x)
    env = dict(os.environ, LD_PRELOAD=preload, CPUID_MASK=mask, BENCH_REFERENCE_MASKED=mask)
    sys.exit(subprocess.run([sys.executable] + sys.argv, env=env).returncode)


def vit_b16():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
        hidden_act="quick_gelu",
    )
    import torch

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(cfg).eval()


def export_onnx(model, path: Path):
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).image_embeds

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(1, 3, 224, 224)
    kwargs = dict(
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        opset_version=17,
    )
    try:
        torch.onnx.export(Wrapper(model), (x,), str(path), dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(Wrapper(model), (x,), str(path), **kwargs)


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def per_image(stat, b):
    return {k: v / b for k, v in stat.items()}


def quantize_onnx(path: Path) -> Path:
    """ORT's dynamic 8-bit quantization of the exported model (cached)."""
    out = path.with_name(path.stem + "_int8.onnx")
    if not out.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        print(f"quantizing {out} ...", file=sys.stderr)
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def bench_openvino(path, batches, threads, warmup, runs, precision):
    import numpy as np
    import openvino as ov

    core = ov.Core()
    cfg = {
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    model = core.read_model(str(path))
    out = {}
    rng = np.random.default_rng(0)
    for b in batches:
        model.reshape({"pixel_values": [b, 3, 224, 224]})
        compiled = core.compile_model(model, "CPU", cfg)
        req = compiled.create_infer_request()
        x = rng.standard_normal((b, 3, 224, 224), dtype=np.float32)
        out[str(b)] = per_image(timed(lambda: req.infer({"pixel_values": x}), warmup, runs), b)
    return out, ov.__version__


def bench_onnx(path, batches, threads, warmup, runs):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = {}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, 224, 224), dtype=np.float32)
        out[str(b)] = per_image(timed(lambda: sess.run(None, {"pixel_values": x}), warmup, runs), b)
    return out, ort.__version__


def bench_torch(model, batches, threads, warmup, runs, dtype=None):
    import torch

    torch.set_num_threads(threads)
    if dtype is not None:
        import copy

        model = copy.deepcopy(model).to(dtype)
    out = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224, dtype=dtype or torch.float32)
        with torch.inference_mode():
            out[str(b)] = per_image(timed(lambda: model(pixel_values=x).image_embeds, warmup, runs), b)
    return out, torch.__version__


def bench_cliper(binary, batches, threads, runs, precision):
    # "q8:onednn" is q8 with CLIPER_Q8=onednn, "f32:packed" f32 with
    # CLIPER_F32=packed: one kernel forced, to time it beside the others.
    precision, _, kernel = precision.partition(":")
    if kernel and precision not in ("q8", "f32"):
        sys.exit(f"--precision {precision}:{kernel}: only q8 and f32 take a kernel (q8:own, q8:onednn, f32:gemm, ...)")
    cmd = [
        binary, "bench", "--random", "--json",
        "--batch", ",".join(str(b) for b in batches),
        "--threads", str(threads),
        "--runs", str(runs),
        "--device", "cpu",
        "--precision", precision,
    ]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    # A precision without a kernel runs cliper's own choice, whatever the
    # caller's shell forces.
    for var in ("CLIPER_Q8", "CLIPER_F32"):
        env.pop(var, None)
    if kernel:
        env[f"CLIPER_{precision.upper()}"] = kernel
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        # One precision this CPU cannot run (bf16 without bf16 instructions)
        # must not lose the rest of the run: said, and left out of the table.
        print(f"`{' '.join(cmd)}` failed, not timed:\n{res.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(res.stdout)


def main():
    args = parse_args()
    if args.cpu_mask and os.environ.get("BENCH_REFERENCE_MASKED") != args.cpu_mask:
        run_masked(args.cpu_mask, args.cache)
    batches = [int(b) for b in args.batch.split(",") if b]
    import torch

    torch.set_num_threads(args.threads)
    model_name, flags, _ = cpu_description()
    isa = torch.backends.cpu.get_cpu_capability()
    if args.cpu_mask and isa.startswith("AVX512"):
        sys.exit(f"the CPUID mask did not take: PyTorch still sees {isa}")
    model = vit_b16()
    onnx_path = Path(args.cache) / "clip_vit_b16_vision.onnx"
    if not onnx_path.exists():
        print(f"exporting {onnx_path} ...", file=sys.stderr)
        export_onnx(model, onnx_path)

    result = {
        "threads": args.threads,
        "ratios_from": args.stat,
        "batches": batches,
        "cpu": {"model": model_name, "flags": flags, "mask": args.cpu_mask, "pytorch_sees": isa},
        "image_encode_ms_per_image": {},
    }
    print("timing ONNX Runtime ...", file=sys.stderr)
    ort_t, ort_v = bench_onnx(onnx_path, batches, args.threads, args.warmup, args.runs)
    result["image_encode_ms_per_image"]["onnxruntime"] = ort_t
    result["versions"] = {"onnxruntime": ort_v}
    if not args.skip_torch:
        print("timing PyTorch ...", file=sys.stderr)
        pt_t, pt_v = bench_torch(model, batches, args.threads, args.warmup, args.runs)
        result["image_encode_ms_per_image"]["pytorch"] = pt_t
        result["versions"]["pytorch"] = pt_v
    if not args.skip_reduced:
        print("timing ONNX Runtime int8 ...", file=sys.stderr)
        q_t, _ = bench_onnx(quantize_onnx(onnx_path), batches, args.threads, args.warmup, args.runs)
        result["image_encode_ms_per_image"]["onnxruntime-int8"] = q_t
        if not args.skip_torch:
            print("timing PyTorch bf16 ...", file=sys.stderr)
            b_t, _ = bench_torch(model, batches, args.threads, args.warmup, args.runs, torch.bfloat16)
            result["image_encode_ms_per_image"]["pytorch-bf16"] = b_t
    try:
        import openvino  # noqa: F401

        have_ov = True
    except ImportError:
        have_ov = False
        print("OpenVINO is not installed (pip install openvino): not timed", file=sys.stderr)
    if have_ov:
        for prec, name in [("f32", "openvino")] + ([] if args.skip_reduced else [("bf16", "openvino-bf16")]):
            print(f"timing {name} ...", file=sys.stderr)
            o_t, o_v = bench_openvino(onnx_path, batches, args.threads, args.warmup, args.runs, prec)
            result["image_encode_ms_per_image"][name] = o_t
            result["versions"]["openvino"] = o_v
    if args.cliper:
        for prec in args.precision:
            print(f"timing cliper ({prec}) ...", file=sys.stderr)
            rep = bench_cliper(args.cliper, batches, args.threads, args.runs, prec)
            if rep is None:
                result.setdefault("not_timed", []).append(f"cliper-{prec}")
                continue
            result["image_encode_ms_per_image"][f"cliper-{prec}"] = rep["image_encode_ms_per_image"]
            result.setdefault("cliper_kernel", {})[prec] = rep.get("kernel")
            if "agreement_vs_f32" in rep:
                result.setdefault("agreement_vs_f32", {})[prec] = rep["agreement_vs_f32"]
            result.setdefault("peak_memory_mb", {})[prec] = rep.get("peak_memory_mb")

    ref = result["image_encode_ms_per_image"]["onnxruntime"]
    ratios = {}
    for name, t in result["image_encode_ms_per_image"].items():
        if name == "onnxruntime":
            continue
        ratios[name] = {b: t[b][args.stat] / ref[b][args.stat] for b in t if b in ref}
    result["ratio_vs_onnxruntime"] = ratios
    peers = ["onnxruntime-int8", "pytorch-bf16", "openvino-bf16"]
    times = result["image_encode_ms_per_image"]
    best = {}
    for b in map(str, batches):
        have = [(times[p][b][args.stat], p) for p in peers if p in times and b in times[p]]
        if have:
            best[b] = min(have)
    result["fastest_reduced_peer"] = {b: p for b, (_, p) in best.items()}
    result["ratio_vs_fastest_reduced_peer"] = {
        name: {b: t[b][args.stat] / best[b][0] for b in t if b in best}
        for name, t in times.items()
        if name.startswith("cliper-") and name.partition(":")[0] != "cliper-f32"
    }

    if args.json:
        print(json.dumps(result, indent=1))
        return
    stat = "median" if args.stat == "median" else "fastest"
    print(f"ViT-B/16 image encoder, ms per image ({stat} of {args.runs}), {args.threads} thread(s)")
    mask = f"; CPUID masked to {args.cpu_mask} (PyTorch sees {isa})" if args.cpu_mask else ""
    print(f"CPU: {model_name} ({' '.join(flags)}){mask}")
    if "cliper_kernel" in result:
        print("cliper kernels: " + ", ".join(f"{p} {k}" for p, k in result["cliper_kernel"].items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    head = f"{'engine':<18}" + "".join(f"{'batch ' + str(b):>12}{'vs ORT':>9}" for b in batches)
    print(head)
    for name, t in result["image_encode_ms_per_image"].items():
        row = f"{name:<18}"
        for b in batches:
            m = t[str(b)][args.stat]
            r = m / ref[str(b)][args.stat]
            row += f"{m:>12.1f}{r:>9.2f}"
        print(row)
    for name, r in result["ratio_vs_fastest_reduced_peer"].items():
        print(
            f"{name} vs the fastest reduced-precision peer: "
            + ", ".join(f"batch {b} {v:.2f} ({result['fastest_reduced_peer'][b]})" for b, v in r.items())
        )
    for prec, a in result.get("agreement_vs_f32", {}).items():
        print(
            f"cliper-{prec} vs f32 on {a['images']} images: top-1 agreement {100 * a['top1_agreement']:.1f}%, "
            f"max probability difference {a['max_prob_diff']:.4f}"
        )


if __name__ == "__main__":
    main()

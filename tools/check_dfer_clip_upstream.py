#!/usr/bin/env python3
"""Checks `cliper` against DFER-CLIP's own code (not a re-implementation):
builds a small random CLIP with the authors' `clip/model.py`, wraps it in
their `GenerateModel` exactly as their main.py does (DataParallel, class
descriptors of `models/Text.py`, 8 class-specific contexts, SGD with their
three parameter groups, one step so the optimizer state is real), saves the
checkpoint as their `save_checkpoint` does, and runs their forward on 16
frames. Then `cliper classify-clip` and `cliper classify` must give the same
logits. Nothing of their code is copied here or into the repository: it is
imported from a checkout given on the command line.

Usage:  git clone https://github.com/zengqunzhao/DFER-CLIP
        pip install torch torchvision einops ftfy regex pillow
        python3 tools/check_dfer_clip_upstream.py DFER-CLIP/ [target/release/cliper]
(Python environments without `pkg_resources`, which their clip.py imports,
get a two-line stand-in.)
"""
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from PIL import Image


def main():
    repo = os.path.abspath(sys.argv[1])
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/cliper"
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging import version
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=types.SimpleNamespace(version=version))
    sys.path[:0] = [os.path.join(repo, "models"), repo]
    from clip.model import CLIP  # their CLIP
    from models.Generate_Model import GenerateModel
    from models.Text import class_descriptor_7

    torch.manual_seed(0)
    # Their GenerateModel fixes the temporal width at 512: embed_dim 512.
    clip_model = CLIP(embed_dim=512, image_resolution=64, vision_layers=2, vision_width=64,
                      vision_patch_size=32, context_length=77, vocab_size=49408,
                      transformer_width=64, transformer_heads=1, transformer_layers=2).float()
    with torch.no_grad():  # every weight non-trivial (biases, LayerNorms too)
        for p in clip_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = types.SimpleNamespace(contexts_number=8, class_token_position="end",
                                 class_specific_contexts="True",
                                 load_and_tune_prompt_learner="False", temporal_layers=1)
    model = GenerateModel(input_text=class_descriptor_7, clip_model=clip_model, args=args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "temporal_net" in name or "prompt_learner" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = torch.nn.DataParallel(model)
    optimizer = torch.optim.SGD([{"params": model.module.temporal_net.parameters(), "lr": 1e-2},
                                 {"params": model.module.image_encoder.parameters(), "lr": 1e-5},
                                 {"params": model.module.prompt_learner.parameters(), "lr": 1e-3}],
                                lr=1e-2, momentum=0.9, weight_decay=1e-4)
    model.eval()

    out = tempfile.mkdtemp(prefix="dfer-upstream-")
    rng = np.random.default_rng(1)
    frames = []
    for i in range(16):
        a = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        a[:, :, 0] = (a[:, :, 0] // 2 + i * 8).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(out, f"f{i:02}.png"))
        frames.append(torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    x = torch.stack(frames).unsqueeze(0)  # [1, 16, 3, 64, 64], their test transform's pixels
    # One SGD step first, so that the saved optimizer holds momentum buffers
    # (the logits below are those of the stepped weights, which are saved).
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        clip_logits = model(x)[0]
        m = model.module
        t = m.text_encoder(m.prompt_learner(), m.tokenized_prompts)
        t = t / t.norm(dim=-1, keepdim=True)
        f = m.image_encoder(frames[0].unsqueeze(0))
        f = f / f.norm(dim=-1, keepdim=True)
        frame_logits = (f @ t.t() / 0.01)[0]
    state = {"epoch": 1, "state_dict": model.state_dict(), "best_acc": torch.tensor(12.5),
             "optimizer": optimizer.state_dict()}
    ckpt = os.path.join(out, "DFEW-upstream-model_best.pth")
    torch.save(state, ckpt)

    frames_dir = os.path.join(out, "clip")
    os.makedirs(frames_dir)
    for i in range(16):
        os.rename(os.path.join(out, f"f{i:02}.png"), os.path.join(frames_dir, f"f{i:02}.png"))
    run = lambda *a: json.loads(subprocess.run([binary, *a], check=True, capture_output=True,
                                               text=True).stdout.splitlines()[0])
    v = run("classify-clip", "--model", ckpt, "--no-detect", "--json", frames_dir)
    ours = [c["score"] for c in v["faces"][0]["classes"]]
    w = run("classify", "--model", ckpt, "--no-detect", "--json", os.path.join(frames_dir, "f00.png"))
    ours_frame = [c["score"] for c in w["faces"][0]["classes"]]
    d_clip = float(np.abs(np.array(ours) - clip_logits.numpy()).max())
    d_frame = float(np.abs(np.array(ours_frame) - frame_logits.numpy()).max())
    print(json.dumps({"clip_logits_max_abs_diff": d_clip, "frame_logits_max_abs_diff": d_frame,
                      "theirs": clip_logits.tolist(), "ours": ours, "dir": out}, indent=1))
    ok = d_clip < 1e-3 and d_frame < 1e-3
    print("OK" if ok else "MISMATCH", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

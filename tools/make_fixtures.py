#!/usr/bin/env python3
"""Regenerates the numerical fixtures in tests/fixtures/ from the reference
stack: HF `transformers` CLIP (eager attention) on torch, torchvision's
preprocessing (what OpenAI's `clip.load` and CLIPER use), and OpenAI's
tokenizer as shipped by `open_clip` (ftfy + html unescape + BPE).

Usage:  pip install torch torchvision transformers open_clip_torch ftfy pillow safetensors
        python3 tools/make_fixtures.py            # writes tests/fixtures/

Everything is seeded: rerunning gives the same files. Tiny random models, every
weight randomised (LayerNorm scales and all biases too) so that a missing bias,
a q/k/v mix-up or a transposed projection changes the outputs.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from transformers import CLIPConfig, CLIPModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# CLIPER (docs/model.md section 2)
TEMPLATE_IDS = [49406, 550, 1014, 1125, 539, 343, 343, 343, 343, 269, 49407]
SLOTS = [5, 6, 7, 8]
CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]


def preprocess(img, size):
    t = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    return t(img.convert("RGB")).unsqueeze(0)


def make_model(seed, vision, text, embed, eos_token_id):
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(text, eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=0),
        vision_config=vision,
        projection_dim=embed,
    )
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(np.log(1 / 0.07))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1] if p.dim() > 1 else 1))
    return model, cfg


def hf_to_openai(sd):
    """HF state dict -> OpenAI naming (the inverse of CLIPER.md's mapping)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k == "logit_scale":
            out[k] = v
            continue
        if k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        tower, rest = k.split(".", 1)
        pre = "visual." if tower == "vision_model" else ""
        if rest.startswith("encoder.layers."):
            idx, part = rest[len("encoder.layers."):].split(".", 1)
            base = f"{pre}transformer.resblocks.{idx}."
            if part.startswith("self_attn.q_proj"):
                kind = part.split(".")[-1]
                q = sd[f"{tower}.encoder.layers.{idx}.self_attn.q_proj.{kind}"]
                kk = sd[f"{tower}.encoder.layers.{idx}.self_attn.k_proj.{kind}"]
                vv = sd[f"{tower}.encoder.layers.{idx}.self_attn.v_proj.{kind}"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat([q, kk, vv], 0).contiguous()
                continue
            if part.startswith("self_attn.k_proj") or part.startswith("self_attn.v_proj"):
                continue
            part = (part.replace("self_attn.out_proj", "attn.out_proj")
                    .replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[base + part] = v
            continue
        m = {
            "embeddings.patch_embedding.weight": "conv1.weight",
            "embeddings.class_embedding": "class_embedding",
            "embeddings.position_embedding.weight": "positional_embedding",
            "embeddings.token_embedding.weight": "token_embedding.weight",
            "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
            "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
        }[rest]
        if tower == "text_model" and m == "positional_embedding":
            out["positional_embedding"] = v
        else:
            out[pre + m] = v
    return out


def synthetic_image(seed, w, h):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([
        127 + 100 * np.sin(x / (3 + seed) + y / 7),
        127 + 100 * np.cos(y / (4 + seed)),
        (x * 255 // max(w - 1, 1) + y * 3) % 256,
    ], -1)
    noise = rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def image_features(model, px):
    with torch.no_grad():
        vo = model.vision_model(pixel_values=px, output_hidden_states=True)
        emb = model.visual_projection(vo.pooler_output)
        # per-layer CLS (after each block, before post_layernorm)
        cls = [h[:, 0, :] for h in vo.hidden_states[1:]]
    return emb, cls


def text_features_ids(model, ids):
    with torch.no_grad():
        to = model.text_model(input_ids=ids)
        return model.text_projection(to.pooler_output)


def norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def write_model(name, model, cfg, naming, fmt, with_config, half=False):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    if naming == "openai":
        sd = hf_to_openai(sd)
        sd = {"module." + k: v for k, v in sd.items()} if fmt == "pt" else sd
    if half:
        sd = {k: (v.half() if v.is_floating_point() and "norm" not in k and "ln_" not in k else v)
              for k, v in sd.items()}
    if fmt == "safetensors":
        save_file(sd, os.path.join(d, "model.safetensors"))
    else:
        torch.save(sd, os.path.join(d, "model.pt"))
    if with_config:
        cfg.to_json_file(os.path.join(d, "config.json"))
    return d


def reference(name, model, cfg, images, token_rows, strings, tok):
    size = cfg.vision_config.image_size
    ref = {"images": {}, "texts": [], "strings": []}
    img_embs = []
    for fname, img in images:
        img.save(os.path.join(OUT, name, fname))
        px = preprocess(img, size)
        emb, cls = image_features(model, px)
        ref["images"][fname] = {
            "size": list(img.size),
            "embedding": norm(emb)[0].tolist(),
            "layer_cls": [c[0].tolist() for c in cls],
        }
        img_embs.append(norm(emb)[0])
    txt_embs = []
    for ids in token_rows:
        t = text_features_ids(model, torch.tensor([ids]))
        ref["texts"].append({"ids": ids, "embedding": norm(t)[0].tolist()})
        txt_embs.append(norm(t)[0])
    for s in strings:
        ids = tok([s], context_length=cfg.text_config.max_position_embeddings)[0]
        t = text_features_ids(model, ids.unsqueeze(0))
        ref["strings"].append({"text": s, "embedding": norm(t)[0].tolist()})
        txt_embs.append(norm(t)[0])
    scale = model.logit_scale.exp().item()
    ref["logit_scale"] = scale
    ref["logits"] = (scale * torch.stack(img_embs) @ torch.stack(txt_embs).T).tolist()
    return ref


def random_ids(rng, vocab, ctx, n):
    rows = []
    for i in range(n):
        length = int(rng.integers(3, ctx + 1))
        ids = [int(x) for x in rng.integers(1, vocab - 1, size=length)]
        ids[-1] = vocab - 1  # EOT = the largest id, found by argmax
        rows.append(ids + [0] * (ctx - length))
    return rows


def cliper_reference(model, cfg, tok_decode_ids, images, seed):
    """Descriptor bank on the full-vocabulary model: CLIPER.md sections 2-4."""
    g = torch.Generator().manual_seed(seed)
    width = cfg.text_config.hidden_size
    descriptor = 0.5 * torch.randn(35, 4, width, generator=g)
    ids = torch.tensor([TEMPLATE_IDS] * 35)
    emb_layer = model.text_model.embeddings.token_embedding
    with torch.no_grad():
        base = emb_layer(ids).clone()
        base[:, SLOTS, :] = descriptor
        # HF's text model embeds ids itself; swap the lookup for the prepared
        # prompt embeddings so everything after it is HF's own code.
        orig = emb_layer.forward
        emb_layer.forward = lambda _ids: base
        try:
            t = text_features_ids(model, ids)
        finally:
            emb_layer.forward = orig
        t = norm(t)
        table = emb_layer.weight
        words = []
        for i in range(35):
            dist = torch.cdist(descriptor[i], table)  # [4, vocab]
            words.append(dist.topk(5, largest=False).indices.tolist())
        out = {"text_features": t.tolist(), "nearest_ids": words, "images": {}}
        for fname, img in images:
            px = preprocess(img, cfg.vision_config.image_size)
            f, _ = image_features(model, px)
            logits = (norm(f) @ t.T / 0.01)[0]  # [35]
            scores = logits.view(7, 5).mean(1)
            out["images"][fname] = {
                "logits": logits.tolist(),
                "class_scores": scores.tolist(),
                "probs": scores.softmax(0).tolist(),
                "predicted": CLASSES[int(scores.argmax())],
            }
    return descriptor, out


def cliper_loss(s, y):
    """CLIPER's training loss (CLIPER.md section 5) on logits s [B, 7, 5]."""
    B = s.shape[0]
    onehot = torch.nn.functional.one_hot(y, 7).bool()
    m = torch.where(onehot, s.min(2).values, s.max(2).values)
    l_margin = torch.nn.functional.cross_entropy(m, y)
    rows = []
    for b in range(B):
        others = torch.cat([s[b, c] for c in range(7) if c != int(y[b])])
        rows.append(torch.cat([s[b, int(y[b])].max().unsqueeze(0), others]))
    g = torch.stack(rows)  # [B, 31]
    l_fg = torch.nn.functional.cross_entropy(g, torch.zeros(B, dtype=torch.long), reduction="none")
    with torch.no_grad():
        j = s[torch.arange(B), y].argmax(1)
        n = torch.zeros(7, 5)
        for b in range(B):
            n[y[b], j[b]] += 1
        n[n == 0] = -1 / 99
        w = torch.stack([
            n[y[b]].sum() * torch.softmax(1 / n[y[b]], 0)[j[b]] / n[y[b], j[b]] for b in range(B)
        ])
    return l_margin + (w * l_fg).mean(), w


def train_reference(model, cfg, descriptor):
    """Loss and gradients for the Rust trainer's tests."""
    g = torch.Generator().manual_seed(5)
    out = {"logit_cases": []}
    # Pure-logit cases, including batches where many (class, descriptor) counts are zero.
    for B, labels in [(6, [0, 3, 3, 6, 2, 3]), (9, [1, 1, 1, 1, 5, 5, 0, 4, 2]), (3, [6, 6, 6])]:
        s = (3 * torch.randn(B, 35, generator=g)).requires_grad_(True)
        y = torch.tensor(labels)
        loss, w = cliper_loss(s.view(B, 7, 5), y)
        loss.backward()
        out["logit_cases"].append({"logits": s.detach().tolist(), "labels": labels, "loss": loss.item(),
                                   "weights": w.tolist(), "grad": s.grad.tolist()})
    # Through the text tower: gradient w.r.t. the descriptor tensor.
    B = 10
    feats = torch.randn(B, cfg.projection_dim, generator=g)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    labels = [0, 1, 2, 3, 4, 5, 6, 3, 3, 0]
    d = descriptor.clone().requires_grad_(True)
    ids = torch.tensor([TEMPLATE_IDS] * 35)
    emb_layer = model.text_model.embeddings.token_embedding
    base = emb_layer(ids).detach()
    prompt = torch.cat([base[:, :5], d, base[:, 9:]], 1)
    orig = emb_layer.forward
    emb_layer.forward = lambda _ids: prompt
    try:
        t = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    finally:
        emb_layer.forward = orig
    t = t / t.norm(dim=-1, keepdim=True)
    s = feats @ t.T / 0.01
    loss, _ = cliper_loss(s.view(B, 7, 5), torch.tensor(labels))
    loss.backward()
    out["descriptor_case"] = {"features": feats.tolist(), "labels": labels, "loss": loss.item(),
                              "grad": d.grad.tolist()}
    # AdamW (PyTorch) steps on a small parameter with fixed gradients.
    p = torch.randn(4, 3, generator=g).requires_grad_(True)
    p0 = p.detach().clone()
    grads = [torch.randn(4, 3, generator=g) for _ in range(3)]
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, eps=1e-4, betas=(0.9, 0.999))
    for gr in grads:
        opt.zero_grad()
        p.grad = gr.clone()
        opt.step()
    out["adamw"] = {"param": p0.tolist(), "grads": [x.tolist() for x in grads], "lr": 0.01,
                    "weight_decay": 0.1, "eps": 1e-4, "result": p.detach().tolist()}
    # Cosine annealing with warm restarts, T0 = 10, stepped per epoch.
    sched_p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([sched_p], lr=5e-6)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    out["cosine_lrs"] = lrs
    return out


class TemporalBlock(torch.nn.Module):
    """DFER-CLIP's pre-norm block: fused bias-free qkv, exact GELU MLP."""

    def __init__(self, dim, heads, dim_head, mlp):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = torch.nn.LayerNorm(dim)
        self.to_qkv = torch.nn.Linear(dim, inner * 3, bias=False)
        self.to_out = torch.nn.Linear(inner, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, mlp)
        self.fc2 = torch.nn.Linear(mlp, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = [t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v)]
        attn = (q @ k.transpose(-1, -2) * self.dim_head ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.to_out(out)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class Temporal(torch.nn.Module):
    def __init__(self, dim, frames, depth, heads, dim_head, mlp):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, frames + 1, dim))
        self.layers = torch.nn.ModuleList([TemporalBlock(dim, heads, dim_head, mlp) for _ in range(depth)])

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embedding[:, : x.shape[1]]
        for blk in self.layers:
            x = blk(x)
        return x[:, 0]


def temporal_reference(descriptor_features, seed):
    torch.manual_seed(seed)
    dim, heads, dim_head, mlp, depth = 24, 2, 12, 40, 2
    m = Temporal(dim, 16, depth, heads, dim_head, mlp).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "token" in name or "pos" in name:
                p.copy_(0.3 * torch.randn_like(p))
        ours, dfer = {}, {}
        for name, p in m.state_dict().items():
            if name in ("cls_token", "pos_embedding"):
                ours["temporal." + name] = p.clone()
                dfer["temporal_net." + name] = p.clone()
                continue
            _, n, part = name.split(".", 2)
            ours[f"temporal.layers.{n}." + part.replace("to_qkv", "attn.to_qkv").replace("to_out", "attn.to_out")
                 .replace("fc1", "mlp.fc1").replace("fc2", "mlp.fc2")] = p.clone()
            d = {"norm1": f"0.norm", "to_qkv": "0.fn.to_qkv", "to_out": "0.fn.to_out.0", "norm2": "1.norm",
                 "fc1": "1.fn.net.0", "fc2": "1.fn.net.3"}
            mod, kind = part.rsplit(".", 1)
            dfer[f"temporal_net.temporal_transformer.layers.{n}.{d[mod]}.{kind}"] = p.clone()
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(3, 16, dim, generator=g)
        x = x / x.norm(dim=-1, keepdim=True)
        y = m(x)
        yn = y / y.norm(dim=-1, keepdim=True)
        logits = yn @ descriptor_features.T / 0.01
        scores = logits.view(3, 7, 5).mean(2)
    ref = {"heads": heads, "inputs": x.tolist(), "outputs": y.tolist(), "logits": logits.tolist(),
           "class_scores": scores.tolist(), "probs": scores.softmax(1).tolist()}
    return ours, dfer, ref


def explain_reference(model, cfg, img, text_features):
    """Fast (MaskCLIP value path), Grad-CAM and occlusion maps (issue 9)."""
    px = preprocess(img, cfg.vision_config.image_size)
    t = text_features
    vm = model.vision_model
    out = {}
    with torch.no_grad():
        vo = vm(pixel_values=px, output_hidden_states=True)
        x = vo.hidden_states[-2]
        layer = vm.encoder.layers[-1]
        y = x + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x)))
        y = y + layer.mlp(layer.layer_norm2(y))
        p = model.visual_projection(vm.post_layernorm(y[:, 1:]))[0]
        p = p / p.norm(dim=-1, keepdim=True)
        out["fast_maps"] = (t @ p.T / 0.01).tolist()  # [35, P]

    def weights(kind, idx):
        w = torch.zeros(35)
        if kind == "descriptor":
            w[idx] = 1.0
        else:
            w[idx * 5: idx * 5 + 5] = 0.2
        return w

    def logit_of(pixels, w):
        f = model.visual_projection(vm(pixel_values=pixels).pooler_output)
        f = f / f.norm(dim=-1, keepdim=True)
        return (f @ t.T / 0.01) @ w

    out["targets"] = []
    for kind, idx in [("descriptor", 7), ("class", 3)]:
        w = weights(kind, idx)
        vo = vm(pixel_values=px, output_attentions=True)
        attn = vo.attentions[-1]
        attn.retain_grad()
        f = model.visual_projection(vo.pooler_output)
        f = f / f.norm(dim=-1, keepdim=True)
        logit = ((f @ t.T / 0.01) @ w).sum()
        logit.backward()
        cam = (attn.grad * attn).clamp(min=0).mean(1)[0, 0, 1:]
        with torch.no_grad():
            s = px.shape[-1]
            occ = {}
            for grid in (2, 4):
                edges = [i * s // grid for i in range(grid + 1)]
                base = logit_of(px, w).item()
                vals = []
                for r in range(grid):
                    for c in range(grid):
                        q = px.clone()
                        q[:, :, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
                        vals.append(base - logit_of(q, w).item())
                occ[str(grid)] = vals
        out["targets"].append({"kind": kind, "index": idx, "logit": logit.item(), "gradcam": cam.tolist(),
                               "occlusion": occ})
    return out


def main():
    import open_clip
    tok = open_clip.tokenize
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)

    # A: HF naming, config.json, reduced vocabulary, 4 heads of width 16.
    va = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=96, hidden_act="quick_gelu")
    ta = dict(vocab_size=1000, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, hidden_act="quick_gelu")
    model_a, cfg_a = make_model(1, va, ta, 40, eos_token_id=2)
    write_model("clip_a_hf", model_a, cfg_a, "hf", "safetensors", True)
    write_model("clip_a_openai", model_a, cfg_a, "openai", "pt", True)
    imgs = [("square0.png", synthetic_image(1, 32, 32)), ("square1.png", synthetic_image(2, 32, 32)),
            ("wide.png", synthetic_image(3, 45, 29)), ("tall.png", synthetic_image(4, 27, 50))]
    ref = reference("clip_a_hf", model_a, cfg_a, imgs, random_ids(rng, 1000, 16, 3), [], tok)
    json.dump(ref, open(os.path.join(OUT, "clip_a_hf", "reference.json"), "w"))

    # B: OpenAI naming, safetensors, no config.json: heads = width / 64.
    vb = dict(image_size=48, patch_size=16, hidden_size=128, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=160, hidden_act="quick_gelu")
    tb = dict(vocab_size=500, max_position_embeddings=20, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=1, intermediate_size=128, hidden_act="quick_gelu")
    model_b, cfg_b = make_model(2, vb, tb, 48, eos_token_id=2)
    write_model("clip_b_openai", model_b, cfg_b, "openai", "safetensors", False)
    imgs = [("square0.png", synthetic_image(5, 48, 48)), ("wide.png", synthetic_image(6, 70, 53))]
    ref = reference("clip_b_openai", model_b, cfg_b, imgs, random_ids(rng, 500, 20, 3), [], tok)
    json.dump(ref, open(os.path.join(OUT, "clip_b_openai", "reference.json"), "w"))

    # C: HF naming stored in f16 (upcast on load), full OpenAI vocabulary (the
    # real tokenizer), exact-GELU vision tower. The reference runs on the
    # f16-rounded weights in f32.
    vc = dict(image_size=24, patch_size=6, hidden_size=48, num_hidden_layers=2,
              num_attention_heads=3, intermediate_size=80, hidden_act="gelu")
    tc = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=16, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=40, hidden_act="quick_gelu")
    model_c, cfg_c = make_model(3, vc, tc, 24, eos_token_id=49407)
    with torch.no_grad():
        for name, p in model_c.named_parameters():
            if "norm" not in name:
                p.copy_(p.half().float())
    write_model("clip_c_hf16", model_c, cfg_c, "hf", "safetensors", True, half=True)
    imgs = [("square0.png", synthetic_image(7, 24, 24)), ("face.png", synthetic_image(8, 40, 31))]
    strings = ["a photo of a happy face", "an ID photo of a surprised person.",
               "Fish &amp; chips", "  lots   of\twhitespace  "]
    ref = reference("clip_c_hf16", model_c, cfg_c, imgs, [], strings, tok)
    json.dump(ref, open(os.path.join(OUT, "clip_c_hf16", "reference.json"), "w"))

    descriptor, cref = cliper_reference(model_c, cfg_c, None, imgs, 11)
    d = os.path.join(OUT, "clip_c_hf16")
    save_file({"descriptor": descriptor.contiguous()}, os.path.join(d, "descriptors.safetensors"),
              metadata={"format": "cliper", "version": "1", "classes": ",".join(CLASSES)})
    torch.save({"text_generator.descriptor": descriptor}, os.path.join(d, "descriptors_torch.pth"))
    json.dump(cref, open(os.path.join(d, "cliper_reference.json"), "w"))
    ours, dfer, temporal_ref = temporal_reference(torch.tensor(cref["text_features"]), 21)
    save_file(dict(ours, descriptor=descriptor.contiguous()), os.path.join(d, "cliper_dynamic.safetensors"),
              metadata={"format": "cliper", "version": "1", "classes": ",".join(CLASSES),
                        "temporal_heads": str(temporal_ref["heads"])})
    torch.save(dfer, os.path.join(d, "dfer_clip_temporal.pth"))
    json.dump(temporal_ref, open(os.path.join(d, "temporal_reference.json"), "w"))
    eref = explain_reference(model_c, cfg_c, imgs[1][1], torch.tensor(cref["text_features"]))
    json.dump(eref, open(os.path.join(d, "explain_reference.json"), "w"))
    tref = train_reference(model_c, cfg_c, descriptor)
    json.dump(tref, open(os.path.join(OUT, "train_reference.json"), "w"))

    # Tokenizer: OpenAI's cleaning + BPE on tricky strings.
    tricky = [
        "Hello world!!!", "a photo of a cat", "Fish &amp; Chips", "&amp;amp; double",
        "&lt;b&gt;bold&lt;/b&gt;", "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "don't stop", "it's 3:45pm",
        "   leading and trailing   ", "tabs\tand\nnewlines", "UPPER lower MiXeD",
        "emoji \U0001F600 smile", "\u6f22\u5b57 kanji", "hyphen-ated words", "numbers 12345",
        "&#39;quoted&#39;", "&quot;double&quot;", "\u2018curly\u2019 \u201cquotes\u201d",
        "a,b;c.d", "rock'n'roll", "I'VE", "e.g. i.e.", "$100 & 50%", "<start_of_text>",
    ]
    rows = []
    for s in tricky:
        ids = tok([s], context_length=77)[0].tolist()
        while ids and ids[-1] == 0:
            ids.pop()
        rows.append({"text": s, "ids": ids})
    json.dump(rows, open(os.path.join(OUT, "tokenizer.json"), "w"), ensure_ascii=False, indent=0)
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()

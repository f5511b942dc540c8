"""Train a student with FOFA (or a baseline) from a frozen teacher. One process, one GPU, or many through torchrun.

    python train.py --dataset digits --teacher convnext_mini --student vit_mini --epochs 30   # CPU, offline
    torchrun --nproc_per_node 8 train.py --teacher convnext_t --student deit_t --dataset cifar100 --data-dir data
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py ...          # and node_rank 1

Without --teacher-ckpt the teacher is first trained with --method ce and cached in --teacher-dir. Each epoch appends
a line to <out>/log.jsonl and writes <out>/last.pt (all to resume) and best.pt, with a timm state_dict under 'student'.
An epoch's data depend only on (seed, epoch): --resume redoes the interrupted one exactly.
"""
import argparse
import datetime
import json
import math
import os
import pathlib
import pickle
import sys
import time
from contextlib import nullcontext, suppress

import huggingface_hub
import safetensors.torch
import timm
import timm.optim
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
from baselines import FBT, HCD, OFA
from fofa import FOFA, Distiller
import losses

# the official configs (notes section 6): CNN students get SGD, ViT/MLP students AdamW with mixup and RandAugment
# warm-up is given as a share of the run: 3 and 20 epochs of the official 300
RECIPES = {
    'cnn': dict(opt='sgd', lr=0.05, wd=2e-3, warmup=3 / 300, warmup_lr=1e-4, min_lr=1e-3, clip=0.0, smoothing=0.1),
    'vit': dict(opt='adamw', lr=5e-4, wd=0.05, warmup=20 / 300, warmup_lr=5e-7, min_lr=1e-5, clip=5.0, smoothing=0.1),
}
hard = lambda y: y.argmax(-1) if y.dim() == 2 else y  # mixup targets -> classes
emb = lambda feats: feats[-1].float().mean((2, 3))  # pooled last stage, for the relational losses
common = lambda a: dict(alpha=a.alpha, kd_t=a.kd_t, label_smoothing=a.smoothing)  # what every distiller takes
pure = lambda loss: lambda a, s, t, n: Distiller(s, t, lambda *z: loss(a, *z), **common(a))  # loss(args, s, t, y, fs, ft)
fofa = lambda a, s, t, **kw: FOFA(s, t, a.img_size, **{**common(a), **dict(
    nq=a.nq, dim=a.dim, afp_stages=a.afp, feedback=not a.no_feedback, raa=not a.no_raa, fusion=a.afp_fusion,
    prompt=a.afp_prompt or 'channel', recompute=stage_list(a.recompute_stages, '', True), beta=a.beta, gamma=a.gamma),
    **kw})  # kw: overrides (FitNet)
# --method -> f(args, student, frozen teacher (None for ce), classes): the trainable module. A new method is a row here,
# its class (baselines.py) or loss (losses.py), and its tests.
METHODS = {
    'fofa': lambda a, s, t, n: fofa(a, s, t),
    'fitnet': lambda a, s, t, n: fofa(a, s, t, afp_stages=(), raa=False),  # FOFA without RAA and AFP
    'kd': pure(lambda a, s, t, *_: {'kd': losses.kd(s, t, a.kd_t)}),
    'dkd': pure(lambda a, s, t, y, *_: {'dkd': losses.dkd(s, t, hard(y), *a.dkd)}),
    'dist': pure(lambda a, s, t, *_: {'dist': losses.dist(s, t, *a.dist)}),
    'ofa': lambda a, s, t, n: OFA(s, t, a.img_size, n, a.ofa, a.ofa_eps, **common(a)),
    'rkd': pure(lambda a, s, t, y, fs, ft: {'rkd': losses.rkd(emb(fs), emb(ft))}),
    'cc': pure(lambda a, s, t, y, fs, ft: {'cc': losses.cc(emb(fs), emb(ft))}),
    'fbt': lambda a, s, t, n: FBT(s, t, a.img_size, a.ofa_eps, **common(a)),
    'hcd': lambda a, s, t, n: HCD(s, t, a.img_size, n, a.hcd_n, a.hcd_kl, **common(a)),
    'ce': lambda a, s, t, n: Distiller(s, label_smoothing=a.smoothing),  # the student alone, labels only
}
MAX_NONFINITE = 10  # skipped steps in a row before the run stops
RESUMABLE = {'epochs', 'workers', 'log_every', 'eval_every', 'compile', 'channels_last', 'recompute_stages', 'resume',
             'overwrite', 'out', 'data_dir', 'teacher_dir', 'teacher_epochs', 'teacher_ckpt'}  # may change on --resume


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence and exit code 1 (argparse's own: usage, then the error, code 2)
        raise SystemExit(message.removeprefix('argument ').rstrip('.') + '.')


def ranged(kind, accepted, ok):  # an argparse type: a finite int or float for which ok(value) holds
    def parse(text):
        with suppress(ValueError, OverflowError):
            if math.isfinite(v := kind(text)) and ok(v):
                return v
        raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}")
    return parse


COUNT, NATURAL = ranged(int, 'an integer >= 1', lambda v: v >= 1), ranged(int, 'an integer >= 0', lambda v: v >= 0)
POSITIVE, NONNEG = ranged(float, 'a number > 0', lambda v: v > 0), ranged(float, 'a number >= 0', lambda v: v >= 0)
DECAY, FRACTION = ranged(float, 'in [0, 1)', lambda v: 0 <= v < 1), ranged(float, 'in (0, 1]', lambda v: 0 < v <= 1)
hms = lambda seconds: str(datetime.timedelta(seconds=round(seconds)))


def parser():
    p = Parser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--teacher', help='teacher model (models.MODELS or a timm name); needed by every method but ce')
    a('--student', required=True, help='student model')
    a('--dataset', default='digits', choices=data.DATASETS, help='digits is offline')
    a('--data-dir', default='data', help='dataset root')
    a('--method', default='fofa', help=', '.join(METHODS))
    a('--nq', type=ranged(int, '4*k*k: a k x k grid per stage (36, 64, 100, 144)', lambda v: v == 4 * math.isqrt(
      v // 4) ** 2 > 0), default=64, help='FOFA: RAA queries over the 4 stages, 4*k*k')
    a('--dim', type=ranged(int, 'a positive multiple of 8', lambda v: v % 8 == 0 < v), default=512, help='RAA width d')
    a('--afp-stages', default='1,2,3,4', help="FOFA: teacher stages with a prompt, e.g. 1,2,3,4 or 'none'")
    a('--no-raa', action='store_true', help='FOFA: per-stage alignment without attention (FitNet baseline)')
    a('--no-feedback', action='store_true', help='FOFA: prompts without student feedback')
    a('--afp-fusion', default='dw', choices=('dw', 'full'), help='FOFA: 5x5 fusion conv: depthwise or official')
    a('--afp-prompt', choices=('channel', 'spatial'), help="FOFA: the official SE output replaces the feature (a "
      "per-channel bias; the default), or gates it (a spatial prompt)")
    a('--recompute-stages', default='none', help="FOFA: teacher stages whose prompted pass is run again in backward "
      "instead of keeping its activations (less memory, more time), or 'none'")
    a('--alpha', type=NONNEG, default=1.0, help='weight of KD (Eq. 8)')
    a('--beta', type=NONNEG, default=1.0, help='weight of the feature loss (Eq. 8)')
    a('--gamma', type=NONNEG, default=1.0, help='weight of the AFP regulariser (Eq. 8)')
    a('--kd-t', type=POSITIVE, default=1.0, help='KD temperature')
    a('--dkd', type=NONNEG, nargs=3, default=(1.0, 8.0, 4.0), metavar=('ALPHA', 'BETA', 'T'), help='DKD (CIFAR paper)')
    a('--dkd-warmup', type=ranged(float, 'in [0, 1]', lambda v: 0 <= v <= 1), default=20 / 240, help='DKD: share of the run over which its weight rises '
      'linearly from 0, per step (the DKD authors\' 20 of 240 epochs)')
    a('--dist', type=NONNEG, nargs=3, default=(1.0, 1.0, 1.0), metavar=('BETA', 'GAMMA', 'TAU'), help='DIST')
    a('--ofa-eps', type=POSITIVE, default=1.0, help='OFA (and FBT) modulating exponent epsilon')
    a('--ofa-stages', default='1,2,3,4', help='OFA: student stages with a head to logits')
    a('--hcd-n', type=COUNT, default=4, help='HCD: sub-logits per stage')
    a('--hcd-kl', type=NONNEG, default=6.0, help='HCD: weight of the sub-logit KL')
    a('--epochs', type=COUNT, default=30)
    a('--batch-size', type=COUNT, default=64, help='per process; the global batch is this times the world size')
    a('--lr', type=POSITIVE, help='peak learning rate (default: the recipe\'s)')
    a('--opt', help='optimizer, any timm name (default: the recipe\'s: sgd or adamw)')
    a('--wd', type=NONNEG, help='weight decay (default: the recipe\'s)')
    a('--warmup-epochs', type=NONNEG, help='linear warm-up (default: the recipe\'s share of --epochs)')
    a('--clip', type=NONNEG, help="gradient-norm clipping, 0: off (default: the recipe's: 5 for vit, off for cnn)")
    a('--recipe', choices=list(RECIPES), help="augmentation and optimizer preset (default: by the student's family)")
    a('--ema', type=DECAY, default=0.0, help='EMA decay of the student, e.g. 0.9998 (0: off)')
    a('--img-size', type=COUNT, help='input size (default: the student\'s, 224 or 32 for *_mini)')
    a('--train-fraction', type=FRACTION, default=1.0, help='digits: use a fixed stratified part of the train split')
    a('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for CUDA)')
    a('--compile', action='store_true', help='torch.compile the student and the teacher')
    a('--channels-last', action='store_true', help='channels_last memory format (CNNs on CUDA)')
    a('--workers', type=NATURAL, default=data.default_workers(),
      help='loader processes, 0: none; by default the usable cores / LOCAL_WORLD_SIZE')
    a('--seed', type=ranged(int, 'an integer in [0, 2**32)', lambda v: 0 <= v < 2**32), default=0)
    a('--out', default='runs/last', help='run directory')
    a('--resume', action='store_true', help='continue the run in --out from its last.pt')
    a('--overwrite', action='store_true', help='start over in an --out that already holds a run')
    a('--teacher-ckpt', help="teacher weights: a timm state_dict or checkpoint (PATH:ema: its EMA), or 'timm'")
    a('--teacher-dir', default='teachers', help='cache of teachers trained by this script')
    a('--teacher-epochs', type=COUNT, help='epochs when the teacher is trained here (default: --epochs)')
    a('--pretrained', action='store_true', help='start the model trained with --method ce from timm ImageNet weights')
    a('--log-every', type=COUNT, default=50, help='steps between progress lines')
    a('--eval-every', type=COUNT, default=1, help='epochs between tests (and the last); the others log top1 null')
    return p


get_args = lambda argv=None: parser().parse_args(argv)


def check_args(args):
    """Every mistake a user can make in the flags, caught before anything is built or written."""
    if args.method not in METHODS:
        raise SystemExit(f"unknown --method '{args.method}': choose one of {', '.join(METHODS)}.")
    if args.method != 'ce' and not args.teacher:
        raise SystemExit(f'--method {args.method} needs a --teacher (or use --method ce to train without one).')
    if args.opt and args.opt.lower().removeprefix('lookahead_') not in timm.optim.list_optimizers():
        raise SystemExit(f"unknown --opt '{args.opt}': use a timm optimizer name (sgd, adamw, lamb...).")
    args.afp = stage_list(args.afp_stages, '--afp-stages', allow_none=True)
    stage_list(args.recompute_stages, '--recompute-stages', allow_none=True)  # checked here, read by fofa()
    args.ofa = stage_list(args.ofa_stages, '--ofa-stages')
    if min(args.dkd[2], args.dist[2]) <= 0:
        raise SystemExit('the temperatures of --dkd (T) and --dist (TAU), their last numbers, must be > 0.')
    check_path('--out', args.out, 'run directory', new=True)
    last = os.path.join(args.out, 'last.pt')
    if os.path.isfile(last) and not (args.resume or args.overwrite):
        raise SystemExit(f'{args.out} already holds a run: pass --resume to continue it or --overwrite to start over.')
    if args.resume:
        same_run(args, check_path('--resume: the checkpoint', last, 'file'))
    ckpt = args.teacher_ckpt  # PATH, PATH:ema or 'timm' (README, Teacher checkpoints)
    check_path('--teacher-ckpt', None if ckpt in (None, 'timm') else ckpt.removesuffix(':ema'), 'checkpoint file')
    check_path('--teacher-dir', None if args.teacher_ckpt or args.method == 'ce' else args.teacher_dir, 'directory', 1)
    check_path('--data-dir', args.data_dir if os.path.exists(args.data_dir) else None, 'dataset directory')


def check_path(flag, path, what, new=False):
    """path (or None) if an existing `what` ('... file' or '... directory') or, if new, makeable; else one sentence."""
    up, kind = path and os.path.abspath(path), 'directory' if path and os.path.isdir(path) else 'file'
    while new and up and not os.path.exists(up):
        up = os.path.dirname(up)
    problem = path and (f'is a {kind}, not a {what}' if os.path.exists(path) and not what.endswith(kind) else
                        f'does not exist: give an existing {what}' if not os.path.exists(up) else
                        f'cannot be made: {up} is not a writable directory' if up != os.path.abspath(path) and not
                        (os.path.isdir(up) and os.access(up, os.W_OK | os.X_OK)) else None)
    if problem:
        raise SystemExit(f'{flag} {path} {problem}.')
    return path


def same_run(args, last):
    """--resume: unset (None) flags take the run's values; others must match it, but for RESUMABLE, or one sentence."""
    run = read_checkpoint(last, '--resume:').get('args') or {}
    vars(args).update({k: v for k, v in run.items() if getattr(args, k, 0) is None})
    tup = lambda v: tuple(v) if isinstance(v, list) else v
    diff = [f"--{k.replace('_', '-')} {run[k]}" for k in vars(get_args(['--student', '']))
            if k in run and k not in RESUMABLE and tup(run[k]) != tup(getattr(args, k))]
    if diff:
        raise SystemExit(f"--resume: {args.out} was run with {', '.join(diff)}: pass the same or --overwrite.")


def read_checkpoint(path, flag):
    """Tensors and plain containers only (weights_only; a timm CheckpointSaver's argparse.Namespace too), or .safetensors."""
    try:
        if path.endswith('.safetensors'):
            return safetensors.torch.load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        if isinstance(e, pickle.UnpicklingError) and 'GLOBAL' in str(e):  # a class or function: code, not weights
            raise SystemExit(f'{flag} {path} was refused: it holds pickled code, not only tensors (loaded with '
                             'weights_only=True); save its state_dict alone and use that.')
        raise SystemExit(f'{flag} {path} is not a readable PyTorch checkpoint ({type(e).__name__}): it may be truncated '
                         'or another kind of file, so download or save it again.')


def stage_list(text, flag, allow_none=False):
    """'1,2,4' -> (1, 2, 4); 'none' -> () where allowed; anything else is a one-sentence error."""
    text = text.strip().lower()
    if allow_none and text in ('none', ''):
        return ()
    stages = {int(s) if s.strip().isdecimal() else 0 for s in text.split(',')}
    if not stages <= {1, 2, 3, 4}:
        raise SystemExit(f"{flag} '{text}' is not a comma list of stages 1-4 (e.g. 1,2,3,4)"
                         + (" or 'none'." if allow_none else '.'))
    return tuple(sorted(stages))


def family_recipe(name, img_size, role='student'):
    """'cnn' or 'vit' by family, after a forward at img_size on the meta device (shapes only: no memory, no time)."""
    try:
        with torch.device('meta'):
            net = models.create(name, 1)
            net.shapes(img_size)
    except ValueError as e:  # an unknown model, or not one of models.FAMILIES
        raise SystemExit(str(e))
    except (AssertionError, RuntimeError) as e:  # timm's size checks; a conv on a map below 1 pixel
        raise SystemExit(f'--img-size {img_size} does not fit the {role} {name} ({str(e).splitlines()[0].rstrip(".")}'
                         f'): it takes {models.INPUT_SIZE.get(name) or net.net.pretrained_cfg["input_size"][-1]}.')
    return 'cnn' if net.layout == 'nchw' else 'vit'  # ResNet, ConvNeXt, MobileNet


def load_weights(path, net, what):
    """A timm or official state_dict, a CheckpointSaver file (PATH:ema: its EMA) or our best.pt, renamed by timm."""
    ema, path = path.endswith(':ema'), path.removesuffix(':ema')
    ck = read_checkpoint(path, 'the checkpoint')
    keys = ('state_dict_ema', 'model_ema') if ema else ('student', 'state_dict', 'model', 'model_ema')
    ck = next((ck[k] for k in keys if isinstance(ck, dict) and isinstance(ck.get(k), dict)), None if ema else ck)
    if not isinstance(ck, dict) or not all(torch.is_tensor(v) for v in ck.values()):
        raise SystemExit(f'{path} ' + ('holds no EMA weights.' if ema else 'is not a state_dict of tensors.'))
    ck = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in ck.items()}
    own, convert = net.state_dict(), getattr(sys.modules[type(net).__module__], 'checkpoint_filter_fn', None)
    with suppress(KeyError, AttributeError, RuntimeError):  # timm's renaming fails on another family: reported below
        ck = convert(ck, net) if convert and ck.keys() != own.keys() else ck
    missing, extra = own.keys() - ck.keys(), ck.keys() - own.keys()
    if missing or extra:
        raise SystemExit(f'{path} is not a {what} checkpoint: {len(missing)} weights missing, {len(extra)} unexpected '
                         f'(e.g. {sorted(missing or extra)[0]}).')
    for k, v in ck.items():
        if v.shape != own[k].shape:
            head = own[k].shape[0] if k.startswith(('head', 'fc', 'classifier')) else None
            hint = f' (it has {v.shape[0]} classes, this dataset {head})' if head else ''
            raise SystemExit(f'{path} does not fit {what}: {k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}{hint}.')
    net.load_state_dict(ck)


def create(name, num_classes, norm=(None, None), weights=None):
    """models.create with weights None (random), True (ImageNet, new head), 'timm' (the whole classifier) or a file."""
    if weights == 'timm' and num_classes != 1000:
        raise SystemExit(f"'timm' weights are the 1000-class ImageNet classifier of {name}, not {num_classes} classes: "
                         'pass a fine-tuned checkpoint file instead.')
    try:
        net = models.create(name, num_classes, weights in (True, 'timm'), mean=norm[0], std=norm[1])
    except OSError as e:  # offline and not cached: huggingface_hub's LocalEntryNotFoundError, urllib's URLError
        cfg = timm.models.get_pretrained_cfg(models.MODELS.get(name, (name,))[0])
        raise SystemExit(f'timm could not fetch the ImageNet weights of {name} ({type(e).__name__}): it looked for '
                         f'{cfg.hf_hub_id or cfg.url} in {huggingface_hub.constants.HF_HUB_CACHE} and '
                         f'{torch.hub.get_dir()}; fetch them once online (or copy that cache here), give timm the file '
                         'with pretrained_cfg_overlay=dict(file=PATH) in models.MODELS, or pass it to --teacher-ckpt.')
    except RuntimeError as e:  # no timm weights for this name, or not of its shape (the *_mini models)
        raise SystemExit(f'timm has no ImageNet weights that fit {name}: {str(e).splitlines()[0].rstrip(".: ")}.')
    if weights not in (None, True, 'timm'):
        load_weights(weights, net.net, f'{name} ({num_classes} classes)')
    return net


def build(args, num_classes):
    """The trainable module for --method (METHODS), holding the frozen teacher."""
    norm, ce = data.NORM[args.dataset] or (None, None), args.method == 'ce'
    student = create(args.student, num_classes, norm, args.pretrained and ce or None)
    teacher = None if ce else create(args.teacher, num_classes, norm, args.teacher_ckpt)  # bench.py: random teachers
    model = METHODS[args.method](args, student, teacher, num_classes)
    if args.method == 'dkd':  # the DKD authors' linear warm-up of their term
        model.ramps['dkd'] = args.dkd_warmup
    return model


def save(obj, path):
    """Atomic: a crash while saving never replaces a good file with a truncated one."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(net, loader, device, ctx):
    """(top-1, top-5) of net(x)[0]; net is a module (put in eval mode here) or a function of the images."""
    if isinstance(net, torch.nn.Module):
        net.eval()
    correct = torch.zeros(3, device=device)  # top-1, top-5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            logits = net(x)[0].float()
        top5 = logits.topk(min(5, logits.shape[1]), -1).indices == y[:, None]
        correct += torch.stack([top5[:, 0].sum(), top5.any(1).sum(), torch.tensor(len(y), device=device)])
    if dist.is_initialized():
        dist.all_reduce(correct)
    return (100 * correct[:2] / correct[2]).tolist()


def setup(args, ddp_rank, world, device):
    """The recipe's defaults for unset flags; loaders, model, optimizer (fused: no host sync), schedule and EMA."""
    recipe = {**RECIPES[args.recipe], 'warmup_epochs': RECIPES[args.recipe]['warmup'] * args.epochs}
    vars(args).update({k: recipe[k] for k in ('opt', 'lr', 'wd', 'warmup_epochs', 'clip') if getattr(args, k) is None})
    args.smoothing = 0.0 if args.recipe == 'vit' else recipe['smoothing']  # vit: smoothing is folded into mixup
    torch.manual_seed(args.seed)
    loaders = data.build_loaders(args.dataset, args.data_dir, args.img_size, args.batch_size, args.recipe, args.workers,
                                 world > 1, ddp_rank, world, args.seed, args.train_fraction, pin_memory=device != 'cpu')
    try:
        model = build(args, data.num_classes(args.dataset, args.data_dir)).to(device)
    except ValueError as e:
        raise SystemExit(str(e))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    kw = dict(lr=args.lr, weight_decay=args.wd, momentum=0.9)
    try:
        opt = timm.optim.create_optimizer_v2(model, args.opt, fused=True, **kw)
    except (TypeError, RuntimeError):  # not every timm optimizer has one
        opt = timm.optim.create_optimizer_v2(model, args.opt, **kw)
    steps = len(loaders[0])
    sched = CosineLRScheduler(opt, t_initial=args.epochs * steps, lr_min=recipe['min_lr'], t_in_epochs=False,
                              warmup_t=int(args.warmup_epochs * steps), warmup_lr_init=recipe['warmup_lr'])
    return loaders, model, opt, sched, ModelEmaV3(model.student, decay=args.ema) if args.ema else None


def start_run(args, model, opt, ema, ddp_rank, device):
    """--resume: all from last.pt; else --out loses an old run's files (no inherited log). Returns (epoch, best)."""
    if not args.resume:
        if ddp_rank == 0:
            os.makedirs(args.out, exist_ok=True)
            for f in ('log.jsonl', 'last.pt', 'best.pt'):
                pathlib.Path(args.out, f).unlink(missing_ok=True)
            pathlib.Path(args.out, 'args.json').write_text(json.dumps(vars(args), indent=1))
        return 0, {'top1': -1.0}
    ck = torch.load(os.path.join(args.out, 'last.pt'), map_location=device, weights_only=True)
    if ddp_rank:  # the saved feedback is rank 0's batch: other ranks restart theirs from zero (one step)
        ck['model'] = {k: v for k, v in ck['model'].items() if not k.endswith('.feedback')}
    model.load_state_dict(ck['model'], strict=not ddp_rank)
    opt.load_state_dict(ck['optimizer'])
    if ema:
        ema.load_state_dict(ck['ema'])
    return ck['epoch'], ck['best']


def save_epoch(args, rec, model, opt, ema, best):
    """rec to log.jsonl, the best student so far (raw or EMA) to best.pt, everything to last.pt. Returns the best."""
    with open(os.path.join(args.out, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(rec) + '\n')
    epoch, top1, ema_top1 = rec['epoch'], rec['top1'], rec['top1_ema']
    use_ema = ema is not None and top1 is not None and ema_top1 > top1
    if top1 is not None and max(top1, ema_top1 or -1) > best['top1']:
        best = {'top1': max(top1, ema_top1 or -1), 'epoch': epoch, 'which': 'ema' if use_ema else 'raw'}
        save({'student': (ema.module if use_ema else model.student).net.state_dict(), 'which': best['which'],
              'epoch': epoch, 'args': vars(args)}, os.path.join(args.out, 'best.pt'))
    save({'student': model.student.net.state_dict(), 'model': model.state_dict(), 'optimizer': opt.state_dict(),
          'ema': ema.state_dict() if ema else None, 'epoch': epoch, 'best': best, 'top1': top1, 'args': vars(args)},
         os.path.join(args.out, 'last.pt'))
    return best


def train(args, ddp_rank=0, world=1, device='cpu'):
    master = ddp_rank == 0
    (train_loader, val_loader, mixup), model, opt, sched, ema = setup(args, ddp_rank, world, device)
    start, best = start_run(args, model, opt, ema, ddp_rank, device)
    student, teacher, steps, fused = model.student, model.teacher, len(train_loader), opt.defaults.get('fused', False)
    for net in (student, teacher) if args.compile else ():  # separately; the distillers' own modules stay eager
        if net is not None:
            net.compile()
    # only the trainable module is in DDP (the teacher is not a submodule); feedback buffers stay per rank
    net = DDP(model, device_ids=[torch.device(device)] if device != 'cpu' else None,
              broadcast_buffers=False) if world > 1 else model
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.amp else nullcontext()
    teacher_top1 = evaluate(teacher, val_loader, device, ctx)[0] if teacher is not None else None
    if master:
        print(f'{args.method}: {args.teacher or "-"} -> {args.student} on {args.dataset} at {args.img_size}px, '
              f'{world} process(es) x batch {args.batch_size} = global batch {world * args.batch_size}, '
              f'{steps} steps/epoch, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M trainable parameters'
              + (f'; teacher {args.teacher} top-1 {teacher_top1:.2f}' if teacher is not None else ''))
    streak = worst = torch.zeros((), device=device)  # non-finite steps in a row: now, and the longest
    nonfinite, epoch_s = {}, None  # non-finite steps per loss term, to name the culprit; seconds of the last epoch
    for epoch in range(start, args.epochs):
        data.set_epoch(train_loader, epoch, args.seed)
        model.train()
        sums, t0, skipped = {}, time.time(), torch.zeros((), device=device)
        if device != 'cpu':
            torch.cuda.reset_peak_memory_stats()
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup:
                x, y = mixup(x, y)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sched.step_update(epoch * steps + i)  # a function of the step: --resume --epochs N stretches it
            model.progress = (epoch * steps + i + 1) / (args.epochs * steps)  # warm-ups of loss terms (DKD)
            with ctx:
                _, terms = net(x, y)
            bad = (~torch.isfinite(terms['total'])).float()
            if world > 1:
                dist.all_reduce(bad, dist.ReduceOp.MAX)  # every rank skips together
            terms['total'].backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if fused:
                opt.found_inf = bad  # the kernel skips the update when the loss was NaN/inf: no sync
            if fused or not bad.item():  # other optimizers need the flag on the host: one sync per step
                opt.step()
            opt.zero_grad(set_to_none=True)
            if ema:
                ema.update(student, step=epoch * steps + i)
            skipped, streak = skipped + bad, (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + torch.where(bad > 0, 0, v.detach().float())
                nonfinite[k] = nonfinite.get(k, 0) + (~torch.isfinite(v.detach())).float()
            if (i + 1) % args.log_every == 0 or i + 1 == steps:  # host reads only here
                if worst.item() >= MAX_NONFINITE:
                    names = ', '.join(k for k, n in nonfinite.items() if k != 'total' and n.item())
                    raise SystemExit(f'{int(worst.item())} steps in a row had a non-finite loss ({names or "total"}): '
                                     'lower --lr or the weight of that term, or check the teacher checkpoint and data.')
                if master and i + 1 < steps:
                    step_s = (time.time() - t0) / (i + 1)
                    left = step_s * (steps - i - 1)  # then the epochs to go, at the last epoch's pace if known
                    print(f'epoch {epoch + 1} step {i + 1}/{steps} loss {terms["total"].item():.4f} '
                          f'{args.batch_size * world / step_s:.1f} img/s, time left: epoch {hms(left)}, run '
                          f'{hms(left + (args.epochs - epoch - 1) * (epoch_s or step_s * steps))}', flush=True)
        train_time = time.time() - t0
        top1 = top5 = ema_top1 = None
        extra = {}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            top1, top5 = evaluate(student, val_loader, device, ctx)
            ema_top1 = evaluate(ema.module, val_loader, device, ctx)[0] if ema else None
            extra = {f'{k}_top1': evaluate(f, val_loader, device, ctx)[0] for k, f in model.eval().extra_evals().items()}
        if master:
            skipped = int(skipped.item())
            rec = {'epoch': epoch + 1, **{k: round(v.item() / max(steps - skipped, 1), 5) for k, v in sums.items()},
                   'skipped_steps': skipped, 'top1': top1, 'top5': top5, 'top1_ema': ema_top1,
                   'teacher_top1': teacher_top1, **extra, 'lr': opt.param_groups[0]['lr'],
                   'img_per_s': round(steps * args.batch_size * world / train_time, 1),
                   'data_wait': round(train_loader.wait / train_time, 4),
                   'peak_mem_gb': round((torch.cuda.max_memory_allocated() if device != 'cpu' else
                                         __import__('resource').getrusage(0).ru_maxrss * 1024) / 2**30, 3)}
            best = save_epoch(args, rec, model, opt, ema, best)
            epoch_s = time.time() - t0  # training, tests and saving
            print(json.dumps(rec), f'| run time left {hms(epoch_s * (args.epochs - epoch - 1))}', flush=True)
    if master:
        ck = torch.load(os.path.join(args.out, 'last.pt'), map_location='cpu', weights_only=True)
        print(f"student {args.student}: best top-1 {best['top1']:.2f} (epoch {best['epoch']}, {best['which']} student; "
              f"the best over epochs of max(raw, EMA), the official code's metric) | last top-1 {ck['top1']:.2f} "
              f"(raw student)" + (f' | teacher {args.teacher} top-1 {teacher_top1:.2f}' if teacher else ''))
    return best


def teacher_checkpoint(args, ddp_rank, world, device):
    """The cached teacher for (architecture, dataset, input size, classes), trained here with --method ce if absent."""
    nc = data.num_classes(args.dataset, args.data_dir)
    frac = f'_frac{args.train_fraction}' if args.train_fraction < 1 else ''
    key = f"{args.teacher}_{args.dataset}_{args.img_size}px_{nc}cls{frac}{'_pre' if args.pretrained else ''}"
    path = os.path.join(args.teacher_dir, key + '.pt')
    if not os.path.isfile(path):
        targs = get_args(['--student', args.teacher, '--method', 'ce', '--overwrite'])  # the recipe's other flags
        vars(targs).update({k: getattr(args, k) for k in ('dataset', 'data_dir', 'img_size', 'batch_size', 'seed', 'amp',
                            'workers', 'train_fraction', 'log_every', 'eval_every', 'pretrained')},
                           out=os.path.join(args.teacher_dir, key), epochs=args.teacher_epochs or args.epochs)
        check_args(targs)
        targs.recipe = family_recipe(args.teacher, args.img_size)
        if ddp_rank == 0:
            print(f'no teacher in {path}: training {args.teacher} with --method ce first')
        train(targs, ddp_rank, world, device)
        if ddp_rank == 0:
            save(torch.load(os.path.join(targs.out, 'best.pt'), map_location='cpu', weights_only=True), path)
        if world > 1:
            dist.barrier()
    return path


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    args.img_size = args.img_size or models.INPUT_SIZE.get(args.student, 224)
    recipe = [family_recipe(getattr(args, r), args.img_size, r) for r in ('teacher', 'student')[args.method == 'ce':]]
    args.recipe = args.recipe or recipe[-1]  # the student's
    world = int(os.environ.get('WORLD_SIZE', 1))  # set by torchrun
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    if device != 'cpu':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.amp = device != 'cpu' if args.amp is None else args.amp
    if world > 1:
        dist.init_process_group('nccl' if device != 'cpu' else 'gloo')
    if args.method != 'ce' and not args.teacher_ckpt:
        args.teacher_ckpt = teacher_checkpoint(args, rank, world, device)
    train(args, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()

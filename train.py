"""Train a student with FOFA (or a baseline) from a frozen teacher: one process, or many (torchrun).

    python train.py --dataset digits --teacher convnext_mini --student vit_mini   # CPU, offline
    torchrun --nproc_per_node 8 train.py --teacher convnext_t --student deit_t --dataset cifar100

Each epoch appends a line to <out>/log.jsonl and writes last.pt (all to resume: a step's data
depend only on (seed, epoch, step)) and best.pt, a timm state_dict under 'student'.
"""
import argparse
import datetime
import functools
import json
import math
import os
import pathlib
import resource
import shlex
import signal
import time
from contextlib import nullcontext, suppress

import timm.optim
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
from baselines import FBT, HCD, OFA
from fofa import FOFA, Distiller

# the official recipes (NOTES.md): SGD for CNN students, AdamW, mixup and RandAugment for ViT/MLP
# students; warm-up is a share of the run: 3 and 20 of the official 300 epochs
RECIPES = {
    'cnn': dict(opt='sgd', lr=0.05, wd=2e-3, warmup=3 / 300, warmup_lr=1e-4, min_lr=1e-3, clip=0.0),
    'vit': dict(opt='adamw', lr=5e-4, wd=0.05, warmup=20 / 300, warmup_lr=5e-7, min_lr=1e-5,
                clip=5.0),
}
METHODS = ('fofa', 'fitnet', 'kd', 'dkd', 'dist', 'ofa', 'rkd', 'cc', 'fbt', 'hcd', 'ce')
MAX_NONFINITE = 10  # skipped steps in a row before the run stops
RESUMABLE = {'epochs', 'workers', 'log_every', 'eval_every', 'compile', 'resume', 'overwrite',
             'out', 'data_dir', 'teacher_dir', 'teacher_ckpt', 'save_every_minutes'}  # may change
STOPPED = 75  # the exit code of a run stopped by SIGTERM/SIGUSR1: EX_TEMPFAIL, to requeue it
signal_received = None  # the name of a SIGTERM/SIGUSR1 this process received (ask_to_stop)


# The flags: the whole configuration (their types and checks are below the loop)
def parser():
    p = Parser(description=__doc__.split('\n')[0], formatter_class=Help, epilog='SIGTERM or '
               f'SIGUSR1 stop a run within --log-every steps: last.pt, exit code {STOPPED}.')
    g = p.add_argument_group('models and data').add_argument
    g('--teacher', help='a models.MODELS name or a timm name (every method but ce)')
    g('--student', required=True, help='a models.MODELS name or a timm name')
    g('--teacher-ckpt', metavar='PATH', help="a state_dict, a best.pt, PATH:ema (a timm "
      "checkpoint's EMA), 'timm' or 'random' (default: trained here)")
    g('--teacher-dir', default='teachers', help='cache of the teachers trained here')
    g('--pretrained', action='store_true', help="start the student from timm's ImageNet weights")
    g('--dataset', default='digits', choices=data.DATASETS, help='digits: sklearn, offline; '
      'folder (or imagenet): --data-dir/{train,val}/<class>/ images')
    g('--data-dir', default='data', help='dataset root (cifar100: downloaded there if missing)')
    g('--img-size', type=COUNT, help="input size in pixels (default: the student's)")
    g('--train-fraction', type=checked(float, 'in (0, 1]', lambda v: 0 < v <= 1), default=1.0,
      help='digits: a fixed stratified share of the train split')
    g = p.add_argument_group('method (NOTES.md, Losses)').add_argument
    g('--method', default='fofa', choices=METHODS, help='fitnet: FOFA without RAA and AFP')
    g('--alpha', type=NONNEG, default=1.0, help="weight of KD (Eq. 8) and the baselines' terms")
    g('--kd-t', type=POSITIVE, default=1.0, help='KD temperature')
    g = p.add_argument_group('FOFA').add_argument
    nq_ok = checked(int, '4*k*k: a k x k grid per stage (36, 64, 100, 144)',
                    lambda v: v > 0 and v == 4 * math.isqrt(v // 4) ** 2)
    g('--nq', type=nq_ok, default=64, help='RAA queries over the 4 stages, 4*k*k')
    g('--dim', type=checked(int, 'a positive multiple of 8', lambda v: v > 0 and v % 8 == 0),
      default=512, help='RAA width d')
    g('--beta', type=NONNEG, default=1.0, help='weight of the feature loss (Eq. 8)')
    g('--gamma', type=NONNEG, default=1.0, help='weight of the AFP regulariser (Eq. 8)')
    g('--afp-stages', type=STAGES, default='1,2,3,4', help='teacher stages with a prompt')
    g('--no-feedback', action='store_true', help='prompts without student feedback')
    g('--afp-fusion', default='dw', choices=('dw', 'full'), help="feedback fusion's 5x5 conv")
    g = p.add_argument_group('baselines').add_argument
    g('--dkd', type=NONNEG, nargs=3, default=[1.0, 8.0, 4.0], metavar=('ALPHA', 'BETA', 'T'))
    g('--dkd-warmup', type=SHARE, default=20 / 240, help="share of the run DKD's weight rises over")
    g('--dist', type=NONNEG, nargs=3, default=[1.0, 1.0, 1.0], metavar=('BETA', 'GAMMA', 'TAU'))
    g('--ofa-eps', type=POSITIVE, default=1.0, help='OFA (and FBT) modulating exponent epsilon')
    g('--ofa-stages', type=STAGES, default='1,2,3,4', help='OFA: stages with a head')
    g('--hcd-n', type=COUNT, default=4, help='HCD: sub-logits per stage')
    g('--hcd-kl', type=NONNEG, default=6.0, help='HCD: weight of the sub-logit KL (stage mean)')
    g('--hcd-warmup', type=SHARE, default=20 / 240, help='share of the run that weight rises over')
    g = p.add_argument_group('optimisation (NOTES.md, Recipes)').add_argument
    g('--epochs', type=COUNT, default=30)
    g('--batch-size', type=COUNT, default=64, help='per process (global: times the processes)')
    g('--recipe', choices=list(RECIPES), help='default: cnn for a student of NCHW stages, else vit')
    g('--opt', type=OPTIMIZER, help="a timm optimizer (default: the recipe's, sgd or adamw)")
    g('--lr', type=POSITIVE, help="peak learning rate (default: the recipe's, 0.05 or 5e-4)")
    g('--wd', type=NONNEG, help="weight decay (default: the recipe's, 2e-3 or 0.05)")
    g('--warmup-epochs', type=NONNEG, help='linear warm-up (default: 3 or 20 per 300 epochs)')
    g('--clip', type=NONNEG, help="gradient-norm clipping, 0: off (default: the recipe's, 0 or 5)")
    g('--ema', type=checked(float, 'in [0, 1)', lambda v: 0 <= v < 1), default=0.0,
      help='EMA decay of the student, e.g. 0.9998 (0: no EMA)')
    g('--seed', type=checked(int, 'in [0, 2**32)', lambda v: 0 <= v < 2**32), default=0)
    g = p.add_argument_group('run').add_argument
    g('--out', default='runs/last', help='run directory')
    g('--resume', action='store_true', help='continue the run in --out from its last.pt')
    g('--overwrite', action='store_true', help='start over in an --out that holds a run')
    g('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for CUDA)')
    g('--compile', action='store_true', help='torch.compile the student and the teacher')
    g('--workers', type=NATURAL, default=data.default_workers(), help='loader processes')
    g('--log-every', type=COUNT, default=50, help='steps between progress lines (and stops)')
    g('--eval-every', type=COUNT, default=1, help='epochs between tests (and the last)')
    g('--save-every-minutes', type=NONNEG, default=15.0, help='also save inside epochs (0: off)')
    return p


# One place decides the configuration: after resolve(), args is final (and is args.json)
def resolve(args):
    """Checks what argparse cannot, before anything is written, then sets every derived value."""
    if args.method != 'ce' and not args.teacher:
        raise SystemExit(f'--method {args.method} needs a --teacher (--method ce trains without).')
    if min(args.dkd[2], args.dist[2]) <= 0:
        raise SystemExit('the temperatures of --dkd and --dist, their last numbers, must be > 0.')
    check_path('--out', args.out, 'run directory', new=True)
    last = os.path.join(args.out, 'last.pt')
    if int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) and os.path.isfile(last):
        args.resume, args.overwrite = True, False  # restarted by torchrun: go on, never wipe
    if os.path.isfile(last) and not (args.resume or args.overwrite):
        raise SystemExit(f'{args.out} already holds a run: pass --resume or --overwrite.')
    if args.resume:  # unset flags take the run's values; the others must match, but RESUMABLE
        run = models.read_checkpoint(check_path('--resume: the checkpoint', last, 'file'),
                                     '--resume:').get('args') or {}
        vars(args).update({k: v for k, v in run.items() if getattr(args, k, 0) is None})
        flags = vars(parser().parse_args(['--student', '']))  # a run may hold removed flags
        diff = [f"--{k.replace('_', '-')} {shlex.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in run.items() if k in flags and k not in RESUMABLE and v != vars(args)[k]]
        if diff:
            raise SystemExit(f"--resume: {args.out} was run with {', '.join(diff)}: pass the same "
                             'or --overwrite.')
    if args.teacher_ckpt not in (None, 'timm', 'random'):  # PATH or PATH:ema
        check_path('--teacher-ckpt', args.teacher_ckpt.removesuffix(':ema'), 'checkpoint file')
    if os.path.exists(args.data_dir):
        check_path('--data-dir', args.data_dir, 'dataset directory')
    args.img_size = args.img_size or models.input_size(args.student)
    if args.method != 'ce':
        models.probe(args.teacher, args.img_size, 'teacher')
    student = models.probe(args.student, args.img_size, 'student')
    args.recipe = args.recipe or ('cnn' if student.layout == 'nchw' else 'vit')  # SGD for CNNs
    recipe = dict(RECIPES[args.recipe], warmup_epochs=RECIPES[args.recipe]['warmup'] * args.epochs)
    for k in ('opt', 'lr', 'wd', 'warmup_epochs', 'clip'):
        if getattr(args, k) is None:
            setattr(args, k, recipe[k])
    args.smoothing = 0.1 if args.recipe == 'cnn' else 0.0  # vit: smoothing is folded into mixup
    args.amp = torch.cuda.is_available() if args.amp is None else args.amp
    if not (args.teacher_ckpt or args.method == 'ce'):  # the cache, trained first if absent
        check_path('--teacher-dir', args.teacher_dir, 'directory', new=True)
        classes = data.num_classes(args.dataset, args.data_dir)
        frac = f'_frac{args.train_fraction}' if args.train_fraction < 1 else ''
        key = f'{args.teacher}_{args.dataset}_{args.img_size}px_{classes}cls{frac}'
        args.teacher_ckpt = os.path.join(args.teacher_dir, key + '_pre' * args.pretrained + '.pt')
    return args


def train(args, rank=0, world=1, device='cpu'):
    """Trains as the resolved args say; returns None, or where a signal stopped it (last.pt)."""
    cuda = device != 'cpu'
    train_loader, val_loader, mixup = data.build_loaders(
        args.dataset, args.data_dir, args.img_size, args.batch_size, args.recipe, args.workers,
        rank, world, args.seed, args.train_fraction, pin_memory=cuda)
    steps = len(train_loader)
    torch.manual_seed(args.seed)
    model = build(args, data.num_classes(args.dataset, args.data_dir)).to(device)
    kw = dict(lr=args.lr, weight_decay=args.wd, momentum=0.9)
    try:  # fused where timm has it: it skips a non-finite step without a host sync
        opt = timm.optim.create_optimizer_v2(model, args.opt, fused=True, **kw)
    except (TypeError, RuntimeError):
        opt = timm.optim.create_optimizer_v2(model, args.opt, **kw)
    sched = CosineLRScheduler(opt, t_initial=args.epochs * steps, warmup_t=int(
        args.warmup_epochs * steps), t_in_epochs=False, lr_min=RECIPES[args.recipe]['min_lr'],
        warmup_lr_init=RECIPES[args.recipe]['warmup_lr'])
    ema = ModelEmaV3(model.student, decay=args.ema) if args.ema else None
    start_epoch, first, best, part = start_run(args, model, opt, ema, rank, world, device)
    student, teacher = model.student, model.teacher
    for module in filter(None, (student, teacher) if args.compile else ()):  # not the distiller's
        module.compile()
    net = DDP(model, broadcast_buffers=False) if world > 1 else model  # feedback stays per rank
    ctx = torch.autocast(torch.device(device).type, torch.bfloat16) if args.amp else nullcontext()
    teacher_top1 = evaluate(teacher, val_loader, device, ctx)[0] if teacher is not None else None
    note = f' | teacher {args.teacher} top-1 {teacher_top1:.2f}' if teacher is not None else ''
    if rank == 0:
        print(f'{args.method}: {args.teacher or "-"} -> {args.student} on {args.dataset} at '
              f'{args.img_size}px, global batch {world * args.batch_size}, {steps} steps/epoch, '
              f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M trainable parameters{note}')
    params = [p for p in model.parameters() if p.requires_grad]
    fused, zero = opt.defaults.get('fused', False), torch.zeros((), device=device)
    next_save, epoch_s, stop = time.time() + 60 * args.save_every_minutes, None, False
    for epoch in range(start_epoch, args.epochs):
        first = first if epoch == start_epoch else 0  # > 0: resumed inside this epoch
        data.set_epoch(train_loader, epoch, args.seed, first)
        sums, skipped = part if first else ({}, zero)  # the finite steps' loss sums, on the device
        streak = worst = zero  # non-finite steps in a row: now, the most in this epoch
        model.train()
        t0 = time.time()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i, (x, y) in enumerate(train_loader, first):
            step = epoch * steps + i
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            data.seed_globals(args.seed, epoch, i, rank)  # Mixup's draws and dropout, per step
            if mixup:
                x, y = mixup(x, y)
            sched.step_update(step)  # a function of the step: --resume --epochs N stretches it
            model.progress = (step + 1) / (args.epochs * steps)  # warm-ups of loss terms (DKD)
            with ctx:
                _, terms = net(x, y)
            terms['total'].backward()
            # the same on every rank after DDP's all-reduce: a non-finite step is skipped by all
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            bad = ~torch.isfinite(norm)
            if args.clip:
                torch.nn.utils.clip_grads_with_norm_(params, args.clip, norm)
            if fused:
                opt.found_inf = bad.float()  # the fused kernel skips the update: no host sync
            if fused or not bad.item():  # other optimizers need the flag on the host: a sync
                opt.step()
            opt.zero_grad(set_to_none=True)
            if ema:
                ema.update(student, step=step)
            skipped, streak = skipped + bad, (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + torch.where(bad, 0, v.detach().float())
            last = i + 1 == steps
            if (i + 1) % args.log_every and not last:
                continue
            # a progress line: the host reads the device here only
            if worst.item() >= MAX_NONFINITE:
                names = [k for k, v in terms.items() if k != 'total' and not v.isfinite()]
                raise SystemExit(f'{int(worst.item())} steps in a row had a non-finite loss ('
                                 f'{", ".join(names) or "total"}): lower --lr or its weight.')
            if rank == 0 and not last:
                print(f'epoch {epoch + 1} step {i + 1}/{steps} loss {terms["total"].item():.4f} '
                      + time_left(args, t0, epoch, i + 1 - first, steps - i - 1, world, epoch_s),
                      flush=True)
            # every rank stops or saves at the same step: a signal to any rank, rank 0's clock
            due = rank == 0 and args.save_every_minutes > 0 and time.time() >= next_save
            flags = torch.tensor([signal_received is not None, due], device=device).int()
            if world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            stop, save_now = flags.tolist()
            if (stop or save_now) and not last:  # the end of an epoch saves anyway
                next_save = time.time() + 60 * args.save_every_minutes
                position = dict(epoch=epoch, step=i + 1, best=best, tally=(sums, skipped))
                save_state(args, model, opt, ema, rank, world, position)
                if stop:
                    return f'epoch {epoch + 1} step {i + 1}/{steps}, saved in {args.out}/last.pt'
        train_s, extra = time.time() - t0, {}
        top1 = top5 = ema_top1 = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            top1, top5 = evaluate(model.eval().student, val_loader, device, ctx)
            ema_top1 = evaluate(ema.module, val_loader, device, ctx)[0] if ema else None
            for name, f in model.extra_evals().items():
                extra[f'{name}_top1'] = evaluate(f, val_loader, device, ctx)[0]
        if rank == 0:
            done = i + 1 - int(skipped.item())  # the epoch's finite steps
            rec = {'epoch': epoch + 1, **{k: round(v.item() / max(done, 1), 5)
                                          for k, v in sums.items()},
                   'skipped_steps': int(skipped.item()), 'top1': top1, 'top5': top5,
                   'top1_ema': ema_top1, 'teacher_top1': teacher_top1, **extra,
                   'lr': opt.param_groups[0]['lr'],
                   'img_per_s': round((i + 1 - first) * args.batch_size * world / train_s, 1),
                   'data_wait': round(train_loader.wait / train_s, 4),
                   'unreadable_images': train_loader.unreadable,  # replaced (NOTES.md, Data)
                   'peak_mem_gb': round(torch.cuda.max_memory_allocated() / 2**30 if cuda else
                                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                        3)}  # since the epoch began (CUDA), of the process (CPU)
            best = save_epoch(args, rec, model, ema, best)
        save_state(args, model, opt, ema, rank, world, dict(epoch=epoch + 1, best=best, top1=top1))
        epoch_s = time.time() - t0  # training, tests and saving
        if rank == 0:
            left = datetime.timedelta(seconds=round(epoch_s * (args.epochs - epoch - 1)))
            print(json.dumps(rec), f'| run time left {left}', flush=True)
        if stop and epoch + 1 < args.epochs:
            return f'the end of epoch {epoch + 1}, saved in {args.out}/last.pt'
    if rank == 0:
        ck = torch.load(os.path.join(args.out, 'last.pt'), map_location='cpu', weights_only=True)
        print(f"student {args.student}: best top-1 {best['top1']:.2f} (epoch {best['epoch']}, "
              f"{best['which']} student: the official metric) | last top-1 {ck['top1']:.2f}{note}")
    return None


def time_left(args, t0, epoch, done, to_go, world, epoch_s):
    """Speed, and time left in the epoch (to_go steps), then in the run at the last epoch's pace."""
    step_s = (time.time() - t0) / done
    left = step_s * to_go
    run_left = left + (args.epochs - epoch - 1) * (epoch_s or step_s * (done + to_go))
    left, run_left = (datetime.timedelta(seconds=round(s)) for s in (left, run_left))
    return f'{args.batch_size * world / step_s:.1f} img/s, time left: epoch {left}, run {run_left}'


def build(args, num_classes):
    """The trainable module for --method, holding the frozen teacher."""
    norm = data.NORM[args.dataset] or (None, None)
    student = models.create(args.student, num_classes, args.pretrained, *norm)
    if args.method == 'ce':  # the student alone, labels only
        return Distiller(student, label_smoothing=args.smoothing)
    weights = None if args.teacher_ckpt == 'random' else args.teacher_ckpt  # None: untrained
    teacher = models.create(args.teacher, num_classes, weights, *norm)
    common = dict(alpha=args.alpha, kd_t=args.kd_t, label_smoothing=args.smoothing)
    fofa = args.method == 'fofa'
    if args.method in ('fofa', 'fitnet'):  # FitNet: FOFA without RAA's attention and AFP
        afp_stages = stages(args.afp_stages) if fofa else ()
        return FOFA(student, teacher, args.img_size, args.nq, args.dim, afp_stages=afp_stages,
                    raa=fofa, feedback=not args.no_feedback, fusion=args.afp_fusion,
                    beta=args.beta, gamma=args.gamma, **common)
    if args.method == 'ofa':
        return OFA(student, teacher, args.img_size, num_classes, stages(args.ofa_stages),
                   args.ofa_eps, **common)
    if args.method == 'fbt':
        return FBT(student, teacher, args.img_size, args.ofa_eps, **common)
    if args.method == 'hcd':
        return HCD(student, teacher, args.img_size, num_classes, args.hcd_n, args.hcd_kl,
                   args.hcd_warmup, **common)
    loss = functools.partial(losses.logit_terms, args.method, kd_t=args.kd_t, dkd_args=args.dkd,
                             dist_args=args.dist)
    model = Distiller(student, teacher, loss, **common)
    if args.method == 'dkd':  # the DKD authors' linear warm-up of their term
        model.ramps['dkd'] = args.dkd_warmup
    return model


@torch.no_grad()
def evaluate(net, loader, device, ctx):
    """(top-1, top-5) of net(x)[0] (a module in eval mode, or a function)."""
    correct = torch.zeros(3, device=device)  # top-1, top-5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            logits = net(x)[0].float()
        top5 = logits.topk(min(5, logits.shape[1]), -1).indices == y[:, None]
        correct += torch.stack([top5[:, 0].sum(), top5.any(1).sum(), y.new_tensor(len(y))])
    if dist.is_initialized():
        dist.all_reduce(correct)
    return (100 * correct[:2] / correct[2]).tolist()


# Checkpoints: resume, log, best and last
def start_run(args, model, opt, ema, rank, world, device):
    """--resume: all from last.pt, at its step (later log lines are redone); else --out loses an
    old run's files. Returns (epoch, step, best, the interrupted epoch's sums or None)."""
    if not args.resume:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            for f in ('log.jsonl', 'last.pt', 'best.pt'):
                pathlib.Path(args.out, f).unlink(missing_ok=True)
            pathlib.Path(args.out, 'args.json').write_text(json.dumps(vars(args), indent=1))
        return 0, 0, {'top1': -1.0}, None
    ck = torch.load(os.path.join(args.out, 'last.pt'), map_location=device, weights_only=True)
    others = ck.get('feedback', [])  # ranks 1..: their own; more ranks than the run had: rank 0's
    ck['model'].update(others[rank - 1] if 0 < rank <= len(others) else {})
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:  # a run of an older version whose model this one no longer builds
        raise SystemExit(f'--resume: {args.out} holds a model this version does not build '
                         f'({str(e).splitlines()[1].strip()}): start it over with --overwrite.')
    opt.load_state_dict(ck['optimizer'])
    if ema:
        ema.load_state_dict(ck['ema'])
    log = pathlib.Path(args.out, 'log.jsonl')
    if rank == 0 and log.exists():  # lines written after last.pt are redone
        lines = log.read_text().splitlines(True)
        pathlib.Path(f'{log}.tmp').write_text(''.join(
            line for line in lines if json.loads(line)['epoch'] <= ck['epoch']))
        os.replace(f'{log}.tmp', log)
    return ck['epoch'], ck.get('step', 0), ck['best'], ck.get('tally')


def save_epoch(args, rec, model, ema, best):
    """rec to log.jsonl, the best student so far (raw or EMA: NOTES.md, Metrics) to best.pt."""
    with open(os.path.join(args.out, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(rec) + '\n')
    top1, ema_top1 = rec['top1'], rec['top1_ema'] or -1.0
    if top1 is not None and max(top1, ema_top1) > best['top1']:
        which = 'ema' if ema_top1 > top1 else 'raw'
        best = {'top1': max(top1, ema_top1), 'epoch': rec['epoch'], 'which': which}
        student = (ema.module if which == 'ema' else model.student).net.state_dict()
        models.write_checkpoint(dict(student=student, which=which, epoch=rec['epoch'],
                                     args=vars(args)), os.path.join(args.out, 'best.pt'))
    return best


def save_state(args, model, opt, ema, rank, world, position):
    """last.pt at `position`, every rank's FOFA feedback (Eq. 5) included: all ranks call it."""
    own = {k: v.cpu() for k, v in model.state_dict().items() if k.endswith('.feedback')}
    feedback = [own]
    if world > 1:  # rank 0 gathers every rank's own
        feedback = [None] * world if rank == 0 else None
        dist.gather_object(own, feedback)
    if rank == 0:
        state = dict(student=model.student.net.state_dict(), model=model.state_dict(),
                     feedback=feedback[1:], optimizer=opt.state_dict(),
                     ema=ema.state_dict() if ema else None, **position, args=vars(args))
        models.write_checkpoint(state, os.path.join(args.out, 'last.pt'))


# Checking the flags: one sentence for each mistake
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, exit code 1 (argparse's own: usage, error, code 2)
        raise SystemExit(message.removeprefix('argument ').rstrip('.') + '.')


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no '(default: None)' (the help says) nor 'False'
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def checked(kind, accepted, ok):
    """An argparse type: kind(text) if ok(that), else an error that says what is accepted."""
    def parse(text):
        with suppress(ValueError, OverflowError):
            value = kind(text)
            if ok(value):
                return value
        raise argparse.ArgumentTypeError(f'{text!r} is not {accepted}')
    return parse


def stages(text):
    """'1,2,4' -> (1, 2, 4); 'none' -> ()."""
    return () if text.lower() == 'none' else tuple(sorted({int(s) for s in text.split(',')}))


COUNT = checked(int, 'an integer >= 1', lambda v: v >= 1)
NATURAL = checked(int, 'an integer >= 0', lambda v: v >= 0)
POSITIVE = checked(float, 'a number > 0', lambda v: 0 < v < math.inf)
NONNEG = checked(float, 'a number >= 0', lambda v: 0 <= v < math.inf)
SHARE = checked(float, 'in [0, 1]', lambda v: 0 <= v <= 1)
STAGES = checked(str, "stages 1-4 (e.g. 1,2,4) or 'none'", lambda t: set(stages(t)) <= {1, 2, 3, 4})
OPTIMIZER = checked(str, 'a timm optimizer name (sgd, adamw, lamb...)',
                    lambda t: t.lower().removeprefix('lookahead_') in timm.optim.list_optimizers())


def check_path(flag, path, what, new=False):
    """path (or None) if an existing `what` ('... file', '... directory') or, if new, makeable."""
    if path is None:
        return None
    kind = 'directory' if os.path.isdir(path) else 'file'
    if os.path.exists(path) and not what.endswith(kind):
        raise SystemExit(f'{flag} {path} is a {kind}, not a {what}.')
    up = os.path.abspath(path)
    while new and not os.path.exists(up):  # the nearest existing folder above
        up = os.path.dirname(up)
    if not os.path.exists(up):
        raise SystemExit(f'{flag} {path} does not exist: give an existing {what}.')
    if up != os.path.abspath(path) and not (os.path.isdir(up) and os.access(up, os.W_OK | os.X_OK)):
        raise SystemExit(f'{flag} {path} cannot be made: {up} is not a writable directory.')
    return path


def train_teacher(args, rank, world, device):
    """Trains args.teacher (--method ce) into args.teacher_ckpt; returns where a signal stopped."""
    out = args.teacher_ckpt.removesuffix('.pt')
    resume = '--resume' if os.path.isfile(f'{out}/last.pt') else '--overwrite'  # a stopped one: on
    targs = parser().parse_args(['--student', args.teacher, '--method', 'ce', resume, '--out', out])
    for k in ('dataset', 'data_dir', 'img_size', 'batch_size', 'seed', 'amp', 'workers',
              'train_fraction', 'log_every', 'eval_every', 'pretrained', 'epochs'):
        setattr(targs, k, getattr(args, k))
    resolve(targs)  # the recipe gives its other flags
    if rank == 0:
        print(f'no teacher in {args.teacher_ckpt}: training {args.teacher} with --method ce first')
    stopped = train(targs, rank, world, device)
    if rank == 0 and not stopped:
        best = torch.load(os.path.join(targs.out, 'best.pt'), map_location='cpu', weights_only=True)
        models.write_checkpoint(best, args.teacher_ckpt)
    if world > 1:
        dist.barrier()
    return stopped


def ask_to_stop(signum, frame):  # SIGTERM (SLURM, Kubernetes, torchrun), SIGUSR1 (SLURM --signal)
    global signal_received
    signal_received = signal.Signals(signum).name


def main(argv=None):
    global signal_received
    args = resolve(parser().parse_args(argv))
    world = int(os.environ.get('WORLD_SIZE', 1))  # set by torchrun
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    if device != 'cpu':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group('nccl' if device != 'cpu' else 'gloo')
    signal_received = None
    handlers = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stopped = None
        cached = args.teacher_ckpt not in (None, 'timm', 'random')  # user files were checked
        if cached and not os.path.isfile(args.teacher_ckpt.removesuffix(':ema')):
            stopped = train_teacher(args, rank, world, device)
        resume = '' if stopped else ' with --resume'  # a stopped teacher run goes on by itself
        if not stopped:
            stopped = train(args, rank, world, device)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stopped and rank == 0:
        print(f'{signal_received or "a signal to another process"}: stopped at {stopped}; to '
              f'continue, run the same command{resume}.', flush=True)
    if world > 1:
        dist.destroy_process_group()
    if stopped:
        raise SystemExit(STOPPED)


if __name__ == '__main__':
    main()

"""FOFA: feature-based one-for-all distillation (region-aware attention, adaptive feedback prompts).
FOFA(student, teacher, img_size)(images in [0, 1], labels) -> (student logits, {term: scalar,
'total'}), student and teacher being models.Staged: a module for any training loop (README)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import hcl, kd


class Distiller(nn.Module):
    """Student CE + loss(logits, t_logits, targets, feats, t_feats) -> {term: scalar} (default: KD)
    against a frozen eval-mode teacher outside .parameters(), state_dict(), DDP (.to() moves it)."""

    def __init__(self, student, teacher=None, loss=None, alpha=1.0, kd_t=1.0, label_smoothing=0.0):
        super().__init__()
        self.student, self.label_smoothing, self.alpha = student, label_smoothing, alpha
        self.loss = loss or (lambda s, t, *_: {'kd': kd(s, t, kd_t)})  # Eq. 1
        self.weights = {'ce': 1.0}
        self.ramps = {}  # term -> share of the run over which its weight rises from 0 (a warm-up)
        self.progress = 1.0  # share of the run done, set by the training loop before each step
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, 'teacher', teacher)

    def _apply(self, fn, *args, **kwargs):
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images, targets):
        """targets: class indices or soft (mixup). Returns (logits, {term: scalar, 'total'})."""
        logits, feats = self.student(images)
        logits32 = logits.float()
        losses = {'ce': F.cross_entropy(logits32, targets, label_smoothing=self.label_smoothing)}
        if self.teacher is not None:
            with torch.no_grad():
                t_logits, t_feats = self.teacher(images)
            losses |= self.distill(images, targets, logits32, feats, t_logits.float(), t_feats)
        losses['total'] = sum(self.weight(k) * v for k, v in losses.items())
        return logits, losses

    def weight(self, term):
        """The term's weight (default alpha), times min(progress / ramp, 1) if it has a ramp."""
        ramp = self.ramps.get(term, 0.0)
        return self.weights.get(term, self.alpha) * (min(self.progress / ramp, 1.0) if ramp else 1)

    def distill(self, images, targets, logits, feats, t_logits, t_feats):
        return self.loss(logits, t_logits, targets, feats, t_feats)

    def extra_evals(self):  # {name: fn(images) -> (logits, ...)}: tested each epoch as <name>_top1
        return {}


class Patchify(nn.Module):
    """C_i in Eq. 3: a (grid x grid) patch conv from one student stage to d-dim tokens."""

    def __init__(self, shape, grid, dim):
        super().__init__()
        c, h, w = shape
        k = (math.ceil(h / grid), math.ceil(w / grid))
        self.size = (k[0] * grid, k[1] * grid)  # smaller maps are upsampled first
        self.proj = nn.Conv2d(c, dim, k, k)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode='nearest')
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, d)


class Aligner(nn.Module):
    """M_i in Eq. 2: grid tokens -> the teacher stage's (C, H, W) by LayerNorm, then linear maps."""

    def __init__(self, dim, tokens, shape):
        super().__init__()
        self.shape, self.norm = shape, nn.LayerNorm(dim)
        self.channels = nn.Linear(dim, shape[0])
        self.spatial = nn.Linear(tokens, shape[1] * shape[2])

    def forward(self, t):
        x = self.channels(self.norm(t)).transpose(1, 2)  # (B, C_t, grid^2)
        return self.spatial(x).unflatten(2, self.shape[1:])


class RAA(nn.Module):
    """Region-aware attention (Eq. 3-4) over the N_q tokens of all 4 student stages, then the
    aligners. attention=False: patchify and aligners only, Table 4's FitNet (NOTES.md, RAA)."""

    def __init__(self, student_shapes, teacher_shapes, nq=64, dim=512, heads=8, attention=True):
        super().__init__()
        grid = math.isqrt(nq // 4)
        if nq < 4 or 4 * grid * grid != nq:
            raise ValueError(f'N_q must be 4*k*k (a k x k grid per stage: 36, 64...), not {nq}')
        if dim % heads:
            raise ValueError(f'the RAA dim {dim} must be divisible by its {heads} heads')
        self.heads, self.attention = heads, attention
        self.patchify = nn.ModuleList(Patchify(s, grid, dim) for s in student_shapes)
        self.align = nn.ModuleList(Aligner(dim, grid * grid, t) for t in teacher_shapes)
        if attention:
            self.pos = nn.Parameter(torch.zeros(1, nq, dim))  # one per (stage, patch) slot
            nn.init.trunc_normal_(self.pos, std=0.02)
            self.norm, self.qk = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim)
            self.v = nn.Linear(dim, dim)  # after qk: optimizer states index parameters in order

    def forward(self, feats):
        tokens = self.tokens(feats)
        if self.attention:  # Eq. 4
            tokens = F.scaled_dot_product_attention(*self.qkv(tokens)).transpose(1, 2).flatten(2)
        return [a(t) for a, t in zip(self.align, tokens.chunk(4, 1))]

    def tokens(self, feats):  # Eq. 3: (B, N_q, d), the stages' grids in turn
        return torch.cat([p(f) for p, f in zip(self.patchify, feats)], 1)

    def qkv(self, tokens):  # Eq. 4's q, k (with positions), v per head: (B, heads, N_q, d/heads)
        h = self.norm(tokens)
        qk = self.qk(h + self.pos).unflatten(-1, (2, self.heads, -1))
        q, k = qk.permute(2, 0, 3, 1, 4)
        return q, k, self.v(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)


class SE(nn.Module):
    """The official squeeze-excitation: it returns its gate, not the gated feature, so the layers
    after it run on a 1x1 map and AFP's prompt is a per-sample, per-channel bias."""

    def __init__(self, c):
        super().__init__()
        hidden = max(c // 16, 8)
        self.fc = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, c, 1), nn.Sigmoid())

    def forward(self, x):
        return self.fc(x.mean((2, 3), keepdim=True))


def conv_chain_mean(convs, *parts):
    """c(b(a(cat(parts, 1)))).mean((2, 3), keepdim=True) for convs (a, b, c): a, c 1x1, b k x k
    (zero padding k // 2, stride 1), no activation between (the official SE keeps only this mean).
    Per tap of b, the input's sum over the positions it reads: two small matmuls, not full convs."""
    a, b, c = convs
    k, (h, w) = b.kernel_size[0], parts[0].shape[-2:]
    assert a.kernel_size == c.kernel_size == (1, 1) and b.stride == (1, 1)
    assert b.padding == (k // 2, k // 2)
    # (n, k) per axis: line r is read by tap i iff output line r - i + k // 2 is in [0, n)
    rh, rw = (parts[0].new_ones(n, k).tril(k // 2).triu(k // 2 - n + 1) for n in (h, w))
    taps = torch.cat([rh.t() @ (u @ rw) for u in parts], 1)  # (B, C, k, k)
    positions = torch.outer(rh.sum(0), rw.sum(0))  # a's bias counts once per position read
    z = F.conv2d(taps, a.weight, groups=a.groups) + a.bias[:, None, None] * positions
    return c(F.conv2d(z, b.weight, groups=b.groups) / (h * w) + b.bias[:, None, None])


class AFP(nn.Module):
    """Adaptive feedback prompt before one teacher stage (Eq. 5-6): x + beta * PB(FB(cat(feedback,
    x))), feedback = M(F_S) - F_T' of the previous iteration (a buffer); beta starts at 0, as the
    teacher. PB and FB end in the official SE: a per-channel bias (NOTES.md, AFP prompt)."""

    def __init__(self, in_shape, out_shape, use_feedback=True, fusion='dw'):
        super().__init__()
        c, g = in_shape[0], 4 if in_shape[0] % 4 == 0 else 1
        self.in_shape, self.out_shape, self.use_feedback = in_shape, out_shape, use_feedback
        self.prompt = nn.Sequential(nn.Conv2d(c, c, 1, groups=g),  # PB, as in Pro-tuning
                                    nn.Conv2d(c, c, 5, padding=2, groups=c), nn.Conv2d(c, c, 1),
                                    SE(c), nn.Conv2d(c, c, 1, groups=g))
        self.beta = nn.Parameter(torch.zeros(1))
        if use_feedback:
            self.fb_align = nn.Conv2d(out_shape[0], c, 1) if out_shape[0] != c else nn.Identity()
            groups = {'dw': c, 'full': 1}[fusion]  # FB's 5x5: depthwise, or full as official
            self.fusion = nn.Sequential(nn.Conv2d(2 * c, c, 1),  # FB
                                        nn.Conv2d(c, c, 5, padding=2, groups=groups),
                                        nn.Conv2d(c, c, 1), SE(c), nn.Conv2d(c, c, 1))
            self.register_buffer('feedback', torch.zeros(0))

    def forward(self, x):
        x_in = x
        if self.use_feedback:  # Eq. 6: FB(Concat(Feedback, F^T)), here (B, C, 1, 1)
            x_in = self.fusion[3:](conv_chain_mean(self.fusion[:3], self.resized_feedback(x), x))
        return x + self.beta * self.prompt[3:](conv_chain_mean(self.prompt[:3], x_in))

    def resized_feedback(self, x):
        """The previous iteration's gap at the channels and size of this stage input x."""
        fb = self.feedback
        if not fb.numel():  # first step: zero feedback, same parameters
            fb = x.new_zeros(x.shape[0], *self.out_shape)
        elif fb.shape[0] != x.shape[0]:  # another batch size (the last test batch): rows in turn
            fb = fb[torch.arange(x.shape[0], device=fb.device) % fb.shape[0]]
        fb = self.fb_align(fb.to(x.dtype))
        if fb.shape[-2:] != x.shape[-2:]:
            fb = F.interpolate(fb, size=x.shape[-2:], mode='nearest')
        return fb

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'feedback'  # the buffer's shape depends on the batch: take the checkpoint's
        if self.use_feedback and key in state_dict:
            self.feedback = self.feedback.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FOFA(Distiller):
    """L = CE + alpha * KD + beta * FD + gamma * Reg (Eq. 8), FD = sum_i HCL(M_i(F_S), F'_T,i)
    (Eq. 2) over the 4 stages, against the prompted teacher. afp_stages: any of 1-4 (none: the plain
    teacher's features are targets); raa=False: FitNet. DDP: broadcast_buffers=False (NOTES.md)."""

    def __init__(self, student, teacher, img_size, nq=64, dim=512, heads=8, afp_stages=(1, 2, 3, 4),
                 feedback=True, raa=True, fusion='dw', alpha=1.0, beta=1.0,
                 gamma=1.0, kd_t=1.0, label_smoothing=0.0):
        super().__init__(student, teacher, alpha=alpha, kd_t=kd_t, label_smoothing=label_smoothing)
        if not set(afp_stages) <= {1, 2, 3, 4}:
            raise ValueError(f'AFP stages must be among 1, 2, 3, 4; got {sorted(afp_stages)}')
        _, s_out = student.shapes(img_size)
        t_in, t_out = teacher.shapes(img_size)
        self.raa = RAA(s_out, t_out, nq, dim, heads, attention=raa)
        self.afp = nn.ModuleDict({str(i - 1): AFP(t_in[i - 1], t_out[i - 1], feedback, fusion)
                                  for i in sorted(afp_stages)})
        self.weights.update(fd=beta, reg=gamma)

    def prompted_teacher(self, images):
        """The teacher with the current prompts and feedback: (logits, feats)."""
        return self.teacher(images, {int(i): afp for i, afp in self.afp.items()})

    def extra_evals(self):  # the prompted teacher with this run's current feedback
        return {'prompted_teacher': self.prompted_teacher} if len(self.afp) else {}

    def distill(self, images, targets, logits, feats, t_logits, t_feats):
        aligned = self.raa(feats)
        losses = super().distill(images, targets, logits, feats, t_logits, t_feats)  # Eq. 1
        if len(self.afp):
            tp_logits, t_feats = self.prompted_teacher(images)  # gradients reach the prompts
            losses['reg'] = kd(tp_logits.float(), t_logits)  # Eq. 7: KL(p_T || p_T'), T = 1
        losses['fd'] = sum(hcl(a.float(), t.float()) for a, t in zip(aligned, t_feats))  # Eq. 2
        with torch.no_grad():
            for i, afp in self.afp.items():  # Eq. 5: this iteration's gap, the next one's feedback
                if afp.use_feedback:  # a new tensor: this step's graph still uses the old one
                    afp.feedback = (aligned[int(i)] - t_feats[int(i)]).float()
        return losses

"""Baselines with modules of their own, OFA, FBT, HCD (NOTES.md, FBT and HCD): fofa.Distillers."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torchvision.ops import Permute

from fofa import Distiller
from losses import info_nce, kd, ofa, orthogonality


class OFA(Distiller):
    """OFA-KD (Hao et al. 2023): the OFA loss on the logits and on a head per chosen student stage
    (one design, any family: stride-2 separable convs to stage 4's size, 1x1 conv, pool, linear)."""

    def __init__(self, student, teacher, img_size, num_classes, stages=(1, 2, 3, 4), eps=1.0, **kw):
        super().__init__(student, teacher, **kw)
        _, s_out = student.shapes(img_size)
        width = max(s_out[3][0], teacher.shapes(img_size)[1][3][0])
        self.heads = nn.ModuleDict({str(i - 1): self.head(s_out[i - 1], s_out[3][1], width,
                                                          num_classes) for i in stages})
        self.eps = eps

    @staticmethod
    def head(shape, final_size, width, num_classes):
        c, h, layers = shape[0], shape[1], []
        while h > final_size:
            layers += [nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.Conv2d(c, 2 * c, 1), nn.GELU()]
            c, h = 2 * c, (h + 1) // 2
        return nn.Sequential(*layers, nn.Conv2d(c, width, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.LayerNorm(width), nn.Linear(width, num_classes))

    def distill(self, images, targets, logits, feats, t_logits, t_feats):
        stages = sum(ofa(h(feats[int(i)]).float(), t_logits, targets, self.eps)
                     for i, h in self.heads.items())
        return {'ofa': ofa(logits, t_logits, targets, self.eps), 'ofa_stages': stages}


class FBT(Distiller):
    """FBT (Li et al., ICCV'25): fused model f = a's stages 1-3 -> L2G -> b's stage 4 + head, a the
    teacher iff it is the pair's only CNN, else the student (NOTES.md, FBT). L = sum over the pairs
    (t, s), (t, f), (f, s) of InfoNCE on pooled final features + OFA on logits (Eq. 3); f detached
    in (f, s), its target: only (t, f) trains it. Frozen teacher stages in f pass gradients on."""

    def __init__(self, student, teacher, img_size, eps=1.0, dim=128, **kw):
        super().__init__(student, teacher, **kw)
        self.t_first, self.eps = teacher.layout == 'nchw' != student.layout, eps  # nchw: a CNN
        a, b = (teacher, student) if self.t_first else (student, teacher)
        shape = {m: m.shapes(img_size) for m in (student, teacher)}  # (stage inputs, outputs)
        c, h, w = shape[b][0][3]  # what b's stage 4 takes
        window = max(k for k in range(1, 8) if h % k == 0 == w % k)  # Swin's 7, or what tiles
        # L2G: PE (1x1 conv + LN, pooled to b's stage-3 grid), a Swin block (heads of 32, no shift)
        self.l2g = nn.Sequential(nn.Conv2d(shape[a][1][2][0], c, 1), nn.AdaptiveAvgPool2d((h, w)),
                                 Permute([0, 2, 3, 1]), nn.LayerNorm(c),
                                 SwinTransformerBlock(c, (h, w), max(c // 32, 1),
                                                      window_size=window),
                                 Permute([0, 3, 1, 2]))
        # s, f, t (CRD)
        self.emb = nn.ModuleList(nn.Linear(shape[m][1][3][0], dim) for m in (student, b, teacher))
        self.log_scale = nn.Parameter(torch.full((3,), 1 / 0.07).log())  # 1 / tau per pair (CLIP)

    def fused(self, images, stage3=None):
        """The fused model: (logits, pooled stage-4 map); stage3: a's stage-3 output, if computed.
        b runs whole, stage-4 input replaced: stages 1-3 wasted (forward only; NOTES.md, FBT)."""
        a, b = (self.teacher, self.student) if self.t_first else (self.student, self.teacher)
        x = self.l2g(a(images)[1][2] if stage3 is None else stage3)
        logits, feats = b(images, {3: lambda _: x})  # a ViT's class token: b's own, constant
        return logits, feats[3].mean((2, 3))

    def extra_evals(self):
        return {'fused': self.fused}

    def distill(self, images, targets, logits, feats, t_logits, t_feats):
        f_logits, f_feat = self.fused(images, t_feats[2] if self.t_first else feats[2])
        pooled = (feats[3].mean((2, 3)), f_feat, t_feats[3].mean((2, 3)))
        e_s, e_f, e_t = (m(f) for m, f in zip(self.emb, pooled))
        pair = lambda i, e, e_to, p, p_to: (info_nce(e, e_to, self.log_scale[i])
                                            + ofa(p, p_to, targets, self.eps))
        return {'teacher_student': pair(0, e_s, e_t, logits, t_logits),
                'teacher_fused': pair(1, e_f, e_t, f_logits, t_logits),
                'fused_student': pair(2, e_s, e_f.detach(), logits, f_logits.detach())}


class HCD(Distiller):
    """HCD (Xu et al., AAAI'26) reconstructed from its sources (NOTES.md, HCD): per student stage, a
    projector (OFA's head less its Linear) and a Linear-ReLU-Linear map of [feature; pooled teacher
    stage 4] to n sub-logits, each + the teacher's logits. L = CE + KD + per stage (sub-logit CE +
    orthogonality) + w_kl * stage-mean KL(detached sub || student), w_kl warmed up over `warmup`."""

    def __init__(self, student, teacher, img_size, num_classes, n=4, w_kl=6.0, warmup=20 / 240,
                 theta=0.5, kd_t=1.0, **kw):
        super().__init__(student, teacher, kd_t=kd_t, **kw)
        (_, s_out), c_t = student.shapes(img_size), teacher.shapes(img_size)[1][3][0]
        width = max(s_out[3][0], c_t)
        self.proj = nn.ModuleList(OFA.head(s, s_out[3][1], width, 1)[:-1] for s in s_out)
        self.cfm = nn.ModuleList(nn.Sequential(nn.Linear(width + c_t, c_t), nn.ReLU(),
                                               nn.Linear(c_t, n * num_classes)) for _ in s_out)
        self.n, self.theta, self.kd_t = n, theta, kd_t
        self.weights.update(sub_ce=1.0, sub_kl=w_kl, orth=1.0)
        self.ramps['sub_kl'] = warmup

    def distill(self, images, targets, logits, feats, t_logits, t_feats):
        losses = super().distill(images, targets, logits, feats, t_logits, t_feats)  # KD
        f_t = t_feats[3].float().mean((2, 3))  # the teacher's penultimate feature
        # (B, n, K) per stage, fused with the teacher's
        z = [cfm(torch.cat([proj(f).float(), f_t], 1)).float().unflatten(1, (self.n, -1))
             + t_logits[:, None] for proj, cfm, f in zip(self.proj, self.cfm, feats)]
        y = targets.unsqueeze(-1).expand(*targets.shape, self.n)  # each sub-logit: the target
        losses['sub_ce'] = sum(F.cross_entropy(s.transpose(1, 2), y) for s in z)
        # sub-logits as targets: detached, or KL drags them to the untrained student (NOTES.md, HCD)
        student = logits[:, None].expand_as(z[0]).flatten(0, 1)
        losses['sub_kl'] = sum(kd(student, s.detach().flatten(0, 1), self.kd_t) for s in z) / len(z)
        hard = targets.argmax(-1) if targets.dim() == 2 else targets  # mixup: its main class
        losses['orth'] = sum(orthogonality(s, hard, self.theta) for s in z)
        return losses

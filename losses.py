"""Distillation losses on logits and feature maps: float32 tensors in, a scalar out (NOTES.md,
Losses). The baselines' inputs may be bf16 under autocast: each casts to float32 first."""
import torch
import torch.nn.functional as F


def kd(student_logits, teacher_logits, T=1.0):
    """Eq. 1: KL(p_T || p_S) at temperature T, mean over the batch, times T^2 (Hinton et al.)."""
    s, t = F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1)
    return F.kl_div(s, t, reduction='batchmean', log_target=True) * T * T


def hcl(fs, ft):
    """Eq. 2's distance, ReviewKD's hcl (https://github.com/dvlab-research/ReviewKD): MSE of fs - ft
    and its 4x4, 2x2, 1x1 average pools below its height, weighted 1, 1/2, 1/4, 1/8, normalised."""
    d = fs - ft  # ReviewKD pools fs and ft: the same, pooling being linear
    loss, weight, total = d.pow(2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level < d.shape[-2]:
            weight /= 2
            loss = loss + weight * F.adaptive_avg_pool2d(d, level).pow(2).mean()
            total += weight
    return loss / total


# ---- Baselines (Sec. 4 comparisons; CRD is left out: NOTES.md, Losses)
def dkd_parts(logits_s, logits_t, target, T=4.0):
    """DKD (Zhao et al., CVPR'22) Eq. 1-4 per sample, no T^2: (TCKD, NCKD, b_T), each (B,), b_T the
    teacher's target probability: KL(p_T || p_S) = TCKD + (1 - b_T) * NCKD (NCKD: non-targets)."""
    s, t = logits_s.float() / T, logits_t.float() / T
    gt = F.one_hot(target, s.shape[-1]).bool()
    s_nt, t_nt = s[~gt].view(len(s), -1), t[~gt].view(len(t), -1)
    # log of the binary distribution [p_target, 1 - p_target], from log-sum-exps (no log(1 - p))
    bin_s = torch.stack([s[gt], s_nt.logsumexp(-1)], -1) - s.logsumexp(-1, keepdim=True)
    bin_t = torch.stack([t[gt], t_nt.logsumexp(-1)], -1) - t.logsumexp(-1, keepdim=True)
    tckd = (bin_t.exp() * (bin_t - bin_s)).sum(-1)
    ls, lt = F.log_softmax(s_nt, -1), F.log_softmax(t_nt, -1)
    nckd = (lt.exp() * (lt - ls)).sum(-1)
    return tckd, nckd, bin_t[:, 0].exp()


def dkd(logits_s, logits_t, target, alpha=1.0, beta=8.0, T=4.0):
    """DKD: (alpha * TCKD + beta * NCKD) * T^2, batch mean; CIFAR-100 defaults (NOTES.md, DKD)."""
    tckd, nckd, _ = dkd_parts(logits_s, logits_t, target, T)  # target: class indices
    return (alpha * tckd + beta * nckd).mean() * T * T


def dist(logits_s, logits_t, beta=1.0, gamma=1.0, tau=1.0):
    """DIST (Huang et al., NeurIPS'22) Eq. 4-7: (beta * (1 - mean Pearson over samples, p's rows)
    + gamma * (1 - mean Pearson over classes, its columns)) * tau^2, p = softmax(logits / tau)."""
    ps, pt = F.softmax(logits_s.float() / tau, -1), F.softmax(logits_t.float() / tau, -1)

    def pearson(a, b):  # per row: the cosine of the centred vectors
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return F.cosine_similarity(a, b, -1, 1e-8)
    inter, intra = 1 - pearson(ps, pt).mean(), 1 - pearson(ps.t(), pt.t()).mean()
    return (beta * inter + gamma * intra) * tau * tau


def ofa(logits_s, logits_t, target, eps=1.0, T=1.0):
    """OFA-KD (Hao et al., NeurIPS'23) Eq. 5 at temperature T, no T^2 (eps = 1: CE against p_T):
    mean_b sum_c -((p_T + y)^eps - y) * log p_S; mixup targets: their argmax (official code)."""
    s, t = logits_s.float(), logits_t.float()
    y = F.one_hot(target.argmax(-1) if target.dim() == 2 else target, s.shape[-1]).float()
    w = (F.softmax(t / T, -1) + y).pow(eps) - y
    return -(w * F.log_softmax(s / T, -1)).sum(-1).mean()


def info_nce(query, keys, log_scale):
    """InfoNCE with in-batch negatives (FBT Eq. 3): CE over keys j of cos(q_i, k_j) / tau, positive
    k_i on the diagonal; log_scale = log(1 / tau), learnable, 1 / tau capped at 100 as in CLIP."""
    q, k = F.normalize(query.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    with torch.autocast(q.device.type, enabled=False):  # float32 similarities under autocast too
        scale = log_scale.float().exp().clamp(max=100)
        return F.cross_entropy(q @ k.t() * scale, torch.arange(len(q), device=q.device))


def orthogonality(sub_logits, target, theta=0.5):
    """HCD's orthogonality loss on (B, n, K) sub-logits: mean over samples and pairs j != k of
    relu(cos - theta)^2, target column zeroed (not -1e6: fp16 overflow, swamps the rest in bf16)."""
    target_column = F.one_hot(target, sub_logits.shape[-1]).bool()[:, None]
    z = F.normalize(sub_logits.float().masked_fill(target_column, 0), dim=-1)
    off = ~torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    cos = (z[:, :, None] * z[:, None]).sum(-1)  # (B, n, n); elementwise: float32 under autocast
    return F.relu(cos[:, off] - theta).pow(2).mean()


def rkd(emb_s, emb_t, w_dist=25.0, w_angle=50.0):
    """RKD (Park et al., CVPR'19) Eq. 6-9: w_dist * smooth-L1 of pairwise distances (over their
    off-diagonal mean) + w_angle * smooth-L1 of triplet angle cosines; dims may differ (B x B)."""
    def distances(e):  # over their off-diagonal mean
        off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).clamp_min(1e-12).sqrt() * off
        return d / d[off].mean()

    def angles(e):  # cos of the angle at e_i between e_j and e_k
        v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=-1)  # v[i, j] = unit(e_j - e_i)
        return torch.einsum('ijd,ikd->ijk', v, v)
    s, t = emb_s.float(), emb_t.float()
    angle = F.smooth_l1_loss(angles(s), angles(t))
    return w_dist * F.smooth_l1_loss(distances(s), distances(t)) + w_angle * angle


def cc(emb_s, emb_t):
    """Correlation congruence (Peng et al., ICCV'19) Eq. 4: MSE of the B x B batch correlations,
    here cosines, for the paper's Taylor-expanded RBF (a series in the cosine); dims may differ."""
    s, t = F.normalize(emb_s.float(), dim=-1), F.normalize(emb_t.float(), dim=-1)
    return (s @ s.t() - t @ t.t()).pow(2).mean()


def logit_terms(method, logits, t_logits, targets, feats, t_feats, kd_t, dkd_args, dist_args):
    """{method: loss} of the loss-only methods: on the logits, or (rkd, cc) the pooled stage 4."""
    if method == 'kd':
        return {'kd': kd(logits, t_logits, kd_t)}
    if method == 'dkd':
        hard = targets.argmax(-1) if targets.dim() == 2 else targets  # mixup: the main class
        return {'dkd': dkd(logits, t_logits, hard, *dkd_args)}
    if method == 'dist':
        return {'dist': dist(logits, t_logits, *dist_args)}
    emb, t_emb = feats[-1].float().mean((2, 3)), t_feats[-1].float().mean((2, 3))
    return {method: rkd(emb, t_emb) if method == 'rkd' else cc(emb, t_emb)}

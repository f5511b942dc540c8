"""Distillation losses on logits and feature maps. Every function takes float32 tensors and returns a scalar."""
import torch.nn.functional as F


def kd(student_logits, teacher_logits, T=1.0):
    """Eq. 1: KL(p_T || p_S) at temperature T, mean over the batch, times T^2 (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1),
                    reduction='batchmean', log_target=True) * T * T


def afp_reg(prompted_logits, teacher_logits):
    """Eq. 7: KL(p_T || p_T'), keeps the prompted teacher's predictions on the plain teacher's (T = 1)."""
    return kd(prompted_logits, teacher_logits.detach(), 1.0)


def hcl(fs, ft):
    """Hierarchical context loss (ReviewKD): MSE of the maps plus MSE of their 4x4, 2x2 and 1x1 average pools,
    weighted 1/2, 1/4, 1/8 where the level is smaller than the map, divided by the sum of the weights used."""
    loss, total, w = F.mse_loss(fs, ft), 1.0, 1.0
    for level in (4, 2, 1):
        w /= 2
        if level < min(fs.shape[-2:]):
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            total += w
    return loss / total

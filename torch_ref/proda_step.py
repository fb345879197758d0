"""PyTorch reference of ProDA's training steps, for step parity (float64 on CPU).

A transcription of microsoft/ProDA ``models/adaptation_modelv2.py`` (``CustomModel.step``,
``step_distillation``, ``full2weak``, ``feat_prototype_distance``, ``get_prototype_weight``,
``label_strong_T``, ``rce``, ``regular_loss``, ``calculate_mean_vector``,
``update_objective_SingleVector``, the EMA update), ``data/randaugment.py``
``affine_sample`` and ``models/utils.py`` ``cross_entropy2d``, as ``train.py`` calls them for
stage 1 (``--ema --proto_rectify --moving_prototype --rce``) and stages 2/3 (``--S_pseudo 1
--distillation 1``). Standard torch only; imports nothing of the project.

The segmentor is any module returning ``{'out': logits, 'feat': features}`` (the reference's
DeepLab: its classifier's input and output). Changes that let it run in float64 and leave
the reference's arithmetic otherwise as it is:

1. Buffers the reference allocates in float32 (the loss accumulator ``torch.Tensor([0])``,
   the distance maps ``-torch.ones(...)``, ``process_label``'s one-hot) are made in the
   features' dtype. In the reference everything is float32 anyway.
2. ``affine_sample`` builds theta in float64 and rounds it to float32 (``torch.Tensor``), so
   its grid is float32; a float64 map is resampled by sampling a float32 index map with that
   grid and gathering (nearest sampling picks one source pixel per output pixel: the same
   choice as the reference's float32 map). ``align_corners`` of the grid is a parameter
   (the reference passes none: False since torch 1.3, True before).
3. The ignore label is a parameter (the reference hard-codes 250; the project uses 255).
   The padding of the distance maps stays 250, a distance value.
4. ``DataParallel`` and SyncBN are left out (one device: plain BN on the same batch).

Quirks kept: the EMA model is never put in eval mode (BN on batch statistics, dropout on);
its BN buffers are copied from the student, not averaged; the prototype table is updated
from the EMA's own argmax on the full image (not the denoised label), after the step;
``kl_div(softmax(student), teacher)`` in the distillation; TranslateX scaled by 2/H.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
DISTANCE_PADDING = 250


@dataclasses.dataclass
class Options:
    """The ``opt`` fields the steps read (parser_train.py defaults, README's stage flags)."""

    n_class: int = 19
    proto_temperature: float = 1.0
    proto_momentum: float = 1e-4
    train_thred: float = 0.0
    rce: bool = True
    rce_alpha: float = 0.1
    rce_beta: float = 1.0
    regular_w: float = 0.1
    regular_type: str = "MRKLD"
    proto_consistW: float = 10.0
    distillation: float = 1.0
    S_pseudo: float = 1.0
    ignore_index: int = 250
    align_corners: bool = False  # affine_grid / grid_sample (see 2.)


# --------------------------------------------------------------------------- geometry


def affine_sample(tensor: torch.Tensor, v: float, kind: str, align_corners: bool):
    """randaugment.affine_sample: nearest resampling of (1, C, H, W) by one op's theta."""
    if kind == "Rotate":
        a = v / 180 * np.pi
        theta = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]], np.float64)
    else:
        theta = {
            "ShearX": [[1, v, 0], [0, 1, 0]],
            "ShearY": [[1, 0, 0], [v, 1, 0]],
            "TranslateX": [[1, 0, v], [0, 1, 0]],
            "TranslateY": [[1, 0, 0], [0, 1, v]],
        }[kind]
        theta = np.array(theta, np.float64)
    n, c, h, w = tensor.shape
    theta[0, 1] = theta[0, 1] * h / w
    theta[1, 0] = theta[1, 0] * w / h
    if kind != "Rotate":
        theta[0, 2] = theta[0, 2] * 2 / h + theta[0, 0] + theta[0, 1] - 1
        theta[1, 2] = theta[1, 2] * 2 / h + theta[1, 0] + theta[1, 1] - 1
    theta = torch.tensor(theta, dtype=torch.float32).unsqueeze(0)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=align_corners)
    if tensor.dtype == torch.float32:
        return F.grid_sample(tensor, grid, mode="nearest", align_corners=align_corners)
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).expand(n, 1, h, w)
    picked = F.grid_sample(index, grid, mode="nearest", align_corners=align_corners).long()
    flat = torch.cat([torch.zeros(n, c, 1, dtype=tensor.dtype), tensor.reshape(n, c, h * w)], 2)
    return flat.gather(2, picked.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def label_strong_T(label, params: dict, padding, scale: int = 1, align_corners: bool = False):
    """CustomModel.label_strong_T: (N, C, H, W) moved like the strong view; 0 -> padding."""
    label = label + 1
    for i in range(label.shape[0]):
        for form, param in params.items():
            if form == "Hflip" and param[i].item() == 1:
                label[i] = label[i].clone().flip(-1)
            elif form in AFFINE and param[i].item() != 1e4:
                v = param[i].item()
                v = int(v // scale) if form in ("TranslateX", "TranslateY") else v
                label[i : i + 1] = affine_sample(label[i : i + 1].clone(), v, form, align_corners)
            elif form == "CutoutAbs" and isinstance(param, list):
                x0, y0, x1, y1 = (int(param[j][i].item() // scale) for j in range(4))
                label[i, :, y0:y1, x0:x1] = 0
    label[label == 0] = padding + 1
    return label - 1


def full2weak(feat: torch.Tensor, weak_params: dict) -> torch.Tensor:
    """CustomModel.full2weak: per image resize (align_corners=True), crop, flip; all at 1/4."""
    out = []
    for i in range(feat.shape[0]):
        h, w = weak_params["RandomSized"][0][i], weak_params["RandomSized"][1][i]
        feat_ = F.interpolate(
            feat[i : i + 1], size=[int(h / 4), int(w / 4)], mode="bilinear", align_corners=True
        )
        y1, y2, x1, x2 = (weak_params["RandomCrop"][j][i] for j in range(4))
        y1, th, x1, tw = int(y1 / 4), int((y2 - y1) / 4), int(x1 / 4), int((x2 - x1) / 4)
        feat_ = feat_[:, :, y1 : y1 + th, x1 : x1 + tw]
        if weak_params["RandomHorizontallyFlip"][i]:
            feat_ = feat_.index_select(3, torch.arange(feat_.size(3) - 1, -1, -1))
        out.append(feat_)
    return torch.cat(out, 0)


# ----------------------------------------------------------------------------- losses


def cross_entropy2d(logits, target, ignore_index: int):
    """models/utils.py cross_entropy2d: mean CE over the non-ignored pixels."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")


def feat_prototype_distance(feat, objective_vectors, n_class: int):
    """(N, K, H, W): torch.norm(proto_k - feat) over channels, class by class."""
    n, _, h, w = feat.shape
    out = -torch.ones((n, n_class, h, w), dtype=feat.dtype)
    for i in range(n_class):
        out[:, i] = torch.norm(objective_vectors[i].reshape(-1, 1, 1).expand(-1, h, w) - feat,
                               2, dim=1)  # fmt: skip
    return out


def get_prototype_weight(feat, objective_vectors, weak_params, opt: Options):
    feat = full2weak(feat, weak_params)
    distance = feat_prototype_distance(feat, objective_vectors, opt.n_class)
    nearest, _ = distance.min(dim=1, keepdim=True)
    return F.softmax(-(distance - nearest) * opt.proto_temperature, dim=1)


def rce(pred, labels, opt: Options):
    """CustomModel.rce (``labels`` is modified, as the reference does, on a clone)."""
    pred = torch.clamp(F.softmax(pred, dim=1), min=1e-7, max=1.0)
    mask = (labels != opt.ignore_index).to(pred.dtype)
    labels[labels == opt.ignore_index] = opt.n_class
    one_hot = F.one_hot(labels, opt.n_class + 1).float()
    one_hot = torch.clamp(one_hot.permute(0, 3, 1, 2)[:, :-1], min=1e-4, max=1.0)
    return -(torch.sum(pred * torch.log(one_hot), dim=1) * mask).sum() / (mask.sum() + 1e-6)


def regular_loss(activation, kind: str):
    logp = F.log_softmax(activation, dim=1)
    if kind == "MRENT":
        p = F.softmax(activation, dim=1)
        return (p * logp).sum() / (p.shape[0] * p.shape[2] * p.shape[3])
    return -logp.sum() / (logp.shape[0] * logp.shape[1] * logp.shape[2] * logp.shape[3])


def calculate_mean_vector(feat_cls, outputs, n_class: int):
    """calculate_mean_vector(feat, outputs) without labels or threshold: (vectors, ids)."""
    probs = F.softmax(outputs, dim=1)
    mask = probs.max(dim=1, keepdim=True)[0].ge(-1)
    argmax = probs.argmax(dim=1, keepdim=True)
    pred = torch.zeros(argmax.shape[0], n_class + 1, *argmax.shape[2:], dtype=feat_cls.dtype)
    pred = pred.scatter_(1, argmax, 1)
    scale_factor = F.adaptive_avg_pool2d(pred * mask, 1)
    vectors, ids = [], []
    for n in range(feat_cls.size(0)):
        for t in range(n_class):
            if scale_factor[n][t].item() == 0 or (pred[n][t] > 0).sum() < 10:
                continue
            s = feat_cls[n] * pred[n][t] * mask[n]
            vectors.append(F.adaptive_avg_pool2d(s, 1) / scale_factor[n][t])
            ids.append(t)
    return vectors, ids


def update_objective_single_vector(objective_vectors, i: int, vector, momentum: float) -> None:
    """update_objective_SingleVector(..., start_mean=False): the moving average, in place."""
    if vector.sum().item() == 0:
        return
    objective_vectors[i] = objective_vectors[i] * (1 - momentum) + momentum * vector.squeeze()


# ------------------------------------------------------------------------------ steps


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _keep_grads(model, record):
    if record is not None:
        record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None}  # fmt: skip


@dataclasses.dataclass
class ProDAReference:
    """The models, the prototype table and the optimiser of one run; ``opt``: Options."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    opt: Options
    ema: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None
    objective_vectors: torch.Tensor | None = None

    def step(self, source_x, source_label, target_x, target_imageS, target_params,
             target_lpsoft, target_image_full, target_weak_params, record=None):  # fmt: skip
        """Stage 1 (``step`` with proto_rectify, ema, moving_prototype; S_pseudo 0)."""
        opt, ignore = self.opt, self.opt.ignore_index
        source_out = self.model(source_x)
        loss_gta = cross_entropy2d(_up(source_out["out"], source_x.shape[2:]), source_label,
                                   ignore)  # fmt: skip
        loss_gta.backward()

        threshold_arg = F.interpolate(target_lpsoft, scale_factor=0.25, mode="bilinear",
                                      align_corners=True)  # fmt: skip
        with torch.no_grad():
            ema_out = self.ema(target_image_full)
        full_quarter = (int(target_image_full.shape[2] / 4), int(target_image_full.shape[3] / 4))
        ema_out["feat"] = _up(ema_out["feat"], full_quarter)
        ema_out["out"] = _up(ema_out["out"], full_quarter)

        target_out = self.model(target_x)
        target_out["out"] = _up(target_out["out"], threshold_arg.shape[2:])
        target_out["feat"] = _up(target_out["feat"], threshold_arg.shape[2:])

        loss = torch.zeros(1, dtype=target_out["out"].dtype)
        batch, _, w, h = threshold_arg.shape
        weights = get_prototype_weight(ema_out["feat"], self.objective_vectors,
                                       target_weak_params, opt)  # fmt: skip
        rectified = weights * threshold_arg
        threshold_arg = rectified.max(1, keepdim=True)[1]
        rectified = rectified / rectified.sum(1, keepdim=True)
        argmax = rectified.max(1, keepdim=True)[0]
        threshold_arg[argmax < opt.train_thred] = ignore
        labels = threshold_arg.reshape([batch, w, h])

        loss_cts = cross_entropy2d(target_out["out"], labels, ignore)
        loss_ce = loss_cts
        loss_rce = rce(target_out["out"], labels.clone(), opt) if opt.rce else None
        if opt.rce:
            loss_cts = opt.rce_alpha * loss_cts + opt.rce_beta * loss_rce
        loss_regular = regular_loss(target_out["out"], opt.regular_type)
        if opt.regular_w > 0:
            loss_cts = loss_cts + loss_regular * opt.regular_w

        loss_consist = torch.zeros(1, dtype=loss.dtype)
        teacher_distance = None
        if opt.proto_consistW > 0:
            ema2weak = full2weak(ema_out["feat"], target_weak_params)
            distance = feat_prototype_distance(ema2weak, self.objective_vectors, opt.n_class)
            teacher_distance = label_strong_T(distance, target_params, DISTANCE_PADDING, 4,
                                              opt.align_corners)  # fmt: skip
            mask = (teacher_distance != DISTANCE_PADDING).to(loss.dtype)
            teacher = F.softmax(-teacher_distance * opt.proto_temperature, dim=1)
            strong_out = self.model(target_imageS)
            strong_feat = _up(strong_out["feat"], threshold_arg.shape[2:])
            strong_distance = feat_prototype_distance(strong_feat, self.objective_vectors,
                                                      opt.n_class)  # fmt: skip
            student = F.log_softmax(-strong_distance * opt.proto_temperature, dim=1)
            loss_consist = F.kl_div(student, teacher, reduction="none")
            loss_consist = (loss_consist * mask).sum() / mask.sum()
            loss = loss + opt.proto_consistW * loss_consist

        loss = loss + loss_cts
        loss.backward()
        _keep_grads(self.model, record)
        self.optimizer.step()
        self.optimizer.zero_grad()

        with torch.no_grad():
            vectors, ids = calculate_mean_vector(ema_out["feat"], ema_out["out"], opt.n_class)
            for t in range(len(ids)):
                update_objective_single_vector(self.objective_vectors, ids[t], vectors[t],
                                               opt.proto_momentum)  # fmt: skip
            self.ema_update()
        if record is not None:
            record.update(labels=labels.numpy().copy(), weights=weights.numpy(),
                          teacher_distance=None if teacher_distance is None
                          else teacher_distance.numpy(), prototype_ids=ids)  # fmt: skip
        return {
            "loss": loss.item(), "loss_source": loss_gta.item(), "loss_target": loss_cts.item(),
            "loss_consistency": loss_consist.item(), "loss_ce": loss_ce.item(),
            "loss_rce": None if loss_rce is None else loss_rce.item(),
            "loss_regular": loss_regular.item(),
        }  # fmt: skip

    @torch.no_grad()
    def ema_update(self, decay: float = 0.999) -> None:
        """Parameters averaged (0.999), buffers (BN statistics) copied from the student."""
        for param_q, param_k in zip(self.model.parameters(), self.ema.parameters(), strict=True):
            param_k.data = param_k.data.clone() * decay + param_q.data.clone() * (1.0 - decay)
        for buffer_q, buffer_k in zip(self.model.buffers(), self.ema.buffers(), strict=True):
            buffer_k.data = buffer_q.data.clone()

    def step_distillation(self, source_x, source_label, target_x, target_imageS,
                          target_params, target_lp, record=None):  # fmt: skip
        """Stages 2 and 3 (``step_distillation``; the teacher in eval mode)."""
        opt, ignore = self.opt, self.opt.ignore_index
        source_out = self.model(source_x)
        loss_gta = cross_entropy2d(_up(source_out["out"], source_x.shape[2:]), source_label,
                                   ignore)  # fmt: skip
        loss_gta.backward()

        threshold_arg = F.interpolate(target_lp.unsqueeze(1).float(), scale_factor=0.25).long()
        if opt.S_pseudo > 0:
            threshold_arg = label_strong_T(threshold_arg.clone().float(), target_params, ignore,
                                           4, opt.align_corners).to(torch.int64)  # fmt: skip
            target_out = self.model(target_imageS)
        else:
            target_out = self.model(target_x)
        target_out["out"] = _up(target_out["out"], threshold_arg.shape[2:])
        batch, _, w, h = threshold_arg.shape
        labels = threshold_arg.reshape([batch, w, h])
        loss = cross_entropy2d(target_out["out"], labels, ignore)
        loss_ce = loss
        if opt.rce:
            loss = opt.rce_alpha * loss + opt.rce_beta * rce(target_out["out"], labels.clone(), opt)
        loss_kd = torch.zeros(1, dtype=loss.dtype)
        if opt.distillation > 0:
            student = F.softmax(target_out["out"], dim=1)
            with torch.no_grad():
                teacher_out = self.teacher(target_imageS)
                teacher = F.softmax(_up(teacher_out["out"], threshold_arg.shape[2:]), dim=1)
            loss_kd = F.kl_div(student, teacher, reduction="none")
            mask = (teacher != 250).to(loss.dtype)
            loss_kd = (loss_kd * mask).sum() / mask.sum()
            loss = loss + opt.distillation * loss_kd
        loss.backward()
        _keep_grads(self.model, record)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if record is not None:
            record["labels"] = labels.numpy().copy()
        return {"loss_source": loss_gta.item(), "loss": loss.item(), "loss_ce": loss_ce.item(),
                "loss_kd": loss_kd.item()}  # fmt: skip


class SGD1x(torch.optim.Optimizer):
    """PyTorch 1.x's ``SGD.step`` (no dampening, no Nesterov), which ProDA's stages 2/3 ran
    with a 1x group that lists nested parameters several times (``get_1x_lr_params``): each
    listing steps the parameter again, weight decay added to a copy of its gradient, through
    the one momentum buffer (today's SGD keeps one buffer per listing in the first step)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(d_p)
                p.add_(buf, alpha=-group["lr"])


def make_sgd(groups: list, lr: float) -> torch.optim.SGD:
    """CustomModel's optimiser: SGD(lr, weight_decay 2e-4, momentum 0.9). ``groups``: the
    parameter lists with their lr multipliers, [(params, 1)] (stage 1: ``parameters()``) or
    [(1x params, 1), (10x params, 10)] (``--finetune``)."""
    return torch.optim.SGD(
        [{"params": list(params), "lr": lr * mult} for params, mult in groups],
        lr=lr, weight_decay=2e-4, momentum=0.9,
    )  # fmt: skip


# ------------------------------------------------------------------ batch conversions


def weak_params(resized: np.ndarray, origin: np.ndarray, flip: np.ndarray, crop_size) -> dict:
    """The reference's collated ``weak_params`` from (h, w) resized, (y1, x1) crop origins and
    flips; ``crop_size`` (th, tw) of the weak crop."""
    th, tw = crop_size
    y1, x1 = (torch.from_numpy(np.asarray(origin[:, j], np.int64)) for j in range(2))
    return {
        "RandomSized": tuple(torch.from_numpy(np.asarray(resized[:, j], np.int64))
                             for j in range(2)),
        "RandomCrop": (y1, y1 + th, x1, x1 + tw),
        "RandomHorizontallyFlip": torch.from_numpy(np.asarray(flip, bool)),
    }  # fmt: skip


def strong_params(params: dict) -> dict:
    """The reference's collated RandAugmentMC ``params`` (dict order matters) from ours."""
    out = {"Hflip": torch.from_numpy(np.asarray(params["hflip"], bool))}
    for ours, theirs in zip(("shear_x", "shear_y", "translate_x", "translate_y", "rotate"),
                            AFFINE, strict=True):  # fmt: skip
        out[theirs] = torch.from_numpy(np.asarray(params[ours], np.float32))
    cutout = np.asarray(params["cutout"], np.int64)
    out["CutoutAbs"] = [torch.from_numpy(cutout[:, j].copy()) for j in range(4)]
    return out

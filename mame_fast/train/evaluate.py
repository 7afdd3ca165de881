"""Stage 4c: metrics of a model over a loader, summed over ranks: what validation and the test set both report."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import Runtime


@torch.no_grad()
def evaluate(model, loader, rt: Runtime, num_classes: int, epoch: int = 0) -> dict:
    """Loss, top-1, top-5, balanced accuracy, per-class accuracy and confusion matrix over the loader's real rows."""
    was = model.training
    model.eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=rt.device)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, top5 correct, count
    for b in loader.epoch(epoch):
        with rt.autocast():
            logits = model(b.images, b.sizes if b.padded else None)[: b.real].float()
        labels = b.labels[: b.real]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.topk(min(5, num_classes), -1).indices == labels[:, None]).any(-1).sum()
        sums[2] += b.real
        # index_add_, not bincount: bincount sizes its output from the data, a host sync per batch.
        conf.index_add_(0, labels * num_classes + logits.argmax(-1), torch.ones_like(labels, dtype=conf.dtype))
    rt.all_reduce(conf, sums)
    model.train(was)
    conf = conf.view(num_classes, num_classes).cpu().numpy()
    n = sums[2].item()
    support = conf.sum(1)
    per_class = np.divide(np.diag(conf), support, out=np.full(num_classes, np.nan), where=support > 0)
    return {
        "loss": sums[0].item() / n,
        "top1": float(np.trace(conf) / n),
        "top5": sums[1].item() / n,
        "balanced_acc": float(np.nanmean(per_class)),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "confusion": conf.astype(int).tolist(),
        "count": int(n),
    }

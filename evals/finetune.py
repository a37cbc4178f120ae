"""Fine-tuning: a linear classification head on the average-pooled final-norm output, trained jointly
with the generative loss (iGPT's L = L_clf + λ·L_gen; a patch model's in raster order), early stopping on
validation accuracy."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igpt.evals.inputs import EvalInputError
from igpt.pretrain.models import Model


class Classifier(nn.Module):
    """iGPT (or patch model) body + linear head on the average-pooled ln_f output (hidden state n_layer)."""

    def __init__(self, body: Model, num_classes: int):
        super().__init__()
        if body.cfg.objective != "ar":
            raise EvalInputError(
                f"finetune needs an autoregressive model; this one has objective={body.cfg.objective!r}"
            )
        self.body = body
        self.head = nn.Linear(body.cfg.n_embd, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits (B, C), generative loss: mean nats/token, or a patch model's ``loss``)."""
        out = self.body(tokens, return_hidden=True)
        pooled = out.hidden_states[-1].mean(dim=1)
        if self.body.cfg.unit == "patch":
            gen = self.body.output_losses(out.logits, tokens).mean()
        else:
            gen = F.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten())
        return self.head(pooled).float(), gen


@dataclass
class FinetuneHistory:
    """Per-epoch metrics and the validation predictions of the best epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    best_val_pred: np.ndarray | None = None


@torch.no_grad()
def predict(clf: Classifier, tokens: Tensor, batch_size: int, device: torch.device | str) -> np.ndarray:
    """Predicted class of every row of ``tokens``."""
    clf.eval()
    preds = [clf(tokens[i : i + batch_size].to(device).long())[0].argmax(1).cpu()
             for i in range(0, len(tokens), batch_size)]
    return torch.cat(preds).numpy()


def finetune(
    model: Model,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    *,
    lr: float = 3e-4,
    lam: float = 0.5,
    max_epochs: int = 10,
    patience: int = 3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[dict[str, float], FinetuneHistory], None] | None = None,
) -> FinetuneHistory:
    """Train ``model`` + head for up to ``max_epochs`` on (tokens, labels), keeping the best validation epoch.

    Stops after ``patience`` epochs without a new best validation accuracy. ``on_epoch`` receives
    each epoch's metrics (e.g. to report them to Ray Tune, which may stop the trial)."""
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise EvalInputError("finetune needs non-empty train and validation splits")
    torch.manual_seed(seed)
    clf = Classifier(model, num_classes).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = FinetuneHistory()
    stale = 0
    for epoch in range(1, max_epochs + 1):
        clf.train()
        t0, sums, n = time.perf_counter(), {"clf": 0.0, "gen": 0.0}, 0
        order = torch.randperm(len(train[0]), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            tokens, labels = train[0][idx].to(device).long(), train[1][idx].to(device).long()
            logits, l_gen = clf(tokens)
            l_clf = F.cross_entropy(logits, labels)
            loss = l_clf + lam * l_gen if lam else l_clf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["clf"] += l_clf.item() * len(idx)
            sums["gen"] += l_gen.item() * len(idx)
            n += len(idx)
        pred = predict(clf, val[0], batch_size, device)
        val_acc = float((pred == val[1].numpy()).mean())
        metrics = {
            "epoch": epoch, "val_acc": val_acc, "train_clf_loss": sums["clf"] / n,
            "train_gen_loss": sums["gen"] / n, "epoch_seconds": time.perf_counter() - t0,
        }
        history.epochs.append(metrics)
        if val_acc > history.best_val_acc:
            history.best_val_acc, history.best_epoch, history.best_val_pred = val_acc, epoch, pred
            stale = 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(metrics, history)
        if stale >= patience:
            break
    return history

"""Linear probe: multinomial logistic regression fitted full-batch with L-BFGS and an L2 penalty.

The objective is mean cross-entropy + (l2 / 2)·‖W‖² (bias unpenalised), the same as
scikit-learn's LogisticRegression with C = 1 / (l2 · n_train). Features are standardised with
the training split's mean and standard deviation before fitting.

``widen_l2`` grows an L2 grid until its best value is interior: while the best accuracy lies at an edge,
the next value one grid step past that edge is tried.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from igpt.errors import UserError


@dataclass
class Standardizer:
    """Per-feature affine map fitted on the training features."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 1e-6) -> "Standardizer":
        return cls(x.mean(0), x.std(0, unbiased=False).clamp_min(eps))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class LinearProbe:
    """A fitted probe: standardiser + linear classifier."""

    scaler: Standardizer
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    train_loss: float
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scaler(x.to(self.weight.device, self.weight.dtype))
        return x @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Accuracy and mean cross-entropy (nats) on (x, y)."""
        logits = self.logits(x)
        y = y.to(logits.device)
        return {
            "accuracy": (logits.argmax(1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item(),
        }


def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(a)
    return t.to(device=device, dtype=dtype)


def fit_probe(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    l2: float,
    num_classes: int | None = None,
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LinearProbe:
    """Fit a multinomial logistic regression on standardised features with full-batch L-BFGS."""
    if l2 < 0:
        raise UserError(f"l2 penalty must be >= 0, got {l2}")
    x = _as_tensor(x, device, dtype)
    y = _as_tensor(y, device, torch.long)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0:
        raise UserError("cannot fit a probe on zero examples")
    num_classes = int(num_classes if num_classes is not None else y.max().item() + 1)
    scaler = Standardizer.fit(x)
    xs = scaler(x)
    weight = torch.zeros(num_classes, x.shape[1], device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return F.cross_entropy(xs @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = objective().item()
    iterations = opt.state[opt._params[0]].get("n_iter", 0)
    return LinearProbe(scaler, weight.detach(), bias.detach(), final, int(iterations))


def widen_l2(accuracy: dict[float, float]) -> float | None:
    """The L2 to try next when the best of ``accuracy`` (L2 → accuracy) lies at an edge of its grid: one step of
    the grid's edge ratio past that edge. The low edge counts only when strictly better than its neighbour
    (equal values there are the unregularised limit: smaller ones change nothing); the high edge also when
    equal (a flat stretch before the optimum). None when the best is interior, the edge is 0 or the grid has
    a single value."""
    grid = sorted(accuracy)
    if len(grid) < 2:
        return None
    best = max(accuracy.values())
    low, high = grid[0], grid[-1]
    if accuracy[low] == best and accuracy[low] > accuracy[grid[1]] and low > 0:
        return float(f"{low * low / grid[1]:.6g}")
    if accuracy[high] == best and grid[-2] > 0:
        return float(f"{high * high / grid[-2]:.6g}")
    return None

"""A TopK sparse autoencoder (Gao et al., 2024) on residual-stream activations.

.. math::

    f(x) = \\operatorname{TopK}_k\\big(\\operatorname{ReLU}(W_{enc}(x/s - b_{dec}) + b_{enc})\\big),
    \\qquad \\hat x = s\\,(W_{dec}^\\top f(x) + b_{dec}),

with unit-norm decoder rows (one direction per feature) and a fixed input scale ``s``
making the mean squared norm of ``x/s`` equal to the width.  Trained with Adam on the mean
squared reconstruction error; the reported error is the fraction of variance unexplained,
``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["TopKSAE", "train_sae"]

_FORMAT = "certattn-topk-sae-1"


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder of width ``width`` on ``d``-dimensional activations.

    Parameters
    ----------
    d, width, k : int
        Input size, number of features, features active per input.
    scale : float
        Input scale ``s`` (see the module docstring).
    meta : dict
        Provenance kept with the weights (model identity, layer, corpus).
    """

    def __init__(self, d: int, width: int, k: int, *, scale: float = 1.0,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0 < k <= width:
            raise InputError(f"k must be in [1, width={width}], got {k}")
        self.k, self.scale = int(k), float(scale)
        self.meta = dict(meta or {})
        w = torch.randn(width, d) / d**0.5
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    @property
    def width(self) -> int:
        return int(self.W_dec.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f(x)``, shape ``(..., width)``, ``k`` nonzero per row."""
        pre = torch.relu((x / self.scale - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def direction(self, feature: int) -> torch.Tensor:
        """Unit decoder direction of one feature, in activation space."""
        if not 0 <= feature < self.width:
            raise InputError(f"feature {feature} is outside [0, {self.width})")
        return self.W_dec[feature].detach().clone()

    @torch.no_grad()
    def unexplained(self, x: torch.Tensor) -> float:
        """Fraction of variance unexplained on ``x``."""
        err = (x - self(x)).pow(2).sum()
        return float(err / (x - x.mean(0)).pow(2).sum())

    def save(self, path: str | Path) -> Path:
        """Write the weights and provenance (``.safetensors``)."""
        from safetensors.torch import save_file

        path = Path(path)
        info = {"format": _FORMAT, "k": self.k, "scale": self.scale, "meta": self.meta}
        save_file({n: p.detach().contiguous() for n, p in self.named_parameters()}, str(path),
                  metadata={"certattn": json.dumps(info)})
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: Any = None) -> TopKSAE:
        """Read a saved SAE; with ``model``, refuse one trained on another model."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as st:
                info = json.loads((st.metadata() or {}).get("certattn", "{}"))
                tensors = {n: st.get_tensor(n) for n in st.keys()}
        except Exception as exc:
            raise InputError(f"{path}: cannot read an SAE ({exc.__class__.__name__})") from None
        want = {"W_dec", "W_enc", "b_enc", "b_dec"}
        if info.get("format") != _FORMAT or set(tensors) != want:
            raise InputError(f"{path}: not a certattn SAE file")
        width, d = tensors["W_dec"].shape
        sae = cls(d, width, int(info["k"]), scale=float(info["scale"]), meta=info.get("meta"))
        with torch.no_grad():
            for n, t in tensors.items():
                getattr(sae, n).copy_(t)
        if model is not None:
            from ..hf._calibrate import fingerprint

            mine, theirs = sae.meta.get("model"), fingerprint(model)
            if mine != theirs:
                raise InputError(f"{path}: trained on model {mine}, not on {theirs}")
        return sae


def train_sae(acts: np.ndarray | torch.Tensor, width: int, k: int, *, steps: int = 2000,
              batch: int = 1024, lr: float = 1e-3, seed: int = 0,
              meta: dict[str, Any] | None = None) -> tuple[TopKSAE, list[float]]:
    """Train a :class:`TopKSAE` on activations ``(N, d)``.

    Adam at ``lr``, decaying linearly to 0 over the last fifth of the steps (the error
    of a TopK SAE jumps now and then at a constant rate; the decay ends on a settled
    one), gradients clipped to norm 1.

    Returns the SAE and the fraction of variance unexplained on the training set,
    before training and after every tenth of the steps.
    """
    x = torch.as_tensor(np.asarray(acts, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"activations must be (N >= 2, d), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("activations contain NaN or infinity")
    torch.manual_seed(seed)
    d = x.shape[1]
    scale = float((x.pow(2).sum(1).mean() / d).sqrt()) or 1.0
    sae = TopKSAE(d, width, k, scale=scale, meta=meta)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0) / scale)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, 5.0 * (1.0 - i / steps)))
    gen = torch.Generator().manual_seed(seed)
    history = [sae.unexplained(x)]
    for step in range(1, steps + 1):
        xb = x[torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)]
        loss = ((sae(xb) - xb) / scale).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # keep decoder rows unit-norm (features are directions)
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if step % max(1, steps // 10) == 0:
            history.append(sae.unexplained(x))
    return sae, history

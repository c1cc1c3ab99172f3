"""The networks of the energy-based score model (score flow) on flat latents x [B, D].

    flow       MLP of [c_in x, sigma embedding, condition embedding] -> F [B, D]
               (input width D + sigma_embed_dim + cond_embed_dim; the condition part is absent
               for an unconditional model)
    energy     E(x, sigma, c) = 1/2 || c_in x - F / sigma ||^2  [B],   c_in = 1 / sqrt(sigma^2 + 1)
    score      -grad_x E by autograd (create_graph=True while training, so the loss reaches F's
               parameters through the gradient)
    projector  MLP of [sigma * score, sigma embedding, condition embedding] (the same widths as the
               flow's input: the condition embedding included) -> a correction, added as
               refined = score + projector(...) / sigma; its last layer starts at zero, so a new
               model's refined score is exactly the energy's.

Why this energy: if F's Jacobian is neglected, sigma^2 * score = sigma c_in F - sigma^2 c_in^2 x,
i.e. x + sigma^2 score is EDM's preconditioned denoiser c_skip x + c_out F (for unit-variance data),
so F has unit scale at every noise level, and with F = 0 the score is -x / (sigma^2 + 1), the exact
score of N(0, I) data seen through noise sigma.

sigma is embedded as sinusoidal(SIGMA_SCALE * ln sigma) through a two-layer MLP (ln sigma in
[-6.2, 4.4] becomes angles up to ~1000, the range the sinusoid resolves); the condition is a class
row with a NULL row for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.embeddings import ClassEmbedding, TimestepEmbedding

SIGMA_SCALE = 250.0  # EDM's c_noise = ln(sigma) / 4, times the 1000 the sinusoidal embedding wants


def mlp(in_features: int, hidden: int, out_features: int, depth: int) -> nn.Sequential:
    """Linear -> SiLU, `depth` hidden layers, then a Linear to out_features. SiLU is smooth: the score
    is a gradient, and training differentiates it again."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class ScoreFlowNetwork(nn.Module):
    def __init__(self, data_dim: int, hidden: int = 512, depth: int = 3, sigma_embed_dim: int = 128,
                 num_classes: int = 0, cond_embed_dim: int = 128, projector_hidden: int = 256):
        super().__init__()
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.sigma_embedding = TimestepEmbedding(sigma_embed_dim, sigma_embed_dim)
        self.cond_embed_dim = cond_embed_dim if num_classes > 0 else 0
        self.class_embedding = ClassEmbedding(num_classes, cond_embed_dim) if num_classes > 0 else None
        context_dim = sigma_embed_dim + self.cond_embed_dim
        self.flow = mlp(data_dim + context_dim, hidden, data_dim, depth)
        self.score_projector = mlp(data_dim + context_dim, projector_hidden, data_dim, 1)
        nn.init.zeros_(self.score_projector[-1].weight)
        nn.init.zeros_(self.score_projector[-1].bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def context(self, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """[sigma embedding, condition embedding] [B, sigma_embed_dim + cond_embed_dim]."""
        parts = [self.sigma_embedding(SIGMA_SCALE * sigma.log())]
        if self.class_embedding is not None:
            parts.append(self.class_embedding(labels, sigma.shape[0], sigma.device))
        return torch.cat(parts, dim=1)

    def energy(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
               context: torch.Tensor | None = None) -> torch.Tensor:
        """E(x, sigma, c) [B] for x [B, D], sigma [B] > 0."""
        context = self.context(sigma, labels) if context is None else context
        c_in = (sigma.square() + 1).rsqrt()[:, None]
        flow = self.flow(torch.cat([c_in * x, context], dim=1))
        return 0.5 * (c_in * x - flow / sigma[:, None]).square().sum(dim=1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
              create_graph: bool = False, context: torch.Tensor | None = None) -> torch.Tensor:
        """-grad_x E [B, D]. With create_graph the result stays differentiable in the parameters (and
        in x): training needs that; sampling does not."""
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = self.energy(x, sigma, labels, context)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        return -grad

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                create_graph: bool = False) -> torch.Tensor:
        """The refined score [B, D] (see the module doc)."""
        context = self.context(sigma, labels)
        score = self.score(x, sigma, labels, create_graph, context)
        correction = self.score_projector(torch.cat([sigma[:, None] * score, context], dim=1))
        return score + correction / sigma[:, None]

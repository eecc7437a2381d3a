"""Quickstart: the original seed example of Disco, on CPU, with a tiny TorchTitan-named model.

Run it with ``python examples/quickstart.py``. It routes the parameters with ``create_disco_param_groups``,
builds ``Disco`` with exactly the seed's keyword arguments (``.cuda()`` dropped), trains a few steps on random
tokens and prints the loss and the tracked norms of the last step.
"""

from __future__ import annotations

import torch
from torch import nn

from disco import Disco, create_disco_param_groups
from disco.dummy_parallel_dims import DummyParallelDims


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = nn.RMSNorm(dim)
        self.feed_forward = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TinyTransformer(nn.Module):
    """A llama-style model with TorchTitan's parameter names (``tok_embeddings``, ``layers.N.attention.wq``,
    ``norm``, ``output``)."""

    def __init__(self, vocab: int = 64, dim: int = 32, n_layers: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, n_heads) for i in range(n_layers)})
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x))


def main(steps: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyTransformer()  # the seed example calls .cuda() here; dropped on CPU

    # --- the seed example, as written -------------------------------------------------------------------
    optimizer_kwargs = {
        "parallel_dims": DummyParallelDims(), "is_light": False, "weight_decay": 0.0, "lr": 1e-2,
        "momentum": 0.1, "nesterov": False, "eps": 1e-20, "norm_factor": "spectral",
        "backend": "newtonschulz5", "backend_steps": 5,
        "extra_param_group_split_rules": [
            {"str_match": "tok_embeddings.weight", "lr": 1e-2, "norm_factor": "embed_sqrt", "backend": "identity"},
            {"str_match": "output.weight", "lr": 1e-2, "norm_factor": "unembed_sqrt", "backend": "identity"},
        ],
        "name_of_embedding": "tok_embeddings",
    }  # fmt: skip
    params, cleaned = create_disco_param_groups(model, optimizer_kwargs)
    opt = Disco(params, **cleaned)
    # ------------------------------------------------------------------------------------------------------

    tokens = torch.randint(0, 64, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    norms: dict[str, torch.Tensor] = {}
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        if step == steps - 1:
            opt.calculate_norm_at_next_step()  # track parameter and update norms on the last step
        opt.step()
        opt.zero_grad()
        print(f"step {step}  loss {loss.item():.4f}")
    norms = opt.get_norms_at_current_step()
    for key, value in sorted(norms.items()):
        print(f"{key:60s} {value.item():.4g}")
    return norms


if __name__ == "__main__":
    main()

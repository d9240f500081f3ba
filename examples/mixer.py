"""A small MLP-Mixer (Tolstikhin et al. 2021) in plain PyTorch, for `pxcompile examples/mixer.py`.

64x64 images, 4x4 patches (256 tokens), hidden 256, token MLP 128, channel MLP 1024, depth 4.
"""

import torch
from torch import nn


class MlpBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = MlpBlock(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = MlpBlock(dim, channel_hidden)

    def forward(self, x):  # x: [batch, tokens, dim]
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(
        self, image=64, patch=4, dim=256, depth=4, token_hidden=128, channel_hidden=1024, classes=10
    ):
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.stem(images).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


torch.manual_seed(0)
model = Mixer()


def example_inputs():
    return (torch.randn(8, 3, 64, 64),)

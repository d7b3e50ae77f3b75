"""Token merging (ToMe for SD, Bolya & Hoffman 2023): the UNet's self-attention at its largest size runs on fewer
tokens. Similar tokens are averaged before the attention and copied back after it, so the attention's cost, which
grows with the square of the token count, falls fastest at large picture sizes.

Written here because the `tomesd` package patches diffusers by copying an old `BasicTransformerBlock.forward`, which
current diffusers no longer matches; this stands in for the self-attention modules' `forward` only. Its choices are
A1111's (tomesd with use_rand=False, merge_attn only): self-attention only, 2x2 cells, each cell's top-left token
kept (no randomness, so a seed repeats), tokens matched on the transformer block's input, and the ratio written as
"Token merging ratio" in the picture's text. One difference: tomesd merges only at the full latent size
(max_downsample=1), where SDXL has no attention, so A1111's SDXL pictures merge nothing; sdkit merges at SDXL's
largest attention (half the latent), where the time goes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError
from sdkit.standins import StandIns

if TYPE_CHECKING:
    import torch

MAX_RATIO = 0.75  # with one kept token per 2x2 cell, at most 3 of every 4 tokens can merge (a higher ratio, which
# A1111 allows, merges no more at even sizes: `matching` caps it as tomesd does)


def matching(metric: torch.Tensor, *, height: int, width: int, ratio: float) -> tuple[Callable, Callable]:
    """merge and unmerge functions for tokens laid out height x width: each of `ratio` x N tokens is averaged into
    the most similar kept token (one kept per 2x2 cell, the top-left one); unmerge copies the result back."""
    import torch  # here, not at the top: generate imports this module and stays quick to import

    batch, count, _ = metric.shape
    rows, cols = height // 2, width // 2
    merges = min(int(count * ratio), count - rows * cols)
    if merges <= 0 or rows * cols == 0:  # a picture one token high or wide has no 2x2 cell to merge into
        return (lambda x: x), (lambda x: x)
    # Which tokens are kept (dst) and which may merge (src): the top-left of each 2x2 cell is kept, the rest and any
    # odd last row or column may merge.
    grid = torch.ones(height, width, dtype=torch.bool, device=metric.device)
    grid[: rows * 2 : 2, : cols * 2 : 2] = False
    order = torch.argsort(grid.flatten().to(torch.int8), stable=True)  # kept tokens first, in raster order
    kept, mergeable = order[: rows * cols], order[rows * cols :]
    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True)
        scores = normed[:, mergeable] @ normed[:, kept].transpose(-1, -2)
        best, partner = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        stays, goes = ranked[:, merges:], ranked[:, :merges]  # indices into `mergeable`
        target = partner[..., None].gather(1, goes)  # indices into `kept`

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        src, dst = x[:, mergeable], x[:, kept]
        unmerged = src.gather(1, stays.expand(-1, -1, channels))
        moved = src.gather(1, goes.expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, target.expand(-1, -1, channels), moved, reduce="mean")
        return torch.cat([unmerged, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        channels, left = x.shape[-1], stays.shape[1]
        unmerged, dst = x[:, :left], x[:, left:]
        out = x.new_empty(batch, count, channels)
        out[:, kept] = dst
        out.scatter_(1, mergeable[stays].expand(-1, -1, channels), unmerged)
        out.scatter_(1, mergeable[goes].expand(-1, -1, channels), dst.gather(1, target.expand(-1, -1, channels)))
        return out

    return merge, unmerge


def _attention_levels(unet) -> list[tuple[int, torch.nn.Module]]:
    """(downsampling factor, transformer block) for each of the UNet's diffusers BasicTransformerBlocks."""
    found = []
    blocks = [(2**i, block) for i, block in enumerate(unet.down_blocks)]
    last = len(unet.up_blocks) - 1
    blocks += [(2**last, unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(2 ** (last - i), block) for i, block in enumerate(unet.up_blocks)]
    for factor, block in blocks:
        for module in block.modules():
            if hasattr(module, "attn1") and hasattr(module, "attn2"):  # diffusers' BasicTransformerBlock
                found.append((factor, module))
    return found


class TokenMerging:
    """Token merging on a UNet's self-attention at its largest attention size (SD1: the full latent, SDXL: half)."""

    def __init__(self, unet, *, ratio: float) -> None:
        levels = _attention_levels(unet)
        if not levels:
            raise SdkitError("Token merging needs a UNet with self-attention; this one has none.",
                             fix="set token_merging=0 for this model")
        self.unet, self.ratio = unet, ratio
        self.factor = min(factor for factor, _ in levels)
        self.blocks = [block for factor, block in levels if factor == self.factor]
        self.size = (0, 0)
        self.tokens: dict[int, torch.Tensor] = {}  # per block: its input, which decides the matching (as in tomesd)

    def _before(self, _module, args, kwargs) -> None:
        """Note the latent's height and width before each UNet call."""
        sample = args[0] if args else kwargs["sample"]
        self.size = tuple(sample.shape[-2:])

    def _block_input(self, index: int):
        """A pre-hook keeping the block's input: tomesd matches tokens on it, before the block's norm."""

        def keep(_module, args, kwargs) -> None:
            self.tokens[index] = args[0] if args else kwargs["hidden_states"]

        return keep

    def _stand_in(self, index: int, forward):
        """The self-attention's forward on merged tokens."""

        def run(hidden_states, *args, **kwargs):
            height, width = (math.ceil(side / self.factor) for side in self.size)
            metric = self.tokens.pop(index, None)
            if (hidden_states.ndim != 3 or height * width != hidden_states.shape[1] or kwargs.get("attention_mask")
                    is not None or metric is None or metric.shape != hidden_states.shape):
                return forward(hidden_states, *args, **kwargs)
            merge, unmerge = matching(metric, height=height, width=width, ratio=self.ratio)
            return unmerge(forward(merge(hidden_states), *args, **kwargs))

        return run

    def __enter__(self) -> "TokenMerging":
        self._hooks = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True)]
        self._stand_ins = StandIns()
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block_input(index), with_kwargs=True))
            self._stand_ins.replace(block.attn1, lambda forward, index=index: self._stand_in(index, forward))
        return self

    def __exit__(self, *_exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._stand_ins.restore()
        self.tokens.clear()


def token_merging(unet, *, ratio: float) -> TokenMerging | contextlib.nullcontext:
    """Token merging on `unet` for the duration (nothing when ratio is 0)."""
    return TokenMerging(unet, ratio=ratio) if ratio > 0 else contextlib.nullcontext()

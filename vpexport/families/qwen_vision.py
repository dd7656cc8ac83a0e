"""Qwen2-VL / Qwen2.5-VL vision graph (torch) for one fixed image size, static for ONNX export.

Hugging Face's vision tower (`model.model.visual`) takes the processor's flattened patches of all
images as one sequence and derives everything else from `grid_thw` at run time: 2-D rotary
positions, `cu_seqlens` (one attention segment per image, split with `.tolist()`), and for
Qwen2.5-VL the window permutation and window segments. For one fixed (H, W) all of that is a
constant, so `QwenVisionGraph` computes it once at construction and keeps the batch as a real axis:

    (B, 3, H, W) -> Conv2d patch embedding -> (B, gh*gw, D) in HF's patch order
    [Qwen2.5: permute merged units into window order]
    blocks: norm -> attention over the image (Qwen2.5: within each window, except in
            `fullatt_block_indexes`) with 2-D RoPE -> residual -> norm -> MLP -> residual
    merger: norm, group merge_size^2 consecutive patches, MLP -> (B, N, text hidden)
    [Qwen2.5: undo the window permutation]

The HF submodules' weights are used in place (their Linear / norm / MLP modules are called); only
the patch embedding, attention and the sequence bookkeeping are written here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def grid_for(image_size: tuple[int, int], patch_size: int, merge_size: int) -> tuple[int, int, int]:
    """(1, gh, gw): the `image_grid_thw` row of a still image of `image_size` (H, W) pixels.
    ValueError when H or W is not a multiple of patch_size * merge_size (the processor only
    produces such sizes, and the merger needs whole merge_size x merge_size blocks)."""
    h, w = (int(s) for s in image_size)
    factor = patch_size * merge_size
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise ValueError(
            f"image size {h}x{w} must be a positive multiple of {factor} (patch_size {patch_size} * "
            f"merge_size {merge_size}) in both height and width"
        )
    return 1, h // patch_size, w // patch_size


def hf_pixel_values(images_chw: np.ndarray | torch.Tensor, patch_size: int, temporal_patch_size: int,
                    merge_size: int) -> np.ndarray | torch.Tensor:
    """(B, C, H, W) normalized images -> (B*gh*gw, C*temporal_patch_size*patch_size^2), the layout
    `Qwen2VLImageProcessorPil` returns as `pixel_values`: per image, patches ordered row-major over
    merge_size x merge_size blocks and row-major within a block, each patch flattened as
    (C, t, ps, ps) with the still image repeated `temporal_patch_size` times. A numpy input gives a
    float32 numpy array (as the processor), a tensor a tensor of its dtype."""
    b, c, h, w = images_chw.shape
    _, gh, gw = grid_for((h, w), patch_size, merge_size)
    m, p, t = merge_size, patch_size, temporal_patch_size
    blocks = (b, c, gh // m, m, p, gw // m, m, p)
    order = (0, 2, 5, 3, 6, 1, 4, 7)  # -> (B, gh/m, gw/m, m, m, C, ps, ps)
    if isinstance(images_chw, torch.Tensor):
        x = images_chw.reshape(blocks).permute(order).unsqueeze(6)
        x = x.expand(*x.shape[:6], t, *x.shape[7:])
    else:
        x = np.asarray(images_chw, dtype=np.float32).reshape(blocks).transpose(order)[:, :, :, :, :, :, None]
        x = np.broadcast_to(x, (*x.shape[:6], t, *x.shape[7:]))
    return x.reshape(b * gh * gw, c * t * p * p)


def image_from_patches(flat: torch.Tensor, batch: int, h: int, w: int, patch_size: int, temporal_patch_size: int,
                       merge_size: int) -> torch.Tensor:
    """The inverse of `hf_pixel_values` for still images: the processor's flattened patches
    (B*gh*gw, C*t*ps*ps) -> (B, C, H, W), from the first of the t identical temporal frames."""
    _, gh, gw = grid_for((h, w), patch_size, merge_size)
    m, p, t = merge_size, patch_size, temporal_patch_size
    c = flat.shape[-1] // (t * p * p)
    x = flat.reshape(batch, gh // m, gw // m, m, m, c, t, p, p)[:, :, :, :, :, :, 0]
    # (B, gh/m, gw/m, m, m, C, ps, ps) -> (B, C, gh/m, m, ps, gw/m, m, ps)
    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(batch, c, h, w).contiguous()


def exact_size_kwargs(h: int, w: int) -> dict:
    """Image-processor call arguments under which an image already H x W stays H x W: a pixel
    budget of exactly H*W (min = max) leaves `smart_resize` no other multiple of patch x merge.
    Images of another aspect ratio get another grid from it, so callers stretch to H x W first."""
    return {"size": {"shortest_edge": h * w, "longest_edge": h * w}}


def preprocess_config(image_processor, image_size: tuple[int, int]) -> dict:
    """The runtime preprocessing (vpexport/runtime/preprocess.py) of a Qwen2-VL image processor
    for the fixed `image_size` (H, W): convert to RGB, resize to exactly H x W with the
    processor's resample filter, rescale, normalize (no crop; the patch flattening is in the graph).

    The HF processor has no fixed-size mode: it resizes each image to `smart_resize(h, w)`, the
    multiple of 28 nearest the image's own aspect ratio within [min_pixels, max_pixels]. With
    `size={"shortest_edge": H*W, "longest_edge": H*W}` (i.e. min_pixels = max_pixels = H*W) it
    resizes every image whose aspect ratio is H:W (to within the 28-pixel rounding, e.g. H x W
    itself, 2H x 2W, H/2 x W/2, or H+-13 x W+-13) to exactly H x W, and then both agree; other
    images this static graph stretches to H x W where HF would pick another grid."""
    from vpexport.runtime.preprocess import processor_config

    grid_for(image_size, image_processor.patch_size, image_processor.merge_size)
    h, w = (int(s) for s in image_size)
    cfg = processor_config(image_processor)
    cfg.update(do_resize=True, size={"height": h, "width": w}, do_center_crop=False, crop_size=None)
    return cfg


def _block_order(lh: int, lw: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) patch coordinates, each (lh*lw*m*m,), in HF's sequence order: row-major over
    the m x m merge blocks, row-major within a block."""
    rows, cols = torch.meshgrid(torch.arange(lh * m), torch.arange(lw * m), indexing="ij")
    shape = (lh, m, lw, m)
    return rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()


def _windows(lh: int, lw: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window partition of the (lh, lw) merged-token grid, as `get_window_index`:
    (order, window_id), order[i] = the merged token at window-ordered position i (windows of
    window x window tokens row-major over the grid, the edge ones smaller; tokens row-major inside
    a window), window_id[i] = the window that position belongs to."""
    index = torch.arange(lh * lw).reshape(lh, lw)
    order, ids = [], []
    for top in range(0, lh, window):
        for left in range(0, lw, window):
            cell = index[top : top + window, left : left + window].flatten()
            order.append(cell)
            ids.append(torch.full_like(cell, len(ids)))
    return torch.cat(order), torch.cat(ids)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QwenVisionGraph(nn.Module):
    """(B, 3, H, W) normalized pixels -> (B, N, text hidden) merged visual tokens of a Qwen2-VL or
    Qwen2.5-VL vision tower, N = (H / (ps*m)) * (W / (ps*m)), in the order HF puts them into the
    sequence. Every grid-dependent quantity is a constant buffer; the batch stays free.
    Build it from the model in its final dtype: `.half()` on the graph would also cast the
    float32 rotary tables."""

    def __init__(self, visual: nn.Module, image_size: tuple[int, int]):
        """`visual`: the loaded HF vision tower (`model.model.visual`, Qwen2 or Qwen2.5 kind; its
        weights are shared, not copied). `image_size` (H, W) in pixels, each a multiple of
        patch_size * spatial_merge_size (28 for the released models)."""
        super().__init__()
        self.visual = visual
        cfg = visual.config
        proj = visual.patch_embed.proj
        self.patch_size = int(visual.patch_embed.patch_size)
        self.merge_size = int(visual.spatial_merge_size)
        self._grid = grid_for(image_size, self.patch_size, self.merge_size)
        _, gh, gw = self._grid
        m = self.merge_size
        self.lh, self.lw = gh // m, gw // m
        self.num_patches = gh * gw
        self.dim = int(proj.out_channels)
        self.num_heads = int(visual.blocks[0].attn.num_heads)
        self.head_dim = self.dim // self.num_heads

        rows, cols = _block_order(self.lh, self.lw, m)
        # Qwen2.5-VL: window attention over window_size pixels = `window` merged tokens a side,
        # except in the full-attention blocks. HF permutes the merged units (m*m consecutive
        # patches each) into window order before the blocks and back after the merger; windows
        # are then contiguous runs of the sequence.
        fullatt = getattr(cfg, "fullatt_block_indexes", None)
        self.windowed = fullatt is not None
        self.windows = 0  # > 0: windowed blocks attend per window, (W, S_max) after padding
        pad_index = unpad_index = key_mask = None
        if self.windowed:
            window = cfg.window_size // m // self.patch_size
            unit_order, window_id = _windows(self.lh, self.lw, window)
            self.register_buffer("unit_order", unit_order, persistent=False)
            self.register_buffer("unit_restore", torch.argsort(unit_order), persistent=False)
            rows = rows.reshape(-1, m * m)[unit_order].flatten()
            cols = cols.reshape(-1, m * m)[unit_order].flatten()
            patch_window = window_id.repeat_interleave(m * m)
            several = int(window_id.max()) > 0  # one window covering the image is full attention
            self.block_windowed = tuple(several and i not in fullatt for i in range(len(visual.blocks)))
            if several:
                # Attention runs per window, (B, heads, W, S_max, hd), so its cost is the sum of
                # the windows' squares, not S^2 (a block-diagonal mask over the whole sequence cost
                # a full attention: ~0.6 s of a 4096-patch tower on 2 cores). Edge windows, smaller
                # where the grid is not a multiple of the window, are padded to S_max: padded
                # slots repeat a real position and are masked as keys, their rows dropped after.
                sizes = torch.bincount(patch_window)
                self.windows, self.window_len = int(sizes.numel()), int(sizes.max())
                if bool((sizes != self.window_len).any()):
                    starts = torch.cumsum(sizes, 0) - sizes
                    slot = torch.arange(self.window_len)
                    real = slot[None, :] < sizes[:, None]  # (W, S_max)
                    pad_index = torch.where(real, starts[:, None] + slot[None, :], starts[:, None]).flatten()
                    unpad_index = torch.nonzero(real.flatten()).flatten()
                    key_mask = real[:, None, :]  # (W, 1, S_max): True = a real key
        else:
            self.block_windowed = (False,) * len(visual.blocks)
        self.register_buffer("pad_index", pad_index, persistent=False)
        self.register_buffer("unpad_index", unpad_index, persistent=False)
        self.register_buffer("window_key_mask", key_mask, persistent=False)

        # 2-D rotary angles per sequence position, in float32 as HF computes them: row * inv_freq
        # then col * inv_freq (head_dim / 2 angles), repeated to span the head dim (rotate_half
        # pairs element i with i + head_dim / 2). Kept float32 whatever the weights' dtype.
        rot = visual.rotary_pos_emb
        inv_freq = rot.inv_freq.float().cpu()
        angles = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        if angles.shape[-1] != self.head_dim:
            raise ValueError(f"rotary table spans {angles.shape[-1]} dims, the head has {self.head_dim}")
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.register_buffer("rope_cos", angles.cos() * scaling, persistent=False)
        self.register_buffer("rope_sin", angles.sin() * scaling, persistent=False)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(1, gh, gw) in patches: the `image_grid_thw` row of the fixed size."""
        return self._grid

    @property
    def tokens(self) -> int:
        """N, the merged visual tokens per image."""
        return self.lh * self.lw

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, gh*gw, D) in sequence order (HF's block order, Qwen2.5: window order)."""
        proj = self.visual.patch_embed.proj
        # HF repeats the still image temporal_patch_size times and applies a Conv3d whose kernel
        # spans those frames; over identical frames that is a Conv2d with the kernel summed over
        # time (stride = kernel = patch), with no temporal axis in the graph.
        x = F.conv2d(pixel_values.to(proj.weight.dtype), proj.weight.sum(dim=2), proj.bias, stride=self.patch_size)
        m = self.merge_size
        # (B, D, gh, gw) -> (B, lh, lw, m, m, D): merge blocks row-major, patches row-major inside.
        x = x.reshape(-1, self.dim, self.lh, m, self.lw, m).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(-1, self.lh * self.lw, m * m, self.dim)
        if self.windowed:
            x = x.index_select(1, self.unit_order)
        return x.reshape(-1, self.num_patches, self.dim)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in float32 (as `apply_rotary_pos_emb_vision`), back to x's dtype."""
        xf = x.float()
        return (xf * self.rope_cos + _rotate_half(xf) * self.rope_sin).to(x.dtype)

    def _attention(self, attn: nn.Module, h: torch.Tensor, windowed: bool) -> torch.Tensor:
        """HF's vision attention with the batch as its own axis: (B, S, D) -> (B, S, D), each image
        attending to itself only (within each of its windows when `windowed`)."""
        qkv = attn.qkv(h).reshape(-1, self.num_patches, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self._rope(q), self._rope(k)
        scale = self.head_dim**-0.5
        if not windowed:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            w, sw = self.windows, self.window_len
            if self.pad_index is not None:
                q, k, v = (x.index_select(2, self.pad_index) for x in (q, k, v))
            q, k, v = (x.reshape(-1, self.num_heads, w, sw, self.head_dim) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.window_key_mask, scale=scale)
            out = out.reshape(-1, self.num_heads, w * sw, self.head_dim)
            if self.unpad_index is not None:
                out = out.index_select(2, self.unpad_index)
        return attn.proj(out.transpose(1, 2).reshape(-1, self.num_patches, self.dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized image (the processor's output before its patch flattening)
        -> (B, N, text hidden), the merged visual tokens in HF's sequence order."""
        h = self._embed(pixel_values)
        for blk, windowed in zip(self.visual.blocks, self.block_windowed):
            h = h + self._attention(blk.attn, blk.norm1(h), windowed)
            h = h + blk.mlp(blk.norm2(h))
        merger = self.visual.merger
        out = merger.mlp(merger.ln_q(h).reshape(-1, self.tokens, self.merge_size**2 * self.dim))
        if self.windowed:
            out = out.index_select(1, self.unit_restore)
        return out

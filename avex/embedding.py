"""A timm ViT's embedding stage for glimpses: pixels -> ``[prefix, glimpse tokens]``, the iterator's input.

A glimpse is a g x g block of patches anywhere on the grid. :meth:`GlimpseViT.embed_glimpses` normalises its
pixels, projects its patches with the ViT's own patch embedding, gives each token the position embedding of its
place on the full grid and puts the prefix tokens (CLS, registers) in front.

Shapes use: B batch, C channels, s = g*patch sensor side in pixels, g glimpse side in patches, G = g*g tokens
per glimpse, P prefix tokens (CLS + registers), D embedding width, N grid patches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback
from avex.layer_norm import launch_pays
from avex.posembed import lookup_pos_embed
from avex.step_writes import place_tokens

__all__ = ["GlimpseViT"]


class _PixelAffine(NamedTuple):
    """The normalisation constants of :meth:`GlimpseViT.normalize` when every channel shares them."""

    scale_u8: float  # 1 / (255 std): uint8 pixels
    scale_f: float  # 1 / std: float pixels in [0, 1]
    shift: torch.Tensor  # -mean / std as a 0-dim CPU tensor (a CUDA kernel takes at most one)


class GlimpseViT(nn.Module):
    """A timm VisionTransformer whose embedding stage takes glimpses: the base of :class:`avex.model.TOREViT`.

    Args:
        vit: a timm ``VisionTransformer`` with a class token and absolute position embeddings (TOREViT checks it).
        mean, std: per-channel pixel normalisation; default from ``vit.pretrained_cfg``.
    """

    # Buffers, registered in __init__ (float32, [1, C, 1, 1] and [C, 1, 1]).
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    _pixel_scale_u8: torch.Tensor
    _pixel_scale_f: torch.Tensor
    _pixel_shift: torch.Tensor

    def __init__(
        self, vit: VisionTransformer, *, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
    ) -> None:
        super().__init__()
        self.vit: VisionTransformer = vit
        self.embed_dim = vit.embed_dim
        self.num_prefix = vit.num_prefix_tokens
        self.patch = int(vit.patch_embed.patch_size[0])
        gh, gw = vit.patch_embed.grid_size
        self.grid: tuple[int, int] = (int(gh), int(gw))
        self.img_size = (self.grid[0] * self.patch, self.grid[1] * self.patch)
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        self._patch_as_linear = _is_patch_linear(vit.patch_embed.proj, self.patch)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean = _per_channel(mean or cfg.get("mean") or (0.5,), self.in_chans)
        std = _per_channel(std or cfg.get("std") or (0.5,), self.in_chans)
        self._init_pixel_norm(mean, std)

    def _init_pixel_norm(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Register the pixel normalisation buffers (per-channel ``mean`` and ``std``) and their fused forms."""
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # normalize() as one multiply-add per channel, [C, 1, 1]: uint8 pixels x -> x * scale + shift (float
        # input: x / std + shift), so a glimpse is normalised, cast and unfolded by one kernel (embed_glimpses).
        std_t, mean_t = torch.tensor(std).view(-1, 1, 1), torch.tensor(mean).view(-1, 1, 1)
        self.register_buffer("_pixel_scale_u8", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("_pixel_scale_f", 1.0 / std_t, persistent=False)
        self.register_buffer("_pixel_shift", -mean_t / std_t, persistent=False)
        # The same constants as kernel arguments when every channel shares them (the scales as numbers, the
        # shift as a 0-dim CPU tensor: a CUDA kernel takes at most one), so only the pixels need strided
        # indexing.
        uniform = len(set(mean)) == 1 and len(set(std)) == 1
        self._pixel_affine_scalars = (
            _PixelAffine(1.0 / (255.0 * std[0]), 1.0 / std[0], torch.tensor(-mean[0] / std[0])) if uniform else None
        )

    # Parameters that TOREViT's __init__ checked are present (avex.model._checked_vit): timm types them Optional.
    @property
    def _pos_embed(self) -> torch.Tensor:
        """``vit.pos_embed``: [1, N (+ P unless no_embed_class), D]."""
        pos_embed = self.vit.pos_embed
        assert pos_embed is not None, "checked in __init__"
        return pos_embed

    @property
    def _cls_token(self) -> torch.Tensor:
        """``vit.cls_token``: [1, 1, D]."""
        cls_token = self.vit.cls_token
        assert cls_token is not None, "checked in __init__"
        return cls_token

    # ------------------------------------------------------------------ checks
    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless images is [B, C, H, W] with this model's channels and size."""
        want = (self.in_chans, *self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}] (B, C, H, W), got {tuple(images.shape)}"
            )

    def _check_glimpses(self, pixels: torch.Tensor, coords: torch.Tensor) -> None:
        if (
            pixels.ndim != 4
            or pixels.shape[1] != self.in_chans
            or pixels.shape[2] != pixels.shape[3]
            or pixels.shape[2] % self.patch
        ):
            raise ValueError(
                f"glimpse pixels must have shape [B, {self.in_chans}, s, s] with s a multiple of the patch size "
                f"{self.patch}, got {tuple(pixels.shape)}"
            )
        if pixels.dtype != torch.uint8 and not pixels.is_floating_point():  # normalize() reads uint8 as 0..255
            raise ValueError(f"glimpse pixels must be uint8 in [0, 255] or float in [0, 1], got {pixels.dtype}")
        g = pixels.shape[2] // self.patch
        if coords.shape != (pixels.shape[0], g * g, 2):
            raise ValueError(f"glimpse coords must have shape [B, {g * g}, 2], got {tuple(coords.shape)}")
        if coords.device.type == "cpu":  # a device check would sync; the geometry layer validates actions
            gh, gw = self.grid
            lo, hi = coords.amin(dim=(0, 1)), coords.amax(dim=(0, 1))
            if lo.min() < 0 or hi[0] > gh - 1 or hi[1] > gw - 1:
                raise ValueError(
                    f"glimpse lies outside the {gh}x{gw} patch grid: token coordinates span rows "
                    f"{lo[0].item()}..{hi[0].item()}, cols {lo[1].item()}..{hi[1].item()}; "
                    f"allowed 0..{gh - 1}, 0..{gw - 1}"
                )

    # ---------------------------------------------------------------- embedding
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> normalised float, same shape [B, C, ...]."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        return (x - self.pixel_mean) / self.pixel_std

    def _patch_pos_table(self) -> torch.Tensor:
        """[N, D] the position embedding of every grid patch."""
        pe = self._pos_embed[0]
        return pe if self.vit.no_embed_class else pe[self.num_prefix :]

    def _prefix_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[1, P, D] the prefix tokens (CLS, registers) and [1, P, D] their position embedding, or None where the
        ViT gives them none (``no_embed_class``)."""
        vit = self.vit
        cls = self._cls_token
        prefix = cls if vit.reg_token is None else torch.cat([cls, vit.reg_token], dim=1)
        return prefix, None if vit.no_embed_class else self._pos_embed[:, : self.num_prefix]

    def _prefix(self, batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, P, D] the prefix tokens (CLS, registers) with their position embedding where the ViT has one
        (written into ``out`` when given, in one kernel)."""
        prefix, pos = self._prefix_parts()
        if out is None:
            return (prefix if pos is None else prefix + pos).expand(batch, -1, -1)
        if pos is None:
            return out.copy_(prefix.expand(batch, -1, -1))
        return torch.add(prefix.expand(batch, -1, -1), pos.expand(batch, -1, -1), out=out)

    def embed_glimpses(self, pixels: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Patch-embed glimpses, each token with the position embedding of its place on the full grid.

        Args:
            pixels: [B, C, s, s] uint8 or float in [0, 1].
            coords: [B, G, 2] patch coordinates (int64: aligned; float: interpolated).

        Returns:
            [B, P + G, D] ``[prefix, glimpse tokens]`` ready for the iterator.
        """
        self._check_glimpses(pixels, coords)
        pe = self.vit.patch_embed
        dtype = pe.proj.weight.dtype
        if self._patch_as_linear:
            # The stride-p, p x p convolution as one matrix product over unfolded patches: the same arithmetic,
            # but on a glimpse's few patches cuDNN's convolution pays a large fixed cost per call, far more than
            # a GEMM of this size. Normalising, casting and unfolding are one multiply-add written straight into
            # the unfolded layout, one kernel where separate passes would each add their own fixed cost.
            b, c, h, w = pixels.shape
            p, gh, gw = self.patch, h // self.patch, w // self.patch
            unfolded = pixels.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p] view
            x = torch.empty(unfolded.shape, dtype=dtype, device=pixels.device)
            if self._pixel_affine_scalars is not None:
                sc = self._pixel_affine_scalars
                torch.add(sc.shift, unfolded, alpha=sc.scale_u8 if pixels.dtype == torch.uint8 else sc.scale_f, out=x)
            else:
                scale = self._pixel_scale_u8 if pixels.dtype == torch.uint8 else self._pixel_scale_f
                torch.addcmul(self._pixel_shift, unfolded, scale, out=x)
            x = F.linear(
                x.view(b, gh * gw, c * p * p), pe.proj.weight.reshape(self.embed_dim, -1), pe.proj.bias
            )  # [B, G, D]
        else:
            x = pe.proj(self.normalize(pixels).to(dtype)).flatten(2).transpose(1, 2)  # [B, G, D]
        x = pe.norm(x)  # row-major like coords
        if self._placed_by_kernel(x, coords):  # inference, one pass: the positions looked up there
            return self.vit.norm_pre(self.vit.pos_drop(self._place_tokens(x, coords)))
        pos = lookup_pos_embed(self._patch_pos_table(), self.grid, coords)
        b, g, d = x.shape
        if torch.is_grad_enabled():  # training: autograd needs the out-of-place form
            x = torch.cat([self._prefix(b).to(x.dtype), x + pos.to(x.dtype)], dim=1)
        else:  # inference: write prefix and tokens into one buffer (no concatenation pass)
            x = self._place_by_ops(x, pos)
        return self.vit.norm_pre(self.vit.pos_drop(x))

    def _place_by_ops(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, P + G, D]: the prefix, then x [B, G, D] plus its positions pos, written into one buffer (no
        concatenation pass)."""
        b, g, d = x.shape
        out = torch.empty(b, self.num_prefix + g, d, dtype=x.dtype, device=x.device)
        self._prefix(b, out=out[:, : self.num_prefix])
        torch.add(x, pos.to(x.dtype), out=out[:, self.num_prefix :])
        return out

    def _placed_by_kernel(self, x: torch.Tensor, coords: torch.Tensor) -> bool:
        """Whether :func:`avex.step_writes.place_tokens` writes the iterator's input: a kernel may run (CUDA or
        Triton's interpreter, no autograd) and pays (:func:`avex.layer_norm.launch_pays`: enough rows, or a CUDA
        graph being captured), grid coordinates (continuous ones interpolate their positions) and one dtype for the
        tokens and the position table (the ops' arithmetic)."""
        return (
            _kernel_may_run(x)
            and launch_pays(x)
            and not coords.is_floating_point()
            and self._pos_embed.dtype == x.dtype == self._cls_token.dtype
            and (self.vit.reg_token is None or self.vit.reg_token.dtype == x.dtype)
        )

    def _place_tokens(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """:meth:`_place_by_ops` by one Triton pass that also looks up the positions (see :mod:`avex.step_writes`);
        if the kernel fails to build or launch here, the ops from then on, with one warning."""
        prefix, pos = self._prefix_parts()
        prefix_pos = None if pos is None else pos[0]
        return kernel_or_fallback(
            "token placement",
            lambda: place_tokens(x, coords, self._patch_pos_table(), prefix[0], prefix_pos, self.grid[1]),
            lambda: self._place_by_ops(x, lookup_pos_embed(self._patch_pos_table(), self.grid, coords)),
            "glimpse tokens now take their positions by PyTorch's ops, with the same results but slower.",
        )


def _is_patch_linear(proj: nn.Module, patch: int) -> bool:
    """Whether the patch projection is a plain stride-p, p x p convolution (then one matrix product, see
    :meth:`GlimpseViT.embed_glimpses`)."""
    return (
        isinstance(proj, nn.Conv2d)
        and tuple(proj.kernel_size) == tuple(proj.stride) == (patch,) * 2
        and tuple(proj.padding) == (0, 0)
        and tuple(proj.dilation) == (1, 1)
        and proj.groups == 1
    )


def _per_channel(values: tuple[float, ...] | list[float], channels: int) -> tuple[float, ...]:
    """Fit a normalisation constant to the channel count (a 3-channel default on a 1-channel model: their mean)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels

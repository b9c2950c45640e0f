"""Canvas composition (avex/data/compose.py): the Triton kernel equals the PyTorch reference bit for bit (uint8),
under Triton's interpreter and on CUDA; FashionMNISTCanvas composes with it; bad arguments are named."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from script_kit import assert_interpreted

from avex.data import CanvasLayout, FashionMNISTCanvas
from avex.data import compose as compose_module
from avex.data.compose import Placements, compose_canvases, reference_compose

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

Args = tuple[torch.Tensor, Placements]  # (images, where)
Case = tuple[str, Args, dict[str, int]]


def layout(
    gen: torch.Generator, images: torch.Tensor, b: int, n: int, side: int, scale: int, fragment: int
) -> tuple[Args, dict[str, int]]:
    """Random in-range arguments of :func:`reference_compose` for ``b`` canvases of ``n`` fragments."""
    items, item_side = len(images), images.shape[1] * scale

    def randint(hi_inclusive: int, *size: int) -> torch.Tensor:
        return torch.randint(0, hi_inclusive + 1, size, generator=gen)

    where = Placements(
        randint(items - 1, b),
        randint(side - item_side, b, 2),
        randint(items - 1, b, n),
        randint(item_side - fragment, b, n, 2),
        randint(side - fragment, b, n, 2),
    )
    return (images, where), dict(side=side, scale=scale, fragment=fragment)


def cases(device: str = "cpu", batch: int = 3) -> list[Case]:
    """The default canvas (x2, four 16 px fragments), scales 1 and 3, no fragments, fragments on the item and on
    each other, one canvas and none, non-contiguous arguments. Items hold zeros too (a max with black)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 28, 28), generator=gen, dtype=torch.uint8)
    out: list[Case] = []
    for name, b, n, side, scale, fragment in (
        ("default", batch, 4, 112, 2, 16),
        ("scale 1", 2, 3, 48, 1, 8),
        ("scale 3", 2, 2, 90, 3, 20),
        ("no fragments", 2, 0, 112, 2, 16),
        ("one canvas", 1, 4, 112, 2, 16),
        ("no canvas", 0, 4, 112, 2, 16),
    ):
        args, kw = layout(gen, images, b, n, side, scale, fragment)
        out.append((name, args, kw))
    # Overlaps: fragment 0 inside the item, fragment 1 across fragment 0, fragment 2 on fragment 1's spot.
    (images_, where), kw = layout(gen, images, 2, 3, 112, 2, 16)
    dst = where.clutter_dst_yx.clone()
    dst[:, 0] = where.item_yx + 10
    dst[:, 1] = dst[:, 0] + 7
    dst[:, 2] = dst[:, 1]
    out.append(("overlaps", (images_, dataclasses.replace(where, clutter_dst_yx=dst)), kw))
    # Non-contiguous: every argument a strided view (the items transposed twice, the layouts slices).
    (_, (index, item_yx, clutter, src, dst)), kw = layout(gen, images, 6, 4, 112, 2, 16)
    wide = torch.cat([item_yx, item_yx.flip(1)], dim=1)  # [B, 4]: columns 0 and 1 are item_yx
    strided = Placements(
        index[::2], wide[::2, :2], clutter[::2], src[::2], dst.transpose(0, 1).contiguous().transpose(0, 1)[::2]
    )
    items = images.transpose(1, 2).contiguous().transpose(1, 2)
    assert not items.is_contiguous() and not any(t.is_contiguous() for t in strided)
    out.append(("non-contiguous", (items, strided), kw))
    return [(name, (im.to(device), Placements(*(t.to(device) for t in w))), kw) for name, (im, w), kw in out]


def kernel_equals_reference(device: str, batch: int = 3) -> None:
    """The kernel's canvases equal the reference's in every case, and the dispatch gives the kernel's (under the
    interpreter and on CUDA), with no kernel failure recorded."""
    import avex.kernel_fallback as kf
    from avex.data.compose import compose_kernel

    for name, args, kw in cases(device, batch):
        got, want = compose_kernel(*args, **kw), reference_compose(*args, **kw)
        assert got.shape == want.shape == (len(args[1].index), kw["side"], kw["side"], 1), name
        assert got.dtype == torch.uint8 and torch.equal(got, want), name
        assert torch.equal(compose_canvases(*args, **kw), got), name
    assert kf._device_may_run(cases(device)[0][1][1].index) and not kf._kernel_failures


def by_hand(args: Args, side: int, scale: int, fragment: int) -> np.ndarray:
    """The canvases by numpy slicing, pixel for pixel as the definition reads: uint8 [B, side, side, 1]."""
    images, (index, item_yx, clutter, src, dst) = args[0].numpy(), (t.numpy() for t in args[1])
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    item_side, f = big.shape[1], fragment
    out = np.zeros((len(index), side, side, 1), dtype=np.uint8)
    for b in range(len(index)):
        canvas = out[b, :, :, 0]
        (y, x) = item_yx[b]
        canvas[y : y + item_side, x : x + item_side] = big[index[b]]
        for k in range(clutter.shape[1]):
            (sy, sx), (dy, dx) = src[b, k], dst[b, k]
            window = canvas[dy : dy + f, dx : dx + f]
            window[...] = np.maximum(window, big[clutter[b, k], sy : sy + f, sx : sx + f])
    return out


def test_reference_equals_the_definition() -> None:
    for name, args, kw in cases():
        np.testing.assert_array_equal(reference_compose(*args, **kw).numpy(), by_hand(args, **kw), err_msg=name)


@pytest.mark.parametrize(
    ("canvas_size", "scale", "n_clutter", "fragment"), [(112, 2, 4, 16), (48, 1, 3, 8), (90, 3, 2, 20), (112, 2, 0, 16)]
)
def test_fashion_mnist_canvas_composes_as_the_reference(
    fake_fmnist_root: Path, canvas_size: int, scale: int, n_clutter: int, fragment: int
) -> None:
    """On the CPU (no interpreter: the reference runs), FashionMNISTCanvas' canvases and labels are the reference's
    and the definition's; one fragment moved by one pixel changes them."""
    src = FashionMNISTCanvas(
        root=fake_fmnist_root, canvas_size=canvas_size, scale=scale, n_clutter=n_clutter, fragment=fragment
    )
    lay = src.sample_layouts([np.random.default_rng(i) for i in range(5)])
    canvases, labels = src.compose(lay)
    fields = (lay.index, lay.item_yx, lay.clutter_index, lay.clutter_src_yx, lay.clutter_dst_yx)
    args = (src.images, Placements(*(torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in fields)))
    kw = dict(side=canvas_size, scale=scale, fragment=fragment)
    assert torch.equal(canvases, reference_compose(*args, **kw))
    np.testing.assert_array_equal(canvases.numpy(), by_hand(args, **kw))
    assert torch.equal(labels, src.labels[torch.from_numpy(lay.index)])
    # A check that can fail: the item moved (and, with clutter, one fragment too) by one pixel.
    moved = CanvasLayout(*(np.array(a) for a in fields))
    moved.item_yx[0, 1] += 1 if moved.item_yx[0, 1] < canvas_size - 28 * scale else -1
    if n_clutter:
        moved.clutter_dst_yx[1, 0, 0] += 1 if moved.clutter_dst_yx[1, 0, 0] < canvas_size - fragment else -1
    other, _ = src.compose(moved)
    assert not torch.equal(other[0], canvases[0])
    assert n_clutter == 0 or not torch.equal(other[1], canvases[1])
    assert torch.equal(other[2:], canvases[2:])


def test_bad_arguments_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each function names the bad argument (a field of the Placements, the items, or an int) and what it must be;
    Placements' fields are CanvasLayout's, so a layout goes over field by field."""
    assert [f.name for f in dataclasses.fields(Placements)] == [f.name for f in dataclasses.fields(CanvasLayout)]
    _, (images, where), kw = cases()[0]
    index, item_yx, clutter, src, dst = where
    bad: list[tuple[str, torch.Tensor, str]] = [
        ("index", index.int(), r"index must be int64 \[B\], got torch.int32"),
        ("index", index[:, None], r"index must be int64 \[B\], got torch.int64 \(3, 1\)"),
        ("item_yx", item_yx[:2], r"item_yx must be int64 \[B, 2\] = \[3, 2\], got torch.int64 \(2, 2\)"),
        ("item_yx", item_yx.float(), r"item_yx must be int64 \[B, 2\].*torch.float32"),
        ("clutter_index", clutter[0], r"clutter_index must be int64 \[B, n\] with B = 3, got torch.int64 \(4,\)"),
        ("clutter_index", clutter[:1], r"clutter_index must be int64 \[B, n\] with B = 3.*\(1, 4\)"),
        (
            "clutter_src_yx",
            src[:, :3],
            r"clutter_src_yx must be int64 \[B, n, 2\] = \[3, 4, 2\], got torch.int64 \(3, 3, 2\)",
        ),
        ("clutter_src_yx", src.int(), r"clutter_src_yx must be int64 \[B, n, 2\].*torch.int32"),
        ("clutter_dst_yx", dst[..., :1], r"clutter_dst_yx must be int64 \[B, n, 2\] = \[3, 4, 2\].*\(3, 4, 1\)"),
        ("clutter_dst_yx", dst.to("meta"), r"clutter_dst_yx is on meta, images on cpu: all must be on one device"),
        ("index", index.to("meta"), r"index is on meta, images on cpu"),
    ]
    bad_images = [
        (images.long(), r"images must be uint8 \[N, I, I\].*torch.int64"),
        (images[0], r"images must be uint8 \[N, I, I\].*\(28, 28\)"),
        (images[:, :, :20], r"images must be uint8 \[N, I, I\] \(square items\).*\(7, 28, 20\)"),
    ]
    for fn in (compose_canvases, reference_compose, compose_module.compose_kernel):
        for name, value, message in bad:
            with pytest.raises(ValueError, match=message):
                fn(images, dataclasses.replace(where, **{name: value}), **kw)
        for value, message in bad_images:
            with pytest.raises(ValueError, match=message):
                fn(value, where, **kw)
        with pytest.raises(ValueError, match=r"where must be a Placements of five int64 tensors, got tuple"):
            fn(images, tuple(where), **kw)  # type: ignore[arg-type]
        for name in ("side", "scale", "fragment"):
            with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got 0"):
                fn(images, where, **dict(kw, **{name: 0}))
    monkeypatch.setattr(compose_module, "triton", None)
    with pytest.raises(RuntimeError, match="compose_kernel needs Triton"):
        compose_module.compose_kernel(images, where, **kw)


def test_a_kernel_that_cannot_build_falls_back_to_the_reference(break_kernel) -> None:
    _, args, kw = cases()[0]
    break_kernel(compose_module, "_compose_kernel_unchecked")
    with pytest.warns(RuntimeWarning, match="Triton canvas compose kernel failed"):
        assert torch.equal(compose_canvases(*args, **kw), reference_compose(*args, **kw))


@needs_triton
def test_kernel_equals_the_reference_under_interpreter() -> None:
    assert_interpreted("tests.test_data_compose", 'kernel_equals_reference("cpu")')


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
def test_kernel_equals_the_reference_on_cuda() -> None:
    kernel_equals_reference("cuda", batch=4096)

"""The TORE model: exact token recycling, batching, cache resets, FLOP accounting, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from avex.flops import ViTDims, step_flops
from avex.geometry import GlimpseGeometry
from avex.model import TOREViT, create_tore

IMG, PATCH, G = 64, 8, 2  # 8x8 grid, 2x2-patch glimpses, 49 positions

VARIANTS = {
    "cls": dict(model="vit_tiny_patch16_224"),
    "no_embed_class": dict(model="deit3_small_patch16_224", embed_dim=64, num_heads=2),
    "registers": dict(model="vit_tiny_patch16_224", reg_tokens=4, no_embed_class=True),
    "avg_pool": dict(model="vit_tiny_patch16_224", global_pool="avg"),  # fc_norm over the mean patch token
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values: timm's init leaves heads, layer scales or biases near zero,
    under which a wrong token order or position could hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make(variant: str = "cls", depth: int = 4, seed: int = 0, **kw) -> TOREViT:
    spec = dict(VARIANTS[variant])
    model = create_tore(
        spec.pop("model"), img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=7, depth=depth, **spec, **kw
    )
    _randomize(model, seed)
    return model.eval()


def canvases(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, IMG, IMG, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def glimpses(model: TOREViT, canv: torch.Tensor, actions: np.ndarray, geo: GlimpseGeometry):
    """actions [B, T] -> pixels [B, T, C, s, s], coords [B, T, G, 2]."""
    pix, coords = [], []
    for t in range(actions.shape[1]):
        r, c = (torch.as_tensor(v) for v in geo.action_to_patch(actions[:, t]))
        pix.append(geo.cut(canv, r, c))
        coords.append(geo.glimpse_coords(r, c))
    return torch.stack(pix, 1), torch.stack(coords, 1)


def random_actions(b: int, t: int, geo: GlimpseGeometry, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(geo.num_actions, size=t, replace=False) for _ in range(b)])


def sharp_decoder_case(b: int, t: int, **kw) -> tuple[TOREViT, torch.Tensor, torch.Tensor]:
    """The entropy map's test case: :func:`make`'s model (``kw``) with its decoder's last block attending sharply (a
    map far from uniform), and t random glimpses of b canvases: (model, pixels [B, T, C, s, s], coords [B, T, G, 2])."""
    model = make(**kw)
    assert model.decoder is not None
    with torch.no_grad():
        model.decoder.blocks[-1].qkv.weight.mul_(3)
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(b), random_actions(b, t, geo), geo)
    return model, pix, coords


def run_sequential(model: TOREViT, pix: torch.Tensor, coords: torch.Tensor, K: int, capacity: int = 12):
    cache = model.init_cache(pix.shape[0], capacity, K, coords.shape[2])
    outs = [model.step(cache, pix[:, t], coords[:, t]) for t in range(pix.shape[1])]
    return cache, outs


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_k0_all_patches_equals_timm_forward(variant: str) -> None:
    model = make(variant)
    images = torch.rand(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    reference = model.vit(model.normalize(images))
    pix, coords = model.tile(images, G)
    assert pix.shape[1] * G * G == (IMG // PATCH) ** 2
    tore = model.forward_glimpses(pix, coords, K=0).logits
    assert reference.abs().max() > 0.1  # a real signal, not a near-zero head
    assert (tore - reference).abs().max().item() <= 1e-5
    # The sequential cached path with every tile as a glimpse gives the same logits.
    _, outs = run_sequential(model, pix, coords, K=0, capacity=pix.shape[1])
    assert (outs[-1].logits - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["cls", "registers"])
@pytest.mark.parametrize("T", [1, 5, 12])
@torch.no_grad()
def test_sequential_equals_single_shot_for_every_k(variant: str, T: int) -> None:
    model = make(variant)
    geo = model.geometry(G)
    canv = canvases(2)
    pix, coords = glimpses(model, canv, random_actions(2, T, geo), geo)
    for K in range(model.depth + 1):
        _, outs = run_sequential(model, pix, coords, K)
        single = model.forward_glimpses(pix, coords, K)
        assert (outs[-1].logits - single.logits).abs().max().item() <= 1e-5, K
        assert (outs[-1].features - single.features).abs().max().item() <= 1e-5, K


@torch.no_grad()
def test_split_points_differ() -> None:
    """Different K are different computations (guards against K being ignored)."""
    model = make()
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(1), random_actions(1, 5, geo), geo)
    logits = [model.forward_glimpses(pix, coords, K).logits for K in (0, 2, 4)]
    assert (logits[0] - logits[1]).abs().max() > 1e-3 and (logits[1] - logits[2]).abs().max() > 1e-3


@torch.no_grad()
def test_batch_rows_equal_rows_alone() -> None:
    model = make()
    geo = model.geometry(G)
    canv = canvases(3, seed=2)
    actions = random_actions(3, 6, geo, seed=3)
    pix, coords = glimpses(model, canv, actions, geo)
    for K in (0, 2, 4):
        _, outs = run_sequential(model, pix, coords, K)
        for b in range(3):
            _, alone = run_sequential(model, pix[b : b + 1], coords[b : b + 1], K)
            for t in range(6):
                assert (outs[t].logits[b] - alone[t].logits[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["cls", "avg_pool"])  # avg_pool: the mean over patch tokens skips padding
@torch.no_grad()
def test_reset_some_rows_leaves_others_unchanged(variant: str) -> None:
    model = make(variant)
    geo = model.geometry(G)
    canv = canvases(3, seed=4)
    pix, coords = glimpses(model, canv, random_actions(3, 7, geo, seed=5), geo)
    K = 2
    cache, _ = run_sequential(model, pix[:, :3], coords[:, :3], K)
    model.reset_cache(cache, np.array([False, True, False]))
    assert cache.counts.tolist() == [3, 0, 3]
    # Row 1 restarts with other glimpses while rows 0 and 2 continue: counts now differ per row.
    restart = model.step(cache, pix[:, 3], coords[:, 3])
    assert cache.counts.tolist() == [4, 1, 4]
    outs = [restart] + [model.step(cache, pix[:, t], coords[:, t]) for t in range(4, 7)]
    _, full = run_sequential(model, pix, coords, K)
    for b in (0, 2):
        for t, out in enumerate(outs):
            assert (out.logits[b] - full[t + 3].logits[b]).abs().max().item() <= 1e-5
    _, fresh = run_sequential(model, pix[1:2, 3:7], coords[1:2, 3:7], K)
    for t, out in enumerate(outs):
        assert (out.logits[1] - fresh[t].logits[0]).abs().max().item() <= 1e-5
    # The decoder sees the same masked tokens as the row alone.
    _, ent = model.decode(outs[-1])
    _, ent_alone = model.decode(fresh[-1])
    assert (ent[1] - ent_alone[0]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_empty_pass_is_k_independent_and_first_glimpse_matches() -> None:
    model = make()
    empties = []
    for K in (0, 2, 4):
        cache = model.init_cache(2, 4, K, G * G)
        empties.append(model.aggregate_cache(cache).logits)
    assert torch.allclose(empties[0], empties[1], atol=1e-5) and torch.allclose(empties[0], empties[2], atol=1e-5)


@torch.no_grad()
def test_float_coords_at_integers_equal_aligned_glimpse() -> None:
    """The continuous (interpolated) position path reduces to the exact lookup on the grid."""
    model = make()
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(2), random_actions(2, 3, geo), geo)
    a = model.forward_glimpses(pix, coords, 2).logits
    b = model.forward_glimpses(pix, coords.float(), 2).logits
    assert (a - b).abs().max().item() <= 1e-5
    # And the continuous geometry of an unscaled box reproduces the aligned glimpse exactly.
    boxes = torch.as_tensor(geo.boxes(np.array([2, 5]), np.array([3, 0])))
    cont = geo.cut_continuous(canvases(2), boxes)
    r, c = torch.tensor([2, 5]), torch.tensor([3, 0])
    assert torch.equal(cont.round().to(torch.uint8), geo.cut(canvases(2), r, c))
    assert torch.allclose(geo.continuous_coords(boxes), geo.glimpse_coords(r, c).float())


@pytest.mark.parametrize("K", [0, 2, 4])
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("recon", [True, False])
@torch.no_grad()
def test_analytic_flops_match_flop_counter(K: int, t: int, recon: bool) -> None:
    model = make()
    geo = model.geometry(G)
    # One image: the entropy alone projects the mask rows once per batch, and the analytic count is an image's.
    pix, coords = glimpses(model, canvases(1), random_actions(1, t, geo), geo)
    cache, _ = (
        run_sequential(model, pix[:, : t - 1], coords[:, : t - 1], K)
        if t > 1
        else (model.init_cache(1, 12, K, 4), None)
    )
    counter = FlopCounterMode(display=False)
    # The math SDPA backend decomposes into matmuls the counter sees (CPU's fused kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model.step(cache, pix[:, t - 1], coords[:, t - 1])
        model.decode(out, recon=recon)
    measured = counter.get_total_flops()
    dims = ViTDims.of(model)
    analytic = step_flops(dims, t, G * G, K, recon=recon)
    if not recon:  # the entropy alone projects the row table: an image's 1 + L + N rows where the count has 1 + N
        analytic += 2 * 3 * t * G * G * dims.decoder_dim**2
    assert abs(measured - analytic) / measured <= 0.02, (measured, analytic)


def test_bad_input_errors() -> None:
    model = make()
    geo = model.geometry(G)
    with pytest.raises(ValueError, match=r"K must be an integer in 0\.\.4"):
        model.init_cache(1, 4, 5, 4)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        model.forward_glimpses(torch.zeros(1, 1, 3, 16, 16), torch.zeros(1, 1, 4, 2, dtype=torch.long), K=-1)
    with pytest.raises(ValueError, match=r"action must be an integer in \[0, 48\]"):
        geo.action_to_patch(49)
    with pytest.raises(ValueError, match="outside the 8x8 patch grid"):
        coords = geo.glimpse_coords(torch.tensor([7]), torch.tensor([0]))  # rows 7..8: off the grid
        model.forward_glimpses(torch.zeros(1, 1, 3, 16, 16), coords[:, None], K=0)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model.tile(torch.zeros(1, 3, 32, 32), G)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model.tile(torch.zeros(1, 1, 64, 64), G)
    with pytest.raises(ValueError, match=r"glimpse pixels must have shape \[B, 3, s, s\]"):
        cache = model.init_cache(1, 4, 0, 4)
        model.step(cache, torch.zeros(1, 1, 16, 16), geo.glimpse_coords(torch.tensor([0]), torch.tensor([0])))
    cache = model.init_cache(1, 1, 0, 4)
    r, c = torch.tensor([0]), torch.tensor([0])
    model.step(cache, geo.cut(canvases(1), r, c), geo.glimpse_coords(r, c))
    with pytest.raises(ValueError, match="cache is full"):
        model.step(cache, geo.cut(canvases(1), r, c), geo.glimpse_coords(r, c))
    with pytest.raises(ValueError, match="class token"):
        import timm

        TOREViT(
            timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False, global_pool="avg")
        )


@torch.no_grad()
def test_decoder_entropy_equals_explicit_attention_entropy() -> None:
    """AME's map on AME's layout: [CLS, grid], each seen cell holding its latest token; then the sum over
    heads and non-CLS keys of -p log2 p of each grid query's attention row."""
    model = make()
    geo = model.geometry(G)
    # Glimpses 0 and 2 overlap glimpse 1 (one patch each), so those cells must hold the later token.
    actions = np.array(
        [
            [geo.patch_to_action(1, 1), geo.patch_to_action(2, 2), geo.patch_to_action(3, 3)],
            [geo.patch_to_action(5, 0), geo.patch_to_action(0, 6), geo.patch_to_action(5, 1)],
        ]
    )
    pix, coords = glimpses(model, canvases(2), actions, geo)
    out = model.forward_glimpses(pix, coords, 2)
    _, entropy = model.decode(out)
    dec = model.decoder
    blk = dec.blocks[-1]
    b, (gh, gw) = 2, model.grid
    tokens = dec.embed(out.tokens[:, model.num_prefix :])
    grid = dec.mask_token.expand(b, gh * gw, -1).clone()
    for i in range(b):
        for j, (r, c) in enumerate(out.coords[i].long().tolist()):  # in glimpse order: later tokens overwrite
            grid[i, r * gw + c] = tokens[i, j]
    x = torch.cat([dec.embed(out.tokens[:, 0])[:, None], grid + dec.grid_pos], 1)
    s, d = x.shape[1], x.shape[2]
    q, k, _ = blk.qkv(blk.norm1(x)).view(b, s, 3, blk.heads, d // blk.heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // blk.heads) ** -0.5).softmax(-1)[:, :, 1:, 1:]
    explicit = -(attn * attn.log2()).sum(dim=(1, 3)).view(b, *model.grid)
    assert torch.allclose(entropy, explicit, rtol=1e-4, atol=1e-4)
    assert entropy.std() > 0.01  # a real map, not a constant
    held = dec.cells(out.coords)
    assert held[0, 2 * gw + 2].item() == 4 and held[0, 3 * gw + 3].item() == 8  # glimpse 1's and 2's first tokens
    assert (held >= 0).sum(dim=1).tolist() == [10, 10]  # 12 tokens per row on 10 distinct cells
    # Every cell's token index points at a token with that cell's coordinates.
    rows = torch.arange(gh * gw)
    for i in range(b):
        seen = held[i] >= 0
        assert torch.equal(out.coords[i, held[i, seen]].long(), torch.stack([rows // gw, rows % gw], 1)[seen])


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_single_outputs_equal_both(padded: bool) -> None:
    """recon alone (fused attention) and entropy alone (no attention output) give what both together give."""
    model = make(decoder_depth=2)
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(3, seed=2), random_actions(3, 4, geo, seed=3), geo)
    K = 1
    cache = model.init_cache(3, 4, K, geo.tokens_per_glimpse)
    for t in range(3):
        out = model.step(cache, pix[:, t], coords[:, t])
    if padded:  # rows out of step: padding keys in the decoder
        model.reset_cache(cache, np.array([False, True, False]))
        out = model.step(cache, pix[:, 3], coords[:, 3])
        assert out.valid is not None
    recon, entropy = model.decode(out)
    recon_only, none_e = model.decode(out, entropy=False)
    none_r, entropy_only = model.decode(out, recon=False)
    assert none_e is None and none_r is None
    torch.testing.assert_close(recon_only, recon, atol=1e-5, rtol=1e-5)
    assert torch.equal(entropy_only, entropy)
    with pytest.raises(ValueError, match="recon, entropy or both"):
        model.decode(out, recon=False, entropy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_sequence_by_one_gather_equals_the_autograd_path(dtype: torch.dtype) -> None:
    """Without autograd the decoder's input is one gather of precomputed rows; with it, a gather, a select, a sum
    and a concatenation. Bit for bit the same sequence, with a cell seen twice, padding, and nothing seen."""
    dec = make().decoder.to(dtype)
    gen = torch.Generator().manual_seed(4)
    b, n_obs, width = 3, 10, dec.embed.in_features
    cls, tokens = torch.randn(b, width, generator=gen).to(dtype), torch.randn(b, n_obs, width, generator=gen).to(dtype)
    coords = torch.randint(0, dec.grid[0], (b, n_obs, 2), generator=gen).float() + 0.2  # rounded to their cell
    coords[0, 5] = coords[0, 2]
    valid = torch.ones(b, n_obs, dtype=torch.bool)
    valid[1, 4:] = False
    for args in ((tokens, coords, None), (tokens, coords, valid), (tokens[:, :0], coords[:, :0], None)):
        with torch.no_grad():
            fast = dec._sequence(cls, *args)
        slow = dec._sequence(cls, *args)
        assert slow.requires_grad and fast.shape == (b, 1 + dec.grid_pos.shape[1], dec.dim)
        assert torch.equal(fast, slow.detach())
    assert not torch.equal(dec._sequence(cls, tokens, coords, valid), dec._sequence(cls, tokens, coords, None))


def test_bad_attention_backend_choice_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make()
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(1), random_actions(1, 1, geo), geo)
    monkeypatch.setenv("AVEX_SDPA", "fast")
    with pytest.raises(ValueError, match="AVEX_SDPA='fast'.*unknown backend"):
        model.forward_glimpses(pix, coords, 2)
    monkeypatch.setenv("AVEX_SDPA", "efficient,math")  # valid: CPU runs as before
    model.forward_glimpses(pix, coords, 2)


@pytest.mark.parametrize("stats", [dict(), dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
@pytest.mark.parametrize("grad", [False, True])
def test_glimpse_embedding_equals_timm_patch_embed(stats: dict, grad: bool) -> None:
    """The fused embedding (one multiply-add to normalise, cast and unfold; prefix and tokens written into one
    buffer without autograd) gives timm's conv patch embedding of the normalised glimpse plus positions."""
    model = make(**stats)
    geo = model.geometry(G)
    canv = canvases(3)
    r, c = torch.tensor([0, 2, 5]), torch.tensor([1, 6, 3])
    pix, coords = geo.cut(canv, r, c), geo.glimpse_coords(r, c)
    vit = model.vit
    with torch.set_grad_enabled(grad):
        tokens = vit.patch_embed.proj(model.normalize(pix)).flatten(2).transpose(1, 2)
        pos_full = vit.pos_embed[0, model.num_prefix :].view(*model.grid, -1)
        want = torch.cat(
            [
                (vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1),
                tokens + pos_full[coords[..., 0], coords[..., 1]],
            ],
            dim=1,
        )
        for p in (pix, pix.float() / 255):
            got = model.embed_glimpses(p, coords)
            assert got.requires_grad == grad
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="uint8 in \\[0, 255\\] or float"):
        model.embed_glimpses(pix.to(torch.int32), coords)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stats", [dict(), dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
def test_glimpse_embedding_on_cuda_equals_cpu(stats: dict) -> None:
    """CUDA kernels take fewer CPU scalars than CPU ones: the fused embedding must run there too, and agree."""
    model = make(**stats)
    geo = model.geometry(G)
    r, c = torch.tensor([0, 2, 5]), torch.tensor([1, 6, 3])
    pix, coords = geo.cut(canvases(3), r, c), geo.glimpse_coords(r, c)
    with torch.no_grad():
        want = model.embed_glimpses(pix, coords)
        got = model.to("cuda").embed_glimpses(pix.cuda(), coords.cuda()).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decoder_position_order_new_models_mae_old_checkpoints_row_col(tmp_path) -> None:
    """New models read the decoder's sin-cos table in MAE's (col, row) order and record it; a config saved
    before the order was recorded (the shipped checkpoint's) loads in the (row, col) order it was trained in."""
    import json

    from avex.checkpoint import load_tore, save_tore, shipped_checkpoint
    from avex.posembed import grid_coords, grid_sincos, sincos_2d

    model = make()
    assert model.decoder is not None and model.decoder.pos_order == "mae"
    assert model.build_args is not None and model.build_args["decoder_pos"] == "mae"
    mae = grid_sincos(model.grid, 128, "mae")
    torch.testing.assert_close(model.decoder.grid_pos[0], mae)
    rows_first = sincos_2d(grid_coords(model.grid), 128)  # the table every earlier avex decoder used
    torch.testing.assert_close(grid_sincos(model.grid, 128, "row_col"), rows_first)
    assert (mae - rows_first).abs().max() > 0.5
    path = save_tore(model, tmp_path / "new")
    config = path.with_suffix(".json")
    assert load_tore(path).decoder.pos_order == "mae"
    cfg = json.loads(config.read_text())
    del cfg["build"]["decoder_pos"]  # as written before the field existed
    config.write_text(json.dumps(cfg))
    old = load_tore(path)
    assert old.decoder is not None and old.decoder.pos_order == "row_col"
    torch.testing.assert_close(old.decoder.grid_pos[0], rows_first)
    shipped = load_tore(shipped_checkpoint("fashion-mnist"))
    assert shipped.decoder is not None and shipped.decoder.pos_order == "row_col"
    with pytest.raises(ValueError, match="decoder_pos must be one of"):
        make(decoder_pos="col_row")

"""avex.convert: MAE / AME / TORE-style checkpoints into avex checkpoints.

A MAE-layout state dict with random weights (non-square grid, two encoder and two decoder blocks) is
converted and loaded; its logits and AME entropy map must equal an independent computation written here
from MAE's and AME's descriptions (MAE's encoder on the visible patches; MAE's decoder on ``[CLS, grid]``
with MAE's column-first sin-cos table; AME's entropy of the last decoder block's attention).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avex.checkpoint import load_tore
from avex.convert import convert_mae_checkpoint, tore_from_mae_state
from avex.posembed import grid_sincos

GRID, PATCH, C = (4, 6), 8, 3  # 32 x 48 pixels
D, DEPTH, HEADS, CLASSES = 32, 2, 2, 5
DD, DDEPTH, DHEADS = 16, 2, 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUILD = dict(model="vit_tiny_patch16_224", num_heads=HEADS, img_size=(32, 48), decoder_heads=DHEADS)


def mae_sincos(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed table as its paper and code describe it: a (col, row) grid ("w goes first"); each half of
    the vector is [sin | cos] of one coordinate times 1 / 10000^(i / (dim / 4)). Returns [gh * gw, dim]."""
    gh, gw = grid
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # "xy" indexing

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        angle = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(cols), one_axis(rows)], axis=1)).float()


def _block_shapes(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm1.weight": (dim,),
        f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim),
        f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (4 * dim, dim),
        f"{prefix}.mlp.fc1.bias": (4 * dim,),
        f"{prefix}.mlp.fc2.weight": (dim, 4 * dim),
        f"{prefix}.mlp.fc2.bias": (dim,),
    }


def mae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A MAE-layout state dict (encoder, classification head, decoder) with random weights."""
    n = GRID[0] * GRID[1]
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + n, D),
        "patch_embed.proj.weight": (D, C, PATCH, PATCH),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
        "head.weight": (CLASSES, D),
        "head.bias": (CLASSES,),
        "decoder_embed.weight": (DD, D),
        "decoder_embed.bias": (DD,),
        "mask_token": (1, 1, DD),
        "decoder_norm.weight": (DD,),
        "decoder_norm.bias": (DD,),
        "decoder_pred.weight": (PATCH * PATCH * C, DD),
        "decoder_pred.bias": (PATCH * PATCH * C,),
    }
    for i in range(DEPTH):
        shapes |= _block_shapes(f"blocks.{i}", D)
    for i in range(DDEPTH):
        shapes |= _block_shapes(f"decoder_blocks.{i}", DD)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(s, generator=gen) * (1.0 if "norm" in k and "weight" in k else 0.3) for k, s in shapes.items()
    }
    for i in range(DDEPTH):  # sharper decoder attention: an entropy map far from uniform
        state[f"decoder_blocks.{i}.attn.qkv.weight"] *= 4
    table = torch.zeros(1, 1 + n, DD)
    table[0, 1:] = mae_sincos(DD, GRID)
    state["decoder_pos_embed"] = table
    return state


def _block(x: torch.Tensor, sd: dict[str, torch.Tensor], pre: str, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm ViT block in plain torch ops; returns the output and its attention [B, heads, S, S]."""
    b, s, d = x.shape
    h = F.layer_norm(x, (d,), sd[f"{pre}.norm1.weight"], sd[f"{pre}.norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]).view(b, s, 3, heads, -1).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1) / (d // heads) ** 0.5).softmax(-1)
    x = x + F.linear(
        (attn @ v).transpose(1, 2).reshape(b, s, d), sd[f"{pre}.attn.proj.weight"], sd[f"{pre}.attn.proj.bias"]
    )
    h = F.layer_norm(x, (d,), sd[f"{pre}.norm2.weight"], sd[f"{pre}.norm2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, sd[f"{pre}.mlp.fc1.weight"], sd[f"{pre}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{pre}.mlp.fc2.weight"], sd[f"{pre}.mlp.fc2.bias"]), attn


def mae_reference(sd: dict[str, torch.Tensor], images: torch.Tensor, visible: list[int]):
    """MAE's encoder on the visible patches (row-major indices), its head, and AME's entropy map (bits) of
    the last decoder block. images: float [B, C, H, W] in [0, 1]. Returns logits [B, classes], entropy
    [B, gh, gw] and reconstruction [B, N, p*p*C]."""
    b = images.shape[0]
    x = (images - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]  # [B, N, D], row-major
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, tokens[:, visible]], dim=1)
    for i in range(DEPTH):
        x, _ = _block(x, sd, f"blocks.{i}", HEADS)
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    logits = F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])
    y = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    grid = sd["mask_token"].expand(b, GRID[0] * GRID[1], -1).clone()
    grid[:, visible] = y[:, 1:]
    y = torch.cat([y[:, :1], grid], dim=1) + sd["decoder_pos_embed"]
    for i in range(DDEPTH):
        y, attn = _block(y, sd, f"decoder_blocks.{i}", DHEADS)
    a = attn[:, :, 1:, 1:]  # AME: drop the CLS row and column of the last block's attention
    entropy = (-a * a.log2()).nan_to_num().sum(dim=(1, 3)).view(b, *GRID)
    y = F.layer_norm(y, (DD,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    recon = F.linear(y[:, 1:], sd["decoder_pred.weight"], sd["decoder_pred.bias"])
    return logits, entropy, recon


def test_mae_sincos_is_the_mae_order_of_grid_sincos() -> None:
    torch.testing.assert_close(grid_sincos(GRID, DD, "mae"), mae_sincos(DD, GRID))
    assert not torch.allclose(grid_sincos(GRID, DD, "row_col"), mae_sincos(DD, GRID), atol=0.1)


@torch.no_grad()
def test_converted_checkpoint_gives_mae_logits_and_ame_entropy(tmp_path) -> None:
    sd = mae_state()
    src = tmp_path / "mae.pth"
    torch.save({"model": sd, "epoch": 3}, src)
    path = convert_mae_checkpoint(src, tmp_path / "avex", mean=MEAN, std=STD, **BUILD)
    build = json.loads(path.with_suffix(".json").read_text())["build"]
    assert build["decoder_pos"] == "mae" and build["depth"] == DEPTH and build["embed_dim"] == D
    tore = load_tore(path).eval()
    assert tore.grid == GRID and tore.decoder is not None and tore.decoder.pos_order == "mae"

    images = torch.rand(2, C, 32, 48, generator=torch.Generator().manual_seed(1))
    geo = tore.geometry(2)
    tops = [(0, 0), (2, 2), (0, 4)]  # non-overlapping 2x2 glimpses: MAE sees each patch once
    visible = sorted(r * GRID[1] + c for r0, c0 in tops for r in (r0, r0 + 1) for c in (c0, c0 + 1))
    canv = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    cache = tore.init_cache(2, len(tops), 0, geo.tokens_per_glimpse)
    for r0, c0 in tops:
        r, c = torch.tensor([r0, r0]), torch.tensor([c0, c0])
        out = tore.step(cache, geo.cut(canv, r, c), geo.glimpse_coords(r, c))
    recon, entropy = tore.decode(out)
    logits, want_entropy, want_recon = mae_reference(sd, canv.permute(0, 3, 1, 2).float() / 255, visible)
    assert logits.abs().max() > 0.1 and want_entropy.std() > 0.1  # real signals
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(recon, want_recon, atol=1e-4, rtol=1e-4)
    # The order matters: MAE's weights read with (row, col) positions give another map.
    tore.decoder.grid_pos = grid_sincos(GRID, DD, "row_col")[None]
    assert (tore.decode(out, recon=False)[1] - want_entropy).abs().max() > 0.05


def test_lightning_layout_transposed_table_and_decoder_less_checkpoints(tmp_path) -> None:
    """TORE's Lightning files ({"state_dict": {"mae.<name>": ...}}); a table in (row, col) order reads as
    'row_col'; a classifier without decoder converts to a model without one."""
    sd = mae_state()
    src = tmp_path / "tore.ckpt"
    torch.save({"state_dict": {f"mae.{k}": v for k, v in sd.items()}}, src)
    tore = load_tore(convert_mae_checkpoint(src, tmp_path / "a", **BUILD))
    assert tore.decoder is not None and tore.decoder.pos_order == "mae"
    sd["decoder_pos_embed"][0, 1:] = grid_sincos(GRID, DD, "row_col")
    assert tore_from_mae_state(sd, **BUILD).build_args["decoder_pos"] == "row_col"  # type: ignore[index]
    classifier = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    assert tore_from_mae_state(classifier, **BUILD).decoder is None


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.update({"blocks.0.attn.gate.weight": torch.zeros(2)}), r"unknown tensors \['blocks.0.attn.gate"),
        (
            lambda sd: sd.update({"decoder_pred.weight": torch.zeros(7, DD)}),
            r"decoder.pred.weight \(decoder_pred.weight\)",
        ),
        (lambda sd: sd.pop("head.bias"), r"missing \['vit.head.bias'\]"),
        (lambda sd: sd["decoder_pos_embed"][0, 1:].normal_(), "not the fixed 2-D sin-cos table"),
        (lambda sd: sd["decoder_pos_embed"][0, 0].fill_(1), "gives the CLS token a position"),
        (lambda sd: sd.pop("cls_token"), "no 'cls_token' tensor"),
    ],
)
def test_what_does_not_fit_is_refused_by_name(edit, message: str) -> None:
    sd = mae_state()
    edit(sd)
    with pytest.raises(ValueError, match=message):
        tore_from_mae_state(sd, **BUILD)


def test_files_that_are_not_weights_are_refused(tmp_path) -> None:
    src = tmp_path / "code.pth"
    torch.save({"model": mae_state(), "args": np.random.default_rng(0)}, src)  # an object: pickled code
    with pytest.raises(ValueError, match=r"weights_only=True"):
        convert_mae_checkpoint(src, tmp_path / "x", **BUILD)
    torch.save({"model": {}}, src)
    with pytest.raises(ValueError, match="expected a state dict"):
        convert_mae_checkpoint(src, tmp_path / "x", **BUILD)
    with pytest.raises(ValueError, match="decoder_heads dividing 16"):
        tore_from_mae_state(mae_state(), **{**BUILD, "decoder_heads": 3})


def test_avex_convert_command_writes_a_loadable_checkpoint(tmp_path) -> None:
    """`avex convert` gives what convert_mae_checkpoint gives; a missing --src is the one-line refusal."""
    from avex.cli import main

    src = tmp_path / "mae.pth"
    torch.save({"model": mae_state()}, src)
    argv = ["convert", "--src", str(src), "--dst", str(tmp_path / "cli"), "--mean", ",".join(map(str, MEAN))]
    flags = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in BUILD.items()}
    argv += ["--std", ",".join(map(str, STD))] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    assert main(argv) == 0
    direct = convert_mae_checkpoint(src, tmp_path / "direct", mean=MEAN, std=STD, **BUILD)
    a, b = load_tore(tmp_path / "cli.safetensors"), load_tore(direct)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert main(["convert", "--dst", str(tmp_path / "x")]) == 2


def _cli_refusal(capsys, argv: list[str]) -> str:
    """The one `avex convert: error: ...` line of a refused command."""
    from avex.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("avex convert: error: ") and err.count("\n") == 1, err
    return err


def test_files_that_are_no_checkpoint_are_refused_on_one_line_naming_src(tmp_path, capsys) -> None:
    """A missing file, a folder, a text file and a pickle weights_only refuses: one line naming src, nothing written."""
    dst = ["--dst", str(tmp_path / "out"), "--decoder-heads", "2"]
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    code = tmp_path / "code.pth"
    torch.save({"model": mae_state(), "args": np.random.default_rng(0)}, code)  # a pickled object
    for src, message in (
        (tmp_path / "missing.pth", "does not exist"),
        (tmp_path, "is a folder"),
        (text, "is not a PyTorch checkpoint"),
        (code, "holds a pickled numpy.random"),
    ):
        err = _cli_refusal(capsys, ["convert", "--src", str(src), *dst])
        assert f"src {src} {message}" in err, err
    assert "\x1b" not in err and "save its weights alone" in err  # torch's escapes and Python-API advice dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.pth", "notes.pth"]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(decoder_heads=-2), "decoder_heads must be an integer >= 1, got -2"),  # 16 % -2 == 0 was written
        (dict(num_heads=-1), "num_heads must be an integer >= 1, got -1"),
        (dict(num_heads=0), "num_heads must be an integer >= 1, got 0"),  # was a ZeroDivisionError
        (dict(num_heads=3), "pass num_heads dividing embed_dim=32, got num_heads=3"),  # was timm's AssertionError
        (dict(num_heads=None), "pass num_heads dividing embed_dim=32"),  # vit_tiny's own 3 heads
        (dict(img_size=(33, 49)), r"img_size \(33, 49\) is not a multiple of .* 8-pixel patch"),
        (dict(img_size=(-32, -48)), r"img_size must be a positive int or \(H, W\), got \(-32, -48\)"),
        # mean / std: avex.checks.check_pixel_norm, as training and checkpoint configs check them
        (dict(mean=(0.5, 0.5)), r"mean and std must have one value per channel each, got \(0.5, 0.5\) and \(0.229"),
        (
            dict(mean=(0.0,) * 4, std=(1.0,) * 4),
            r"mean must be 3 finite number\(s\), one per channel \(.*mae.pth has 3",
        ),
        (
            dict(std=(0.0, 0.0, 0.0)),
            r"std must be finite numbers, one per channel, each > 0 \(pixels are divided by it",
        ),
        (dict(mean=(float("nan"), 0.0, 0.0)), r"mean must be finite numbers, one per channel, got \(nan, 0.0, 0.0\)"),
        (dict(mean=(True, False, True)), r"mean must be finite numbers, one per channel, got \(True"),  # was accepted
        (dict(model="resnet50"), r"model 'resnet50' cannot be built as .*TypeError.*pass the timm VisionTransformer"),
    ],
)
def test_meaningless_model_arguments_are_refused_and_nothing_is_written(tmp_path, change, message) -> None:
    src = tmp_path / "mae.pth"
    torch.save({"model": mae_state()}, src)
    with pytest.raises(ValueError, match=message):
        convert_mae_checkpoint(src, tmp_path / "out", **{**BUILD, **change})
    assert [p.name for p in tmp_path.iterdir()] == ["mae.pth"]


def test_model_arguments_are_refused_before_src_is_read(tmp_path, capsys, monkeypatch) -> None:
    """A bad count or a timm model of another family is refused before torch.load reads a checkpoint that may take
    minutes (the CLI checks --model by name, as the envs do)."""
    import avex.convert as convert_mod

    monkeypatch.setattr(convert_mod, "_load", lambda src: pytest.fail("src was read"))
    src = tmp_path / "mae.pth"
    src.write_bytes(b"not read")
    with pytest.raises(ValueError, match="decoder_heads must be an integer >= 1, got -2"):
        convert_mae_checkpoint(src, tmp_path / "out", **{**BUILD, "decoder_heads": -2})
    dst = ["--dst", str(tmp_path / "out"), "--decoder-heads", "2"]
    err = _cli_refusal(capsys, ["convert", "--src", str(src), *dst, "--model", "resnet50"])
    assert "--model: model 'resnet50' cannot run in an AVE environment: it is a ResNet" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["mae.pth"]


@pytest.mark.parametrize("folder", ["avex.safetensors", "avex.json"])
def test_a_dst_that_is_a_folder_is_refused_as_every_file_path_is(tmp_path, capsys, monkeypatch, folder) -> None:
    """The weights' or the config's path an existing folder: refused by avex.checks.check_writable's rule and
    message (as --gif or --out), naming dst, before src is read."""
    import avex.convert as convert_mod

    monkeypatch.setattr(convert_mod, "_load", lambda src: pytest.fail("src was read"))
    src = tmp_path / "mae.pth"
    torch.save({"model": mae_state()}, src)
    (tmp_path / folder).mkdir()
    flags = [
        f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in BUILD.items()
    ]
    err = _cli_refusal(capsys, ["convert", "--src", str(src), "--dst", str(tmp_path / "avex"), *flags])
    assert f"error: dst '{tmp_path / folder}' is a folder; give a file path such as" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder, "mae.pth"])


def test_dst_is_never_overwritten_silently_nor_half_written(tmp_path, capsys, monkeypatch) -> None:
    """An existing dst is refused (as timm's checkpoint scripts do) unless --overwrite; a dst under a file is
    refused by name; a write that fails leaves neither file."""
    from pathlib import Path

    import avex.convert as convert_mod
    from avex.cli import main

    src = tmp_path / "mae.pth"
    torch.save({"model": mae_state()}, src)
    first = convert_mae_checkpoint(src, tmp_path / "avex", **BUILD)
    before = first.read_bytes(), first.with_suffix(".json").read_text()
    for dst in ("avex", "avex.json", "avex.safetensors"):
        with pytest.raises(ValueError, match="already exists: pass another dst, or overwrite=True"):
            convert_mae_checkpoint(src, tmp_path / dst, **BUILD)
    assert (first.read_bytes(), first.with_suffix(".json").read_text()) == before
    flags = [
        f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in BUILD.items()
    ]
    argv = ["convert", "--src", str(src), "--dst", str(tmp_path / "avex"), *flags]
    assert "--overwrite" in _cli_refusal(capsys, argv)
    assert main([*argv, "--overwrite", "--half"]) == 0
    assert first.stat().st_size < len(before[0])  # replaced by the fp16 weights
    (tmp_path / "afile").write_text("x")
    under_a_file = _cli_refusal(capsys, [*argv[:4], str(tmp_path / "afile" / "m"), *flags])
    assert "afile' exists and is not a folder" in under_a_file
    err = _cli_refusal(capsys, [*argv, "--img-size", "32,7,48"])
    assert "--img-size takes one side or H,W, got 32,7,48" in err

    def fail(tore, path, meta=None, half=False):  # the disk fills after the weights are written
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_mod, "save_tore", fail)
    with pytest.raises(OSError):
        convert_mae_checkpoint(src, tmp_path / "other", **BUILD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "avex.json", "avex.safetensors", "mae.pth"]

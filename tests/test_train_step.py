"""The training step's fused and graphed forms (avex.train.fused, avex.train.kernels, avex.train.step).

On the CPU: the fused objective gives the eager objective's losses and gradients up to fp32 rounding; the
attention backward kernel runs under Triton's interpreter; ``--fused-step`` / ``--cuda-graphs`` ``auto`` run the
eager step with identical numbers; the options are resolved and refused as documented; the optimiser state is
created without moving anything; the batch sampler's torch composition equals a NumPy rendering. The CUDA tests
(``-k cuda``) compare bf16 kernels and the graphed step with the eager ones.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fused_kit import fused_equals_eager, loss_and_grads, random_batch
from script_kit import interpreted
from train_kit import single_config, tiny_tore

from avex.data import FashionMNISTCanvas
from avex.train import (
    FusedObjective,
    StepPlan,
    TOREObjective,
    TrainConfig,
    make_optimizer,
    plan_step,
    resolve_config,
    train_classifier,
)
from avex.train.fused import fused_refusal
from avex.train.step import init_optimizer_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


_model = tiny_tore
_batch = random_batch
_loss_and_grads = loss_and_grads


# ------------------------------------------------------------------------------------------------
# The fused objective equals the eager one (CPU, fp32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("img_size", "in_chans", "T", "recon", "kw"),
    [
        (48, 1, 3, 0.1, {}),  # the reconstruction term on: 3 of 9 tiles seen
        (48, 1, 9, 0.1, {}),  # every patch seen: the term is 0, the decoder still gets (zero) gradients
        (56, 1, 5, 0.1, {}),  # a grid the glimpse does not divide (shifted lattices)
        (48, 3, 4, 0.1, {}),  # channels: both pixel orders
        (48, 1, 2, 0.0, {}),  # no reconstruction term: no decoder gradient at all
        (48, 1, 4, 0.1, dict(reg_tokens=2, no_embed_class=True)),  # registers, position embedding without prefix
        (48, 1, 3, 0.1, dict(decoder_depth=2)),  # decoder blocks before the last query every row
    ],
)
def test_fused_objective_equals_eager_on_cpu(img_size: int, in_chans: int, T: int, recon: float, kw: dict) -> None:
    torch.manual_seed(0)
    model = _model(img_size, in_chans, **kw)
    geo = model.geometry(2)
    want = [out for _K, out, _grads in fused_equals_eager(model, _batch(model, 6, T), recon)][-1]  # K = depth
    assert (want[2] > 0) == (recon > 0 and T < geo.num_patches // 4), "the term is on while a patch is unseen"


def test_fused_refusal_names_what_it_does_not_cover() -> None:
    assert fused_refusal(_model()) is None
    assert "global_pool" in str(fused_refusal(_model(global_pool="avg")))
    assert fused_refusal(_model(init_values=1e-5)) is None  # layer scale (tests/test_train_fused_ls.py)
    assert "drop_path1 is DropPath(drop_prob=0.1)" in str(fused_refusal(_model(drop_path_rate=0.1)))
    assert "timm's drop_path_rate=0" in str(fused_refusal(_model(drop_path_rate=0.1)))
    with pytest.raises(ValueError, match="--fused-step off"):
        FusedObjective(_model(drop_path_rate=0.1), _model().geometry(2))


# ------------------------------------------------------------------------------------------------
# The attention backward kernel (Triton's interpreter)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="Triton")
def test_train_kernels_under_interpreter() -> None:
    """Attention: output and gradient of the Triton path equal SDPA's (fp32), 1..TRAIN_SHORT tokens through
    train_attention and up to 128 through the register kernels; longer rows and first_query > 0 leave them (for the
    blocked kernels: test_blocked_train_attention_under_interpreter). Layer norm: the Triton backward's three
    gradients equal PyTorch's; so do the linear layer's with the Triton bias gradient."""
    pytest.importorskip("triton")
    out = interpreted("""
        import torch
        import torch.nn.functional as F
        from avex.attention import reference_attention
        from avex.train import kernels as K, rows as R
        gen = torch.Generator().manual_seed(0)
        for s in (1, 5, 16, 17, 49, 64, 65, 100, 128, K.TRAIN_SHORT + 1):
            qkv = torch.randn(3, s, 3 * 2 * 32, generator=gen, requires_grad=True)
            ref_in = qkv.detach().clone().requires_grad_()
            assert K.short_kernel_applies(qkv, 2) == (s <= K.TRAIN_SHORT)
            assert K.blocked_kernel_applies(qkv, 2) == (s <= K.TRAIN_BLOCKED)  # the rows past TRAIN_SHORT
            got, want = K.train_attention(qkv, 2), reference_attention(ref_in, 2)
            g = torch.randn(got.shape, generator=gen)
            got.backward(g)
            want.backward(g)
            assert (got - want).abs().max() < 1e-5 and (qkv.grad - ref_in.grad).abs().max() < 1e-5, s
            if s > 128:  # more than the kernels take
                continue
            direct = K.short_attention_backward(qkv.detach(), g, 2)
            assert (K.short_attention_forward(qkv.detach(), 2) - want).abs().max() < 1e-5, s
            assert (direct - ref_in.grad).abs().max() < 1e-5, s
        qkv = torch.randn(2, 9, 3 * 2 * 32, generator=gen)
        rows = K.train_attention(qkv, 2, first_query=4)
        assert rows.shape == (2, 5, 64) and (rows - reference_attention(qkv, 2)[:, 4:]).abs().max() < 1e-5
        x, w, b = (torch.randn(*sh, generator=gen, requires_grad=True) for sh in ((2, 70, 33), (40, 33), (40,)))
        ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y, y_ref = R.train_linear(x, w, b), F.linear(*ref)
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y))
        assert (y - y_ref).abs().max() < 1e-5
        assert all((got.grad - want.grad).abs().max() < 1e-4 for got, want in zip((x, w, b), ref))
        x = torch.randn(3, 70, 33, generator=gen, requires_grad=True)
        row = torch.randn(1, 1, 33, generator=gen, requires_grad=True)  # a token, as the decoder's mask token
        ref = [t.detach().clone().requires_grad_() for t in (x, row)]
        y, y_ref = R.train_add_row(x, row), ref[0] + ref[1]
        g = torch.randn(y.shape, generator=gen)
        y.backward(g)
        y_ref.backward(g)
        assert (y - y_ref).abs().max() < 1e-6 and row.grad.shape == (1, 1, 33)
        assert all((got.grad - want.grad).abs().max() < 1e-4 for got, want in zip((x, row), ref))
        for shape in ((3, 5, 192), (70, 128), (2, 37, 100)):  # one, several and a partial block of 64 rows
            n = shape[-1]
            x, w, b = (torch.randn(*sh, generator=gen, requires_grad=True) for sh in (shape, (n,), (n,)))
            ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            y, y_ref = R.train_layer_norm(x, w, b, 1e-6), F.layer_norm(ref[0], (n,), ref[1], ref[2], 1e-6)
            g = torch.randn(shape, generator=gen)
            y.backward(g)
            y_ref.backward(g)
            assert (y - y_ref).abs().max() < 1e-5
            for got, want in zip((x, w, b), ref):
                assert (got.grad - want.grad).abs().max() < 2e-5, (shape, (got.grad - want.grad).abs().max())
        # The partials' second stage: P over several blocks of 64 and W over a partial block of 32; none at all.
        part = torch.randn(130, 3, 50, generator=gen)
        assert (R.sum_partials(part, torch.float32) - part.double().sum(0)).abs().max() < 1e-4  # fp32 rounding of ~1e-5
        assert R.sum_partials(part, torch.float16).dtype == torch.float16
        assert R.sum_partials(torch.empty(0, 7), torch.float32).eq(0).all()
        x = torch.randn(1000, 100, generator=gen)  # the first stage over 8 programs, the last partial
        assert (R.column_sum(x) - x.double().sum(0)).abs().max() < 1e-3 and R.column_sum(x[:0]).eq(0).all()  # a row: ~1
        # Other launch settings (as benchmarks/rows_sweep.py sets them): 32 and 256 rows per program, small tiles.
        R.ROW_LAUNCH.update(column_sum=R.RowLaunch(512, 2, 32), layer_norm_backward=R.RowLaunch(512, 8, 256))
        assert R.row_blocks("column_sum", 1000, 100) == (128, 4, 8, 32, 2)
        assert R.row_blocks("layer_norm_backward", 999, 64) == (64, 8, 32, 4, 8)
        assert (R.column_sum(x) - x.double().sum(0)).abs().max() < 1e-3
        x, w, b = (torch.randn(*sh, generator=gen, requires_grad=True) for sh in ((999, 64), (64,), (64,)))
        ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y, y_ref = R.train_layer_norm(x, w, b, 1e-6), F.layer_norm(ref[0], (64,), ref[1], ref[2], 1e-6)
        g = torch.randn(y.shape, generator=gen)
        y.backward(g)
        y_ref.backward(g)
        for got, want in zip((x, w, b), ref):
            assert (got.grad - want.grad).abs().max() < 1e-4, (got.grad - want.grad).abs().max()
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.skipif(sys.platform != "linux", reason="Triton")
def test_blocked_train_attention_under_interpreter() -> None:
    """The blocked kernels (fp32, Triton's interpreter): train_attention's output and qkv gradient equal
    reference_attention's sliced from first_query to 1e-5 (absolute; the values and gradients are O(1)) for S in
    1..TRAIN_BLOCKED and first_query 0, 1, 49, through the path the routing rule names (register kernels for
    first_query 0 and S <= TRAIN_SHORT, blocked kernels up to TRAIN_BLOCKED, SDPA beyond); where the register
    kernels take the call, the blocked functions called directly agree too. Edge cases: identical keys (all scores
    equal), and queries scaled by 1e3: finite (the running maximum is subtracted before exp), and within 1e-3 of
    each tensor's largest magnitude of a float64 reference (scores in the thousands carry fp32 rounding of ~1e-4,
    which the softmax passes on: the fp32 reference is off from float64 by as much); fp16 at the decoder's shape, to
    5e-3; the refusals' messages."""
    pytest.importorskip("triton")
    out = interpreted("""
        import torch
        from avex.attention import reference_attention
        from avex.train import kernels as K
        assert K.TRAIN_SHORT == 128 and K.TRAIN_BLOCKED == 256
        warm = torch.zeros(1, 5, 3 * 2 * 32)
        assert K.short_kernel_applies(warm, 2) and K.blocked_kernel_applies(warm, 2, 1)  # their trials, run once
        taken = []  # which path each train_attention call took
        for name, cls in (("register", K._ShortAttention), ("blocked", K._BlockedAttention)):
            def counted(*args, _apply=cls.apply, _name=name):
                taken.append(_name)
                return _apply(*args)
            cls.apply = counted
        gen = torch.Generator().manual_seed(0)

        def close(a, b, relative):
            assert torch.isfinite(a).all()
            err, tol = (a.double() - b.double()).abs().max().item(), 1e-3 * b.abs().max().item() if relative else 1e-5
            assert err < tol, (err, tol)

        def check(qkv, heads, fq, want_path, relative=False):
            qkv = qkv.detach().requires_grad_()
            ref_in = qkv.detach().clone().to(torch.float64 if relative else qkv.dtype).requires_grad_()
            taken.clear()
            got, want = K.train_attention(qkv, heads, first_query=fq), reference_attention(ref_in, heads)[:, fq:]
            assert taken == ([want_path] if want_path != "sdpa" else []), (qkv.shape, fq, taken)
            g = torch.randn(got.shape, generator=gen)
            got.backward(g)
            want.backward(g.to(want.dtype))
            close(got, want, relative)
            for a, b in zip(qkv.grad.chunk(3, dim=-1), ref_in.grad.chunk(3, dim=-1)):  # q, k, v apart
                close(a, b, relative)
            assert not qkv.grad[:, :fq, : qkv.shape[2] // 3].any()  # rows before first_query are no queries
            if want_path == "register":  # the blocked functions directly where train_attention did not take them
                o, lse = K.blocked_attention_forward(qkv.detach(), heads, fq)
                assert lse.shape == (qkv.shape[0], heads, qkv.shape[1] - fq)
                close(o, want, relative)
                close(K.blocked_attention_backward(qkv.detach(), o, lse, g, heads, fq), ref_in.grad, relative)

        for s in (1, 5, 64, 65, 129, 197, 256):
            for fq in (f for f in (0, 1, 49) if f < s):
                path = "register" if fq == 0 and s <= K.TRAIN_SHORT else "blocked"
                check(torch.randn(2, s, 3 * 2 * 32, generator=gen), 2, fq, path)
        check(torch.randn(2, 197, 3 * 3 * 64, generator=gen), 3, 0, "blocked")  # the aggregator's heads at T = 49
        check(torch.randn(2, K.TRAIN_BLOCKED + 1, 3 * 2 * 32, generator=gen), 2, 1, "sdpa")
        for fq in (0, 49):
            qkv = torch.randn(2, 197, 3, 2, 32, generator=gen)
            same = qkv.clone()
            same[:, :, 1] = qkv[:, :1, 1]  # every key equal: every score of a row equal, a uniform softmax
            check(same.flatten(2), 2, fq, "blocked")
            loud = qkv.clone()
            loud[:, :, 0] *= 1e3  # scores in the thousands: exp overflows unless the maximum is subtracted
            check(loud.flatten(2), 2, fq, "blocked", relative=True)
        # fp16 (tensor-core dots, P and dS cast to the input dtype) against the fp32 reference, to 5e-3 absolute. bf16
        # is left to the CUDA test: this Triton's interpreter gets bf16 dots wrong (the register kernels' too).
        x = torch.randn(2, 197, 3 * 2 * 32, generator=gen).half().requires_grad_()
        ref_in = x.detach().float().requires_grad_()
        got, want = K.train_attention(x, 2, first_query=49), reference_attention(ref_in, 2)[:, 49:]
        g = torch.randn(got.shape, generator=gen)
        got.backward(g.half())
        want.backward(g)
        assert (got.float() - want).abs().max() < 5e-3 and (x.grad.float() - ref_in.grad).abs().max() < 5e-3
        # Launch settings other than the table's (many small blocks: 16-row query and key blocks over 197 tokens)
        # give the same results.
        qkv = torch.randn(2, 197, 3 * 2 * 32, generator=gen)
        ref_in = qkv.clone().requires_grad_()
        want = reference_attention(ref_in, 2)[:, 49:]
        g = torch.randn(want.shape, generator=gen)
        want.backward(g)
        o, lse = K.blocked_attention_forward(qkv, 2, 49, launch=(16, 32, 2, 1))
        close(o, want.detach(), False)
        dqkv = K.blocked_attention_backward(qkv, o, lse, g, 2, 49, launch=((32, 16, 2, 1), (16, 16, 1, 2)))
        close(dqkv, ref_in.grad, False)
        qkv = torch.randn(1, 300, 3 * 2 * 32)
        for args, message in (
            ((qkv, 2), "take 1..256 tokens, got 300: use train_attention"),
            ((qkv[:, :9], 2, 9), "first_query must be in 0..8 .* got 9"),
            ((torch.randn(1, 9, 3 * 2 * 24), 2), "power of two >= 16 .* got Dh=24"),
            ((qkv[:, :9], 2, 0, (48, 64, 4, 3)), "launch must be .* got .48, 64, 4, 3."),
        ):
            try:
                K.blocked_attention_forward(*args[:3], launch=args[3] if len(args) > 3 else None)
            except ValueError as err:
                assert __import__("re").search(message, str(err)), str(err)
            else:
                raise AssertionError(message)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_kernel_family_that_fails_falls_back_with_one_warning() -> None:
    from avex.train import kernels

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C compiler")

    like = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="Triton test-family kernels failed on this machine .*no C compiler"):
        assert not kernels._works("test-family", like, broken)
    assert not kernels._works("test-family", like, broken)  # decided once: no second warning (pytest's filter)
    assert kernels._works("test-identity", like, lambda x: x * 2)
    kernels._WORKING.clear()


def test_row_kernel_helpers_refuse_bad_input() -> None:
    """sum_partials takes fp32 partials only (a bf16 one would have been rounded per program already) and says so
    before any launch; row_blocks names the kernels it knows."""
    pytest.importorskip("triton")
    from avex.train import rows as R

    with pytest.raises(ValueError, match=r"partial must be fp32 per-program sums \[P, \.\.\.\], got torch.bfloat16"):
        R.sum_partials(torch.zeros(3, 4, dtype=torch.bfloat16), torch.bfloat16)
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(\)"):
        R.sum_partials(torch.zeros(()), torch.float32)
    with pytest.raises(ValueError, match=r"kernel must be one of \['column_sum', .*got 'layer_norm'"):
        R.row_blocks("layer_norm", 10, 10)


@pytest.mark.parametrize("kernel", ["residual_norm_backward", "layer_norm_backward", "column_sum"])
def test_row_blocks_spread_few_rows_over_the_gpu(kernel: str) -> None:
    """Given the GPU's multiprocessors, a pass that ROW_LAUNCH's rows would give at most PROGRAMS_PER_SM programs
    per multiprocessor takes the fewest rows per program (halved, down to one tile) that keep it there; a pass with
    more programs keeps ROW_LAUNCH's rows, and so does every pass without a GPU (sms None). Every row is in one
    program."""
    pytest.importorskip("triton")
    from avex.train import rows as R

    tuned, sms = R.ROW_LAUNCH[kernel].rows, 132
    most = R.PROGRAMS_PER_SM * sms
    assert most > 0
    for m in (1, 100, 2_560, 16_384, 30_720, 65_536, 196_608, 1_000_000):
        plain = R.row_blocks(kernel, m, 192)
        assert plain[1] * plain[2] == tuned and plain[3] == -(-m // tuned)
        bn, bm, chunks, programs, warps = R.row_blocks(kernel, m, 192, sms)
        rows = bm * chunks
        assert (bn, bm, warps) == (plain[0], plain[1], plain[4]) and programs == -(-m // rows), (m, rows)
        assert bm <= rows <= tuned and rows & (rows - 1) == 0, (m, rows)
        if plain[3] > most:
            assert rows == tuned, (m, rows)  # enough programs already: nothing changes
        else:
            assert programs <= most and (rows == bm or -(-m // (rows // 2)) > most), (m, rows, programs)
    # a batch of 512 with one glimpse (2,560 iterator rows): more programs than ROW_LAUNCH's 10 (or 20) in all
    assert R.row_blocks(kernel, 2_560, 192, sms)[3] > R.row_blocks(kernel, 2_560, 192)[3]


# ------------------------------------------------------------------------------------------------
# The options: resolution, refusals, and the CPU falling back to the eager step
# ------------------------------------------------------------------------------------------------


def test_plan_step_resolves_auto() -> None:
    model = _model()
    cfg = resolve_config(TrainConfig())
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # planning reads the device type only
    assert plan_step(cfg, model, cpu) == StepPlan(False, False)
    assert plan_step(cfg, model, gpu) == StepPlan(True, True)
    assert plan_step(cfg, model, gpu, world=2) == StepPlan(True, True)  # DDP: the all-reduce inside the graphs
    assert plan_step(replace(cfg, cuda_graphs="off"), model, gpu, world=2) == StepPlan(True, False)
    assert plan_step(replace(cfg, cuda_graphs="on"), model, gpu, world=2) == StepPlan(True, True)
    assert plan_step(replace(cfg, compile=True), model, gpu) == StepPlan(False, False)
    assert plan_step(replace(cfg, cuda_graphs="off"), model, gpu) == StepPlan(True, False)
    assert plan_step(replace(cfg, fused_step="on"), model, cpu) == StepPlan(True, False)
    assert plan_step(cfg, _model(global_pool="avg"), gpu) == StepPlan(False, False)  # auto: what it can


@pytest.mark.parametrize(
    ("change", "device", "message"),
    [
        (dict(cuda_graphs="on"), "cpu", "--cuda-graphs on: they need a CUDA device"),
        (dict(cuda_graphs="on", fused_step="off"), "cuda", "the fused step, which is off"),
        (dict(fused_step="on", global_pool="avg"), "cuda", "--fused-step on: global_pool"),
        (dict(fused_step="yes"), "cpu", "--fused-step must be auto, on or off, got 'yes'"),
    ],
)
def test_plan_step_refuses_on_where_it_cannot_run(change: dict, device: str, message: str) -> None:
    change = dict(change)
    model = _model(global_pool=change.pop("global_pool", "token"))
    cfg = replace(resolve_config(TrainConfig()), **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_step(cfg, model, torch.device(device))


def test_capturable_optimizer_needs_cuda() -> None:
    cfg = resolve_config(TrainConfig())
    with pytest.raises(ValueError, match="capturable optimiser needs a CUDA device"):
        make_optimizer(_model(), cfg, 10, torch.device("cpu"), capturable=True)


def _losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_cpu_options_run_the_eager_step_with_identical_numbers(fmnist_root: Path, tmp_path: Path) -> None:
    """auto/auto (the defaults) and off/off are the same eager step on the CPU; the fused step (on) gives the same
    losses to fp32 rounding."""
    runs = {}
    for name, fused, graphs in (("off", "off", "off"), ("auto", "auto", "auto"), ("fused", "on", "off")):
        cfg = replace(single_config(fmnist_root, tmp_path / name / "ck"), fused_step=fused, cuda_graphs=graphs)
        cfg = replace(cfg, log_every=1, eval_size=8)
        summary = train_classifier(cfg)
        runs[name] = (summary["step"], _losses(tmp_path / name / "log.jsonl"), summary["model"].state_dict())
    assert runs["off"][0] == runs["auto"][0] == "eager" and runs["fused"][0] == "fused"
    assert runs["auto"][1] == runs["off"][1] and len(runs["off"][1]) == cfg.steps
    assert all(torch.equal(v, runs["off"][2][k]) for k, v in runs["auto"][2].items())
    np.testing.assert_allclose(runs["fused"][1], runs["off"][1], rtol=1e-5)
    for k, v in runs["fused"][2].items():
        torch.testing.assert_close(v, runs["off"][2][k], rtol=1e-4, atol=1e-5)


def test_init_optimizer_state_changes_nothing_but_creates_the_state() -> None:
    torch.manual_seed(0)
    model, twin = _model(), _model()
    twin.load_state_dict(model.state_dict())
    cfg = resolve_config(TrainConfig(lr=1e-2))
    opt, _ = make_optimizer(model, cfg, 10, torch.device("cpu"))
    twin_opt, _ = make_optimizer(twin, cfg, 10, torch.device("cpu"))
    params = list(model.parameters())
    init_optimizer_state(opt, params, grad_clip=1.0)
    assert len(opt.state) == len(params) and all(p.grad is None for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))
    for model_, opt_ in ((model, opt), (twin, twin_opt)):  # one real update: the same on both
        for p in model_.parameters():
            p.grad = torch.full_like(p, 0.5)
        opt_.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin.parameters()))


# ------------------------------------------------------------------------------------------------
# The batch sampler: torch composition (the device path) equals a NumPy rendering of the same draws
# ------------------------------------------------------------------------------------------------


def _numpy_canvas(images: np.ndarray, src: FashionMNISTCanvas, lay: dict[str, np.ndarray], row: int) -> np.ndarray:
    s, S, F = src.scale, src.item_size, src.fragment
    canvas = np.zeros((src.canvas_size, src.canvas_size), np.uint8)
    y, x = lay["item_yx"][row]
    canvas[y : y + S, x : x + S] = np.kron(images[lay["index"][row]], np.ones((s, s), np.uint8))
    for k in range(src.n_clutter):
        item = np.kron(images[lay["clutter"][row, k]], np.ones((s, s), np.uint8))
        (sy, sx), (dy, dx) = lay["src"][row, k], lay["dst"][row, k]
        win = canvas[dy : dy + F, dx : dx + F]
        np.maximum(win, item[sy : sy + F, sx : sx + F], out=win)
    return canvas


def test_random_batch_torch_composition_equals_numpy(fmnist_root: Path) -> None:
    """random_batch (what the trainer runs on the device) equals a NumPy rendering of its own draws, row by row."""
    src = FashionMNISTCanvas("train", root=fmnist_root, n_clutter=4)
    canvases, labels = src.random_batch(24, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in random_batch's order

    def draw(lo: int, hi: int, *size: int) -> np.ndarray:
        return torch.randint(lo, hi + 1, size, generator=gen).numpy()

    n, N, B = src.n_clutter, len(src), 24
    lay = dict(index=draw(0, N - 1, B), item_yx=draw(0, src.canvas_size - src.item_size, B, 2))
    clutter = draw(0, N - 2, B, n)
    lay["clutter"] = clutter + (clutter >= lay["index"][:, None])
    lay["src"] = draw(src._src_lo, src._src_hi, B, n, 2)
    lay["dst"] = draw(0, src.canvas_size - src.fragment, B, n, 2)
    images = src.images.numpy()
    for row in range(B):
        np.testing.assert_array_equal(canvases[row, :, :, 0].numpy(), _numpy_canvas(images, src, lay, row))
    assert labels.tolist() == src.labels[torch.from_numpy(lay["index"])].tolist()


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 kernels against the eager step, the graphed step against the fused one
# ------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_train_attention_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    from avex.attention import reference_attention
    from avex.train.kernels import train_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for s in (5, 17, 49, 64):
        qkv = torch.randn(257, s, 3 * 3 * 64, generator=gen, device="cuda").to(dtype).requires_grad_()
        ref_in = qkv.detach().float().requires_grad_()
        got, want = train_attention(qkv, 3), reference_attention(ref_in, 3)
        g = torch.randn(got.shape, generator=gen, device="cuda")
        got.backward(g.to(dtype))
        want.backward(g)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(qkv.grad.float(), ref_in.grad, rtol=tol, atol=tol)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_train_attention_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    """The blocked kernels through train_attention (129..256 tokens, or first_query > 0) against the fp32 reference,
    output and qkv gradient; the routing rule sends exactly these calls to them."""
    from avex.attention import reference_attention
    from avex.train import kernels as K

    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for s in (129, 197, 256):
        for fq in (0, 50):
            qkv = torch.randn(257, s, 3 * 3 * 64, generator=gen, device="cuda").to(dtype).requires_grad_()
            assert K.blocked_kernel_applies(qkv, 3, fq) and not K.short_kernel_applies(qkv, 3)
            ref_in = qkv.detach().float().requires_grad_()
            got, want = K.train_attention(qkv, 3, first_query=fq), reference_attention(ref_in, 3)[:, fq:]
            g = torch.randn(got.shape, generator=gen, device="cuda")
            got.backward(g.to(dtype))
            want.backward(g)
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
            torch.testing.assert_close(qkv.grad.float(), ref_in.grad, rtol=tol, atol=tol)
    # The glimpse decoder's shape: 4 heads of 32, CLS + a 14x14 grid, the unseen patches as queries.
    qkv = torch.randn(64, 197, 3 * 4 * 32, generator=gen, device="cuda").to(dtype).requires_grad_()
    ref_in = qkv.detach().float().requires_grad_()
    got, want = K.train_attention(qkv, 4, first_query=49), reference_attention(ref_in, 4)[:, 49:]
    g = torch.randn(got.shape, generator=gen, device="cuda")
    got.backward(g.to(dtype))
    want.backward(g)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(qkv.grad.float(), ref_in.grad, rtol=tol, atol=tol)


@cuda
def test_train_layer_norm_matches_pytorch_on_cuda() -> None:
    from avex.train.rows import train_layer_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, n in ((95_000, 192), (1024 * 197, 128), (37, 100)):
        x = torch.randn(rows, n, generator=gen, device="cuda").bfloat16().requires_grad_()
        w, b = (torch.randn(n, generator=gen, device="cuda").bfloat16().requires_grad_() for _ in range(2))
        ref = [t.detach().float().requires_grad_() for t in (x, w, b)]
        y = train_layer_norm(x, w, b, 1e-6)
        y_ref = torch.nn.functional.layer_norm(ref[0], (n,), ref[1], ref[2], 1e-6)
        g = torch.randn(rows, n, generator=gen, device="cuda")
        y.backward(g.bfloat16())
        y_ref.backward(g)
        torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=3e-2)
        for got, want in zip((x, w, b), ref):
            scale = want.grad.abs().max()
            assert (got.grad.float() - want.grad).abs().max() < 2e-2 * scale, (rows, n)


@cuda
def test_fused_bf16_objective_close_to_eager_autocast_on_cuda() -> None:
    from avex.train.runtime import autocast

    torch.manual_seed(0)
    model = _model(112, depth=6, embed_dim=192, num_heads=3).cuda()
    geo = model.geometry(2)
    fused = FusedObjective(model, geo, 0.1, 0.1, dtype=torch.bfloat16)
    eager = TOREObjective(model, geo, 0.1, 0.1)
    for T, K in ((3, 0), (12, 3), (30, 6), (49, 2)):
        batch = _batch(model, 64, T, device="cuda")
        with autocast(torch.device("cuda"), True):
            want, want_grads = _loss_and_grads(eager, model, batch, K)
        got, got_grads = _loss_and_grads(fused, model, batch, K)
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
        flat = [torch.cat([g[n].flatten() for n in want_grads]) for g in (got_grads, want_grads)]
        assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99, (T, K)


@cuda
def test_graphed_step_equals_fused_step_on_cuda() -> None:
    """Four steps (a repeated (K, T) replays its graph) give the fused eager step's losses and weights."""
    from avex.train.step import make_step

    torch.manual_seed(0)
    models = [_model(112, depth=6, embed_dim=192, num_heads=3).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = resolve_config(TrainConfig(lr=1e-3))
    stats = []
    for model, graphs in zip(models, (False, True)):
        opt, sched = make_optimizer(model, cfg, 100, torch.device("cuda"), capturable=graphs)
        objective = FusedObjective(model, model.geometry(2), 0.1, 0.1, dtype=torch.bfloat16)
        step = make_step(StepPlan(True, graphs), objective, model, opt, True, 1.0)
        out = []
        for i, (K, T) in enumerate(((2, 5), (4, 20), (2, 5), (0, 49))):
            out.append(step(_batch(model, 128, T, seed=i, device="cuda"), K))
            sched.step()
        stats.append(torch.stack(out))
    torch.testing.assert_close(stats[1], stats[0], rtol=2e-3, atol=2e-3)
    # AdamW normalises each gradient element, so where a gradient is zero but for rounding (the capturable and the
    # plain optimiser round differently) it still steps by up to lr, either way: the H200 runs of 2026-12-01 saw the
    # attention's key bias (the softmax cancels q.b_k: all of it) and a few elements of fc1's weight move apart by
    # 9e-4, and one of block 2's 192 projection biases 2e-4. So every element stays within 4 steps of lr = 1e-3
    # both ways, and all but 0.1% of each tensor, or 2 elements of a small one (all but the key bias), within
    # 1e-4 + 1e-3 |w|: a graph that replays stale inputs moves whole tensors.
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        diff = (q - p).abs()
        assert diff.max() <= 2 * 4 * 1e-3, (name, diff.max().item())
        off = diff > 1e-4 + 1e-3 * p.abs()
        if name.endswith("qkv.bias"):
            d = p.numel() // 3
            off = torch.cat([off[:d], off[2 * d :]])
        assert off.sum() <= max(2, 1e-3 * off.numel()), (name, int(off.sum()), off.numel(), diff.max().item())

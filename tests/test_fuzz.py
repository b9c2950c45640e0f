"""Property-based fuzzing (hypothesis): bad actions, make and reset arguments, image files and checkpoints.

Each property is "a documented error, and nothing changed": a bad input raises ValueError (FileNotFoundError
for a missing file) within a bounded time, and leaves every piece of episode state and every generator as
it was; a file that can be read gives a well-formed result, one that cannot is skipped and counted the same
way each time. Example counts are modest so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_kit import (
    FM,
    assert_same_state,
    fm_env,
    fm_vector,
    folder_env,
    image_folder,
    snapshot,
    tiny_checkpoint,
)
from safetensors.torch import load_file, save_file

from avex.checkpoint import load_tore
from avex.data import DATASETS
from envs import AVEEnv

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ALLOWED = (ValueError, FileNotFoundError)  # the documented refusals
A = 169  # glimpse positions of the Fashion-MNIST envs here (13 x 13)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(fake_fmnist_root: Path) -> Path:
    return fake_fmnist_root


def _refused(call: Any, *args: Any, **kwargs: Any) -> BaseException:
    """Run ``call``; it must raise one of :data:`ALLOWED`, fast and with a short message."""
    t0 = time.perf_counter()
    with pytest.raises(ALLOWED) as info:
        call(*args, **kwargs)
    assert time.perf_counter() - t0 < 10, "a refusal took too long"
    assert len(str(info.value)) < 2000, "a refusal echoed too much"
    return info.value


# ------------------------------------------------------------------ actions
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
bad_discrete = st.one_of(
    anything,
    st.integers().filter(lambda a: not 0 <= a < A),
    st.just(10),  # taken by the first glimpse: masked, so refused with strict=True (the env below)
    st.floats(0, A - 1),  # integral or not, a float is not an action
    st.lists(st.integers(0, A - 1), min_size=2, max_size=6),  # the wrong shape
    st.lists(st.integers(0, A - 1), min_size=1, max_size=3).map(lambda a: np.array([a])),
    st.integers(0, A - 1).map(lambda a: np.array(a, dtype=np.float32)),
    st.lists(anything, min_size=1, max_size=3),
)
bad_continuous = st.one_of(
    anything,
    st.lists(st.floats(0, 1), min_size=0, max_size=6).filter(lambda a: len(a) != 3),
    st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True), st.floats(allow_nan=True)).filter(
        lambda a: not all(0 <= v <= 1 for v in a)
    ),
    st.lists(st.text(max_size=2), min_size=3, max_size=3),
)


@pytest.mark.parametrize("mode, bad", [("discrete", bad_discrete), ("continuous", bad_continuous)])
def test_bad_actions_are_refused_and_change_nothing(root, mode, bad):
    # strict=True: a repeat is refused too (by default it is a valid action, taken and flagged).
    env, twin = fm_env(root, action_mode=mode, strict=True), fm_env(root, action_mode=mode, strict=True)
    first = 10 if mode == "discrete" else np.array([0.3, 0.6, 0.2], dtype=np.float32)
    for e in (env, twin):
        e.reset(seed=4)
        e.step(first)

    @FUZZ
    @given(action=bad)
    def refused(action: Any) -> None:
        before = snapshot(env.engine, [env.np_random])
        _refused(env.step, action)
        assert_same_state(before, snapshot(env.engine, [env.np_random]))

    refused()
    good = 11 if mode == "discrete" else np.array([0.5, 0.5, 0.0], dtype=np.float32)
    o1, r1, *_ = env.step(good)
    o2, r2, *_ = twin.step(good)  # the refused actions left no trace
    assert r1 == r2 and all(np.array_equal(o1[k], o2[k]) for k in o1)


# ------------------------------------------------------------------ make and reset arguments
not_bool = st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats(), st.lists(st.booleans(), max_size=2))
not_int = st.one_of(st.floats(), st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=2))
BAD_ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "budget": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=A + 1)),
    "glimpse": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=15)),
    "K": st.one_of(not_int, st.integers(max_value=-1), st.integers(min_value=3)),
    "patch": st.one_of(not_int, st.integers(max_value=0), st.integers(min_value=113)),
    "image_size": st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=2049),
        st.floats(),
        st.text(max_size=4),
        st.lists(st.integers(1, 200), max_size=4).filter(lambda s: len(s) != 2),
    ),
    "max_ratio": st.one_of(st.floats().filter(lambda r: not 0 < r <= 1), st.booleans(), st.text(max_size=3)),
    "device": st.one_of(st.sampled_from(["meta", "xpu", "tpu", "", "cuda:99", "cpu:x", "mps"]), st.integers()),
    "dtype": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("float32", "bfloat16")), st.integers()),
    "reward": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("dense", "sparse")), st.none()),
    "action_mode": st.text(max_size=6).filter(lambda s: s not in ("discrete", "continuous")),
    "positions": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("overlapping", "grid")), st.integers()),
    "dataset": st.one_of(st.text(max_size=6).filter(lambda s: s not in DATASETS), st.integers()),
    "split": st.one_of(st.integers(), st.sampled_from(["val", "nope", "../train"])),
    "model": st.one_of(
        st.integers(), st.sampled_from(["resnet18", "nope", "vit_nope_patch16_224", "vit_tiny_r_s16_p8_224"])
    ),
    "checkpoint": st.one_of(
        st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2), st.just("/no/such/file.safetensors")
    ),
    "model_kwargs": st.one_of(
        st.integers(),
        st.text(max_size=3),
        st.sampled_from([{"depth": -1}, {"embed_dim": 30, "num_heads": 4}, {"weights": "x.pth"}, {1: 2}]),
    ),
    "entropy": not_bool,
    "allow_repeats": not_bool,
    "strict": not_bool,
    "pretrained": not_bool,
    "cache_images": not_bool,
    "clutter": st.one_of(st.integers(max_value=-1), st.integers(min_value=50), st.floats(), st.text(max_size=3)),
    "root": st.one_of(st.integers(), st.just("/no/such/folder")),
}


@FUZZ
@given(data=st.data())
def test_bad_make_arguments_are_refused(root, data):
    name = data.draw(st.sampled_from(sorted(BAD_ARGUMENTS)), label="argument")
    value = data.draw(BAD_ARGUMENTS[name], label=name)
    if name == "model_kwargs" and isinstance(value, dict) and "depth" not in value:
        value = {"depth": 2, **value}  # keep the model tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _refused(AVEEnv, **{**FM, "root": str(root), name: value})


@FUZZ
@given(name=st.text(min_size=1, max_size=10).filter(lambda s: s not in AVEEnv.__init__.__code__.co_varnames))
def test_unknown_arguments_are_refused(root, name):
    from envs.config import EnvConfig

    if name in {f for f in EnvConfig.__dataclass_fields__} | {"clutter", "scale", "fragment"}:
        return
    error = _refused(AVEEnv, **{**FM, "root": str(root), name: 1})
    assert "unknown environment argument" in str(error)


bad_seed = st.one_of(
    st.integers(max_value=-1), st.floats(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2)
)
bad_options = st.one_of(
    st.integers(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5).filter(lambda k: k not in ("index", "reset_mask")), st.integers(), min_size=1),
    st.fixed_dictionaries({"index": st.one_of(st.integers().filter(lambda i: not 0 <= i < 40), not_int, st.none())}),
)


def test_bad_reset_arguments_change_nothing(root):
    env = fm_env(root)
    env.reset(seed=1)
    env.step(3)

    @FUZZ
    @given(seed=st.one_of(bad_seed, st.none()), options=st.one_of(bad_options, st.none()))
    def refused(seed: Any, options: Any) -> None:
        if seed is None and (options is None or options == {"index": None}):
            return  # a valid reset
        before = snapshot(env.engine, [env.np_random])
        _refused(env.reset, seed=seed, options=options)
        assert_same_state(before, snapshot(env.engine, [env.np_random]))

    refused()


def test_bad_vector_resets_change_nothing(root):
    v = fm_vector(root, 3)
    v.reset(seed=1)
    v.step(np.array([0, 1, 2]))
    one = st.one_of(st.none(), st.integers(0, 2**32))
    bad_vector_seed = st.one_of(
        bad_seed.filter(lambda s: not isinstance(s, list)),
        st.lists(one, max_size=5).filter(lambda s: len(s) != 3),
        st.tuples(one, bad_seed, one).map(list),
    )
    bad_vector_options = st.one_of(
        bad_options.filter(lambda o: o != {"index": None}),
        st.fixed_dictionaries({"reset_mask": st.one_of(st.lists(st.booleans(), max_size=4), not_int)}).filter(
            lambda o: not (isinstance(o["reset_mask"], list) and len(o["reset_mask"]) == 3 and any(o["reset_mask"]))
        ),
        st.fixed_dictionaries({"index": st.lists(st.one_of(st.none(), st.integers(0, 39)), max_size=5)}).filter(
            lambda o: len(o["index"]) != 3
        ),
    )

    @FUZZ
    @given(
        args=st.one_of(
            st.tuples(bad_vector_seed, st.none()),
            st.tuples(st.integers(0, 9), bad_vector_options),
        )
    )
    def refused(args: tuple[Any, Any]) -> None:
        seed, options = args
        before = snapshot(v.engine, v.env_rngs)
        _refused(v.reset, seed=seed, options=options)
        assert_same_state(before, snapshot(v.engine, v.env_rngs))

    refused()


# ------------------------------------------------------------------ image files
def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file suffix, contents): valid images of odd sizes, modes and formats, damaged ones, noise."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "noise"]))
    if kind == "noise":
        return draw(st.sampled_from([".jpg", ".png", ".gif", ".bmp", ".webp"])), draw(st.binary(max_size=300))
    mode, fmt = draw(
        st.sampled_from(
            [
                ("L", "PNG"),
                ("RGB", "JPEG"),
                ("RGBA", "PNG"),
                ("P", "GIF"),
                ("1", "BMP"),
                ("I;16", "PNG"),
                ("RGB", "WEBP"),
            ]
        )
    )
    w = draw(st.sampled_from([1, 2, 7, 33, 100]))
    h = draw(st.sampled_from([1, 3, 31, 64, 5000])) if draw(st.booleans()) else w
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    data = _encode(image, fmt)
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flipped":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    suffix = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}[fmt]
    return suffix, data


@FUZZ
@given(file=image_files())
def test_any_image_file_is_read_or_skipped_and_counted(tmp_path_factory, file):
    suffix, data = file
    folder = image_folder(tmp_path_factory.mktemp("images"))
    (folder / "a" / f"fuzz{suffix}").write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = folder_env(folder, entropy=False)
        fuzz = next(i for i, f in enumerate(env.engine.source.files) if f.stem == "fuzz")
        t0 = time.perf_counter()
        results = []
        for _ in range(2):
            obs, info = env.reset(seed=5, options={"index": fuzz})
            results.append((info, env.engine.hidden[0].clone()))
        assert time.perf_counter() - t0 < 10
    (info, hidden), (info2, hidden2) = results
    assert obs["canvas"].shape == (32, 32, 3) and hidden.dtype == torch.uint8 and torch.equal(hidden, hidden2)
    if info["index"] == fuzz:  # read
        assert info["skipped_images"] == 0
    else:  # skipped: warned about once, counted in every episode that passed over it
        assert info["skipped_images"] >= 1
        assert sum("fuzz" in str(w.message) for w in caught) == 1
    assert info.keys() == info2.keys()
    for key in info:  # the same seed, the same info (NaN boxes compare equal here)
        np.testing.assert_array_equal(info[key], info2[key], err_msg=key)


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("good") / "tiny")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
BUILD_KEYS = [
    "model",
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "depth",
    "embed_dim",
    "num_heads",
    "decoder_dim",
    "decoder_heads",
    "decoder_depth",
    "decoder_pos",
    "mean",
    "std",
    "weights",
    "checkpoint_path",
    "class_token",
    "no_embed_class",
    "reg_tokens",
    "mlp_ratio",
]


@st.composite
def damaged_checkpoints(draw: st.DrawFn) -> tuple[str, Any]:
    """A change to a good checkpoint's JSON or safetensors file."""
    kind = draw(st.sampled_from(["json", "build", "drop", "weights bytes", "tensor", "extra tensor"]))
    if kind == "json":
        return kind, draw(json_values)
    if kind == "build":
        return kind, (draw(st.sampled_from(BUILD_KEYS)), draw(json_values))
    if kind == "drop":
        return kind, draw(st.sampled_from(["format", "build", "model", "depth", "img_size", "embed_dim"]))
    if kind == "weights bytes":
        return kind, (draw(st.integers(0, 400)), draw(st.sampled_from(["truncate", "flip"])))
    change = draw(st.sampled_from(["int32", "bool", "float64", "nan", "inf", "shape", "drop"]))
    return kind, (draw(st.sampled_from(["vit.head.bias", "vit.pos_embed", "decoder.mask_token"])), change)


def _damage(path: Path, kind: str, how: Any) -> None:
    config = path.with_suffix(".json")
    cfg = json.loads(config.read_text())
    if kind == "json":
        cfg = how
    elif kind == "build":
        cfg["build"][how[0]] = how[1]
    elif kind == "drop":
        (cfg["build"] if how in cfg["build"] else cfg).pop(how, None)
    elif kind == "weights bytes":
        at, op = how
        data = path.read_bytes()
        at = min(at, len(data) - 1)
        path.write_bytes(data[:at] if op == "truncate" else data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    else:
        state = load_file(str(path))
        name, change = how
        t = state[name]
        if kind == "extra tensor":
            state[name + "_extra"] = t.clone()
        elif change == "drop":
            del state[name]
        else:
            state[name] = {
                "int32": lambda: t.to(torch.int32),
                "bool": lambda: t > 0,
                "float64": lambda: t.double(),  # a float type: loads (cast), like float16
                "nan": lambda: t.clone().fill_(math.nan),
                "inf": lambda: t.clone().fill_(-math.inf),
                "shape": lambda: torch.cat([t.flatten(), t.flatten()]),
            }[change]()
        save_file(state, str(path))
    config.write_text(json.dumps(cfg))


@FUZZ
@given(damage=damaged_checkpoints())
def test_damaged_checkpoints_are_refused_or_load_whole(good_checkpoint, tmp_path_factory, damage):
    kind, how = damage
    path = tmp_path_factory.mktemp("damaged") / "c.safetensors"
    shutil.copy(good_checkpoint, path)
    shutil.copy(good_checkpoint.with_suffix(".json"), path.with_suffix(".json"))
    _damage(path, kind, how)
    t0 = time.perf_counter()
    try:
        model = load_tore(path)
    except ALLOWED as err:
        assert len(str(err)) < 2000
    else:  # a harmless change (heads that keep every shape, float64 weights, a flipped data byte)
        assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    assert time.perf_counter() - t0 < 10

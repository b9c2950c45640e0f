"""Tests for the AVE environments (envs/): single, vector, SB3 adapter, rendering, errors.

CPU only, no network, no real data: fake Fashion-MNIST IDX files and tiny JPEG folders are written by
session fixtures, and every env uses a tiny random ViT (depth 2, width 32) through ``model_kwargs``.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image

from avex.checkpoint import save_tore
from avex.flops import ViTDims, step_flops
from avex.model import create_tore
from envs import AVEEnv, AVEVectorEnv
from envs.registration import env_ids
from envs.render import _DIM, BOX_COLORS, prediction_panel, record_episode

TINY = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
)
WNIDS = ("n01440764", "n01443537", "n01484850")
N_TRAIN = 16
# Every id the registry gives (Minigrid's habit: the env tests run over the registry).
ENV_SPECS = {env_id: gym.spec(env_id).kwargs for env_id in env_ids().values()}
IDS = sorted(ENV_SPECS)


# ----------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake Fashion-MNIST: the four IDX files (magic 2051 images, 2049 labels), 16 train / 8 test items."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", 8)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as f:
        assert struct.unpack(">I", f.read(4))[0] == 2051
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "rb") as f:
        assert struct.unpack(">I", f.read(4))[0] == 2049
    return root


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake ImageNet: root/val/<wnid>/*.JPEG, 3 real wnids with 2 tiny RGB images each."""
    root = tmp_path_factory.mktemp("imagenet")
    for c, wnid in enumerate(WNIDS):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for j in range(2):
            _jpeg(folder / f"ILSVRC2012_val_{c}{j}.JPEG", seed=10 * c + j)
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for j in range(2):
            _jpeg(root / name / f"{j}.jpg", seed=100 + 10 * c + j)
    return root


@pytest.fixture(scope="session")
def roots(fmnist_root: Path, imagenet_root: Path, folder_root: Path) -> dict[str, Path]:
    return {"AVE-FashionMNIST-v0": fmnist_root, "AVE-ImageNet-v0": imagenet_root, "AVE-ImageFolder-v0": folder_root}


def kwargs_for(env_id: str, roots: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """An id's registered kwargs with overrides for a fast CPU test: tiny model, small canvases.

    Complete (not just the overrides), so that gym.make, gym.make_vec and the classes built directly
    all get the same environment.
    """
    kw: dict[str, Any] = dict(ENV_SPECS[env_id])
    kw.update(root=str(roots[env_id]), **TINY)
    if env_id != "AVE-FashionMNIST-v0":
        kw.update(image_size=64, patch=8)  # 8x8 patch grid, 49 glimpse positions
    kw.update(extra)
    return kw


def make(env_id: str, roots: dict[str, Path], **extra: Any) -> AVEEnv:
    return gym.make(env_id, **kwargs_for(env_id, roots, **extra)).unwrapped


def fm(roots: dict[str, Path], **extra: Any) -> AVEEnv:
    return make("AVE-FashionMNIST-v0", roots, **extra)


def random_masked_rollout(env: AVEEnv, seed: int, rng_seed: int = 0, options: dict | None = None) -> list[tuple]:
    """Reset with ``seed`` and take random allowed actions to the end; returns every (obs, reward, term, info)."""
    rng = np.random.default_rng(rng_seed)
    obs, info = env.reset(seed=seed, options=options)
    out = [(obs, 0.0, False, info)]
    done = False
    while not done:
        action = int(rng.choice(np.flatnonzero(env.action_masks())))
        obs, reward, done, truncated, info = env.step(action)
        assert truncated is False
        out.append((obs, reward, done, info))
    return out


def assert_obs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(x, y, err_msg=k)


def assert_info_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ------------------------------------------------------------- API checks
@pytest.mark.parametrize("mode", ["discrete", "continuous"])
@pytest.mark.parametrize("env_id", IDS)
def test_gymnasium_and_sb3_check_env(env_id: str, mode: str, roots):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make(env_id, roots, action_mode=mode)
    assert isinstance(env, AVEEnv)
    check_env(env, skip_render_check=True)
    # SB3's checker draws unmasked random actions: any action of the space is valid (a repeat is flagged).
    sb3_check_env(env)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(
        env.action_space.sample(mask=info["action_mask"]) if mode == "discrete" else env.action_space.sample()
    )
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    assert env.observation_space.contains(obs)
    assert type(info["prediction"]) is int and type(info["correct"]) is bool and type(info["label"]) is int
    assert info["glimpse_box"].dtype == np.float32 and info["action_mask"].dtype == np.int8


def test_spaces_and_defaults(roots):
    env = fm(roots)
    m = env.model
    assert env.engine.K == m.depth // 2  # K=None -> depth // 2
    space = env.observation_space
    assert space["canvas"].shape == (112, 112, 1) and space["canvas"].dtype == np.uint8
    assert space["visited"].shape == (14, 14) and space["step"].shape == (1,) and space["step"].high[0] == 12
    assert space["probs"].shape == (10,) and space["cls"].shape == (32,) and space["entropy"].shape == (14, 14)
    assert env.action_space == gym.spaces.Discrete(13 * 13)
    grid = fm(roots, positions="grid")
    assert grid.action_space.n == 7 * 7
    cont = fm(roots, action_mode="continuous")
    assert cont.action_space == gym.spaces.Box(0, 1, (3,), np.float32)


# ------------------------------------------------------------- determinism
def test_same_seed_same_rollout(roots):
    a, b = fm(roots), fm(roots)
    ra, rb = random_masked_rollout(a, seed=5), random_masked_rollout(b, seed=5)
    assert len(ra) == len(rb) == 13
    for (oa, wa, ta, ia), (ob, wb, tb, ib) in zip(ra, rb):
        assert_obs_equal(oa, ob)
        assert wa == wb and ta == tb
        assert_info_equal(ia, ib)
    other = random_masked_rollout(b, seed=6)
    assert not all(np.array_equal(x[0]["canvas"], y[0]["canvas"]) for x, y in zip(ra[1:], other[1:]))


def test_reset_index_option(roots):
    env = fm(roots)
    labels = np.arange(N_TRAIN) % 10
    for i in (0, 3, N_TRAIN - 1):
        _, info = env.reset(seed=1, options={"index": i})
        assert info["index"] == i and info["label"] == labels[i]


def test_pickle_round_trip_mid_episode(roots):
    env = gym.make("AVE-FashionMNIST-v0", **kwargs_for("AVE-FashionMNIST-v0", roots))
    env.reset(seed=2)
    env.step(3)
    env.step(40)
    blob = pickle.dumps(env)
    copy = pickle.loads(blob)
    assert copy.unwrapped.model is env.unwrapped.model  # shared again, not a pickled copy
    assert len(blob) < 1_000_000  # neither the model nor the data set travel
    for action in (77, 100):
        o1, r1, t1, _, i1 = env.step(action)
        o2, r2, t2, _, i2 = copy.step(action)
        assert_obs_equal(o1, o2)
        assert r1 == r2 and t1 == t2
        assert_info_equal(i1, i2)
    # The unpickled env continues the same random stream on its next reset.
    assert_obs_equal(env.reset()[0], copy.reset()[0])


# --------------------------------------------------------------------- masks
@pytest.mark.parametrize("positions", ["overlapping", "grid"])
def test_masks_never_allow_a_repeat(roots, positions):
    budget = 49 if positions == "grid" else 12  # "grid": every one of the 7x7 tiles, mask ends all False
    env = fm(roots, positions=positions, budget=budget)
    for seed in range(3):
        steps = random_masked_rollout(env, seed=seed, rng_seed=seed)
        taken = []
        for t, (_, _, _, info) in enumerate(steps):
            mask = info["action_mask"]
            assert mask.sum() == env.action_space.n - t
            assert not mask[taken].any()
            if t < len(steps) - 1:
                box = steps[t + 1][3]["glimpse_box"]
                row, col = int(box[0]) // 8, int(box[1]) // 8
                taken.append(int(env.engine.geometry.patch_to_action(row, col)))
        assert len(set(taken)) == len(taken) == budget
        np.testing.assert_array_equal(env.action_masks(), steps[-1][3]["action_mask"].astype(bool))
    assert not env.action_masks().any() if positions == "grid" else env.action_masks().any()


def test_allow_repeats(roots):
    env = fm(roots, allow_repeats=True, strict=True)  # nothing is masked, so strict refuses nothing
    env.reset(seed=0)
    env.step(4)
    _, _, _, _, info = env.step(4)
    assert info["action_mask"].all() and env.action_masks().all() and info["repeated"]


# ----------------------------------------------------------------- bad input
def _twins_after_one_glimpse(roots, **extra: Any) -> tuple[AVEEnv, AVEEnv]:
    """Two envs in the same state (seed 4, glimpse 10): one to hit with a bad action, one untouched."""
    env, ref = fm(roots, **extra), fm(roots, **extra)
    for e in (env, ref):
        e.reset(seed=4)
        e.step(10)
    return env, ref


def _assert_same_next_step(env: AVEEnv, ref: AVEEnv, action: int) -> None:
    """The same next step from both: the refused action left no trace."""
    o1, r1, _, _, i1 = env.step(action)
    o2, r2, _, _, i2 = ref.step(action)
    assert_obs_equal(o1, o2)
    assert r1 == r2
    assert_info_equal(i1, i2)


def _state(env: AVEEnv) -> tuple:
    e = env.engine
    return e.steps.copy(), e.used.copy(), e.seen.clone(), e.cache.buf.clone(), e.logits.clone()


@pytest.mark.parametrize("bad", [169, -1, 3.0, True, "7", [1, 2], np.array([[1]]), None])
def test_invalid_discrete_action_changes_nothing(roots, bad):
    env, ref = _twins_after_one_glimpse(roots)
    before = _state(env)
    with pytest.raises(ValueError, match=r"action|integer"):
        env.step(bad)
    after = _state(env)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert all(torch.equal(x, y) for x, y in zip(before[2:], after[2:]))
    _assert_same_next_step(env, ref, 11)


def test_strict_refuses_a_masked_action_and_changes_nothing(roots):
    env, ref = _twins_after_one_glimpse(roots, strict=True)
    buf = env.engine.cache.buf.clone()
    with pytest.raises(ValueError, match=r"already taken.*strict=True refuses it.*strict=False"):
        env.step(10)
    assert torch.equal(buf, env.engine.cache.buf) and env.engine.steps[0] == 1
    assert env.action_masks()[10] == 0 and env.action_masks().sum() == env.action_space.n - 1
    _assert_same_next_step(env, ref, 12)


@pytest.mark.parametrize("bad", [[0.5, 0.5, 1.5], [-0.1, 0, 0], [np.nan, 0, 0], [0.5, 0.5], "abc"])
def test_invalid_continuous_action(roots, bad):
    env = fm(roots, action_mode="continuous")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"continuous|\[0, 1\]"):
        env.step(bad)
    assert env.engine.steps[0] == 0
    env.step(np.array([0.5, 0.5, 0.0], dtype=np.float32))


def test_step_before_reset_and_after_end(roots):
    env = fm(roots, budget=2)
    with pytest.raises(ValueError, match=r"reset\(\)"):
        env.step(0)
    env.reset(seed=0)
    env.step(0)
    *_, terminated, _, _ = env.step(1)
    assert terminated
    with pytest.raises(ValueError, match="episode is over"):
        env.step(2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reward="foo"), r"reward must be one of \['dense', 'sparse'.*\], got 'foo'"),
        (dict(action_mode="bar"), r"action_mode must be one of \['discrete', 'continuous'\]"),
        (dict(positions="diagonal"), r"positions must be one of"),
        (dict(positions="grid", action_mode="continuous"), r"positions='grid' sets the discrete mode's lattice"),
        (dict(dataset="mnist"), r"dataset must be one of \[.*'fashion-mnist'.*'imagenet'.*\], got 'mnist'"),
        (dict(K=3), r"K must be an integer in 0\.\.2"),
        (dict(K=-1), r"K must be an integer >= 0"),
        (dict(budget=0), r"budget must be an integer >= 1"),
        (dict(positions="grid", budget=50), r"budget=50 exceeds the 49 distinct glimpse positions"),
        (dict(glimpse=15), r"glimpse must be in 1\.\.14"),
        (dict(foo=1), r"unknown environment argument\(s\) \['foo'\]; allowed: \["),
        # The id's registered kwargs carry its data set's options: another dataset= is pointed to its own id.
        (dict(dataset="imagenet"), r"\['clutter', 'fragment', 'scale'\] are options of .*make 'AVE-ImageNet-v0'"),
        (dict(device="tpu"), r"device must be"),
        (dict(entropy="yes"), r"entropy must be True or False"),
        (dict(max_ratio=2.0), r"max_ratio must be"),
    ],
)
def test_bad_kwargs(roots, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fm(roots, **kwargs)


def test_bad_reset_options(roots):
    env = fm(roots)
    env.reset(seed=0)
    env.step(5)
    with pytest.raises(ValueError, match=rf"options\['index'\] must be an integer in 0\.\.{N_TRAIN - 1}"):
        env.reset(options={"index": N_TRAIN})
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['colour'\]"):
        env.reset(options={"colour": 1})
    assert env.engine.steps[0] == 1  # the episode goes on
    env.step(6)


def test_missing_imagenet_root_names_both_ways(roots, monkeypatch):
    monkeypatch.delenv("AVEX_IMAGENET", raising=False)
    kw = kwargs_for("AVE-ImageNet-v0", roots)
    del kw["root"]
    with pytest.raises(ValueError, match=r"root=.*AVEX_IMAGENET"):
        gym.make("AVE-ImageNet-v0", **kw)
    monkeypatch.setenv("AVEX_IMAGENET", str(roots["AVE-ImageNet-v0"]))
    env = gym.make("AVE-ImageNet-v0", **kw).unwrapped
    assert env.observation_space["probs"].shape == (1000,)  # ImageNet-1k labels even for a subset


def test_empty_folder(roots, tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        make("AVE-ImageFolder-v0", roots, root=str(tmp_path))
    with pytest.raises(ValueError, match=r"dataset='folder' needs root="):
        AVEEnv(dataset="folder", **TINY)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    for c, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        _jpeg(tmp_path / name / "good.jpg", seed=c)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"this is not a JPEG")
    env = AVEEnv(dataset="folder", root=str(tmp_path), image_size=64, patch=8, **TINY)
    bad = next(i for i, f in enumerate(env.engine.source.files) if f.name == "bad.jpg")
    with pytest.warns(RuntimeWarning, match="bad.jpg"):
        obs, info = env.reset(seed=0, options={"index": bad})
    assert info["skipped_images"] == 1 and info["index"] != bad
    obs, reward, *_, info = env.step(0)
    assert obs["canvas"].any() and info["skipped_images"] == 1
    # A pickled copy keeps the source's record: the bad file is neither read nor warned about again.
    copy = pickle.loads(pickle.dumps(env))
    source = copy.engine.source
    assert source.skipped == 1 and [p.name for p in source.bad_files] == ["bad.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = copy.reset(seed=0, options={"index": bad})
    assert info["skipped_images"] == 1 and info["index"] != bad and source.skipped == 2


def test_checkpoint_for_another_geometry_is_refused(roots, tmp_path):
    model = create_tore(
        "vit_tiny_patch16_224",
        img_size=64,
        patch_size=8,
        in_chans=1,
        num_classes=10,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )
    path = save_tore(model, tmp_path / "small")
    with pytest.raises(ValueError, match=r"image size \(64, 64\) \(the environment needs \(112, 112\)\)"):
        AVEEnv(root=str(roots["AVE-FashionMNIST-v0"]), checkpoint=str(path), patch=8)
    env = AVEEnv(root=str(roots["AVE-FashionMNIST-v0"]), checkpoint=str(path), image_size=64)
    assert env.model.patch == 8 and env.engine.geometry.grid == (8, 8)


def test_model_or_pretrained_beside_an_avex_checkpoint_is_refused_not_ignored(roots, tmp_path):
    """An avex checkpoint records its own architecture and weights: a model name that is neither the id's nor the
    checkpoint's, or pretrained=True, would change nothing, so it is refused (naming the value and the way to get
    it); the id's own name, or the checkpoint's, is accepted."""
    model = create_tore("deit_tiny_patch16_224", img_size=112, patch_size=8, in_chans=1, num_classes=10, depth=1)
    path = str(save_tore(model, tmp_path / "deit"))
    root = str(roots["AVE-FashionMNIST-v0"])
    with pytest.raises(ValueError, match=r"model='vit_small_patch16_224' is not the architecture of checkpoint="):
        AVEEnv(root=root, checkpoint=path, model="vit_small_patch16_224")
    with pytest.raises(ValueError, match=r"pretrained=True loads timm's weights, but checkpoint=.*checkpoint=None"):
        AVEEnv(root=root, checkpoint=path, pretrained=True)
    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224"):  # the id's default, then the checkpoint's own
        assert AVEEnv(root=root, checkpoint=path, model=name).model.build_args["model"] == "deit_tiny_patch16_224"


def test_a_checkpoint_named_beside_its_own_model_is_read_once(roots, tmp_path, monkeypatch):
    """model= other than the id's: the checkpoint's config, read to compare the names, is the one the model is
    loaded from (it was read a second time by load_tore)."""
    import avex.checkpoint

    model = create_tore("deit_tiny_patch16_224", img_size=112, patch_size=8, in_chans=1, num_classes=10, depth=1)
    path = save_tore(model, tmp_path / "deit")
    reads: list[Path] = []
    read_json = avex.checkpoint.read_json
    monkeypatch.setattr(avex.checkpoint, "read_json", lambda p, what: reads.append(Path(p)) or read_json(p, what))
    env = AVEEnv(root=str(roots["AVE-FashionMNIST-v0"]), checkpoint=str(path), model="deit_tiny_patch16_224")
    assert env.model.build_args["model"] == "deit_tiny_patch16_224" and reads == [path.with_suffix(".json")]


# ------------------------------------------------------------ rewards, info
def test_dense_reward_telescopes(roots):
    env = fm(roots)
    steps = random_masked_rollout(env, seed=3)
    label = steps[0][3]["label"]
    loss = [-math.log(o["probs"][label]) for o, *_ in steps]
    np.testing.assert_allclose([r for _, r, _, _ in steps[1:]], -np.diff(loss), atol=1e-5)
    assert [t for _, _, t, _ in steps] == [False] * 12 + [True]


def test_sparse_reward(roots):
    env = fm(roots, reward="sparse")
    finals: list[float] = []
    for seed in range(40):  # until an episode of each outcome: the untrained model is mostly wrong
        steps = random_masked_rollout(env, seed=seed)
        assert all(r == 0.0 for _, r, _, _ in steps[1:-1])
        info = steps[-1][3]
        assert steps[-1][1] == float(info["correct"]) == float(info["prediction"] == info["label"])
        finals.append(steps[-1][1])
        if 0.0 in finals and 1.0 in finals:
            break
    assert 0.0 in finals and 1.0 in finals, f"no episode of each outcome in {len(finals)}: {finals}"


@pytest.mark.parametrize("entropy", [True, False])
def test_flops_and_entropy_option(roots, entropy):
    env = fm(roots, entropy=entropy, K=2)
    dims = ViTDims.of(env.model)
    obs, info = env.reset(seed=0)
    expected = [
        step_flops(dims, t, 4, 2, decoder=entropy, recon=False) for t in range(13)
    ]  # the env runs the entropy map only
    assert info["step_flops"] == info["cumulative_flops"] == expected[0]
    for t in range(1, 4):
        obs, _, _, _, info = env.step(t)
        assert info["step_flops"] == expected[t] and info["cumulative_flops"] == sum(expected[: t + 1])
    assert obs["entropy"].any() == entropy
    if entropy:
        assert (obs["entropy"] >= 0).all()
        # The map is the decoder's over the three glimpses taken, computed here in one single-shot pass.
        geo, hidden = env.engine.geometry, torch.from_numpy(env.engine.hidden[0].numpy())[None]
        rows, cols = geo.action_to_patch(np.arange(1, 4))
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        pixels = geo.cut(hidden.expand(3, -1, -1, -1), rows, cols)[None]  # [1, 3, C, s, s]
        coords = geo.glimpse_coords(rows, cols)[None]  # [1, 3, G, 2]
        with torch.inference_mode():
            _, expected_map = env.model.decode(env.model.forward_glimpses(pixels, coords, 2), recon=False)
        np.testing.assert_allclose(obs["entropy"], expected_map[0].numpy(), rtol=1e-4, atol=1e-5)


def test_observation_contents_discrete(roots):
    env = fm(roots)
    obs, info = env.reset(seed=0)
    assert not obs["canvas"].any() and not obs["visited"].any() and obs["step"][0] == 0
    np.testing.assert_allclose(obs["probs"].sum(), 1.0, atol=1e-5)
    hidden = env.engine.hidden[0].numpy()
    action = 2 * 13 + 5  # top-left patch (2, 5): pixels [16:32, 40:56]
    obs, _, _, _, info = env.step(action)
    np.testing.assert_array_equal(info["glimpse_box"], [16, 40, 32, 56])
    expected = np.zeros_like(hidden)
    expected[16:32, 40:56] = hidden[16:32, 40:56]
    np.testing.assert_array_equal(obs["canvas"], expected)
    visited = np.zeros((14, 14), dtype=np.uint8)
    visited[2:4, 5:7] = 1
    np.testing.assert_array_equal(obs["visited"], visited)
    assert obs["step"][0] == 1


@pytest.mark.parametrize("yxz", [(0, 0, 0), (1, 1, 1), (1, 0, 0.3), (0.5, 0.5, 0.5)])
def test_continuous_glimpses(roots, yxz):
    env = fm(roots, action_mode="continuous")
    env.reset(seed=0)
    obs, _, _, _, info = env.step(np.asarray(yxz, dtype=np.float32))
    y0, x0, y1, x1 = info["glimpse_box"]
    assert 0 <= y0 < y1 <= 112 and 0 <= x0 < x1 <= 112 and y1 - y0 >= 16
    np.testing.assert_array_equal(
        obs["visited"].astype(bool), env.engine.geometry.visited_patches(info["glimpse_box"][None])[0]
    )
    assert info["action_mask"].all()


# -------------------------------------------------------------------- vector
def test_make_vec_uses_the_native_vector_env(roots):
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=2, **kwargs_for("AVE-FashionMNIST-v0", roots))
    assert isinstance(venv.unwrapped, AVEVectorEnv) and venv.num_envs == 2
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, info = venv.reset(seed=0)
    assert obs["canvas"].shape == (2, 112, 112, 1) and venv.observation_space.contains(obs)
    assert venv.action_masks().shape == (2, 169)


@pytest.mark.parametrize(
    "error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"), MemoryError()]
)
def test_too_many_envs_for_memory_names_num_envs(roots, monkeypatch, error):
    from avex.model import TOREViT

    init_cache = TOREViT.init_cache

    def failing(raised: BaseException) -> Any:
        def init(self: TOREViT, batch: int, *args: Any, **kwargs: Any) -> Any:
            if batch == 7:  # the envs' own cache, what a batch too large for the device meets first
                raise raised
            return init_cache(self, batch, *args, **kwargs)  # the empty pass's

        return init

    kw = kwargs_for("AVE-FashionMNIST-v0", roots)
    monkeypatch.setattr(TOREViT, "init_cache", failing(error))
    with pytest.raises(ValueError, match=r"num_envs=7: the envs' state .* not fit in cpu's memory: lower num_envs"):
        gym.make_vec("AVE-FashionMNIST-v0", num_envs=7, **kw)
    monkeypatch.setattr(TOREViT, "init_cache", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not dressed up as a memory one
        gym.make_vec("AVE-FashionMNIST-v0", num_envs=7, **kw)


def test_vector_equals_single_envs_across_autoreset(roots):
    n, budget = 3, 3
    kw = kwargs_for("AVE-FashionMNIST-v0", roots, budget=budget)
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=n, **kw).unwrapped
    singles = [gym.make("AVE-FashionMNIST-v0", **kw).unwrapped for _ in range(n)]
    obs, infos = venv.reset(seed=10)
    for i, env in enumerate(singles):
        o, info = env.reset(seed=10 + i)
        assert_obs_equal({k: v[i] for k, v in obs.items()}, o, atol=1e-5)
        assert infos["label"][i] == info["label"]
    rng = np.random.default_rng(0)
    autoresets = 0
    for t in range(8):
        if t == 1:  # stagger the episodes: env 1 restarts, so rows hold different numbers of glimpses
            mask = np.array([False, True, False])
            obs, infos = venv.reset(options={"reset_mask": mask})
            singles[1].reset()
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in venv.action_masks()])
        obs, rewards, terminated, truncated, infos = venv.step(actions)
        assert rewards.dtype == np.float64 and terminated.dtype == bool and not truncated.any()
        for i, env in enumerate(singles):
            o, r, term, trunc, info = env.step(actions[i])
            assert term == terminated[i] and trunc == truncated[i]
            np.testing.assert_allclose(rewards[i], r, atol=1e-5)
            if term:
                autoresets += 1
                assert infos["_final_obs"][i] and infos["_final_info"][i]
                assert_obs_equal(infos["final_obs"][i], o, atol=1e-5)
                assert infos["final_info"]["prediction"][i] == info["prediction"]
                assert infos["final_info"]["cumulative_flops"][i] == info["cumulative_flops"]
                o, info = env.reset()  # SAME_STEP: the returned obs is the new episode's first
            else:
                assert not infos.get("_final_obs", np.zeros(n, bool))[i]
            assert_obs_equal({k: v[i] for k, v in obs.items()}, o, atol=1e-5)
            for key in ("label", "index", "prediction", "step_flops"):
                assert infos[key][i] == info[key], key
    assert autoresets >= 4


def test_reset_mask_resets_only_those_envs(roots):
    venv = AVEVectorEnv(num_envs=3, **kwargs_for("AVE-FashionMNIST-v0", roots, strict=True))
    venv.reset(seed=0)
    venv.step(np.array([1, 2, 3]))
    before, _, _, _, _ = venv.step(np.array([4, 5, 6]))
    obs, infos = venv.reset(options={"reset_mask": np.array([False, True, False])})
    for i in (0, 2):
        assert_obs_equal({k: v[i] for k, v in obs.items()}, {k: v[i] for k, v in before.items()})
    assert obs["step"][:, 0].tolist() == [2, 0, 2] and not obs["canvas"][1].any()
    assert infos["_label"].tolist() == [False, True, False]
    assert venv.action_masks().sum(1).tolist() == [167, 169, 167]
    with pytest.raises(ValueError, match="reset_mask"):
        venv.reset(options={"reset_mask": np.array([1, 0, 0])})
    venv.step(np.array([10, 10, 10]))
    with pytest.raises(ValueError, match=r"already taken.*\(env 1\), and strict=True refuses it"):
        venv.step(np.array([11, 10, 11]))  # env 1 repeats position 10: nothing happens anywhere
    assert venv.engine.steps.tolist() == [3, 1, 3]
    obs, *_ = venv.step(np.array([11, 11, 11]))
    assert obs["step"][:, 0].tolist() == [4, 2, 4]


def test_vector_torch_obs(roots):
    kw = kwargs_for("AVE-FashionMNIST-v0", roots, budget=2)
    a, b = AVEVectorEnv(num_envs=2, **kw), AVEVectorEnv(num_envs=2, torch_obs=True, **kw)
    oa, _ = a.reset(seed=1)
    ob, _ = b.reset(seed=1)
    for t in range(2):
        oa, *_, ia = a.step(np.array([t, t + 1]))
        ob, *_, ib = b.step(torch.tensor([t, t + 1]))
    for k in oa:
        assert isinstance(ob[k], torch.Tensor)
        np.testing.assert_array_equal(ob[k].cpu().numpy(), oa[k])
        assert isinstance(ib["final_obs"][k], torch.Tensor) and ib["final_obs"][k].shape[0] == 2  # batched


def test_vector_truncation_by_max_episode_steps(roots):
    venv = AVEVectorEnv(num_envs=2, max_episode_steps=2, **kwargs_for("AVE-FashionMNIST-v0", roots))
    venv.reset(seed=0)
    venv.step(np.array([0, 1]))
    _, _, terminated, truncated, infos = venv.step(np.array([2, 3]))
    assert truncated.all() and not terminated.any() and infos["_final_obs"].all()


# ----------------------------------------------------------------------- SB3
def test_sb3_vec_env_api(roots):
    from envs import SB3VecEnv

    kw = kwargs_for("AVE-FashionMNIST-v0", roots, budget=2)
    venv = SB3VecEnv(AVEVectorEnv(num_envs=2, **kw))
    venv.seed(3)
    obs = venv.reset()
    assert obs["canvas"].shape == (2, 112, 112, 1) and venv.observation_space.contains(
        {k: v[0] for k, v in obs.items()}
    )
    for i in range(2):  # env i is seeded seed + i
        _, info = AVEEnv(**kw).reset(seed=3 + i)
        assert venv.reset_infos[i]["index"] == info["index"] and venv.reset_infos[i]["label"] == info["label"]
    assert venv.has_attr("action_masks") and not venv.has_attr("no_such_thing")
    masks = venv.env_method("action_masks")
    assert len(masks) == 2 and masks[0].dtype == bool and masks[0].shape == (169,)
    assert venv.env_method("action_masks", indices=[1])[0].shape == (169,)
    assert venv.get_attr("render_mode") == [None, None] and venv.env_is_wrapped(gym.Wrapper) == [False, False]
    venv.step_async(np.array([0, 1]))
    obs, rewards, dones, infos = venv.step_wait()
    assert rewards.dtype == np.float32 and dones.dtype == bool and not dones.any() and len(infos) == 2
    assert "terminal_observation" not in infos[0]
    obs, rewards, dones, infos = venv.step(np.array([2, 3]))
    assert dones.all()
    for i in range(2):
        assert infos[i]["TimeLimit.truncated"] is False
        term = infos[i]["terminal_observation"]
        assert term["step"][0] == 2 and term["visited"].sum() == 8  # two 2x2 glimpses side by side
        assert obs["step"][i, 0] == 0 and not obs["canvas"][i].any()  # already the next episode
        assert venv.reset_infos[i]["glimpse_box"].shape == (4,) and np.isnan(venv.reset_infos[i]["glimpse_box"]).all()
    with pytest.raises(ValueError, match="share one engine"):
        venv.set_attr("render_mode", "rgb_array", indices=[0])


def test_maskable_ppo_smoke(roots):
    from sb3_contrib import MaskablePPO

    from envs import SB3VecEnv

    venv = SB3VecEnv(AVEVectorEnv(num_envs=2, **kwargs_for("AVE-FashionMNIST-v0", roots, budget=4)))
    calls = []
    original = venv.venv.action_masks
    venv.venv.action_masks = lambda: calls.append(1) or original()
    model = MaskablePPO("MultiInputPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(64)
    assert model.num_timesteps >= 64 and len(calls) >= 32  # masks were read at every step


# -------------------------------------------------------------------- render
def _colored(frame: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (the canvas is grey, boxes are saturated colours)."""
    f = frame.astype(int)
    return (np.abs(f[..., 0] - f[..., 1]) > 40) | (np.abs(f[..., 1] - f[..., 2]) > 40)


def test_render_frames_and_gif(roots, tmp_path):
    env = gym.make("AVE-FashionMNIST-v0", render_mode="rgb_array", **kwargs_for("AVE-FashionMNIST-v0", roots))
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and frame.shape[1] == 448
    assert not _colored(frame[:448]).any()  # no box yet
    env.step(0)
    env.step(13 * 6 + 6)  # patch (6, 6): canvas pixels [48:64], 4x upscaled -> [192:256]
    frame = env.render()
    colored = _colored(frame[:448])
    assert colored[192:256, 192].any() and colored[192, 192:256].all()
    assert tuple(frame[200, 192]) == BOX_COLORS[1]  # second glimpse, left edge
    assert not colored[300:, 300:].any()
    assert (frame[448:] > 100).any()  # the prediction text
    # Revealed pixels are shown as they are, the rest dimmed (an interior pixel of glimpse 2, a far corner).
    # Away from the drawn boxes, each 4x4 block of the frame is its canvas pixel (a block's centre is read).
    hidden = env.unwrapped.engine.hidden[0].numpy()[..., 0].astype(np.float32)  # dimmed in float32, as drawn
    seen = env.unwrapped.engine.seen[0].numpy()
    shown = frame[2:448:4, 2:448:4, 1].astype(np.float32)
    clear = np.ones((112, 112), dtype=bool)
    clear[:20, :20] = clear[46:66, 46:66] = False  # glimpse 1 [0:16], glimpse 2 [48:64], outlines and numbers
    clear[56:62, 56:62] = True  # the inside of glimpse 2, below its number
    assert (seen & clear & (hidden > 0)).any() and (~seen & clear & (hidden > 0)).any()
    expected = np.where(seen, hidden, np.round(hidden * _DIM))
    np.testing.assert_array_equal(shown[clear], expected[clear])
    # The panel lists the most probable class first: top-1 of three equals a panel of that one class alone.
    np.testing.assert_array_equal(
        prediction_panel(448, np.array([0.1, 0.7, 0.2]), ["ant", "bee", "cat"], top_k=1),
        prediction_panel(448, np.array([0.7]), ["bee"], top_k=1),
    )
    frames = record_episode(
        env, lambda obs, info: int(np.flatnonzero(info["action_mask"])[0]), tmp_path / "ep.gif", seed=1
    )
    assert len(frames) == 13
    with Image.open(tmp_path / "ep.gif") as gif:
        assert gif.n_frames == 13
    plain = fm(roots)
    plain.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert plain.render() is None
    assert plain.frame().shape == frame.shape


def test_vector_render(roots):
    venv = AVEVectorEnv(num_envs=2, render_mode="rgb_array", **kwargs_for("AVE-ImageNet-v0", roots))
    venv.reset(seed=0)
    venv.step(np.array([0, 1]))
    frames = venv.render()
    assert len(frames) == 2 and all(f.dtype == np.uint8 and f.shape[2] == 3 for f in frames)


# ------------------------------------------------------------------- latency
def test_step_latency_report(fmnist_root):
    """Measured, not asserted: one AVE-FashionMNIST-v0-shaped env (depth 6, width 192, 3 heads, patch 8),
    on 1 and 2 torch threads (run with -s to see it)."""
    env = AVEEnv(
        root=str(fmnist_root),
        checkpoint=None,
        pretrained=False,
        model="vit_tiny_patch16_224",
        model_kwargs=dict(depth=6, embed_dim=192, num_heads=3),
        image_size=112,
        patch=8,
        glimpse=2,
        budget=12,
    )
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times = []
            for ep in range(4):
                rng = np.random.default_rng(ep)
                _, info = env.reset(seed=ep)
                done = False
                while not done:
                    action = int(rng.choice(np.flatnonzero(info["action_mask"])))
                    t0 = time.perf_counter()
                    _, _, done, _, info = env.step(action)
                    times.append(time.perf_counter() - t0)
            ms = np.asarray(times[12:]) * 1e3  # the first episode is warm-up
            print(
                f"\nAVE-FashionMNIST-v0-shaped step latency on CPU ({threads} torch thread(s), K={env.engine.K}, "
                f"entropy on): median {np.median(ms):.2f} ms, mean {ms.mean():.2f} ms"
            )
    finally:
        torch.set_num_threads(before)


def test_torch_obs_final_obs_is_batched(fmnist_root) -> None:
    """With torch_obs the ending step's observations come back batched, rows marked by _final_obs."""
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=3, torch_obs=True, budget=2, root=str(fmnist_root), **TINY)
    ref = gym.make_vec("AVE-FashionMNIST-v0", num_envs=3, budget=2, root=str(fmnist_root), **TINY)
    venv.reset(seed=4)
    ref.reset(seed=4)
    for action in ([0, 1, 2], [5, 6, 7]):
        obs, _, term, _, info = venv.step(np.array(action))
        robs, _, _, _, rinfo = ref.step(np.array(action))
    assert term.all() and info["_final_obs"].all()
    for key, value in info["final_obs"].items():
        assert isinstance(value, torch.Tensor)
        np.testing.assert_allclose(value.cpu().numpy(), np.stack([o[key] for o in rinfo["final_obs"]]), atol=1e-5)


def test_imagenet_offline_without_weights_says_how_to_pass_a_file(imagenet_root, tmp_path) -> None:
    """pretrained=True with no hub access fails at once with the fix; a local timm weights file works."""
    kw = dict(
        root=str(imagenet_root),
        model="vit_tiny_patch16_224",
        image_size=64,
        patch=16,
        budget=4,
        model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
    )
    with pytest.raises(
        RuntimeError, match=r"pass checkpoint=<local timm or avex \.safetensors file>, or pretrained=False"
    ):
        gym.make("AVE-ImageNet-v0", **kw)
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=32, num_heads=2, num_classes=1000)
    weights = tmp_path / "vit_tiny_local.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    env = gym.make("AVE-ImageNet-v0", checkpoint=str(weights), **kw).unwrapped
    torch.testing.assert_close(env.model.vit.head.weight, vit.head.weight)  # the file's weights, not random ones

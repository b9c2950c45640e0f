"""The envs work the way Gymnasium, stable-baselines3 and timm users already work.

Plain SB3 ``PPO`` on the single env (any action of the space is valid; repeats are flagged, ``strict=True``
refuses them), Gymnasium's vector wrappers on the native vector env in next-step mode (which matches
``SyncVectorEnv``'s definition), ``torch_obs`` tensors for every per-env array, timm models at their own
patch (and the ones TORE cannot wrap refused by name), and a folder root of split folders. Tiny random
models and fake data only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from PIL import Image

from envs import AVEVectorEnv, SB3VecEnv

FM = "AVE-FashionMNIST-v0"
TINY = dict(checkpoint=None, model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
TINY_TIMM = dict(pretrained=False, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fm(fake_fmnist_root: Path) -> dict[str, Any]:
    """Keyword arguments of a tiny Fashion-MNIST env (169 positions, budget 12)."""
    return dict(TINY, root=str(fake_fmnist_root))


def _image(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/{a,b}/ and root/val/{a,b,c}/: one image per class (the splits differ in class count)."""
    root = tmp_path_factory.mktemp("splits")
    for split, classes in (("train", "ab"), ("val", "abc")):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            _image(root / split / name / "0.jpg", seed=i)
    return root


def _folder(root: Path, **kw: Any) -> Any:
    """A tiny random-weight ``AVE-ImageFolder-v0`` env over ``root``'s val split."""
    return gym.make("AVE-ImageFolder-v0", **{"root": str(root), "split": "val", **TINY_TIMM, **kw}).unwrapped


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return tree.cpu().numpy() if isinstance(tree, torch.Tensor) else tree


def _assert_equal(a: Any, b: Any, what: str) -> None:
    """Nested tuples and dicts of arrays equal (floats to rounding: envs batched differently)."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), what
        for k in a:
            _assert_equal(a[k], b[k], f"{what}[{k}]")
    else:
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-5)


# ------------------------------------------------------------------ SB3 as users write it
def test_plain_sb3_ppo_runs_on_the_single_env(fm):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env

    class CountRepeats(gym.Wrapper):
        repeats = 0

        def step(self, action: Any) -> Any:
            out = super().step(action)
            self.repeats += out[4]["repeated"]
            return out

    env = CountRepeats(gym.make(FM, **fm))
    assert env.action_space == gym.spaces.Discrete(169)
    check_env(env.unwrapped)  # unmasked random actions, repeats among them
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=64, seed=0)
    model.learn(256)  # 21 episodes of 12 glimpses from an unmasked policy
    assert model.num_timesteps == 256 and env.repeats > 0  # each repeat once raised ValueError


def test_repeat_is_taken_and_flagged_and_strict_refuses_it(fm):
    env = gym.make(FM, **fm).unwrapped
    env.reset(seed=3)
    first, *_ = env.step(5)
    obs, _, _, _, info = env.step(5)
    assert info["repeated"] is True and obs["step"][0] == 2
    np.testing.assert_array_equal(obs["canvas"], first["canvas"])  # known pixels, revealed again
    assert not env.action_masks()[5] and info["action_mask"][5] == 0  # masks still advise against it
    assert env.step(6)[4]["repeated"] is False

    strict = gym.make(FM, strict=True, **fm).unwrapped
    strict.reset(seed=3)
    strict.step(5)
    state = (strict.engine.steps.copy(), strict.engine.cache.buf.clone(), strict.engine.used.copy())
    with pytest.raises(ValueError, match=r"already taken.*strict=True refuses it"):
        strict.step(5)
    assert (strict.engine.steps == state[0]).all() and torch.equal(strict.engine.cache.buf, state[1])
    np.testing.assert_array_equal(strict.engine.used, state[2])
    with pytest.raises(ValueError, match="strict must be True or False"):
        gym.make(FM, strict="yes", **fm)


# ------------------------------------------------------------------ vector autoreset modes
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, "next_step", "NextStep"])
def test_flatten_observation_wraps_the_native_env_in_next_step_mode(fm, mode):
    from gymnasium.wrappers.vector import FlattenObservation

    venv = gym.make_vec(FM, num_envs=2, autoreset_mode=mode, **fm)
    assert isinstance(venv.unwrapped, AVEVectorEnv) and venv.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
    flat = FlattenObservation(venv)
    obs, _ = flat.reset(seed=0)
    obs, *_ = flat.step(np.array([0, 1]))
    assert obs.shape == (2, gym.spaces.flatdim(venv.single_observation_space))
    with pytest.raises(ValueError, match="NEXT_STEP or DISABLED"):  # why the mode matters
        FlattenObservation(gym.make_vec(FM, num_envs=2, **fm))


@pytest.mark.parametrize("bad", [AutoresetMode.DISABLED, "disabled", "nextstep!", 1, None])
def test_unsupported_autoreset_modes_are_refused(fm, bad):
    with pytest.raises(ValueError, match="autoreset_mode must be"):
        AVEVectorEnv(num_envs=2, autoreset_mode=bad, **gym.spec(FM).kwargs | fm)


def test_sb3_adapter_refuses_next_step(fm):
    venv = AVEVectorEnv(num_envs=2, autoreset_mode="next_step", **gym.spec(FM).kwargs | fm)
    with pytest.raises(ValueError, match="same-step autoreset"):
        SB3VecEnv(venv)


def _actions(t: int) -> np.ndarray:
    return np.array([(7 * t) % 169, (7 * t + 3) % 169])


@pytest.mark.parametrize("budget, limit", [(2, None), (3, 2)])  # episodes end by termination, by truncation
def test_next_step_is_gymnasiums_definition(fm, budget, limit):
    """The native env in next-step mode gives what SyncVectorEnv(NEXT_STEP) over single envs gives."""
    kw = dict(fm, budget=budget, max_episode_steps=limit)
    native = gym.make_vec(FM, num_envs=2, autoreset_mode="next_step", **kw)
    sync = gym.make_vec(
        FM, num_envs=2, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}, **kw
    )
    _assert_equal(native.reset(seed=5), sync.reset(seed=5), "reset")
    ends = []
    for t in range(7):  # three episodes and two autoreset steps
        a, b = native.step(_actions(t)), sync.step(_actions(t))
        for name, x, y in zip(("obs", "reward", "terminated", "truncated", "info"), a, b):
            _assert_equal(x, y, f"step {t} {name}")
        ends.append((bool(b[2].all()), bool(b[3].all())))
    assert ends.count((limit is None, limit is not None)) == 2  # two ends, of the expected kind


def test_next_step_replays_the_same_step_episodes(fm):
    """Next-step returns each ending observation, then the next episode's first one with reward 0 and no end
    flag, where same-step returns the next episode's first observation at once (the ending one in final_obs)."""
    kw = dict(fm, budget=2)
    nxt = AVEVectorEnv(num_envs=2, autoreset_mode="next_step", **gym.spec(FM).kwargs | kw)
    same = AVEVectorEnv(num_envs=2, **gym.spec(FM).kwargs | kw)
    _assert_equal(nxt.reset(seed=1)[0], same.reset(seed=1)[0], "reset")
    t_same = 0
    for episode in range(3):
        for t in range(2):
            action = _actions(t_same)
            o_n, r_n, term_n, trunc_n, _ = nxt.step(action)
            o_s, r_s, term_s, _, i_s = same.step(action)
            t_same += 1
            _assert_equal(r_n, r_s, "reward")
            assert (term_n == term_s).all() and not trunc_n.any()
            ending = {k: np.stack([f[k] for f in i_s["final_obs"]]) for k in o_s} if term_s.all() else o_s
            _assert_equal(o_n, ending, f"episode {episode} step {t}")
        o_n, r_n, term_n, trunc_n, i_n = nxt.step(np.array([168, 168]))  # ignored: the reset step
        assert (r_n == 0).all() and not term_n.any() and not trunc_n.any()
        assert (o_n["step"] == 0).all() and (i_n["step_flops"] == i_n["cumulative_flops"]).all()
        _assert_equal(o_n, o_s, f"episode {episode + 1} start")


# ------------------------------------------------------------------ torch_obs: every per-env array a tensor
@pytest.mark.parametrize("mode", ["same_step", "next_step"])
def test_torch_obs_gives_tensors_for_every_array(fm, mode):
    kw = dict(fm, budget=2, autoreset_mode=mode)
    ref = AVEVectorEnv(num_envs=2, **gym.spec(FM).kwargs | kw)
    venv = AVEVectorEnv(num_envs=2, torch_obs=True, **gym.spec(FM).kwargs | kw)
    _assert_equal(_as_numpy(venv.reset(seed=2)[1]), ref.reset(seed=2)[1], "reset info")
    for t in range(3):
        got, want = venv.step(torch.as_tensor(_actions(t))), ref.step(_actions(t))
        obs, rewards, terminated, truncated, infos = got
        for value in (rewards, terminated, truncated, *obs.values(), infos["action_mask"], infos["_repeated"]):
            assert isinstance(value, torch.Tensor) and value.device == venv.model.pixel_mean.device
        assert rewards.dtype == torch.float64 and terminated.dtype == truncated.dtype == torch.bool
        assert infos["action_mask"].dtype == torch.int8 and infos["action_mask"].shape == (2, 169)
        _assert_equal(_as_numpy(rewards), want[1], "rewards")
        _assert_equal(_as_numpy(infos.get("final_info", {})), want[4].get("final_info", {}), "final_info")
        _assert_equal(
            _as_numpy({k: v for k, v in infos.items() if "final_obs" not in k}),
            {k: v for k, v in want[4].items() if "final_obs" not in k},
            "infos",
        )
    assert isinstance(venv.action_masks(), np.ndarray)  # for sb3-contrib


# ------------------------------------------------------------------ timm models at their own patch
@pytest.mark.parametrize(
    "model, patch, grid",
    [
        ("vit_small_patch14_dinov2", 14, 4),
        ("vit_small_patch14_reg4_dinov2", 14, 4),
        ("vit_base_patch32_clip_224", 32, 2),
    ],
)
def test_a_timm_model_keeps_its_own_patch(split_root, model, patch, grid):
    env = _folder(split_root, model=model, image_size=56 if patch == 14 else 64, glimpse=1, budget=4)
    assert env.model.patch == patch and env.model.grid == (grid, grid)
    env.reset(seed=0)
    env.step(0)
    explicit = _folder(split_root, model=model, image_size=64, patch=8, budget=4)
    assert explicit.model.patch == 8  # patch= given: the model is built at it


def test_registered_patch_leaves_the_model_its_own(fm):
    assert all(
        gym.spec(i).kwargs["patch"] is None for i in ("AVE-FashionMNIST-v0", "AVE-ImageNet-v0", "AVE-ImageFolder-v0")
    )
    assert gym.make(FM, **fm).unwrapped.model.patch == 8  # the data set's own model from scratch: its patch
    other = gym.make(FM, model="vit_small_patch14_dinov2", budget=4, **fm).unwrapped
    assert other.model.patch == 14 and other.model.grid == (8, 8)


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if an env asks for a model or reads its data: the refusals below come first."""

    def built(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was built or data were read before the refusal")

    monkeypatch.setattr("envs.models.shared_model", built)
    monkeypatch.setattr("envs.config.EnvConfig.make_source", built)


@pytest.mark.parametrize(
    "model, why",
    [
        ("vit_tiny_r_s16_p8_224", "HybridEmbed"),
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
        ("deit_tiny_distilled_patch16_224", "VisionTransformerDistilled"),
        ("vit_base_patch16_siglip_224", "no class token"),
        ("resnet18", "ResNet"),
    ],
)
def test_models_tore_cannot_wrap_are_refused_by_name(split_root, nothing_built, model, why):
    with pytest.raises(ValueError, match=rf"'{model}' cannot run in an AVE environment: .*{why}.*Supported: .*deit"):
        _folder(split_root, model=model)


def test_a_canvas_of_no_whole_patches_is_refused(split_root, monkeypatch):
    monkeypatch.setattr("envs.models.shared_model", None)  # refused before the model is asked for
    with pytest.raises(ValueError, match=r"not a whole number of 32 px patches.*image_size=64 or 32"):
        _folder(split_root, model="vit_base_patch32_clip_224", image_size=56)


# ------------------------------------------------------------------ a root of split folders
def test_a_root_of_split_folders_reads_one_split(split_root):
    kw: dict[str, Any] = dict(
        root=str(split_root), model="vit_tiny_patch16_224", image_size=32, patch=8, budget=4, **TINY_TIMM
    )
    with pytest.warns(UserWarning, match=r"split folders \['train', 'val'\].*reading split 'val'.*split="):
        env = gym.make("AVE-ImageFolder-v0", **kw).unwrapped
    assert env.engine.source.num_classes == 3  # val's a, b, c: not a 2-class data set of splits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit split says nothing
        assert gym.make("AVE-ImageFolder-v0", split="train", **kw).unwrapped.engine.source.num_classes == 2
        assert gym.make("AVE-ImageFolder-v0", split="", **kw).unwrapped.class_names == ["train", "val"]


def test_env_docstring_defaults_are_envconfigs() -> None:
    """Every default that AVEEnv's docstring states for an EnvConfig field is the field's default (the docs site
    generates its tables from the code; the docstring is what ``help(env)`` shows, so it must not drift)."""
    import dataclasses
    import json
    import re

    from envs.ave_env import AVEEnv
    from envs.config import EnvConfig

    meaning_of_none = {"K": "depth // 2"}  # None documented by what it means
    stated = dict(re.findall(r"- `(\w+)` \(\*\*[^*]+\*\*, default `([^`]+)`", AVEEnv.__doc__ or ""))
    fields = {f.name: f for f in dataclasses.fields(EnvConfig)}
    checked = 0
    for name, text in stated.items():
        if name not in fields:
            continue
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        want = json.dumps(default) if isinstance(default, str) else repr(default)
        assert text in (want, meaning_of_none.get(name) if default is None else None), (name, text, want)
        checked += 1
    assert checked >= 10, stated  # the pattern still finds the Arguments list

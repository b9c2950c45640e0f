"""Only what is read is computed, and a step moves its outputs in one transfer (issue 15, items 2 and 5).

The entropy map is computed the first time something reads it after a step, once; left out of ``obs_keys``
it is never computed. Lazy rollouts equal eager ones exactly. The packed transfers keep every dtype and
shape. On CUDA (skipped elsewhere) a vector step synchronises with the device only for the one copy of its
NumPy outputs, and never with ``torch_obs``.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from avex.transfer import to_device, to_host, tree_to_device, tree_to_host
from envs.ave_env import AVEEnv
from envs.config import OBS_KEYS
from envs.engine import AVEEngine
from envs.vector import AVEVectorEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = dict(depth=2, embed_dim=32, num_heads=2)
TINY = dict(checkpoint=None, pretrained=False, model="vit_tiny_patch16_224", model_kwargs=SIZE)
FM = "AVE-FashionMNIST-v0"


@pytest.fixture
def kw(fake_fmnist_root: Path) -> dict[str, Any]:
    return dict(gym.spec(FM).kwargs, **TINY, root=str(fake_fmnist_root))


def count_decoder(engine: AVEEngine) -> list[int]:
    """Count the engine's entropy-map computations from now on (one list entry per call, its batch)."""
    calls: list[int] = []
    inner = engine._entropy_map

    def counted(out: Any) -> torch.Tensor:
        calls.append(out.logits.shape[0])
        return inner(out)

    engine._entropy_map = counted  # type: ignore[method-assign]
    return calls


def make_eager(engine: AVEEngine) -> None:
    """Read the entropy map right after every step: the engine then behaves as before the map was lazy."""
    step = engine.step

    def eager(actions: Any) -> Any:
        out = step(actions)
        _ = engine.entropy
        return out

    engine.step = eager  # type: ignore[method-assign]


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a nested output (tuples, dicts, tensors, object arrays of dicts) by path, as NumPy."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}/{k}"))
    elif isinstance(tree, tuple):
        for i, v in enumerate(tree):
            out.update(flat(v, f"{prefix}/{i}"))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree.cpu().numpy()
    elif isinstance(tree, np.ndarray) and tree.dtype == object:
        for i, v in enumerate(tree):
            if v is not None:
                out.update(flat(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = np.asarray(tree)
    return out


def assert_same(a: Any, b: Any) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------ transfers
def test_packed_transfers_keep_every_dtype_and_shape() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "bool": rng.random((3, 5)) > 0.5,
        "u8": rng.integers(0, 256, (3, 2, 2, 1), dtype=np.uint8),
        "i8": rng.integers(-5, 5, (3, 7), dtype=np.int8),
        "i64": rng.integers(-(2**40), 2**40, (3, 1)),
        "f32": rng.random((3, 4), dtype=np.float32),
        "f64": rng.random(3),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    sent = to_device(arrays, torch.device("cpu"), pack=True)
    assert list(sent) == list(arrays)  # the caller's order, though packed by item size
    back = to_host(sent, pack=True)
    for k, a in arrays.items():
        assert sent[k].shape == a.shape and back[k].dtype == a.dtype and back[k].shape == a.shape, k
        np.testing.assert_array_equal(back[k], a, err_msg=k)
    sent["f32"] += 1  # views of one buffer, but disjoint
    np.testing.assert_array_equal(sent["f64"].numpy(), arrays["f64"])
    with pytest.raises(ValueError, match="bfloat16|NumPy's dtypes"):
        to_host({"x": torch.zeros(2, dtype=torch.bfloat16)}, pack=True)


def test_tree_transfers_convert_leaves_and_keep_the_rest() -> None:
    objects = np.array([None, {"a": 1}], dtype=object)
    tree = {"x": np.arange(3), "nested": {"y": torch.ones(2, dtype=torch.bool), "objects": objects}, "n": 4}
    dev = tree_to_device(tree, torch.device("cpu"), pack=True)
    assert isinstance(dev["x"], torch.Tensor) and dev["nested"]["objects"] is objects and dev["n"] == 4
    host = tree_to_host(dev, pack=True)
    assert isinstance(host["nested"]["y"], np.ndarray) and host["nested"]["y"].dtype == np.bool_
    np.testing.assert_array_equal(host["x"], np.arange(3))


# ------------------------------------------------------------------ lazy entropy map
def test_map_not_computed_unless_read(kw: dict[str, Any]) -> None:
    venv = AVEVectorEnv(num_envs=3, obs_keys=["canvas", "probs", "step"], **kw | dict(budget=3))
    calls = count_decoder(venv.engine)
    venv.reset(seed=0)
    for t in range(6):  # two autoresets, the last in the last step
        obs, *_ = venv.step(np.array([t, t + 20, t + 40]))
    assert calls == [] and set(obs) == {"canvas", "probs", "step"}
    entropy = venv.engine.entropy  # something reads it after all: computed now, once
    _ = venv.engine.entropy
    assert calls == [3]
    # Every row restarted after the step's output was made: the map is the empty pass's.
    torch.testing.assert_close(entropy, venv.engine._empty_entropy.expand(3, -1, -1), rtol=0, atol=0)
    assert venv.engine._empty_entropy.std() > 0  # a map that tells rows apart from zeros


def test_map_computed_once_when_read_twice(kw: dict[str, Any]) -> None:
    env = AVEEnv(**kw)
    calls = count_decoder(env.engine)
    env.reset(seed=0)
    obs, *_ = env.step(5)
    assert calls == [1]  # the observation read it
    again = env.engine.observe()["entropy"]
    np.testing.assert_array_equal(again[0], obs["entropy"])
    assert calls == [1]
    env.step(9)
    assert calls == [1, 1]


@pytest.mark.parametrize("mode", ["same_step", "next_step"])
@pytest.mark.parametrize("torch_obs", [False, True])
def test_lazy_rollouts_equal_eager_ones(kw: dict[str, Any], mode: str, torch_obs: bool) -> None:
    """Same seeds and actions: every observation, reward, flag and info equal, autoresets, truncation and a
    partial reset included (rows reset after a step get the empty pass's map when it is computed)."""
    args = kw | dict(budget=4, autoreset_mode=mode, torch_obs=torch_obs, max_episode_steps=3)
    lazy, eager = AVEVectorEnv(num_envs=3, **args), AVEVectorEnv(num_envs=3, **args)
    make_eager(eager.engine)
    for venv in (lazy, eager):
        venv.reset(seed=5)
        venv.reset(options={"reset_mask": np.array([False, True, False])})
    for t in range(9):
        actions = np.array([(7 * t + 13 * e) % 169 for e in range(3)])
        assert_same(lazy.step(actions), eager.step(actions))
        if t == 4:
            mask = np.array([True, False, False])
            assert_same(lazy.reset(options={"reset_mask": mask}), eager.reset(options={"reset_mask": mask}))


def test_single_env_lazy_equals_eager(kw: dict[str, Any]) -> None:
    lazy, eager = AVEEnv(**kw), AVEEnv(**kw)
    make_eager(eager.engine)
    assert_same(lazy.reset(seed=1), eager.reset(seed=1))
    for t in range(12):
        assert_same(lazy.step(t * 3), eager.step(t * 3))


def test_pickled_env_keeps_a_pending_map(kw: dict[str, Any]) -> None:
    import pickle

    env = AVEEnv(obs_keys=["probs"], **kw)
    env.reset(seed=2)
    env.step(4)
    assert env.engine._pending is not None
    copy = pickle.loads(pickle.dumps(env))
    torch.testing.assert_close(copy.engine.entropy, env.engine.entropy, rtol=0, atol=0)


# ------------------------------------------------------------------ obs_keys
def test_obs_keys_restrict_space_and_observation(kw: dict[str, Any]) -> None:
    keys = ["entropy", "visited", "probs"]
    env, full = AVEEnv(obs_keys=keys, **kw), AVEEnv(**kw)
    assert set(env.observation_space.spaces) == set(keys) and set(full.observation_space.spaces) == set(OBS_KEYS)
    obs, _ = env.reset(seed=3)
    ref, _ = full.reset(seed=3)
    assert list(obs) == ["visited", "probs", "entropy"]  # the observation's own order
    for t in (3, 50):
        obs, _, _, _, info = env.step(t)
        ref, _, _, _, ref_info = full.step(t)
        assert env.observation_space.contains(obs)
        for k in keys:
            np.testing.assert_array_equal(obs[k], ref[k])
        assert info["step_flops"] == ref_info["step_flops"]  # the decoder still runs: entropy is observed
    venv = gym.make_vec(FM, num_envs=2, obs_keys=("canvas",), **{k: v for k, v in kw.items() if k != "budget"})
    assert set(venv.single_observation_space.spaces) == {"canvas"}
    assert set(venv.reset(seed=0)[0]) == {"canvas"}


def test_obs_keys_without_entropy_leave_the_decoder_out_of_the_flops(kw: dict[str, Any]) -> None:
    env, full = AVEEnv(obs_keys=["probs", "cls"], **kw), AVEEnv(**kw)
    env.reset(seed=0)
    full.reset(seed=0)
    _, _, _, _, info = env.step(1)
    _, _, _, _, ref = full.step(1)
    assert 0 < info["step_flops"] < ref["step_flops"]


@pytest.mark.parametrize(
    "value, why",
    [
        ("canvas", "non-empty list"),
        ([], "non-empty list"),
        (["canvas", 3], "non-empty list"),
        (["canvas", "entrop"], r"unknown key\(s\) \['entrop'\]"),
        (["probs", "probs"], "a key twice"),
        ({"probs": 1}, "non-empty list"),
    ],
)
def test_obs_keys_refused_with_the_fix(kw: dict[str, Any], value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=f"obs_keys.*{why}|{why}.*obs_keys|obs_keys has {why}"):
        gym.make(FM, obs_keys=value, **{k: v for k, v in kw.items() if k != "budget"})


# ------------------------------------------------------------------ CUDA: no host synchronisation
def _syncs(fn: Any, where: list[str] | None = None) -> tuple[int, Any]:
    """Run ``fn`` under torch's sync debug mode; return how many synchronising CUDA calls it made. ``where``
    collects the Python stack of each (so that a failing count names its calls)."""
    stacks: list[str] = []

    def record(message: Any, *args: Any, **kwargs: Any) -> None:
        if "synchronizing" in str(message):
            stacks.append("".join(traceback.format_stack(limit=14)[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # catch_warnings puts the original back
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if where is not None:
        where.extend(stacks)
    return len(stacks), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["same_step", "next_step"])
@pytest.mark.parametrize("torch_obs", [True, False])
def test_vector_step_synchronises_only_for_its_outputs_on_cuda(kw: dict[str, Any], mode: str, torch_obs: bool) -> None:
    """After warm-up: with torch_obs no step waits for the device; with NumPy outputs each step waits once,
    for its one copy. Steps that restart episodes may add what the canvas source itself costs (counted on a
    bare ``source.sample``), nothing more."""
    n, budget = 64, 3
    venv = AVEVectorEnv(num_envs=n, device="cuda", torch_obs=torch_obs, autoreset_mode=mode, **kw | dict(budget=budget))
    eng = venv.engine
    plan = np.stack([np.random.default_rng(i).permutation(169)[:budget] for i in range(n)])
    venv.reset(seed=0)
    for t in range(2 * budget + 1):  # warm-up, autoresets included (kernels compiled, allocators filled)
        venv.step(plan[:, t % budget])
    torch.cuda.synchronize()
    source_syncs, _ = _syncs(lambda: eng.source.sample([np.random.default_rng(0) for _ in range(n)]))
    own = 0 if torch_obs else 1
    for t in range(2 * budget):
        # Episodes restart in this step: same-step, where the budget ends; next-step, the step after.
        restarts = bool(venv._pending.any() if mode == "next_step" else (eng.steps + 1 >= budget).any())
        action = plan[:, (t + 1) % budget]
        if torch_obs and not restarts:
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
            try:
                venv.step(action)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            continue
        where: list[str] = []
        count, _ = _syncs(lambda a=action: venv.step(a), where)
        # A restarting step may wait less than a bare sample (measured on the H200: 0 against 1), never more.
        most = own + (source_syncs if restarts else 0)
        assert count == own if not restarts else own <= count <= most, (t, count, most, "\n---\n".join(where))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_single_env_step_synchronises_once_on_cuda(kw: dict[str, Any]) -> None:
    env = AVEEnv(device="cuda", **kw)
    env.reset(seed=0)
    for t in range(3):
        env.step(t)
    count, out = _syncs(lambda: env.step(40))
    assert count == 1 and isinstance(out[0]["entropy"], np.ndarray)


# ------------------------------------------------------------------ training reads the reconstruction only
def test_training_computes_the_reconstruction_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training step runs the decoder for its reconstruction loss and never computes an entropy map."""
    import avex.decoder
    from avex.model import create_tore
    from avex.train import TOREObjective, train_step

    def no_entropy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training computed the attention entropy")

    monkeypatch.setattr(avex.decoder, "entropy_attention", no_entropy)
    torch.manual_seed(0)
    size = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2)
    model = create_tore("vit_tiny_patch16_224", **size)
    asked: list[tuple[bool, bool]] = []
    assert model.decoder is not None
    model.decoder.register_forward_hook(
        lambda mod, args, kwargs, out: asked.append((kwargs["recon"], kwargs["entropy"])), with_kwargs=True
    )
    geo = model.geometry(2)
    ph, pw = geo.positions_shape
    canvases = torch.randint(0, 256, (4, 32, 32, 1), dtype=torch.uint8)
    batch = (canvases, torch.arange(4), torch.randint(0, ph, (4, 3)), torch.randint(0, pw, (4, 3)))
    objective = TOREObjective(model, geo, recon_weight=0.1)
    _, _, mse, _ = train_step(objective, model, torch.optim.SGD(model.parameters(), lr=0.01), batch, K=1, amp=False)
    assert asked == [(True, False)] and mse > 0


def test_ppo_training_env_leaves_the_canvas_out(kw: dict[str, Any]) -> None:
    """avex train ppo's envs observe the belief keys only: no revealed canvas is composed or copied."""
    from agents.belief import BELIEF_KEYS
    from agents.ppo_train import PPOConfig, train_ppo

    env_kwargs = {k: kw[k] for k in ("root", *TINY)}
    cfg = PPOConfig(num_envs=2, total_steps=24, n_steps=12, batch_size=24, n_epochs=1, eval_episodes=2, out=None)
    cfg.env_kwargs = env_kwargs
    model, _ = train_ppo(cfg)
    native = model.get_env().unwrapped.venv  # BeliefKeys -> VecMonitor -> SB3VecEnv -> the native vector env
    assert set(native.single_observation_space.spaces) == set(BELIEF_KEYS)

"""stable-baselines3 the short way: accuracy per glimpse for any policy, SB3 ``.zip`` files loaded as agents
without unpickling, ``VecMonitor`` in ``avex train ppo``."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO

from agents import evaluate_accuracy, make_agent
from agents.adapters import CallableAgent, PredictAgent, as_agent
from agents.belief import BELIEF_KEYS, BeliefObservation
from agents.evaluate import wilson
from agents.ppo import PPOAgent
from agents.ppo_config import PPOConfig
from agents.ppo_train import train_ppo
from agents.sb3_policy import POLICY_KWARGS
from avex.cli import main

ENV = "AVE-FashionMNIST-v0"
TINY = dict(checkpoint=None, model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))


@pytest.fixture(scope="module")
def env_kwargs(fake_fmnist_root: Path) -> dict:
    return dict(TINY, root=str(fake_fmnist_root))


def _model(env_kwargs: dict, **policy_kwargs) -> MaskablePPO:
    torch.manual_seed(0)
    env = BeliefObservation(gym.make(ENV, **env_kwargs))
    kwargs = dict(POLICY_KWARGS, **policy_kwargs)
    return MaskablePPO("MultiInputPolicy", env, policy_kwargs=kwargs, n_steps=24, batch_size=24, n_epochs=1, seed=0)


@pytest.fixture(scope="module")
def trained(env_kwargs: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[MaskablePPO, Path]:
    """A MaskablePPO trained briefly on BeliefObservation, saved by model.save() as SB3 users do."""
    model = _model(env_kwargs)
    model.learn(48)
    path = tmp_path_factory.mktemp("sb3") / "model.zip"
    model.save(path)
    return model, path


def _belief(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: obs[k] for k in BELIEF_KEYS}


# ------------------------------------------------------------------ loading a .zip
def test_a_maskable_ppo_zip_loads_and_acts_like_the_model(trained, env_kwargs) -> None:
    model, path = trained
    venv = gym.make_vec(ENV, num_envs=4, **env_kwargs)
    agent = PPOAgent.load(path, venv)
    assert agent.meta["format"] == "sb3-zip" and agent.meta["num_timesteps"] == model.num_timesteps
    same = make_agent("ppo", venv, policy=str(path))  # and so avex benchmark --ppo model.zip
    want = model.policy.state_dict()
    got = agent.policy.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    obs, _ = venv.reset(seed=1)
    for _ in range(venv.unwrapped.budget):
        mask = venv.unwrapped.action_masks()
        expected, _ = model.predict(_belief(obs), deterministic=True, action_masks=mask)
        actions = agent.act(obs, mask)
        assert np.array_equal(actions, expected) and np.array_equal(same.act(obs, mask), expected)
        obs, *_ = venv.step(actions)
    venv.close()


def test_a_zip_trained_with_the_ink_map_loads_and_acts_like_the_model(env_kwargs, tmp_path) -> None:
    """A MaskablePPO trained on BeliefObservation(env, ink=True) and saved by model.save(): rebuilt with the ink map,
    it acts as the model does on the pooled canvas."""
    from agents.belief import belief

    torch.manual_seed(0)
    env = BeliefObservation(gym.make(ENV, **env_kwargs), ink=True)
    model = MaskablePPO("MultiInputPolicy", env, policy_kwargs=POLICY_KWARGS, n_steps=24, batch_size=24, n_epochs=1)
    model.learn(24)
    model.save(tmp_path / "ink.zip")
    venv = gym.make_vec(ENV, num_envs=3, **env_kwargs)
    agent = PPOAgent.load(tmp_path / "ink.zip", venv)
    obs, _ = venv.reset(seed=1)
    obs, *_ = venv.step(np.array([0, 7, 30]))
    mask = venv.unwrapped.action_masks()
    want, _ = model.predict(belief(obs, ink=True), deterministic=True, action_masks=mask)
    assert np.array_equal(agent.act(obs, mask), want)
    venv.close()


def test_a_zip_of_another_architecture_is_refused(env_kwargs, tmp_path) -> None:
    env = gym.make(ENV, **env_kwargs)
    default = MaskablePPO("MultiInputPolicy", BeliefObservation(env), n_steps=24, batch_size=24)
    default.save(tmp_path / "default.zip")  # SB3's CombinedExtractor and [64, 64] layers
    with pytest.raises(ValueError, match=r"not an avex-architecture policy: .*features_extractor_class"):
        PPOAgent.load(tmp_path / "default.zip", env)
    _model(env_kwargs, net_arch=dict(pi=[64], vf=[64])).save(tmp_path / "narrow.zip")
    with pytest.raises(ValueError, match=r"policy_kwargs\['net_arch'\] \{'pi': \[64\], 'vf': \[64\]\}"):
        PPOAgent.load(tmp_path / "narrow.zip", env)
    continuous = gym.make(ENV, action_mode="continuous", **env_kwargs)
    with pytest.raises(ValueError, match="trained for discrete actions"):
        PPOAgent.load(tmp_path / "narrow.zip", continuous)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip archive"):
        PPOAgent.load(tmp_path / "junk.zip", env)
    with pytest.raises(FileNotFoundError):
        PPOAgent.load(tmp_path / "missing.zip", env)


class _Touch:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_zip_with_a_code_running_pickle_never_runs_it(trained, env_kwargs, tmp_path) -> None:
    _, path = trained
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Touch(live))).close()  # the payload is live: unpickling it creates the file
    assert live.exists()
    sentinel = tmp_path / "sentinel"
    evil = pickle.dumps(_Touch(sentinel))
    with zipfile.ZipFile(path) as good:
        data = json.loads(good.read("data"))
    for field in data.values():  # every pickled field of data is now the payload
        if isinstance(field, dict) and ":serialized:" in field:
            field[":serialized:"] = base64.b64encode(evil).decode()
    weights = io.BytesIO()
    torch.save({"features_extractor.out.0.weight": _Touch(sentinel)}, weights)  # as SB3 writes policy.pth
    for name, policy in (("torch.zip", weights.getvalue()), ("raw.zip", evil)):
        with zipfile.ZipFile(tmp_path / name, "w") as bad:
            bad.writestr("data", json.dumps(data))
            bad.writestr("policy.pth", policy)
        with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\)"):
            PPOAgent.load(tmp_path / name, gym.make(ENV, **env_kwargs))
    assert not sentinel.exists()


# ------------------------------------------------------------------ evaluation
def test_wilson_intervals() -> None:
    acc, lo, hi = wilson(np.array([[1, 1]] * 8 + [[0, 1]] * 2, dtype=float))
    assert np.allclose(acc, [0.8, 1.0])
    assert np.allclose([lo[0], hi[0]], [0.4902, 0.9433], atol=1e-4)  # 8 of 10, the textbook value
    assert hi[1] == 1.0 and 0.72 < lo[1] < 0.73
    assert wilson(np.zeros((7, 1)))[1][0] == 0.0  # not -3e-17


def test_evaluation_is_the_same_for_an_agent_a_model_and_a_callable(trained, env_kwargs) -> None:
    model, path = trained

    def fn(obs: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        return model.predict(_belief(obs), deterministic=True, action_masks=mask)[0]

    agent = PPOAgent.load(path, gym.make(ENV, **env_kwargs))
    reports = [evaluate_accuracy(p, ENV, episodes=10, num_envs=5, seed=3, **env_kwargs) for p in (agent, model, fn)]
    first = reports[0]
    assert first.correct.shape == (10, 12) and first.split == "test" and first.episodes == 10
    for report in reports[1:]:
        assert np.array_equal(report.correct, first.correct)
    assert np.array_equal(first.accuracy, first.correct.mean(axis=0)) and first.final == first.accuracy[-1]
    assert (first.ci_low <= first.accuracy).all() and (first.accuracy <= first.ci_high).all()
    assert (first.ci_low >= 0).all() and (first.ci_high <= 1).all() and (first.ci_low < first.ci_high).all()
    assert "glimpse 12" in str(first)


class _Recorder:
    """A stand-in SB3 policy: records the keys it got and whether masks came."""

    def __init__(self, keys: tuple[str, ...] | None, masked: bool) -> None:
        if keys is not None:
            self.observation_space = spaces.Dict({k: spaces.Box(0, 1, (1,)) for k in keys})
        self.seen: list[tuple[set[str], bool]] = []
        if masked:
            self.predict = self._masked  # type: ignore[method-assign]

    def predict(self, obs: dict, deterministic: bool = False) -> tuple[np.ndarray, None]:
        assert deterministic
        self.seen.append((set(obs), False))
        return np.zeros(len(next(iter(obs.values()))), dtype=np.int64), None

    def _masked(self, obs: dict, deterministic: bool = False, action_masks=None) -> tuple[np.ndarray, None]:
        self.seen.append((set(obs), action_masks is not None))
        return np.asarray(action_masks).argmax(axis=1), None


def test_an_sb3_policy_gets_its_own_keys_and_masks_when_it_takes_them() -> None:
    full = (*BELIEF_KEYS, "canvas")
    obs = {k: np.zeros((2, 1)) for k in full}
    mask = np.array([[False, True], [True, False]])
    for keys, masked in ((BELIEF_KEYS, True), (full, False), (None, False)):
        policy = _Recorder(keys, masked)
        agent = as_agent(policy)
        assert isinstance(agent, PredictAgent)
        actions = agent.act(obs, mask)
        assert policy.seen == [(set(keys or full), masked)] and actions.dtype == np.int64
        if masked:
            assert actions.tolist() == [1, 0]
    assert isinstance(as_agent(lambda o, m: m.argmax(1)), CallableAgent)
    with pytest.raises(ValueError, match="lacks"):
        as_agent(_Recorder(("probs", "nope"), False)).act(obs, mask)
    with pytest.raises(ValueError, match="policy must be"):
        as_agent(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------ command line and training
def test_benchmark_takes_a_zip(trained, env_kwargs, tmp_path) -> None:
    _, path = trained
    out = tmp_path / "bench"
    argv = ["benchmark", "--agents", "ppo", "--K", "0", "--episodes", "4", "--num-envs", "4", "--ppo", str(path)]
    assert main([*argv, "--env-kwargs", json.dumps(env_kwargs), "--out", str(out)]) == 0
    assert len(json.loads((out / "benchmark.json").read_text())["results"][0]["accuracy"]) == 12


def test_train_ppo_logs_episode_returns(env_kwargs) -> None:
    cfg = PPOConfig(num_envs=2, total_steps=48, n_steps=24, batch_size=24, n_epochs=1, eval_episodes=2, out=None)
    cfg.env_kwargs = env_kwargs
    model, summary = train_ppo(cfg)
    assert len(model.ep_info_buffer) == 4  # VecMonitor: 2 envs x 2 episodes of 12 glimpses
    assert summary["ep_rew_mean"] == pytest.approx(np.mean([e["r"] for e in model.ep_info_buffer]))
    assert all(e["l"] == 12 for e in model.ep_info_buffer)

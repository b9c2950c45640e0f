"""Agents: AME's rule, masks respected, PPO smoke training and policy round-trip."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import EntropyAgent, RandomAgent, ame_scores, make_agent
from agents.ppo import PPOAgent
from agents.ppo_config import PPOConfig
from agents.ppo_train import train_ppo

TINY = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
)


@pytest.fixture(scope="module")
def env_kwargs(fake_fmnist_root) -> dict:
    return dict(TINY, root=str(fake_fmnist_root))


def test_ame_scores_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    entropy = rng.random((2, 6, 7))
    visited = rng.random((2, 6, 7)) < 0.3
    for g, stride in ((2, 1), (3, 1), (2, 2)):
        got = ame_scores(entropy, visited, g, stride)
        e = np.where(visited, 0.0, entropy)
        want = np.stack(
            [
                [
                    e[b, r : r + g, c : c + g].mean()
                    for r in range(0, 6 - g + 1, stride)
                    for c in range(0, 7 - g + 1, stride)
                ]
                for b in range(2)
            ]
        )
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_entropy_agent_picks_masked_argmax() -> None:
    entropy = np.zeros((1, 4, 4))
    entropy[0, 0, 0] = 10.0  # best window: top-left
    entropy[0, 3, 3] = 5.0  # second best: bottom-right
    visited = np.zeros((1, 4, 4))
    agent = EntropyAgent(glimpse=2)
    mask = np.ones((1, 9), dtype=bool)
    assert agent.act({"entropy": entropy, "visited": visited}, mask)[0] == 0
    mask[0, 0] = False
    assert agent.act({"entropy": entropy, "visited": visited}, mask)[0] == 8
    seen = visited.copy()
    seen[0, 0, 0] = 1  # the top-left cell already seen: its entropy no longer counts, even where allowed
    assert agent.act({"entropy": entropy, "visited": seen}, np.ones((1, 9), dtype=bool))[0] == 8
    # A mask of another batch, or an observation without the map: named, not a KeyError or a wrong count.
    with pytest.raises(ValueError, match=r"action_mask must be bool \[N, A\] with one row per observation \(1\)"):
        agent.act({"entropy": entropy, "visited": visited}, np.ones((2, 9), dtype=bool))
    with pytest.raises(ValueError, match=r"entropy agent reads the observation keys.*lacks \['entropy'\]"):
        agent.act({"visited": visited}, mask)


@pytest.mark.parametrize("name", ["random", "entropy"])
def test_agents_never_take_masked_actions(name: str, env_kwargs: dict) -> None:
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=4, **env_kwargs)
    agent = make_agent(name, venv.unwrapped, seed=1)
    obs, _ = venv.reset(seed=3)
    budget = venv.unwrapped.budget
    for _ in range(2 * budget):  # two episodes, across an autoreset
        mask = venv.unwrapped.action_masks()
        action = agent.act(obs, mask)
        assert mask[np.arange(4), action].all()
        obs, *_ = venv.step(action)
    venv.close()


def test_random_agent_is_seeded() -> None:
    mask = np.ones((3, 20), dtype=bool)
    a, b = RandomAgent(5), RandomAgent(5)
    assert np.array_equal(a.act({}, mask), b.act({}, mask))
    a.reset(6)
    assert not all(np.array_equal(a.act({}, mask), b.act({}, mask)) for _ in range(3))
    state = a.rng.bit_generator.state
    for seed in (-1, 1.5, "1", True):  # numpy's "expected non-negative integer" named no argument
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
            a.reset(seed)
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
            RandomAgent(seed)
    assert a.rng.bit_generator.state == state
    a.reset(np.int64(6))
    a.reset(None)


def test_random_agent_takes_the_envs_action_mode(env_kwargs: dict) -> None:
    """make_agent("random") on a continuous env emits (y, x, z) glimpses the env accepts (the main job builds it so)."""
    for mode, shape, dtype in (("continuous", (3, 3), np.float32), ("discrete", (3,), np.int64)):
        venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=3, **dict(env_kwargs, action_mode=mode))
        agent = make_agent("random", venv.unwrapped, seed=1)
        obs, _ = venv.reset(seed=0)
        action = agent.act(obs, venv.unwrapped.action_masks())
        assert action.shape == shape and action.dtype == dtype
        venv.step(action)
        venv.close()


@pytest.mark.parametrize("action_mode", ["discrete", "continuous"])
def test_ppo_smoke_train_save_load(action_mode: str, env_kwargs: dict, tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = dict(env_kwargs, action_mode=action_mode)
    out = tmp_path / "policy"
    cfg = PPOConfig(
        action_mode=action_mode,
        num_envs=4,
        total_steps=384,
        n_steps=24,
        batch_size=32,
        n_epochs=1,
        eval_episodes=8,
        out=str(out),
        env_kwargs=kwargs,
    )
    _, summary = train_ppo(cfg)
    assert summary["total_steps"] == 384 and 0.0 <= summary["final_test_accuracy"] <= 1.0
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=3, **kwargs)
    agent = PPOAgent.load(out.with_suffix(".safetensors"), venv)
    obs, _ = venv.reset(seed=0)
    mask = venv.unwrapped.action_masks()
    actions = agent.act(obs, mask)
    if action_mode == "discrete":
        assert actions.shape == (3,) and mask[np.arange(3), actions].all()
        again = PPOAgent.load(out.with_suffix(".safetensors"), venv).act(obs, mask)
        assert np.array_equal(actions, again)  # greedy and loaded identically
    else:
        assert actions.shape == (3, 3) and ((actions >= 0) & (actions <= 1)).all()
    # A policy for the other action mode is refused with a clear error.
    other = gym.make_vec(
        "AVE-FashionMNIST-v0",
        num_envs=1,
        **dict(kwargs, action_mode="continuous" if action_mode == "discrete" else "discrete"),
    )
    with pytest.raises(ValueError, match="trained for"):
        PPOAgent.load(out.with_suffix(".safetensors"), other)


def test_ink_map_is_each_patchs_mean_revealed_intensity() -> None:
    """The pooled canvas against a per-patch loop, for one observation and a batch alike."""
    from agents.belief import ink_map

    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, size=(2, 12, 18, 3), dtype=np.uint8)
    got = ink_map(canvas, (3, 6))  # patches of 4 x 3 pixels
    want = np.array(
        [
            [[canvas[b, 4 * r : 4 * r + 4, 3 * c : 3 * c + 3].mean() / 255 for c in range(6)] for r in range(3)]
            for b in range(2)
        ]
    )
    assert got.dtype == np.float32 and got.shape == (2, 3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(ink_map(canvas[1], (3, 6)), got[1])


def test_a_ppo_policy_with_the_ink_map_trains_saves_and_acts_on_the_pooled_canvas(env_kwargs: dict, tmp_path) -> None:
    """``ink=True``: the saved policy reads the canvas pooled per patch, is rebuilt with it from its JSON, and an env
    without the canvas is refused by name."""
    from agents.belief import INK, belief

    torch.manual_seed(0)
    out = tmp_path / "ink"
    common = dict(num_envs=4, total_steps=96, n_steps=24, batch_size=32, n_epochs=1, eval_episodes=4)
    _, summary = train_ppo(PPOConfig(**common, out=str(out), env_kwargs=env_kwargs, ink=True))
    assert summary["ink"] is True
    venv = gym.make_vec("AVE-FashionMNIST-v0", num_envs=3, **env_kwargs)
    agent = PPOAgent.load(out.with_suffix(".safetensors"), venv)
    assert agent.ink and INK in agent.policy.observation_space.spaces
    obs, _ = venv.reset(seed=0)
    for a in (0, 5):  # a glimpse so that the map is not all zeros
        obs, *_ = venv.step(np.full(3, a))
    mask = venv.unwrapped.action_masks()
    seen = belief(obs, ink=True)
    assert seen[INK].shape == (3, *obs["visited"].shape[1:]) and seen[INK].max() > 0
    want, _ = agent.policy.predict(seen, deterministic=True, action_masks=mask)
    assert np.array_equal(agent.act(obs, mask), want)
    # The map changes what the policy does: the same belief with the ink map zeroed scores the actions otherwise.
    obs_t = {k: torch.as_tensor(v) for k, v in seen.items()}
    blank = dict(obs_t, **{INK: torch.zeros_like(obs_t[INK])})
    with torch.no_grad():
        logits = [agent.policy.get_distribution(o).distribution.logits for o in (obs_t, blank)]
    assert not torch.allclose(*logits)
    narrow = gym.make_vec("AVE-FashionMNIST-v0", num_envs=1, obs_keys=["probs", "cls", "entropy", "visited", "step"])
    with pytest.raises(ValueError, match="canvas"):
        PPOAgent.load(out.with_suffix(".safetensors"), narrow)
    for env in (venv, narrow):
        env.close()


def test_unknown_agent_name() -> None:
    with pytest.raises(ValueError, match="unknown agent"):
        make_agent("greedy", None)


def test_shipped_ppo_resolves_to_the_specialist_of_the_envs_K() -> None:
    """The shipped name picks the policy trained at the env's K where one is shipped, and leaves paths alone."""
    from agents.ppo import shipped_for_k
    from avex.checkpoint import SHIPPED_POLICIES, resolve_file

    at = {K: gym.make("AVE-FashionMNIST-v0", K=K) for K in (3, 6)}
    assert shipped_for_k("shipped:fashion-mnist", at[3]) == "shipped:fashion-mnist"
    assert shipped_for_k("shipped:fashion-mnist", at[6]) == "shipped:fashion-mnist-k6"
    assert shipped_for_k("runs/mine.safetensors", at[6]) == "runs/mine.safetensors"
    for name in SHIPPED_POLICIES:  # every entry of the table is a file that loads for an env at its K
        assert resolve_file(f"shipped:{name}", policy=True).exists(), name
    agent = PPOAgent.from_env(at[6])
    assert agent.meta["env_kwargs"]["K"] == 6
    for env in at.values():
        env.close()


def test_ppo_init_starts_from_the_given_policy(env_kwargs: dict, tmp_path) -> None:
    """``init`` loads a policy's weights before training: with a zero learning rate they come out unchanged."""
    from safetensors.torch import load_file

    common = dict(num_envs=4, total_steps=96, n_steps=24, batch_size=32, n_epochs=1, eval_episodes=4)
    first = tmp_path / "first"
    train_ppo(PPOConfig(**common, out=str(first), env_kwargs=env_kwargs, seed=1))
    warm = tmp_path / "warm"
    train_ppo(PPOConfig(**common, out=str(warm), env_kwargs=env_kwargs, seed=2, learning_rate=0.0, init=str(first)))
    a, b = (load_file(str(p.with_suffix(".safetensors"))) for p in (first, warm))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tmp_path / "fresh"  # and without init, seed 2 starts elsewhere: the check above can fail
    train_ppo(PPOConfig(**common, out=str(fresh), env_kwargs=env_kwargs, seed=2, learning_rate=0.0))
    c = load_file(str(fresh.with_suffix(".safetensors")))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_entropy_agent_refuses_an_env_without_the_entropy_map() -> None:
    """An env whose obs_keys leave the map out is refused by name when the agent is made, not with a KeyError later."""
    for make in (
        lambda **kw: gym.make("AVE-FashionMNIST-v0", **kw),
        lambda **kw: gym.make_vec("AVE-FashionMNIST-v0", 2, **kw),
    ):
        env = make(obs_keys=["probs", "visited"])
        with pytest.raises(ValueError, match=r"obs_keys leave out \['entropy'\]"):
            make_agent("entropy", env)
        env.close()
        ok = make(obs_keys=["entropy", "visited"])
        assert isinstance(make_agent("entropy", ok), EntropyAgent)
        ok.close()


def test_make_agent_refuses_a_bad_seed_or_env_by_name() -> None:
    """A seed numpy would refuse deep inside, or something that is not an avex env, is refused when the agent is
    made, naming the argument; an agent that cannot play the env's action mode or observation is refused too."""
    venv = gym.make_vec("AVE-FashionMNIST-v0", 2)
    for seed in (-1, "abc", 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
            make_agent("random", venv, seed=seed)
    for env in (None, gym.make("CartPole-v1")):
        with pytest.raises(ValueError, match=r"env must be an avex environment"):
            make_agent("random", env)
    for agent in ("random", "ppo"):  # torch's RuntimeError once the policy was built, for the ppo agent
        with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"):
            make_agent(agent, venv, device="gpu")
    venv.close()
    continuous = gym.make_vec("AVE-FashionMNIST-v0", 2, action_mode="continuous")
    with pytest.raises(ValueError, match=r"entropy agent chooses grid positions.*action_mode='discrete'"):
        make_agent("entropy", continuous)
    continuous.close()
    narrow = gym.make_vec("AVE-FashionMNIST-v0", 2, obs_keys=["probs"])
    with pytest.raises(ValueError, match=r"lookahead agent.*obs_keys leave out \['canvas'\]"):
        make_agent("lookahead", narrow)
    narrow.close()


def test_evaluate_accuracy_refuses_before_it_touches_the_agent(env_kwargs: dict) -> None:
    """Every refused call names its argument and leaves the agent's generator where it was; a good call then
    re-seeds it (so the check on the state can fail)."""
    from agents import evaluate_accuracy

    agent = RandomAgent(0)
    agent.rng.random(5)
    state = agent.rng.bit_generator.state
    bad = [
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(seed="a"), r"seed must be an integer >= 0"),
        (
            dict(env_id="CartPole-v1"),
            r"env_id must be an avex environment, one of \[.*AVE-FashionMNIST-v0.*got 'CartPole-v1'",
        ),
        (dict(autoreset_mode="next_step"), r"leave autoreset_mode out \(got autoreset_mode='next_step'\)"),
        (dict(max_episode_steps=3), r"leave max_episode_steps out \(got max_episode_steps=3\)"),
        (dict(budget=0), r"budget"),  # refused by the env, which is made before the agent is re-seeded
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            evaluate_accuracy(agent, **{"episodes": 2, "num_envs": 2, **env_kwargs, **kwargs})
        assert agent.rng.bit_generator.state == state, kwargs
    evaluate_accuracy(agent, episodes=2, num_envs=2, autoreset_mode="same_step", **env_kwargs)
    assert agent.rng.bit_generator.state != state


_RUN = dict(num_envs=2, total_steps=48, n_steps=24, batch_size=16, n_epochs=1, eval_episodes=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_envs=0), r"--num-envs must be an integer >= 1, got 0"),
        (dict(total_steps=0), r"--total-steps must be an integer >= 1, got 0"),
        (dict(n_steps=0), r"--n-steps must be an integer >= 1 \(rollout length per env\), got 0"),
        (dict(batch_size=1), r"--batch-size must be an integer >= 2 .*, got 1"),
        (dict(batch_size=100), r"--batch-size 100 is more than a rollout holds \(--n-steps 24 x --num-envs 2 = 48\)"),
        (dict(n_epochs=0), r"--n-epochs must be an integer >= 1, got 0"),
        (dict(learning_rate=float("nan")), r"--lr must be a number >= 0 .*, got nan"),
        (dict(learning_rate=-1.0), r"--lr must be a number >= 0"),
        (dict(ent_coef=-0.5), r"--ent-coef must be a number >= 0 .*, got -0.5"),
        (dict(gamma=1.5), r"--gamma must be a number in \[0, 1\] .*, got 1.5"),
        (dict(gamma=float("nan")), r"--gamma must be a number in \[0, 1\]"),
        (dict(eval_every=-1), r"--eval-every must be an integer >= 0 \(0: at the end only\), got -1"),
        (dict(eval_episodes=0), r"--eval-episodes must be an integer >= 1, got 0"),
        (dict(time_limit=0.0), r"--time-limit must be a number > 0 seconds \(leave it out: no limit\), got 0.0"),
        (dict(time_limit=float("nan")), r"--time-limit must be a number > 0"),
        (dict(seed=-1), r"--seed must be an integer in 0..4294967295, got -1"),
        (dict(seed=2**32), r"--seed must be an integer in 0..4294967295"),
        (dict(seed=1.5), r"--seed must be an integer in 0..4294967295, got 1.5"),
        (dict(action_mode="grid"), r"--action-mode must be 'discrete' or 'continuous', got 'grid'"),
        (dict(K=-1), r"--K must be an integer >= 0, got -1"),
        (dict(device="gpu"), r"--device must be 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"),
        (dict(env_id="CartPole-v1"), r"--env must be an avex environment, .*got 'CartPole-v1'"),
        (dict(env_kwargs=[1, 2]), r"--env-kwargs must be a JSON object"),
        (dict(env_kwargs={"num_envs": 3}), r"--env-kwargs sets num_envs=3: set --num-envs instead"),
        (
            dict(env_kwargs={"max_episode_steps": 3}),
            r"\(--env-kwargs\).*leave max_episode_steps out \(got max_episode_steps=3\)",
        ),
        (dict(env_kwargs={"autoreset_mode": "next_step"}), r"\(--env-kwargs\).*got autoreset_mode='next_step'"),
        (dict(init="/nonexistent/p.safetensors"), r"--init '/nonexistent/p.safetensors': no policy file"),
        (dict(init="shipped:nope"), r"--init 'shipped:nope': no shipped PPO policy named 'nope'"),
        (
            dict(init="shipped:fashion-mnist"),
            r"--init 'shipped:fashion-mnist' was trained with the ink map .*add --ink",
        ),
        (dict(out=""), r"--out must be a file stem such as 'runs/ppo/policy'"),
    ],
)
def test_bad_ppo_settings_are_refused_before_anything_is_built(
    change: dict, message: str, tmp_path, monkeypatch
) -> None:
    """Each refusal names the flag and the value, before any env is built (SB3 and torch would refuse some deep
    inside or after training, and take others silently) and before the output's folder is made."""
    monkeypatch.setattr(gym, "make_vec", lambda *a, **k: pytest.fail("an env was built"))
    cfg = PPOConfig(**{**_RUN, "out": str(tmp_path / "runs" / "policy"), **change})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_ppo(cfg)
    assert list(tmp_path.iterdir()) == []


def test_ppo_out_under_a_file_is_refused_before_training(tmp_path, monkeypatch) -> None:
    """A file on --out's path was found only when the policy was saved, after the whole run (NotADirectoryError)."""
    monkeypatch.setattr(gym, "make_vec", lambda *a, **k: pytest.fail("an env was built"))
    (tmp_path / "notes").write_text("a file")
    out = tmp_path / "notes" / "policy"
    with pytest.raises(ValueError, match=r"--out '.*notes/policy\.safetensors': '.*notes' exists and is not a folder"):
        train_ppo(PPOConfig(**_RUN, out=str(out)))
    assert (tmp_path / "notes").read_text() == "a file"


def test_ppo_evaluates_on_the_data_sets_evaluation_split(tmp_path) -> None:
    """An image folder has train and val, no test: the final evaluation used to look for <root>/test after
    training; it plays the data set's evaluation split, as avex benchmark does."""
    from reliability_kit import TINY as TINY_MODEL
    from reliability_kit import image_folder

    for split in ("train", "val"):
        image_folder(tmp_path / "images" / split, per_class=2)
    kwargs = dict(root=str(tmp_path / "images"), split="train", image_size=32, patch=8, budget=4, **TINY_MODEL)
    cfg = PPOConfig(env_id="AVE-ImageFolder-v0", **dict(_RUN, total_steps=16, n_steps=8), env_kwargs=kwargs, out=None)
    _, summary = train_ppo(cfg)
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0

"""The look-ahead agent: allowed actions only, the env's state untouched, batched equals alone, no peeking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reliability_kit import assert_same_state, fm_env, fm_vector, snapshot

from agents import LookaheadAgent, make_agent
from agents.lookahead import patch_glimpses
from avex.flops import ViTDims, step_flops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUDGET = 6  # enough steps for every code path (growing cache), few enough to stay fast


def test_take_copies_rows_and_leaves_the_cache(fake_fmnist_root: Path) -> None:
    venv = fm_vector(fake_fmnist_root, 2, budget=BUDGET)
    venv.reset(seed=0)
    venv.step(np.array([0, 5]))
    venv.step(np.array([20, 7]))
    eng = venv.unwrapped.engine
    cache, before = eng.cache, eng.cache.buf.clone()
    copy = cache.take(np.array([1, 0, 1]), capacity=3)
    assert copy.buf.shape[0] == 3 and copy.capacity == 3 and copy.counts.tolist() == [2, 2, 2]
    filled = cache.num_prefix + 2 * cache.tokens_per_glimpse
    assert torch.equal(copy.buf[0, :filled], cache.buf[1, :filled])
    assert torch.equal(copy.coords[2, : 2 * cache.tokens_per_glimpse], cache.coords[1, : 2 * cache.tokens_per_glimpse])
    # A step on the copy is the step the env would take, and the original is untouched.
    geo, m = eng.geometry, eng.model
    rows, cols = (torch.from_numpy(v) for v in geo.action_to_patch(np.array([30, 30, 40])))
    pixels, coords = geo.cut(eng.hidden[[1, 0, 1]], rows, cols), geo.glimpse_coords(rows, cols)
    with torch.inference_mode():
        got = m.step(copy, pixels, coords).logits
    assert torch.equal(cache.buf, before) and cache.counts.tolist() == [2, 2]
    venv.step(np.array([30, 40]))  # row 0 takes 30 (copy 1), row 1 takes 40 (copy 2)
    torch.testing.assert_close(got[[1, 2]].float(), eng.logits)
    with pytest.raises(ValueError, match="capacity=1"):
        cache.take(np.array([0]), capacity=1)


def test_patch_glimpses_equal_cut(fake_fmnist_root: Path) -> None:
    env = fm_env(fake_fmnist_root)
    eng = env.unwrapped.engine
    m, geo = eng.model, eng.geometry
    canvases = torch.rand(3, *eng.source.canvas_shape)  # [B, H, W, C]
    env_idx = torch.tensor([2, 0, 2, 1])
    rows, cols = (torch.from_numpy(v) for v in geo.action_to_patch(np.array([0, 17, 168, 100])))
    coords = geo.glimpse_coords(rows, cols)
    got = patch_glimpses(m.patchify(canvases.permute(0, 3, 1, 2)), env_idx, coords, m)
    torch.testing.assert_close(got, geo.cut(canvases[env_idx], rows, cols), rtol=0, atol=0)


def _strict_pair(root: Path, n: int | None) -> tuple[Any, Any]:
    """An env and its twin (same arguments), strict: a masked action raises. ``n``: vector envs (None: single)."""
    if n is None:
        return fm_env(root, strict=True, budget=BUDGET), fm_env(root, strict=True, budget=BUDGET)
    return fm_vector(root, n, strict=True, budget=BUDGET), fm_vector(root, n, strict=True, budget=BUDGET)


@pytest.mark.parametrize("n", [None, 2])
def test_allowed_actions_only_and_env_untouched(fake_fmnist_root: Path, n: int | None) -> None:
    env, twin = _strict_pair(fake_fmnist_root, n)
    agent = make_agent("lookahead", env)
    obs, _ = env.reset(seed=3)
    twin_obs, _ = twin.reset(seed=3)
    eng = env.unwrapped.engine
    for _ in range(BUDGET):
        mask = env.unwrapped.action_masks()
        rngs = env.unwrapped.env_rngs if n else [env.unwrapped.np_random]
        before, torch_rng = snapshot(eng, rngs), torch.get_rng_state()
        action = agent.act_single(obs, mask) if n is None else agent.act(obs, mask)
        assert_same_state(snapshot(eng, rngs), before)
        assert torch.equal(torch.get_rng_state(), torch_rng)
        assert np.asarray(mask, dtype=bool).reshape(-1, eng.num_actions)[np.arange(n or 1), np.atleast_1d(action)].all()
        obs, _, _, _, info = env.step(action)  # strict: a masked action would raise here
        twin_obs, _, _, _, twin_info = twin.step(action)
        for key in obs:
            np.testing.assert_array_equal(obs[key], twin_obs[key], err_msg=key)
        np.testing.assert_array_equal(info["prediction"], twin_info["prediction"])


def test_batched_equals_alone(fake_fmnist_root: Path) -> None:
    venv = fm_vector(fake_fmnist_root, 3, budget=BUDGET)
    singles = [fm_env(fake_fmnist_root, budget=BUDGET) for _ in range(3)]
    batched = make_agent("lookahead", venv)
    alone = [make_agent("lookahead", e) for e in singles]
    obs, _ = venv.reset(seed=11)
    one = [e.reset(seed=11 + i)[0] for i, e in enumerate(singles)]
    for _ in range(BUDGET):
        actions = batched.act(obs, venv.unwrapped.action_masks())
        each = [a.act_single(o, e.unwrapped.action_masks()) for a, o, e in zip(alone, one, singles, strict=True)]
        np.testing.assert_array_equal(actions, each)
        obs, *_ = venv.step(actions)
        one = [e.step(int(a))[0] for e, a in zip(singles, actions, strict=True)]


def test_no_peeking_at_unseen_pixels(fake_fmnist_root: Path) -> None:
    env = fm_env(fake_fmnist_root, budget=BUDGET)
    agent = LookaheadAgent.from_env(env)
    obs, _ = env.reset(seed=1)
    obs, *_ = env.step(84)
    eng = env.unwrapped.engine
    env_idx, action = np.zeros(eng.num_actions, dtype=np.int64), np.arange(eng.num_actions)
    canvas = obs["canvas"][None]
    first = agent.candidate_scores(canvas, env_idx, action)
    assert eng.seen.any() and not eng.seen.all()
    # The imagined canvas: the revealed pixels where seen, the decoder's guess (not the canvas's zeros) elsewhere.
    m = eng.model
    revealed = m.patchify(torch.as_tensor(canvas).permute(0, 3, 1, 2).float() / 255.0)
    seen = m.patchify(eng.seen[:, None].expand(-1, m.in_chans, -1, -1).float()) > 0
    imagined = agent.imagine(canvas)
    assert torch.equal(imagined[seen], revealed[seen]) and (imagined[~seen] != revealed[~seen]).any()
    with torch.inference_mode():  # only what the agent never saw changes
        eng.hidden[~eng.seen] = 255 - eng.hidden[~eng.seen]
    np.testing.assert_array_equal(agent.candidate_scores(canvas, env_idx, action), first)


def test_scores_chunks_and_refusals(fake_fmnist_root: Path) -> None:
    env = fm_env(fake_fmnist_root, budget=BUDGET)
    obs, _ = env.reset(seed=2)
    obs, *_ = env.step(0)
    eng = env.unwrapped.engine
    env_idx, action = np.zeros(eng.num_actions, dtype=np.int64), np.arange(eng.num_actions)
    whole = LookaheadAgent(eng).candidate_scores(obs["canvas"][None], env_idx, action)
    chunked = LookaheadAgent(eng, chunk=50).candidate_scores(obs["canvas"][None], env_idx, action)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert (whole >= 0).all() and (whole <= np.log(eng.model.num_classes) + 1e-6).all()
    # The choice is the allowed position of the lowest score (the first on ties), not any allowed one.
    mask = env.unwrapped.action_masks()
    assert not np.all(whole[mask] == whole[mask][0])  # distinct scores: the choice below is a real test
    choice = LookaheadAgent(eng).act({"canvas": obs["canvas"][None]}, mask[None])
    assert choice.tolist() == [np.flatnonzero(mask)[np.argmin(whole[mask])]]
    doubt = LookaheadAgent(eng, score="confidence").candidate_scores(obs["canvas"][None], env_idx, action)
    assert ((doubt >= 0) & (doubt < 1)).all()
    with pytest.raises(ValueError, match="score must be one of"):
        LookaheadAgent(eng, score="nope")
    with pytest.raises(ValueError, match="discrete"):
        LookaheadAgent.from_env(fm_env(fake_fmnist_root, action_mode="continuous"))
    with pytest.raises(ValueError, match="action mask of shape"):
        LookaheadAgent(eng).act({"canvas": obs["canvas"][None]}, np.ones((1, 3), dtype=bool))


def test_flops_per_decision(fake_fmnist_root: Path) -> None:
    env = fm_env(fake_fmnist_root, budget=BUDGET)
    eng = env.unwrapped.engine
    agent = LookaheadAgent.from_env(env)
    d, g2 = ViTDims.of(eng.model), eng.geometry.tokens_per_glimpse
    one = step_flops(d, 3, g2, eng.K, decoder=False)
    assert agent.flops_per_decision(2, 10) - agent.flops_per_decision(2, 9) == one
    assert agent.flops_per_decision(2, 0) > 0

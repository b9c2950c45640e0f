"""The single AVE environment: a Gymnasium ``Env`` over one row of :class:`envs.engine.AVEEngine`."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from avex.transfer import tree_to_host
from envs.config import EnvConfig, check_options, check_seed
from envs.engine import AVEEngine
from envs.views import EngineViews, row_info

__all__ = ["AVEEnv"]


def _row(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The single env's observation: row 0 of the engine's batch."""
    return {k: v[0] for k, v in obs.items()}


class AVEEnv(EngineViews, gym.Env):
    """
    ## Description

    Active Visual Exploration: an image (the *canvas*) is hidden, and the agent uncovers it one glimpse
    at a time. After every glimpse a TORE-backed Vision Transformer classifies the image from everything
    revealed so far. Token recycling makes each step cheap: the first ``K`` blocks (the iterator) run once
    per glimpse on that glimpse alone and their output tokens are cached; the remaining blocks (the
    aggregator) run over all cached tokens. The agent's goal is to choose glimpses that make the
    classifier right (and confident) as early as possible. On ``AVE-FashionMNIST-v0`` a small clothing
    item sits somewhere on a 112x112 black canvas among clutter fragments, so where to look matters.

    ## Action Space

    ``action_mode="discrete"`` (default): ``Discrete(A)``, the top-left patch of a square glimpse of
    ``glimpse x glimpse`` patches, row-major over the ``(gh - g + 1) x (gw - g + 1)`` positions at a stride
    of one patch (``positions="grid"``: stride ``g``, non-overlapping tiles); ``AVE-FashionMNIST-v0``:
    ``Discrete(169)``. Every action of the space is valid, so plain SB3 ``PPO`` and random agents run as
    they are: a position already taken this episode re-reveals known pixels (its tokens enter the cache
    again and it spends budget) and sets ``info["repeated"]``. The masks advise against repeats:
    :meth:`action_masks` (bool ``[A]``, for MaskablePPO) and ``info["action_mask"]`` (int8 ``[A]``) are False
    at taken positions; ``allow_repeats=True`` makes them all True. ``strict=True`` refuses a masked action
    with ``ValueError`` and changes nothing. An action outside ``0..A-1`` or not an integer raises ``ValueError``.

    ``action_mode="continuous"``: ``Box(0, 1, (3,), float32)``, ``(y, x, z)`` as in AdaGlimpse: the glimpse
    side is ``s = z * (min(H, W) * max_ratio - g * patch) + g * patch`` pixels, its top-left is
    ``(y * (H - s), x * (W - s))``, and it is resized to ``g * patch`` pixels (always ``g * g`` tokens).

    ## Observation Space

    A ``Dict`` with fixed shapes:

    | Key       | Space                            | Meaning                                                     |
    |-----------|----------------------------------|-------------------------------------------------------------|
    | `canvas`  | `Box(0, 255, (H, W, C), uint8)`  | revealed pixels; unseen pixels are 0                        |
    | `visited` | `Box(0, 1, (gh, gw), uint8)`     | patches revealed so far (centre inside a glimpse)           |
    | `step`    | `Box(0, budget, (1,), int64)`    | glimpses taken                                              |
    | `probs`   | `Box(0, 1, (classes,), float32)` | the classifier's class probabilities after the last glimpse |
    | `cls`     | `Box(-inf, inf, (D,), float32)`  | the aggregator's pooled CLS features                        |
    | `entropy` | `Box(0, inf, (gh, gw), float32)` | AME attention-entropy map from the decoder                  |

    The entropy map is raw (seen patches are not zeroed), and all zeros if `entropy=False`. `obs_keys`
    keeps some keys only (the space too); a key left out is never computed: without `entropy` the decoder
    never runs, without `canvas` no revealed canvas is composed or copied.

    ## Rewards

    ``reward="dense"`` (default): ``L_{t-1} - L_t``, the drop of the true class's cross-entropy caused by
    glimpse ``t`` (``L_0`` from the empty pass at reset), so an episode's return is ``L_0 - L_T``.
    ``reward="sparse"``: ``1.0`` at the last step if the final prediction is right, else ``0.0``.

    ## Starting State

    A canvas is drawn with the env's ``np_random`` (``reset(seed=...)``), or image ``i`` of the split with
    ``reset(options={"index": i})`` (for evaluation over a whole split). Nothing is revealed; ``probs``,
    ``cls`` and ``entropy`` come from the *empty pass* (the model on its class token alone), the same for
    every image. Unreadable image files are skipped with a warning (once per file) and counted per episode
    (``info["skipped_images"]``), so the same seed gives the same observations and infos.

    ## Episode End

    Termination after ``budget`` glimpses (12 on every registered id), repeats included; the env never
    truncates (``gym.make(..., max_episode_steps=n)`` does, with a ``TimeLimit``). ``budget`` is at most
    the distinct positions (169 on ``AVE-FashionMNIST-v0``), so a masked agent always has one left; with
    ``allow_repeats=True`` or continuous actions, at most the grid's patches.

    ## Info

    ``prediction`` (int), ``correct`` (bool), ``label`` (int), ``index`` (int, image of the split),
    ``step_flops`` / ``cumulative_flops`` (int, analytic FLOPs = 2 x multiply-accumulates of this step and
    of the episode so far, decoder included iff the observation holds the entropy map, ``entropy=True`` and
    ``"entropy"`` in ``obs_keys``; the reset info holds the empty pass's),
    ``glimpse_box`` (float32 ``(y0, x0, y1, x1)`` pixels, NaN at reset), ``action_mask`` (int8 ``[A]``),
    ``skipped_images`` (int, unreadable files passed over while drawing this episode's image), ``repeated``
    (bool, this step's discrete position was already taken this episode; False at reset and in continuous mode).

    ## Arguments

    ```python
    >>> import avex, gymnasium as gym
    >>> env = gym.make("AVE-FashionMNIST-v0", render_mode="rgb_array")
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step(env.unwrapped.action_masks().argmax())
    >>> frame = env.render()  # uint8 [H', W', 3]: canvas, numbered glimpses, top-3 predictions

    ```

    Arguments, each with its type and the default of the registered ids (FashionMNIST / ImageNet / ImageFolder):

    - `dataset` (**str**): `"fashion-mnist"` / `"imagenet"` / `"folder"`
    - `split` (**str**): `"train"` / `"val"` / none (the root; a root holding only `train/`, `val/`: `"val"`,
      with a warning); `""` reads the root itself
    - `root` (**str or Path**, default `None`): data folder (Fashion-MNIST: installed files; ImageNet: or
      `$AVEX_IMAGENET`; folder: required)
    - `image_size` (**int or (H, W)**): 112 / 224 / 224, canvas side
    - `clutter` (**int**, Fashion-MNIST only, default 4): clutter fragments per canvas (also `scale`, `fragment`)
    - `in_chans`, `classes`, `class_names` (folder only, default 3, `None`, `None`): channels, class order, names
    - `model` (**str**): `"vit_tiny_patch16_224"` / `"deit3_small_patch16_224"` / `"vit_small_patch16_224"`,
      a timm ViT name (plain `VisionTransformer`s only: others are refused by name, see `envs.models`)
    - `checkpoint` (**str or Path**): `"shipped:fashion-mnist"` / `None` / `None`; an avex checkpoint or a timm
      safetensors file
    - `pretrained` (**bool**): `False` / `True` / `True`, timm hub weights (local cache when offline)
    - `model_kwargs` (**dict**, default `None`): extra `timm.create_model` args (depth, embed_dim, ...)
    - `device` (**str**, default `"cpu"`): `"cpu"`, `"cuda"` or `"cuda:<i>"`; `dtype` (default `"float32"`) or
      `"bfloat16"`
    - `patch` (**int**, default `None` on every id): the model's own patch (the shipped checkpoint's 8, 16 for
      the default ImageNet and folder models, 14 for a dinov2); the data set's (8 / 16 / 16) for its own
      `model` built from scratch; an int builds the model at it
    - `glimpse` (**int**, default 2): glimpse side in patches
    - `positions` (**str**, default `"overlapping"`): `"overlapping"` (stride 1) or `"grid"` (stride = glimpse);
      discrete actions only
    - `budget` (**int**, default 12): glimpses per episode
    - `K` (**int**, default `depth // 2`): TORE split, 0..depth (depth: cheapest)
    - `action_mode` (**str**, default `"discrete"`): `"discrete"` or `"continuous"`
    - `max_ratio` (**float**, default 1.0): largest continuous glimpse, fraction of the short side
    - `allow_repeats` (**bool**, default `False`): masks allow taken positions too (and `budget` up to the patches)
    - `strict` (**bool**, default `False`): refuse a masked action (a repeat) instead of taking and flagging it
    - `reward` (**str**, default `"dense"`): `"dense"` or `"sparse"`
    - `entropy` (**bool**, default `True`): the decoder may compute the entropy map, lazily: a step only marks
      it stale and the decoder runs when the observation (or an agent) reads it; `False`: the map is zeros and a
      model without a decoder is accepted
    - `obs_keys` (**list of str**, default `None`: all six): the observation's keys, e.g. `["probs", "cls",
      "entropy", "visited", "step"]` (what a PPO policy reads; one with the ink map, as the shipped ones, also reads
      `"canvas"`); unknown or repeated keys raise `ValueError`
    - `cache_images` (**bool**, default `False`): keep decoded images of a folder in memory
    - `render_mode` (**str**, default `None`): `"rgb_array"`

    Bad values raise ``ValueError`` at construction (a missing file ``FileNotFoundError``), naming the
    argument, the value and the allowed ones; sizes are bounded before anything is allocated (see
    :class:`envs.config.EnvConfig`). A refused ``reset`` or ``step`` changes nothing. The model is shared by
    all environments of a process (never copied); pickling an env keeps its exact episode state, and its
    model is re-acquired from the checkpoint or hub weights on unpickling, while a random model's weights
    travel in the pickle (so another process predicts the same).

    ## Vectorized environment

    ``gym.make_vec(id, num_envs=N)`` builds :class:`envs.vector.AVEVectorEnv`: one batched model call
    for all N environments per step; same-step autoreset by default, next-step with
    ``autoreset_mode="next_step"`` (what Gymnasium's vector wrappers need); ``torch_obs=True`` returns every
    per-env array as a tensor on the model's device. A step waits for the device once, for the one copy of
    its NumPy outputs, and never with ``torch_obs`` (actions given as NumPy arrays).

    ## Version History

    - v0: the ids above. Later changes kept v0, since the registered defaults give the same episodes (one
      info key added): repeats, once refused, are taken and flagged (``strict=True`` refuses them);
      ``patch`` is registered as None, so a named timm model keeps its own patch (a dinov2: 14, where it
      was rebuilt at 16) while the defaults keep theirs; timm models TORE cannot wrap are refused by name
      before timm builds them; a folder root of split folders reads one split; the vector env gained
      next-step autoreset and all-tensor ``torch_obs``; the entropy map is computed only when read, and
      ``obs_keys`` leaves keys out of the observation (never computed, FLOPs without the decoder when the
      entropy map is left out).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.config = EnvConfig.from_kwargs(**kwargs)
        self.engine = AVEEngine(self.config, 1)
        self.observation_space = self.engine.observation_space
        self.action_space = self.engine.action_space

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode. ``options={"index": i}`` shows image ``i`` of the split."""
        options = check_options(options, ["index"])
        index = options.get("index")
        if index is not None:
            index = self.engine.check_index(index)  # before seeding: a bad option changes nothing
        super().reset(seed=check_seed(seed))  # numpy integers as ints; -1, 1.5, "1": ValueError, nothing changed
        self.engine.reset_rows([0], [self.np_random], [index])
        out = tree_to_host(dict(obs=self.engine.observation(), info=self.engine.info()))  # one transfer
        return _row(out["obs"]), row_info(out["info"], 0)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """One glimpse. Returns (obs, reward: float, terminated: bool, truncated: False, info)."""
        a = np.asarray(action)
        if self.config.action_mode == "discrete":
            a = a.reshape(1) if a.ndim == 0 else a
        elif a.shape == (3,):
            a = a[None]
        rewards, terminated = self.engine.step(a)
        out = tree_to_host(dict(obs=self.engine.observation(), reward=rewards, info=self.engine.info()))
        return _row(out["obs"]), float(out["reward"][0]), bool(terminated[0]), False, row_info(out["info"], 0)

    def action_masks(self) -> np.ndarray:
        """bool [A]: True where a discrete action is allowed now (for sb3-contrib's MaskablePPO)."""
        return self.engine.action_masks()[0]

    def frame(self) -> np.ndarray:
        """uint8 [H', W', 3]: the canvas (unseen parts dimmed), numbered glimpse boxes and the top-3 predictions."""
        return self.engine.frame(0)

    def render(self) -> np.ndarray | None:
        """The :meth:`frame` when ``render_mode="rgb_array"``; None (with a warning) without a render mode."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render mode: make the env with render_mode='rgb_array'")
            return None
        return self.frame()

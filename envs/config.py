"""The environments' arguments (:class:`EnvConfig`) and what they resolve to: a canvas source, a split, a patch
(the model itself: :mod:`envs.models`).

Every per-data-set default (split, canvas size, model, data-set options such as Fashion-MNIST's
``clutter``) comes from the data-set registry (:data:`avex.data.DATASETS`); every reward name from
:data:`envs.rewards.REWARDS`. Nothing here special-cases a data set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from avex.checks import brief, check_device, check_int
from avex.data import DATASETS, CanvasSource, DatasetSpec, get_dataset
from avex.data.registry import canvas_hw
from avex.safeload import check_build_args
from envs.rewards import REWARDS

__all__ = [
    "ACTION_MODES",
    "MAX_IMAGE_SIDE",
    "MAX_PATCHES",
    "OBS_KEYS",
    "POSITIONS",
    "EnvConfig",
    "check_flag",
    "check_grid",
    "check_int",
    "check_obs_keys",
    "check_options",
    "check_seed",
]

ACTION_MODES = ("discrete", "continuous")
POSITIONS = ("overlapping", "grid")
OBS_KEYS = ("canvas", "visited", "step", "probs", "cls", "entropy")  # the observation's keys, in its order
# Size bounds, checked before anything is allocated. Every env holds its canvas (H x W x C bytes) and per
# patch state (position tables, the visited map, the decoder's grid, whose attention grows with the square
# of the patch count): 2048 px and a 128 x 128 patch grid are far above any ViT set-up and far below sizes
# that take gigabytes or minutes.
MAX_IMAGE_SIDE = 2048
MAX_PATCHES = 128 * 128


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {brief(value)}")


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool; ValueError unless it is True or False (``"no"`` would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {brief(value)}")
    return bool(value)


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """A reset seed as a Python int >= 0 (numpy integers accepted), or None."""
    return None if seed is None else check_int(name, seed, 0)


def check_options(options: Any, allowed: Sequence[str]) -> dict[str, Any]:
    """Reset options as a dict with only ``allowed`` keys (None: empty). Raises ValueError otherwise."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict (keys {sorted(allowed)}) or None, got {brief(options)}")
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; allowed: {sorted(allowed)}")
    return dict(options)


def check_obs_keys(value: Any) -> tuple[str, ...]:
    """The observation keys to return, in :data:`OBS_KEYS`' order; ValueError for anything but a non-empty list
    or tuple of distinct known keys (a bare string would read as its letters)."""
    keys = list(value) if isinstance(value, (list, tuple)) else None
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            f"obs_keys must be a non-empty list of observation keys (of {list(OBS_KEYS)}) or None for all, "
            f"got {brief(value)}"
        )
    unknown = [k for k in keys if k not in OBS_KEYS]
    if unknown or len(set(keys)) != len(keys):
        what = f"unknown key(s) {unknown}" if unknown else "a key twice"
        raise ValueError(f"obs_keys has {what}: {brief(value)}; choose among {list(OBS_KEYS)}, each once")
    return tuple(k for k in OBS_KEYS if k in keys)


def check_grid(grid: tuple[int, int]) -> None:
    """Refuse a patch grid over :data:`MAX_PATCHES` (the reason and the fixes in the message)."""
    cells = grid[0] * grid[1]
    if cells > MAX_PATCHES:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} patch grid ({cells} patches) exceeds the {MAX_PATCHES} an environment allows "
            "(per-patch state, position tables and the decoder's attention grow with it): "
            "use a larger patch or a smaller image_size"
        )


@dataclass(frozen=True)
class EnvConfig:
    """Every keyword argument of the AVE environments (plain data: ``gym.make`` deep-copies it).

    Data:
        dataset: a registered data set (``avex.data.DATASETS``: "fashion-mnist", "imagenet", "folder", ...).
        split: sub-folder / split name; None: the data set's env split ("train" for Fashion-MNIST; a folder
            root holding only split folders: "val", else "train", with a warning); "": the root itself.
        root: data folder (str or pathlib.Path, kept as its str); None: the data set's own search
            (ImageNet: $AVEX_IMAGENET).
        image_size: canvas side (or (H, W)); None: the data set's.
        options: data-set-specific arguments (Fashion-MNIST: ``clutter``); passed to ``gym.make`` as
            plain keywords (``clutter=0``), refused for a data set that does not declare them.
        cache_images: keep decoded images of a folder / ImageNet in memory (fast resets on small folders).

    Sizes are bounded before anything is allocated: image sides up to :data:`MAX_IMAGE_SIDE`, patch grids
    up to :data:`MAX_PATCHES` patches, ``budget`` up to the distinct glimpse positions (or, with
    ``allow_repeats=True`` or continuous actions, the patches of the grid).

    Model (one instance per process, shared by every env; the classes and channels come from the data):
        model: timm ViT name (used when ``checkpoint`` is not an avex checkpoint; beside one, a name other than
            the id's and the checkpoint's own is refused, as it would change nothing).
        checkpoint: avex checkpoint path (str or pathlib.Path), "shipped:fashion-mnist", a timm safetensors
            weights file holding exactly the ViT built here, or None (see :mod:`avex.checkpoint` for the rules).
        pretrained: timm hub weights when ``checkpoint`` is None (must be in the local hub cache offline; refused
            beside an avex checkpoint, which holds its own weights).
        model_kwargs: extra ``timm.create_model`` arguments (depth, embed_dim, num_heads, ...).
        device: "cpu", "cuda" or "cuda:<i>"; canvases, glimpses and the model all live there.
        dtype: "float32" or "bfloat16" (model weights and token cache; for speed on GPUs).

    Glimpses and episodes:
        patch: ViT patch side in pixels: the model is built at it (timm resamples pretrained patch weights)
            and a checkpoint must have it. None (every registered id): the model's own (a checkpoint's, or the
            timm name's: 14 for dinov2, 32 for ``*_patch32_*``), except the data set's ``patch`` for its own
            ``model`` built from scratch (no checkpoint, ``pretrained=False``), the architecture its training
            makes (Fashion-MNIST: 8). See :attr:`resolved_patch`.
        glimpse: glimpse side in patches (g; g x g patches, g*g tokens per glimpse).
        positions: "overlapping" (top-left on every patch, stride 1, as AME/TORE) or "grid" (stride g,
            non-overlapping tiles). Discrete mode only ("grid" with continuous actions is refused).
        budget: glimpses per episode; the episode terminates after the last one.
        K: TORE split (iterator = blocks[:K], aggregator = blocks[K:]), 0..depth. None: depth // 2.
        action_mode: "discrete" (index of a glimpse position) or "continuous" ((y, x, z) in [0, 1]^3,
            AdaGlimpse: position and scale).
        max_ratio: largest continuous glimpse side as a fraction of min(H, W).
        allow_repeats: what the action masks say about positions already taken this episode (discrete mode):
            False (default): masked (advice for MaskablePPO), and ``budget`` is at most the distinct positions,
            so a masked agent always has a position left; True: every position allowed, ``budget`` up to the
            grid's patches.
        strict: refuse an action the mask forbids (a repeat, with ``allow_repeats=False``) with ValueError,
            changing nothing (the only behaviour before ``strict`` existed). False (default): any action inside
            the action space is taken; a repeat re-reveals known pixels, adds its tokens to the cache again and
            is flagged in ``info["repeated"]``.
        reward: a registered reward (``envs.rewards.REWARDS``): "dense" (drop in the true class's
            cross-entropy per glimpse) or "sparse" (1 at the end if the final prediction is right).
        entropy: whether the env may run the decoder for AME's attention-entropy map (False: a model without a
            decoder is accepted and the "entropy" observation is zeros). The map is computed lazily: a step only
            marks it stale, and the decoder runs the first time something reads it (the observation's
            "entropy" key, an agent reading ``engine.entropy``).
        obs_keys: the observation's keys, a subset of :data:`OBS_KEYS` (None: all of them). A key left out is
            never computed nor transferred: without "entropy" the decoder never runs for the observation,
            without "canvas" no revealed canvas is composed. The observation space has exactly these keys.
    """

    dataset: str = "fashion-mnist"
    split: str | None = None
    root: str | None = None
    image_size: int | tuple[int, int] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_images: bool = False
    model: str = "vit_tiny_patch16_224"
    checkpoint: str | os.PathLike[str] | None = None  # kept as its str
    pretrained: bool = False
    model_kwargs: dict[str, Any] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    patch: int | None = None
    glimpse: int = 2
    positions: str = "overlapping"
    budget: int = 12
    K: int | None = None
    action_mode: str = "discrete"
    max_ratio: float = 1.0
    allow_repeats: bool = False
    strict: bool = False
    reward: str = "dense"
    entropy: bool = True
    obs_keys: tuple[str, ...] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EnvConfig:
        """Build from keyword arguments: the fields, plus the data set's own options (``clutter=4``).

        Raises:
            ValueError: an argument that is neither a field nor an option of the data set; the message
                lists the allowed ones.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
        dataset = kwargs.get("dataset", cls.dataset)
        _choice("dataset", dataset, _dataset_names(dataset))
        declared = get_dataset(dataset).options
        unknown = sorted(set(kwargs) - set(names) - set(declared))
        if unknown:
            raise ValueError(
                f"unknown environment argument(s) {unknown}; allowed: {names + sorted(declared)}"
                + _other_datasets_hint(unknown, get_dataset(dataset))
            )
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in declared and k not in names}
        return cls(**kwargs, options=options)

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, _dataset_names(self.dataset))
        _choice("reward", self.reward, REWARDS.names())
        _choice("action_mode", self.action_mode, ACTION_MODES)
        _choice("positions", self.positions, POSITIONS)
        if self.action_mode == "continuous" and self.positions != "overlapping":
            raise ValueError(
                f"positions={self.positions!r} sets the discrete mode's lattice of glimpse positions, but "
                "action_mode='continuous' places each glimpse anywhere: leave positions out, or pass "
                "action_mode='discrete'"
            )
        _choice("dtype", self.dtype, ("float32", "bfloat16"))
        if not isinstance(self.model, str):
            raise ValueError(f"model must be a timm model name (str), got {brief(self.model)}")
        for name in ("root", "checkpoint"):  # paths: a pathlib.Path is kept as its str (one shared model)
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, os.PathLike))):
                raise ValueError(f"{name} must be a path (str or pathlib.Path) or None, got {brief(value)}")
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.split is not None and not isinstance(self.split, str):
            raise ValueError(f"split must be a sub-folder / split name (str) or None, got {brief(self.split)}")
        check_int("budget", self.budget, 1)
        check_int("glimpse", self.glimpse, 1)
        if self.K is not None:
            check_int("K", self.K, 0)
        if self.image_size is not None and max(canvas_hw(self.image_size)) > MAX_IMAGE_SIDE:
            raise ValueError(
                f"image_size must be a positive int or (H, W), each side at most {MAX_IMAGE_SIDE} px "
                f"(canvases and per-patch state grow with the area), got {brief(self.image_size)}"
            )
        if self.patch is not None:
            check_int("patch", self.patch, 1, min(self.resolved_image_size), " (at most the canvas side)")
        for flag in ("pretrained", "allow_repeats", "strict", "entropy", "cache_images"):
            check_flag(flag, getattr(self, flag))
        if self.obs_keys is not None:
            object.__setattr__(self, "obs_keys", check_obs_keys(self.obs_keys))
        ratio = self.max_ratio
        if (
            isinstance(ratio, (bool, np.bool_))
            or not isinstance(ratio, (int, float, np.integer, np.floating))
            or not 0 < ratio <= 1
        ):
            raise ValueError(f"max_ratio must be a number in (0, 1], got {brief(ratio)}")
        if self.model_kwargs is not None:
            if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
                kind = type(self.model_kwargs).__name__
                raise ValueError(f"model_kwargs must be a dict of timm.create_model arguments, got {kind}")
            check_build_args(self.model_kwargs, "model_kwargs")
        patch = (self.model_kwargs or {}).get("patch_size", self.resolved_patch)
        if patch is not None and _positive_int(patch):
            h, w = self.resolved_image_size
            check_grid((h // int(patch), w // int(patch)))
        if self.spec.needs_root and self.root is None:
            raise ValueError(f"dataset={self.dataset!r} needs root= ({self.spec.description or 'its data folder'})")
        check_device("device", self.device)

    @property
    def observed(self) -> tuple[str, ...]:
        """The observation's keys (:attr:`obs_keys`, or all of :data:`OBS_KEYS`)."""
        return OBS_KEYS if self.obs_keys is None else self.obs_keys

    @property
    def observes_entropy(self) -> bool:
        """Whether every observation holds a computed entropy map (so every step runs the decoder)."""
        return self.entropy and "entropy" in self.observed

    @property
    def spec(self) -> DatasetSpec:
        """The registered data set."""
        return get_dataset(self.dataset)

    @property
    def resolved_split(self) -> str | None:
        return self.split if self.split is not None else self.spec.env_split

    @property
    def resolved_patch(self) -> int | None:
        """The patch the model is built at (or a checkpoint must have); None: the model's own.

        ``patch=`` when given. Otherwise the data set's patch only for a random model of the data set's own
        ``model`` name, the architecture its training builds (Fashion-MNIST's ViT-Tiny at 8 px, as in the
        shipped checkpoint); any other model, pretrained weights or checkpoint keeps its own patch, so a
        user-named timm model is never rebuilt at another patch and its weights never resampled silently.
        """
        if self.patch is not None:
            return int(self.patch)
        own_arch = self.model == self.spec.model and self.checkpoint is None and not self.pretrained
        # A patch_size in model_kwargs is the user's own choice: it builds the model, the data set's does not.
        return self.spec.patch if own_arch and "patch_size" not in (self.model_kwargs or {}) else None

    @property
    def resolved_image_size(self) -> tuple[int, int]:
        return canvas_hw(self.image_size if self.image_size is not None else self.spec.image_size)

    def make_source(self) -> CanvasSource:
        """The canvas source of this config, on its device."""
        return self.spec.make_source(
            split=self.resolved_split,
            root=self.root,
            image_size=self.resolved_image_size,
            device=self.device,
            cache_images=self.cache_images,
            **self.options,
        )


def _other_datasets_hint(unknown: list[str], spec: DatasetSpec) -> str:
    """Where ``unknown`` names other data sets' options (an id's registered kwargs carry its own data set's, and
    ``dataset=`` switched to another): which ones, and the id to make instead; else ""."""
    owners = sorted({n for n in DATASETS.names() for k in unknown if k in get_dataset(n).options})
    if not owners:
        return ""
    instead = f"make {spec.env_id!r} instead" if spec.env_id else "pass only its own options"
    return (
        f". {unknown} are options of data set {owners}, not of {spec.name!r} (the registered id passes them when "
        f"dataset= switches to another data set): {instead}"
    )


def _dataset_names(value: Any) -> list[str]:
    """The registered names, with ``value`` itself when it is an alias (so aliases pass _choice)."""
    names = DATASETS.names()
    return [*names, value] if isinstance(value, str) and value in DATASETS and value not in names else names


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)

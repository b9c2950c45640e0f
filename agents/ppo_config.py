"""The configuration of a PPO glimpse-policy run, which is also ``avex train ppo``'s command line.

Kept apart from :mod:`agents.ppo_train` so that the command line is built without importing
stable-baselines3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from avex.options import option

__all__ = ["PPOConfig"]

ENV = "environment"
ALGO = "PPO"
RUN = "evaluation and output"


@dataclass
class PPOConfig:
    """A PPO run; one ``avex train ppo`` flag per field (:mod:`avex.options`)."""

    env_id: str = option("AVE-FashionMNIST-v0", ENV, "environment id", flag="--env")
    action_mode: Literal["discrete", "continuous"] = option(
        "discrete", ENV, "glimpse positions (MaskablePPO) or (y, x, z) glimpses (PPO)"
    )
    K: int | None = option(None, ENV, "TORE split point of the env", flag="--K", default_text="the env's")
    env_kwargs: dict[str, Any] = option({}, ENV, "extra env kwargs as a JSON object")
    device: str = option("cpu", ENV, "where the env's model and the policy run")
    num_envs: int = option(64, ALGO, "envs stepped together")
    total_steps: int = option(200_000, ALGO, "env steps to train for")
    n_steps: int = option(48, ALGO, "rollout length per env (a multiple of the budget keeps episodes whole)")
    batch_size: int = option(1024, ALGO, "minibatch")
    n_epochs: int = option(4, ALGO, "passes over each rollout")
    learning_rate: float = option(3e-4, ALGO, "Adam learning rate", flag="--lr")
    ent_coef: float = option(0.01, ALGO, "entropy bonus")
    # The dense reward telescopes to L_0 - L_T, so the undiscounted return is exactly the final loss drop.
    gamma: float = option(1.0, ALGO, "discount")
    seed: int = option(0, ALGO, "seed of the envs and the policy")
    ink: bool = option(False, ALGO, "the policy also reads the revealed canvas pooled per patch (agents.belief.INK)")
    init: str | None = option(
        None, ALGO, "start from this policy's weights (avex .safetensors or shipped:<name>; fresh optimiser)"
    )
    eval_every: int = option(0, RUN, "env steps between greedy evaluations on the test split (0: at the end only)")
    eval_episodes: int = option(512, RUN, "episodes of each greedy evaluation")
    time_limit: float | None = option(None, RUN, "stop training after this many seconds (saved as usual)")
    out: str | None = option("runs/ppo/policy", RUN, "output stem: writes .safetensors and .json (none: no file)")

    def make_env_kwargs(self) -> dict[str, Any]:
        """The env's kwargs: ``env_kwargs`` with the action mode, K and device of this config.

        Raises:
            ValueError: ``env_kwargs`` sets one of those to another value than the config's own field.
        """
        own: dict[str, Any] = {"action_mode": self.action_mode, "device": self.device}
        if self.K is not None:
            own["K"] = self.K
        for key, value in own.items():
            if key in self.env_kwargs and self.env_kwargs[key] != value:
                raise ValueError(
                    f"env_kwargs sets {key}={self.env_kwargs[key]!r} but the config's {key} is {value!r}: "
                    f"set {key} (--{key.replace('_', '-')}) instead of putting it in env_kwargs"
                )
        return {**self.env_kwargs, **own}

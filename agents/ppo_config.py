"""The configuration of a PPO glimpse-policy run, which is also ``avex train ppo``'s command line.

Kept apart from :mod:`agents.ppo_train` so that the command line is built without importing
stable-baselines3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from avex.checks import brief, check_device, check_int, check_real, check_writable
from avex.options import option
from envs.registration import check_env_id, check_env_kwargs

__all__ = ["PPOConfig"]

ENV = "environment"
ALGO = "PPO"
RUN = "evaluation and output"

# SB3 seeds numpy's global generator (np.random.seed), which takes 0..2**32 - 1 only.
_SEED_MAX = 2**32 - 1
# env_kwargs the trainer sets itself: refused before training rather than after it.
_OWN_ENV_KWARGS = {"num_envs": "set --num-envs instead"}


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
    eval_every: int = option(
        0, RUN, "env steps between greedy evaluations on the evaluation split (0: at the end only)"
    )
    eval_episodes: int = option(512, RUN, "episodes of each greedy evaluation")
    time_limit: float | None = option(None, RUN, "stop training after this many seconds (saved as usual)")
    out: str | None = option("runs/ppo/policy", RUN, "output stem: writes .safetensors and .json (none: no file)")

    def check(self) -> None:
        """Refuse a value out of range before anything is built or written (:func:`agents.ppo_train.train_ppo`
        starts with this): SB3 and torch would refuse many of them only deep inside, some after training (the
        evaluation's count, the output path), and take others silently (a negative discount, a minibatch larger
        than the rollout).

        Raises:
            ValueError, FileNotFoundError: naming the flag as typed, what it allows and the value.
        """
        check_env_id(self.env_id, "--env")
        if self.action_mode not in ("discrete", "continuous"):
            raise ValueError(f"--action-mode must be 'discrete' or 'continuous', got {brief(self.action_mode)}")
        if self.K is not None:  # the upper bound, the model's depth, is the env's to check
            check_int("--K", self.K, 0)
        self._check_env_kwargs()
        check_device("--device", self.device)
        # counts
        check_int("--num-envs", self.num_envs, 1)
        check_int("--total-steps", self.total_steps, 1)
        check_int("--n-steps", self.n_steps, 1, why=" (rollout length per env)")
        # PPO normalises the advantages over each minibatch: one sample gives NaN (SB3's PPO asserts it, MaskablePPO
        # does not).
        check_int("--batch-size", self.batch_size, 2, why=" (advantages are normalised over each minibatch)")
        check_int("--n-epochs", self.n_epochs, 1)
        check_int("--eval-every", self.eval_every, 0, why=" (0: at the end only)")
        check_int("--eval-episodes", self.eval_episodes, 1)
        check_int("--seed", self.seed, 0, _SEED_MAX)
        rollout = self.n_steps * self.num_envs
        if self.batch_size > rollout:  # SB3 would quietly train on the whole rollout as one smaller minibatch
            raise ValueError(
                f"--batch-size {self.batch_size} is more than a rollout holds (--n-steps {self.n_steps} x "
                f"--num-envs {self.num_envs} = {rollout}): use --batch-size <= {rollout}, or raise --n-steps or "
                "--num-envs"
            )
        # rates
        check_real("--lr", self.learning_rate, 0, why=" (0: the weights stay as they start)")
        check_real("--ent-coef", self.ent_coef, 0, why=" (0: no entropy bonus)")
        check_real("--gamma", self.gamma, 0, 1, why=" (a discount)")
        if self.time_limit is not None:
            check_real("--time-limit", self.time_limit, 0, lo_open=True, why=" seconds (leave it out: no limit)")
        if not isinstance(self.ink, bool):
            raise ValueError(f"--ink must be True or False, got {brief(self.ink)}")
        self._check_init()
        self._check_out()

    def _check_env_kwargs(self) -> None:
        """``env_kwargs``: a dict of names, without the kwargs the trainer sets itself (the env checks the rest)."""
        check_env_kwargs(self.env_kwargs, _OWN_ENV_KWARGS)
        from agents.evaluate import check_whole_episodes  # here: building the command line imports no env code

        check_whole_episodes(self.env_kwargs, "PPO training (--env-kwargs)")
        self.make_env_kwargs()  # a kwarg that contradicts --action-mode, --K or --device

    def _check_init(self) -> None:
        """``init``: a policy file that exists, trained with the ink map exactly when this run has it."""
        if self.init is None:
            return
        from agents.ppo import policy_file
        from avex.safeload import read_json

        file = policy_file(self.init, "--init")
        if file.suffix == ".zip":  # its architecture, ink map included, is checked when it is loaded
            return
        try:
            meta = read_json(file.with_suffix(".json"), "PPO policy config")
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"--init {self.init!r}: {err}") from err
        ink = meta.get("ink", False)
        if isinstance(ink, bool) and ink != self.ink:  # the env would otherwise be refused for a missing key
            fix = "add --ink" if ink else "leave --ink out"
            raise ValueError(
                f"--init {self.init!r} was trained {'with' if ink else 'without'} the ink map (--ink): {fix}"
            )

    def _check_out(self) -> None:
        """``out``: a stem whose folder can be made (no file on its path), checked before training, not after."""
        if self.out is None:
            return
        if not isinstance(self.out, str) or not Path(self.out).name:
            raise ValueError(
                f"--out must be a file stem such as 'runs/ppo/policy' (none: no file), got {brief(self.out)}"
            )
        weights = Path(self.out).with_suffix(".safetensors")
        for path in (weights, weights.with_suffix(".json")):
            check_writable("--out", path)

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

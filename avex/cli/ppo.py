"""``avex train ppo``: a glimpse policy trained on the batched vector env (MaskablePPO, or PPO for
continuous (y, x, z) glimpses), with progress, periodic greedy evaluation on the test split and a
safetensors + JSON policy at the end."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "main_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="AVE-FashionMNIST-v0")
    p.add_argument("--action-mode", choices=["discrete", "continuous"], default="discrete")
    p.add_argument("--K", type=int, default=None, help="TORE split point of the env (default: the env's)")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--total-steps", type=int, default=200_000)
    p.add_argument(
        "--n-steps", type=int, default=48, help="rollout length per env (a multiple of the budget keeps episodes whole)"
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--n-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ent-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--eval-every", type=int, default=0, help="env steps between greedy evaluations (0: only at the end)"
    )
    p.add_argument("--eval-episodes", type=int, default=512)
    p.add_argument("--env-kwargs", default="{}", help="extra env kwargs as JSON")
    p.add_argument(
        "--time-limit", type=float, default=None, help="stop training after this many seconds (saved as usual)"
    )
    p.add_argument("--out", default="runs/ppo/policy", help="output stem: writes .safetensors and .json")


def main_from_args(args: argparse.Namespace) -> int:
    import avex  # noqa: F401  (registers the envs)
    from agents.ppo_train import train_ppo

    env_kwargs = json.loads(args.env_kwargs)
    env_kwargs["action_mode"] = args.action_mode
    if args.K is not None:
        env_kwargs["K"] = args.K
    _, summary = train_ppo(
        args.env,
        num_envs=args.num_envs,
        total_steps=args.total_steps,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        learning_rate=args.lr,
        ent_coef=args.ent_coef,
        seed=args.seed,
        device=args.device,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        out=args.out,
        env_kwargs=env_kwargs,
        time_limit=args.time_limit,
    )
    print(
        f"final greedy accuracy on the test split ({summary['eval_episodes']} episodes): "
        f"{summary['final_test_accuracy']:.4f}; "
        f"trained in {summary['train_seconds']} s; policy written to {args.out}.safetensors"
    )
    return 0

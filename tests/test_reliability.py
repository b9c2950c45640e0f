"""Nothing silently wrong: one test (or a few) per finding of the reliability audit, numbered as in it.

1 a checkpoint without its JSON; 2 a refused vector reset; 3 memory and time bombs; 4 symlink loops;
5 pickling; 6 determinism with bad files; 7 exception types; 8 silent coercions; 9 the weights-loading rule.
Plus both env checkers on a folder with bad files, and memory under many episodes. CPU only, tiny models.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_kit import (
    FM,
    TINY,
    assert_same_state,
    fm_env,
    fm_vector,
    folder_env,
    image_folder,
    snapshot,
    tiny_checkpoint,
)
from safetensors.torch import load_file, save_file

from avex.checkpoint import load_tore, save_tore, shipped_file
from avex.data.folder import ImageFolderCanvas, _load_image
from envs import AVEEnv

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(fake_fmnist_root: Path) -> Path:
    return fake_fmnist_root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst.with_suffix(".safetensors"))
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst.with_suffix(".safetensors")


# ------------------------------------------------ 1: a checkpoint without its JSON
def test_checkpoint_without_its_json_is_refused_not_made_random(root, tmp_path):
    lonely = tmp_path / "fashion_mnist_tore.safetensors"
    shutil.copy(shipped_file("fashion_mnist_tore"), lonely)
    with pytest.raises(ValueError, match=r"avex checkpoint's tensors but its config fashion_mnist_tore\.json"):
        fm_env(root, checkpoint=str(lonely), model_kwargs=None)


def test_timm_weights_must_fit_exactly(root, tmp_path):
    """A timm file for another ViT (here one block, the env builds two) is refused, listing what differs."""
    import timm  # after avex (its import shim)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=112, patch_size=8, in_chans=1, num_classes=10, depth=1)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"does not fit.*missing \['blocks\.1\..*unexpected"):
        fm_env(root, checkpoint=str(path), model_kwargs=dict(depth=2))


# ------------------------------------------------ 2: a refused vector reset changes nothing
def test_refused_vector_reset_changes_nothing(root):
    v, twin = fm_vector(root, 4, budget=2), fm_vector(root, 4, budget=2)
    for env in (v, twin):
        env.reset(seed=10)
        env.step(np.array([0, 1, 2, 3]))
    before = snapshot(v.engine, v.env_rngs)
    with pytest.raises(ValueError, match=r"seed\[2\] must be an integer >= 0, got -1"):
        v.reset(seed=[0, 1, -1, 3])
    assert_same_state(before, snapshot(v.engine, v.env_rngs))
    # The twin's autoreset draws the same next episodes (envs 0 and 1 were not reseeded).
    for actions in ([5, 6, 7, 8], [20, 21, 22, 23], [30, 31, 32, 33]):
        o1, *_ = v.step(np.array(actions))
        o2, *_ = twin.step(np.array(actions))
        for key in o1:
            np.testing.assert_array_equal(o1[key], o2[key], err_msg=key)


def test_numpy_integer_seeds(root):
    v = fm_vector(root, 2)
    o1, _ = v.reset(seed=np.int64(4))
    o2, _ = v.reset(seed=4)
    np.testing.assert_array_equal(o1["canvas"], o2["canvas"])
    o3, _ = v.reset(seed=[np.int64(4), np.uint8(5)])
    np.testing.assert_array_equal(o1["canvas"], o3["canvas"])


# ------------------------------------------------ 3: memory and time bombs
def test_extreme_aspect_ratio_image_stays_small(tmp_path, monkeypatch):
    """A 141-byte 1 x 20000 PNG: no resize larger than the canvas (it was a 4,480,000 x 224 intermediate)."""
    path = tmp_path / "wide.png"
    Image.new("L", (1, 20000), 200).save(path)
    original = Image.Image.resize

    def bounded(self: Image.Image, size: tuple[int, int], *args, **kwargs) -> Image.Image:
        assert size[0] * size[1] <= 224 * 224, f"resize to {size}"
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    t0 = time.perf_counter()
    canvas = _load_image(path, (224, 224), "RGB")
    assert canvas.shape == (224, 224, 3) and (canvas == 200).all()
    assert time.perf_counter() - t0 < 5


def test_too_many_pixels_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # over twice that, PIL itself refuses to open it
    with pytest.raises(ValueError, match=r"300x300 pixels, over PIL\.Image\.MAX_IMAGE_PIXELS=50000"):
        _load_image(path, (32, 32), "RGB")


def test_checkpoint_depth_bomb_is_refused_before_allocating(checkpoint, tmp_path):
    path = _copy_checkpoint(checkpoint, tmp_path / "bomb")
    cfg = json.loads(path.with_suffix(".json").read_text())
    cfg["build"]["depth"] = 1_000_000
    path.with_suffix(".json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"depth=1000000 must be an integer in 1\.\.1024"):
        load_tore(path)
    cfg["build"]["depth"] = 3
    path.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"depth=3 but the weights hold 2 blocks"):
        load_tore(path)
    cfg["build"]["depth"], cfg["build"]["embed_dim"] = 2, 10**7  # sizes: compared on the meta device
    path.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match its config.*shape mismatches"):
        load_tore(path)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=197, allow_repeats=True), r"budget=197 exceeds the 196 patches of the 14x14 grid"),
        (dict(budget=10**8, action_mode="continuous"), r"budget=100000000 exceeds the 196 patches"),
        (dict(budget=170), r"budget=170 exceeds the 169 distinct glimpse positions"),
        (dict(clutter=50), r"n_clutter \(the env's clutter\) must be an integer in 0\.\.49"),
        (dict(clutter=10**5), r"must be an integer in 0\.\.49 \(the 16 px fragments that tile a 112 px canvas\)"),
        (dict(image_size=10**5), r"image_size must be .* at most 2048 px"),
        (dict(patch=1, image_size=2048), r"a 2048x2048 patch grid \(4194304 patches\) exceeds the 16384"),
    ],
)
def test_sizes_are_bounded_before_allocating(root, kwargs, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        fm_env(root, **kwargs)
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------ 4: symlink loops
def test_folder_links_are_listed_once(tmp_path):
    image_folder(tmp_path, per_class=1)
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    with pytest.warns(RuntimeWarning, match=r"skipped 1 link\(s\) to folders already listed"):
        src = ImageFolderCanvas(tmp_path, 32)
    assert [f.name for f in src.files] == ["0.jpg", "0.jpg"] and src.targets.tolist() == [0, 1]
    (tmp_path / "a" / "loop2").symlink_to(tmp_path / "a")  # two self-links: an endless walk before
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"skipped 2 link"):
        assert len(ImageFolderCanvas(tmp_path, 32)) == 2
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------ 5: pickling
_UNPICKLE_AND_STEP = """
import pickle, sys
import numpy as np
import envs
env = pickle.loads(open(sys.argv[1], "rb").read())
obs, reward, *_ = env.step(7)
np.save(sys.argv[2], np.concatenate([obs["probs"], obs["entropy"].ravel(), [reward]]))
"""


def test_pickled_env_predicts_the_same_in_another_process(root, tmp_path):
    torch.manual_seed(1234)  # another random state than a fresh process: the model must not depend on it
    env = fm_env(root, model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))
    env.reset(seed=3)
    env.step(40)
    (tmp_path / "env.pkl").write_bytes(pickle.dumps(env))
    run = subprocess.run(
        [sys.executable, "-c", _UNPICKLE_AND_STEP, str(tmp_path / "env.pkl"), str(tmp_path / "out.npy")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    obs, reward, *_ = env.step(7)
    here = np.concatenate([obs["probs"], obs["entropy"].ravel(), [reward]])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), here, rtol=0, atol=1e-5)


def test_a_model_changed_in_place_is_not_pickled(root):
    env = fm_env(root, model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
    pickle.loads(pickle.dumps(env))
    with torch.no_grad():
        env.model.vit.head.bias.add_(1.0)
    try:
        with pytest.raises(ValueError, match="changed after it was built.*save_tore"):
            pickle.dumps(env)
    finally:
        with torch.no_grad():
            env.model.vit.head.bias.sub_(1.0)


# ------------------------------------------------ 6: determinism with unreadable files
@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    """One good and two unreadable images per class."""
    image_folder(tmp_path, per_class=1)
    for name in ("a", "b"):
        (tmp_path / name / "x.jpg").write_bytes(b"not a JPEG")
        (tmp_path / name / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path


def test_skipped_images_are_counted_per_episode(bad_folder):
    env = folder_env(bad_folder)
    bad = [i for i, f in enumerate(env.engine.source.files) if f.suffix != ".jpg" or f.stem == "x"]
    with pytest.warns(RuntimeWarning):
        first = [env.reset(seed=0, options={"index": bad[0]})[1] for _ in range(3)]
    assert first[0]["skipped_images"] >= 1 and env.engine.source.skipped >= 3  # the source keeps the total
    for info in first[1:]:
        assert info.keys() == first[0].keys()
        for key in info:
            np.testing.assert_array_equal(info[key], first[0][key], err_msg=key)


def test_both_env_checkers_pass_on_a_folder_with_bad_files(bad_folder):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for name in ("a", "b"):  # mostly bad files, the good ones last: the checkers' seeds pass over bad ones
        (bad_folder / name / "0.jpg").rename(bad_folder / name / "~good.jpg")
        for i in range(8):
            (bad_folder / name / f"z{i}.jpg").write_bytes(b"")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # SB3's checker takes unmasked random actions: repeats allowed, so determinism is what it tests.
        env = folder_env(bad_folder, image_size=64, budget=12, allow_repeats=True)
        check_env(env, skip_render_check=True)
        env.action_space.seed(7)
        sb3_check_env(env)
    assert env.engine.source.skipped > 0  # the bad files were drawn


# ------------------------------------------------ 7: exception types
def test_checkpoint_as_path_and_bad_checkpoint_types(root, checkpoint, tmp_path):
    by_path = fm_env(root, checkpoint=checkpoint, model_kwargs=None)
    assert by_path.model is fm_env(root, checkpoint=str(checkpoint), model_kwargs=None).model
    # The model holds the file's weights (not a fresh random init of the same architecture).
    saved, own = load_file(str(checkpoint)), by_path.model.state_dict()
    assert saved.keys() == own.keys()
    assert all(torch.equal(own[k].cpu(), v) for k, v in saved.items())
    # load_tore returns the saved meta and refuses a build argument other than the one asked for.
    again = save_tore(load_tore(checkpoint), tmp_path / "again", meta={"epoch": 7})
    assert load_tore(again, expect={"in_chans": 1, "img_size": 112}).meta == {"epoch": 7}
    with pytest.raises(ValueError, match=r"another architecture: in_chans=1, expected 3"):
        load_tore(again, expect={"in_chans": 3})
    for bad in (3, True, ["a.safetensors"]):
        with pytest.raises(ValueError, match=r"checkpoint must be a path \(str or pathlib\.Path\) or None"):
            fm_env(root, checkpoint=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=[112]), r"image_size must be a positive int or \(H, W\)"),
        (dict(image_size="112"), r"image_size must be a positive int or \(H, W\)"),
        (dict(device="meta"), r"device must be 'cpu', 'cuda' or 'cuda:<index>', got 'meta'"),
        (dict(device="xpu"), r"device must be .*got 'xpu'"),
        (dict(device=0), r"device must be .*got 0"),
        (dict(model=3), r"model must be a timm model name"),
        (dict(dataset=["fashion-mnist"]), r"dataset must be one of"),
        (dict(root=5), r"root must be a path"),
    ],
)
def test_bad_arguments_raise_value_error(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AVEEnv(**{**FM, "root": str(root), **kwargs})


@pytest.mark.parametrize(
    "config, match",
    [
        ("[]", r"must hold a JSON object, got list"),
        ("null", r"must hold a JSON object, got NoneType"),
        ('{"format": "avex-tore/1"}', r"'build' must be an object of create_tore arguments"),
        ('{"format": "avex-tore/1", "build": {"depth": 2}}', r"naming the timm model in 'model'"),
        ("{", r"is not valid JSON"),
        ("[" * 100_000, r"is not valid JSON"),
    ],
)
def test_bad_checkpoint_configs_raise_value_error(root, checkpoint, tmp_path, config, match):
    path = _copy_checkpoint(checkpoint, tmp_path / "c")
    path.with_suffix(".json").write_text(config)
    with pytest.raises(ValueError, match=match):
        fm_env(root, checkpoint=str(path), model_kwargs=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device="gpu"), r"device must be 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"),
        (dict(device=torch.device("meta")), r"device must be .*got 'meta'"),
        (dict(expect=[1]), r"expect must be a dict of build arguments .* or None, got \[1\]"),
    ],
)
def test_checkpoint_loaders_check_device_and_expect_before_reading(tmp_path, kwargs, match):
    from avex.checkpoint import shared_model

    nowhere = tmp_path / "nowhere.safetensors"  # refused before any file is looked at: not a FileNotFoundError
    with pytest.raises(ValueError, match=match):
        load_tore(nowhere, **kwargs)
    with pytest.raises(ValueError, match=match):
        shared_model(checkpoint=nowhere, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_checkpoint_on_cuda_without_cuda_is_a_clear_value_error(checkpoint):
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available here: use device='cpu'"):
        load_tore(checkpoint, device="cuda")


@pytest.mark.parametrize(
    "key, values, message",
    [
        ("mean", [0.1, 0.9, 0.5], "build 'mean' must be 1 finite number(s), one per channel (in_chans=1)"),
        ("std", [0.25, 0.5], "build 'std' must be 1 finite number(s), one per channel (in_chans=1), each > 0"),
        ("std", [0.0], "build 'std' must be 1 finite number(s), one per channel (in_chans=1), each > 0"),
        ("mean", [10**400], "build 'mean' must be 1 finite number(s)"),  # was accepted: no float holds it
        ("mean", "0.1", "build 'mean' must be 1 finite number(s)"),
    ],
)
def test_checkpoint_normalisation_must_have_one_value_per_channel(checkpoint, tmp_path, key, values, message):
    """Checked as training and avex convert check it (avex.checks.check_pixel_norm): one message form."""
    assert load_tore(checkpoint, device=torch.device("cpu")).in_chans == 1  # a torch.device is a device too
    path = _copy_checkpoint(checkpoint, tmp_path / "c")
    cfg = json.loads(path.with_suffix(".json").read_text())
    cfg["build"][key] = values  # a wrong count used to be averaged into one value, silently
    path.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as refused:
        load_tore(path)
    assert str(refused.value).startswith(f"{path.with_suffix('.json')}: {message}"), str(refused.value)
    assert "re-save the checkpoint with save_tore" in str(refused.value)


def test_missing_and_foreign_checkpoint_files(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.safetensors"):
        fm_env(root, checkpoint=str(tmp_path / "nope.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is not a safetensors file"):
        fm_env(root, checkpoint=str(tmp_path / "notes.txt"))


def test_a_folder_given_as_a_checkpoint_or_policy_is_named(checkpoint, root, tmp_path):
    # It was reported as "<folder>.safetensors not found", a file nobody passed.
    from agents.ppo import PPOAgent

    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"checkpoint '.*runs' is a folder: pass the \.safetensors file itself"):
        load_tore(folder)
    with pytest.raises(ValueError, match=r"PPO policy '.*runs' is a folder: pass the \.safetensors file itself"):
        PPOAgent.load(folder, fm_env(root))
    _copy_checkpoint(checkpoint, tmp_path / "runs.safetensors")  # a stem that is also a folder's name still loads
    load_tore(folder)


def test_ppo_load_refuses_a_file_that_is_not_safetensors(root, tmp_path):
    from agents.ppo import PPOAgent

    env = fm_env(root)
    policy = tmp_path / "policy.safetensors"
    policy.write_bytes(b"\x00" * 64)
    policy.with_suffix(".json").write_text(json.dumps({"format": "avex-ppo/1", "continuous": False}))
    with pytest.raises(ValueError, match="is not a safetensors file"):
        PPOAgent.load(policy, env)
    shutil.copy(shipped_file("fashion_mnist_ppo"), policy)
    policy.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        PPOAgent.load(policy, env)
    policy.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="PPO policy config not found"):
        PPOAgent.load(policy, env)


# ------------------------------------------------ 8: silent coercions and data loss
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cache_images="no"), r"cache_images must be True or False, got 'no'"),
        (dict(entropy=1), r"entropy must be True or False, got 1"),
        (dict(max_ratio=True), r"max_ratio must be a number in \(0, 1\], got True"),
        (dict(max_ratio=float("nan")), r"max_ratio must be a number in \(0, 1\], got nan"),
    ],
)
def test_no_truthy_coercion(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fm_env(root, **kwargs)


def test_torch_obs_must_be_a_bool(root):
    with pytest.raises(ValueError, match=r"torch_obs must be True or False, got 'no'"):
        fm_vector(root, 2, torch_obs="no")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.to(torch.int32), r"wrong type \(floating point expected\)"),
        (lambda t: t > 0, r"wrong type \(floating point expected\)"),
        (lambda t: t.clone().fill_(float("nan")), r"NaN or infinite weights in \['vit\.head\.bias'\]"),
        (lambda t: t.clone().fill_(float("inf")), r"NaN or infinite weights"),
    ],
)
def test_weights_of_the_wrong_kind_are_refused(checkpoint, tmp_path, change, match):
    path = _copy_checkpoint(checkpoint, tmp_path / "w")
    state = load_file(str(path))
    state["vit.head.bias"] = change(state["vit.head.bias"])
    save_file(state, str(path))
    with pytest.raises(ValueError, match=match):
        load_tore(path)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    canvas = _load_image(path, (8, 8), "L")
    assert (canvas == 128).all()  # 32768 / 65535 of white: mid grey (it came out 255)


def test_an_unreadable_class_folder_is_an_error(tmp_path, monkeypatch):
    image_folder(tmp_path)
    real_scandir = os.scandir

    def scandir(path=".", *args):  # running as root, chmod 000 would not stop a read
        if Path(path) == tmp_path / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ValueError, match=r"cannot read .*/b \(Permission denied\): fix its permissions"):
        ImageFolderCanvas(tmp_path, 32)


def test_a_fifo_checkpoint_is_refused_without_blocking(root, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe\.safetensors is not a regular file"):
        fm_env(root, checkpoint=str(fifo))
    fifo.with_suffix(".json").write_text("{}")  # as an avex checkpoint: the weights are checked first
    with pytest.raises(ValueError, match="not a regular file"):
        fm_env(root, checkpoint=str(fifo), model_kwargs=None)


def test_refusals_do_not_echo_whole_batches(root):
    env = fm_env(root)
    env.reset(seed=0)
    for bad in (list(range(100_000)), [[0.5] * 3] * 50_000, "x" * 100_000):
        with pytest.raises(ValueError) as info:
            env.step(bad)
        assert len(str(info.value)) < 1000
    v = fm_vector(root, 3)
    v.reset(seed=0)
    with pytest.raises(ValueError) as info:
        v.reset(seed=list(range(100_000)))
    assert len(str(info.value)) < 1000


# ------------------------------------------------ 9: weights are never unpickled
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_refused_unopened(root, tmp_path):
    marker = tmp_path / "payload-ran"
    for name in ("weights.pth", "weights.bin", "weights.safetensors"):
        path = tmp_path / name
        torch.save({"pos_embed": _Payload(marker)}, path)
        with pytest.raises(ValueError, match=r"is not a safetensors file.*never unpickles"):
            fm_env(root, checkpoint=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("key", ["weights", "checkpoint_path", "pretrained_cfg_overlay", "pretrained"])
def test_loading_arguments_are_refused(root, checkpoint, tmp_path, key):
    path = _copy_checkpoint(checkpoint, tmp_path / "c")
    cfg = json.loads(path.with_suffix(".json").read_text())
    cfg["build"][key] = str(tmp_path / "evil.pth")
    path.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"may not hold \['{key}'\]"):
        load_tore(path)
    with pytest.raises(ValueError, match=rf"model_kwargs may not hold \['{key}'\]"):
        fm_env(root, model_kwargs={**TINY["model_kwargs"], key: "evil.pth"})


# ------------------------------------------------ memory under many episodes
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_memory_is_flat_over_many_episodes(root, bad_folder):
    t0 = time.perf_counter()
    v = fm_vector(root, 8, budget=3, entropy=False)  # the decoder is the slow part on a CPU, and not at issue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = folder_env(bad_folder, budget=2, entropy=False)
    rng = np.random.default_rng(0)

    def run(steps: int) -> None:
        v.reset(seed=0)
        for _ in range(steps):
            v.step(np.stack([rng.choice(np.flatnonzero(m)) for m in v.action_masks()]))
            f.reset()
            f.step(int(rng.choice(np.flatnonzero(f.action_masks()))))

    run(20)  # warm-up: allocator pools, caches
    before = _rss_bytes()
    run(200)  # 1,600 vector env-steps with ~530 autoresets, 200 folder episodes over unreadable files
    assert _rss_bytes() - before < 30 * 2**20
    assert time.perf_counter() - t0 < 30

"""GAN training loop: snapshots, resume, kill-and-resume, generation, torchrun, and that it learns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.generate import generate_images, load_generator
from ctsynth.gan.presets import make_config
from ctsynth.gan.train import GANTrainer, TrainOptions, TrainingData, load_training_data, train_gan_models

CLASSES = ["normal", "squamous"]
REPO = Path(__file__).resolve().parents[1]


def write_two_class_set(root: Path, per_class: int = 24, size: int = 32, seed: int = 0) -> Path:
    """normal: a bright disc; squamous: a bright horizontal bar. Easy to tell apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for name in CLASSES:
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.full((size, size), 20, np.uint8)
            cx, cy = rng.integers(size // 3, 2 * size // 3, 2)
            if name == "normal":
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] = 230
            else:
                img[np.abs(yy - cy) < size // 10] = 230
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def tiny_config(**overrides):
    values = dict(kimg=0.064, snap=0.032, c_dim=2, seed=3) | overrides
    return make_config("tiny", 32, **values)


def options(out_dir: Path, **kw) -> TrainOptions:
    return TrainOptions(out_dir=out_dir, classes=CLASSES, mlflow=False, progress=False, **kw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, TrainingData]:
    root = write_two_class_set(tmp_path_factory.mktemp("prepared"))
    return root, load_training_data(root, CLASSES, 32)


def test_training_data_is_read_through_shared_preprocessing(tiny_data):
    _, data = tiny_data
    assert data.images.shape == (48, 1, 32, 32)
    assert data.images.dtype == torch.float32
    assert -1.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    assert data.labels.tolist() == [0] * 24 + [1] * 24


def test_missing_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "normal").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="prepare stage"):
        load_training_data(tmp_path, CLASSES, 32)


def test_snapshot_holds_everything_and_loads_weights_only(tiny_data, tmp_path):
    _, data = tiny_data
    trainer = GANTrainer(tiny_config(), data, options(tmp_path))
    for _ in range(3):
        trainer._train_step()
    path = trainer.snapshot()
    state = torch.load(path, weights_only=True)  # no pickled code: must not raise
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "augment_p", "ada", "cur_nimg", "rng_torch", "rng_data", "config"):
        assert key in state, key
    assert state["cur_nimg"] == 3 * trainer.cfg.batch
    assert (tmp_path / "grids" / f"grid-{trainer.cur_nimg:09d}.png").exists()


def test_resume_continues_exactly_where_it_stopped(tiny_data, tmp_path):
    """Half the steps, snapshot, a new trainer resumes: same weights, counter and p as one run."""
    _, data = tiny_data
    cfg = tiny_config(ada_kimg=0.05, ada_interval=2, ada_target=-1.0)  # r_t > target always: p rises
    straight = GANTrainer(cfg, data, options(tmp_path / "a"))
    for _ in range(8):
        straight._train_step()

    first = GANTrainer(cfg, data, options(tmp_path / "b"))
    for _ in range(4):
        first._train_step()
    snapshot = first.snapshot()
    resumed = GANTrainer(cfg, data, options(tmp_path / "b"))
    resumed.load_state_dict(ckpt.load_checkpoint(snapshot))
    assert resumed.cur_nimg == first.cur_nimg and resumed.batch_idx == 4
    assert float(resumed.augment_pipe.p) == float(first.augment_pipe.p) > 0
    for _ in range(4):
        resumed._train_step()

    assert resumed.cur_nimg == straight.cur_nimg
    assert float(resumed.augment_pipe.p) == pytest.approx(float(straight.augment_pipe.p))
    for (name, a), b in zip(straight.G_ema.state_dict().items(), resumed.G_ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_different_architecture_is_refused(tiny_data, tmp_path):
    _, data = tiny_data
    trainer = GANTrainer(tiny_config(), data, options(tmp_path))
    trainer._train_step()
    state = ckpt.load_checkpoint(trainer.snapshot())
    other = GANTrainer(tiny_config(channel_max=32), data, options(tmp_path))
    with pytest.raises(ValueError, match="channel_max"):
        other.load_state_dict(state)


def test_per_class_mode_trains_one_model_per_class(tiny_data, tmp_path):
    _, data = tiny_data
    finals = train_gan_models(tiny_config(kimg=0.008, snap=0.008), data, options(tmp_path), per_class=True)
    assert finals == [tmp_path / "normal" / "network-final.pt", tmp_path / "squamous" / "network-final.pt"]
    loaded = load_generator(finals[1])
    assert loaded.cfg.c_dim == 0 and loaded.classes == ["squamous"]


def test_generate_is_deterministic_and_writes_a_manifest(tiny_data, tmp_path):
    _, data = tiny_data
    train_gan_models(tiny_config(kimg=0.008, snap=0.008), data, options(tmp_path / "gan"), per_class=False)
    a = generate_images(tmp_path / "gan", tmp_path / "a", CLASSES, per_class=5, seed=7, progress=False)
    b = generate_images(tmp_path / "gan", tmp_path / "b", CLASSES, per_class=5, seed=7, progress=False)
    c = generate_images(tmp_path / "gan", tmp_path / "c", CLASSES, per_class=5, seed=8, progress=False, out_resolution=48)
    assert len(a) == 10 and a["label"].value_counts().to_dict() == {"normal": 5, "squamous": 5}
    assert (tmp_path / "a" / "manifest.csv").exists()
    for rel in a["path"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / a["path"][0]).read_bytes() != (tmp_path / "c" / c["path"][0]).read_bytes()
    assert Image.open(tmp_path / "c" / c["path"][0]).size == (48, 48)


def _cli(*args: str, env: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "ctsynth.cli", *args]


def test_sigkill_at_any_moment_then_rerun_resumes(tiny_data, tmp_path):
    """Kill -9 during training, rerun the same command: it resumes from the last snapshot,
    every snapshot on disk loads, and the run finishes."""
    data_root, _ = tiny_data
    out = tmp_path / "gan"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = _cli("--params", str(REPO / "params.yaml"), "train-gan", "--data", str(data_root), "--out", str(out),
               "--preset", "tiny", "--resolution", "32", "--kimg", "0.2", "--snap", "0.02", "--conditional", env=env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(ckpt.list_snapshots(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [int(ckpt.SNAPSHOT_PATTERN.match(p.name).group(1)) for p in ckpt.list_snapshots(out)]
    for path in ckpt.list_snapshots(out):
        ckpt.load_checkpoint(path)  # never a corrupt snapshot
    assert not (out / ckpt.FINAL_NETWORK).exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / ckpt.snapshot_name(max(killed_at))}" in rerun.stderr
    final = torch.load(out / ckpt.FINAL_NETWORK, weights_only=True)
    assert final["cur_nimg"] >= 200
    assert not list(out.glob(".*.tmp"))
    log = pd.read_csv(out / "training_log.csv")
    assert log["kimg"].iloc[-1] == pytest.approx(final["cur_nimg"] / 1000)


def test_torchrun_two_ranks_on_cpu(tiny_data, tmp_path):
    data_root, _ = tiny_data
    out = tmp_path / "gan"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ctsynth.cli", "--params",
           str(REPO / "params.yaml"), "train-gan", "--data", str(data_root), "--out", str(out), "--preset", "tiny",
           "--resolution", "32", "--kimg", "0.016", "--snap", "0.016", "--conditional", "--no-mlflow", "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr
    final = torch.load(out / ckpt.FINAL_NETWORK, weights_only=True)
    assert final["cur_nimg"] == 16
    assert len(ckpt.list_snapshots(out)) == 1  # rank 0 alone writes


@pytest.mark.slow
def test_tiny_gan_learns_a_two_class_distribution(tmp_path):
    """After a short conditional training, a classifier fitted on the REAL images recognises the
    class of most synthetic images: the generator has learned what each class looks like."""
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(2)
    root = write_two_class_set(tmp_path / "prepared", per_class=64)
    data = load_training_data(root, CLASSES, 32)
    # 2.4 kimg: measured over seeds 0/1/2 at 2.0 kimg the accuracy was 0.93/0.81/1.00, at 2.4 kimg
    # 0.93/0.86 (seeds 0/1); at 1.2 kimg it depended on float rounding (0.68 once the CPU
    # bias_act switched from our kernel to PyTorch's ops, same maths).
    cfg = make_config("tiny", 32, kimg=2.4, snap=2.4, c_dim=2, seed=0, batch=8, mbstd=4)
    train_gan_models(cfg, data, options(tmp_path / "gan"), per_class=False)
    manifest = generate_images(tmp_path / "gan", tmp_path / "syn", CLASSES, per_class=40, seed=1, progress=False)

    real = data.images.flatten(1).numpy()
    classifier = LogisticRegression(max_iter=2000).fit(real, data.labels.numpy())
    synthetic = np.stack([
        np.asarray(Image.open(tmp_path / "syn" / p), dtype=np.float32) / 127.5 - 1 for p in manifest["path"]
    ]).reshape(len(manifest), -1)
    accuracy = (classifier.predict(synthetic) == manifest["label_id"].to_numpy()).mean()
    assert accuracy >= 0.8, f"only {accuracy:.2f} of synthetic images look like their class"

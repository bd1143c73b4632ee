"""Models, training steps, checkpoints, resume and torchrun: tiny configs, fixed seeds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trident.training import checkpoint as ckpt
from trident.training.data import DEFAULT_DATA_DIR, load_fashion_mnist, write_idx
from trident.training.models import (Classifier, ClassifierConfig, Discriminator, GANConfig, Generator, UNet,
                                     UNetConfig, VAE, VAEConfig, build_model)
from trident.training.train import TrainConfig, main as train_main, train, vae_loss

TINY_UNET = {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "num_heads": 2, "groups": 4}
TINY = {"diffusion": TINY_UNET, "gan": {"gen_channels": 8, "disc_channels": 8, "latent_dim": 8},
        "vae": {"channels": 8, "hidden": 32, "latent_dim": 4}, "classifier": {"channels": 8}}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """256 train / 64 test images as IDX files: the real Fashion-MNIST head when installed, else class patterns."""
    d = tmp_path_factory.mktemp("fmnist")
    try:
        tr, te = load_fashion_mnist("train", DEFAULT_DATA_DIR, 256), load_fashion_mnist("test", DEFAULT_DATA_DIR, 64)
        splits = {"train": (tr.images, tr.labels), "t10k": (te.images, te.labels)}
    except Exception:
        rng = np.random.default_rng(0)
        def make(n):
            y = np.arange(n) % 10
            x = np.zeros((n, 28, 28), np.uint8)
            for i, c in enumerate(y):
                x[i, 2 + 2 * c: 6 + 2 * c, 4:24] = 200 + rng.integers(0, 50)
            return x, y
        splits = {"train": make(256), "t10k": make(64)}
    for prefix, (x, y) in splits.items():
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return d


def _cfg(kind, out, data, **kw):
    base = dict(kind=kind, out_dir=str(out), data_dir=str(data), batch_size=16, model=TINY[kind], log_every=2,
                sample_every=1000, ckpt_every=1000, progress=False, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------

def test_unet_output_shape_equals_input_when_labels_include_null_class():
    torch.manual_seed(0)
    cfg = UNetConfig(**{**TINY_UNET, "channel_mult": (1, 2, 2), "attention_levels": (2,)})
    m = UNet(cfg)
    x = torch.randn(3, 1, 28, 28)
    out = m(x, torch.tensor([0.0, 499.5, 999.0]), torch.tensor([0, 9, cfg.null_class]))
    assert out.shape == x.shape and cfg.null_class == 10
    assert m.class_emb.num_embeddings == 11


def test_unet_output_depends_on_timestep_and_label():
    torch.manual_seed(0)
    m = UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_UNET.items()}))
    for p in m.parameters():  # zero-init output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28)
    a = m(x, torch.tensor([10.0]), torch.tensor([1]))
    assert not torch.allclose(a, m(x, torch.tensor([900.0]), torch.tensor([1])))
    assert not torch.allclose(a, m(x, torch.tensor([10.0]), torch.tensor([10])))


def test_gan_shapes_and_range_when_conditioned():
    g, d = Generator(GANConfig(**TINY["gan"])).eval(), Discriminator(GANConfig(**TINY["gan"]))
    img = g(torch.randn(4, 8), torch.tensor([0, 3, 7, 9]))
    assert img.shape == (4, 1, 28, 28) and img.abs().max() <= 1
    assert d(img, torch.tensor([0, 3, 7, 9])).shape == (4,)


def test_vae_encoder_decoder_shapes_and_decoder_runs_alone():
    vae = VAE(VAEConfig(**TINY["vae"]))
    logits, mean, logvar = vae(torch.randn(5, 1, 28, 28))
    assert logits.shape == (5, 1, 28, 28) and mean.shape == logvar.shape == (5, 4)
    img = vae.decoder(torch.randn(2, 4))
    assert img.shape == (2, 1, 28, 28) and img.min() >= -1 and img.max() <= 1


def test_vae_loss_is_reconstruction_plus_beta_kl():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**TINY["vae"], beta=0.5))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.manual_seed(1)
    total, rec, kl = vae_loss(vae, x, 0.5)
    assert torch.allclose(total, rec + 0.5 * kl) and kl >= 0


def test_classifier_logits_shape():
    assert Classifier(ClassifierConfig(**TINY["classifier"]))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_build_model_rejects_unknown_config_key_with_allowed_list():
    with pytest.raises(ValueError, match="unknown config keys.*base_channel"):
        build_model("diffusion", {"base_channel": 3})
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("flow", {})


# ---------------------------------------------------------------------------------------------------------------
# Training lowers the loss
# ---------------------------------------------------------------------------------------------------------------

def _log(out):
    rows = (out / "log.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    return [dict(zip(header, map(float, r.split(",")))) for r in rows[1:]]


@pytest.mark.parametrize("kind,key", [("diffusion", "loss"), ("vae", "loss"), ("classifier", "loss"),
                                      ("gan", "loss_d")])
def test_training_lowers_loss_when_run_a_few_steps_on_tiny_data(tmp_path, tiny_data, kind, key):
    torch.manual_seed(0)
    steps = {"diffusion": 40, "vae": 30, "classifier": 30, "gan": 30}[kind]
    lr = {"diffusion": 2e-3, "vae": 3e-3, "classifier": 3e-3, "gan": 5e-4}[kind]
    train(_cfg(kind, tmp_path, tiny_data, steps=steps, lr=lr, log_every=10))
    log = _log(tmp_path)
    assert len(log) == steps // 10
    assert log[-1][key] < log[0][key], log


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_data):
    path = train(_cfg("diffusion", tmp_path, tiny_data, steps=3))
    m1, meta = ckpt.load_model(path, "diffusion")
    m2, _ = ckpt.load_model(path)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3.0, 700.0]), torch.tensor([2, 10])
    assert torch.equal(m1(x, t, y), m2(x, t, y))
    assert meta["card"]["schedule"]["num_train_timesteps"] == 1000 and meta["card"]["null_class"] == 10
    assert meta["card"]["class_names"][7] == "sneaker" and meta["train"]["step"] == 3
    assert not (tmp_path / "samples").exists()  # no preview for a run shorter than sample_every (1000)


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path, tiny_data):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg("vae", a, tiny_data, steps=6))
    train(_cfg("vae", b, tiny_data, steps=3))
    train(_cfg("vae", b, tiny_data, steps=6))  # resumes from b/last.safetensors at step 3
    ta, _ = ckpt.load_checkpoint(a / "model.safetensors")
    tb, mb = ckpt.load_checkpoint(b / "model.safetensors")
    assert mb["train"]["step"] == 6
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


def test_train_writes_preview_grid_with_one_row_per_class(tmp_path, tiny_data):
    from PIL import Image

    train(_cfg("gan", tmp_path, tiny_data, steps=2, sample_every=2))
    img = Image.open(tmp_path / "samples" / "step_0000002.png")
    assert img.height == (10 * 30 + 2) * 2  # 10 rows of 28px + 2px padding, upscaled x2


def test_vae_checkpoint_carries_class_centroids(tmp_path, tiny_data):
    path = train(_cfg("vae", tmp_path, tiny_data, steps=2))
    meta = ckpt.read_meta(path, "vae")
    assert np.asarray(meta["card"]["class_centroids"]).shape == (10, 4)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing lost
# ---------------------------------------------------------------------------------------------------------------

def test_load_checkpoint_names_kind_when_kind_is_wrong(tmp_path, tiny_data):
    path = train(_cfg("vae", tmp_path, tiny_data, steps=1))
    with pytest.raises(ckpt.CheckpointError, match="holds a 'vae' model, expected 'diffusion'"):
        ckpt.load_model(path, "diffusion")


def test_load_checkpoint_reports_corruption_when_file_truncated(tmp_path, tiny_data):
    path = train(_cfg("vae", tmp_path, tiny_data, steps=1))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_model(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_meta(junk)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_meta(tmp_path / "missing.safetensors")


def test_load_checkpoint_rejects_plain_safetensors_without_trident_metadata(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ckpt.CheckpointError, match="not a trident checkpoint"):
        ckpt.read_meta(p)


def test_save_checkpoint_leaves_old_file_when_write_fails(tmp_path):
    p = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(p, {"model.w": torch.ones(2)}, {"kind": "vae"})
    before = p.read_bytes()
    with pytest.raises(Exception):
        ckpt.save_checkpoint(p, {"model.w": "not a tensor"}, {"kind": "vae"})
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["c.safetensors"]


@pytest.mark.parametrize("args,msg", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--label-dropout", "1.5"], "label_dropout must be in"),
    (["--model", '{"base_channel": 4}'], "unknown config keys"),
    (["--model", "[1,2]"], "must be a JSON object"),
    (["--model", "{bad"], "is not valid JSON"),
    (["--warmup-steps", "-1"], "warmup_steps must be >= 0"),
])
def test_train_cli_exits_2_with_message_when_argument_is_bad(tmp_path, capsys, args, msg):
    assert train_main(["diffusion", "--out", str(tmp_path / "o"), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_cli_reports_missing_dataset_with_hint(tmp_path, capsys):
    code = train_main(["vae", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "none"), "--steps", "1"])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_resume_refuses_different_model_config(tmp_path, tiny_data):
    train(_cfg("vae", tmp_path, tiny_data, steps=1))
    with pytest.raises(ckpt.CheckpointError, match="use another --out directory"):
        train(_cfg("vae", tmp_path, tiny_data, steps=2, model={**TINY["vae"], "latent_dim": 5}))


# ---------------------------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("time_limit", [None, 1e-6])
def test_torchrun_two_processes_train_and_write_one_checkpoint(tmp_path, tiny_data, time_limit):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trident.training.train", "vae", "--out", str(out), "--steps", "4", "--batch-size", "16",
           "--data-dir", str(tiny_data), "--model", json.dumps(TINY["vae"]), "--log-every", "2", "--no-progress",
           "--warmup-steps", "0"]
    if time_limit is not None:  # each rank's clock passes the limit at once: they must agree to stop together
        cmd += ["--time-limit", str(time_limit)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = ckpt.read_meta(out / "model.safetensors", "vae")
    assert meta["train"]["world_size"] == 2
    if time_limit is None:
        assert meta["train"]["step"] == 4 and len(_log(out)) == 2
    else:
        assert meta["train"]["step"] == 1 and "time limit" in r.stdout


def test_gan_remedies_train_and_export_an_ema_generator(tmp_path, tiny_data):
    # DiffAugment, lazy R1 (on the first step), a class-wise minibatch-std D, TTUR and mode seeking, for 4 steps
    cfg = _cfg("gan", tmp_path, tiny_data, steps=4, gan_augment="translation,cutout", gan_r1=0.1, gan_r1_every=2,
               disc_lr=4e-4, gan_mode_seeking=1.0, model={**TINY["gan"], "mbstd": "class", "disc_norm": "none"},
               ema_decay=0.5)
    path = train(cfg)
    log = _log(tmp_path)
    assert all(np.isfinite([r["loss_d"], r["loss_g"], r["r1"], r["mode_ratio"]]).all() for r in log)
    exported, _ = ckpt.load_checkpoint(path)
    live, _ = ckpt.load_checkpoint(tmp_path / "last.safetensors")
    # the exported generator is the EMA, not the live weights; BatchNorm statistics are the live model's
    w = "model.fc.0.weight"
    assert not torch.equal(exported[w], live["train.model.fc.0.weight"])
    torch.testing.assert_close(exported["model.fc.1.running_mean"], live["train.model.fc.1.running_mean"])


def test_diff_augment_keeps_shape_and_background_and_passes_gradients():
    from trident.training.train import diff_augment

    x = torch.full((6, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    x.requires_grad_(True)
    out = diff_augment(x, ("translation", "cutout"), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)  # something moved or was cut out
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown policies.*colour"):
        TrainConfig(kind="gan", out_dir="x", gan_augment="colour")


def test_class_minibatch_std_sees_collapse_within_a_class():
    from trident.training.models import ClassMinibatchStd

    layer = ClassMinibatchStd(3)
    y = torch.tensor([0, 0, 1, 1, 2])
    varied = torch.randn(5, 2, 4, 4)
    collapsed = varied.clone()
    collapsed[1] = collapsed[0]  # class 0: two identical images
    a, b = layer(varied, y)[:, -1, 0, 0], layer(collapsed, y)[:, -1, 0, 0]
    assert a[0] > 0.5 and b[0] < 1e-3 and b[1] < 1e-3  # class 0 collapsed: its std channel is ~0
    assert torch.equal(a[2:4], b[2:4]) and a[4] == 0  # other classes unchanged; a class of one image gets 0


def test_autoencoder_trains_without_kl_and_exports_like_the_vae(tmp_path, tiny_data):
    path = train(_cfg("vae", tmp_path, tiny_data, steps=2, model={**TINY["vae"], "variational": False}))
    log = _log(tmp_path)
    assert all(r["kl"] == 0.0 and r["loss"] == r["rec"] for r in log)
    model, meta = ckpt.load_model(path, "vae")
    assert meta["config"]["variational"] is False
    x = torch.randn(3, 1, 28, 28)
    logits, mean, _ = model(x)
    torch.testing.assert_close(logits, model.decoder.logits(mean))  # deterministic: z is the encoder's mean

"""Models, training steps, checkpoints, resume and torchrun: tiny configs, fixed seeds."""
import dataclasses
import json
import math
import os
import re
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
from trident.training.train import (TrainConfig, diffusion_target, lr_factor, main as train_main, min_snr_weight,
                                    resolve_precision, train, vae_loss)

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


def test_resume_repeats_an_uninterrupted_diffusion_run_when_v_prediction_and_cosine_lr(tmp_path, tiny_data):
    # the U-Net config has tuple fields, which come back from the checkpoint's JSON as lists: resume must still match
    kw = dict(prediction_type="v_prediction", min_snr_gamma=5.0, lr_schedule="cosine", warmup_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg("diffusion", a, tiny_data, steps=6, **kw))
    train(_cfg("diffusion", b, tiny_data, steps=3, **kw))
    train(_cfg("diffusion", b, tiny_data, steps=6, **kw))
    ta, _ = ckpt.load_checkpoint(a / "model.safetensors")
    tb, mb = ckpt.load_checkpoint(b / "model.safetensors")
    assert mb["train"]["step"] == 6 and mb["card"]["prediction_type"] == "v_prediction"
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_different_prediction_type(tmp_path, tiny_data):
    train(_cfg("diffusion", tmp_path, tiny_data, steps=1))
    with pytest.raises(ckpt.CheckpointError, match="prediction_type 'epsilon', not 'v_prediction'"):
        train(_cfg("diffusion", tmp_path, tiny_data, steps=2, prediction_type="v_prediction"))


def test_v_target_is_what_the_sampler_turns_back_into_the_noise():
    from trident.serving.sampling import NoiseSchedule, eps_from_prediction
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1, torch.randn(4, 1, 6, 6, generator=g)
    t = np.array([0, 10, 500, 999])
    a = torch.from_numpy(sched.alphas_cumprod[t])[:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = diffusion_target(x0, eps, a, "v_prediction")
    np.testing.assert_allclose(eps_from_prediction(v.numpy(), x_t.numpy(), t, sched, "v_prediction"), eps.numpy(),
                               atol=1e-12)
    assert diffusion_target(x0, eps, a, "epsilon") is eps


def test_min_snr_weight_caps_the_x0_weight_at_gamma_for_each_prediction_type():
    a = torch.tensor([0.999, 0.5, 0.001])  # SNR 999, 1, ~0.001
    snr = a / (1 - a)
    for kind, per_x0 in (("epsilon", snr), ("v_prediction", snr + 1)):
        w = min_snr_weight(a, 5.0, kind)
        # the weight times the factor that turns this loss into an x0-loss is min(SNR, 5)
        torch.testing.assert_close(w * per_x0, snr.clamp(max=5.0))


def test_lr_factor_warms_up_then_decays_to_the_floor_when_cosine(tmp_path):
    cfg = TrainConfig(kind="diffusion", out_dir=str(tmp_path), steps=100, warmup_steps=10, lr_schedule="cosine",
                      lr_min_ratio=0.1)
    f = [lr_factor(cfg, s) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(f[10:], f[11:]))
    constant = TrainConfig(kind="diffusion", out_dir=str(tmp_path), steps=100, warmup_steps=10)
    assert [lr_factor(constant, s) for s in (9, 50, 100)] == [1.0, 1.0, 1.0]


def test_resolve_precision_takes_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from trident.serving import precision
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_info", lambda: {"model": "AVX2 CPU", "flags": ["avx2"], "cores": 2})
    assert resolve_precision("auto", cpu)[0] == "fp32"
    monkeypatch.setattr(precision, "cpu_info", lambda: {"model": "AMX CPU", "flags": ["amx_bf16"], "cores": 2})
    assert resolve_precision("auto", cpu) == ("bf16", "CPU AMX CPU has amx_bf16")
    assert resolve_precision("fp32", cpu)[0] == "fp32"


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


# ---------------------------------------------------------------------------------------------------------------
# Distillation (training/distill.py, `trident distill`)
# ---------------------------------------------------------------------------------------------------------------

def _v_teacher(tmp_path, tiny_data):
    return train(_cfg("diffusion", tmp_path / "teacher", tiny_data, steps=3, prediction_type="v_prediction"))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_stage_timesteps_halve_the_trailing_grid_and_end_at_the_data(n):
    from trident.serving.sampling import spaced_timesteps
    from trident.training.distill import stage_timesteps
    grid = stage_timesteps(1000, n)
    np.testing.assert_array_equal(grid[:, 0], spaced_timesteps(1000, n, "trailing"))
    np.testing.assert_array_equal(grid[:, 1], spaced_timesteps(1000, 2 * n, "trailing")[1::2])
    np.testing.assert_array_equal(grid[:-1, 2], grid[1:, 0])
    assert grid[-1, 2] == -1


def test_halvings_list_each_stage_and_refuse_a_non_power_of_two_ratio():
    from trident.training.distill import halvings
    assert halvings(64, 4) == [32, 16, 8, 4] and halvings(2, 1) == [1]
    for bad in ((12, 4), (4, 4), (4, 0)):
        with pytest.raises(ValueError, match="power of two"):
            halvings(*bad)


@pytest.mark.parametrize("index", [0, 1, 3])
def test_two_step_target_is_what_the_serving_ddim_sampler_reaches_in_two_steps(index):
    """The student's x0 target, checked against our numpy DDIM sampler (serving/sampling.py) taking the teacher's two
    steps: one DDIM step of the student with that x0 must land where they land."""
    from trident.serving.sampling import NoiseSchedule, eps_from_prediction, make_sampler
    from trident.training.distill import stage_timesteps, two_step_target
    sched, n = NoiseSchedule(), 4
    t, t_mid, t_next = stage_timesteps(1000, n)[index]

    def teacher_v(z, tt):  # a fixed smooth stand-in for the network, v-prediction
        return 0.3 * np.tanh(z) + 0.001 * tt

    z = np.random.default_rng(index).standard_normal((2, 1, 4, 4))
    ddim = make_sampler("ddim", sched)  # clip_sample and use_clipped_model_output on, as the student is drawn
    ddim.set_timesteps(2 * n, spacing="trailing")
    z2 = z
    for tt in (t, t_mid):
        eps = eps_from_prediction(teacher_v(z2, tt), z2, int(tt), sched, "v_prediction")
        z2 = ddim.step(eps, int(tt), z2).prev_sample
    target = two_step_target(lambda zz, tt: 0.3 * torch.tanh(zz) + 0.001 * tt[:, None, None, None].double(),
                             torch.from_numpy(z), torch.full((2,), int(t)), torch.full((2,), int(t_mid)),
                             torch.full((2,), int(t_next)), torch.from_numpy(sched.alphas_cumprod.copy()),
                             "v_prediction").numpy()
    a = math.sqrt(sched.alphas_cumprod[t])
    s = math.sqrt(1 - sched.alphas_cumprod[t])
    a2, s2 = (1.0, 0.0) if t_next < 0 else (math.sqrt(sched.alphas_cumprod[t_next]),
                                              math.sqrt(1 - sched.alphas_cumprod[t_next]))
    np.testing.assert_allclose(a2 * target + s2 * (z - a * target) / s, z2, rtol=0, atol=1e-10)


def test_guided_output_is_cfg_combine_of_one_stacked_call():
    from trident.serving.sampling import cfg_combine
    from trident.training.distill import guided_output
    calls = []

    def teacher(x, t, y):
        calls.append(len(x))
        return x * (1 + y[:, None, None, None].float()) + t[:, None, None, None] / 1000

    x, t, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([5.0, 500.0, 900.0]), torch.tensor([1, 2, 10])
    got = guided_output(teacher, x, t, y, torch.full((3,), 2.5), null_class=10)
    both = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])).numpy()
    want = cfg_combine(both, np.concatenate([x.numpy()] * 2), np.array([1, 2, 10]), 2.5)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert calls == [6, 6]  # one stacked call of 2N rows (plus the reference's)


def _toy_guidance_pair():
    """A linear toy teacher (its unconditional output is its conditional one + 1), a student that records what it was
    given (in `seen`) and answers x / 4, and the default schedule's alphas_cumprod."""
    from trident.serving.sampling import NoiseSchedule
    seen = {}

    def teacher(x, t, y):
        return 0.5 * x + (y[:, None, None, None] == 10).double() + t[:, None, None, None] / 1000

    def student(x, t, y, w):
        seen.update(x=x, t=t, y=y, w=w)
        return 0.25 * x

    return seen, teacher, student, torch.from_numpy(NoiseSchedule().alphas_cumprod.copy())


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_guidance_loss_weighs_each_row_by_w_to_the_minus_power(power):
    from trident.training.distill import guidance_distillation_loss, guided_output
    seen, teacher, student, acp = _toy_guidance_pair()
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = guidance_distillation_loss(student, teacher, x0, torch.arange(8) % 10, torch.Generator().manual_seed(0),
                                      acp, null_class=10, label_dropout=0.25, guidance_range=(1.0, 5.0),
                                      prediction_type="v_prediction", guidance_weight_power=power)
    w = seen["w"]
    assert w.min() >= 1 and w.max() <= 5 and len(set(w.tolist())) == 8
    target = guided_output(teacher, seen["x"], seen["t"], seen["y"], w, 10)
    rows = (0.25 * seen["x"] - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (rows * w.pow(-power)).mean(), rtol=1e-12, atol=0)


def test_guidance_interval_targets_the_conditional_output_below_t_min():
    """--guidance-t-min: rows at t < t_min are scored against the teacher's conditional output (whatever w the
    student is given), rows at t >= t_min against the guided pair at w, each weighted by its w ** -P, as a direct
    computation says."""
    from trident.training.distill import guidance_distillation_loss
    seen, teacher, student, acp = _toy_guidance_pair()
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(null_class=10, label_dropout=0.0, guidance_range=(1.0, 5.0), prediction_type="v_prediction",
              guidance_weight_power=2.0)
    loss = guidance_distillation_loss(student, teacher, x0, torch.arange(64) % 10, torch.Generator().manual_seed(0),
                                      acp, guidance_t_min=300, **kw)
    x, t, y, w = seen["x"], seen["t"], seen["y"], seen["w"]
    low = t < 300
    assert 0 < low.sum() < 64 and (w[low] > 1.5).any()  # both kinds of rows, some low ones asked for real guidance
    cond = 0.5 * x + t[:, None, None, None] / 1000  # the toy teacher's conditional output (y is never null here)
    uncond = cond + 1.0
    w_eff = torch.where(low, torch.ones_like(w), w)[:, None, None, None]
    rows = (0.25 * x - (uncond + w_eff * (cond - uncond))).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (rows * w.pow(-2.0)).mean(), rtol=1e-12, atol=0)
    # 0 guides everywhere: the same draw scores every row against the guided pair at its w
    everywhere = guidance_distillation_loss(student, teacher, x0, torch.arange(64) % 10,
                                            torch.Generator().manual_seed(0), acp, **kw)
    rows = (0.25 * x - (uncond + w[:, None, None, None] * (cond - uncond))).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(everywhere, (rows * w.pow(-2.0)).mean(), rtol=1e-12, atol=0)
    # --guidance-interval-max-w 2.5: the interval only for rows with w <= 2.5, those above guided at every t
    limited = guidance_distillation_loss(student, teacher, x0, torch.arange(64) % 10, torch.Generator().manual_seed(0),
                                         acp, guidance_t_min=300, guidance_interval_max_w=2.5, **kw)
    unguided = low & (w <= 2.5)
    assert unguided.any() and (low & (w > 2.5)).any()  # low rows of both kinds
    w_eff = torch.where(unguided, torch.ones_like(w), w)[:, None, None, None]
    rows = (0.25 * x - (uncond + w_eff * (cond - uncond))).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(limited, (rows * w.pow(-2.0)).mean(), rtol=1e-12, atol=0)


def test_guidance_student_starts_as_its_teacher_and_its_loss_falls(tmp_path, tiny_data):
    teacher_path = _v_teacher(tmp_path, tiny_data)
    teacher, _ = ckpt.load_model(teacher_path, "diffusion")
    out = tmp_path / "g"
    train(_cfg("diffusion", out, tiny_data, model={}, distill="guidance", teacher=str(teacher_path), steps=1,
               lr=1e-12, warmup_steps=0))
    student, meta = ckpt.load_model(out / "model.safetensors", "diffusion")
    assert student.config.guidance_input and meta["distill"]["stage"] == "guidance"
    card = ckpt.card_of(meta)  # what serving reads: a student, its guidance range, no step count after stage one
    assert (card.kind, card.guidance_range, card.distilled_steps) == ("diffusion_student", (1.0, 5.0), None)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10.0, 800.0]), torch.tensor([3, 10])
    with torch.no_grad():
        for w in (1.0, 4.0):
            torch.testing.assert_close(student(x, t, y, torch.full((2,), w)), teacher(x, t, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes the guidance scale"):
        student(x, t, y)
    # a student with more capacity at full resolution: its extra blocks start as the identity
    train(_cfg("diffusion", tmp_path / "g3", tiny_data, model={}, distill="guidance", teacher=str(teacher_path),
               steps=1, lr=1e-12, warmup_steps=0, extra_top_blocks=2))
    deeper, _ = ckpt.load_model(tmp_path / "g3" / "model.safetensors", "diffusion")
    assert deeper.config.extra_top_blocks == 2 and len(deeper.top) == 2 and len(teacher.top) == 0
    with torch.no_grad():
        torch.testing.assert_close(deeper(x, t, y, torch.full((2,), 3.0)), teacher(x, t, y), rtol=1e-5, atol=1e-5)
    out2 = tmp_path / "g2"
    train(_cfg("diffusion", out2, tiny_data, model={}, distill="guidance", teacher=str(teacher_path), steps=40,
               lr=2e-3, log_every=10))
    log = _log(out2)
    assert log[-1]["loss"] < log[0]["loss"], log


def test_time_limit_counts_the_runs_recorded_time_and_a_resume_says_what_is_left(tmp_path, tiny_data, capsys):
    """--time-limit bounds the run's training in all, across resumes: a resume whose checkpoint records more than
    the limit takes one step and stops, and says so; one with time left says how much."""
    out = tmp_path / "run"
    train(_cfg("diffusion", out, tiny_data, steps=2))
    tensors, meta = ckpt.load_checkpoint(out / "last.safetensors")
    meta["train"]["elapsed_s"] = 7200.0  # two hours of an earlier call
    ckpt.save_checkpoint(out / "last.safetensors", tensors, meta)
    capsys.readouterr()
    train(_cfg("diffusion", out, tiny_data, steps=4, time_limit_min=100))
    said = capsys.readouterr().out
    assert "--time-limit 100 min counts the run's training in all: 120.0 min recorded, none left" in said
    _, meta = ckpt.load_checkpoint(out / "last.safetensors")
    assert meta["train"]["step"] == 3 and meta["train"]["elapsed_s"] >= 7200
    train(_cfg("diffusion", out, tiny_data, steps=4, time_limit_min=150))  # 30 min left: far more than a tiny step
    assert re.search(r"in all: 120\.\d min recorded, (29\.\d|30\.0) min left", capsys.readouterr().out)
    _, meta = ckpt.load_checkpoint(out / "last.safetensors")
    assert meta["train"]["step"] == 4 and _log(out)[-1]["elapsed_s"] >= 7200


def test_step_distillation_resumes_across_a_stage_boundary_exactly(tmp_path, tiny_data):
    teacher_path = _v_teacher(tmp_path, tiny_data)
    stage1 = train(_cfg("diffusion", tmp_path / "g", tiny_data, model={}, distill="guidance",
                        teacher=str(teacher_path), steps=2))
    kw = dict(model={}, distill="steps", teacher=str(stage1), distill_from_steps=8, distill_to_steps=2, ckpt_every=1)
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg("diffusion", a, tiny_data, steps=6, **kw))
    train(_cfg("diffusion", b, tiny_data, steps=6, time_limit_min=0.0, **kw))  # stops after its first step ...
    for _ in range(5):
        train(_cfg("diffusion", b, tiny_data, steps=6, time_limit_min=0.0, **kw))  # ... and each resume takes one
    ta, ma = ckpt.load_checkpoint(a / "last.safetensors")
    tb, mb = ckpt.load_checkpoint(b / "last.safetensors")
    assert ma["train"]["step"] == mb["train"]["step"] == 6 and ma["distill"]["stages"] == [4, 2]
    assert ckpt.card_of(ma).distilled_steps == 2 and ckpt.card_of(ma).kind == "diffusion_student"
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)
    # each halving's student is kept, its card at its own steps; the last one is model.safetensors
    final, _ = ckpt.load_checkpoint(a / "model.safetensors")
    for run in (a, b):
        assert sorted(p.name for p in (run / "stages").iterdir()) == ["steps_0002.safetensors", "steps_0004.safetensors"]
        for n in (4, 2):
            tensors, meta = ckpt.load_checkpoint(run / "stages" / f"steps_{n:04d}.safetensors")
            assert ckpt.card_of(meta).distilled_steps == n and ckpt.card_of(meta).kind == "diffusion_student"
    first, first_meta = ckpt.load_checkpoint(a / "stages" / "steps_0004.safetensors")
    last, last_meta = ckpt.load_checkpoint(a / "stages" / "steps_0002.safetensors")
    assert (first_meta["train"]["step"], last_meta["train"]["step"]) == (3, 6)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the second halving trained on
    for k in final:
        torch.testing.assert_close(last[k], final[k], rtol=0, atol=0, msg=k)


def test_snapshots_keep_the_exported_weights_every_n_steps(tmp_path, tiny_data):
    """--snapshot-every N: the weights model.safetensors held at each multiple of N, loadable as a model, so a long
    run can be measured at points along it without stopping it."""
    out = tmp_path / "s"
    train(_cfg("diffusion", out, tiny_data, steps=4, snapshot_every=2))
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_0000002.safetensors",
                                                                     "step_0000004.safetensors"]
    (t2, m2), (t4, m4) = (ckpt.load_checkpoint(out / "snapshots" / f"step_000000{n}.safetensors") for n in (2, 4))
    final, final_meta = ckpt.load_checkpoint(out / "model.safetensors")
    assert (m2["train"]["step"], m4["train"]["step"], final_meta["train"]["step"]) == (2, 4, 4)
    assert m2["card"] == final_meta["card"] and set(t2) == set(final)
    for k in final:
        torch.testing.assert_close(t4[k], final[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(t2[k], t4[k]) for k in t2)  # two more steps trained on
    model, _ = ckpt.load_model(out / "snapshots" / "step_0000002.safetensors", "diffusion")
    assert model.config.to_dict() == ckpt.load_model(out / "model.safetensors", "diffusion")[0].config.to_dict()
    train(_cfg("diffusion", tmp_path / "none", tiny_data, steps=2))  # 0, the default: no snapshots
    assert not (tmp_path / "none" / "snapshots").exists()
    with pytest.raises(ValueError, match="snapshot_every must be >= 0, got -1"):
        _cfg("diffusion", out, tiny_data, steps=4, snapshot_every=-1)


def _stage2_cfg(tmp_path, steps_per_stage, **kw):
    base = dict(kind="diffusion", out_dir=str(tmp_path), distill="steps", teacher="t.safetensors",
                distill_from_steps=32, distill_to_steps=4, lr=1e-4, lr_schedule="cosine", warmup_steps=100)
    return TrainConfig(**{**base, "steps": 3 * steps_per_stage, **kw})


def test_resume_with_a_longer_halving_warns_what_moves_and_refuses_one_that_changes_the_halving(tmp_path):
    from trident.training.train import resume_changes
    old = dataclasses.asdict(_stage2_cfg(tmp_path, 2000))  # as recorded in last.safetensors
    assert resume_changes(old, _stage2_cfg(tmp_path, 2000), 6000) == []
    # at step 6000 two swaps are done under 2000 and under 2500 per halving: the same halving, so it may continue
    (w,) = resume_changes(old, _stage2_cfg(tmp_path, 2500), 6000)
    assert "halvings now 2500 steps each (were 2000): this one ends at step 7500 instead of 6000" in w
    assert "the learning rate at step 6000 is 7.07e-05 against 5e-06 at the recorded run's last step" in w
    # under 3000 per halving step 6000 would be in halving 2, with the teacher of halving 3 in the checkpoint
    with pytest.raises(ckpt.CheckpointError, match="put it in halving 3 of 3, 3000 would put it in halving 2"):
        resume_changes(old, _stage2_cfg(tmp_path, 3000), 6000)
    with pytest.raises(ckpt.CheckpointError, match="distill_from_steps=32, not 64"):
        resume_changes(old, _stage2_cfg(tmp_path, 2000, distill_from_steps=64, steps=8000), 100)
    with pytest.raises(ckpt.CheckpointError, match="is not the one the checkpoint was distilled from"):
        resume_changes(old, _stage2_cfg(tmp_path, 2000), 100, "a" * 64, "b" * 64)
    (w,) = resume_changes(old, _stage2_cfg(tmp_path, 2000, lr=2e-4), 50)  # in warm-up: both rates scale
    assert "lr 0.0001 -> 0.0002" in w and "is 0.000102 against 5.1e-05 in the recorded schedule" in w


def test_resume_refuses_another_guidance_interval_also_against_a_record_that_predates_it(tmp_path):
    from trident.training.train import resume_changes
    cfg = dict(kind="diffusion", out_dir=str(tmp_path), distill="guidance", teacher="t.safetensors", steps=2000)
    old = dataclasses.asdict(TrainConfig(**cfg))
    assert resume_changes(old, TrainConfig(**cfg), 500) == []
    with pytest.raises(ckpt.CheckpointError, match="trained with guidance_t_min=0, not 300"):
        resume_changes(old, TrainConfig(**cfg, guidance_t_min=300), 500)
    interval = dataclasses.asdict(TrainConfig(**cfg, guidance_t_min=300))
    with pytest.raises(ckpt.CheckpointError, match="trained with guidance_interval_max_w=0.0, not 2.5"):
        resume_changes(interval, TrainConfig(**cfg, guidance_t_min=300, guidance_interval_max_w=2.5), 500)
    del interval["guidance_interval_max_w"]  # recorded before that option: the interval held at every w
    assert resume_changes(interval, TrainConfig(**cfg, guidance_t_min=300), 500) == []
    del old["guidance_t_min"]  # a checkpoint from before the option: it guided every timestep
    assert resume_changes(old, TrainConfig(**cfg), 500) == []
    with pytest.raises(ckpt.CheckpointError, match="trained with guidance_t_min=0, not 300"):
        resume_changes(old, TrainConfig(**cfg, guidance_t_min=300), 500)


def test_resume_says_on_stderr_when_the_run_is_extended(tmp_path, tiny_data, capsys):
    kw = dict(lr_schedule="cosine", warmup_steps=1)
    train(_cfg("diffusion", tmp_path, tiny_data, steps=2, **kw))
    capsys.readouterr()
    train(_cfg("diffusion", tmp_path, tiny_data, steps=4, **kw))
    err = capsys.readouterr().err
    assert "warning: resuming at step 2 with a changed schedule: steps 2 -> 4" in err
    assert "the learning rate at step 2 is" in err and "at the recorded run's last step" in err
    train(_cfg("diffusion", tmp_path, tiny_data, steps=5, time_limit_min=0.0, **kw))  # 4 -> 5, then the same again
    capsys.readouterr()
    train(_cfg("diffusion", tmp_path, tiny_data, steps=5, **kw))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["steps", "{teacher}", "--from-steps", "12", "--to-steps", "4"], "times a power of two"),
    (["steps", "{teacher}"], "the teacher must take the guidance scale"),
    (["guidance", "{missing}"], "none.safetensors does not exist"),
    (["guidance", "{teacher}", "--guidance-min", "0", "--guidance-weight-power", "2"], "needs guidance_min > 0"),
    (["guidance", "{teacher}", "--guidance-weight-power", "-1"], "guidance_weight_power must be >= 0"),
    (["steps", "{teacher}", "--guidance-weight-power", "2"], "would be ignored here (distill 'steps')"),
    (["steps", "{teacher}", "--extra-top-blocks", "2"], "stage 2 keeps its teacher's architecture"),
    (["guidance", "{teacher}", "--extra-top-blocks", "-1"], "extra_top_blocks must be >= 0"),
    (["guidance", "{teacher}", "--guidance-t-min", "-5"], "guidance_t_min must be an integer timestep >= 0"),
    (["guidance", "{teacher}", "--guidance-t-min", "1000"], "would leave no timestep guided"),
    (["steps", "{teacher}", "--guidance-t-min", "300"], "would be ignored here (distill 'steps')"),
    (["guidance", "{teacher}", "--guidance-interval-max-w", "2"], "it needs guidance_t_min > 0 (got 0)"),
    (["guidance", "{teacher}", "--guidance-t-min", "300", "--guidance-interval-max-w", "5"],
     "a value in [guidance_min, guidance_max) = [1, 5)"),
])
def test_distill_cli_exits_2_naming_the_problem(tmp_path, tiny_data, capsys, args, msg):
    from trident.training.train import distill_main
    teacher = _v_teacher(tmp_path, tiny_data)
    argv = [a.format(teacher=teacher, missing=tmp_path / "none.safetensors") for a in args]
    assert distill_main([*argv, "--out", str(tmp_path / "d"), "--data-dir", str(tiny_data), "--no-progress"]) == 2
    assert msg in capsys.readouterr().err

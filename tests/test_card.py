"""The model card: one typed object from training to every backend."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from trident.serving.card import ImageFormat, ModelCard
from trident.serving.errors import ExportMetadataError
from trident.serving.spec import export_card, load_export_metadata
from trident.training import checkpoint as ckpt

CLASSES = tuple(f"c{i}" for i in range(10))
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"


def diffusion_card(**changes) -> ModelCard:
    card = ModelCard(kind="diffusion", class_names=CLASSES, image=ImageFormat(1, 28, 28), conditional=True,
                     schedule={"kind": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
                     prediction_type="epsilon", null_class=10, buckets={"diffusion_unet": (1, 8)})
    return replace(card, **changes)


def test_card_round_trips_through_json_unchanged():
    vae = ModelCard(kind="vae", class_names=CLASSES, image=ImageFormat(1, 28, 28, (-1.0, 1.0)), conditional=False,
                    latent_dim=2, class_centroids=tuple((float(i), -float(i)) for i in range(10)))
    for card in (diffusion_card(), diffusion_card(prediction_type="v_prediction"), vae):
        assert ModelCard.from_json(card.to_json()) == card
        assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


@pytest.mark.parametrize("data,message", [
    ({"kind": "diffusion"}, "missing fields ['class_names', 'conditional', 'image']"),
    ({**diffusion_card().to_dict(), "colour": "red"}, "unknown fields ['colour']"),
    ({**diffusion_card().to_dict(), "kind": "flow"}, "kind must be one of"),
    ({**diffusion_card().to_dict(), "null_class": 3}, "null_class must be 10"),
    ({**diffusion_card().to_dict(), "buckets": {"diffusion_unet": [8, 1]}}, "must be increasing positive integers"),
    ({**diffusion_card().to_dict(), "image": {"channels": 0, "height": 28, "width": 28}}, "positive integers"),
    ({k: v for k, v in diffusion_card().to_dict().items() if k != "schedule"}, "needs a schedule"),
    ({**diffusion_card().to_dict(), "prediction_type": "sample"},
     "prediction_type must be one of ('epsilon', 'v_prediction')"),
])
def test_card_refuses_a_bad_field_and_names_it(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelCard.from_dict(data)


def test_gan_card_without_latent_size_is_refused():
    with pytest.raises(ValueError, match="a gan card needs latent_dim"):
        ModelCard(kind="gan", class_names=CLASSES, image=ImageFormat(1, 28, 28), conditional=True)


@pytest.mark.parametrize("kind", ["diffusion", "diffusion_student", "gan", "vae", "classifier"])
def test_shipped_checkpoints_read_into_their_card(kind):
    meta = ckpt.read_meta(SHIPPED / kind / "model.safetensors")
    # the GAN, VAE and classifier predate the card (their bytes are what the reports measured): it is derived from
    # their config; the diffusion teacher and its student were trained after it and store theirs
    diffusion = kind in ("diffusion", "diffusion_student")
    assert ("card" in meta) == diffusion
    card = ckpt.card_of(meta)
    assert (card.kind, card.class_names[7], card.image.shape) == (kind, "sneaker", (1, 28, 28))
    assert card.conditional == (diffusion or kind == "gan")
    assert (card.latent_dim is not None) == (kind in ("gan", "vae"))
    assert (card.class_centroids is not None) == (kind == "vae")
    if diffusion:
        assert card.prediction_type == "v_prediction"
    if kind == "diffusion_student":
        assert card.distilled_steps == 4 and tuple(card.guidance_range) == (1.0, 5.0)
    # stored the new way, it reads back equal
    assert ckpt.card_of({"kind": kind, "card": card.to_dict()}) == card


def test_export_of_an_older_format_is_refused_with_the_command_to_re_export(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "trident.export", "version": 1, "kind": "gan"}))
    with pytest.raises(ExportMetadataError, match="re-export the checkpoint"):
        load_export_metadata(tmp_path)
    with pytest.raises(ExportMetadataError, match="missing fields"):
        export_card({"card": {"kind": "gan"}}, "x/metadata.json")


def test_every_backend_parses_the_same_card(export_dirs, checkpoints):
    from trident.serving.client import TridentClient

    with TridentClient.from_onnx(list(export_dirs.values())) as ort, \
            TridentClient.from_torch(list(checkpoints.values())) as torch_client:
        for kind, directory in export_dirs.items():
            exported = export_card(load_export_metadata(directory))
            assert ort.card(kind) == exported
            assert replace(torch_client.card(kind), buckets={}) == replace(exported, buckets={})


def test_card_and_sampler_agree_on_the_prediction_types():
    # card.py and sampling.py are both copied into Triton model folders on their own, so neither imports the other:
    # the two lists must stay one
    from trident.serving import card, sampling
    assert card.PREDICTION_TYPES == sampling.PREDICTION_TYPES


def student_card(**changes) -> ModelCard:
    return diffusion_card(**{"kind": "diffusion_student", "prediction_type": "v_prediction",
                             "guidance_range": (1.0, 5.0), "distilled_steps": 4,
                             "buckets": {"diffusion_student_unet": (1, 8)}, **changes})


def test_student_card_round_trips_its_guidance_range_and_distilled_steps():
    for card in (student_card(), student_card(distilled_steps=None)):
        assert ModelCard.from_json(card.to_json()) == card
    data = student_card().to_dict()
    assert (data["guidance_range"], data["distilled_steps"]) == ([1.0, 5.0], 4)
    assert student_card(guidance_range=[0, 3]).guidance_range == (0.0, 3.0)  # as JSON gives it
    assert "guidance_range" not in diffusion_card().to_dict() and "distilled_steps" not in diffusion_card().to_dict()


@pytest.mark.parametrize("data,message", [
    ({**diffusion_card().to_dict(), "guidance_range": [1, 5]}, "guidance_range (min, max) belongs to a "
                                                               "diffusion_student card"),
    ({k: v for k, v in student_card().to_dict().items() if k != "guidance_range"}, "every such card needs one"),
    ({**student_card().to_dict(), "guidance_range": [5, 1]}, "0 <= min <= max, got (5, 1)"),
    ({**student_card().to_dict(), "guidance_range": [1, "x"]}, "finite numbers"),
    ({**student_card().to_dict(), "distilled_steps": 0}, "distilled_steps must be None or"),
    ({**diffusion_card().to_dict(), "distilled_steps": 4}, "for a diffusion_student, an integer >= 1; got 4 for "
                                                           "kind 'diffusion'"),
    ({**student_card().to_dict(), "prediction_type": None}, "prediction_type must be one of"),
])
def test_student_card_is_refused_naming_the_field_when_invalid(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelCard.from_dict(data)

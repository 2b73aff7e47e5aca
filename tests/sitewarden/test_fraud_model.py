"""The demo fraud scorer: seeded data, a reasonable model, a release directory and its model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.onnx_model import OnnxModel
from controller.api.schemas import ModelCard
from sitewarden import fraud_model
from sitewarden.fraud_model import FEATURES, INPUTS, OUTPUTS


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default release (seed 7, 20,000 transactions): its directory and its card."""
    directory = tmp_path_factory.mktemp("out") / "fraud-1.0.0"
    card_path = fraud_model.build_release(directory, version_note="first release")
    return directory, card_path


@pytest.fixture(scope="module")
def card(release: tuple[Path, Path]) -> dict[str, Any]:
    return json.loads(release[1].read_text())


def test_release_directory_holds_only_the_model_and_the_card_lies_beside_it(release: tuple[Path, Path]) -> None:
    directory, card_path = release
    assert [p.name for p in directory.iterdir()] == ["model.onnx"]
    assert card_path == directory.parent / "fraud-1.0.0.card.json"


def test_card_inside_the_release_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be inside the release directory"):
        fraud_model.build_release(tmp_path / "r", card_path=tmp_path / "r" / "card.json", n_samples=200)


def test_card_has_the_fields_the_controller_and_the_agent_read(card: dict[str, Any]) -> None:
    assert card["owner"] == "fraud-analytics"
    assert card["intended_purposes"] == ["fraud"]
    assert card["risk_tier"] == "medium"
    assert card["licence"] == "Apache-2.0"
    assert card["data_classes"] == ["public", "internal", "confidential"]
    assert set(card["evaluation"]) == {"auc", "accuracy", "average_precision"}
    assert card["inputs"] == INPUTS and card["outputs"] == OUTPUTS
    assert card["feature_names"] == list(FEATURES)
    assert card["model_file"] == "model.onnx"
    assert card["version_note"] == "first release"
    assert card["training"]["seed"] == 7 and card["training"]["n_samples"] == 20_000
    ModelCard.model_validate(card)  # what `sitewarden release push --metadata` sends must pass the controller


def test_model_is_reasonable_on_held_out_data(card: dict[str, Any]) -> None:
    assert card["evaluation"]["auc"] > 0.8
    assert card["evaluation"]["accuracy"] > 0.9
    assert 0.01 < card["training"]["fraud_rate"] < 0.1


def test_agent_loads_the_release_as_its_card_declares(release: tuple[Path, Path], card: dict[str, Any]) -> None:
    model = OnnxModel(release[0] / card["model_file"])
    model.check_declared(card["inputs"], card["outputs"])
    scores = model.infer({"features": fraud_model.sample_features(5)})["probabilities"]
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_the_same_seed_gives_the_same_model_byte_for_byte() -> None:
    one = fraud_model.train(seed=11, n_samples=3_000)
    other = fraud_model.train(seed=11, n_samples=3_000)
    assert one.onnx == other.onnx
    assert one.evaluation == other.evaluation


def test_different_seeds_give_different_valid_models(release: tuple[Path, Path], tmp_path: Path) -> None:
    second = fraud_model.build_release(tmp_path / "fraud-1.1.0", seed=8)
    first_bytes = (release[0] / "model.onnx").read_bytes()
    second_bytes = (tmp_path / "fraud-1.1.0" / "model.onnx").read_bytes()
    assert first_bytes != second_bytes
    x = fraud_model.sample_features(100, seed=5)
    first = OnnxModel(release[0] / "model.onnx").infer({"features": x})["probabilities"]
    second_model = OnnxModel(tmp_path / "fraud-1.1.0" / "model.onnx")
    second_card = json.loads(second.read_text())
    second_model.check_declared(second_card["inputs"], second_card["outputs"])
    assert not np.allclose(first, second_model.infer({"features": x})["probabilities"])
    assert second_card["evaluation"]["auc"] > 0.8


def test_generated_data_is_seeded_and_plausible() -> None:
    x, y = fraud_model.generate(5_000, seed=3)
    again, labels = fraud_model.generate(5_000, seed=3)
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == np.float32 and x.shape == (5_000, len(FEATURES)) and y.dtype == np.int64
    columns = dict(zip(FEATURES, x.T, strict=True))
    assert columns["amount"].min() > 0
    assert set(np.unique(columns["hour"])) <= set(range(24))
    assert columns["merchant_risk"].min() >= 0 and columns["merchant_risk"].max() <= 1
    assert set(np.unique(columns["foreign"])) == {0, 1} and set(np.unique(columns["online"])) == {0, 1}
    assert columns["card_age_days"].min() >= 1
    # the rule is plausible: fraud is more common abroad and at risky merchants
    assert y[columns["foreign"] == 1].mean() > y[columns["foreign"] == 0].mean()
    assert y[columns["merchant_risk"] > 0.4].mean() > y[columns["merchant_risk"] < 0.1].mean()


def test_sample_features_are_seeded() -> None:
    np.testing.assert_array_equal(fraud_model.sample_features(10, seed=1), fraud_model.sample_features(10, seed=1))
    assert not np.array_equal(fraud_model.sample_features(10, seed=1), fraud_model.sample_features(10, seed=2))
    assert fraud_model.sample_features(1).shape == (1, 8)
    with pytest.raises(ValueError, match="n must be positive"):
        fraud_model.sample_features(0)

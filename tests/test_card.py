"""pneumo_edge.card: JSON round-trip, validation, labelling."""

import json

import pytest

from pneumo_edge.card import CARD_VERSION, Card
from pneumo_edge.errors import ModelError


def make(**kw):
    base = dict(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=224,
                threshold=0.4, arch="resnet50", metrics={"val": {"f1": 0.9}})
    return Card(**(base | kw))


def test_round_trip_through_directory(tmp_path):
    c = make(split={"seed": 1, "val_files": ["a", "b"]})
    c.save(tmp_path)
    back = Card.load(tmp_path)
    assert back == c
    d = json.loads((tmp_path / "card.json").read_text())
    for key in ("classes", "positive_class", "image_size", "threshold", "arch", "card_version"):
        assert key in d
    assert d["input"]["shape"] == ["N", 1, 224, 224] and d["input"]["dtype"] == "uint8"


def test_unknown_keys_ignored_and_required_keys_enforced():
    d = make().to_dict() | {"future_field": 1}
    assert Card.from_dict(d).arch == "resnet50"
    with pytest.raises(ModelError, match="lacks threshold"):
        Card.from_dict({k: v for k, v in d.items() if k != "threshold"})


@pytest.mark.parametrize("kw,msg", [
    ({"card_version": CARD_VERSION + 1}, "newer"),
    ({"positive_class": "COVID"}, "not one of"),
    ({"classes": ["ONLY"], "positive_class": "ONLY"}, "two or more"),
    ({"threshold": 1.5}, r"not in \[0, 1\]"),
    ({"image_size": 3}, "not a usable size"),
])
def test_invalid_cards_refused(kw, msg):
    with pytest.raises(ModelError, match=msg):
        make(**kw)


def test_missing_and_corrupt_card_files(tmp_path):
    with pytest.raises(ModelError, match="no model card"):
        Card.load(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        Card.load(tmp_path)


def test_labels_use_threshold_on_positive_class():
    c = make(threshold=0.3)
    assert c.label_for([0.65, 0.35]) == "PNEUMONIA"
    assert c.label_for([0.75, 0.25]) == "NORMAL"
    assert c.label_index([0.75, 0.25], threshold=0.2) == 1
    three = make(classes=["NORMAL", "BACTERIA", "VIRUS"], positive_class="VIRUS", threshold=0.5)
    assert three.label_for([0.1, 0.5, 0.4]) == "BACTERIA"
    assert three.label_for([0.1, 0.3, 0.6]) == "VIRUS"

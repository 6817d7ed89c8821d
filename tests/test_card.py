"""pneumo_edge.model.card: JSON round-trip, validation, labelling."""

import json

import pytest

from pneumo_edge.errors import ModelError
from pneumo_edge.model.card import CARD_VERSION, Card
from pneumo_edge.model.modeldir import card_sha256, read_card, write_card


def make(**kw):
    base = {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "image_size": 224,
            "threshold": 0.4, "arch": "resnet50", "metrics": {"val": {"f1": 0.9}}}
    return Card(**(base | kw))


def test_round_trip_through_directory(tmp_path):
    c = make(split={"seed": 1, "val_files": ["a", "b"]})
    write_card(tmp_path, c)
    back = read_card(tmp_path)
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


BAD_FIELDS = [
    ({"card_version": CARD_VERSION + 1}, "newer"),
    ({"card_version": "1"}, "card_version '1' is not a whole number"),
    ({"positive_class": "COVID"}, "not one of"),
    ({"classes": ["ONLY"], "positive_class": "ONLY"}, "two or more"),
    ({"classes": ["NORMAL", "NORMAL"], "positive_class": "NORMAL"}, "two or more distinct"),
    ({"classes": "NORMAL,PNEUMONIA"}, "not a list of class names"),
    ({"classes": ["NORMAL", 1]}, "not a list of class names"),
    ({"threshold": 1.5}, r"threshold 1.5 is not a number in \[0, 1\]"),
    ({"threshold": -0.1}, r"not a number in \[0, 1\]"),
    ({"threshold": "abc"}, r"threshold 'abc' is not a number"),
    ({"threshold": "0.5"}, r"threshold '0.5' is not a number"),
    ({"threshold": None}, r"threshold None is not a number"),
    ({"threshold": float("nan")}, r"threshold nan is not a number"),
    ({"threshold": float("inf")}, r"threshold inf is not a number"),
    ({"threshold": True}, r"threshold True is not a number"),
    ({"image_size": 3}, "not a usable size"),
    ({"image_size": 0}, "image_size 0 is not a usable size"),
    ({"image_size": -1}, "image_size -1 is not a usable size"),
    ({"image_size": "224"}, "image_size '224' is not a usable size"),
    ({"image_size": 224.0}, "image_size 224.0 is not a usable size"),
    ({"image_size": True}, "image_size True is not a usable size"),
    ({"arch": None}, "arch None is not a name"),
    ({"net": ["norm"]}, "net is not a JSON object"),
    ({"split": "all"}, "split is not a JSON object"),
]


@pytest.mark.parametrize("kw,msg", BAD_FIELDS)
def test_invalid_cards_refused(kw, msg):
    with pytest.raises(ModelError, match=msg):
        make(**kw)


@pytest.mark.parametrize("kw,msg", BAD_FIELDS)
def test_invalid_card_files_name_the_file(tmp_path, kw, msg):
    d = make().to_dict() | kw
    (tmp_path / "card.json").write_text(json.dumps(d))  # NaN/inf go in as JSON's NaN/Infinity
    with pytest.raises(ModelError, match=msg) as err:
        read_card(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'card.json'}: ")


def test_missing_and_corrupt_card_files(tmp_path):
    with pytest.raises(ModelError, match="no model card"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_bytes(make().to_json().replace("NORMAL", "NORM\xc9L")
                                         .encode("latin-1"))
    with pytest.raises(ModelError, match="card.json: model card is not UTF-8 text"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ModelError, match="not valid JSON"):
        read_card(tmp_path)


def test_oversized_card_is_refused_without_reading_it(tmp_path):
    with open(tmp_path / "card.json", "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that are never read
    with pytest.raises(ModelError, match="more than the 1048576"):
        read_card(tmp_path)


def test_card_that_is_not_a_regular_file(tmp_path):
    (tmp_path / "card.json").mkdir()
    with pytest.raises(ModelError, match="card.json: not a regular file \\(a directory\\)"):
        read_card(tmp_path)
    (tmp_path / "card.json").rmdir()
    (tmp_path / "card.json").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match="not a regular file \\(a character device\\)"):
        read_card(tmp_path)


def test_labels_use_threshold_on_positive_class():
    c = make(threshold=0.3)
    assert c.label_for([0.65, 0.35]) == "PNEUMONIA"
    assert c.label_for([0.75, 0.25]) == "NORMAL"
    assert c.label_index([0.75, 0.25], threshold=0.2) == 1
    three = make(classes=["NORMAL", "BACTERIA", "VIRUS"], positive_class="VIRUS", threshold=0.5)
    assert three.label_for([0.1, 0.5, 0.4]) == "BACTERIA"
    assert three.label_for([0.1, 0.3, 0.6]) == "VIRUS"


def test_card_identity_tells_two_runs_apart():
    """card_sha256 binds parity evidence to one training run: the same agreed fields with other
    metrics or creation time are another card."""
    a = make(created="2026-01-01T00:00:00+00:00")
    assert card_sha256(a) == card_sha256(Card.from_json(a.to_json()))
    assert card_sha256(a) != card_sha256(make(created="2026-01-02T00:00:00+00:00"))
    assert card_sha256(a) != card_sha256(make(created=a.created, metrics={"val": {"f1": 0.8}}))


def test_no_import_loop_between_atomic_card_and_modeldir():
    """Before: atomic imported card (json_safe), card's save/load imported modeldir, and modeldir
    imports atomic. Now atomic imports neither, and importing card imports no model directory."""
    import subprocess
    import sys

    code = ("import sys; import pneumo_edge.atomic as a; print('pneumo_edge.model.card' in "
            "sys.modules); import pneumo_edge.model.card; print('pneumo_edge.model.modeldir' in "
            "sys.modules); print(a.json_safe({'x': [float('nan'), 1.0]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["False", "False", "{'x': [None, 1.0]}"]

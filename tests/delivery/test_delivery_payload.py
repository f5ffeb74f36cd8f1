from __future__ import annotations

import base64
import uuid

import pytest

from flowgen.delivery import content_type_for, data_uri, image_result, uuid_from_key

PNG = b"\x89PNG\r\n\x1a\n fake image bytes \x00\xff"


def test_uuid_from_key_is_stable_v4_shaped():
    # Golden value: sha256("a") = ca978112 ca1b bdca fac2 31b39a23dc4d..., version/variant bits set.
    assert uuid_from_key("a") == "ca978112-ca1b-4dca-bac2-31b39a23dc4d"
    assert uuid_from_key("item-7/0") == uuid_from_key("item-7/0")
    assert uuid_from_key("item-7/0") != uuid_from_key("item-7/1")
    for key in ("", "a", "ünïcode", "x" * 1000):
        parsed = uuid.UUID(uuid_from_key(key))
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    "ext, expected",
    [
        ("png", "image/png"),
        (".PNG", "image/png"),
        ("JPG", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("webp", "image/webp"),
    ],
)
def test_content_type_for(ext, expected):
    assert content_type_for(ext) == expected


def test_content_type_for_unknown_extension():
    with pytest.raises(ValueError, match="'tiff'"):
        content_type_for("tiff")


def test_data_uri_round_trips():
    uri = data_uri(PNG, "image/png")
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix):]) == PNG


def test_result_url():
    result = image_result(task_uuid="t", image_uuid="i", seed=42, output_type="URL", image_url="https://h/x.png")
    assert result == {
        "taskType": "imageInference",
        "taskUUID": "t",
        "imageUUID": "i",
        "imageURL": "https://h/x.png",
        "seed": 42,
    }


def test_result_data_uri_and_base64():
    uri = image_result(task_uuid="t", image_uuid="i", seed=1, output_type="dataURI", image=PNG)
    assert uri["imageDataURI"] == data_uri(PNG, "image/png")
    assert "imageURL" not in uri and "imageBase64Data" not in uri

    jpeg = image_result(
        task_uuid="t", image_uuid="i", seed=1, output_type="dataURI", image=PNG, content_type="image/jpeg"
    )
    assert jpeg["imageDataURI"].startswith("data:image/jpeg;base64,")

    b64 = image_result(task_uuid="t", image_uuid="i", seed=1, output_type="base64Data", image=PNG)
    assert base64.b64decode(b64["imageBase64Data"], validate=True) == PNG
    assert "imageDataURI" not in b64


def test_cost_and_nsfw_only_when_given():
    bare = image_result(task_uuid="t", image_uuid="i", seed=1, image_url="u")
    assert "cost" not in bare and "NSFWContent" not in bare
    # Falsy values are still values: cost 0 and "not NSFW" must be reported.
    full = image_result(task_uuid="t", image_uuid="i", seed=1, image_url="u", cost=0.0, nsfw_content=False)
    assert full["cost"] == 0.0
    assert full["NSFWContent"] is False


def test_result_needs_the_right_image_form():
    with pytest.raises(ValueError, match="image_url"):
        image_result(task_uuid="t", image_uuid="i", seed=1, output_type="URL", image=PNG)
    with pytest.raises(ValueError, match="bytes"):
        image_result(task_uuid="t", image_uuid="i", seed=1, output_type="base64Data", image_url="u")
    with pytest.raises(ValueError, match="outputType"):
        image_result(task_uuid="t", image_uuid="i", seed=1, output_type="url", image_url="u")

"""A Secret's values, read alike by the operator and `modelloader local`."""

from __future__ import annotations

import base64

import pytest
from modelloader.secret_data import SecretNotText, secret_values


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(**fields: object) -> dict[str, object]:
    return {"kind": "Secret", "metadata": {"namespace": "shop", "name": "store"}, **fields}


def test_string_data_is_merged_over_data_as_kubernetes_does() -> None:
    doc = secret(
        data={"AWS_ACCESS_KEY_ID": b64("from-data"), "AWS_REGION": b64("eu-west-1")},
        stringData={"AWS_ACCESS_KEY_ID": "from-string-data"},
    )
    expected = {"AWS_ACCESS_KEY_ID": "from-string-data", "AWS_REGION": "eu-west-1"}
    assert secret_values(doc, "shop", "store") == expected


@pytest.mark.parametrize("value", ["not base64!", "YWJj=x", base64.b64encode(b"\xff\xfe").decode()])
def test_a_value_that_is_not_base64_text_names_its_key_never_the_value(value: str) -> None:
    with pytest.raises(SecretNotText) as raised:
        secret_values(secret(data={"AWS_SECRET_ACCESS_KEY": value}), "shop", "store")
    assert "Secret shop/store: key 'AWS_SECRET_ACCESS_KEY'" in str(raised.value)
    assert value not in str(raised.value)


def test_data_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SecretNotText, match="must map keys to text"):
        secret_values(secret(data=["AWS_ACCESS_KEY_ID"]), "shop", "store")


def test_no_data_is_no_values() -> None:
    assert secret_values(secret(), "shop", "store") == {}

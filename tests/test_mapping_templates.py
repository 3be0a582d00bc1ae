import hashlib
import json
from pathlib import Path

import pytest

from service.mapping.templates import TemplateError, load_template_file

ROOT = Path(__file__).resolve().parent.parent
PROMO = ROOT / "templates" / "product-promo.json"
TUTORIAL = Path("/work/shared/seeds/000_cf88fc78979c3152.txt")
# sha256 of the JSON text between the backticks of `const sceneInfo` in the first tutorial
TUTORIAL_JSON_SHA256 = "4fa22355b919e63b22d65d69cd7da77650bba84c9c99e82df8afce044d674f14"


def test_product_promo_is_the_tutorial_template_verbatim():
    text = PROMO.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert hashlib.sha256(text[:-1].encode()).hexdigest() == TUTORIAL_JSON_SHA256
    document = load_template_file(PROMO)
    assert document["name"] == "Exporting an JSON-based Template."
    assert [clip["id"] for clip in document["scenes"][0]["clips"]] == [
        "aiModel-1h4ij5h8e87",
        "image-1hgur0eiu11",
    ]
    assert document["scenes"][1]["clips"][1]["type"] == "videoImage"


@pytest.mark.skipif(not TUTORIAL.exists(), reason="the tutorial is outside the repository")
def test_product_promo_equals_the_tutorial_text():
    tutorial = TUTORIAL.read_text(encoding="utf-8")
    start = tutorial.index("const sceneInfo = `") + len("const sceneInfo = `")
    embedded = tutorial[start : tutorial.index("`;", start)]
    assert PROMO.read_text(encoding="utf-8") == embedded + "\n"
    assert json.loads(embedded) == load_template_file(PROMO)


def test_legacy_sample_loads():
    document = load_template_file(ROOT / "templates" / "legacy-project.json")
    assert document["scenes"][0]["AIModel"]["script"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"scenes": [}', "not valid JSON at line 1, column 13"),
        ("[1, 2]", "must be a JSON object, not a list"),
        ('{"name": "x"}', "non-empty `scenes` list"),
        ('{"scenes": []}', "non-empty `scenes` list"),
        ('{"scenes": [{}, 3]}', "scenes[1] must be an object, not a number"),
    ],
)
def test_bad_templates_are_refused_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TemplateError) as info:
        load_template_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(TemplateError, match="cannot read"):
        load_template_file(tmp_path / "missing.json")
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TemplateError, match="not UTF-8"):
        load_template_file(path)

"""The shipped workflows against the pack's node schemas (no ComfyUI needed; the host tests repeat this
against a real ComfyUI's /object_info, core nodes included)."""

import json
from pathlib import Path

import pytest

from schema_reader import read_schemas

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
FILE_CHOICES = {"model", "siglip", "dinov2", "adapter", "lora_name", "unet_name", "clip_name1", "clip_name2",
                "vae_name", "transformer", "clip_l", "t5", "vae"}  # file/folder combos: their options depend on the disk


@pytest.fixture(scope="module")
def schemas():
    return read_schemas()


def test_every_node_has_a_description_and_tooltips(schemas):
    assert schemas
    for node_id, schema in schemas.items():
        assert node_id.startswith("InstantCharacter")
        assert schema.description, node_id
        for spec in schema.inputs:
            assert spec.tooltip, f"{node_id}.{spec.id} has no tooltip"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_widget_values_match_the_schemas(path, schemas):
    workflow = json.loads(path.read_text())
    ours = [n for n in workflow["nodes"] if n["type"].startswith("InstantCharacter")]
    assert ours, f"{path.name} uses none of our nodes"
    for node in ours:
        assert node["type"] in schemas, f"{path.name}: unknown node {node['type']}"
        schema = schemas[node["type"]]
        values = list(node.get("widgets_values") or [])
        expected = sum(1 + w.control_after_generate for w in schema.widgets())
        assert len(values) == expected, (f"{path.name}: {node['type']} stores {len(values)} widget values, "
                                         f"its schema has {expected}: {[w.id for w in schema.widgets()]}")
        for widget in schema.widgets():
            value = values.pop(0)
            if widget.control_after_generate:
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if widget.kind == "COMBO" and widget.id not in FILE_CHOICES:
                assert value in widget.options, f"{path.name}: {node['type']}.{widget.id}={value!r}"
            elif widget.kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (node["type"], widget.id)
            elif widget.kind == "BOOLEAN":
                assert isinstance(value, bool), (node["type"], widget.id)
            elif widget.kind == "STRING":
                assert isinstance(value, str), (node["type"], widget.id)
        # every linked input of ours names a real input
        names = {i.id for i in schema.inputs}
        for socket in node.get("inputs", []):
            assert socket["name"] in names, f"{path.name}: {node['type']} has no input {socket['name']!r}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_every_workflow_has_a_thumbnail(path):
    assert path.with_suffix(".jpg").is_file() or path.with_suffix(".png").is_file()

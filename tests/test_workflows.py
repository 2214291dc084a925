"""The shipped workflows against the pack's node schemas (no ComfyUI needed; the host tests repeat this
against a real ComfyUI's /object_info, core nodes included), and Encode Reference's extra views, which the
workflows use instead of a batch node."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instantcharacter.reference.images import pil_to_tensor, prepare_reference
from schema_reader import pack_nodes, read_schemas

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Core nodes ComfyUI v0.33 marks deprecated (V1 nodes: DEPRECATED = True; V3: is_deprecated=True; /object_info
# says "deprecated": true and the frontend hides them from search). Shipped workflows must not use them: ImageBatch's
# replacement does not exist on v0.3.64, so Encode Reference takes several views itself. The host tests check
# every node against the running ComfyUI's own flag as well.
DEPRECATED_CORE_NODES = {
    "AddTextPrefix", "AddTextSuffix", "CheckpointLoader", "ControlNetApply", "ControlNetApplySD3", "DiffusersLoader",
    "ImageBatch", "ImageCrop", "LatentBatch", "MergeImageLists", "MergeTextLists", "PerpNeg", "ReplaceText",
    "ResizeImagesByLongerEdge", "ResizeImagesByShorterEdge", "SaveAudio", "SaveAudioMP3", "SaveAudioOpus",
    "SaveImageDataSetToFolder", "StripWhitespace", "TextToLowercase", "TextToUppercase", "VoxelToMeshBasic",
    "wanBlockSwap",
}
FILE_CHOICES = {"model", "siglip", "dinov2", "adapter", "lora_name", "unet_name", "clip_name1", "clip_name2",
                "vae_name", "transformer", "clip_l", "t5", "vae", "character_file"}  # file/folder combos: on the disk


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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_no_workflow_uses_a_deprecated_core_node(path):
    used = {n["type"] for n in json.loads(path.read_text())["nodes"]}
    assert not used & DEPRECATED_CORE_NODES, f"{path.name} uses {sorted(used & DEPRECATED_CORE_NODES)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_links_are_consistent(path):
    """Every link joins an output and an input that both name it, with the socket type of both ends."""
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(l[0] for l in workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        output, input_ = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and input_["link"] == link_id, (path.name, link_id)
        assert output["type"] == kind and input_["type"] in (kind, "*"), (path.name, link_id)  # "*": any type
    linked = {l[0] for l in workflow["links"]}
    for node in workflow["nodes"]:
        assert all(i.get("link") in linked | {None} for i in node.get("inputs", [])), (path.name, node["id"])
        assert all(set(o.get("links") or []) <= linked for o in node.get("outputs", [])), (path.name, node["id"])


def _picture(name, size=None):
    """An asset as ComfyUI's Load Image gives it: IMAGE [1, H, W, 3] and the character mask (alpha, 1 = character)."""
    image = Image.open(ROOT / "assets" / name).convert("RGBA")
    if size:
        image = image.resize(size)
    rgba = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(rgba[..., :3])[None], torch.from_numpy(rgba[..., 3])[None]


def _same_features(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_encode_reference_extra_views_fuse_like_one_batch(tiny_encoders):
    front, front_mask = _picture("reference_girl_front.png")
    side, side_mask = _picture("reference_girl_side.png")
    wave, wave_mask = _picture("reference_girl_wave.png")  # no alpha: all character
    with pack_nodes() as nodes:
        encode = nodes.EncodeReference.execute
        batch, batch_prepared = encode(tiny_encoders, torch.cat([front, side, wave]), "pad", True, 0.1, "1, 2, 0.5",
                                       torch.cat([front_mask, side_mask, wave_mask]))
        views, views_prepared = encode(tiny_encoders, front, "pad", True, 0.1, "1, 2, 0.5", front_mask,
                                       image_2=side, mask_2=side_mask, image_3=wave, mask_3=wave_mask)
        # a batch in image and a picture in image_4: the batch's pictures come first
        split, _ = encode(tiny_encoders, torch.cat([front, side]), "pad", True, 0.1, "1, 2, 0.5",
                          torch.cat([front_mask, side_mask]), image_4=wave, mask_4=wave_mask)
    assert _same_features(batch, views) and _same_features(batch, split)
    assert torch.equal(batch_prepared, views_prepared) and views_prepared.shape == (3, 384, 384, 3)


def test_encode_reference_extra_views_may_have_other_sizes(tiny_encoders):
    front, front_mask = _picture("reference_girl_front.png")  # 512×768
    side, side_mask = _picture("reference_girl_side.png", (300, 200))
    wave, _ = _picture("reference_girl_wave.png", (640, 640))
    with pack_nodes() as nodes:
        character, prepared = nodes.EncodeReference.execute(tiny_encoders, front, "crop", False, 0.1, "", front_mask,
                                                            image_2=side, mask_2=side_mask, image_4=wave)
    to_pil = lambda t: Image.fromarray((t[0].numpy() * 255).round().astype(np.uint8))  # noqa: E731
    squares = [prepare_reference(to_pil(front), "crop", front_mask[0]), prepare_reference(to_pil(side), "crop", side_mask[0]),
               prepare_reference(to_pil(wave), "crop")]
    assert _same_features(character, tiny_encoders.encode_squares(squares))
    assert prepared.shape == (3, 384, 384, 3)
    assert torch.equal(prepared[1], pil_to_tensor(squares[1].resize((384, 384))))


def test_encode_reference_refuses_a_mask_without_its_image(tiny_encoders):
    front, front_mask = _picture("reference_girl_front.png")
    side, side_mask = _picture("reference_girl_side.png")
    with pack_nodes() as nodes:
        encode = nodes.EncodeReference.execute
        with pytest.raises(ValueError, match="mask_3 is connected but image_3 is not"):
            encode(tiny_encoders, front, "pad", False, 0.1, "", image_2=side, mask_3=side_mask)
        with pytest.raises(ValueError, match=r"image_2 / mask_2: The mask is 512×768 but the image is 300×200"):
            encode(tiny_encoders, front, "pad", False, 0.1, "", image_2=_picture("reference_girl_side.png", (300, 200))[0],
                   mask_2=side_mask)
        with pytest.raises(ValueError, match="image_4 / mask_4: Got 1 images but 2 masks"):
            encode(tiny_encoders, front, "pad", False, 0.1, "", image_4=side, mask_4=torch.cat([side_mask, side_mask]))
        with pytest.raises(ValueError, match="weights lists 2 numbers but 3 pictures"):
            encode(tiny_encoders, front, "pad", False, 0.1, "1, 1", image_2=side, image_3=side)

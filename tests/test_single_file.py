"""FLUX.1-dev and SigLIP from ComfyUI's single files (tiny twins in ComfyUI's key layouts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from instantcharacter.errors import InstantCharacterError, ModelFolderError
from instantcharacter.files.building import read_source
from instantcharacter.files.checkpoint import TensorDict
from instantcharacter.files.encoder_files import load_reference_encoders
from instantcharacter.files.flux import assemble_flux, load_flux
from instantcharacter.files.identify import describe
from instantcharacter.files.single_file import bfl_sources, load_flux_transformer, load_siglip_vision
from generation import run as run_generation
from instantcharacter.testing.single_file import (write_lookalikes, write_random_bfl_flux, write_siglip_file,
                                                  write_single_file_twins, write_t5_file)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
RUN = dict(width=64, height=64, steps=2, seed=7, max_sequence_length=32)
PROMPT = "a girl in a red coat"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    return write_single_file_twins(tmp_path_factory.mktemp("single_files"))


@pytest.fixture(scope="module")
def lookalikes(twins, tmp_path_factory):
    return write_lookalikes(tmp_path_factory.mktemp("lookalikes"), twins["transformer"])


@pytest.fixture(scope="module")
def folder_flux(twins):
    return load_flux(twins["folder"], dtype=torch.float32)


def _assemble(twins, transformer="transformer", clip="clip_bf16", t5="t5_bf16", vae="vae", fp8=False):
    """assemble_flux on twins (names from write_single_file_twins) or on other files (paths)."""
    paths = [twins[f] if isinstance(f, str) else f for f in (transformer, clip, t5, vae)]
    return assemble_flux(*paths, twins["clip_tokenizer"], twins["t5_tokenizer"], torch.float32, fp8)


@pytest.fixture(scope="module")
def assembled(twins):
    return _assemble(twins)


@pytest.fixture(scope="module")
def features(tiny_encoders):
    return tiny_encoders.encode([Image.open(ASSETS / "reference_girl.png")])


def _states_equal(a, b, round_to=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        expected = sb[k].to(round_to).float() if round_to is not None else sb[k].float()
        assert torch.equal(sa[k].float(), expected), k


# --- conversion ---------------------------------------------------------------------------------------------

def test_bfl_mapping_agrees_with_diffusers_own_converter():
    """At the real width (3072) on thin tensors with unique values: our BFL → diffusers sources give exactly
    what diffusers' single-file converter gives (it hard-codes FLUX.1's width, so it cannot read tiny twins)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    h, rows = 3072, {}
    rows.update({"img_in": h, "txt_in": h, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * h})
    for emb in ("time_in", "vector_in", "guidance_in"):
        rows[f"{emb}.in_layer"] = rows[f"{emb}.out_layer"] = h
    for side in ("img", "txt"):
        rows.update({f"double_blocks.0.{side}_mod.lin": 6 * h, f"double_blocks.0.{side}_attn.qkv": 3 * h,
                     f"double_blocks.0.{side}_attn.proj": h, f"double_blocks.0.{side}_mlp.0": 4 * h,
                     f"double_blocks.0.{side}_mlp.2": h})
    rows.update({"single_blocks.0.modulation.lin": 3 * h, "single_blocks.0.linear1": 7 * h,
                 "single_blocks.0.linear2": h})
    sd, start = {}, 0
    for name, n in rows.items():
        for end, shape in (("weight", (n, 2)), ("bias", (n,))):
            size = torch.Size(shape).numel()
            sd[f"{name}.{end}"] = torch.arange(start, start + size, dtype=torch.float64).reshape(shape)
            start += size
    for norm in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        for which in ("query_norm", "key_norm"):
            sd[f"{norm}.{which}.scale"] = torch.arange(start, start + 128, dtype=torch.float64)
            start += 128
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    file = TensorDict("thin.safetensors", sd)
    ours = {name: read_source(file, source) for name, source in bfl_sources("", h, 1, 1).items()}
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_assembled_pipeline_holds_the_folder_weights(assembled, folder_flux):
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        _states_equal(getattr(assembled, component), getattr(folder_flux, component))
    assert assembled.text_encoder_2.shared.weight is assembled.text_encoder_2.encoder.embed_tokens.weight
    for key in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "use_dynamic_shifting"):
        assert assembled.scheduler.config[key] == folder_flux.scheduler.config[key]
    assert assembled.tokenizer(PROMPT).input_ids == folder_flux.tokenizer(PROMPT).input_ids
    assert assembled.tokenizer_2(PROMPT).input_ids == folder_flux.tokenizer_2(PROMPT).input_ids
    assert assembled.vae_scale_factor == folder_flux.vae_scale_factor


def test_same_seed_same_latents_as_the_folder_pipeline(assembled, folder_flux, tiny_adapter, features):
    for adapter, feats in ((None, None), (tiny_adapter, features)):
        ours = run_generation(assembled, adapter, feats, PROMPT, **RUN)
        ref = run_generation(folder_flux, adapter, feats, PROMPT, **RUN)
        assert torch.equal(ours.latents, ref.latents)
        assert torch.equal(ours.images, ref.images)


def test_fp16_text_encoders_as_comfyui_ships_them(twins, folder_flux):
    """clip_l / t5xxl_fp16 hold the weights rounded to fp16 (a few tiny bf16 values round): exactly those load."""
    flux = _assemble(twins, clip="clip", t5="t5")
    _states_equal(flux.text_encoder, folder_flux.text_encoder, round_to=torch.float16)
    _states_equal(flux.text_encoder_2, folder_flux.text_encoder_2, round_to=torch.float16)


def test_an_all_in_one_checkpoint_serves_every_slot(twins, folder_flux):
    flux = _assemble(twins, "checkpoint", "checkpoint", "checkpoint", "checkpoint")
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        _states_equal(getattr(flux, component), getattr(folder_flux, component))
    assert "FLUX.1-dev transformer inside a full checkpoint" in describe(twins["checkpoint"])


# --- fp8 ----------------------------------------------------------------------------------------------------

def test_fp8_files_stay_fp8_and_compute_like_their_upcast(twins):
    upcast = _assemble(twins, "transformer_fp8", t5="t5_fp8", fp8=False)
    stored = _assemble(twins, "transformer_fp8", t5="t5_fp8", fp8=True)
    auto = _assemble(twins, "transformer_fp8", t5="t5_fp8", fp8=None)
    assert {p.dtype for p in upcast.transformer.parameters()} == {torch.float32}
    for flux in (stored, auto):
        block = flux.transformer.transformer_blocks[0]
        assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn and block.attn.norm_q.weight.dtype == torch.float32
        assert flux.transformer.x_embedder.weight.dtype == torch.float32 and flux.transformer.dtype == torch.float32
        t5_ff = flux.text_encoder_2.encoder.block[0].layer[1].DenseReluDense
        assert t5_ff.wi_0.weight.dtype == torch.float8_e4m3fn and t5_ff.wo.weight.dtype == torch.float32
    reference = run_generation(upcast, None, None, PROMPT, **RUN).latents
    assert torch.equal(run_generation(stored, None, None, PROMPT, **RUN).latents, reference)
    # the block streamer's fp8 path takes the stored fp8 weights as they are
    assert torch.equal(run_generation(stored, None, None, PROMPT, fp8_storage=True, **RUN).latents, reference)
    assert stored.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_fp8_storage_of_a_bf16_file_equals_the_samplers_fp8_storage(twins, assembled):
    flux = _assemble(twins)
    flux.transformer = load_flux_transformer(twins["transformer"], torch.float32, fp8_storage=True)
    ours = run_generation(flux, None, None, PROMPT, **RUN).latents
    theirs = run_generation(assembled, None, None, PROMPT, fp8_storage=True, **RUN).latents
    assert torch.equal(ours, theirs)


def test_scaled_fp8_is_descaled_or_keeps_its_scale(twins, assembled):
    """ComfyUI's "scaled fp8": converted to the compute dtype it is de-scaled; kept as fp8 it keeps the file's
    values and scale (no second rounding), and the block streamer's fp8 path computes the same."""
    assert describe(twins["transformer_scaled_fp8"]).endswith("(scaled fp8)")
    descaled = _assemble(twins, "transformer_scaled_fp8", t5="t5_scaled_fp8", fp8=False)
    reference = assembled.transformer.state_dict()
    for name, value in descaled.transformer.state_dict().items():
        limit = 0.0625 * reference[name].abs().max()  # e4m3 keeps 3 mantissa bits: 2^-4 relative
        assert (value - reference[name]).abs().max() <= limit, name
        assert value.abs().max() <= 1.1 * reference[name].abs().max(), name  # de-scaled, not raw fp8 (up to 448)
    kept = _assemble(twins, "transformer_scaled_fp8", t5="t5_scaled_fp8", fp8=None)
    q = kept.transformer.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.float().abs().max() > 100 and q.weight_scale > 0
    assert kept.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight_scale > 0
    plain = run_generation(descaled, None, None, PROMPT, **RUN).latents
    ours = run_generation(kept, None, None, PROMPT, **RUN).latents
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(run_generation(kept, None, None, PROMPT, fp8_storage=True, **RUN).latents, ours)


MEASURE = r"""
import json, sys, threading, time
import accelerate, diffusers, safetensors, torch
from diffusers import FluxTransformer2DModel
from instantcharacter.files.single_file import load_flux_transformer

def anon():  # allocated memory; the file's own pages are memory-mapped (RssFile), not copies
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

peak, done = 0, False
def sample():
    global peak
    while not done:
        peak = max(peak, anon())
        time.sleep(0.0005)

dtype, fp8 = {"fp32": (torch.float32, False), "fp8": (torch.bfloat16, True)}[sys.argv[2]]
base = anon()
thread = threading.Thread(target=sample)
thread.start()
model = load_flux_transformer(sys.argv[1], dtype, fp8_storage=fp8)
done = True
thread.join()
peak = max(peak, anon())
print(json.dumps({"peak": peak - base, "held": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures RssAnon from /proc (Linux)")
def test_fp8_storage_never_holds_a_bf16_copy(tmp_path):
    """A 214 MB bf16 transformer loaded with fp8 storage allocates the fp8 model plus about one tensor.
    The control (an fp32 upcast, which must allocate everything) shows the measurement sees allocations."""
    path = write_random_bfl_flux(tmp_path / "flux1-dev-mid.safetensors", hidden=1024, double=2, single=2)
    file_bytes = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def measure(mode):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    fp32, fp8 = measure("fp32"), measure("fp8")
    assert fp32["peak"] > 0.9 * fp32["held"] > 1.7 * file_bytes  # the control: everything allocated
    assert fp8["held"] < 0.55 * file_bytes  # blocks in fp8, the small rest in bf16 (left memory-mapped)
    assert fp8["peak"] > 0.45 * file_bytes  # the fp8 blocks are allocated
    assert fp8["peak"] < 0.6 * file_bytes, (fp8, file_bytes)  # the fp8 model and one tensor: no bf16 copy


# --- wrong files --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot,kind,says", [
    ("transformer", "flux_schnell", "FLUX.1-schnell transformer (no guidance_in weights)"),
    ("transformer", "flux_fill", "FLUX.1 Fill transformer"),
    ("transformer", "sd3", "Stable Diffusion 3"),
    ("transformer", "sdxl", "SDXL UNet"),
    ("transformer", "t5", "T5"),
    ("clip", "t5", "T5 (width 32) text encoder"),
    ("clip", "clip_g", "CLIP-G (bigG) text encoder"),
    ("clip", "transformer", "FLUX.1-dev transformer"),
    ("t5", "clip", "CLIP-L text encoder"),
    ("t5", "t5_v1_0", "FLUX uses T5 v1.1"),
    ("vae", "vae_sdxl", "SD 1.x / SDXL VAE (4 latent channels)"),
    ("vae", "sdxl", "SDXL UNet"),
    ("vae", "clip", "CLIP-L text encoder"),
])
def test_a_wrong_file_is_named_and_described(twins, lookalikes, slot, kind, says):
    wrong = lookalikes.get(kind) or twins[kind]
    with pytest.raises(ModelFolderError) as err:
        _assemble(twins, **{slot: wrong})
    message = str(err.value)
    assert isinstance(err.value, InstantCharacterError)
    assert wrong.name in message and says in message, message
    assert "Pick " in message


def test_text_encoder_that_does_not_fit_the_transformer(twins, tmp_path):
    from transformers import T5Config, T5EncoderModel

    t5_xl_like = T5EncoderModel(T5Config(vocab_size=200, d_model=48, d_kv=16, d_ff=64, num_layers=1, num_heads=3,
                                         relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                         is_encoder_decoder=False))
    path = write_t5_file(t5_xl_like, tmp_path / "t5xl.safetensors")
    with pytest.raises(ModelFolderError, match="t5xl.safetensors gives text features of width 48, but "
                                                "flux1-dev.safetensors expects 32"):
        _assemble(twins, t5=path)


def test_unreadable_missing_and_gguf_files(twins, tmp_path):
    broken = tmp_path / "flux1-dev-broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    gguf = tmp_path / "flux1-dev-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    for path, says in ((broken, "cannot be read"), (gguf, "GGUF"), (tmp_path / "nope.safetensors", "does not exist")):
        with pytest.raises(ModelFolderError, match=says):
            _assemble(twins, transformer=path)


def test_tokenizer_folders_are_checked(twins):
    with pytest.raises(ModelFolderError, match="not a CLIP tokenizer folder"):
        assemble_flux(twins["transformer"], twins["clip"], twins["t5"], twins["vae"], twins["t5_tokenizer"],
                      twins["t5_tokenizer"], torch.float32)


# --- SigLIP -------------------------------------------------------------------------------------------------

def test_siglip_single_file_gives_the_folder_features(twins, tiny_models, tmp_path):
    from transformers import SiglipVisionModel

    folder_model = SiglipVisionModel.from_pretrained(twins["siglip_folder"])
    exact = write_siglip_file(folder_model, tmp_path / "sigclip_fp32.safetensors", torch.float32)
    image = [Image.open(ASSETS / "reference_girl.png")]
    from_folder = load_reference_encoders(twins["siglip_folder"], tiny_models["dinov2"])
    from_file = load_reference_encoders(exact, tiny_models["dinov2"])
    for a, b in zip(from_file.encode(image).tensors(), from_folder.encode(image).tensors()):
        assert torch.equal(a, b)
    squares = [image[0].resize((384, 384))]
    for a, b in zip(from_file.embed(squares), from_folder.embed(squares)):
        assert torch.equal(a, b)
    shipped = load_siglip_vision(twins["siglip"])  # fp16, as ComfyUI's file
    _states_equal(shipped, folder_model, round_to=torch.float16)


def test_siglip_file_without_pooling_head(twins, tiny_models, tmp_path):
    from transformers import SiglipVisionModel

    headless = write_siglip_file(SiglipVisionModel.from_pretrained(twins["siglip_folder"]),
                                 tmp_path / "sigclip_headless.safetensors", head=False)
    encoders = load_reference_encoders(headless, tiny_models["dinov2"])
    assert not encoders.siglip.config.vision_use_head
    siglip, dino = encoders.embed([Image.open(ASSETS / "reference_girl.png").resize((384, 384))])
    assert siglip.shape == (1, encoders.siglip.config.hidden_size) and torch.isfinite(siglip).all()


@pytest.mark.parametrize("kind,says", [
    ("clip_vision_l", "CLIP ViT-L/14 vision encoder"),
    ("siglip2_512", "SigLIP 2 so400m vision encoder (patch 16, 512 px"),
    ("siglip2_naflex", "SigLIP 2 NaFlex"),
    ("t5", "T5"),
])
def test_wrong_siglip_file_is_named_and_described(twins, lookalikes, kind, says):
    wrong = lookalikes.get(kind) or twins[kind]
    with pytest.raises(ModelFolderError) as err:
        load_siglip_vision(wrong)
    assert wrong.name in str(err.value) and says in str(err.value) and "sigclip_vision_patch14_384" in str(err.value)


def test_bfl_writer_matches_the_hand_written_layout(tmp_path):
    """The twins' BFL writer (the loader's table run backwards) gives exactly the keys and shapes that
    write_random_bfl_flux lists by hand from BFL's layout, and the loader reads it back exactly."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from instantcharacter.files.single_file import load_flux_transformer
    from instantcharacter.testing.single_file import bfl_flux_state_dict, write_flux_file

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    written = bfl_flux_state_dict(model)
    with safe_open(str(write_random_bfl_flux(tmp_path / "ref.safetensors", hidden=256, double=2, single=2)),
                   "pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in written.items()} == expected
    loaded = load_flux_transformer(write_flux_file(model, tmp_path / "twin.safetensors", storage=torch.float32),
                                   dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

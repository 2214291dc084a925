"""Several characters in one picture on the pipeline path: regions on the token grid, the character term in each
attention layer, whole generations, and the Character Region / Combine Characters / Blend nodes."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from generation import run as run_generation
from instantcharacter.errors import InputError
from instantcharacter.model.processors import attach
from instantcharacter.run.tokens import character_tokens
from instantcharacter.reference.character import Characters, RegionalCharacter, characters_in
from instantcharacter.run.regions import character_weights
from schema_reader import pack_nodes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WIDTH, HEIGHT = 128, 64  # 16×8 latent: a 4 × 8 grid of generated tokens
GRID = (HEIGHT // 16, WIDTH // 16)
COLUMNS = torch.arange(GRID[0] * GRID[1]) % GRID[1]  # row-major tokens
IN_LEFT, IN_RIGHT = COLUMNS < GRID[1] // 2, COLUMNS >= GRID[1] // 2


def _halves():
    left = torch.zeros(1, HEIGHT, WIDTH)
    left[..., : WIDTH // 2] = 1.0
    return left, 1.0 - left


@pytest.fixture(scope="module")
def waving(tiny_encoders):
    return tiny_encoders.encode([Image.open(ASSETS / "reference_girl_wave.png")])


# --- regions on the token grid ----------------------------------------------------------------------------------

def test_weights_follow_the_token_grid_keep_soft_masks_and_share_overlaps(girl, waving):
    left, right = _halves()
    (_, a), (_, b) = character_weights((RegionalCharacter(girl, left), RegionalCharacter(waving, right)), GRID)
    assert torch.equal(a, IN_LEFT.float()) and torch.equal(b, IN_RIGHT.float())

    # overlapping in the middle quarter: each has half there, all elsewhere in its region
    wide_left = torch.zeros(HEIGHT, WIDTH)
    wide_left[:, : 3 * WIDTH // 4] = 1.0
    wide_right = torch.zeros(HEIGHT, WIDTH)
    wide_right[:, WIDTH // 4:] = 1.0
    overlapping = (RegionalCharacter(girl, wide_left), RegionalCharacter(waving, wide_right))
    (_, a), (_, b) = character_weights(overlapping, GRID)
    both = (COLUMNS >= 2) & (COLUMNS < 6)
    assert torch.equal(a[both], torch.full((int(both.sum()),), 0.5)) and torch.equal(b[both], a[both])
    assert torch.equal(a[COLUMNS < 2], torch.ones(8)) and torch.equal(b[COLUMNS < 2], torch.zeros(8))
    assert torch.equal(a + b, torch.ones(32))  # never past the character strength

    # a soft mask stays soft where nothing overlaps; strength scales it; strength 0 takes no share
    soft = torch.full((HEIGHT, WIDTH), 0.3)
    [(_, s)] = character_weights((RegionalCharacter(girl, soft, strength=0.5),), GRID)
    torch.testing.assert_close(s, torch.full((32,), 0.15))
    weights = character_weights((RegionalCharacter(girl, wide_left), RegionalCharacter(waving, wide_right, 0.0)), GRID)
    assert len(weights) == 1 and torch.equal(weights[0][1], (COLUMNS < 6).float())

    # no region: everywhere, never shared; at strength 1 no weight at all (the lone character of today)
    [(_, none), (_, ones)] = character_weights((RegionalCharacter(girl), RegionalCharacter(waving, wide_left)), GRID)
    assert none is None and torch.equal(ones, (COLUMNS < 6).float())
    [(_, strong)] = character_weights(characters_in(RegionalCharacter(girl, strength=1.5)), GRID)
    assert torch.equal(strong, torch.full((32,), 1.5))
    assert characters_in(girl)[0].features is girl and characters_in(girl)[0].mask is None


# --- the character term in one attention layer ------------------------------------------------------------------

def _layer_inputs(tiny_flux, text_len=5):
    g = torch.Generator().manual_seed(11)
    width = tiny_flux.transformer.inner_dim
    n = GRID[0] * GRID[1]
    return torch.randn(2, n, width, generator=g), torch.randn(2, text_len, width, generator=g)


def _layer_out(tiny_flux, tiny_adapter, kind, image, text, **context):
    """The attention output of the first double (image part, before its output projection) or single block
    (image positions), with the character context given."""
    transformer = tiny_flux.transformer
    block = transformer.transformer_blocks[0] if kind == "double" else transformer.single_transformer_blocks[0]
    seen = {}
    with torch.inference_mode(), attach(transformer, tiny_adapter) as att:
        att.context.image_seq_len = image.shape[1]
        att.context.layer_scales = dict.fromkeys(range(tiny_adapter.num_layers), 0.9)
        for name, value in context.items():
            setattr(att.context, name, value)
        if kind == "double":
            hook = block.attn.to_out[0].register_forward_pre_hook(lambda m, args: seen.update(out=args[0].clone()))
            try:
                block.attn(hidden_states=image, encoder_hidden_states=text)
            finally:
                hook.remove()
            return seen["out"]
        return block.attn(hidden_states=torch.cat([text, image], dim=1))[:, text.shape[1]:]


@pytest.mark.parametrize("kind", ["double", "single"])
def test_the_character_term_is_zero_outside_its_region_and_unchanged_inside(tiny_flux, tiny_adapter, girl, waving,
                                                                            kind):
    image, text = _layer_inputs(tiny_flux)
    a = character_tokens(tiny_adapter, girl, torch.tensor([600.0]), torch.float32)[0]
    b = character_tokens(tiny_adapter, waving, torch.tensor([600.0]), torch.float32)[0]
    (_, left), (_, right) = character_weights(characters_in(Characters(tuple(
        RegionalCharacter(f, m) for f, m in zip((girl, waving), _halves())))), GRID)

    def out(**context):
        return _layer_out(tiny_flux, tiny_adapter, kind, image, text, **context)

    plain, a_full, b_full = out(), out(characters=((a, None),)), out(characters=((b, None),))
    assert (a_full - plain).abs().max() > 1e-3 and (a_full - b_full).abs().max() > 1e-3
    a_left = out(characters=((a, left),))
    assert torch.equal(a_left[:, IN_RIGHT], plain[:, IN_RIGHT])  # exactly nothing outside
    assert torch.equal(a_left[:, IN_LEFT], a_full[:, IN_LEFT])  # exactly the whole-picture character inside
    both = out(characters=((a, left), (b, right)))
    assert torch.equal(both[:, IN_LEFT], a_full[:, IN_LEFT]) and torch.equal(both[:, IN_RIGHT], b_full[:, IN_RIGHT])
    # an all-ones region is the character everywhere, bit for bit
    assert torch.equal(out(characters=((a, torch.ones(32)),)), a_full)
    # a soft region scales the term
    half = out(characters=((a, torch.full((32,), 0.5)),))
    torch.testing.assert_close(half - plain, (a_full - plain) / 2, atol=1e-6, rtol=1e-5)


# --- whole generations -------------------------------------------------------------------------------------------

def _run(flux, adapter, character, **kw):
    args = dict(width=WIDTH, height=HEIGHT, steps=3, seed=7, max_sequence_length=32)
    args.update(kw)
    return run_generation(flux, adapter, character, "two girls side by side", **args).latents


def _halves_of(latents):
    w = latents.shape[-1]
    return latents[..., : w // 2], latents[..., w // 2:]


def test_an_all_ones_region_is_todays_result_bit_for_bit(tiny_flux, tiny_adapter, girl):
    today = _run(tiny_flux, tiny_adapter, girl)
    assert torch.equal(_run(tiny_flux, tiny_adapter, RegionalCharacter(girl, torch.ones(1, HEIGHT, WIDTH))), today)
    assert torch.equal(_run(tiny_flux, tiny_adapter, Characters((RegionalCharacter(girl),))), today)
    # the same character twice over the whole picture: the overlap is shared, so it is one character's strength
    twice = Characters((RegionalCharacter(girl, torch.ones(HEIGHT, WIDTH)),) * 2)
    assert torch.equal(_run(tiny_flux, tiny_adapter, twice), today)
    # without regions nothing is shared: twice the strength
    assert torch.equal(_run(tiny_flux, tiny_adapter, Characters((RegionalCharacter(girl),) * 2)),
                       _run(tiny_flux, tiny_adapter, girl, subject_scale=1.8))
    assert torch.equal(_run(tiny_flux, tiny_adapter, RegionalCharacter(girl, strength=2.0)),
                       _run(tiny_flux, tiny_adapter, girl, subject_scale=1.8))


def test_two_characters_in_complementary_halves_each_move_their_half(tiny_flux, tiny_adapter, girl, waving):
    left, right = _halves()
    plain = _run(tiny_flux, tiny_adapter, girl, subject_scale=0.0)
    a_left = _run(tiny_flux, tiny_adapter, RegionalCharacter(girl, left))
    b_right = _run(tiny_flux, tiny_adapter, RegionalCharacter(waving, right))
    both = _run(tiny_flux, tiny_adapter, Characters((RegionalCharacter(girl, left), RegionalCharacter(waving, right))))

    def moved(x, y):
        return [(p - q).abs().mean().item() for p, q in zip(_halves_of(x), _halves_of(y))]

    a_moves, b_moves = moved(a_left, plain), moved(b_right, plain)
    near_a, near_b = moved(both, a_left), moved(both, b_right)
    print(f"\nmean |change| of the left / right half: A on the left {a_moves[0]:.3f} / {a_moves[1]:.3f}, "
          f"B on the right {b_moves[0]:.3f} / {b_moves[1]:.3f}; both vs A-only {near_a[0]:.3f} / {near_a[1]:.3f}, "
          f"both vs B-only {near_b[0]:.3f} / {near_b[1]:.3f}")
    # a character moves its own half several times more than the other (attention carries a little across)
    assert a_moves[0] > 2.5 * a_moves[1] and b_moves[1] > 2.5 * b_moves[0]
    # with both, each half is close to the run with its own character alone and far from the other one's
    assert near_a[0] * 2.5 < near_b[0] and near_b[1] * 2.5 < near_a[1]


def test_region_masks_are_checked_before_anything_runs(tiny_flux, tiny_adapter, girl):
    calls = []
    for mask, message in ((torch.ones(2, HEIGHT, WIDTH), "one mask"), (torch.ones(HEIGHT), "2-D"),
                          (torch.full((HEIGHT, WIDTH), float("nan")), "NaN")):
        with pytest.raises(InputError, match=message):
            _run(tiny_flux, tiny_adapter, RegionalCharacter(girl, mask), on_step=lambda s, t, _: calls.append(s))
    assert not calls


# --- nodes ------------------------------------------------------------------------------------------------------

def test_region_and_combine_nodes_give_the_sampler_what_generate_takes(tiny_flux, tiny_adapter, girl, waving):
    # the nodes are a second copy of the pack (its own InputError class): errors are matched as ValueError
    left, right = _halves()
    with pack_nodes() as nodes:
        a = nodes.CharacterRegion.execute(girl, left, 1.0)[0]
        b = nodes.CharacterRegion.execute(waving, right, 0.5)[0]
        combined = nodes.CombineCharacters.execute(a, b)[0]
        nested = nodes.CombineCharacters.execute(combined, girl)[0]
        members = nested.members()
        assert [m.strength for m in members] == [1.0, 0.5, 1.0] and members[2].mask is None
        assert members[0].features is girl and torch.equal(members[0].mask, left[0])
        expected = Characters((RegionalCharacter(girl, left), RegionalCharacter(waving, right, 0.5)))
        assert torch.equal(_run(tiny_flux, tiny_adapter, combined), _run(tiny_flux, tiny_adapter, expected))

        with pytest.raises(ValueError, match="black everywhere"):
            nodes.CharacterRegion.execute(girl, torch.zeros(1, HEIGHT, WIDTH), 1.0)
        with pytest.raises(ValueError, match="one mask"):
            nodes.CharacterRegion.execute(girl, torch.ones(3, HEIGHT, WIDTH), 1.0)
        with pytest.raises(ValueError, match="already has a region"):
            nodes.CharacterRegion.execute(a, right, 1.0)
        with pytest.raises(ValueError, match="combined characters"):
            nodes.CharacterRegion.execute(combined, right, 1.0)
        with pytest.raises(ValueError, match="Blend Characters works on characters without a region.*with a region"):
            nodes.BlendCharacters.execute(a, waving, 0.5)
        with pytest.raises(ValueError, match="Blend Characters.*combined characters"):
            nodes.BlendCharacters.execute(girl, combined, 0.5)
        with pytest.raises(ValueError, match="Save Character works on characters without a region.*with a region"):
            nodes.SaveCharacter.execute(a, "regional")
        with pytest.raises(ValueError, match="Save Character.*combined characters"):
            nodes.SaveCharacter.execute(combined, "combined")
        blended = nodes.BlendCharacters.execute(girl, waving, 0.25)[0]
        assert torch.allclose(blended.low_res_deep, 0.75 * girl.low_res_deep + 0.25 * waving.low_res_deep)

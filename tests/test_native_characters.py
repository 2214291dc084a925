"""The characters of the native path without ComfyUI: what a run keeps between model calls, and what one call
computes (keys and values once per character, rows no character acts on left out)."""

import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def features(tiny_encoders):
    return tiny_encoders.encode([Image.open(Path(__file__).resolve().parents[1] / "assets" / "reference_girl.png")])


def _call(run, adapters, negative_rows, sigma=0.6, grid=(2, 3)):
    from instantcharacter.run.native_characters import CallState

    state = CallState(sigma=sigma, negative_rows=tuple(negative_rows), text_len=4, grid=grid,
                      image_tokens=grid[0] * grid[1], device=CPU)
    return run.call(state, adapters)


def test_a_run_keeps_one_sigmas_tokens_and_projects_each_sigma_once(tiny_adapter, features, monkeypatch):
    """What a character holds on the device between model calls: one token set (the negative and positive
    passes of a step share it) and the merged features, not one set per step."""
    from instantcharacter.run.native_characters import AppliedCharacter, CharacterSet

    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    run = CharacterSet((entry,)).run()
    merged, projected = [], []  # weak references to every tensor the projector made
    proj = tiny_adapter.image_proj
    merge, tokens = proj.merge_features, proj.tokens

    def made(kept, tensor):
        kept.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(proj, "merge_features", lambda *a: made(merged, merge(*a)))
    monkeypatch.setattr(proj, "tokens", lambda *a: made(projected, tokens(*a)))
    for sigma in (1.0, 1.0, 0.75, 0.75, 0.5, 0.25):  # cond and uncond called apart at each sigma
        run.tokens.tokens(entry, tiny_adapter, sigma, CPU)
        gc.collect()
        alive = [sum(ref() is not None for ref in kept) for kept in (merged, projected)]
        assert alive == [1, 1]  # between calls the run keeps the merged features and this sigma's tokens
    assert len(merged) == 1 and len(projected) == 4


def test_keys_and_values_are_projected_once_per_call_for_every_row(tiny_adapter, features):
    """Batch 4 (two cond and two uncond rows): each layer projects the character's keys and values once, from
    one token row, and the result equals projecting them for every row (as before) within float rounding."""
    from instantcharacter.run.native_characters import AppliedCharacter, CharacterSet

    run = CharacterSet((AppliedCharacter(tiny_adapter, features, 0.9),)).run()
    call = _call(run, [tiny_adapter], (False, False, True, True))
    rows_projected = []
    hooks = [layer.to_k_ip.register_forward_hook(lambda m, i, o: rows_projected.append(i[0].shape[0]))
             for layer in tiny_adapter.ip_adapter]
    query = torch.randn(4, 6, tiny_adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    try:
        deltas = [call.delta(i, query) for i in range(tiny_adapter.num_layers)]
    finally:
        for h in hooks:
            h.remove()
    assert rows_projected == [1] * tiny_adapter.num_layers
    tokens = run.tokens.tokens(call.acting[0].entry, tiny_adapter, 0.6, CPU)
    for i, delta in enumerate(deltas):
        layer = tiny_adapter.ip_adapter[i]
        per_row = layer.attend(query, *layer.keys_values(tokens.expand(4, -1, -1))) * 0.9
        assert (delta - per_row).abs().max() <= 1e-6


def test_rows_no_character_acts_on_are_left_out(tiny_adapter, features):
    """A character off on the negative pass computes its attention for the positive rows only; a second one
    that acts on every row still gets its share on all of them."""
    from instantcharacter.run.native_characters import AppliedCharacter, CharacterSet

    positive_only = AppliedCharacter(tiny_adapter, features, 0.9, on_negative=False)
    everywhere = AppliedCharacter(tiny_adapter, features, 0.5)
    query = torch.randn(4, 6, tiny_adapter.hidden_size, generator=torch.Generator().manual_seed(2))
    seen = []
    hook = tiny_adapter.ip_adapter[0].norm_ip_q.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        alone = _call(CharacterSet((positive_only,)).run(), [tiny_adapter], (False, False, True, True))
        assert alone.rows.tolist() == [0, 1]
        assert alone.delta(0, query).shape[0] == 2 and seen == [2]
        both = _call(CharacterSet((positive_only, everywhere)).run(), [tiny_adapter] * 2, (False, False, True, True))
        assert both.rows == slice(None)
        delta = both.delta(0, query)
    finally:
        hook.remove()
    tokens = both.run.tokens.tokens(everywhere, tiny_adapter, 0.6, CPU)
    layer = tiny_adapter.ip_adapter[0]
    expected = layer(query, tokens) * 0.5
    expected[:2] += layer(query[:2], tokens) * 0.9
    assert (delta - expected).abs().max() <= 1e-6
    assert torch.equal(delta[2:], layer(query, tokens)[2:] * 0.5)  # exactly the second character there


def test_concurrent_calls_on_two_adapter_copies_get_their_own_tokens(tiny_adapter, features):
    """Two threads (two devices' calls) asking one run for tokens at once, each for its own adapter copy: every
    answer is computed by and for its copy, and each copy's sigma is projected once."""
    import copy

    from instantcharacter.run.native_characters import AppliedCharacter, CharacterSet

    other = copy.deepcopy(tiny_adapter)
    with torch.no_grad():
        for p in other.image_proj.parameters():
            p.mul_(1.01)
    entry = AppliedCharacter(tiny_adapter, features, 0.9)
    run = CharacterSet((entry,)).run()
    expected = {id(a): run.tokens.tokens(entry, a, 0.5, CPU).clone() for a in (tiny_adapter, other)}
    assert not torch.equal(*expected.values())
    barrier, errors, results = threading.Barrier(2), [], []

    def ask(adapter):
        try:
            barrier.wait()
            for sigma in (0.4, 0.3, 0.5) * 5:
                tokens = run.tokens.tokens(entry, adapter, sigma, CPU)
                if sigma == 0.5:
                    results.append(torch.equal(tokens, expected[id(adapter)]))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(a,)) for a in (tiny_adapter, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [True] * 10

"""The native path: character attention inside ComfyUI's own FLUX blocks, as "dit" block-replace patches.

The character attention must be added to the image part of a block's attention output *before* the
block's output projection, which no ComfyUI hook exposes, so the patch runs the block's forward itself with
the block's own modules (their casting and low-VRAM handling included), mirroring
``comfy/ldm/flux/layers.py`` step for step, and adds the character where the official processor does. With
no active character it calls the original block, so the output is exactly the unpatched one.
"""

from __future__ import annotations

import torch
from comfy.ldm.flux.layers import apply_mod
from comfy.ldm.flux.math import attention

from ..instantcharacter.run.native import CharacterEntry


def _character(entries, layer_index, raw_query, options, weights):
    """Sum of every active entry's character attention for one layer, [B, L_img, hidden]."""
    total = None
    for entry, rows in zip(entries, weights):
        out = entry.attention(layer_index, raw_query, options) * rows.to(raw_query)[:, None, None]
        total = out if total is None else total + out
    return total


def double_block(block, args, entries, weights, layer_index):
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    attn_mask, options = args.get("attn_mask"), args.get("transformer_options", {})
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)

    img_modulated = apply_mod(block.img_norm1(img), (1 + img_mod1.scale), img_mod1.shift, None)
    img_qkv = block.img_attn.qkv(img_modulated)
    img_q, img_k, img_v = img_qkv.view(img_qkv.shape[0], img_qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)

    txt_modulated = apply_mod(block.txt_norm1(txt), (1 + txt_mod1.scale), txt_mod1.shift, None)
    txt_qkv = block.txt_attn.qkv(txt_modulated)
    txt_q, txt_k, txt_v = txt_qkv.view(txt_qkv.shape[0], txt_qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)

    if block.flipped_img_txt:
        attn = attention(torch.cat((img_q, txt_q), dim=2), torch.cat((img_k, txt_k), dim=2),
                         torch.cat((img_v, txt_v), dim=2), pe=pe, mask=attn_mask, transformer_options=options)
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
    else:
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe=pe, mask=attn_mask, transformer_options=options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

    # the raw image query: the q third of the fused qkv projection, before q-norm and RoPE
    raw_query = img_qkv[..., : block.hidden_size]
    img_attn = img_attn + _character(entries, layer_index, raw_query, options, weights).to(img_attn.dtype)

    img = img + apply_mod(block.img_attn.proj(img_attn), img_mod1.gate, None, None)
    img = img + apply_mod(block.img_mlp(apply_mod(block.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift, None)),
                          img_mod2.gate, None, None)
    txt += apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate, None, None)
    txt += apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift, None)),
                     txt_mod2.gate, None, None)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": img, "txt": txt}


def single_block(block, args, entries, weights, layer_index, text_len):
    x, vec, pe = args["img"], args["vec"], args["pe"]
    attn_mask, options = args.get("attn_mask"), args.get("transformer_options", {})
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(apply_mod(block.pre_norm(x), (1 + mod.scale), mod.shift, None)),
                           [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=options)

    # [text ; image] in single blocks: the character acts on the image positions only
    raw_query = qkv[:, text_len:, : block.hidden_size]
    extra = _character(entries, layer_index, raw_query, options, weights).to(attn.dtype)
    attn = torch.cat((attn[:, :text_len], attn[:, text_len:] + extra), dim=1)

    output = block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))
    x += apply_mod(output, mod.gate, None, None)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": x}


class CharacterBlockPatch:
    """A "dit" replace patch for one double or single block. It holds every character applied to the model
    (two Apply nodes in a row add up) and the replace patch that was there before, which it wraps."""

    def __init__(self, kind: str, index: int, block, layer_index: int, entries: list[CharacterEntry],
                 previous=None, text_len_source: dict | None = None):
        self.kind, self.index, self.block, self.layer_index = kind, index, block, layer_index
        self.entries = entries
        self.previous = previous
        self.text_len_source = text_len_source if text_len_source is not None else {}

    def extended(self, entry: CharacterEntry) -> "CharacterBlockPatch":
        return CharacterBlockPatch(self.kind, self.index, self.block, self.layer_index, self.entries + [entry],
                                   self.previous, self.text_len_source)

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on clone(); the modules and adapters here are shared, not copied.
        return CharacterBlockPatch(self.kind, self.index, self.block, self.layer_index, list(self.entries),
                                   self.previous, self.text_len_source)

    def __call__(self, args, extra):
        original = extra["original_block"]
        options = args.get("transformer_options", {})
        batch = args["img"].shape[0]
        if self.kind == "double":
            # single blocks see [text ; image]; remember the text length of this forward for them
            self.text_len_source["text_len"] = args["txt"].shape[1]
        active = [(e, w) for e in self.entries if (w := e.row_weights(options, batch)) is not None]

        def with_character(block_args):
            entries, weights = [e for e, _ in active], [w for _, w in active]
            if self.kind == "double":
                return double_block(self.block, block_args, entries, weights, self.layer_index)
            return single_block(self.block, block_args, entries, weights, self.layer_index,
                                self.text_len_source["text_len"])

        inner = with_character if active else original
        if self.previous is not None:
            return self.previous(args, {**extra, "original_block": inner})
        return inner(args)

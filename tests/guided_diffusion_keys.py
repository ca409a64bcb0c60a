"""The parameter list of guided-diffusion's UNetModel (the ADM of openai/consistency_models),
written from its structure independently of ``models/adm.py``: keys and torch shapes, for
tests that need a state dict in the released format without torch."""

import numpy as np


def openai_state_dict(model, image_size, make):
    """{key: make(shape)} for every parameter of guided-diffusion's UNetModel with these
    hyperparameters (learn_sigma off, resblock_updown, 1x1 skip convolutions)."""
    mc, emb = model.model_channels, 4 * model.model_channels
    sd = {}

    def add(key, *shape):
        sd[key] = make(shape)

    def resblock(prefix, cin, cout):
        add(f"{prefix}.in_layers.0.weight", cin), add(f"{prefix}.in_layers.0.bias", cin)
        (
            add(f"{prefix}.in_layers.2.weight", cout, cin, 3, 3),
            add(f"{prefix}.in_layers.2.bias", cout),
        )
        film = 2 * cout if model.use_scale_shift_norm else cout
        add(f"{prefix}.emb_layers.1.weight", film, emb), add(f"{prefix}.emb_layers.1.bias", film)
        add(f"{prefix}.out_layers.0.weight", cout), add(f"{prefix}.out_layers.0.bias", cout)
        add(f"{prefix}.out_layers.3.weight", cout, cout, 3, 3)
        add(f"{prefix}.out_layers.3.bias", cout)
        if cin != cout:
            add(f"{prefix}.skip_connection.weight", cout, cin, 1, 1)
            add(f"{prefix}.skip_connection.bias", cout)

    def attention(prefix, ch):
        add(f"{prefix}.norm.weight", ch), add(f"{prefix}.norm.bias", ch)
        add(f"{prefix}.qkv.weight", 3 * ch, ch, 1), add(f"{prefix}.qkv.bias", 3 * ch)
        add(f"{prefix}.proj_out.weight", ch, ch, 1), add(f"{prefix}.proj_out.bias", ch)

    add("time_embed.0.weight", emb, mc), add("time_embed.0.bias", emb)
    add("time_embed.2.weight", emb, emb), add("time_embed.2.bias", emb)
    if model.num_classes:
        add("label_emb.weight", model.num_classes, emb)
    ch = mc * model.ch_mult[0]
    add("input_blocks.0.0.weight", ch, 3, 3, 3), add("input_blocks.0.0.bias", ch)
    chans, size, index = [ch], image_size, 1
    for level, mult in enumerate(model.ch_mult):
        for _ in range(model.num_res_blocks):
            resblock(f"input_blocks.{index}.0", ch, mc * mult)
            ch = mc * mult
            if size in model.attn_resolutions:
                attention(f"input_blocks.{index}.1", ch)
            chans.append(ch)
            index += 1
        if level != len(model.ch_mult) - 1:
            resblock(f"input_blocks.{index}.0", ch, ch)
            chans.append(ch)
            size, index = size // 2, index + 1
    resblock("middle_block.0", ch, ch), attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    index = 0
    for level, mult in reversed(list(enumerate(model.ch_mult))):
        for i in range(model.num_res_blocks + 1):
            resblock(f"output_blocks.{index}.0", ch + chans.pop(), mc * mult)
            ch, position = mc * mult, 1
            if size in model.attn_resolutions:
                attention(f"output_blocks.{index}.1", ch)
                position = 2
            if level and i == model.num_res_blocks:
                resblock(f"output_blocks.{index}.{position}", ch, ch)
                size *= 2
            index += 1
    add("out.0.weight", ch), add("out.0.bias", ch)
    add("out.2.weight", 3, ch, 3, 3), add("out.2.bias", 3)
    return sd


def random_arrays(seed):
    rng = np.random.default_rng(seed)
    return lambda shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)

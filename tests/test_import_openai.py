"""Importing released openai/consistency_models (guided-diffusion ADM) state dicts.

The reference here is written from guided-diffusion's ``UNetModel`` structure, independently of
``models/adm.py``'s names: `openai_state_dict` lists the keys and torch shapes that UNetModel
creates, and the blocks are recomputed with torch.nn.functional on the torch-layout tensors
(convolutions OIHW, the attention's 1-D convolutions [O, I, 1], linear layers [out, in], and the
flash attention's qkv channels as (q|k|v, head, channel), which the released files use).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from guided_diffusion_keys import openai_state_dict, random_arrays

from cm_jax import import_openai, models, runs, train_state
from cm_jax.generate import Generator
from cm_jax.models import adm
from configs import cifar10_cd_lpips, common, imagenet64_cd, imagenet64_edm, lsun256_cd

torch = pytest.importorskip("torch")
F = torch.nn.functional


# --------------------------------------------------------------------------- the reference
def _torch_group_norm(x, sd, prefix):
    return F.group_norm(x, 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def torch_flash_attention(x, sd, prefix, heads):
    """guided-diffusion's AttentionBlock with QKVFlashAttention, on NCHW torch tensors."""
    b, c, h, w = x.shape
    t, d = h * w, c // heads
    flat = x.reshape(b, c, t)
    qkv = F.conv1d(
        _torch_group_norm(flat, sd, f"{prefix}.norm"),
        sd[f"{prefix}.qkv.weight"],
        sd[f"{prefix}.qkv.bias"],
    )  # [B, 3C, T]
    q, k, v = qkv.reshape(b, 3, heads, d, t).unbind(1)  # (three, h, d)
    logits = torch.einsum("bhdt,bhds->bhts", q, k) / d**0.5
    out = torch.einsum("bhts,bhds->bhdt", logits.softmax(-1), v).reshape(b, c, t)
    out = F.conv1d(out, sd[f"{prefix}.proj_out.weight"], sd[f"{prefix}.proj_out.bias"])
    return (flat + out).reshape(b, c, h, w)


def torch_res_block(x, emb, sd, prefix):
    """guided-diffusion's ResBlock with use_scale_shift_norm, no resampling, on NCHW."""
    h = F.conv2d(
        F.silu(_torch_group_norm(x, sd, f"{prefix}.in_layers.0")),
        sd[f"{prefix}.in_layers.2.weight"],
        sd[f"{prefix}.in_layers.2.bias"],
        padding=1,
    )
    e = F.linear(
        F.silu(emb), sd[f"{prefix}.emb_layers.1.weight"], sd[f"{prefix}.emb_layers.1.bias"]
    )
    scale, shift = e[:, :, None, None].chunk(2, dim=1)
    h = _torch_group_norm(h, sd, f"{prefix}.out_layers.0") * (1 + scale) + shift
    h = F.conv2d(
        F.silu(h), sd[f"{prefix}.out_layers.3.weight"], sd[f"{prefix}.out_layers.3.bias"], padding=1
    )
    skip = F.conv2d(x, sd[f"{prefix}.skip_connection.weight"], sd[f"{prefix}.skip_connection.bias"])
    return skip + h


def torch_unet(x, timesteps, labels, sd, model, image_size):
    """guided-diffusion's UNetModel.forward on NCHW, walking the blocks in the order that
    `openai_state_dict` lists them (flash attention, resblock up/down without convolutions)."""
    mc = model.model_channels
    half = mc // 2
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(
        F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
        sd["time_embed.2.weight"],
        sd["time_embed.2.bias"],
    )
    if model.num_classes:
        emb = emb + sd["label_emb.weight"][labels]

    def heads(ch):
        return ch // model.num_head_channels

    def resblock(h, prefix, resample=None):
        x = h
        h = F.silu(_torch_group_norm(h, sd, f"{prefix}.in_layers.0"))
        if resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        h = F.conv2d(
            h, sd[f"{prefix}.in_layers.2.weight"], sd[f"{prefix}.in_layers.2.bias"], padding=1
        )
        e = F.linear(
            F.silu(emb), sd[f"{prefix}.emb_layers.1.weight"], sd[f"{prefix}.emb_layers.1.bias"]
        )[:, :, None, None]
        if model.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = _torch_group_norm(h, sd, f"{prefix}.out_layers.0") * (1 + scale) + shift
        else:
            h = _torch_group_norm(h + e, sd, f"{prefix}.out_layers.0")
        h = F.conv2d(
            F.silu(h),
            sd[f"{prefix}.out_layers.3.weight"],
            sd[f"{prefix}.out_layers.3.bias"],
            padding=1,
        )
        if f"{prefix}.skip_connection.weight" in sd:
            x = F.conv2d(
                x, sd[f"{prefix}.skip_connection.weight"], sd[f"{prefix}.skip_connection.bias"]
            )
        return x + h

    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, size, index = [h], image_size, 1
    for level in range(len(model.ch_mult)):
        for _ in range(model.num_res_blocks):
            h = resblock(h, f"input_blocks.{index}.0")
            if size in model.attn_resolutions:
                h = torch_flash_attention(h, sd, f"input_blocks.{index}.1", heads(h.shape[1]))
            hs.append(h)
            index += 1
        if level != len(model.ch_mult) - 1:
            h = resblock(h, f"input_blocks.{index}.0", "down")
            hs.append(h)
            size, index = size // 2, index + 1
    h = resblock(h, "middle_block.0")
    h = torch_flash_attention(h, sd, "middle_block.1", heads(h.shape[1]))
    h = resblock(h, "middle_block.2")
    index = 0
    for level in reversed(range(len(model.ch_mult))):
        for i in range(model.num_res_blocks + 1):
            h = resblock(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{index}.0")
            position = 1
            if size in model.attn_resolutions:
                h = torch_flash_attention(h, sd, f"output_blocks.{index}.1", heads(h.shape[1]))
                position = 2
            if level and i == model.num_res_blocks:
                h = resblock(h, f"output_blocks.{index}.{position}", "up")
                size *= 2
            index += 1
    h = F.silu(_torch_group_norm(h, sd, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def _block_params(sd, prefix, names, model_config, qkv_layout="flash"):
    """The Flax parameters of one block, converted key by key by the importer."""
    params = {}
    for module, leaves in names.items():
        params[module] = {}
        for leaf in leaves:
            path = (module, leaf)
            key = import_openai.torch_key(("block",) + path).replace("block.", f"{prefix}.", 1)
            params[module][leaf] = import_openai.to_flax(sd[key], path, model_config, qkv_layout)
    return params


# --------------------------------------------------------------------------- tests
def test_torch_keys_follow_the_state_dict_names():
    assert (
        import_openai.torch_key(("input_blocks_1_0", "in_layers_2", "kernel"))
        == "input_blocks.1.0.in_layers.2.weight"
    )
    assert import_openai.torch_key(("label_emb", "embedding")) == "label_emb.weight"
    assert (
        import_openai.torch_key(("output_blocks_5_2", "skip_connection", "bias"))
        == "output_blocks.5.2.skip_connection.bias"
    )
    assert import_openai.torch_key(("out_0", "scale")) == "out.0.weight"


def test_flash_attention_weights_give_the_flash_block():
    model = common.tiny_adm()  # 32-channel heads
    sd = {
        k: torch.from_numpy(v)
        for k, v in openai_state_dict(model, 16, random_arrays(0)).items()
        if k.startswith("middle_block.1.")
    }
    x = torch.from_numpy(random_arrays(1)((2, 64, 4, 4)))
    expected = torch_flash_attention(x, sd, "middle_block.1", heads=2).numpy()
    names = {"norm": ("scale", "bias"), "qkv": ("kernel", "bias"), "proj_out": ("kernel", "bias")}
    sd_np = {k: v.numpy() for k, v in sd.items()}
    block = adm.AttentionBlock(num_heads=2)
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    for layout, close in (("flash", True), ("legacy", False)):
        params = _block_params(sd_np, "middle_block.1", names, model, layout)
        out = np.asarray(block.apply({"params": params}, x_nhwc)).transpose(0, 3, 1, 2)
        # Read in the legacy order, the flash weights mix up q, k and v across heads.
        assert np.allclose(out, expected, rtol=1e-4, atol=1e-5) == close, layout


def test_res_block_weights_give_the_torch_block():
    model = common.tiny_adm()
    sd = openai_state_dict(model, 16, random_arrays(2))
    prefix = "input_blocks.3.0"  # 32 -> 64 channels: a 1x1 skip convolution
    sd = {k: torch.from_numpy(v) for k, v in sd.items() if k.startswith(prefix + ".")}
    x = torch.from_numpy(random_arrays(3)((2, 32, 8, 8)))
    emb = torch.from_numpy(random_arrays(4)((2, 128)))
    expected = torch_res_block(x, emb, sd, prefix).numpy()
    names = {n: ("scale", "bias") for n in ("in_layers_0", "out_layers_0")}
    names.update(
        {
            n: ("kernel", "bias")
            for n in ("in_layers_2", "emb_layers_1", "out_layers_3", "skip_connection")
        }
    )
    params = _block_params({k: v.numpy() for k, v in sd.items()}, prefix, names, model)
    out = adm.ResBlock(64).apply(
        {"params": params},
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(emb.numpy()),
        train=False,
    )
    np.testing.assert_allclose(
        np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("config_module", [imagenet64_cd, lsun256_cd])
def test_the_imported_network_computes_what_the_torch_unet_does(config_module):
    """The whole network: class-conditional with scale-shift norm (ImageNet 64's kind) and
    unconditional without (LSUN's), at toy size."""
    config = config_module.get_config("test")
    # Two levels (down- and up-sampling blocks), and 64 channels at the attention: two heads,
    # whose qkv order the layout decides. The `:test` network has one level and one head.
    config.model.update(ch_mult=(1, 2), attn_resolutions=(8,))
    sd = openai_state_dict(config.model, 16, random_arrays(7))
    x = random_arrays(8)((2, 3, 16, 16))
    c_noise = np.asarray([-1.5, 0.7], np.float32)  # ¼ ln σ
    labels = np.asarray([3, 9]) if config.model.num_classes else None
    with torch.no_grad():
        expected = torch_unet(
            torch.from_numpy(x),
            torch.from_numpy(1000.0 * c_noise),
            None if labels is None else torch.from_numpy(labels),
            {k: torch.from_numpy(v) for k, v in sd.items()},
            config.model,
            16,
        ).numpy()
    net = models.create_model(config.model)

    def imported_output(layout):
        params = import_openai.adm_params(sd, config, layout)
        out = net.apply(
            {"params": params},
            jnp.asarray(x.transpose(0, 2, 3, 1)),
            jnp.asarray(c_noise),
            None if labels is None else jnp.asarray(labels),
            train=False,
        )
        return np.asarray(out).transpose(0, 3, 1, 2)

    assert np.abs(expected).max() > 0.5  # random weights everywhere: a non-trivial output
    np.testing.assert_allclose(imported_output("flash"), expected, rtol=1e-4, atol=2e-5)
    # The same weights read in guided-diffusion's legacy qkv order are another network.
    assert np.abs(imported_output("legacy") - expected).max() > 1e-2


def test_the_paper_network_takes_every_key_of_its_state_dict():
    config = imagenet64_cd.get_config()
    sd = openai_state_dict(config.model, 64, lambda shape: np.zeros(shape, np.float32))
    params = import_openai.adm_params(sd, config)
    assert train_state.count_params(params) == 295_899_267
    assert sum(v.size for v in sd.values()) == 295_899_267


def test_the_lsun_network_takes_every_key_of_its_state_dict():
    config = lsun256_cd.get_config()  # no scale-shift norm, unconditional, six levels
    sd = openai_state_dict(config.model, 256, lambda shape: np.zeros(shape, np.float32))
    params = import_openai.adm_params(sd, config)
    assert train_state.count_params(params) == sum(v.size for v in sd.values())


def test_a_checkpoint_of_another_network_is_one_clear_error():
    config = imagenet64_edm.get_config("test")
    sd = openai_state_dict(config.model, 16, random_arrays(5))
    with pytest.raises(import_openai.CheckpointImportError, match="unused middle_block"):
        import_openai.adm_params(
            {k: v for k, v in sd.items()} | {"middle_block.9.weight": np.zeros(3, np.float32)},
            config,
        )
    del sd["out.2.bias"]
    with pytest.raises(import_openai.CheckpointImportError, match="1 entries missing.*out.2.bias"):
        import_openai.adm_params(sd, config)
    sd = openai_state_dict(config.model, 16, random_arrays(5))
    sd["out.2.weight"] = np.zeros((6, 64, 3, 3), np.float32)  # learn_sigma's six channels
    with pytest.raises(import_openai.CheckpointImportError, match="out.2.weight"):
        import_openai.adm_params(sd, config)


def test_an_imported_checkpoint_is_a_run(tmp_path):
    config = imagenet64_cd.get_config("test")
    sd = openai_state_dict(config.model, 16, random_arrays(6))
    path = tmp_path / "cd_test.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    workdir = tmp_path / "run"
    import_openai.import_checkpoint(str(path), config, str(workdir))

    run_config, _, state = runs.restore_run(str(workdir), train_state.create_mesh())
    assert run_config.method == "cd" and int(state.step) == 0
    kernel = np.asarray(
        state.ema_params[train_state.ema_key(config.train.ema_rates[0])]["input_blocks_0_0"][
            "kernel"
        ]
    )
    np.testing.assert_array_equal(kernel, sd["input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
    assert json.loads((workdir / "imported.json").read_text())["qkv_layout"] == "flash"
    images, _ = Generator(str(workdir)).sample(2, batch_size=2)
    assert images.shape == (2, 16, 16, 3)
    with pytest.raises(import_openai.CheckpointImportError, match="already holds a run"):
        import_openai.import_checkpoint(str(path), config, str(workdir))
    (tmp_path / "damaged.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(import_openai.CheckpointImportError, match="not a readable PyTorch file"):
        import_openai.read_state_dict(str(tmp_path / "damaged.pt"))


# --------------------------------------------------------------------------- JAX CIFAR-10 releases
def _jcm_checkpoint(path, config, seed):
    """A file in the released format: the Flax bytes of a state whose fields hold parameter
    trees of the network (θ, θ⁻ and the EMA that samples), plus the loop's scalars."""
    from flax import serialization

    net = models.create_model(config.model)
    shapes = jax.eval_shape(lambda: train_state.init_params(config, net, jax.random.PRNGKey(0)))
    draw = random_arrays(seed)
    trees = [jax.tree.map(lambda s: draw(s.shape), shapes) for _ in range(2)]
    state = {
        "step": np.int32(800_000),
        "lr": np.float32(4e-4),
        "ema_rate": np.float32(0.9999),
        "params": trees[0],
        "target_params": trees[0],
        "params_ema": trees[1],
        "model_state": {},
        "opt_state": {"mu": trees[0]},
        "rng_state": np.arange(2),
    }
    path.write_bytes(serialization.msgpack_serialize(state))
    return trees[1]


def test_a_jax_cifar10_release_imports_its_ema(tmp_path):
    config = cifar10_cd_lpips.get_config("test")
    ema = _jcm_checkpoint(tmp_path / "checkpoint_80", config, seed=11)
    import_openai.import_checkpoint(str(tmp_path / "checkpoint_80"), config, str(tmp_path / "run"))
    _, _, state = runs.restore_run(str(tmp_path / "run"), train_state.create_mesh())
    restored = state.ema_params[train_state.ema_key(config.train.ema_rates[0])]
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    images, _ = Generator(str(tmp_path / "run")).sample(2, batch_size=2)
    assert images.shape == (2, 16, 16, 3)


def test_a_jax_release_that_does_not_fit_is_one_clear_error(tmp_path):
    config = cifar10_cd_lpips.get_config("test")
    _jcm_checkpoint(tmp_path / "checkpoint_80", config, seed=12)
    state = import_openai.read_jcm_checkpoint(str(tmp_path / "checkpoint_80"))
    other = cifar10_cd_lpips.get_config("test")
    other.model.nf = 16
    with pytest.raises(
        import_openai.CheckpointImportError, match="of another shape.*AttnBlockpp_0"
    ):
        import_openai.ncsnpp_params(state, other)
    with pytest.raises(import_openai.CheckpointImportError, match="no parameter tree 'ema'"):
        import_openai.ncsnpp_params(state, config, field="ema")
    (tmp_path / "junk").write_bytes(b"\x00not msgpack")
    with pytest.raises(import_openai.CheckpointImportError, match="not a Flax checkpoint"):
        import_openai.read_jcm_checkpoint(str(tmp_path / "junk"))

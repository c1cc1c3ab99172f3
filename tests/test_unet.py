"""The ADM U-Net: shapes, zero-init head, memory formats, checkpointing, conditioning, gradients."""

import copy
import math

import pytest
import torch
from torch import nn

from engine.methods.sections import ModelConfig
from engine.models.embeddings import sinusoidal_embedding
from engine.models.unet import UNet

TINY = {"in_channels": 3, "out_channels": 3, "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
        "attention_resolutions": [4], "num_heads": 2, "num_groups": 4, "dropout": 0.0, "num_classes": 3,
        "image_size": 8}


def tiny_unet(**overrides) -> UNet:
    return UNet(**{**TINY, **overrides})


def perturb_zero_parameters(model: nn.Module, std: float = 0.1) -> None:
    """Give the zero-initialised layers (and GroupNorm biases) random values, so that every path
    of the network changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)


def inputs(model: UNet, batch: int = 2, side: int = 8, num_classes: int = 3):
    x = torch.randn(batch, model.in_channels, side, side)
    t = torch.randint(0, 1000, (batch,)).float()
    labels = torch.randint(0, num_classes, (batch,))
    return x, t, labels


@pytest.mark.parametrize("overrides", [
    {"channels": 6, "channel_mult": [1, 3], "num_groups": 32, "attention_resolutions": [], "num_heads": 1},
    {"channels": 10, "channel_mult": [1, 2, 2], "attention_resolutions": [4, 2], "num_heads": 5, "num_groups": 32},
    {"in_channels": 4, "out_channels": 7, "channels": 12, "channel_mult": [1], "num_res_blocks": 2,
     "attention_resolutions": [8], "num_heads": 3, "num_groups": 8},
], ids=["odd-widths-no-attention", "three-levels-attention-at-two-sides", "one-level-other-io-channels"])
def test_output_has_the_input_size_and_out_channels(seed, overrides):
    model = tiny_unet(**overrides)
    perturb_zero_parameters(model)
    x, t, labels = inputs(model, batch=3)
    out = model(x, t, labels)
    assert out.shape == (3, model.out_conv.out_channels, 8, 8)
    assert torch.isfinite(out).all()
    for norm in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0


def test_attention_blocks_sit_exactly_at_the_configured_sides(seed):
    model = tiny_unet(channel_mult=[1, 2, 2], attention_resolutions=[4])
    seen_sides = []

    def record(module, args, output):
        seen_sides.append(args[0].shape[-1])

    for module in model.modules():
        if type(module).__name__ == "AttentionBlock":
            module.register_forward_hook(record)
    model(*inputs(model))
    # level 1 (side 4): one encoder and two decoder blocks; none at 8 (level 0) or 2 (middle).
    assert seen_sides == [4, 4, 4]


def test_fresh_unet_outputs_exactly_zero(seed):
    model = tiny_unet()
    out = model(*inputs(model))
    assert torch.equal(out, torch.zeros_like(out))


def test_channels_last_input_gives_the_contiguous_output(seed):
    model = tiny_unet()
    perturb_zero_parameters(model)
    x, t, labels = inputs(model)
    expected = model(x, t, labels)
    got = model(x.contiguous(memory_format=torch.channels_last), t, labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.contiguous(memory_format=torch.channels_last), t, labels), expected,
                               atol=1e-5, rtol=1e-5)


def test_checkpointing_gives_the_same_outputs_and_gradients(seed):
    # Dropout on: the recomputed forward must replay the same dropout masks.
    plain = tiny_unet(dropout=0.3)
    perturb_zero_parameters(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint = True
    x, t, labels = inputs(plain)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(seed + 1)
        x_in = x.clone().requires_grad_(True)
        out = model(x_in, t, labels)
        out.square().mean().backward()
        results.append((out.detach(), x_in.grad, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
    for got, expected in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_class_table_has_a_null_row_used_when_labels_are_none(seed):
    num_classes = int(torch.randint(1, 6, ()))
    model = tiny_unet(num_classes=num_classes)
    perturb_zero_parameters(model)
    assert model.class_embedding.table.num_embeddings == num_classes + 1
    assert model.null_label == num_classes
    x, t, _ = inputs(model, num_classes=num_classes)
    null = torch.full((x.shape[0],), num_classes)
    torch.testing.assert_close(model(x, t, None), model(x, t, null), atol=0, rtol=0)
    assert not torch.allclose(model(x, t, None), model(x, t, torch.zeros_like(null)), atol=1e-4)


def test_every_parameter_receives_a_gradient(seed):
    model = tiny_unet(channel_mult=[1, 2, 2], attention_resolutions=[4, 2])
    perturb_zero_parameters(model)
    x, t, labels = inputs(model, batch=3)
    model(x, t, labels).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_zero_initialised_layers_still_have_gradients_at_the_first_step(seed):
    model = tiny_unet()
    x, t, labels = inputs(model)
    (model(x, t, labels) - torch.randn_like(x)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.out_conv.weight.grad.abs().sum() > 0


def test_from_config_reads_every_model_field(seed):
    cfg = ModelConfig(channels=12, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                      num_heads=3, num_groups=6, dropout=0.1, checkpoint=True)
    model = UNet.from_config(cfg, in_channels=4, out_channels=4, num_classes=5, image_size=16)
    assert model.time_embed_dim == 48 and model.checkpoint and model.num_classes == 5
    assert model.input_conv.out_channels == 12
    # side 8 (level 1): one encoder block, the middle block, two decoder blocks.
    assert sum(type(m).__name__ == "AttentionBlock" for m in model.modules()) == 1 + 1 + 2
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert model(torch.randn(2, 4, 16, 16), torch.rand(2) * 999, None).shape == (2, 4, 16, 16)


def test_bad_configurations_are_explained():
    with pytest.raises(ValueError, match="attention_resolutions"):
        tiny_unet(attention_resolutions=[16])
    with pytest.raises(ValueError, match="num_heads"):
        tiny_unet(channels=9, num_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        tiny_unet(image_size=10, channel_mult=[1, 2, 2])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_unet()(torch.randn(2, 4, 8, 8), torch.zeros(2))


def test_sinusoidal_embedding_matches_the_formula(seed):
    dim = int(torch.randint(3, 20, ()))
    t = torch.rand(5) * 1000
    emb = sinusoidal_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (5, dim)
    for i in range(5):
        for k in range(half):
            angle = t[i].double() * math.exp(-math.log(10000.0) * k / half)
            assert abs(emb[i, k].item() - math.cos(angle)) < 1e-4
            assert abs(emb[i, half + k].item() - math.sin(angle)) < 1e-4
    if dim % 2:
        assert torch.equal(emb[:, -1], torch.zeros(5))

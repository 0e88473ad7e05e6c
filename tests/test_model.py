"""MicroDiT: shapes, parameter counts, FLOPs under masking, expert choice, routing, bad configs."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS, ModelConfigError, RouteConfig, get_preset
from model.edm import EDMPrecond, edm_loss
from model.microdit import ExpertChoiceMoE, MicroDiT, patchify, unpatchify
from model.summary import count_flops, count_params, layer_table


def tiny_batch(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    sigma = torch.rand(n, generator=g) + 0.1
    captions = torch.randn(n, cfg.caption_len, cfg.caption_dim, generator=g)
    return x, sigma.log() / 4, captions


def make(name="nano", **kw):
    torch.manual_seed(0)
    net = MicroDiT(get_preset(name, **kw))
    # Zero-initialised outputs would make many checks trivially pass: give every weight a value.
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return net


# --- parameter counts (meta device: nothing allocated) ------------------------------------------


def test_xl_parameter_count_matches_paper():
    counts = count_params(PRESETS["MicroDiT-XL/2"])
    assert abs(counts.total - 1_165_442_320) <= 0.005 * 1_165_442_320
    assert counts.total == 1_165_442_320  # the construction rules land on it exactly
    # ≈712M active per token: each token meets capacity_factor=2 of the 8 experts on average.
    assert 700e6 < counts.active_per_token < 725e6


def test_tiny_parameter_count_matches_paper():
    counts = count_params(PRESETS["MicroDiT-Tiny/2"])
    assert abs(counts.total - 200_700_000) <= 0.01 * 200_700_000


def test_parameter_count_does_not_allocate(monkeypatch):
    # Building a CPU MicroDiT-XL/2 would need 4.7 GB; count_params must stay on the meta device.
    calls = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        device = kwargs.get("device")
        calls.append(str(device) if device is not None else str(torch.get_default_device()))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    count_params(PRESETS["MicroDiT-XL/2"])
    assert calls and all(d == "meta" for d in calls)


def test_layerwise_scaling_shapes():
    cfg = PRESETS["MicroDiT-XL/2"]
    rows = [r for r in layer_table(cfg) if r.part == "backbone"]
    assert rows[0].attn_width == 512 and rows[0].heads == 8
    assert rows[-1].attn_width == 1024 and rows[-1].heads == 16
    widths = [r.attn_width for r in rows]
    assert widths == sorted(widths) and all(w % 128 == 0 for w in widths)
    moe_blocks = [r.index for r in rows if r.ffn.startswith("moe")]
    assert moe_blocks == list(range(1, 26, 2))
    off = [r for r in layer_table(cfg.replace(layerwise_scaling=False)) if r.part == "backbone"]
    assert {r.attn_width for r in off} == {1024}
    assert len({r.ffn_hidden for r in off if r.ffn == "swiglu"}) == 1


# --- FLOPs under masking -------------------------------------------------------------------------


def test_deferred_masking_flops_xl():
    cfg = PRESETS["MicroDiT-XL/2"]
    full, masked = count_flops(cfg, mask_ratio=0.0), count_flops(cfg, mask_ratio=0.75)
    assert masked.backbone <= 0.30 * full.backbone
    assert masked.forward <= 0.45 * full.forward
    assert masked.training == 3 * masked.forward
    # The mixer runs over all tokens: its cost does not change with the mask.
    assert masked.mixer == full.mixer


def test_naive_masking_backbone_sees_same_tokens():
    cfg = PRESETS["MicroDiT-Tiny/2"]
    deferred = count_flops(cfg, mask_ratio=0.75)
    naive = count_flops(cfg.replace(masking="naive"), mask_ratio=0.75)
    assert naive.backbone == deferred.backbone
    assert naive.mixer < 0.5 * deferred.mixer  # naive: the mixer only sees kept tokens


# --- forward, masking and positions ---------------------------------------------------------------


@pytest.mark.parametrize("channels,patch", [(3, 4), (4, 2), (16, 2)])
def test_any_channel_count_and_patch_size(channels, patch):
    net = make(in_channels=channels, patch_size=patch, input_size=16)
    x, t, cap = tiny_batch(net.cfg)
    out, keep = net(x, t, cap)
    assert out.shape == x.shape and keep.all()


def test_patchify_roundtrip():
    x = torch.randn(2, 4, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 4, 6), x)


def test_masking_keeps_int_t_times_one_minus_r_and_zero_token_elsewhere():
    net = make()
    x, t, cap = tiny_batch(net.cfg)
    T = net.cfg.num_tokens
    for r in (0.5, 0.75, 0.9):
        out, keep = net(x, t, cap, mask_ratio=r, generator=torch.Generator().manual_seed(1))
        assert (keep.sum(1) == int(T * (1 - r))).all()
        out_tokens = patchify(out, net.cfg.patch_size)  # (N, T, P)
        assert (out_tokens[~keep] == 0).all()
        assert (out_tokens[keep].abs().sum(-1) > 0).all()
    # per-sample masks differ
    _, keep = net(x, t, cap, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(keep[0], keep[1])


def test_deferred_mixer_lets_kept_tokens_see_dropped_ones():
    # Change only a dropped patch of the input: with deferred masking the kept outputs change
    # (the mixer saw it); with naive masking they do not.
    for masking, should_change in (("deferred", True), ("naive", False)):
        net = make(masking=masking).eval()
        x, t, cap = tiny_batch(net.cfg, n=1)
        _, keep = net(x, t, cap, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
        dropped = (~keep[0]).nonzero()[0].item()
        x2 = patchify(x.clone(), net.cfg.patch_size)
        x2[0, dropped] += 1.0
        x2 = unpatchify(x2, net.cfg.patch_size, net.cfg.grid_size, net.cfg.grid_size)
        a, _ = net(x, t, cap, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
        b, _ = net(x2, t, cap, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
        changed = not torch.allclose(a, b, atol=1e-6)
        assert changed == should_change, masking


def test_larger_grid_interpolates_positions():
    net = make().eval()
    cfg = net.cfg
    x = torch.randn(1, cfg.in_channels, 2 * cfg.input_size, 2 * cfg.input_size)
    out, keep = net(x, torch.zeros(1), torch.randn(1, 4, cfg.caption_dim))
    assert (
        out.shape == x.shape and torch.isfinite(out).all() and keep.shape == (1, 4 * cfg.num_tokens)
    )


def test_caption_mask_and_zero_captions():
    net = make().eval()
    x, t, cap = tiny_batch(net.cfg)
    mask = torch.zeros(2, net.cfg.caption_len, dtype=torch.bool)
    mask[:, :5] = True
    a, _ = net(x, t, cap, mask)
    cap2 = cap.clone()
    cap2[:, 5:] = 123.0  # padding content must not matter under the mask
    b, _ = net(x, t, cap2, mask)
    assert torch.allclose(a, b, atol=1e-5)
    c, _ = net(x, t, torch.zeros_like(cap))  # the unconditional (CFG) input works
    assert torch.isfinite(c).all() and not torch.allclose(a, c)


# --- expert-choice MoE ----------------------------------------------------------------------------


def test_expert_choice_invariants():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=32, num_experts=4, capacity_factor=2.0)
    x = torch.randn(3, 20, 16)
    probs, gate, idx = moe.route(x)
    k = int(2.0 * 20 / 4)
    assert idx.shape == gate.shape == (3, 4, k)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 20))  # softmax over experts
    for n in range(3):
        for e in range(4):
            chosen = idx[n, e]
            assert chosen.unique().numel() == k  # exactly its capacity, no token twice
            # the chosen tokens are this expert's top-k by gate probability
            assert probs[n, chosen, e].min() >= probs[n, :, e].topk(k).values.min() - 1e-7
            torch.testing.assert_close(gate[n, e], probs[n, chosen, e])


def test_expert_choice_output_matches_a_loop():
    torch.manual_seed(1)
    moe = ExpertChoiceMoE(dim=8, hidden=12, num_experts=4, capacity_factor=1.5)
    x = torch.randn(2, 10, 8)
    _, gate, idx = moe.route(x)
    expected = torch.zeros_like(x)
    for n in range(2):
        for e in range(4):
            for j, tok in enumerate(idx[n, e].tolist()):
                h = torch.nn.functional.gelu(x[n, tok] @ moe.w1[e], approximate="tanh")
                expected[n, tok] += gate[n, e, j] * (h @ moe.w2[e])
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)


def test_moe_parameters_are_exposed():
    net = make()
    names = net.moe_parameter_names()
    assert names and all(".ffn." in n for n in names)
    params = dict(net.named_parameters())
    assert sum(params[n].numel() for n in names) == count_params(net.cfg).moe
    assert make(num_experts=0).moe_parameter_names() == []


@pytest.mark.parametrize("experts", [0, 2, 4])
def test_dense_and_moe_variants_train(experts):
    torch.manual_seed(0)
    net = MicroDiT(get_preset("nano", num_experts=experts))
    pre = EDMPrecond(net, sigma_data=0.5)
    x, _, cap = tiny_batch(net.cfg, n=4)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = edm_loss(pre, x, cap, mask_ratio=0.5, generator=torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    if experts:
        moe = [m for m in net.modules() if isinstance(m, ExpertChoiceMoE)]
        assert moe and all(m.w1.grad is not None and m.w1.grad.abs().sum() > 0 for m in moe)


# --- token routing (TREAD) -------------------------------------------------------------------------


def test_route_ratio_zero_equals_unrouted():
    base = make()
    routed = MicroDiT(base.cfg.replace(routes=(RouteConfig(start=1, end=3, ratio=0.0),)))
    routed.load_state_dict(base.state_dict())
    x, t, cap = tiny_batch(base.cfg)
    a, _ = base(x, t, cap, route=True)
    b, _ = routed(x, t, cap, route=True)
    assert torch.equal(a, b)


def test_routed_tokens_skip_the_span_and_flops_fall():
    cfg = get_preset("micro")
    routed = cfg.replace(routes=({"start": 1, "end": 5, "ratio": 0.5},))
    full = count_flops(cfg, mask_ratio=0.0)
    half = count_flops(routed, mask_ratio=0.0)
    assert half.backbone < 0.75 * full.backbone
    no_route = count_flops(routed, mask_ratio=0.0, route=False)  # sampling: every token everywhere
    assert no_route.backbone == full.backbone


# --- bad configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"patch_size": 3}, "patch_size=3"),
        ({"num_experts": 100}, "num_experts=100"),
        ({"num_experts": 1}, "num_experts=1"),
        ({"head_dim": 48}, "head_dim=48"),
        ({"masking": "random"}, "masking='random'"),
        ({"routes": ({"start": 3, "end": 2, "ratio": 0.5},)}, "routes[0]"),
        ({"routes": ({"start": 0, "end": 2, "ratio": 1.0},)}, "ratio=1.0"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_bad_configs_name_the_value(overrides, needle):
    with pytest.raises(ModelConfigError) as err:
        get_preset("nano", **overrides)
    assert needle in str(err.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ModelConfigError, match="MicroDiT-XL/2"):
        get_preset("MicroDiT-XXL/2")


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio(r):
    net = make()
    x, t, cap = tiny_batch(net.cfg)
    with pytest.raises(ValueError, match=r"mask_ratio=.*\[0, 1\)"):
        net(x, t, cap, mask_ratio=r)

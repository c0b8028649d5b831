"""CG-FedLLM components: factor map round trip, SNR definitions, autoencoder shapes and TGAP training."""

import math

import pytest
import torch

from fedzip.methods.autoencoder import (
    BlockLinearAutoencoder,
    ConvAutoencoder,
    autoencoder_cosine,
    cosine,
    from_map,
    gate_baselines,
    make_layout,
    normalise,
    snr_db,
    snr_paper,
    to_map,
    train_autoencoder,
)


def lora_tensors(seed=0, d_in=48, d_out=40, r=4, modules=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(modules):
        out[f"layer{m}.q.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        out[f"layer{m}.q.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    return out


def test_factor_map_round_trips_exactly_without_the_autoencoder():
    t = lora_tensors()
    layout = make_layout({n: tuple(v.shape) for n, v in t.items()}, stride=64)
    x = to_map(t, layout)
    assert x.shape == (64, 64) and layout.used_width == 24
    back = from_map(x, layout)
    assert back.keys() == t.keys() and all(torch.equal(back[n], t[n]) for n in t)
    assert x[48:].abs().sum() == 0 and x[:, 24:].abs().sum() == 0  # padding stays zero


def test_packed_layout_round_trips_exactly_without_overlap_and_with_less_padding():
    g = torch.Generator().manual_seed(1)
    t = {}
    for m in range(6):  # grouped-query attention: K/V project to a quarter of the width of Q/O
        for proj, d_out in (("q", 64), ("k", 16), ("v", 16)):
            t[f"layer{m}.{proj}.lora_A.weight"] = torch.randn(4, 64, generator=g)
            t[f"layer{m}.{proj}.lora_B.weight"] = torch.randn(d_out, 4, generator=g)
    shapes = {n: tuple(v.shape) for n, v in t.items()}
    paper, packed = make_layout(shapes, stride=8), make_layout(shapes, stride=8, packing="packed")
    for layout in (paper, packed):
        x = to_map(t, layout)
        back = from_map(x, layout)
        assert all(torch.equal(back[n], t[n]) for n in t)
        cover = torch.zeros(layout.height, layout.width)  # every value has a cell of its own
        for b in layout.blocks:
            cover[b.row:b.row + b.rows, b.col:b.col + layout.rank] += 1
        assert cover.max() == 1 and int(cover.sum()) == sum(v.numel() for v in t.values())
    assert packed.height == paper.height == 64
    assert packed.width < paper.width and packed.padding < 0.1 < paper.padding
    with pytest.raises(ValueError, match="packing"):
        make_layout(shapes, packing="tight")


def test_snr_definitions_match_hand_computed_values():
    g = torch.tensor([3.0, 4.0])  # ||G||^2 = 25
    g_hat = torch.tensor([3.0, 3.0])  # ||G - G~||^2 = 1, n = 2
    assert snr_paper(g, g_hat) == pytest.approx(25 / (1 / 2))
    assert snr_db(g, g_hat) == pytest.approx(10 * math.log10(25))
    assert cosine(g, g_hat) == pytest.approx(21 / (5 * math.sqrt(18)))
    assert snr_db(g, g) == math.inf


def test_conv_autoencoder_latent_is_exactly_one_64th():
    ae = ConvAutoencoder()
    x = torch.randn(128, 192)
    z = ae.encode(x)
    assert z.numel() * 64 == x.numel()
    ae.eval()
    assert ae.decode(z).shape == x.shape


def test_block_linear_autoencoder_ratio():
    ae = BlockLinearAutoencoder(block=256, ratio=16)
    x = torch.randn(64, 64)
    assert ae.encode(x).numel() * 16 == x.numel()
    assert ae.decode_to(ae.encode(x), (64, 64)).shape == (64, 64)


@pytest.mark.parametrize("ae", [ConvAutoencoder(channels=(4, 8, 16, 32, 64, 64)), BlockLinearAutoencoder(64, 8)])
def test_tgap_loss_falls_on_recorded_maps(ae):
    torch.manual_seed(0)
    t = [lora_tensors(seed=s, d_in=64, d_out=64, r=8, modules=4) for s in range(12)]
    layout = make_layout({n: tuple(v.shape) for n, v in t[0].items()}, stride=64)
    # recorded maps share structure (a low-rank trend plus noise), as consecutive client updates do
    base = to_map(t[0], layout)
    maps = [base * (1 + 0.1 * i) + 0.05 * to_map(t[i], layout) for i in range(12)]
    losses = train_autoencoder(ae, maps, epochs=15, lr=2e-3, batch=4).train_loss
    assert losses[-1] < 0.7 * losses[0]
    x, scale = normalise(maps[0])
    assert scale > 0 and float(x.abs().max()) == pytest.approx(1.0)


def structured_maps(n, shape=(64, 64), rank=6, noise=0.05, seed=0, decay=0.5):
    """Maps whose 64-value blocks lie near a ``rank``-dimensional subspace, with a spectrum decaying by ``decay``."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(64, rank, generator=g))[0]
    weights = torch.tensor([decay ** i for i in range(rank)])
    blocks = shape[0] * shape[1] // 64
    return [((torch.randn(blocks, rank, generator=g) * weights) @ basis.T + noise * torch.randn(blocks, 64, generator=g))
            .reshape(shape) for _ in range(n)]


def test_early_stopping_keeps_the_best_held_out_epoch():
    torch.manual_seed(0)
    maps = structured_maps(12)
    ae = BlockLinearAutoencoder(64, 8)
    log = train_autoencoder(ae, maps[:9], epochs=200, lr=3e-2, batch=4, heldout=maps[9:], patience=5)
    assert log.stopped_early and len(log.train_loss) < 200 and len(log.heldout_loss) == len(log.train_loss)
    assert log.heldout_loss[log.best_epoch - 1] == min(log.heldout_loss)
    assert len(log.train_loss) - log.best_epoch == 5  # stopped `patience` epochs after the best one
    with torch.no_grad():  # the weights kept are the best epoch's
        held = torch.stack([normalise(m)[0] for m in maps[9:]])[:, None]
        mse = float(torch.nn.functional.mse_loss(ae(held), held))
    assert mse == pytest.approx(log.heldout_loss[log.best_epoch - 1], rel=1e-4)


def test_gate_baselines_on_maps_of_known_structure():
    exact = structured_maps(8, rank=8, noise=0.0)  # every block in an 8-dimensional subspace
    cos = gate_baselines(exact[:6], exact[6:], latent_values=64 * 64 // 8, block=64)
    assert cos["zero"] == 0.0
    assert cos["block_pca"] > 0.999 and cos["random_projection"] > 0.999  # 8 numbers a block recover it exactly
    spread = structured_maps(8, rank=32, noise=0.0, decay=0.9)  # 32 directions, 8 kept: PCA keeps the strongest ones
    cos = gate_baselines(spread[:6], spread[6:], latent_values=64 * 64 // 8, block=64)
    assert cos["block_pca"] > cos["random_projection"] + 0.05
    assert gate_baselines(spread[:6], spread[6:], latent_values=64 * 64, block=64)["topk"] > 0.999


def test_a_trained_linear_autoencoder_beats_the_random_projection():
    torch.manual_seed(0)
    maps = structured_maps(24, rank=32, noise=0.0, decay=0.9)
    ae = BlockLinearAutoencoder(64, 8)
    train_autoencoder(ae, maps[:20], epochs=300, lr=1e-2, batch=4, heldout=maps[20:], patience=30)
    cos = gate_baselines(maps[:20], maps[20:], latent_values=ae.encode(maps[0]).numel(), block=64)
    assert autoencoder_cosine(ae, maps[20:]) > cos["random_projection"]

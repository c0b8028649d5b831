"""HAFL, HetLoRA and FlexLoRA: component bookkeeping, freezing, truncation, SVD, aggregation, resume."""

import json

import pytest
import torch
from helpers import assert_resume_is_exact

from fedzip.config import load_config
from fedzip.engine.ledger import read_ledger
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError
from fedzip.methods import METHODS, ClientContext
from fedzip.methods.hafl import _mask, assign_ranks, average_components, best_rank_r, top_components
from fedzip.models.lora import lora_a, lora_b
from fedzip.report.compact import compact_run
from fedzip.wire import Message


def opts(extra=""):
    return f"method_options={{tiers: [{{rank: 2, share: 0.5}}, {{rank: 4, share: 0.5}}]{', ' + extra if extra else ''}}}"


def make(tiny_cfg, method="hafl", extra=""):
    cfg = load_config(None, tiny_cfg + [f"method={method}", "lora.rank=4", "lora.alpha=4", opts(extra)])
    rt = build_runtime(cfg, METHODS[method])
    server = METHODS[method](cfg, rt)
    server.init_global()
    return server


def reply(method, cid, held, value, n=10):
    """A reply in which client ``cid`` trained components ``held`` (per module) to constant ``value``."""
    tensors = {name: torch.full(method.shapes[name], value) for name in method.others}
    for j, m in enumerate(method.modules):
        tensors[lora_a(m)] = torch.full((len(held[j]), method.shapes[lora_a(m)][1]), value)
        tensors[lora_b(m)] = torch.full((method.shapes[lora_b(m)][0], len(held[j])), value)
    tensors["scores"] = torch.zeros(len(method.modules), method.R)
    return Message(tensors, {"num_examples": n, "components": [_mask(h) for h in held]})


@pytest.mark.parametrize("agg", ["adaptive", "zero_pad"])
def test_aggregation_counts_only_the_clients_that_updated_a_component(tiny_cfg, agg):
    method = make(tiny_cfg, extra=f"client_ranks: [2, 2, 4, 4], aggregation: {agg}")
    m, M = method.modules[0], len(method.modules)
    before = {n: t.clone() for n, t in method.global_.items()}
    replies = {0: reply(method, 0, [[0, 1]] * M, 1.0, n=10), 1: reply(method, 1, [[1, 2]] * M, 3.0, n=30)}
    method.aggregate(1, replies)
    a = method.global_[lora_a(m)]
    if agg == "adaptive":
        assert torch.all(a[0] == 1.0)  # only client 0 trained it: not diluted by client 1
        assert torch.allclose(a[1], torch.tensor(0.25 * 1.0 + 0.75 * 3.0))
        assert torch.all(a[2] == 3.0)
        assert torch.equal(a[3], before[lora_a(m)][3])  # nobody trained it: unchanged
    else:
        assert torch.allclose(a[0], torch.tensor(0.25)) and torch.allclose(a[2], torch.tensor(2.25))
        assert torch.all(a[3] == 0)  # zero padding: absent everywhere means zero


def test_freezing_leaves_untrained_components_bit_identical(tiny_cfg, tmp_path):
    method = make(tiny_cfg, extra="client_ranks: [2, 2, 4, 4]")
    g = torch.Generator().manual_seed(0)
    start = {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in method.global_.items()}
    msg = Message(start | {"scores": torch.zeros(len(method.modules), 4)}, {"round": 1})
    method.cfg.train.weight_decay = 0.1  # decoupled decay must not move frozen components either
    ctx = ClientContext(cid=0, round=1, indices=method.rt.parts[0], store=ClientStateStore(tmp_path), seed=1)
    out = method.fit(ctx, msg)
    for j, m in enumerate(method.modules):
        held = [i for i in range(4) if out.meta["components"][j] >> i & 1]
        assert len(held) == 2
        frozen = [i for i in range(4) if i not in held]
        a_now, b_now = method.rt.view.params[lora_a(m)].detach(), method.rt.view.params[lora_b(m)].detach()
        assert torch.equal(a_now[frozen], start[lora_a(m)][frozen])
        assert torch.equal(b_now[:, frozen], start[lora_b(m)][:, frozen])
        assert not torch.equal(a_now[held], start[lora_a(m)][held])
        assert out.tensors[lora_a(m)].shape[0] == 2 and (out.tensors["scores"][j, frozen] == 0).all()


def test_each_tier_is_evaluated_on_the_model_it_would_receive(tiny_cfg):
    """degradation() cuts the global model to each tier's components: the rank-1 tier scores exactly like a
    model whose other components are zero, and differently from the whole model."""
    method = make(tiny_cfg, "hetlora", extra="client_ranks: [1, 1, 4, 4], degradation_examples: 32")
    g = torch.Generator().manual_seed(0)
    method.global_ = {n: torch.randn(t.shape, generator=g) for n, t in method.global_.items()}
    tiers = method.degradation()
    cut = dict(method.global_)
    for m in method.modules:
        cut[lora_a(m)], cut[lora_b(m)] = cut[lora_a(m)].clone(), cut[lora_b(m)].clone()
        cut[lora_a(m)][1:], cut[lora_b(m)][:, 1:] = 0.0, 0.0
    scores = {}
    for name, tensors in (("cut", cut), ("whole", method.global_)):
        method.rt.view.set(tensors)
        scores[name] = method.rt.task.evaluate(method.rt.model, method.cfg.eval.batch_size, 32, seed=method.cfg.seed)
    assert tiers["tier1_loss"] == pytest.approx(scores["cut"]["loss"], rel=1e-6)
    assert tiers["tier4_loss"] == pytest.approx(scores["whole"]["loss"], rel=1e-6)
    assert tiers["tier1_loss"] != pytest.approx(tiers["tier4_loss"], rel=1e-3)
    assert "tier1_accuracy" in tiers and "tier4_accuracy" in tiers


def test_zero_padding_kills_a_component_no_sampled_client_holds_for_good(tiny_cfg, tmp_path):
    """Why HetLoRA's global model collapses to the lowest rank: a round in which no sampled client holds
    component i sets its A row and B column to zero, and A_i = B_i = 0 is a fixed point of gradient descent
    (each factor's gradient is proportional to the other), so later high-rank clients cannot revive it."""
    method = make(tiny_cfg, "hetlora", extra="client_ranks: [2, 2, 4, 4]")
    M = len(method.modules)
    method.aggregate(1, {0: reply(method, 0, [[0, 1]] * M, 0.1), 1: reply(method, 1, [[0, 1]] * M, 0.2)})
    for m in method.modules:
        assert (method.global_[lora_a(m)][2:] == 0).all() and (method.global_[lora_b(m)][:, 2:] == 0).all()
    msg = method.configure(2, [2])[2]  # a rank-4 client trains all four components from there
    ctx = ClientContext(cid=2, round=2, indices=method.rt.parts[2], store=ClientStateStore(tmp_path), seed=1)
    out = method.fit(ctx, msg)
    for m in method.modules:
        assert (out.tensors[lora_a(m)][2:] == 0).all() and (out.tensors[lora_b(m)][:, 2:] == 0).all()
        assert not torch.equal(out.tensors[lora_a(m)][:2], msg.tensors[lora_a(m)][:2])  # the live ones moved


def test_truncation_sends_the_highest_scoring_components(tiny_cfg):
    method = make(tiny_cfg, "hafl_truncate", extra="client_ranks: [2, 2, 4, 4]")
    method.scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]] * len(method.modules))
    msgs = method.configure(1, [0, 2])
    assert msgs[0].meta["components"] == [_mask([1, 3])] * len(method.modules)
    m = method.modules[0]
    assert torch.equal(msgs[0].tensors[lora_a(m)], method.global_[lora_a(m)][[1, 3]])
    het = make(tiny_cfg, "hetlora", extra="client_ranks: [2, 2, 4, 4]")
    het.scores = method.scores
    assert het.configure(1, [0])[0].meta["components"] == [_mask([0, 1])] * len(het.modules)
    assert top_components(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2) == [0, 2]


@pytest.mark.parametrize("split", ["sigma_in_b", "sqrt"])
def test_flexlora_redistribution_is_the_best_rank_r_approximation(split):
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(12, 9, generator=g)
    scale = 2.0
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    for r in (1, 3, 5):
        a, b = best_rank_r(dw, r, scale, torch.zeros(9, 9), split)
        assert a.shape == (r, 9) and b.shape == (12, r)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        assert torch.allclose(scale * b @ a, best, atol=1e-5)
        # Eckart-Young: the error is exactly the discarded singular values
        assert torch.linalg.norm(dw - scale * b @ a) == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4)
        # where the singular values sit: FlexLoRA's A = V^T has orthonormal rows; sqrt puts sqrt(s / scale) on each
        row_norms = torch.linalg.norm(a, dim=1)
        want = torch.ones(r) if split == "sigma_in_b" else torch.sqrt(s[:r] / scale)
        assert torch.allclose(row_norms, want, atol=1e-5)
    a, b = best_rank_r(torch.zeros(4, 3), 2, 1.0, torch.ones(3, 3), split)
    assert torch.all(a == 1) and torch.all(b == 0)  # from dw = 0 clients start like a fresh LoRA


@pytest.mark.parametrize("split", ["sigma_in_b", "sqrt"])
def test_flexlora_sends_factors_split_as_configured(tiny_cfg, split):
    server = make(tiny_cfg, "flexlora", extra=f"factor_split: {split}, client_ranks: [2, 2, 4, 4]")
    assert server.opts.factor_split == split
    g = torch.Generator().manual_seed(1)
    for m in server.modules:
        server.dw[m] = 1e-3 * torch.randn(server.dw[m].shape, generator=g)  # small, as early in training
    m = server.modules[0]
    sent = server.factors_for(2, None)
    a, b = sent[lora_a(m)], sent[lora_b(m)]
    assert torch.allclose(server.scale * b @ a, best_rank_r(server.dw[m], 4, 1.0, server.init_a[m])[1]
                          @ best_rank_r(server.dw[m], 4, 1.0, server.init_a[m])[0], atol=1e-7)
    norms = torch.linalg.norm(a, dim=1)
    if split == "sigma_in_b":
        assert torch.allclose(norms, torch.ones(4), atol=1e-5)  # A = V^T: unit rows however small dW is
    else:
        assert norms.max() < 0.2  # sqrt(Sigma): both factors shrink with dW


def test_rank_assignment_by_tier_shares_and_validation():
    from fedzip.methods.hafl import HaflOptions
    o = HaflOptions(tiers=[{"rank": 4, "share": 1 / 3}, {"rank": 8, "share": 1 / 3}, {"rank": 16, "share": 1 / 3}])
    ranks = assign_ranks(o, 30, 16, seed=0)
    assert sorted(ranks) == [4] * 10 + [8] * 10 + [16] * 10 and ranks == assign_ranks(o, 30, 16, seed=0)
    with pytest.raises(ConfigError, match="lora.rank"):
        assign_ranks(o, 30, 8, seed=0)


@pytest.mark.parametrize("method", ["hafl", "hafl_truncate", "hetlora", "flexlora"])
def test_variants_run_resume_exactly_and_count_per_tier_bytes(tmp_path, tiny_cfg, method):
    ov = tiny_cfg + [f"method={method}", "lora.rank=4", "lora.alpha=4", "rounds=3", "clients_per_round=4",  # both tiers
                     opts("client_ranks: [1, 1, 4, 4], degradation_every: 1")]
    assert_resume_is_exact(tmp_path, ov)
    ups = {}
    for e in read_ledger(tmp_path / "full" / "ledger.jsonl"):
        if e["direction"] == "up":
            ups.setdefault(e["client"], e["bytes"])
    assert sorted(ups) == [0, 1, 2, 3]
    assert max(ups[0], ups[1]) < min(ups[2], ups[3])  # rank-1 clients upload less than rank-4 clients
    desc = json.loads((tmp_path / "full" / "method.json").read_text())
    assert desc["client_ranks"] == [1, 1, 4, 4] and desc["tier_trainable_params"]["1"] < desc["tier_trainable_params"]["4"]
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "tier1_accuracy" in row and "tier4_accuracy" in row
    last = compact_run(tmp_path / "full")["curve"][-1]  # a compact result keeps each tier's accuracy
    assert last["tier1_accuracy"] == row["tier1_accuracy"] and last["tier4_accuracy"] == row["tier4_accuracy"]


@pytest.mark.parametrize("method", ["hafl", "flexlora"])
def test_a_server_step_moves_a_third_of_the_way_to_the_aggregate(tiny_cfg, method):
    full = make(tiny_cfg, method, extra="client_ranks: [2, 2, 4, 4]")
    third = make(tiny_cfg, method, extra="client_ranks: [2, 2, 4, 4], server_lr: 0.3333333")
    M = len(full.modules)
    replies = {0: reply(full, 0, [[0, 1]] * M, 1.0), 2: reply(full, 2, [[0, 1, 2, 3]] * M, 3.0)}
    before = {n: t.clone() for n, t in third.global_.items()}
    full.aggregate(1, replies)
    third.aggregate(1, replies)
    if method == "flexlora":  # the step is taken on the full-rank product, then refactored
        for m in full.modules:
            assert torch.allclose(third.dw[m], full.dw[m] / 3, atol=1e-5)  # dw starts at 0 (B = 0)
        names = full.others
    else:
        names = list(full.global_)
    for n in names:
        assert torch.allclose(third.global_[n], before[n] + (full.global_[n] - before[n]) * 0.3333333, atol=1e-6)


def test_random_selection_trains_blindly_chosen_components(tiny_cfg, tmp_path):
    from fedzip.methods.hafl import random_components

    picks = {tuple(random_components(16, 4, [0, cid, 1, 0])) for cid in range(20)}
    assert len(picks) > 10 and all(len(p) == 4 and list(p) == sorted(set(p)) for p in picks)
    method = make(tiny_cfg, extra="client_ranks: [2, 2, 4, 4], selection: random")
    msg = Message(dict(method.global_) | {"scores": torch.zeros(len(method.modules), 4)}, {"round": 3})
    ctx = ClientContext(cid=1, round=3, indices=method.rt.parts[1], store=ClientStateStore(tmp_path), seed=1)
    out = method.fit(ctx, msg)
    seed = method.cfg.seed
    assert out.meta["components"] == [_mask(random_components(4, 2, [seed, 1, 3, j])) for j in range(len(method.modules))]
    truncate = make(tiny_cfg, "hafl_truncate", extra="client_ranks: [2, 2, 4, 4], selection: random")
    truncate.scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]] * len(truncate.modules))  # ignored when random
    sent = truncate.configure(5, [0])[0].meta["components"]
    assert sent == [_mask(random_components(4, 2, [seed, 0, 5, j])) for j in range(len(truncate.modules))]


@pytest.mark.parametrize("adaptive", [True, False])
def test_vectorised_component_averaging_equals_the_per_component_loop(adaptive):
    """The paper's aggregation written as a loop over components and clients, against the vectorised one."""
    g = torch.Generator().manual_seed(3)
    R, d_in, d_out = 6, 5, 7
    global_a, global_b = torch.randn(R, d_in, generator=g), torch.randn(d_out, R, generator=g)
    uploads = []
    for held, w in (([0, 2], 10), ([2, 3, 4], 25), ([0, 3], 7)):  # component 1 and 5: nobody
        uploads.append((held, torch.randn(len(held), d_in, generator=g), torch.randn(d_out, len(held), generator=g), w))
    a, b = average_components(global_a, global_b, uploads, adaptive)
    total = sum(w for *_, w in uploads)
    for i in range(R):
        owners = [(held.index(i), ua, ub, w) for held, ua, ub, w in uploads if i in held]
        if not owners and adaptive:
            assert torch.equal(a[i], global_a[i]) and torch.equal(b[:, i], global_b[:, i])
            continue
        denom = sum(w for *_, w in owners) if adaptive else total
        ref_a, ref_b = torch.zeros(d_in), torch.zeros(d_out)
        for pos, ua, ub, w in owners:
            ref_a += ua[pos] * (w / denom)
            ref_b += ub[:, pos] * (w / denom)
        assert torch.equal(a[i], ref_a) and torch.equal(b[:, i], ref_b), i


@pytest.mark.parametrize("method,foreign", [("flexlora", "aggregation: adaptive"), ("hetlora", "selection: random"),
                                            ("hafl", "mode: freeze")])
def test_each_variant_takes_only_its_own_options(tiny_cfg, method, foreign):
    with pytest.raises(ConfigError, match="method_options"):
        load_config(None, tiny_cfg + [f"method={method}", "lora.rank=4", "lora.alpha=4", opts(foreign)])

"""FedKSeed: a client's replayed model equals the server's bit for bit; only used seeds' scalars travel."""

import pytest
import torch
from helpers import server_and_client

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import PayloadError
from fedzip.methods import METHODS, ClientContext
from fedzip.wire import decode, encode

OPTIONS = ["method=fedkseed", "method_options={num_seeds: 32}", "train.lr=0.0001", "num_clients=4"]


@pytest.mark.parametrize("sampling", ["uniform", "importance"])
def test_a_client_after_replay_holds_the_servers_model_bit_for_bit(tiny_cfg, tmp_path, sampling):
    sampled = f"method_options={{num_seeds: 32, seed_sampling: {sampling}}}"
    cfg, rt, server, client = server_and_client(tiny_cfg + OPTIONS + [sampled])
    store = ClientStateStore(tmp_path / "store")
    schedule = {1: [0, 1], 2: [2], 3: [1, 3], 4: [0, 2], 5: [3]}  # client 0 misses rounds 2-3, client 3 rounds 4
    for rnd, cids in schedule.items():
        expected = server.global_tensors()  # the model every client must hold at the start of this round
        codec = server.wire_codec("down")
        replies = {}
        for cid, msg in server.configure(rnd, cids).items():
            down = decode(encode(msg, codec), client.down_spec(cid, rnd), require_all=False)
            reply = client.fit(ClientContext(cid, rnd, rt.parts[cid], store, cfg.seed + cid), down)
            held = {n[7:]: t for n, t in store.load(cid).items() if n.startswith("model::")}
            assert held.keys() == expected.keys()
            assert all(torch.equal(held[n], expected[n]) for n in expected), (rnd, cid)  # bit for bit
            replies[cid] = decode(encode(reply, client.wire_codec("up")), server.up_spec(cid, rnd))
        server.aggregate(rnd, replies)
        moved = server.global_tensors()
        assert any(not torch.equal(moved[n], expected[n]) for n in moved)  # the round moved the model
    assert codec.startswith("nonzero")


def test_a_stale_or_incomplete_history_is_refused(tiny_cfg, tmp_path):
    cfg, rt, server, client = server_and_client(tiny_cfg + OPTIONS)
    store = ClientStateStore(tmp_path / "store")
    for rnd in (1, 2):
        msgs = server.configure(rnd, [0])
        reply = client.fit(ClientContext(0, rnd, rt.parts[0], store, 1), msgs[0])
        server.aggregate(rnd, {0: reply})
    msg = server.configure(3, [0])[0]
    msg.meta["synced"] = 5  # the server claims the client is newer than it is
    with pytest.raises(PayloadError, match="holds round"):
        client.fit(ClientContext(0, 3, rt.parts[0], store, 1), msg)
    msg = server.configure(3, [1])[1]  # client 1 never synchronised: it needs rounds 1 and 2
    msg.tensors.pop("history.1")
    with pytest.raises(PayloadError, match="rounds 1 to 2"):
        client.fit(ClientContext(1, 3, rt.parts[1], store, 1), msg)


def test_bytes_are_seeds_and_scalars(tiny_cfg, tmp_path):
    overrides = tiny_cfg + OPTIONS + ["rounds=3", "clients_per_round=2", "train.max_steps=3"]
    run_experiment(load_config(None, overrides), tmp_path / "run", progress=False)
    rows = read_ledger(tmp_path / "run" / "ledger.jsonl")
    ups = [e["bytes"] for e in rows if e["direction"] == "up"]
    downs = [e["bytes"] for e in rows if e["direction"] == "down"]
    model_bytes = 4 * build_runtime(load_config(None, overrides), METHODS["fedkseed"]).view.num_elements()
    # at most 3 used seeds a client-round: a few dozen bytes of values and positions over a JSON header
    assert max(ups) < 400 and max(downs) < 1200 and max(downs) < model_bytes / 1000


def test_fedkseed_pro_favours_seeds_with_large_projected_gradients(tiny_cfg, tmp_path):
    pro = "method_options={num_seeds: 32, seed_sampling: importance}"
    cfg, rt, server, client = server_and_client(tiny_cfg + OPTIONS + [pro])
    store = ClientStateStore(tmp_path / "store")
    first = server.configure(1, [0])[0].tensors["probs"]
    assert torch.allclose(first, torch.full((32,), 1 / 32))  # no history yet: uniform
    reply = client.fit(ClientContext(0, 1, rt.parts[0], store, 1), decode(encode(server.configure(1, [0])[0]),
                                                                          client.down_spec(0, 1)))
    server.aggregate(1, {0: reply})
    probs = server.configure(2, [1])[1].tensors["probs"]
    used = reply.tensors["grad"] != 0
    assert used.any() and float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    assert probs[used].max() > probs[~used].max()  # a seed with a recorded amplitude outweighs the unused ones
    bad = server.configure(2, [1])[1]
    bad.tensors["probs"] = torch.full((32,), 0.5)
    with pytest.raises(PayloadError, match="probability"):
        client.fit(ClientContext(1, 2, rt.parts[1], store, 1), bad)

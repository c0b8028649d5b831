"""The contract every registered method keeps, checked for each one (adding a method = adding a row).

1. Messages decode against the specs the receiving side declares: the server's against ``down_spec`` (with
   only ``down_optional`` tensors left out), a client's reply against ``up_spec``, every tensor present.
2. Server state survives a checkpoint: ``server_state`` -> its safetensors file -> a fresh instance's
   ``load_server_state`` gives the same next messages, byte for byte.
3. A resumed run ends exactly as an uninterrupted one.
4. A client built on its own (its own runtime and model, as a deployed client is) sends the same reply,
   byte for byte, as the in-process client the simulation uses.
"""

import pytest
import torch
from helpers import assert_resume_is_exact

from fedzip.config import load_config
from fedzip.engine.client import run_client
from fedzip.engine.runtime import build_runtime
from fedzip.engine.simulation import sample_clients
from fedzip.engine.state import ClientStateStore
from fedzip.methods import METHODS
from fedzip.methods.state import load_server_state, save_server_state
from fedzip.wire import decode, encode

TINY_LLAMA = ["model.name=tiny-llama-8", "data.source=alpaca", "data.max_length=48", "data.max_test_examples=16",
              "num_clients=3", "clients_per_round=2", "partition.scheme=iid", "lora.rank=4", "lora.alpha=8",
              "train.max_steps=2", "train.batch_size=4", "train.lr=0.01", "train.threads=1", "eval.batch_size=16"]
HETERO_RANKS = ["lora.rank=4", "lora.alpha=4", "method_options={tiers: [{rank: 2, share: 0.5}, {rank: 4, share: 0.5}]}"]
BIOT = "{prealign_steps: 2, align_steps: 2, align_batch: 2, public_max_examples: 32}"
# name -> (needs the tiny causal LM, overrides): every registered method, under each of its names
ROWS = {
    "fedit": (False, []),
    "ffa_lora": (False, []),
    "full_ft": (False, ["train.lr=0.001"]),
    "centralised": (False, []),
    "centralized": (False, []),
    "cellm": (False, ["method_options={d_dl: 0.25, d_ul: 0.25}"]),
    "flasc": (False, ["method_options={d_dl: 0.25, d_ul: 0.0625, error_feedback: true}"]),
    "hafl": (False, HETERO_RANKS),
    "hafl_truncate": (False, HETERO_RANKS),
    "hetlora": (False, HETERO_RANKS),
    "flexlora": (False, HETERO_RANKS),
    "cgfedllm": (False, ["lora.train_head=false",
                         "method_options={tgap_rounds: 2, ae_epochs: 2, ae_lr: 0.001, ae_gate: warn}"]),
    "fedbiot": (True, [f"method_options={BIOT}"]),
    "fedot": (True, ["method_options={drop: 0.5}"]),
    "offsite_tuning": (True, ["method_options={drop: 0.5}"]),
}


def test_every_registered_method_has_a_row():
    assert set(ROWS) == set(METHODS)


@pytest.fixture(params=sorted(ROWS))
def overrides(request, tiny_cfg, cache_dir):
    causal, extra = ROWS[request.param]
    base = [*TINY_LLAMA, f"model.cache_dir={cache_dir}"] if causal else list(tiny_cfg)
    return [*base, "rounds=3", f"method={request.param}", *extra]


def server_for(overrides):
    cfg = load_config(None, overrides)
    cls = METHODS[cfg.method]
    cfg = cls.adjust_config(cfg)
    server = cls(cfg, build_runtime(cfg, cls))
    server.init_global()
    return cfg, cls, server


def one_round(cfg, server, client, rnd: int, store: ClientStateStore) -> dict[int, bytes]:
    """Round ``rnd``: the server's messages, the client's replies, checked against both sides' specs, aggregated."""
    cids = sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)
    messages = server.configure(rnd, cids)
    downs = {cid: encode(messages[cid], server.wire_codec("down")) for cid in cids}
    replies = {}
    for cid in cids:
        received = decode(downs[cid], client.down_spec(cid, rnd), require_all=False)
        left_out = set(client.down_spec(cid, rnd)) - set(received.tensors)
        assert left_out <= client.down_optional(cid, rnd), f"round {rnd}: message lacks {sorted(left_out)[:3]}"
        up = run_client(client, store, rnd, cid, downs[cid], {}).up
        replies[cid] = decode(up, server.up_spec(cid, rnd))  # every declared tensor, no other
        assert set(replies[cid].tensors) == set(server.up_spec(cid, rnd))
    server.aggregate(rnd, replies)
    store.commit(rnd)
    return downs


def test_messages_decode_against_declared_specs_and_state_round_trips(overrides, tmp_path):
    cfg, cls, server = server_for(overrides)
    client = cls(cfg, server.rt)  # the simulation's in-process client
    store = ClientStateStore(tmp_path / "store")
    for rnd in (1, 2):
        one_round(cfg, server, client, rnd, store)
    # a checkpoint and a fresh server (a new process: its own runtime): the same round-3 messages, byte for byte
    save_server_state(server.server_state(), tmp_path / "server.safetensors")
    state = load_server_state(tmp_path / "server.safetensors")
    fresh = cls(cfg, build_runtime(cfg, cls))
    fresh.init_global()
    fresh.load_server_state(state)
    cids = sample_clients(cfg.seed, 3, cfg.num_clients, cfg.clients_per_round)
    mine, theirs = server.configure(3, cids), fresh.configure(3, cids)
    for cid in cids:
        assert encode(mine[cid], server.wire_codec("down")) == encode(theirs[cid], fresh.wire_codec("down"))


def test_a_client_built_on_its_own_replies_as_the_in_process_one(overrides, tmp_path):
    cfg, cls, server = server_for(overrides)
    in_process = cls(cfg, server.rt)
    alone = cls(cfg, build_runtime(cfg, cls, with_model=not cls.client_builds_model))
    cids = sample_clients(cfg.seed, 1, cfg.num_clients, cfg.clients_per_round)
    messages = server.configure(1, cids)
    for cid in cids:
        down = encode(messages[cid], server.wire_codec("down"))
        a = run_client(in_process, ClientStateStore(tmp_path / "a"), 1, cid, down, {}).up
        b = run_client(alone, ClientStateStore(tmp_path / "b"), 1, cid, down, {}).up
        assert a == b, f"client {cid}: {len(a)} vs {len(b)} bytes"


def test_a_resumed_run_ends_as_an_uninterrupted_one(overrides, tmp_path):
    torch.manual_seed(0)
    assert_resume_is_exact(tmp_path, overrides, stop_after=1)

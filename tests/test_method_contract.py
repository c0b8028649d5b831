"""The contract every registered method keeps, checked for each one (adding a method = adding a row).

1. Messages decode against the specs the receiving side declares: the server's against ``down_spec`` (with
   only ``down_optional`` tensors left out), a client's reply against ``up_spec``, every tensor present.
2. Server state survives a checkpoint: ``server_state`` -> its safetensors file -> a fresh instance's
   ``load_server_state`` gives the same next messages, byte for byte.
3. A resumed run ends exactly as an uninterrupted one.
4. A client built on its own (its own runtime and model, as a deployed client is) sends the same reply,
   byte for byte, as the in-process client the simulation uses.
5. A Flower federation (a real SuperLink and SuperNodes on 127.0.0.1) ends with the same adapter, ledger and
   metrics as the simulation, and the ledger equals the bytes the nodes counted: once per method family
   (``FAMILY`` maps every registered method to the one whose Flower run covers its exchange; deploy-marked).
"""

import json

import pytest
import torch
from helpers import (
    assert_resume_is_exact,
    assert_same_adapter,
    flower_run,
    ledger_pairs,
    node_wire,
    simulate,
    wire_files,
)

from fedzip.config import load_config
from fedzip.deploy.local import LocalFederation
from fedzip.engine.client import run_client
from fedzip.engine.ledger import read_ledger
from fedzip.engine.rounds import sample_clients
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.methods import METHODS, Method
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
    "fedsb": (False, []),
    "fed_sb": (False, ["method_options={init: random}"]),
    "fedsa_lora": (False, ["eval.personal_clients=2", "eval.personal_examples=8"]),
    "fedsa": (False, ["method_options={local_head: false}"]),
    "fedkseed": (False, ["method_options={num_seeds: 16}", "train.lr=0.0001"]),
    "fed_kseed": (True, ["method_options={num_seeds: 8, eps: 0.01, seed_sampling: importance}", "train.lr=0.00001"]),
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


# -- 5. in-process == Flower, once per family ------------------------------------------------------------
# method -> the family whose Flower run exercises its exchange (same message shapes, same client state)
FAMILY = {"fedit": "fedit", "ffa_lora": "fedit", "full_ft": "fedit", "centralised": "fedit", "centralized": "fedit",
          "cellm": "flasc", "flasc": "flasc", "hafl": "hafl", "hafl_truncate": "hafl", "hetlora": "hafl",
          "flexlora": "hafl", "cgfedllm": "cgfedllm", "fedbiot": "fedbiot", "fedot": "fedbiot", "offsite_tuning": "fedbiot",
          "fedsb": "fedsb", "fed_sb": "fedsb", "fedsa_lora": "fedsa_lora", "fedsa": "fedsa_lora",
          "fedkseed": "fedkseed", "fed_kseed": "fedkseed"}
FLOWER_ROWS = {
    "fedit": ["method=fedit"],
    "flasc": ["method=flasc", "method_options={d_dl: 0.25, d_ul: 0.125}", "wire.up=int8+zstd"],
    # clients build the compressed model from a one-time message and never load the full model
    "fedbiot": ["method=fedbiot", "model.name=tiny-llama-8", "data.source=alpaca", "data.path=null", "data.max_length=48",
                "data.max_test_examples=16", "method_options={prealign_steps: 2, align_steps: 1, align_batch: 2, "
                "public_max_examples: 32}"],
    # per-client ranks and frozen components kept on the nodes
    "hafl": ["method=hafl", "lora.rank=4", "lora.alpha=4",
             "method_options={tiers: [{rank: 2, share: 0.5}, {rank: 4, share: 0.5}]}"],
    # the TGAP round, then the autoencoder sent and used
    "cgfedllm": ["method=cgfedllm", "lora.train_head=false",
                 "method_options={tgap_rounds: 1, ae_epochs: 2, ae_lr: 0.001, ae_gate: warn}"],
    # the gradient round, then the basis sent once and kept on the nodes
    "fedsb": ["method=fedsb"],
    # A travels, B stays on the nodes; the nodes score their clients' own models (personalised evaluation)
    "fedsa_lora": ["method=fedsa_lora", "eval.personal_clients=2", "eval.personal_examples=8"],
    # seeds and scalars only; each client replays the rounds it missed from its own synchronised model
    "fedkseed": ["method=fedkseed", "method_options={num_seeds: 16}", "train.lr=0.0001"],
}


def test_every_registered_method_has_a_flower_family():
    assert set(FAMILY) == set(METHODS) and set(FAMILY.values()) == set(FLOWER_ROWS)
    for method, family in FAMILY.items():  # a family's methods share its exchange code: the family's root class
        mro = METHODS[family].__mro__
        root = mro[mro.index(Method) - 1]
        assert issubclass(METHODS[method], root), (method, family)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One federation for the whole matrix, as a real one serves run after run: its SuperNodes and their
    workers start once (each run is a new experiment to them), not once a method."""
    with LocalFederation(tmp_path_factory.mktemp("flower"), nodes=3) as fed:
        yield fed


@pytest.mark.deploy
@pytest.mark.xdist_group("flower-matrix")  # pytest -n N --dist loadgroup: the whole matrix on one worker, one federation
@pytest.mark.parametrize("family", sorted(FLOWER_ROWS))
def test_a_flower_run_equals_the_simulation_and_its_ledger_equals_the_wire(tmp_path, tiny_cfg, family, federation):
    overrides = tiny_cfg + ["rounds=2", "num_clients=6", "clients_per_round=3"] + FLOWER_ROWS[family]
    sim = simulate(tmp_path, overrides)
    earlier = wire_files(federation)
    try:
        flower_run(federation, overrides, tmp_path / "flower-run")
    finally:
        federation.kill_serverapps()  # a failed run's ServerApp must not hold up the next family's
    wire = node_wire(federation, earlier)
    run = tmp_path / "flower-run"
    assert_same_adapter(run, sim)
    assert read_ledger(run / "ledger.jsonl") == read_ledger(sim / "ledger.jsonl")
    assert ledger_pairs(run) == wire and len(wire) == 2 * 3  # every message, as the nodes counted it
    evals = ledger_pairs(run, "eval")
    assert evals == node_wire(federation, earlier, "eval") and (bool(evals) == (family == "fedsa_lora"))
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1].get("personal_accuracy") == \
        [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()][-1].get("personal_accuracy")
    assert json.loads((run / "summary.json").read_text())["final_metrics"] == \
        json.loads((sim / "summary.json").read_text())["final_metrics"]


def test_a_refused_reply_changes_nothing_and_the_round_ends_as_without_it(overrides, tmp_path):
    """``aggregate`` refuses a reply with a lying example count before it changes any state (the protocol's
    contract), so the engine can drop that one client: the round then ends exactly as if it had not replied."""
    from fedzip.engine.rounds import aggregate_valid
    from fedzip.errors import PayloadError
    from fedzip.wire import Message

    cfg, cls, server = server_for(overrides)
    client = cls(cfg, server.rt)
    store = ClientStateStore(tmp_path / "store")
    one_round(cfg, server, client, 1, store)
    cids = sample_clients(cfg.seed, 2, cfg.num_clients, cfg.clients_per_round)
    messages = server.configure(2, cids)
    replies = {cid: decode(run_client(client, store, 2, cid, encode(messages[cid], server.wire_codec("down")), {}).up,
                           server.up_spec(cid, 2)) for cid in cids}
    bad = cids[0]
    liar = dict(replies) | {bad: Message(replies[bad].tensors, replies[bad].meta | {"num_examples": -5})}

    def state_bytes():
        save_server_state(server.server_state(), tmp_path / "state.safetensors")
        return (tmp_path / "state.safetensors").read_bytes()

    before = state_bytes()
    with pytest.raises(PayloadError):
        server.aggregate(2, liar)
    assert state_bytes() == before
    _, refused = aggregate_valid(server, 2, liar)
    assert list(refused) == [bad]
    after_refusal = state_bytes()
    others = {c: r for c, r in replies.items() if c != bad}
    if not others:  # a one-client method: without DP, a round with no reply leaves the state as it was
        assert after_refusal == before
        return
    server.load_server_state(load_server_state(_write(tmp_path / "b.safetensors", before)))
    server.aggregate(2, others)
    assert state_bytes() == after_refusal


def _write(path, data: bytes):
    path.write_bytes(data)
    return path

"""Experiment configuration: YAML files plus ``--set key=value`` overrides, validated into typed objects.

Every model forbids unknown keys, so a typo is an error that names the key rather than a silent default.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedzip.errors import ConfigError, FedzipError
from fedzip.paths import default_data_root
from fedzip.registry import method_class, method_names

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class DataConfig(Section):
    source: Literal["bbc_news", "20newsgroups", "gsm8k", "alpaca", "jsonl", "csv", "tsv", "parquet"] = Field(
        "bbc_news", description="a named data set (bbc_news, 20newsgroups, gsm8k, alpaca) or your own file "
                                "(csv, tsv, jsonl, parquet; with data.path)")
    root: str | None = Field(None, description="data root; default $FEDZIP_DATA, then <fedzip cache>/data")
    path: str | None = Field(None, description="file for jsonl/csv/tsv/parquet/alpaca sources")
    test_path: str | None = Field(None, description="your own test file; without it data.test_fraction is held out")
    header: bool = Field(True, description="csv/tsv: the first row names the columns; false: columns by position")
    # A column by name or by 0-based position; text may join several columns (e.g. title + body).
    text_column: str | int | list[str | int] = Field(
        "text", description="classification: the text column, by name or 0-based position; a list joins several "
                            "(by a newline)")
    label_column: str | int = Field("label", description="classification: the label column, by name or position")
    prompt_column: str | int = Field("prompt", description="causal LM: the prompt column, by name or position")
    answer_column: str | int = Field("answer", description="causal LM: the answer column (the loss is taken on it)")
    remove: list[Literal["headers", "footers", "quotes"]] = Field(
        default_factory=list, description="20 Newsgroups: any of headers, footers, quotes")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per example (causal LM: the prompt is cut "
                                                            "from the left first)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share for sources without a test split")
    max_train_examples: int | None = Field(None, ge=1, description="a seeded subset of the training data")
    max_test_examples: int | None = Field(None, ge=1, description="a seeded subset of the test data")
    label_names: list[str] | None = Field(None, description="the label space every party agrees on, in label-id "
                                          "order; needed when clients bring their own data (deploy.client_data)")


class PartitionConfig(Section):
    scheme: Literal["iid", "dirichlet", "shards", "field"] = Field(
        "dirichlet", description="iid; dirichlet over labels (alpha); shards (label-sorted, shards_per_client "
                                 "each); field (one client per value of a metadata column)")
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration (smaller: more skewed clients)")
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards each client gets")
    field: str | None = Field(None, description="field: the metadata column whose values are the clients")
    min_examples: int = Field(1, ge=0, description="the smallest client allowed")


class ModelConfig(Section):
    name: str = Field("minilm", description="minilm, smollm2-135m, tiny-bert, tiny-llama, tiny-llama-8 (tests), a "
                                            "Hugging Face name, a local folder, or a .gguf file")
    task: Literal["auto", "classification", "causal_lm"] = Field("auto", description="auto follows the data")
    cache_dir: str | None = Field(None, description="converted models (a GGUF file becomes safetensors once, keyed "
                                                    "by its SHA-256); default $FEDZIP_CACHE or ~/.cache/fedzip")


class LoraConfigSection(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt; all-linear: every linear layer of the body (attention and MLP "
                          "projections, peft's shorthand); unset: the attention projections")
    train_head: bool = Field(True, description="train (and exchange) the classification head")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank "
                                            "(peft's use_rslora; an ablation of FedSA-LoRA)")


class TrainConfig(Section):
    local_epochs: int = Field(1, ge=1, description="passes over the client's data a round")
    max_steps: int | None = Field(None, ge=1, description="cap on local steps a round")
    batch_size: int = Field(16, ge=1, description="examples a local step")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="the client optimizer")
    lr: float = Field(1e-3, gt=0, description="the client learning rate (of round 1 under a schedule)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="client learning rate over rounds: constant, or cosine from lr (round 1) "
                                "towards lr * lr_final_ratio (last round)")
    lr_final_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedule: the fraction of lr left at the end")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, description="the client optimizer's weight decay")
    persist_optimizer_state: bool = Field(False, description="keep each client's optimizer state on disk")
    threads: int | None = Field(None, ge=1, description="CPU threads (1 per process when two share 2 cores); "
                                                        "default: torch's")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
                        description="where the model trains and evaluates: cpu, cuda, cuda:N or auto "
                                    "(cuda when present); payloads and method state stay on the CPU")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: local training under bfloat16 autocast on a GPU (weights, payloads and "
                            "evaluation stay fp32); with device auto and no GPU, training stays fp32")

    @model_validator(mode="after")
    def _precision_needs_a_gpu(self) -> "TrainConfig":
        if self.precision == "bf16" and self.device == "cpu":
            raise ValueError("train.precision: bf16 autocast needs a GPU (train.device: cuda or auto)")
        return self


class WireConfig(Section):
    down: str = Field("fp32", description="the downlink codec: fp32, fp16, bf16 or a chain such as "
                                          "topk(0.05)+int8+zstd (reference/wire-format)")
    up: str = Field("fp32", description="the uplink codec, as wire.down")
    max_payload_bytes: int = Field(2**31, ge=1, description="a larger payload is refused before it is read")

    @field_validator("down", "up", mode="before")
    @classmethod
    def _known_codec(cls, v):
        """A codec name or chain: ``fp16``, ``topk(0.05)+int8+zstd`` or a YAML list of stages."""
        from fedzip.wire import get_codec

        if isinstance(v, list):
            v = "+".join(str(s) for s in v)
        if not isinstance(v, str):
            raise ValueError(f"must be a codec name or a list of codec stages, got {v!r}")
        try:
            return get_codec(v).name
        except FedzipError as exc:
            raise ValueError(str(exc)) from None


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="evaluate every N rounds (the last round always)")
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
    max_examples: int | None = Field(None, ge=1, description="evaluate intermediate rounds on a fixed subset")
    ceval: bool = Field(False, description="causal LM: also C-Eval multiple choice (val split)")
    ceval_max_per_subject: int | None = Field(None, ge=1, description="C-Eval questions per subject (default all)")
    exact_match_examples: int = Field(0, ge=0, description="causal LM: greedy exact match of the final number "
                                      "(GSM8K style) on this many fixed test examples; 0 = off")
    max_new_tokens: int = Field(256, ge=1, description="generation length for exact match")
    personal_clients: int | None = Field(
        None, ge=0, description="clients whose own model is evaluated on test examples drawn like their training "
        "labels (personalised evaluation: the clients score themselves, in a simulation or on their SuperNodes, "
        "and the ledger counts the messages as kind 'eval'); unset: 10 (at most every client) for methods whose "
        "clients keep a model of their own, 0 (off) for the others")
    personal_examples: int = Field(100, ge=1, description="test examples a client's own test set holds")


class DeployConfig(Section):
    """How a round treats clients that do not reply. Timeouts and retries are a deployment's (Flower);
    ``min_reply_fraction`` holds in a simulation too, where a client fails when its training diverges."""

    round_timeout_s: float = Field(600.0, gt=0, description="how long the server waits for a round's replies")
    reply_poll_s: float = Field(0.25, gt=0, le=10, description="how often the server asks the SuperLink for "
                                "replies (Flower's own send_and_receive asks every 3 s)")
    min_reply_fraction: float = Field(0.5, gt=0, le=1, description="share of sampled clients that must reply "
                                      "with a valid update for the round to count; otherwise it is retried "
                                      "(Flower) or the run stops, resumable")
    max_round_retries: int = Field(2, ge=0, description="retries of a round with too few replies before stopping")
    client_data: Literal["shared", "on_nodes"] = Field(
        "shared", description="shared: every node derives its clients' shards from the run's data and seed (a "
        "benchmark federation); on_nodes: each SuperNode's clients split the file named by its node config "
        "(data-file) and the run's data is the server's evaluation data only")


class RecordPrivacyConfig(Section):
    """Record-level DP-SGD on each client (Opacus): per-example clipping and noise in every local step."""

    noise_multiplier: float | None = Field(None, gt=0, description="off unless set; noise std / clip per step")
    clip: float = Field(1.0, gt=0, description="L2 bound on each example's gradient")
    delta: float | None = Field(None, gt=0, lt=1, description="default min(1e-5, 0.01 / the client's example count)")


class PrivacyConfig(Section):
    """Client-level differential privacy (``fedzip.privacy``); off unless ``mode`` says otherwise."""

    mode: Literal["off", "central", "local"] = Field(
        "off", description="central: clients clip, the (trusted) server adds the noise; local: each client "
                           "adds its own noise too, a guarantee against the server at a large cost in accuracy")
    clip: float = Field(1.0, gt=0, description="L2 bound on each client's update (all its tensors together)")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / clip; or give target_epsilon")
    target_epsilon: float | None = Field(None, gt=0, description="calibrate noise_multiplier so the whole run "
                                         "ends at this epsilon")
    delta: float | None = Field(None, gt=0, lt=1, description="default min(1e-5, 0.01 / num_clients)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's RDP or PLD accountant")
    clip_quantile: float | None = Field(None, gt=0, lt=1, description="adaptive clipping (central mode): move the "
                                        "clip each round towards this quantile of the update norms, from `clip`")
    clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: the geometric step")
    clip_max: float | None = Field(None, gt=0, description="adaptive clipping: the clip never grows past this "
                                   "(e.g. `clip`, so it can only follow the update norms down); none: no ceiling")
    clip_count_noise: float | None = Field(None, gt=0, description="adaptive clipping: std of the noise on the "
                                           "count of unclipped updates (default: expected cohort / 20)")
    records: RecordPrivacyConfig = Field(default_factory=RecordPrivacyConfig)
    reproducible: bool = Field(False, description="NOT PRIVATE: derive the cohort and all noise from the run's "
                               "seed, so that runs repeat bit for bit (research on the mechanism); anyone holding "
                               "the config can then replay the noise. Default: operating-system entropy")

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data):
        # ``secure_noise`` (before the default drew from OS entropy): a config or run directory written then
        # still loads; what it asked for is now the default, and seeded noise is ``reproducible``
        if isinstance(data, dict) and "secure_noise" in data:
            data = {k: v for k, v in data.items() if k != "secure_noise"}
        return data

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "PrivacyConfig":
        if self.mode != "off" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.mode == "local" and self.clip_quantile is not None:
            raise ValueError("clip_quantile: adaptive clipping needs the server's count of unclipped updates, "
                             "which local mode does not trust it with; use central")
        if self.clip_max is not None and self.clip_quantile is None:
            raise ValueError("clip_max bounds adaptive clipping: give clip_quantile too (a fixed clip is `clip`)")
        if self.clip_max is not None and self.clip_max < self.clip:
            raise ValueError(f"clip_max {self.clip_max:g} is below the starting clip {self.clip:g}")
        return self


class ExperimentConfig(Section):
    name: str | None = Field(None, description="the run directory's name under runs/ (default "
                                               "<method>-<source>-s<seed>)")
    method: str = Field("fedit", description="a registered method (reference/methods), e.g. fedit, ffa_lora, flasc, "
                                             "hafl, cgfedllm, fedbiot, fedsb, fedsa_lora, fedkseed")
    seed: int = Field(0, description="drives partitioning, client sampling, LoRA and head init, shuffling and dropout "
                                     "(not DP noise: docs on differential privacy)")
    rounds: int = Field(5, ge=1, description="federated rounds")
    num_clients: int = Field(10, ge=1, description="clients in the federation")
    clients_per_round: int = Field(5, ge=1, description="clients sampled a round (the expected cohort under DP)")
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wire: WireConfig = Field(default_factory=WireConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    method_options: dict[str, Any] = Field(default_factory=dict, description="options read by the method")

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) is more than num_clients ({self.num_clients})"
            )
        if self.partition.scheme == "field" and not self.partition.field:
            raise ValueError("partition.field is required when partition.scheme is 'field'")
        try:
            method_cls = method_class(self.method)
        except KeyError as exc:
            raise ValueError(f"method: {exc.args[0]}") from None
        if self.privacy.records.noise_multiplier is not None and not method_cls.record_dp:
            raise ValueError(f"privacy.records: {self.method}'s clients use their data outside the local training "
                             "steps DP-SGD protects (or have no clients), so record-level DP does not hold")
        if self.privacy.mode != "off":
            if not method_cls.client_dp:
                raise ValueError(f"privacy: method {self.method} does not support client-level DP as implemented "
                                 f"(methods that do: {', '.join(n for n in method_names() if method_class(n).client_dp)})")
            if self.privacy.mode == "local" and not method_cls.local_dp:
                raise ValueError(f"privacy.mode local: {self.method}'s upload reveals more than its noisy values "
                                 "(e.g. which entries top-k kept), so local noise does not protect it; use central")
            if self.num_clients < 2:
                raise ValueError("privacy: client-level DP needs more than one client")
        options = method_cls.Options
        if options is None and self.method_options:
            raise ValueError(f"method_options: method {self.method} takes no options")
        if options is not None:
            try:
                options.model_validate(self.method_options)
            except ValidationError as exc:
                raise ValueError(f"method_options.{_format_error(exc)}") from None
        return self

    def data_root(self) -> Path:
        """``data.root``, else ``$FEDZIP_DATA``, else a ``data`` folder in the user's fedzip cache."""
        root = self.data.root or os.environ.get("FEDZIP_DATA")
        return Path(root).expanduser() if root else default_data_root()

    def run_name(self) -> str:
        return self.name or f"{self.method}-{self.data.source}-s{self.seed}"


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    detail = f" (got {got!r})" if err["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict) else ""
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}{detail}{more}" if loc else f"{msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, or the name of a packaged config (``quickstart``, ``b1_fedit`` ...)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (PACKAGED_CONFIGS / f"{path}.yaml", PACKAGED_CONFIGS / str(path)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise ConfigError(f"{p}: not valid YAML{f' (line {line + 1})' if line is not None else ''}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return config_from_dict(apply_overrides(raw, overrides or []))


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[dict[str, str]]:
    """Every configuration key (dotted), its type, default and description, from the schema itself: what the
    configuration reference is generated from, so that it cannot drift from the code."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        rows.append({"key": prefix + name, "type": _type_text(ann), "default": "none" if default is None else
                     json.dumps(default) if not isinstance(default, str) else default,
                     "description": field.description or ""})
    return rows


def _type_text(annotation) -> str:
    """``Literal['a', 'b'] | None`` as ``a, b or none``; other types by name."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in args)
    if args and get_origin(annotation) in (Union, UnionType):
        return " | ".join("none" if a is type(None) else _type_text(a) for a in args)
    if get_origin(annotation) is list:
        return f"list of {_type_text(args[0])}" if args else "list"
    if get_origin(annotation) is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))

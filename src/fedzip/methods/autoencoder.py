"""CG-FedLLM building blocks: the LoRA factor map, learned autoencoders for it, TGAP training, SNR.

ALGORITHMS.md section 5. The factor map stacks every module's ``A^T (d_in x r)`` and ``B (d_out x r)``
side by side into one 2-D map ``X (d x 2*M*L*r)``; rows are zero-padded to the largest ``d`` and both
sides to the autoencoder's stride (a ``packed`` layout, beyond the paper, stacks narrow blocks instead).
The paper's autoencoder is convolutional with a latent of exactly 1/64 of its input; a cheaper
per-block linear autoencoder with a configurable ratio is also provided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedzip.models.lora import lora_a, lora_b, lora_modules


# --- the factor map ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    name: str  # the LoRA tensor
    transpose: bool  # A is stored as A^T, so that every block is (rows x r)
    row: int
    col: int
    rows: int


@dataclass(frozen=True)
class MapLayout:
    blocks: tuple[Block, ...]
    rank: int
    height: int  # padded rows
    width: int  # padded columns

    @property
    def used_width(self) -> int:
        return max(b.col for b in self.blocks) + self.rank

    @property
    def padding(self) -> float:
        """Share of the map that is padding (carries no LoRA value)."""
        return 1 - sum(b.rows for b in self.blocks) * self.rank / (self.height * self.width)


def make_layout(shapes: dict[str, tuple[int, ...]], stride: int = 1, packing: str = "paper") -> MapLayout:
    """Where each factor goes. ``paper``: every module's A^T and B side by side from row 0 (the spec's map);
    ``packed``: blocks stacked down strips of width r, tallest first, each into the first strip with room
    (first-fit decreasing), which removes most padding when modules differ in size (e.g. grouped-query K/V)."""
    modules = lora_modules(shapes)
    if not modules:
        raise ValueError("the factor map needs LoRA modules")
    rank = shapes[lora_a(modules[0])][0]
    parts = [(n, t, rows) for m in modules
             for n, t, rows in ((lora_a(m), True, shapes[lora_a(m)][1]), (lora_b(m), False, shapes[lora_b(m)][0]))]
    up = lambda v: math.ceil(v / stride) * stride  # noqa: E731
    height = up(max(rows for _, _, rows in parts))
    if packing == "paper":
        blocks = [Block(n, t, 0, i * rank, rows) for i, (n, t, rows) in enumerate(parts)]
    elif packing == "packed":
        filled: list[int] = []  # rows used in each strip
        blocks = []
        for n, t, rows in sorted(parts, key=lambda p: -p[2]):
            strip = next((k for k, used in enumerate(filled) if used + rows <= height), None)
            if strip is None:
                strip = len(filled)
                filled.append(0)
            blocks.append(Block(n, t, filled[strip], strip * rank, rows))
            filled[strip] += rows
    else:
        raise ValueError(f"unknown factor map packing {packing!r} (paper or packed)")
    return MapLayout(tuple(blocks), rank, height, up(max(b.col for b in blocks) + rank))


def to_map(tensors: dict[str, torch.Tensor], layout: MapLayout) -> torch.Tensor:
    x = torch.zeros(layout.height, layout.width)
    for b in layout.blocks:
        t = tensors[b.name]
        x[b.row:b.row + b.rows, b.col:b.col + layout.rank] = t.T if b.transpose else t
    return x


def from_map(x: torch.Tensor, layout: MapLayout) -> dict[str, torch.Tensor]:
    out = {}
    for b in layout.blocks:
        t = x[b.row:b.row + b.rows, b.col:b.col + layout.rank]
        out[b.name] = (t.T if b.transpose else t).contiguous()
    return out


# --- signal-to-noise --------------------------------------------------------------------------------
def snr_paper(g: torch.Tensor, g_hat: torch.Tensor) -> float:
    """The paper's definition: ||G||^2 / (||G - G~||^2 / n)."""
    err = float((g - g_hat).square().sum())
    return float(g.square().sum()) / (err / g.numel()) if err > 0 else math.inf


def snr_db(g: torch.Tensor, g_hat: torch.Tensor) -> float:
    """The standard definition in decibels: 10 log10(||G||^2 / ||G - G~||^2)."""
    err = float((g - g_hat).square().sum())
    return 10 * math.log10(float(g.square().sum()) / err) if err > 0 else math.inf


def cosine(g: torch.Tensor, g_hat: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(g.flatten(), g_hat.flatten(), dim=0))


# --- autoencoders -----------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ConvAutoencoder(nn.Module):
    """The paper's shape: 6 stride-2 conv + BN + ReLU stages (1 -> 64 channels) and 3 residual blocks,
    mirrored in the decoder, ending in Tanh. Each side shrinks 64x, 64 channels remain: latent = input / 64."""

    stride = 64

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64, 64, 64)):
        super().__init__()
        enc, ch = [], 1
        for c in channels:
            enc += [nn.Conv2d(ch, c, 4, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            ch = c
        self.encoder = nn.Sequential(*enc, *[ResBlock(ch) for _ in range(3)])
        dec = [ResBlock(ch) for _ in range(3)]
        for c in list(reversed(channels[:-1])) + [1]:
            last = c == 1
            dec += [nn.ConvTranspose2d(ch, c, 4, stride=2, padding=1)]
            dec += [nn.Tanh()] if last else [nn.BatchNorm2d(c), nn.ReLU()]
            ch = c
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (H, W) -> latent (64, H/64, W/64)
        return self.encoder(x[None, None])[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z[None])[0, 0]

    def forward(self, x):  # batched (N, 1, H, W)
        return self.decoder(self.encoder(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class BlockLinearAutoencoder(nn.Module):
    """Cheaper variant: the map is cut into blocks of ``block`` values, each encoded to ``block // ratio``."""

    def __init__(self, block: int = 256, ratio: int = 64):
        super().__init__()
        if block % ratio:
            raise ValueError("block must be a multiple of ratio")
        self.block, self.stride = block, 1
        self.enc = nn.Linear(block, block // ratio)
        self.dec = nn.Sequential(nn.Linear(block // ratio, block), nn.Tanh())

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        flat = x.flatten()
        pad = (-flat.numel()) % self.block
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, self.block), pad

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks, _ = self._blocks(x)
        return self.enc(blocks)

    def decode_to(self, z: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return self.dec(z).flatten()[: shape[0] * shape[1]].view(shape)

    def forward(self, x):  # batched (N, 1, H, W)
        return torch.stack([self.decode_to(self.encode(m[0]), tuple(m[0].shape))[None] for m in x])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_to(self.encode(x), tuple(x.shape))


def normalise(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scale into [-1, 1] for the Tanh output; the scale travels with the payload as one float."""
    scale = float(x.abs().max())
    return (x / scale if scale > 0 else x), scale


@dataclass
class TrainLog:
    """How a TGAP fit went: per-epoch losses (held-out ones when maps were held out) and where it stopped."""

    train_loss: list[float]
    heldout_loss: list[float]
    best_epoch: int  # 1-based; the weights kept are this epoch's
    stopped_early: bool


def train_autoencoder(ae: nn.Module, maps: list[torch.Tensor], epochs: int = 20, lr: float = 2e-4,
                      batch: int = 8, seed: int = 0, device: torch.device | str = "cpu",
                      heldout: list[torch.Tensor] | None = None, patience: int = 0) -> TrainLog:
    """TGAP: fit the autoencoder to the recorded (normalised) factor maps with MSE and Adam.

    With ``heldout`` maps, every epoch ends with their MSE; the weights of the best epoch are kept, and with
    ``patience`` > 0 training stops after that many epochs without a better held-out loss (``epochs`` is then
    a cap). A few hundred Adam steps are not enough for these maps: an all-zero output already scores a low
    MSE on max-abs-normalised maps, and an under-trained autoencoder sits there.

    Trains on ``device`` (e.g. the model's GPU) and leaves the autoencoder on the CPU, where payloads are
    encoded and decoded."""
    g = torch.Generator().manual_seed(seed)
    data = torch.stack([normalise(m)[0] for m in maps])[:, None].to(device)
    held = torch.stack([normalise(m)[0] for m in heldout])[:, None].to(device) if heldout else None
    ae.to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    log = TrainLog([], [], 0, False)
    best, best_state = math.inf, None
    for epoch in range(1, epochs + 1):
        ae.train()
        order = torch.randperm(len(data), generator=g)
        total, seen = 0.0, 0
        for s in range(0, len(data), batch):
            x = data[order[s:s + batch]]
            if len(x) == 1 and len(data) > 1:
                continue  # a batch of one map leaves batch norm nothing to normalise over; the order changes each epoch
            loss = torch.nn.functional.mse_loss(ae(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
        log.train_loss.append(total / max(seen, 1))
        if held is None:
            log.best_epoch = epoch
            continue
        ae.eval()
        with torch.no_grad():
            h = sum(float(torch.nn.functional.mse_loss(ae(held[i:i + batch]), held[i:i + batch], reduction="sum"))
                    for i in range(0, len(held), batch)) / held.numel()
        log.heldout_loss.append(h)
        if h < best * (1 - 1e-4):
            best, log.best_epoch = h, epoch
            best_state = {k: v.detach().clone() for k, v in ae.state_dict().items()}
        elif patience and epoch - log.best_epoch >= patience:
            log.stopped_early = True
            break
    if best_state is not None:
        ae.load_state_dict(best_state)
    ae.eval().to("cpu")
    return log


# --- the quality gate -------------------------------------------------------------------------------
def _blocks(maps: list[torch.Tensor], block: int) -> torch.Tensor:
    """Every map's values cut into rows of ``block`` (the last one zero-padded), all maps stacked."""
    rows = [torch.nn.functional.pad(m.flatten(), (0, (-m.numel()) % block)).view(-1, block) for m in maps]
    return torch.cat(rows).double()


def _mean_cosine(maps: list[torch.Tensor], rebuild) -> float:
    return float(sum(cosine(m, rebuild(m)) for m in maps) / len(maps))


def gate_baselines(train: list[torch.Tensor], heldout: list[torch.Tensor], latent_values: int,
                   block: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean cosine on the (normalised) held-out maps of codecs that send as many values as the autoencoder.

    - ``zero``: the all-zero output (cosine 0 by definition): what a collapsed autoencoder decodes to;
    - ``random_projection``: a fixed Gaussian projection of each block of ``block`` values to ``c`` values, with
      a linear decoder fitted by least squares on the training maps (the cheapest learned linear codec);
    - ``block_pca``: the top ``c`` principal directions of the training blocks (the best linear codec of
      that block size: a linear autoencoder at its optimum);
    - ``topk``: each map's ``latent_values`` largest entries, positions free (favours top-k: its positions
      cost bytes on the wire).
    ``c`` keeps the autoencoder's ratio: ``block * latent_values / map size``, at least 1."""
    train = [normalise(m)[0] for m in train]
    heldout = [normalise(m)[0] for m in heldout]
    numel = heldout[0].numel()
    c = max(1, round(block * latent_values / numel))
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(c, block, generator=g, dtype=torch.float64)
    xtx = torch.zeros(block, block, dtype=torch.float64)  # sums over the training blocks, one map at a time
    ztz = torch.zeros(c, c, dtype=torch.float64)
    ztx = torch.zeros(c, block, dtype=torch.float64)
    for m in train:
        x = _blocks([m], block)
        z = x @ proj.T
        xtx += x.T @ x
        ztz += z.T @ z
        ztx += z.T @ x
    decoder = torch.linalg.lstsq(ztz + 1e-9 * torch.eye(c, dtype=torch.float64), ztx).solution  # c x block
    _, vecs = torch.linalg.eigh(xtx)
    basis = vecs[:, -c:]  # block x c, the top c directions

    def blockwise(rebuild_rows):
        def rebuild(m):
            rows = _blocks([m], block)
            return rebuild_rows(rows).flatten()[:numel].view(m.shape).float()
        return rebuild

    def topk(m):
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.topk(m.flatten().abs(), min(latent_values, numel)).indices] = True
        return (m.flatten() * keep).view(m.shape)

    return {"zero": 0.0,
            "random_projection": _mean_cosine(heldout, blockwise(lambda r: (r @ proj.T) @ decoder)),
            "block_pca": _mean_cosine(heldout, blockwise(lambda r: (r @ basis) @ basis.T)),
            "topk": _mean_cosine(heldout, topk)}


def autoencoder_cosine(ae: nn.Module, maps: list[torch.Tensor]) -> float:
    """Mean cosine between each (normalised) map and the autoencoder's reconstruction of it."""
    with torch.no_grad():
        return _mean_cosine([normalise(m)[0] for m in maps], ae.reconstruct)

"""The networks: a class-conditional U-Net (diffusion), a conditional DCGAN, a VAE and a small classifier.

Modules are pure: they map tensors to tensors and know nothing of schedules, losses, files or devices. Each family
has one config dataclass; the config is saved inside the checkpoint and the module is rebuilt from it
(`build_model(kind, config_dict)`), so an exporter needs no script globals.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


def _from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; allowed: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Diffusion U-Net
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; resolution halves between levels (28, 14, 7)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)   # self-attention after the res blocks of these levels
    num_heads: int = 4
    num_classes: int = 10                       # the class embedding has one more row: the null class
    groups: int = 8
    dropout: float = 0.0
    guidance_input: bool = False                # a guidance-distilled student: forward takes the guidance scale w
    extra_top_blocks: int = 0                   # res blocks after the up path's last, at full resolution, each the
                                                # identity at initialisation (capacity for a student where the
                                                # image's detail is, and it still starts as its teacher)

    def __post_init__(self):
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**(levels-1)")
        if any(lvl >= len(self.channel_mult) for lvl in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} out of range for {len(self.channel_mult)} levels")
        if self.extra_top_blocks < 0:
            raise ValueError(f"extra_top_blocks must be >= 0, got {self.extra_top_blocks}")

    @property
    def null_class(self) -> int:
        return self.num_classes

    to_dict = asdict
    from_dict = classmethod(_from_dict)


# The guidance scale w goes through the timestep embedding's sinusoids as w * GUIDANCE_EMBED_SCALE, so that the scales a
# student is trained on (a few units) are spread over as many frequencies as timesteps are.
GUIDANCE_EMBED_SCALE = 100.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N,) -> (N, dim), as in guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift (FiLM), as guided-diffusion's use_scale_shift_norm
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        n, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, hh * ww).unbind(1)  # (N, h, d, L)
        w = torch.softmax(torch.einsum("nhdi,nhdj->nhij", q, k) / math.sqrt(c // self.heads), dim=-1)  # (N, h, L, L)
        h = torch.einsum("nhij,nhdj->nhdi", w, v).reshape(n, c, hh, ww)
        return x + self.out(h)


class UNet(nn.Module):
    """eps_theta(x_t, t, y) (or v, as the card's prediction_type says): predicts the noise added to x_t.
    y == config.null_class means "no class". With config.guidance_input, forward(x, t, y, w) also takes the guidance
    scale w (N,) and predicts the guided output in one row (Meng et al. 2023, stage one): an embedding of w, its last
    layer zero-initialised, added to the class embedding, so a student copied from its teacher starts as the teacher's
    conditional prediction at every w."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim)
        if c.guidance_input:
            self.guidance_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb_dim, c.groups, c.dropout)]
                cur = ch * mult
                if level in c.attention_levels:
                    blocks.append(Attention(cur, c.num_heads, c.groups))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, c.groups, c.dropout),
                                  Attention(cur, c.num_heads, c.groups),
                                  ResBlock(cur, cur, emb_dim, c.groups, c.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, emb_dim, c.groups, c.dropout)]
                cur = ch * mult
                if level in c.attention_levels:
                    blocks.append(Attention(cur, c.num_heads, c.groups))
                if level != 0 and i == c.num_res_blocks:
                    blocks.append(Upsample(cur))
                self.up.append(nn.ModuleList(blocks))
        self.top = nn.ModuleList(ResBlock(cur, cur, emb_dim, c.groups, c.dropout) for _ in range(c.extra_top_blocks))
        self.out = nn.Sequential(nn.GroupNorm(c.groups, cur), nn.SiLU(), nn.Conv2d(cur, c.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        # x (N, C, H, W), t (N,) float timesteps, y (N,) int64 class ids in [0, num_classes], w (N,) guidance scales
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels)) + self.class_emb(y)  # (N, 4ch)
        if self.config.guidance_input:
            if w is None:
                raise ValueError("this U-Net takes the guidance scale: call it as model(x, t, y, w)")
            emb = emb + self.guidance_mlp(timestep_embedding(w * GUIDANCE_EMBED_SCALE, self.config.base_channels))
        elif w is not None:
            raise ValueError("this U-Net has no guidance input (config.guidance_input is False); call model(x, t, y)")
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for b in blocks:
                h = b(h, emb) if isinstance(b, ResBlock) else b(h)
            hs.append(h)
        for b in self.mid:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for b in blocks:
                h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        for b in self.top:
            h = b(h, emb)
        return self.out(h)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------------------------
# Conditional DCGAN
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GANConfig:
    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 64
    num_classes: int = 10
    gen_channels: int = 64   # generator width at 28x28 (x2, x4 at 14x14 and 7x7)
    disc_channels: int = 64
    disc_norm: str = "batch"  # discriminator normalisation: "batch" or "none" (use "none" with an R1 penalty)
    mbstd: str = "group"      # discriminator minibatch-std channel: over groups of 4 ("group") or within each class

    def __post_init__(self):
        if self.image_size != 28:
            raise ValueError("the DCGAN here is built for 28x28 images")
        if self.disc_norm not in ("batch", "none"):
            raise ValueError(f"disc_norm must be 'batch' or 'none', got {self.disc_norm!r}")
        if self.mbstd not in ("group", "class"):
            raise ValueError(f"mbstd must be 'group' or 'class', got {self.mbstd!r}")

    to_dict = asdict
    from_dict = classmethod(_from_dict)


class Generator(nn.Module):
    """G(z, y) -> image in [-1, 1]. (N, latent_dim), (N,) -> (N, C, 28, 28)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        g = c.gen_channels
        self.label_emb = nn.Embedding(c.num_classes, c.latent_dim)
        self.fc = nn.Sequential(nn.Linear(2 * c.latent_dim, 4 * g * 7 * 7, bias=False), nn.BatchNorm1d(4 * g * 7 * 7), nn.ReLU(True))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * g, 2 * g, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * g), nn.ReLU(True),  # 14x14
            nn.ConvTranspose2d(2 * g, g, 4, 2, 1, bias=False), nn.BatchNorm2d(g), nn.ReLU(True),              # 28x28
            nn.Conv2d(g, c.in_channels, 3, padding=1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.label_emb(y)], dim=1))
        return self.net(h.view(z.shape[0], 4 * self.config.gen_channels, 7, 7))


class MinibatchStd(nn.Module):
    """Appends the batch's mean feature std as one channel (Karras et al. 2018, sec. 3), so D can see a lack of
    variety: without it our conditional G learned to ignore z (every sample of a class alike)."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x):
        n, c, h, w = x.shape
        g = min(self.group, n) if n % min(self.group, n) == 0 else 1
        # sqrt(var + eps) as in StyleGAN: std() has an infinite derivative where the group agrees exactly (the
        # -1 background of real images), which turned an R1 penalty's double backward into NaN
        std = (x.reshape(g, n // g, c, h, w).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (N/g,)
        return torch.cat([x, std.repeat(g)[:, None, None, None].expand(n, 1, h, w)], dim=1)


class ClassMinibatchStd(nn.Module):
    """A minibatch-std channel computed within each class of the batch: each image gets the mean feature std of the
    batch's images of its own class. A conditional G that ignores z makes every image of a class alike, which the
    group version (groups of random classes) cannot see; this one can. Classes with one image in the batch get 0."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, y):
        n, c, h, w = x.shape
        onehot = F.one_hot(y, self.num_classes).to(x.dtype)                   # (N, K)
        count = onehot.sum(0)                                                 # (K,)
        f = x.reshape(n, -1)
        mean = onehot.t() @ f / count.clamp(min=1)[:, None]                    # (K, CHW)
        var = onehot.t() @ (f - mean[y]).pow(2) / count.clamp(min=1)[:, None]  # (K, CHW)
        std = ((var + 1e-8).sqrt().mean(1) * (count > 1).to(x.dtype))[y]       # (N,)
        return torch.cat([x, std[:, None, None, None].expand(n, 1, h, w)], dim=1)


class Discriminator(nn.Module):
    """D(x, y) -> logit: a DCGAN discriminator (BatchNorm after the first layer, LeakyReLU) with a minibatch-std
    channel and a class projection (Miyato & Koyama 2018). With spectral norm on every layer instead of BatchNorm, D
    stayed near chance (loss_d ~1.3) and G collapsed to one image per class within 1000 steps; this D keeps
    G's samples varied (per-class pixel std over z 0.19 vs 0.10 at equal or fewer steps, measured here)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        c = config
        d = c.disc_channels
        norm = nn.BatchNorm2d if c.disc_norm == "batch" else (lambda ch: nn.Identity())
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, d, 4, 2, 1), nn.LeakyReLU(0.2, True),                      # 14x14
            nn.Conv2d(d, 2 * d, 4, 2, 1), norm(2 * d), nn.LeakyReLU(0.2, True),                 # 7x7
        )
        self.mbstd = MinibatchStd() if c.mbstd == "group" else ClassMinibatchStd(c.num_classes)  # +1 channel
        self.head = nn.Sequential(nn.Conv2d(2 * d + 1, 4 * d, 3, 1, 1), norm(4 * d), nn.LeakyReLU(0.2, True))
        self.fc = nn.Linear(4 * d * 7 * 7, 1)
        self.embed = nn.Embedding(c.num_classes, 4 * d * 7 * 7)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.mbstd(h) if isinstance(self.mbstd, MinibatchStd) else self.mbstd(h, y)
        h = self.head(h).flatten(1)
        return self.fc(h).squeeze(1) + (self.embed(y) * h).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 16
    channels: int = 32
    hidden: int = 256
    beta: float = 1.0   # weight of the KL term
    variational: bool = True  # False: a plain deterministic autoencoder (z = the encoder's mean, no KL term), the
                              # baseline that shows why the VAE exists (its latent space has holes)

    def __post_init__(self):
        if self.image_size != 28:
            raise ValueError("the VAE here is built for 28x28 images")

    to_dict = asdict
    from_dict = classmethod(_from_dict)


class Encoder(nn.Module):
    """q(z|x): image in [-1, 1] (N, C, 28, 28) -> (mean, logvar), each (N, latent_dim)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c, k = config, config.channels
        self.net = nn.Sequential(
            nn.Conv2d(c.in_channels, k, 4, 2, 1), nn.SiLU(),       # 14x14
            nn.Conv2d(k, 2 * k, 4, 2, 1), nn.SiLU(),               # 7x7
            nn.Flatten(), nn.Linear(2 * k * 7 * 7, c.hidden), nn.SiLU(),
            nn.Linear(c.hidden, 2 * c.latent_dim),
        )

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """p(x|z): (N, latent_dim) -> image in [-1, 1] (N, C, 28, 28). Usable alone: it is what gets exported."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c, k = config, config.channels
        self.channels = k
        self.fc = nn.Sequential(nn.Linear(c.latent_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, 2 * k * 7 * 7), nn.SiLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * k, k, 4, 2, 1), nn.SiLU(),          # 14x14
            nn.ConvTranspose2d(k, c.in_channels, 4, 2, 1),             # 28x28, Bernoulli logits
        )

    def logits(self, z):
        return self.net(self.fc(z).view(z.shape[0], 2 * self.channels, 7, 7))

    def forward(self, z):
        return torch.sigmoid(self.logits(z)) * 2 - 1


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, x):
        mean, logvar = self.encoder(x)
        if not self.config.variational:
            return self.decoder.logits(mean), mean, logvar
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return self.decoder.logits(z), mean, logvar


# ----------------------------------------------------------------------------------------------------------------
# Classifier (for measuring whether conditional samples show their class)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    channels: int = 32
    dropout: float = 0.3

    to_dict = asdict
    from_dict = classmethod(_from_dict)


class Classifier(nn.Module):
    """Image in [-1, 1] (N, C, 28, 28) -> class logits (N, num_classes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        k = c.channels
        self.net = nn.Sequential(
            nn.Conv2d(c.in_channels, k, 3, padding=1), nn.BatchNorm2d(k), nn.ReLU(True),
            nn.Conv2d(k, k, 3, padding=1), nn.BatchNorm2d(k), nn.ReLU(True), nn.MaxPool2d(2),       # 14
            nn.Conv2d(k, 2 * k, 3, padding=1), nn.BatchNorm2d(2 * k), nn.ReLU(True),
            nn.Conv2d(2 * k, 2 * k, 3, padding=1), nn.BatchNorm2d(2 * k), nn.ReLU(True), nn.MaxPool2d(2),  # 7
            nn.Flatten(), nn.Dropout(c.dropout), nn.Linear(2 * k * 49, 256), nn.ReLU(True), nn.Dropout(c.dropout),
            nn.Linear(256, c.num_classes),
        )

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = {"diffusion": UNetConfig, "gan": GANConfig, "vae": VAEConfig, "classifier": ClassifierConfig}


def build_model(kind: str, config) -> nn.Module:
    """The trained network of a kind, from its config (dataclass or dict): UNet, Generator, VAE or Classifier."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(CONFIGS)}")
    if isinstance(config, dict):
        config = CONFIGS[kind].from_dict(config)
    return {"diffusion": UNet, "gan": Generator, "vae": VAE, "classifier": Classifier}[kind](config)

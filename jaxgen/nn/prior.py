"""A VQ-VAE's two halves for small images: ``ConvVQVAE`` (the autoencoder whose bottleneck is a
grid of codebook indices) and ``CodePrior`` (a small class-conditional causal transformer over
those indices), plus ``sample_codes``, the pure ancestral sampler of the prior.

The prior models a code grid [B, h, w] flattened in raster order to a sequence [B, L], L = h*w:

    input   [class token, c_0, c_1, ..., c_{L-2}]      (positions 0 .. L-1)
    output  logits for     [c_0, c_1, ..., c_{L-1}]    (position i predicts c_i from the label and c_<i)

so position i attends to positions <= i only (a causal mask): the logits at i never depend on
c_i or any later code. With ``num_classes=0`` the first token is one learned start token instead
of a class embedding (an unconditional prior).
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.attention import dot_product_attention
from jaxgen.nn.autoencoder import ConvAutoencoder
from jaxgen.nn.layers import activation, layer_norm
from jaxgen.nn.vq import Quantized, VectorQuantizer


# ------------------------------------------------------------------------------------------------
# the autoencoder
# ------------------------------------------------------------------------------------------------
CODEBOOK_TYPES = ("gradient", "ema")


@flax.struct.dataclass
class VQVAEOutput:
    """What ConvVQVAE returns when called on images.

    reconstruction: [B, H, W, C] (unbounded float; ~[-1, 1] once trained);
    latents: [B, h, w, code_dim] the encoder's outputs before quantizing;
    quantized: the VectorQuantizer's Quantized (z_q, indices int32 [B, h, w], losses, usage).
    """

    reconstruction: jax.Array
    latents: jax.Array
    quantized: Quantized


class ConvVQVAE(ConvAutoencoder):
    """ConvAutoencoder's convolutional encoder/decoder with a vector-quantized bottleneck.

    Encoder: ConvAutoencoder's levels (conv3x3 + act, stride-2 conv3x3 + act per entry of
    ``channels``), then a 1x1 conv to ``code_dim``: latents [B, H/f, W/f, code_dim], f =
    2**len(channels) (8x8 digits: channels of length 1 -> a 4x4 grid, length 2 -> 2x2).
    Quantizer: VectorQuantizer(num_codes, code_dim, beta, legacy=False) with straight-through
    gradients, its codebook chosen by ``codebook``:
      "gradient": a parameter ``quantizer/embedding/embedding`` [num_codes, code_dim] trained by
          the loss codebook + beta * commitment;
      "ema": the EMA ("K-means") codebook in the mutable collection ``"vq_ema"`` (decay
          ``ema_decay``), loss beta * commitment only; called with train=True and
          mutable=["vq_ema"] it updates the codebook and, with dead_code_threshold > 0, restarts
          every code unused for that many consecutive updates at a random encoder output of the
          batch (needs key=).
    Decoder: ConvAutoencoder's (nearest x2 upsampling + conv3x3 per level, conv_out).
    latent_dim must stay 0 (the code is the grid, not a dense vector) and skip False.
    """

    latent_dim: int = 0
    num_codes: int = 64
    code_dim: int = 8
    beta: float = 0.25
    codebook_type: str = "gradient"
    ema_decay: float = 0.99
    dead_code_threshold: int = 0

    def setup(self):
        if self.latent_dim or self.skip:
            raise ConfigError(f"ConvVQVAE quantizes the bottleneck grid: set latent_dim=0 (got "
                              f"{self.latent_dim}) and skip=False (got {self.skip}).")
        if self.num_codes < 2 or self.code_dim < 1:
            raise ConfigError(f"ConvVQVAE: num_codes={self.num_codes} must be >= 2 and code_dim="
                              f"{self.code_dim} >= 1.")
        if self.codebook_type not in CODEBOOK_TYPES:
            raise ConfigError(f"ConvVQVAE: codebook_type={self.codebook_type!r}; choose one of "
                              f"{', '.join(CODEBOOK_TYPES)}.")
        ema = self.codebook_type == "ema"
        if ema and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ConvVQVAE: ema_decay={self.ema_decay} must lie in [0, 1).")
        if self.dead_code_threshold < 0 or (self.dead_code_threshold and not ema):
            raise ConfigError(f"ConvVQVAE: dead_code_threshold={self.dead_code_threshold} restarts codes of "
                              "the EMA codebook: set codebook_type='ema', or 0 (no restarts; must be >= 0).")
        super().setup()
        self.quant_conv = nn.Conv(self.code_dim, (1, 1), dtype=self.dtype)
        self.quantizer = VectorQuantizer(self.num_codes, self.code_dim, beta=self.beta, legacy=False,
                                         use_ema=ema, ema_decay=self.ema_decay,
                                         dead_code_threshold=self.dead_code_threshold)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / 2**len(channels)."""
        return self.image_size // 2 ** len(self.channels)

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] in [-1, 1] -> latents [B, h, w, code_dim] (x's dtype), not yet quantized."""
        return self.quant_conv(self._encode(x)[0])

    def quantize(self, latents: jax.Array, train: bool = False, key: jax.Array | None = None) -> Quantized:
        """latents [B, h, w, code_dim] -> Quantized (straight-through z_q, indices int32 [B, h, w]).

        train/key: the EMA codebook's update and dead-code restarts (codebook_type="ema" only;
        see the class docstring)."""
        return self.quantizer(latents, train=train, key=key)

    def codebook(self) -> jax.Array:
        """The codebook [num_codes, code_dim] float32."""
        return self.quantizer.codebook()

    def decode(self, z_q: jax.Array, skips=None) -> jax.Array:
        """Quantized latents [B, h, w, code_dim] -> images [B, H, W, C] (unbounded float)."""
        return ConvAutoencoder.decode(self, z_q)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Code indices int [B, h, w] in [0, num_codes) -> images [B, H, W, C]."""
        return self.decode(self.codebook()[indices].astype(self.dtype or jnp.float32))  # [B, h, w, D]

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None) -> VQVAEOutput:
        """x: [B, H, W, C] in [-1, 1] -> VQVAEOutput (reconstruction through the straight-through codes).

        train/key: update the EMA codebook (codebook_type="ema", with mutable=["vq_ema"]); the
        output uses the codebook before the update."""
        latents = self.encode(x)
        q = self.quantize(latents, train, key)
        return VQVAEOutput(reconstruction=self.decode(q.z_q), latents=latents, quantized=q)


def dead_code_loss(codebook: jax.Array, indices: jax.Array, targets: jax.Array) -> jax.Array:
    """Pull every code unused in this batch towards its own restart target (float32 scalar).

    codebook: [K, D]; indices: int [...] this batch's assignments; targets: [K, D] one target
    per code (no gradient reaches them), e.g. the current encoder outputs of K fixed training
    positions. Returns sum over unused codes k of ||c_k - sg(t_k)||^2, divided by K.
    A code nobody picks gets no gradient from the codebook loss and would stay dead; this term
    moves it onto its target on the data until it wins assignments (then the term stops acting
    on it). It is the gradient codebook's stateless counterpart of restarting dead codes at random
    encoder outputs (jaxgen.nn.vq.restart_dead_codes, which the EMA codebook does with per-code
    counters in its model state; a restart would overwrite a gradient codebook's parameter, which
    the optimizer owns). Distinct targets matter: pulling every dead code to its nearest encoder output sends
    the dead codes, all near the origin at initialisation, onto the same few points.
    """
    num_codes, dim = codebook.shape
    if targets.shape != (num_codes, dim):
        raise DataError(f"dead_code_loss: targets have shape {tuple(targets.shape)}; pass one per code, "
                        f"[{num_codes}, {dim}].")
    t = jax.lax.stop_gradient(targets).astype(jnp.float32)
    dist = jnp.sum((codebook.astype(jnp.float32) - t) ** 2, axis=-1)  # [K]
    unused = jnp.bincount(indices.reshape(-1), length=num_codes) == 0  # [K]
    return jnp.sum(jnp.where(unused, dist, 0.0)) / num_codes


# ------------------------------------------------------------------------------------------------
# the prior
# ------------------------------------------------------------------------------------------------
class PriorBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)) (causal), then x + MLP(LN(x)). x: [B, L, W]."""

    width: int
    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        b, length, width = x.shape
        head = width // self.num_heads
        h = layer_norm(1e-5, dtype=self.dtype or jnp.float32, name="norm1")(x)
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv.reshape(b, length, 3 * self.num_heads, head), 3, axis=2)  # [B, L, H, Dh] each
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lq, Lk]
        a = dot_product_attention(q, k, v, mask=causal, implementation=self.attention_impl)
        a = nn.Dense(width, dtype=self.dtype, name="proj")(a.reshape(b, length, width))
        x = x + nn.Dropout(self.dropout)(a, deterministic=deterministic)
        h = layer_norm(1e-5, dtype=self.dtype or jnp.float32, name="norm2")(x)
        h = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name="fc1")(h)
        h = nn.Dense(width, dtype=self.dtype, name="fc2")(activation("gelu")(h))  # exact (erf) GELU
        return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class CodePrior(nn.Module):
    """Class-conditional causal transformer over VQ code sequences (see the module docstring).

    apply(v, labels, codes, deterministic=True) -> logits float32 [B, L, num_codes]
      labels: int [B] in [0, num_classes) (ignored, may be None, when num_classes=0);
      codes: int [B, L] in [0, num_codes), raster order; the last code is never read.
    logits[:, i] is the distribution of codes[:, i] given the label and codes[:, :i].
    Dropout (rate ``dropout``) is active with deterministic=False and needs a "dropout" rng.
    """

    num_codes: int = 64
    seq_len: int = 16
    num_classes: int = 10
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    attention_impl: str = "xla"
    dtype: jnp.dtype | None = None

    def setup(self):
        if self.width % self.num_heads:
            raise ConfigError(f"CodePrior: width={self.width} must be divisible by num_heads={self.num_heads}.")
        if self.seq_len < 1 or self.num_codes < 2:
            raise ConfigError(f"CodePrior: seq_len={self.seq_len} must be >= 1 and num_codes="
                              f"{self.num_codes} >= 2.")
        init = nn.initializers.normal(0.02)
        self.code_embed = nn.Embed(self.num_codes, self.width, embedding_init=init)
        self.class_embed = nn.Embed(max(self.num_classes, 1), self.width, embedding_init=init)
        self.pos_embed = self.param("pos_embed", init, (self.seq_len, self.width))
        self.blocks = [PriorBlock(self.width, self.num_heads, self.mlp_ratio, self.dropout,
                                  self.attention_impl, self.dtype) for _ in range(self.depth)]
        self.norm_out = layer_norm(1e-5, dtype=self.dtype or jnp.float32)
        self.head = nn.Dense(self.num_codes, dtype=self.dtype)
        self.embed_dropout = nn.Dropout(self.dropout)

    def __call__(self, labels: jax.Array | None, codes: jax.Array, deterministic: bool = True) -> jax.Array:
        """labels int [B] (or None), codes int [B, L] -> next-code logits float32 [B, L, num_codes]."""
        if codes.ndim != 2 or codes.shape[1] != self.seq_len:
            raise DataError(f"CodePrior: codes have shape {tuple(codes.shape)}; pass int [B, {self.seq_len}] "
                            "(the code grid flattened in raster order).")
        b = codes.shape[0]
        if self.num_classes:
            if labels is None or labels.shape != (b,):
                raise DataError(f"CodePrior is class-conditional: pass labels int [{b}], got "
                                f"{None if labels is None else tuple(labels.shape)}.")
            first = self.class_embed(labels)  # [B, W]
        else:
            first = self.class_embed(jnp.zeros((b,), jnp.int32))  # the start token [B, W]
        tokens = jnp.concatenate([first[:, None], self.code_embed(codes[:, :-1])], axis=1)  # [B, L, W]
        x = tokens + self.pos_embed[None].astype(tokens.dtype)
        x = self.embed_dropout(x, deterministic=deterministic)
        for block in self.blocks:
            x = block(x, deterministic=deterministic)
        return self.head(self.norm_out(x)).astype(jnp.float32)  # [B, L, K]


def sample_codes(prior: CodePrior, params, key: jax.Array, labels: jax.Array | None, num: int,
                 temperature: jax.Array | float = 1.0) -> jax.Array:
    """Ancestral sampling of ``num`` code sequences: int32 [num, L], L = prior.seq_len.

    labels: int [num] class ids (None for an unconditional prior); temperature: float scalar
    (may be traced), the logits are divided by it; temperature <= 0 takes the argmax at every
    position (greedy decoding), which is the limit of temperature -> 0. Position i draws from
    categorical(logits[:, i] / temperature) with key fold_in(key, i). Pure and jittable: one
    lax.fori_loop over positions, each a full forward pass (no key/value cache: L is small).
    """
    length = prior.seq_len
    t = jnp.asarray(temperature, jnp.float32)

    def body(i, codes):
        logits = prior.apply({"params": params}, labels, codes)  # [num, L, K]
        step = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)  # [num, K]
        # shifted so the largest logit is 0: a tiny temperature sends the others to -inf, never
        # two of them to +inf (the argmax limit holds for every t > 0)
        scaled = (step - jnp.max(step, axis=-1, keepdims=True)) / jnp.where(t > 0, t, 1.0)
        drawn = jax.random.categorical(jax.random.fold_in(key, i), scaled, axis=-1)
        pick = jnp.where(t > 0, drawn, jnp.argmax(step, axis=-1)).astype(jnp.int32)  # [num]
        return jax.lax.dynamic_update_index_in_dim(codes, pick, i, axis=1)

    return jax.lax.fori_loop(0, length, body, jnp.zeros((num, length), jnp.int32))


def greedy_codes(prior: CodePrior, params, labels: jax.Array | None, num: int) -> jax.Array:
    """The argmax decoding int32 [num, L], position by position in Python (a reference for tests;
    sample_codes with temperature 0 computes the same in one jitted loop)."""
    apply = jax.jit(prior.apply)  # one compile for the L forward passes
    codes = jnp.zeros((num, prior.seq_len), jnp.int32)
    for i in range(prior.seq_len):
        logits = apply({"params": params}, labels, codes)
        codes = codes.at[:, i].set(jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
    return codes


def code_nll(logits: jax.Array, codes: jax.Array) -> jax.Array:
    """Next-token cross-entropy: logits [B, L, K], codes int [B, L] -> mean nats per code (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, codes[..., None].astype(jnp.int32), axis=-1))


__all__ = ["ConvVQVAE", "VQVAEOutput", "dead_code_loss", "PriorBlock", "CodePrior", "sample_codes",
           "greedy_codes", "code_nll"]

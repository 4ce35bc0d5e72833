"""Vector quantization: pure functions, the ``VectorQuantizer`` module, and diffusers' ``VQModel``.

Pure functions (jittable, no module state; DESIGN.md section 8):

    quantize(z, codebook) -> (z_q, idx)            nearest code, straight-through gradient
    vq_losses(z, codes, beta) -> (codebook, commitment)
    codebook_usage(idx, K) -> (fraction used, perplexity)
    CodebookEMA, ema_init, ema_update              the EMA ("K-means") codebook of VQ-VAE / VQ-VAE-2
    update_unused, restart_dead_codes, ema_reset_codes   dead-code restart

``VectorQuantizer`` wraps them: a gradient-trained codebook (parameter ``embedding/embedding``,
diffusers' ``quantize.embedding.weight`` inside VQModel) or, with ``use_ema=True``, an EMA
codebook kept in the mutable collection ``"vq_ema"`` (like BatchNorm's ``batch_stats``).

``VQModel`` is diffusers' VQ-VAE (encoder, quant_conv, quantize, post_quant_conv, decoder; the
MoVQ ``norm_type="spatial"`` decoder included). Its quantizer is diffusers' gradient codebook.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.layers import conv2d
from jaxgen.nn.vae import NORM_TYPES, Decoder, DiffusersAutoencoder, Encoder

Dtype = Any


# ------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------
def quantize(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z: [..., D]; codebook: [K, D]. Returns (z_q, idx); dz_q/dz is the identity (straight-through).

    idx: int32 [...], the nearest code in Euclidean distance (lowest index on ties); z_q: [..., D]
    in z's dtype, equal in value to codebook[idx] (up to the rounding of z + (c - z)). Distances
    are computed in float32. No gradient reaches the codebook through z_q: use vq_losses for that.
    """
    zf = z.astype(jnp.float32)
    cb = codebook.astype(jnp.float32)
    d = jnp.sum(zf ** 2, -1, keepdims=True) - 2 * zf @ cb.T + jnp.sum(cb ** 2, -1)  # [..., K]
    idx = jnp.argmin(d, -1).astype(jnp.int32)
    codes = codebook[idx].astype(z.dtype)
    return z + jax.lax.stop_gradient(codes - z), idx


def vq_losses(z: jax.Array, codes: jax.Array, beta: float = 0.25, *, legacy: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE's two terms, separately: (codebook loss, commitment loss), float32 scalars.

    z: [..., D] encoder outputs; codes: [..., D] the selected codebook rows (codebook[idx], NOT the
    straight-through z_q, which carries no codebook gradient).
    codebook loss   = mean((sg(z) - codes)^2)        (moves the codes; drop it for an EMA codebook)
    commitment loss = beta * mean((z - sg(codes))^2) (moves the encoder)
    legacy=True puts beta on the codebook term instead, as diffusers' VectorQuantizer does by
    default (legacy=True there too); the sum of the two is then diffusers' ``commit_loss``.
    """
    z = z.astype(jnp.float32)
    codes = codes.astype(jnp.float32)
    codebook_mse = jnp.mean((jax.lax.stop_gradient(z) - codes) ** 2)
    commit_mse = jnp.mean((z - jax.lax.stop_gradient(codes)) ** 2)
    if legacy:
        return beta * codebook_mse, commit_mse
    return codebook_mse, beta * commit_mse


def codebook_usage(idx: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(fraction of the K codes used at least once, perplexity exp(H(p))), float32 scalars.

    idx: int [...] code indices in [0, K); p is their histogram / count. Perplexity is K for a
    uniform use of all codes, 1 when a single code is used.
    """
    counts = jnp.bincount(idx.reshape(-1), length=num_codes).astype(jnp.float32)  # [K]
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.mean((counts > 0).astype(jnp.float32)), jnp.exp(entropy)


@flax.struct.dataclass
class CodebookEMA:
    """Running statistics of an EMA codebook.

    cluster_size: [K] float32, EMA of the number of vectors assigned to each code;
    embed_sum:    [K, D] float32, EMA of the sum of those vectors.
    The codebook is embed_sum / smoothed(cluster_size) (see ema_update).
    """

    cluster_size: jax.Array
    embed_sum: jax.Array


def ema_init(codebook: jax.Array) -> CodebookEMA:
    """Statistics that reproduce ``codebook`` [K, D]: cluster_size 1, embed_sum = codebook (float32)."""
    codebook = jnp.asarray(codebook, jnp.float32)
    return CodebookEMA(cluster_size=jnp.ones(codebook.shape[:1], jnp.float32), embed_sum=codebook)


def ema_update(state: CodebookEMA, z: jax.Array, idx: jax.Array, decay: float = 0.99, eps: float = 1e-5
               ) -> tuple[CodebookEMA, jax.Array]:
    """One EMA step of the codebook (van den Oord et al. 2017, appendix; VQ-VAE-2).

    z: [..., D] encoder outputs; idx: int [...] their codes (from quantize). With n_k the count and
    s_k the sum of the vectors assigned to code k:
        cluster_size <- decay * cluster_size + (1 - decay) * n
        embed_sum    <- decay * embed_sum    + (1 - decay) * s
        N = sum(cluster_size); smoothed_k = (cluster_size_k + eps) / (N + K eps) * N   (Laplace)
        codebook_k   = embed_sum_k / smoothed_k
    Returns (new state, new codebook [K, D] float32). No gradient flows (z is stop_gradient'ed).
    """
    num_codes, dim = state.embed_sum.shape
    z = jax.lax.stop_gradient(z).astype(jnp.float32).reshape(-1, dim)  # [N, D]
    onehot = jax.nn.one_hot(idx.reshape(-1), num_codes, dtype=jnp.float32)  # [N, K]
    counts = jnp.sum(onehot, 0)  # [K]
    sums = onehot.T @ z  # [K, D]
    cluster_size = decay * state.cluster_size + (1 - decay) * counts
    embed_sum = decay * state.embed_sum + (1 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    return CodebookEMA(cluster_size, embed_sum), embed_sum / smoothed[:, None]


def update_unused(unused: jax.Array, idx: jax.Array, num_codes: int) -> jax.Array:
    """unused: int32 [K] consecutive updates without an assignment; idx: int [...] this update's codes.

    Returns the counts after this update: 0 for the codes in idx, previous + 1 for the others.
    """
    used = jnp.bincount(idx.reshape(-1), length=num_codes) > 0
    return jnp.where(used, 0, unused + 1).astype(jnp.int32)


def restart_dead_codes(key: jax.Array, codebook: jax.Array, unused: jax.Array, z: jax.Array, threshold: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Replace the codes unused for ``threshold`` or more updates by random encoder outputs.

    key: PRNG key; codebook: [K, D]; unused: int32 [K] (see update_unused); z: [..., D] encoder
    outputs of the current batch (rows drawn uniformly, with replacement).
    Returns (codebook [K, D], unused [K] with restarted codes reset to 0, restarted bool [K]).
    """
    num_codes, dim = codebook.shape
    z = jax.lax.stop_gradient(z).reshape(-1, dim)  # [N, D]
    rows = jax.random.randint(key, (num_codes,), 0, z.shape[0])  # one candidate per code
    restarted = unused >= threshold
    new_codebook = jnp.where(restarted[:, None], z[rows].astype(codebook.dtype), codebook)
    return new_codebook, jnp.where(restarted, 0, unused).astype(jnp.int32), restarted


def ema_reset_codes(state: CodebookEMA, codebook: jax.Array, restarted: jax.Array) -> CodebookEMA:
    """EMA statistics after a restart: restarted codes get cluster_size 1 and embed_sum = their new value."""
    return CodebookEMA(cluster_size=jnp.where(restarted, 1.0, state.cluster_size),
                       embed_sum=jnp.where(restarted[:, None], codebook.astype(jnp.float32), state.embed_sum))


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class Quantized:
    """What VectorQuantizer returns.

    z_q: [..., D] straight-through quantized latents (input dtype); indices: int32 [...];
    codebook_loss / commitment_loss: float32 scalars (vq_losses); loss: the one to add to the
    training objective (their sum; the commitment term alone for an EMA codebook);
    usage / perplexity: codebook_usage of this batch.
    """

    z_q: jax.Array
    indices: jax.Array
    loss: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    usage: jax.Array
    perplexity: jax.Array


def _codebook_init(num_codes: int):
    """diffusers' initialisation: uniform in [-1/K, 1/K]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1.0 / num_codes, 1.0 / num_codes)

    return init


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of the last axis, diffusers' ``VectorQuantizer`` (plus EMA options).

    z: [..., embedding_dim] -> Quantized (z_q same shape, indices [...]).
    Gradient codebook (default): parameter ``embedding/embedding`` [K, D] (diffusers'
        ``embedding.weight``); loss = vq_losses(z, codes, beta, legacy) summed (diffusers' legacy=True
        default puts beta on the codebook term).
    EMA codebook (use_ema=True): variables in the ``"vq_ema"`` collection: ``embedding`` [K, D],
        ``cluster_size`` [K], ``embed_sum`` [K, D], ``unused`` int32 [K]; no codebook parameter.
        loss = beta * mean((z - sg(codes))^2) (``legacy`` is ignored). With train=True and
        ``mutable=["vq_ema"]`` the call updates them (ema_update with ema_decay / ema_epsilon);
        with dead_code_threshold > 0 it also restarts codes unused for that many updates
        (restart_dead_codes), which needs ``key``. The output uses the codebook before the update.
    """

    num_embeddings: int
    embedding_dim: int
    beta: float = 0.25
    legacy: bool = True
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: int = 0
    param_dtype: Dtype = jnp.float32

    def setup(self):
        k, d = self.num_embeddings, self.embedding_dim
        init = _codebook_init(k)
        if not self.use_ema:
            self.embedding = nn.Embed(k, d, param_dtype=self.param_dtype, embedding_init=init)
            return
        self.ema_embedding = self.variable("vq_ema", "embedding",
                                           lambda: init(self.make_rng("params"), (k, d), jnp.float32))
        self.ema_cluster_size = self.variable("vq_ema", "cluster_size", lambda: jnp.ones((k,), jnp.float32))
        self.ema_embed_sum = self.variable("vq_ema", "embed_sum",
                                           lambda: jnp.asarray(self.ema_embedding.value, jnp.float32))
        self.ema_unused = self.variable("vq_ema", "unused", lambda: jnp.zeros((k,), jnp.int32))

    def codebook(self) -> jax.Array:
        """The codebook [K, D] (the parameter, or the EMA variable)."""
        return self.ema_embedding.value if self.use_ema else self.embedding.embedding

    def __call__(self, z: jax.Array, train: bool = False, key: jax.Array | None = None) -> Quantized:
        """z: [..., embedding_dim] -> Quantized; train/key: the EMA update (use_ema only)."""
        if z.shape[-1] != self.embedding_dim:
            raise DataError(f"VectorQuantizer: input's last axis has {z.shape[-1]} channels, the codebook "
                            f"{self.embedding_dim}.")
        update = self.use_ema and train and not self.is_initializing()
        if update and not self.is_mutable_collection("vq_ema"):
            raise ValueError("VectorQuantizer(use_ema=True): train=True updates the codebook; call apply "
                             "with mutable=['vq_ema'] (and keep the returned state).")
        if update and self.dead_code_threshold > 0 and key is None:
            raise ValueError("VectorQuantizer: dead_code_threshold > 0 restarts codes from random encoder "
                             "outputs; pass key= with train=True.")
        codebook = self.codebook()
        z_q, idx = quantize(z, codebook)
        codes = codebook[idx]
        if self.use_ema:
            codebook_loss, commitment_loss = vq_losses(z, jax.lax.stop_gradient(codes), self.beta)
            loss = commitment_loss
        else:
            codebook_loss, commitment_loss = vq_losses(z, codes, self.beta, legacy=self.legacy)
            loss = codebook_loss + commitment_loss
        usage, perplexity = codebook_usage(idx, self.num_embeddings)
        if update:
            self._ema_step(z, idx, key)
        return Quantized(z_q=z_q, indices=idx, loss=loss, codebook_loss=codebook_loss,
                         commitment_loss=commitment_loss, usage=usage, perplexity=perplexity)

    def _ema_step(self, z: jax.Array, idx: jax.Array, key: jax.Array | None) -> None:
        state = CodebookEMA(self.ema_cluster_size.value, self.ema_embed_sum.value)
        state, codebook = ema_update(state, z, idx, self.ema_decay, self.ema_epsilon)
        unused = update_unused(self.ema_unused.value, idx, self.num_embeddings)
        if self.dead_code_threshold > 0:
            codebook, unused, restarted = restart_dead_codes(key, codebook, unused, z, self.dead_code_threshold)
            state = ema_reset_codes(state, codebook, restarted)
        self.ema_embedding.value = codebook
        self.ema_cluster_size.value = state.cluster_size
        self.ema_embed_sum.value = state.embed_sum
        self.ema_unused.value = unused


# ------------------------------------------------------------------------------------------------
# VQModel
# ------------------------------------------------------------------------------------------------
class VQModel(nn.Module, DiffusersAutoencoder):
    """diffusers' ``VQModel`` (VQ-VAE / VQGAN autoencoder; MoVQ with norm_type="spatial").

    apply(v, x, method="encode") -> h: x [B, H, W, in_channels] float in [-1, 1] -> h
        [B, H/f, W/f, vq_embed_dim] after quant_conv, before quantizing (x's dtype),
        f = 2**(len(block_out_channels) - 1).
    apply(v, h, method="decode", force_not_quantize=False) -> x [B, h f, w f, out_channels] (h's
        dtype float): quantizes h first, as diffusers does. force_not_quantize=True decodes h as
        given; with lookup_from_codebook=True it then reads h as int code indices [B, h, w].
    apply(v, h, method="quantize_latents") -> Quantized (z_q, indices, losses, usage, perplexity).
    apply(v, x, return_quantized=False) -> reconstruction, or (reconstruction, Quantized) for a
        training loss (Quantized.loss is diffusers' commit_loss).
    norm_type="spatial" needs vq_embed_dim == latent_channels (the decoder norms read the codes)
    and block_out_channels that are multiples of 32 (SpatialNorm's 32 groups).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: Any = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False
    force_upcast: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    pt_supported: ClassVar[Mapping[str, Any]] = {**DiffusersAutoencoder.pt_supported, "norm_type": NORM_TYPES}

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    def setup(self):
        self._check_config()
        if self.norm_type == "spatial" and self.embed_dim != self.latent_channels:
            raise ConfigError(f"VQModel: norm_type='spatial' feeds the codes ({self.embed_dim} channels) to "
                              f"SpatialNorms built for latent_channels={self.latent_channels}; set "
                              "vq_embed_dim to latent_channels (or None).")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention, attention_impl=self.attention_impl, **kw)
        self.encoder = Encoder(in_channels=self.in_channels, out_channels=self.latent_channels,
                               down_block_types=self.down_block_types, double_z=False, **common)
        self.quant_conv = conv2d(self.embed_dim, 1, padding=0, **kw)
        self.quantize = VectorQuantizer(self.num_vq_embeddings, self.embed_dim, beta=0.25, legacy=True,
                                        param_dtype=self.param_dtype)
        self.post_quant_conv = conv2d(self.latent_channels, 1, padding=0, **kw)
        self.decoder = Decoder(in_channels=self.latent_channels, out_channels=self.out_channels,
                               up_block_types=self.up_block_types, norm_type=self.norm_type, **common)

    def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: [B, H, W, in_channels] -> h [B, H/f, W/f, vq_embed_dim] (x's dtype), not yet quantized."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x, deterministic)).astype(x.dtype)

    def quantize_latents(self, h: jax.Array) -> Quantized:
        """h: [B, h, w, vq_embed_dim] -> Quantized (straight-through z_q, indices [B, h, w], losses)."""
        self._check_latents(h, self.embed_dim, "h")
        return self.quantize(h)

    def decode(self, h: jax.Array, force_not_quantize: bool = False, deterministic: bool = True) -> jax.Array:
        """h: [B, h, w, vq_embed_dim] float (or int codes [B, h, w], see the class doc) -> images."""
        if force_not_quantize and self.lookup_from_codebook:
            if not jnp.issubdtype(h.dtype, jnp.integer) or h.ndim != 3:
                raise DataError(f"VQModel: lookup_from_codebook decodes int code indices [B, h, w]; got "
                                f"{h.dtype} {tuple(h.shape)}.")
            return self._decode_quantized(self.quantize.codebook()[h], deterministic)  # codes [B, h, w, D]
        self._check_latents(h, self.embed_dim, "h")
        return self._decode_quantized(h if force_not_quantize else self.quantize(h).z_q, deterministic)

    def __call__(self, x: jax.Array, return_quantized: bool = False, deterministic: bool = True):
        """Reconstruct x [B, H, W, in_channels] -> [B, H, W, out_channels] (H, W multiples of f).

        return_quantized=True also returns the Quantized of the latents (its .loss for training).
        """
        q = self.quantize_latents(self.encode(x, deterministic))
        out = self._decode_quantized(q.z_q, deterministic)
        return (out, q) if return_quantized else out

    def _decode_quantized(self, quant: jax.Array, deterministic: bool) -> jax.Array:
        """post_quant_conv + decoder on quantized latents [B, h, w, D] -> images (quant's dtype)."""
        q = quant.astype(self.dtype)
        x = self.decoder(self.post_quant_conv(q), q if self.norm_type == "spatial" else None, deterministic)
        return x.astype(quant.dtype)

"""Masked autoencoder (MAE, He et al. 2021) on a small ViT.

The image is cut into non-overlapping p x p patches (``patchify``); a random ``mask_ratio`` of them
is hidden per example (``jaxgen.corruption.random_masking``: argsort of uniform noise, so shapes
are fixed and the model jits); the encoder embeds and transforms only the visible patches. A light
decoder gets the encoded visible tokens and a shared learned mask token for every hidden patch,
both put back in image order and given positional embeddings, and predicts every patch's pixels.
The loss (``jaxgen.losses.masked_patch_loss``) is taken on the hidden patches only.

The transformer blocks are CLIP's pre-LN encoder layers (``jaxgen.nn.clip.CLIPEncoder``). There
is no class token: features for probes are the mean of the encoder's patch tokens.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.corruption import random_masking
from jaxgen.errors import ConfigError
from jaxgen.nn.clip import CLIPEncoder, TowerSpec

POS_EMBEDS = ("sincos", "learned")


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Images [B, H, W, C] -> patches [B, (H/p)*(W/p), p*p*C], row-major over the patch grid,
    each patch flattened as (row, column, channel)."""
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
    x = x.reshape(b, h // p, p, w // p, p, c)        # [B, gh, p, gw, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)                # [B, gh, gw, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Patches [B, N, p*p*C] of a square grid (N = g*g) -> images [B, g*p, g*p, C]; inverts patchify."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels)     # [B, gh, gw, p, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)                # [B, gh, p, gw, p, C]
    return x.reshape(b, g * p, g * p, channels)


def sincos_pos_embed_2d(grid_size: int, dim: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positional embeddings: float32 [grid_size**2, dim], row-major.

    Half of the dimensions encode the row, half the column; each half is [sin(pos * w_i),
    cos(pos * w_i)] with w_i = 10000 ** (-i / (dim / 4)). dim must be divisible by 4.
    """
    if dim % 4:
        raise ConfigError(f"sin-cos positional embeddings need a width divisible by 4, got {dim}.")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))   # [dim/4]

    def one_axis(pos):  # [M] -> [M, dim/2]
        angles = pos[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    emb = np.concatenate([one_axis(rows.reshape(-1)), one_axis(cols.reshape(-1))], axis=1)
    return emb.astype(np.float32)


class MaskedAutoencoder(nn.Module):
    """ViT masked autoencoder. Images [B, H, W, C] in [-1, 1]; N = (H/p)**2 patches of P = p*p*C values.

    apply(v, x, key)                   -> (pred [B, N, P], mask [B, N] float32, 1 = hidden)
    apply(v, x, method="encode")       -> tokens [B, N, D] of all patches (no masking)
    apply(v, x, method="features")     -> [B, D], the mean of those tokens (for linear probes)
    The masking key is an argument: the module holds no randomness of its own.
    """

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    decoder_hidden_size: int = 32
    decoder_num_layers: int = 1
    decoder_num_heads: int = 4
    mask_ratio: float = 0.75
    pos_embed: str = "sincos"
    hidden_act: str = "gelu"
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    def _spec(self, width: int, layers: int, heads: int, owner: str) -> TowerSpec:
        spec = TowerSpec(width, self.mlp_ratio * width, layers, heads, self.hidden_act, 1e-6, 1.0,
                         dtype=self.dtype, attention_impl=self.attention_impl)
        spec.check(owner)
        return spec

    def setup(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}.")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"pos_embed={self.pos_embed!r}: choose one of {POS_EMBEDS}.")
        grid = self.image_size // self.patch_size
        self.num_patches = grid * grid
        enc = self._spec(self.hidden_size, self.num_layers, self.num_heads, "MaskedAutoencoder encoder")
        dec = self._spec(self.decoder_hidden_size, self.decoder_num_layers, self.decoder_num_heads,
                         "MaskedAutoencoder decoder")
        init = nn.initializers.normal(0.02)
        self.patch_embed = nn.Dense(self.hidden_size, dtype=self.dtype)
        self.encoder = CLIPEncoder(enc)
        self.encoder_norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype)
        self.decoder_embed = nn.Dense(self.decoder_hidden_size, dtype=self.dtype)
        self.mask_token = self.param("mask_token", init, (self.decoder_hidden_size,))
        self.decoder = CLIPEncoder(dec)
        self.decoder_norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype)
        self.decoder_pred = nn.Dense(self.patch_size ** 2 * self.in_channels, dtype=self.dtype)
        if self.pos_embed == "sincos":
            self.enc_pos = jnp.asarray(sincos_pos_embed_2d(grid, self.hidden_size))
            self.dec_pos = jnp.asarray(sincos_pos_embed_2d(grid, self.decoder_hidden_size))
        else:
            self.enc_pos = self.param("enc_pos", init, (self.num_patches, self.hidden_size))
            self.dec_pos = self.param("dec_pos", init, (self.num_patches, self.decoder_hidden_size))

    def encode(self, x: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C] -> tokens [B, K, D] of the patches ``ids_keep`` (int [B, K]; None = all N)."""
        patches = patchify(x, self.patch_size)                                   # [B, N, P]
        pos = jnp.broadcast_to(self.enc_pos.astype(patches.dtype), (x.shape[0],) + self.enc_pos.shape)
        if ids_keep is not None:
            patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)  # [B, K, P]
            pos = jnp.take_along_axis(pos, ids_keep[..., None], axis=1)          # [B, K, D]
        return self.encoder_norm(self.encoder(self.patch_embed(patches) + pos))

    def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """Encoded visible tokens [B, K, D] + ids_restore int [B, N] -> pixel predictions [B, N, P]."""
        h = self.decoder_embed(latent)                                           # [B, K, Dd]
        b, k, d = h.shape
        n = ids_restore.shape[1]
        masks = jnp.broadcast_to(self.mask_token.astype(h.dtype), (b, n - k, d))
        tokens = jnp.concatenate([h, masks], axis=1)                             # [B, N, Dd] shuffled order
        tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)     # back to image order
        tokens = tokens + self.dec_pos.astype(tokens.dtype)[None]
        return self.decoder_pred(self.decoder_norm(self.decoder(tokens)))

    def __call__(self, x: jax.Array, key: jax.Array, mask_ratio: float | None = None):
        """x [B, H, W, C] -> (pred [B, N, P], mask float32 [B, N], 1 = hidden); ``key`` draws the mask."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, ids_restore, mask = random_masking(key, x.shape[0], self.num_patches, ratio)
        return self.decode(self.encode(x, ids_keep), ids_restore), mask

    def features(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, D]: mean of the encoder's tokens over all patches (no masking)."""
        return jnp.mean(self.encode(x).astype(jnp.float32), axis=1)

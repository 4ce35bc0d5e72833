"""Dense and convolutional autoencoders, optionally skip-connected (U-Net style).

One module serves the plain, denoising and sparse variants: the objective (corruption of the
input, an L1 penalty on the code) lives in ``jaxgen.corruption`` and ``jaxgen.losses``.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.convert.pretrained import Pretrained
from jaxgen.errors import ConfigError
from jaxgen.nn.activations import Activation, activation
from jaxgen.nn.gaussian import DiagonalGaussian

# the names of jaxgen.nn.activations these modules accept as ``act`` ("gelu": exact erf GELU)
AUTOENCODER_ACTIVATION_NAMES = ("relu", "silu", "gelu", "tanh", "elu")


def _act(module) -> Activation:
    """The activation ``module.act`` names (a ConfigError naming the module if it is not one of
    AUTOENCODER_ACTIVATION_NAMES)."""
    return activation(module.act, AUTOENCODER_ACTIVATION_NAMES, field="act", owner=type(module).__name__)


class DenseAutoencoder(nn.Module, Pretrained):
    """MLP encoder [B, H, W, C] -> code [B, latent_dim] and decoder back; images in [-1, 1]."""

    image_size: int = 8
    in_channels: int = 1
    hidden_dims: Sequence[int] = (256, 128)
    latent_dim: int = 2
    act: str = "relu"
    dtype: jnp.dtype | None = None

    pt_library: ClassVar[str] = "jaxgen"
    pt_weights_name: ClassVar[str] = "model"

    def setup(self):
        self.encoder_layers = [nn.Dense(h, dtype=self.dtype) for h in self.hidden_dims]
        self.to_code = nn.Dense(self.latent_dim, dtype=self.dtype)
        self.decoder_layers = [nn.Dense(h, dtype=self.dtype) for h in reversed(self.hidden_dims)]
        self.to_pixels = nn.Dense(self.image_size ** 2 * self.in_channels, dtype=self.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] in [-1, 1] -> code [B, latent_dim]."""
        act = _act(self)
        h = x.reshape(x.shape[0], -1)  # flatten pixels: [B, H*W*C]
        for layer in self.encoder_layers:
            h = act(layer(h))
        return self.to_code(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, latent_dim] -> images [B, H, W, C] (unbounded; ~[-1, 1] once trained)."""
        act = _act(self)
        h = z
        for layer in self.decoder_layers:
            h = act(layer(h))
        h = self.to_pixels(h)
        return h.reshape(z.shape[0], self.image_size, self.image_size, self.in_channels)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, C] -> (reconstruction [B, H, W, C], code [B, latent_dim])."""
        z = self.encode(x)
        return self.decode(z), z

    def dummy_inputs(self):
        return (jnp.zeros((1, self.image_size, self.image_size, self.in_channels)),), {}


class ConvAutoencoder(nn.Module, Pretrained):
    """Convolutional autoencoder with a dense code; ``skip=True`` concatenates each encoder
    feature map into the decoder at the same resolution (U-Net style).

    Encoder level i: conv3x3(channels[i]) + act (kept for the skip), then a stride-2 conv3x3.
    Bottleneck: flatten -> Dense(hidden_dim) -> Dense(latent_dim) (or no dense code when
    latent_dim == 0: the code is the bottleneck feature map). Decoder mirrors it with nearest x2
    upsampling. image_size must be divisible by 2**len(channels).
    """

    image_size: int = 8
    in_channels: int = 1
    channels: Sequence[int] = (32, 64)
    hidden_dim: int = 128
    latent_dim: int = 2
    skip: bool = False
    act: str = "relu"
    dtype: jnp.dtype | None = None

    pt_library: ClassVar[str] = "jaxgen"
    pt_weights_name: ClassVar[str] = "model"

    def setup(self):
        if self.image_size % (2 ** len(self.channels)):
            raise ConfigError(f"image_size={self.image_size} must be divisible by 2**len(channels)="
                              f"{2 ** len(self.channels)}; use fewer channel levels.")
        conv = lambda ch, stride=1: nn.Conv(ch, (3, 3), strides=(stride, stride), padding=1, dtype=self.dtype)
        self.enc_convs = [conv(ch) for ch in self.channels]
        self.enc_downs = [conv(ch, 2) for ch in self.channels]
        self.bottom = self.image_size // 2 ** len(self.channels)
        if self.latent_dim:
            self.enc_hidden = nn.Dense(self.hidden_dim, dtype=self.dtype)
            self.to_code = nn.Dense(self._code_width(), dtype=self.dtype)
            self.dec_hidden = nn.Dense(self.hidden_dim, dtype=self.dtype)
            self.from_code = nn.Dense(self.bottom ** 2 * self.channels[-1], dtype=self.dtype)
        self.dec_ups = [conv(ch) for ch in reversed(self.channels)]
        self.dec_convs = [conv(ch) for ch in reversed(self.channels)]
        self.conv_out = nn.Conv(self.in_channels, (3, 3), padding=1, dtype=self.dtype)

    def _code_width(self) -> int:
        return self.latent_dim

    def _encode(self, x):
        act = _act(self)
        skips, h = [], x
        for c, d in zip(self.enc_convs, self.enc_downs):
            h = act(c(h))
            skips.append(h)
            h = act(d(h))
        if self.latent_dim:
            h = h.reshape(h.shape[0], -1)  # [B, bottom*bottom*C]
            h = self.to_code(act(self.enc_hidden(h)))
        return h, skips

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] in [-1, 1] -> code [B, latent_dim] (or the bottleneck map if latent_dim=0)."""
        return self._encode(x)[0]

    def decode(self, z: jax.Array, skips: Sequence[jax.Array] | None = None) -> jax.Array:
        """code -> images [B, H, W, C]. A skip model needs the encoder's maps (``skips``)."""
        if self.skip and skips is None:
            raise ValueError("a skip-connected autoencoder decodes only with its encoder's feature "
                             "maps: call the module on images (reconstruct), not decode(codes).")
        act = _act(self)
        h = z
        if self.latent_dim:
            h = act(self.from_code(act(self.dec_hidden(z))))
            h = h.reshape(z.shape[0], self.bottom, self.bottom, self.channels[-1])
        for i, (up, c) in enumerate(zip(self.dec_ups, self.dec_convs)):
            b, hh, ww, ch = h.shape
            h = jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), "nearest")
            h = act(up(h))
            if self.skip:
                h = jnp.concatenate([h, skips[len(skips) - 1 - i]], axis=-1)
            h = act(c(h))
        return self.conv_out(h)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, C] -> (reconstruction [B, H, W, C], code)."""
        z, skips = self._encode(x)
        return self.decode(z, skips if self.skip else None), z

    def dummy_inputs(self):
        return (jnp.zeros((1, self.image_size, self.image_size, self.in_channels)),), {}


class ConvVAE(ConvAutoencoder):
    """Variational autoencoder on ConvAutoencoder's encoder/decoder (no skips).

    The encoder gives a DiagonalGaussian posterior over a [B, latent_dim] code; the decoder gives
    Bernoulli logits over pixels in [0, 1] (``decode_logits``); ``decode`` maps them to images in
    [-1, 1] (2·sigmoid − 1). Loss (in the task): −log p(x|z) + β·KL(q(z|x) || N(0, I)).
    """

    def setup(self):
        if self.skip or not self.latent_dim:
            raise ConfigError("ConvVAE needs skip=False and latent_dim > 0.")
        super().setup()

    def _code_width(self) -> int:
        return 2 * self.latent_dim  # mean and log-variance

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: [B, H, W, C] in [-1, 1] -> posterior over codes [B, latent_dim]."""
        return DiagonalGaussian.from_moments(self._encode(x)[0])

    def decode_logits(self, z: jax.Array) -> jax.Array:
        """z: [B, latent_dim] -> Bernoulli logits [B, H, W, C] of pixels in [0, 1]."""
        return ConvAutoencoder.decode(self, z)

    def decode(self, z: jax.Array, skips=None) -> jax.Array:
        """z: [B, latent_dim] -> images [B, H, W, C] in [-1, 1] (the Bernoulli means, rescaled)."""
        return jnp.tanh(0.5 * self.decode_logits(z))  # == 2 * sigmoid(l) - 1

    def __call__(self, x: jax.Array, key: jax.Array | None = None):
        """x -> (logits [B, H, W, C], posterior). With ``key`` the decoder sees a posterior sample
        (reparameterised), without it the posterior mean."""
        q = self.encode(x)
        z = q.mode() if key is None else q.sample(key)
        return self.decode_logits(z), q

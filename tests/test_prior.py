"""CodePrior (causal transformer over VQ codes), its sampler, ConvVQVAE and the dead-code pull."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, DataError
from jaxgen.nn.prior import (CodePrior, ConvVQVAE, code_nll, dead_code_loss, greedy_codes,
                             sample_codes)

K, L = 12, 6


def _init(model, labels, codes, scale):
    """Jitted init (op-by-op init compiles every primitive separately), then each leaf plus
    scale * N(0, 1) noise from NumPy, so the logits vary clearly between positions and classes."""
    params = jax.jit(model.init)(jax.random.key(0), labels, codes)["params"]
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def prior():
    model = CodePrior(num_codes=K, seq_len=L, num_classes=3, width=32, depth=2, num_heads=4, dropout=0.0)
    return model, _init(model, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L), jnp.int32), 0.3)


def test_causal_mask_later_codes_never_change_earlier_logits(prior):
    model, params = prior
    labels = jnp.array([0, 1, 2, 1], jnp.int32)
    codes = jax.random.randint(jax.random.key(1), (4, L), 0, K)
    apply = jax.jit(lambda c, y=labels: model.apply({"params": params}, y, c))
    base = apply(codes)
    assert base.shape == (4, L, K) and base.dtype == jnp.float32
    for j in range(L):
        changed = codes.at[:, j].set((codes[:, j] + 1 + j) % K)
        out = apply(changed)
        # logits at i predict code i from codes < i: positions 0..j must not move
        np.testing.assert_array_equal(np.asarray(out[:, :j + 1]), np.asarray(base[:, :j + 1]))
        if j < L - 1:  # ...and the next one must (the mask is not hiding everything)
            assert not np.allclose(out[:, j + 1], base[:, j + 1])
    other = apply(codes, (labels + 1) % 3)
    assert not np.allclose(other[:, 0], base[:, 0])  # position 0 reads the class token


def test_zero_temperature_is_argmax_decoding(prior):
    model, params = prior
    labels = jnp.array([0, 1, 2, 0, 1], jnp.int32)
    sampler = jax.jit(lambda k, t: sample_codes(model, params, k, labels, 5, t))
    greedy = np.asarray(greedy_codes(model, params, labels, 5))
    for seed in range(3):
        np.testing.assert_array_equal(np.asarray(sampler(jax.random.key(seed), 0.0)), greedy)
        # the limit: a tiny positive temperature samples the argmax too
        np.testing.assert_array_equal(np.asarray(sampler(jax.random.key(seed), 1e-4)), greedy)
        np.testing.assert_array_equal(np.asarray(sampler(jax.random.key(seed), 1e-38)), greedy)
    drawn = np.asarray(sampler(jax.random.key(0), 1.0))
    assert drawn.dtype == np.int32 and drawn.shape == (5, L) and drawn.min() >= 0 and drawn.max() < K
    assert not (drawn == greedy).all()  # temperature 1 actually samples


def test_sampling_follows_the_model_distribution():
    # one position, no context beyond the class: samples must match softmax(logits / t)
    model = CodePrior(num_codes=4, seq_len=1, num_classes=2, width=16, depth=1, num_heads=2, dropout=0.0)
    params = _init(model, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32), 0.3)
    n, t = 8000, 0.7
    labels = jnp.ones((n,), jnp.int32)
    logits, drawn = jax.jit(lambda p, k: (model.apply({"params": p}, labels[:1], jnp.zeros((1, 1), jnp.int32)),
                                          sample_codes(model, p, k, labels, n, t)))(params, jax.random.key(3))
    want = np.asarray(jax.nn.softmax(logits[0, 0] / t))
    assert want.max() < 0.9  # a distribution worth testing, not a near-delta
    got = np.bincount(np.asarray(drawn)[:, 0], minlength=4) / n
    np.testing.assert_allclose(got, want, atol=0.02)


def test_unconditional_prior_and_errors():
    model = CodePrior(num_codes=K, seq_len=L, num_classes=0, width=16, depth=1, num_heads=2)
    params = jax.jit(model.init)(jax.random.key(0), None, jnp.zeros((2, L), jnp.int32))["params"]

    @jax.jit
    def sample_and_score(p, key):
        codes = sample_codes(model, p, key, None, 3, 1.0)
        return codes, code_nll(model.apply({"params": p}, None, codes), codes)

    codes, nll = sample_and_score(params, jax.random.key(0))
    assert codes.shape == (3, L) and float(nll) > 0
    cond = CodePrior(num_codes=K, seq_len=L, num_classes=3, width=16, depth=1, num_heads=2)
    shapes = lambda m, *a: jax.eval_shape(m.init, jax.random.key(0), *a)  # the checks, without compiling
    with pytest.raises(DataError, match="class-conditional"):
        shapes(cond, None, jnp.zeros((2, L), jnp.int32))
    with pytest.raises(DataError, match=rf"\[B, {L}\]"):
        shapes(cond, jnp.zeros((2,), jnp.int32), jnp.zeros((2, L + 1), jnp.int32))
    with pytest.raises(ConfigError, match="divisible"):
        shapes(CodePrior(width=30, num_heads=4), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 16), jnp.int32))


def test_conv_vqvae_shapes_and_straight_through():
    model = ConvVQVAE(image_size=8, in_channels=1, channels=(16,), num_codes=10, code_dim=4)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    @jax.jit
    def run(p):
        out = model.apply({"params": p}, x)
        via_indices = model.apply({"params": p}, out.quantized.indices, method="decode_indices")
        # the encoder gets gradient from the reconstruction through the straight-through codes
        g = jax.grad(lambda q: jnp.sum(model.apply({"params": q}, x).reconstruction))(p)
        return out, via_indices, g

    out, via_indices, g = run(params)
    assert out.reconstruction.shape == x.shape and out.latents.shape == (3, 4, 4, 4)
    assert out.quantized.indices.shape == (3, 4, 4) and out.quantized.indices.dtype == jnp.int32
    codebook = params["quantizer"]["embedding"]["embedding"]
    np.testing.assert_allclose(out.quantized.z_q, codebook[out.quantized.indices], atol=1e-6)
    np.testing.assert_allclose(via_indices, out.reconstruction, atol=1e-5)
    assert float(jnp.abs(g["quant_conv"]["kernel"]).sum()) > 0
    with pytest.raises(ConfigError, match="latent_dim=0"):
        jax.eval_shape(ConvVQVAE(latent_dim=4).init, jax.random.key(0), x)


def test_dead_code_loss_pulls_only_unused_codes_to_their_targets():
    codebook = jnp.array([[0.1, 0.0], [1.0, 0.1], [5.0, 5.0], [-3.0, 0.0]])
    targets = jnp.array([[9.0, 9.0], [9.0, 9.0], [1.0, 1.0], [0.0, 0.0]])
    idx = jnp.array([[0, 1], [0, 0]])  # codes 2 and 3 unused
    loss = dead_code_loss(codebook, idx, targets)
    np.testing.assert_allclose(float(loss), ((16 + 16) + 9) / 4, rtol=1e-6)
    g = jax.grad(dead_code_loss)(codebook, idx, targets)
    np.testing.assert_array_equal(np.asarray(g[:2]), 0)  # used codes untouched
    np.testing.assert_allclose(np.asarray(g[3]), [2 * -3.0 / 4, 0.0], rtol=1e-6)  # towards (0, 0)
    assert float(jnp.abs(jax.grad(dead_code_loss, argnums=2)(codebook, idx, targets)).sum()) == 0
    with pytest.raises(DataError, match=r"\[4, 2\]"):
        dead_code_loss(codebook, idx, targets[:3])

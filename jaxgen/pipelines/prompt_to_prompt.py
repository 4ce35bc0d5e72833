"""Prompt-to-Prompt (Hertz et al. 2022, arXiv 2208.01626): editing a generated image by editing
its prompt, with the cross-attention maps of the source held fixed, inside one compiled loop.

    pipe = jaxgen.StableDiffusionPipeline.from_pretrained(folder)      # or a text-to-image run's
    src, edit = pipe.prompt_to_prompt("a large red circle on the left",
                                      "a large blue circle on the left", mode="replace",
                                      cross_replace_steps=0.8, self_replace_steps=0.4)
    # src, edit: float32 [P, H, W, 3] in [0, 1]
    images, maps, tokens = pipe.attention_maps("a large red circle on the left")
    # maps: float32 [B, r, r', 77], per-token cross-attention averaged over heads, layers, steps

How (all of it in one ``lax.scan``; jaxgen.nn.attention_control carries the controller):

* Batch: the P source prompts then the P edit prompts, the same initial latents (and, for
  stochastic schedulers, the same per-step noise) for a pair; with classifier-free guidance the
  U-Net sees [uncond; cond] (4P rows) and only the conditional half is edited, as the authors'
  code does.
* The controller (``PromptToPromptController``) sees every attention layer. Cross-attention of an
  edit row at ladder index i becomes ``a[i, w] base + (1 - a[i, w]) own`` per token w, with
  ``a[i, w]`` = 1 while ``i`` lies in ``[int(s n), int(e n))`` for the word's cross_replace_steps
  (s, e) (a float f is (0, f); a dict gives words their own, "default_" the rest; n ladder
  entries), and base:
    - replace: the source row's maps (token for token: both prompts must have the same token
      count; word swap);
    - refine: the source maps gathered through the token alignment of the two prompts (longest
      common subsequence of the token ids); tokens without a source partner (added words) keep
      their own maps;
    - reweight: refine's base (the source maps themselves when the prompts are equal) times the
      equalizer (1 for every token but the chosen words' weights; negative weights allowed).
  Self-attention of an edit row is the source row's while ``i`` lies in the self_replace_steps
  window, at layers with at most ``self_max_queries`` (256 = 16 x 16) positions (the authors' rule).
* Attention maps: every cross-attention layer at the map resolution adds its head-averaged
  probabilities (before any edit, as the authors' store) of the conditional rows to a sum in the
  controller state; maps = sum / (layers x steps). The resolution defaults to the finest
  cross-attention resolution of at most 16 x 16 (SD 512: 16 x 16, the authors' choice).
* Local blend (``local_blend_words``): after each scheduler step from ladder index
  ``int(local_blend_start n)`` on, a mask is made from the accumulated maps of the chosen words
  (summed over their tokens, 3x3 max-pooled, resized to the latents by nearest neighbour,
  divided by its maximum, > ``local_blend_threshold``), the union of the source row's and the edit
  row's masks; outside it the edit row's latents are replaced by the source row's.

Run-level: ``run_prompt_to_prompt`` is ``run.prompt_to_prompt`` of a text-to-image run (uint8
out, the run's sampling defaults and its initial latents, so a source image is what run.sample
draws for that prompt and seed); ``pipeline_for`` and ``write_attention_maps`` serve
``train.sample --attention-maps`` and ``train.edit``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.sampling import step_noise
from jaxgen.errors import ConfigError, DataError
from jaxgen.lora import materialize
from jaxgen.nn.attention_control import AttentionController, apply_controlled

F32 = jnp.float32
MODES = ("replace", "refine", "reweight")
_KEY_LATENTS, _KEY_STEPS = 0, 3          # the pipeline's fold_in purposes (stable_diffusion.py)
_TRACES: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------------------------
# the controller (static part; its arrays live in the state)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptToPromptController(AttentionController):
    """Stores cross-attention maps and (mode != "store") edits the edit rows' attention.

    rows: prompts in the batch (2P for P pairs: sources then edits; B for "store"); cfg: the
    U-Net batch is [uncond; cond] (2 rows per prompt); map_queries: positions of the map
    resolution (0: no maps); self_max_queries: self-attention is replaced only at layers with at
    most this many positions.
    State: {"maps": float32 [rows, map_queries, L] (sum), "count": float32 [] (layer-steps summed),
            "inputs": {"mapper": int32 [P, L], "alphas": [P, L], "equalizer": [P, L],
                       "cross": [n, P, L], "self": [n]} (float32; absent for "store")}.
    """

    mode: str
    rows: int
    cfg: bool
    map_queries: int = 0
    self_max_queries: int = 256

    def __call__(self, probs, is_cross, place, block, layer, step, state):
        half = probs.shape[0] - self.rows                   # 0 without guidance
        cond = probs[half:]                                  # [rows, H, Q, K]
        queries = probs.shape[2]
        if is_cross and queries == self.map_queries:
            state = dict(state, maps=state["maps"] + cond.mean(axis=1).astype(F32), count=state["count"] + 1)
        if self.mode == "store":
            return probs, state
        pairs = self.rows // 2
        src, own = cond[:pairs], cond[pairs:]
        inputs = state["inputs"]
        if is_cross:
            if self.mode == "replace":
                base = src
            else:
                gathered = jnp.take_along_axis(src, inputs["mapper"][:, None, None, :], axis=-1)
                a = inputs["alphas"][:, None, None, :]
                base = gathered * a + own * (1 - a)
                if self.mode == "reweight":
                    base = base * inputs["equalizer"][:, None, None, :]
            a = jnp.take(inputs["cross"], step, axis=0)[:, None, None, :]    # [P, 1, 1, L]
            new = base * a + own * (1 - a)
        elif queries <= self.self_max_queries:
            new = jnp.where(jnp.take(inputs["self"], step) > 0, src, own)
        else:
            return probs, state
        out = jnp.concatenate([src, new.astype(probs.dtype)], axis=0)
        return (jnp.concatenate([probs[:half], out], axis=0) if half else out), state


# ------------------------------------------------------------------------------------------------
# tokens: words -> positions, alignment
# ------------------------------------------------------------------------------------------------
def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The displayed tokens of ``prompt`` at positions 0..n-1 of its ids: "<start>", the BPE
    tokens (end-of-word marks removed), "<end>" (padding follows)."""
    body = [t.replace("</w>", "") for t in tokenizer.tokenize(prompt)][: tokenizer.model_max_length - 2]
    return ["<start>", *body, "<end>"]


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions in the prompt's ids (0 = the start token) of every occurrence of ``word`` (one
    or more whole words, case-insensitive); a DataError when it does not occur."""
    tokens = tokenizer.tokenize(prompt)
    want = tokenizer.tokenize(word)
    if not want:
        raise DataError(f"word {word!r} has no tokens; give a word of the prompt {prompt!r}.")
    out = []
    for s in range(len(tokens) - len(want) + 1):
        starts_word = s == 0 or tokens[s - 1].endswith("</w>")
        if starts_word and tokens[s:s + len(want)] == want:
            out.extend(range(s + 1, s + 1 + len(want)))
    if not out:
        words = " ".join(prompt.split())
        raise DataError(f"word {word!r} is not in the prompt {words!r}; name a word it contains.")
    return [p for p in out if p < tokenizer.model_max_length - 1]


def align_tokens(source_ids: Sequence[int], edit_ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token alignment of two prompts for refinement: (mapper int32 [length], alphas float32
    [length]). For each edit position j: mapper[j] = the source position aligned with it, alphas[j]
    = 1; positions of edit tokens without a partner (added words) get alphas 0 (mapper 0).
    source_ids / edit_ids: the framed ids (start .. end) without padding. The alignment is a
    longest common subsequence (match +1, mismatch -1, gap 0, as the authors' aligner scores);
    padding positions j map to the corresponding source padding position."""
    x, y = list(source_ids), list(edit_ids)
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), np.int64)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            score[i, j] = score[i - 1, j - 1] + 1 if x[i - 1] == y[j - 1] else max(score[i - 1, j], score[i, j - 1])
    mapper = np.zeros(length, np.int32)
    alphas = np.zeros(length, np.float32)
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1] and score[i, j] == score[i - 1, j - 1] + 1:
            mapper[j - 1], alphas[j - 1] = i - 1, 1.0
            i, j = i - 1, j - 1
        elif score[i - 1, j] >= score[i, j - 1]:
            i -= 1
        else:
            j -= 1
    pad = np.arange(m, length)
    mapper[m:] = np.minimum(n + (pad - m), length - 1)
    alphas[m:] = 1.0
    return mapper, alphas


# ------------------------------------------------------------------------------------------------
# host-side options
# ------------------------------------------------------------------------------------------------
def _window(value, what: str) -> tuple[float, float]:
    """A fraction f (= (0, f)) or a pair (start, end) with 0 <= start <= end <= 1."""
    pair = (0.0, value) if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        else value
    try:
        start, end = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r}: give a fraction in [0, 1] or a pair (start, end) of them.") from None
    if not (0.0 <= start <= end <= 1.0) or not all(map(math.isfinite, (start, end))):
        raise ValueError(f"{what}={value!r}: fractions of the denoising steps must satisfy "
                         "0 <= start <= end <= 1 (e.g. 0.8, or (0.0, 0.8)).")
    return start, end


def _on(window: tuple[float, float], n: int) -> np.ndarray:
    """float32 [n]: 1 at ladder indices int(start n) <= i < int(end n), else 0."""
    i = np.arange(n)
    return ((i >= int(window[0] * n)) & (i < int(window[1] * n))).astype(np.float32)


def _cross_schedule(tokenizer, edits: list[str], cross, n: int, length: int) -> np.ndarray:
    """float32 [n, P, L]: the cross-attention replacement weight of each edit token per step."""
    spec = dict(cross) if isinstance(cross, Mapping) else {"default_": cross}
    default = _window(spec.pop("default_", 1.0), "cross_replace_steps['default_']")
    out = np.repeat(_on(default, n)[:, None, None], len(edits), 1).repeat(length, 2)
    for word, value in spec.items():
        on = _on(_window(value, f"cross_replace_steps[{word!r}]"), n)
        for p, prompt in enumerate(edits):
            out[:, p, word_positions(tokenizer, prompt, word)] = on[:, None]
    return out


def _equalizer(tokenizer, edits: list[str], equalizer, length: int) -> np.ndarray:
    """float32 [P, L]: 1, except the chosen words' tokens (in the edit prompts) get their weight."""
    out = np.ones((len(edits), length), np.float32)
    if not isinstance(equalizer, Mapping) or not equalizer:
        raise ValueError(f"equalizer={equalizer!r}: give a dict {{word: weight}}, e.g. {{'red': 2.0}}.")
    for word, weight in equalizer.items():
        w = float(weight)
        if not math.isfinite(w):
            raise ValueError(f"equalizer[{word!r}]={weight!r}: weights must be finite numbers.")
        for p, prompt in enumerate(edits):
            out[p, word_positions(tokenizer, prompt, word)] = w
    return out


def _blend_words(tokenizer, sources: list[str], edits: list[str], words, length: int) -> np.ndarray:
    """float32 [2P, L]: 1 at the tokens of the blend words in each source row, then each edit row.
    words: one word, a list of words (each looked up in both prompts of a pair; it must occur in
    at least one), or a pair of lists (source words, edit words; each must occur in its prompt)."""
    if isinstance(words, str):
        words = [words]
    words = list(words) if isinstance(words, (list, tuple)) else []
    paired = len(words) == 2 and all(isinstance(w, (list, tuple)) for w in words)
    if not words or not (paired or all(isinstance(w, str) for w in words)):
        raise ValueError(f"local_blend_words={words!r}: give a word, a list of words, or a pair of lists "
                         "(source words, edit words).")
    pairs = len(sources)
    out = np.zeros((2 * pairs, length), np.float32)
    for p, (src, dst) in enumerate(zip(sources, edits)):
        if paired:
            for row, prompt, chosen in ((p, src, words[0]), (pairs + p, dst, words[1])):
                for w in chosen:
                    out[row, word_positions(tokenizer, prompt, w)] = 1.0
            continue
        for w in words:
            found = [(row, pos) for row, prompt in ((p, src), (pairs + p, dst))
                     if (pos := word_positions_or_none(tokenizer, prompt, w))]
            if not found:
                raise DataError(f"local blend word {w!r} is in neither {src!r} nor {dst!r}; name a word of "
                                "one of the prompts.")
            for row, pos in found:
                out[row, pos] = 1.0
    return out


def word_positions_or_none(tokenizer, prompt: str, word: str) -> list[int] | None:
    """``word_positions``, or None when the word does not occur."""
    try:
        return word_positions(tokenizer, prompt, word)
    except DataError:
        return None


def cross_attention_sizes(unet, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) of the U-Net's cross-attention layers for latents of latent_hw, finest first."""
    n = len(unet.block_out_channels)
    sizes = [tuple(int(v) for v in latent_hw)]
    for _ in range(n - 1):
        sizes.append(tuple(-(-v // 2) for v in sizes[-1]))
    found = {sizes[i] for i, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")}
    found |= {sizes[n - 1 - j] for j, kind in enumerate(unet.up_block_types) if kind.startswith("CrossAttn")}
    if unet.mid_block_type == "UNetMidBlock2DCrossAttn":
        found.add(sizes[n - 1])
    return sorted(found, key=lambda s: -s[0] * s[1])


def map_size(unet, latent_hw: tuple[int, int], resolution: int | None) -> tuple[int, int]:
    """The (h, w) the attention maps are taken at: ``resolution`` (a cross-attention layer's
    height), or the finest cross-attention resolution of height <= 16 (else the coarsest)."""
    sizes = cross_attention_sizes(unet, latent_hw)
    if not sizes:
        raise ConfigError("this U-Net has no cross-attention layers; attention control needs a "
                          "text-conditioned UNet2DConditionModel with CrossAttn blocks.")
    if resolution is None:
        small = [s for s in sizes if s[0] <= 16]
        return small[0] if small else sizes[-1]
    match = [s for s in sizes if s[0] == int(resolution)]
    if not match:
        raise ValueError(f"attention map resolution {resolution}: this U-Net's cross-attention runs at "
                         f"heights {[s[0] for s in sizes]} for these latents; pick one of them.")
    return match[0]


# ------------------------------------------------------------------------------------------------
# the compiled loop
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    scheduler: Any
    controller: PromptToPromptController
    blend: bool
    map_hw: tuple[int, int]


def local_blend_mask(maps: jax.Array, words: jax.Array, map_hw: tuple[int, int], latent_hw: tuple[int, int],
                     threshold: jax.Array) -> jax.Array:
    """The local-blend mask of P pairs, bool [P, h, w, 1]. maps: [2P, Q, L] (summed maps, sources
    then edits); words: [2P, L] 0/1; the chosen words' maps, 3x3 max-pooled, resized to the
    latents (nearest), divided by their maximum, > threshold; the union of a pair's two masks."""
    rows = maps.shape[0]
    m = jnp.einsum("rql,rl->rq", maps, words).reshape(rows, *map_hw, 1)
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    m = jax.image.resize(m, (rows, *latent_hw, 1), "nearest")
    m = m / jnp.maximum(m.max(axis=(1, 2, 3), keepdims=True), 1e-12)
    mask = m > threshold
    pairs = rows // 2
    return mask[:pairs] | mask[pairs:]


@functools.partial(jax.jit, static_argnames=("unet", "plan"))
def _loop(unet, params, state, context, noise, guidance_scale, step_key, control_state, blend, *, plan: _Plan):
    """The controlled denoising loop: one lax.scan over the ladder with guidance.

    context: {"cond": [R, L, D](, "uncond")}; noise: [R, h, w, C] (pairs share rows' noise);
    control_state: the controller's state; blend: {"words": [R, L], "threshold": [], "start": int32 []}
    (or {}). Returns (latents [R, h, w, C] float32, the final controller state)."""
    _TRACES["p2p_loop"] += 1
    params = materialize(params)
    sched, ctrl = plan.scheduler, plan.controller
    cfg = "uncond" in context
    rows = noise.shape[0]
    pairs = rows // 2
    needs_noise = sched.needs_noise()
    x = noise * state.init_noise_sigma.astype(noise.dtype)
    state = sched.with_buffers(state, x)
    ctx = jnp.concatenate([context["uncond"], context["cond"]], axis=0) if cfg else context["cond"]

    def body(carry, i):
        x, sstate, cstate = carry
        x_in = sched.scale_model_input(sstate, x, i)
        t = sstate.timesteps[i]
        both = jnp.concatenate([x_in, x_in], axis=0) if cfg else x_in
        out, cstate = apply_controlled(unet, {"params": params}, both, jnp.broadcast_to(t, (both.shape[0],)), ctx,
                                       controller=ctrl, state=cstate, step=i)
        if cfg:
            out_u, out_c = jnp.split(out, 2, axis=0)
            out = out_u + guidance_scale * (out_c - out_u)
        eps = None
        if needs_noise:
            if ctrl.mode == "store":
                eps = step_noise(step_key, i, x)
            else:                                     # a pair's two rows share the step's noise
                half = step_noise(step_key, i, x[:pairs])
                eps = jnp.concatenate([half, half], axis=0)
        x, sstate = sched.step(sstate, out, i, x, noise=eps)
        if plan.blend:
            mask = local_blend_mask(cstate["maps"], blend["words"], plan.map_hw, x.shape[1:3], blend["threshold"])
            src, edit = x[:pairs], x[pairs:]
            edit = jnp.where(mask & (i >= blend["start"]), edit, src)
            x = jnp.concatenate([src, edit], axis=0)
        return (x, sstate, cstate), None

    n = int(state.timesteps.shape[0])
    (x, _, cstate), _ = jax.lax.scan(body, (x, state, control_state), jnp.arange(n, dtype=jnp.int32))
    return x, cstate


# ------------------------------------------------------------------------------------------------
# pipeline-level calls
# ------------------------------------------------------------------------------------------------
def _check_pipe(pipe) -> None:
    if "controlnet" in getattr(pipe, "PARAM_KEYS", ()) or pipe.unet.in_channels != pipe.vae.latent_channels:
        raise ConfigError(f"{type(pipe).__name__}: Prompt-to-Prompt runs a plain text-to-image U-Net "
                          f"({pipe.vae.latent_channels} latent channels in, no ControlNet); use a "
                          "StableDiffusionPipeline.")


def _as_prompts(value, what: str) -> list[str]:
    from jaxgen.pipelines.stable_diffusion import as_texts

    return as_texts(value, what)


def _controlled_run(pipe, prompts: list[str], *, controller: PromptToPromptController, inputs: dict | None,
                    blend: dict, noise: jax.Array, num_inference_steps: int, guidance_scale: float, seed,
                    scheduler, negative_prompt, map_hw) -> tuple[np.ndarray, np.ndarray]:
    """Text stage, controlled loop, decode. Returns (images float32 [R, H, W, 3], maps float32
    [R, mh, mw, L] averaged over heads, layers and steps (zeros when no layer was stored))."""
    from jaxgen.pipelines import stable_diffusion as sd
    from jaxgen.training.config_values import check_guidance

    sched = pipe.get_scheduler(scheduler)
    state = sched.set_timesteps(int(num_inference_steps))
    cfg = check_guidance(guidance_scale, "guidance_scale <= 1 runs the conditional pass only.") > 1.0
    params = pipe.lora_call_params()
    ids, mask = pipe._tokenize_prompts(prompts, negative_prompt, cfg)
    context = sd._text_stage(pipe.text_encoder, params["text_encoder"], ids, mask, per_prompt=1, cfg=cfg,
                             sharding=None)
    length = int(ids.shape[1])
    controller = dataclasses.replace(controller, cfg=cfg)
    cstate = {"maps": jnp.zeros((len(prompts), controller.map_queries, length), F32), "count": jnp.zeros((), F32)}
    if inputs is not None:
        cstate["inputs"] = {k: jnp.asarray(v) for k, v in inputs.items()}
    plan = _Plan(scheduler=sched, controller=controller, blend=bool(blend), map_hw=tuple(map_hw))
    root = sd.root_key(seed)
    latents, cstate = _loop(pipe.unet, params["unet"], state, context, noise, jnp.asarray(guidance_scale, F32),
                            jax.random.fold_in(root, _KEY_STEPS), cstate, blend, plan=plan)
    images = np.asarray(jax.device_get(sd._decode_stage(pipe.vae, params["vae"], latents)))
    maps = np.asarray(cstate["maps"]) / max(float(cstate["count"]), 1.0)      # layers x steps summed
    return images, maps.reshape(len(prompts), *map_hw, length)


def _latents(pipe, latents, root, count: int, height, width) -> tuple[jax.Array, int, int]:
    height, width = pipe._size(height, width)
    f = pipe.vae_scale_factor
    shape = (count, height // f, width // f, pipe.vae.latent_channels)
    return pipe._noise(latents, root, _KEY_LATENTS, shape, "latents"), height, width


def prompt_to_prompt(pipe, prompt, edit_prompt, *, mode: str = "replace", cross_replace_steps=0.8,
                     self_replace_steps=0.4, equalizer: Mapping[str, float] | None = None, local_blend_words=None,
                     num_inference_steps: int = 50, guidance_scale: float = 7.5, seed=0, latents=None,
                     scheduler=None, negative_prompt=None, height: int | None = None, width: int | None = None,
                     local_blend_threshold: float = 0.3, local_blend_start: float = 0.2,
                     attention_resolution: int | None = None, self_max_queries: int = 256,
                     return_maps: bool = False):
    """Prompt-to-Prompt editing with ``pipe`` (a StableDiffusionPipeline); module docstring.

    prompt, edit_prompt: a string or P strings each (one string pairs with every prompt).
    mode: "replace" (word swap; the token counts must agree), "refine" (added words: token
        alignment) or "reweight" (needs equalizer).
    cross_replace_steps: a fraction f in [0, 1] (the first f of the steps), a pair (start, end),
        or a dict {word: fraction or pair, "default_": ...} with words of the edit prompt.
    self_replace_steps: a fraction or pair. equalizer: {word of the edit prompt: weight}.
    local_blend_words: None, a word, a list of words (looked up in both prompts), or a pair
        (source words, edit words); local_blend_threshold, local_blend_start: see the module.
    latents: unit Gaussian [P, H/f, W/f, C] shared by each pair (default: drawn from seed as
        pipe(prompt, seed=seed) draws them). scheduler: as the pipeline's.
    attention_resolution: the maps' height (a cross-attention layer's), default see map_size.
    Returns (source_images, edited_images) float32 [P, H, W, 3] in [0, 1]; with return_maps also
    a dict {"source", "edited": float32 [P, h, w, L] maps, "source_tokens", "edited_tokens":
    displayed tokens per prompt}.
    """
    from jaxgen.pipelines.stable_diffusion import root_key

    _check_pipe(pipe)
    sources = _as_prompts(prompt, "prompt")
    edits = _as_prompts(edit_prompt, "edit_prompt")
    if len(sources) == 1 and len(edits) > 1:
        sources = sources * len(edits)
    if len(edits) == 1 and len(sources) > 1:
        edits = edits * len(sources)
    if len(sources) != len(edits):
        raise DataError(f"{len(sources)} prompts and {len(edits)} edit prompts; pass one edit prompt per "
                        "prompt (or one string for all).")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}.")
    if mode == "reweight" and not equalizer:
        raise ValueError("mode='reweight' needs equalizer={word: weight}, e.g. {'red': 2.0}.")
    if mode != "reweight" and equalizer:
        raise ValueError(f"equalizer is for mode='reweight' (got mode={mode!r}); pass mode='reweight'.")
    self_window = _window(self_replace_steps, "self_replace_steps")
    _window(cross_replace_steps.get("default_", 1.0) if isinstance(cross_replace_steps, Mapping)
            else cross_replace_steps, "cross_replace_steps")
    threshold = float(local_blend_threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"local_blend_threshold={local_blend_threshold!r}: give a finite number (0.3 is usual).")
    blend_start = _window((0.0, local_blend_start), "local_blend_start")[1]
    tok = pipe.tokenizer
    length = int(tok.model_max_length)
    src_ids = tok.encode(sources, return_attention_mask=True)
    dst_ids = tok.encode(edits, return_attention_mask=True)
    pairs = len(sources)
    mapper = np.zeros((pairs, length), np.int32)
    alphas = np.zeros((pairs, length), np.float32)
    for p in range(pairs):
        ns, nd = int(src_ids[1][p].sum()), int(dst_ids[1][p].sum())
        if mode == "replace" and ns != nd:
            raise DataError(f"mode='replace' swaps words token for token, but {sources[p]!r} has {ns - 2} tokens and "
                            f"{edits[p]!r} has {nd - 2}; use mode='refine' for added or removed words.")
        mapper[p], alphas[p] = align_tokens(src_ids[0][p, :ns], dst_ids[0][p, :nd], length)
    sched = pipe.get_scheduler(scheduler)
    n = int(sched.set_timesteps(int(num_inference_steps)).timesteps.shape[0])
    inputs = {"mapper": mapper, "alphas": alphas,
              "equalizer": _equalizer(tok, edits, equalizer, length) if mode == "reweight"
              else np.ones((pairs, length), np.float32),
              "cross": _cross_schedule(tok, edits, cross_replace_steps, n, length),
              "self": _on(self_window, n)}
    root = root_key(seed)
    noise, height, width = _latents(pipe, latents, root, pairs, height, width)
    f = pipe.vae_scale_factor
    map_hw = map_size(pipe.unet, (height // f, width // f), attention_resolution)
    blend = {}
    if local_blend_words is not None:
        blend = {"words": jnp.asarray(_blend_words(tok, sources, edits, local_blend_words, length)),
                 "threshold": jnp.asarray(threshold, F32), "start": jnp.asarray(int(blend_start * n), jnp.int32)}
    controller = PromptToPromptController(mode=mode, rows=2 * pairs, cfg=False, map_queries=map_hw[0] * map_hw[1],
                                          self_max_queries=int(self_max_queries))
    images, maps = _controlled_run(pipe, sources + edits, controller=controller, inputs=inputs, blend=blend,
                                   noise=jnp.concatenate([noise, noise], axis=0),
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=root,
                                   scheduler=sched, negative_prompt=negative_prompt, map_hw=map_hw)
    source, edited = images[:pairs], images[pairs:]
    if not return_maps:
        return source, edited
    return source, edited, {"source": maps[:pairs], "edited": maps[pairs:],
                            "source_tokens": [prompt_tokens(tok, s) for s in sources],
                            "edited_tokens": [prompt_tokens(tok, e) for e in edits]}


def attention_maps(pipe, prompt, *, num_inference_steps: int = 50, guidance_scale: float = 7.5, seed=0,
                   latents=None, scheduler=None, negative_prompt=None, height: int | None = None,
                   width: int | None = None, attention_resolution: int | None = None):
    """Text-to-image that also returns the per-token cross-attention maps.

    Returns (images float32 [B, H, W, 3] in [0, 1], maps float32 [B, h, w, L] (each token's
    cross-attention, averaged over heads, the layers at the map resolution and the steps; a
    query position's maps sum to 1 over the L tokens), tokens: the displayed tokens of each
    prompt (positions 0..n-1; padding after)). Same draws as pipe(prompt, seed=seed).
    """
    from jaxgen.pipelines.stable_diffusion import root_key

    _check_pipe(pipe)
    prompts = _as_prompts(prompt, "prompt")
    root = root_key(seed)
    noise, height, width = _latents(pipe, latents, root, len(prompts), height, width)
    f = pipe.vae_scale_factor
    map_hw = map_size(pipe.unet, (height // f, width // f), attention_resolution)
    controller = PromptToPromptController(mode="store", rows=len(prompts), cfg=False,
                                          map_queries=map_hw[0] * map_hw[1])
    images, maps = _controlled_run(pipe, prompts, controller=controller, inputs=None, blend={}, noise=noise,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=root,
                                   scheduler=scheduler, negative_prompt=negative_prompt, map_hw=map_hw)
    return images, maps, [prompt_tokens(pipe.tokenizer, p) for p in prompts]


def trace_counts() -> dict[str, int]:
    """How many times the controlled loop ("p2p_loop") has been traced in this process."""
    return dict(_TRACES)


# ------------------------------------------------------------------------------------------------
# runs, CLIs, pictures
# ------------------------------------------------------------------------------------------------
def run_prompt_to_prompt(task, params, source_prompts, edit_prompts, seed=0, **options):
    """``run.prompt_to_prompt`` of a text-to-image (ldm) run: uint8 [N, H, W, 3] sources and edits
    (and with return_maps=True the maps dict of ``prompt_to_prompt``, over all N pairs).

    The run's sampling defaults fill num_inference_steps, guidance_scale and scheduler (None or
    absent); the initial latents are run.sample's (normal(fold_in(key(seed), 0), [N, h, w, c])),
    so each source image is the image run.sample draws for that prompt and seed; pairs go in
    chunks of config.sampling.batch_size. Other options: those of ``prompt_to_prompt``."""
    from jaxgen.data.chunks import chunk_bounds, pad_rows
    from jaxgen.data.pipeline import unit_to_uint8

    sources = _as_prompts(source_prompts, "source_prompts")
    edits = _as_prompts(edit_prompts, "edit_prompts")
    if len(edits) == 1:
        edits = edits * len(sources)
    if len(sources) == 1:
        sources = sources * len(edits)
    if len(sources) != len(edits):
        raise DataError(f"{len(sources)} source prompts and {len(edits)} edit prompts; pass one edit per source.")
    s = task.config.sampling
    steps = options.pop("num_inference_steps", None)
    guidance = options.pop("guidance_scale", None)
    steps = int(s.num_steps if steps is None else steps)
    guidance = float(s.guidance_scale if guidance is None else guidance)
    sched = task.make_scheduler(options.pop("scheduler", None))
    if "latents" in options:
        raise DataError("run.prompt_to_prompt draws its latents from seed (as run.sample); pass seed=.")
    pipe = task.pipeline(params)
    num = len(sources)
    key = jax.random.key(seed)
    latents = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (num, *task.latent_shape), F32))
    steps_root = jax.random.fold_in(key, 1)
    height, width, _ = task.image_shape
    size = min(int(s.batch_size), num)
    out_src, out_dst, out_maps = [], [], []
    for n, (a, b) in enumerate(chunk_bounds(num, size)):
        rows = pad_rows(np.arange(a, b), size)
        res = prompt_to_prompt(pipe, [sources[i] for i in rows], [edits[i] for i in rows],
                               num_inference_steps=steps, guidance_scale=guidance,
                               seed=jax.random.fold_in(steps_root, n), latents=latents[rows], scheduler=sched,
                               height=height, width=width, **options)
        out_src.append(res[0][:b - a])
        out_dst.append(res[1][:b - a])
        if len(res) == 3:
            out_maps.append({k: v[:b - a] for k, v in res[2].items()})
    what = "the text-to-image run"
    images = unit_to_uint8(np.concatenate(out_src), what=what), unit_to_uint8(np.concatenate(out_dst), what=what)
    if not out_maps:
        return images
    maps = {k: (np.concatenate([m[k] for m in out_maps]) if isinstance(out_maps[0][k], np.ndarray)
                else [t for m in out_maps for t in m[k]]) for k in out_maps[0]}
    return (*images, maps)


def pipeline_for(source) -> tuple[Any, dict]:
    """(a StableDiffusionPipeline, its sampling defaults {num_inference_steps, guidance_scale,
    scheduler}) for a diffusers folder path or a text-to-image Run (its stack and config.sampling)."""
    import os

    from jaxgen.pipelines.stable_diffusion import StableDiffusionPipeline

    if isinstance(source, (str, os.PathLike)):
        return StableDiffusionPipeline.from_pretrained(source), {"num_inference_steps": 50, "guidance_scale": 7.5,
                                                                 "scheduler": None}
    task = getattr(source, "task", None)
    if task is None or not hasattr(task, "pipeline") or "prompt_to_prompt" not in getattr(task, "abilities", ()):
        name = getattr(task, "name", type(source).__name__)
        raise ConfigError(f"a {name!r} run is not a text-to-image run: attention maps and Prompt-to-Prompt need "
                          "an ldm run (configs/shapes_ldm.py) or a diffusers Stable Diffusion folder.")
    s = task.config.sampling
    return task.pipeline(source.variables), {"num_inference_steps": int(s.num_steps),
                                             "guidance_scale": float(s.guidance_scale),
                                             "scheduler": task.make_scheduler(None)}


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] image and a map [h, w] -> uint8 [H, W, 3]: the map (divided by its maximum,
    nearest-resized) as a red-yellow heat layer over the darkened image."""
    h, w = image.shape[:2]
    rows = np.minimum((np.arange(h) * heat.shape[0]) // h, heat.shape[0] - 1)
    cols = np.minimum((np.arange(w) * heat.shape[1]) // w, heat.shape[1] - 1)
    m = heat[rows][:, cols]
    m = m / max(float(m.max()), 1e-12)
    colour = np.stack([np.ones_like(m), m, np.zeros_like(m)], -1) * 255.0 * m[..., None]
    return np.clip(0.35 * image.astype(np.float32) + 0.65 * colour, 0, 255).astype(np.uint8)


def maps_png(path: str, rows: Sequence[tuple[str, np.ndarray, np.ndarray, list[str]]],
             lead: Sequence[Sequence[np.ndarray]] | None = None, lead_titles: Sequence[str] = ()) -> str:
    """A PNG of per-token attention overlays: one row per (label, image uint8 [H, W, 3], maps
    [h, w, L], tokens): optional lead images per row (e.g. source | edited; None = blank), then
    the image with each real token's map over it (the start token and padding are left out),
    titled by the token."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ntok = max(len(t) - 1 for _, _, _, t in rows)
    nlead = len(lead[0]) if lead else 0
    fig, axes = plt.subplots(len(rows), nlead + ntok, figsize=(1.2 * (nlead + ntok), 1.45 * len(rows)),
                             squeeze=False)
    for r, (label, image, maps, tokens) in enumerate(rows):
        for c in range(nlead):
            if lead[r][c] is not None:
                axes[r, c].imshow(lead[r][c], interpolation="nearest")
                axes[r, c].set_title(lead_titles[c] if c < len(lead_titles) else "", fontsize=6)
        for c, pos in enumerate(range(1, len(tokens))):
            axes[r, nlead + c].imshow(_overlay(image, maps[..., pos]), interpolation="nearest")
            axes[r, nlead + c].set_title(tokens[pos], fontsize=6)
        axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=5)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.subplots_adjust(left=0.2, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.35)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_attention_maps(source, prompts: Sequence[str], path: str, *, seed=0, num_inference_steps=None,
                         guidance_scale=None, scheduler=None, attention_resolution: int | None = None):
    """Generate one image per prompt with ``source`` (a diffusers folder or a text-to-image Run)
    and write its per-token attention overlays to ``path`` (PNG). None options take the source's
    sampling defaults. Returns (images uint8 [N, H, W, 3], maps float32 [N, h, w, L], tokens)."""
    from jaxgen.data.pipeline import unit_to_uint8

    pipe, defaults = pipeline_for(source)
    images, maps, tokens = attention_maps(
        pipe, list(prompts), seed=seed, attention_resolution=attention_resolution,
        num_inference_steps=defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
        guidance_scale=defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
        scheduler=defaults["scheduler"] if scheduler is None else scheduler)
    images = unit_to_uint8(images, what="the attention-map images")
    maps_png(path, [(p, im, m, t) for p, im, m, t in zip(prompts, images, maps, tokens)],
             lead=[[im] for im in images], lead_titles=["image"])
    return images, maps, tokens


def write_edit(source, prompts: Sequence[str], edit_prompts: Sequence[str], path: str, *, seed=0, **options):
    """Prompt-to-Prompt with ``source`` (a diffusers folder or a text-to-image Run) written as one
    PNG: per pair a row "source | edited | the source prompt's token maps over the source" and a
    row with the edit prompt's token maps over the edited image. None options take the source's
    sampling defaults. Returns (sources, edits) uint8 [N, H, W, 3]."""
    from jaxgen.data.pipeline import unit_to_uint8

    options = {k: v for k, v in options.items() if v is not None}
    prompts, edit_prompts = list(prompts), list(edit_prompts)
    if len(prompts) == 1:
        prompts *= len(edit_prompts)
    if len(edit_prompts) == 1:
        edit_prompts *= len(prompts)
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        pipe, defaults = pipeline_for(source)
        src, dst, maps = prompt_to_prompt(pipe, list(prompts), list(edit_prompts), seed=seed, return_maps=True,
                                          **{**defaults, **options})
        src, dst = unit_to_uint8(src, what="the sources"), unit_to_uint8(dst, what="the edits")
    else:
        pipeline_for(source)                        # checks it is a text-to-image run
        src, dst, maps = source.prompt_to_prompt(list(prompts), list(edit_prompts), seed=seed, return_maps=True,
                                                 **options)
    rows, lead = [], []
    for i in range(len(src)):
        rows.append((f"source: {prompts[i]}", src[i], maps["source"][i], maps["source_tokens"][i]))
        rows.append((f"edit: {edit_prompts[i]}", dst[i], maps["edited"][i], maps["edited_tokens"][i]))
        lead += [[src[i], dst[i]], [None, None]]
    maps_png(path, rows, lead=lead, lead_titles=["source", "edited"])
    return src, dst

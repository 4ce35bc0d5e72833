"""Diffusion: schedules (data), the forward process (pure functions), samplers (pure array
transforms) and the lax.scan sampling loop. Device-agnostic; no jit inside."""

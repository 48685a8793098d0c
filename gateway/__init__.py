"""kvgate gateway: the OpenAI-compatible session-aware routing proxy and the `kvgate` CLI."""

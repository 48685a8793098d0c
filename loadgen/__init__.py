"""kvgate load generator, trace replay and the routing simulator."""

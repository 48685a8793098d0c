"""kvgate routing logic: hashing, bus protocol, block index, load, sessions, policies. No I/O."""

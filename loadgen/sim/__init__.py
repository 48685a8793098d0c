"""`kvgate sim`: discrete-event replay of a trace against simulated workers and the real router."""

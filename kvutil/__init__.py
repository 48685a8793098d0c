"""Helpers the gateway and the engines share that are not routing: how a server stops its background
tasks, bus credentials, tracing. Like router, it imports nothing else of the project, so both may
import it without importing each other."""

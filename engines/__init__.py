"""kvgate engines: block manager, scheduler, mock and torch engines, and the worker process."""

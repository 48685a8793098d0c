"""`TorchRunner`: the real model behind the scheduler (a `ModelRunner`).

Owns the model, the paged KV cache tensor `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`
and the sampler; with a host tier, a host buffer of the same layout (`host_blocks` slots: pinned
memory on CUDA, copied on a side stream the step's compute waits for; a second CPU tensor on CPU).
Each `execute` packs the step's chunks into one forward: one token batch for the projections and
MLPs, attention through the chunks' block tables (see attention.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from engines.runner import ScheduledChunk
from engines.torch.attention import DecodeGroup, PrefillSpan, StepLayout
from engines.torch.checkpoint import load_checkpoint, tokenizer_path
from engines.torch.config import ModelConfig, tiny_config
from engines.torch.model import CausalLM
from engines.torch.sampler import Sampler
from router.chat import ByteTokenizer, HFTokenizer, Tokenizer
from router.protocol import MAX_BLOCK_MS

TINY_MODEL_NAME = "kvgate-tiny"
# Keys gathered for one batched decode attention, at most (bounds the step's transient memory).
MAX_DECODE_GATHER_TOKENS = 1 << 18
# The startup measurement of the host link: at most this many blocks and bytes a copy, a few rounds,
# the fastest counted (the first warms the allocator and, on CUDA, the copy kernels)
LINK_PROBE_BLOCKS = 64
LINK_PROBE_BYTES = 256 << 20
LINK_PROBE_ROUNDS = 3


def _no_stream() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_threads() -> int:
    """All cores but one, which stays free for the worker's event loop (HTTP, NATS, tokenizing) that
    runs beside the step thread: an oversubscribed OpenMP team stalls at every barrier."""
    return max(1, min(16, len(os.sched_getaffinity(0)) - 1))


class TorchRunner:
    """The tiny seeded random model (byte tokenizer) by default, or a local HF checkpoint."""

    reads_token_ids = True
    models_step_time = False  # a step takes the time its forward takes

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_path: str | None = None,
        device: str | None = None,
        seed: int = 0,
        *,
        dtype: torch.dtype | None = None,
        config: ModelConfig | None = None,
        threads: int | None = None,
        host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device) if device else default_device()
        if self.device.type == "cpu":
            torch.set_num_threads(threads or default_threads())
        # bf16 halves memory and is what GPUs are fast at; CPU matmuls are fastest in fp32.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model, self.tokenizer, self.model_name = self._build(model_path, config, seed)
        self.model.fuse_projections()
        self.config = self.model.config
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens, the model only {self.config.vocab_size}"
            )
        self.max_model_len = self.config.max_position_embeddings
        layers, kv_heads, head_dim = (
            self.config.num_layers,
            self.config.num_kv_heads,
            self.config.dims_per_head,
        )
        shape = (layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self._check_fits(math.prod(shape) * self.dtype.itemsize)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._sampler = Sampler(seed)
        self.host_cache: torch.Tensor | None = None
        self._copy_stream = None
        # one block's copy from the host onto the device, in ms, as the worker announces it (the router
        # prices a host hit at it): measured once, here, on the runner's own buffers; 0 without a tier
        self.host_block_ms = 0.0
        if host_blocks:
            host_shape = (layers, 2, host_blocks, block_size, kv_heads, head_dim)
            on_cuda = self.device.type == "cuda"
            self.host_cache = torch.zeros(host_shape, dtype=self.dtype, pin_memory=on_cuda)
            self._copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
            self.host_block_ms = self._measure_host_block_ms()

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def copy_blocks(self, offloads: list[tuple[int, int]], onboards: list[tuple[int, int]]) -> None:
        """Offloads (device block -> host slot), then onboards (host slot -> device block), before the
        step's compute. On CUDA they run on a copy stream that waits for the compute already queued
        (it wrote the blocks offloaded) and that the step's compute then waits for."""
        host = self.host_cache
        if host is None:
            raise RuntimeError("this runner has no host buffer (host_blocks=0)")
        stream = self._copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else _no_stream():
            if offloads:
                blocks = torch.tensor([b for b, _ in offloads], device=self.device)
                slots = torch.tensor([s for _, s in offloads])
                # a blocking copy: the gathered blocks land in pageable memory before the scatter
                host[:, :, slots] = self.kv_cache[:, :, blocks].to("cpu")
            if onboards:
                slots = torch.tensor([s for s, _ in onboards])
                blocks = torch.tensor([b for _, b in onboards], device=self.device)
                self.kv_cache[:, :, blocks] = host[:, :, slots].to(self.device, non_blocking=True)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        return None

    def _measure_host_block_ms(self) -> float:
        """One block's onboarding time: the fastest of `LINK_PROBE_ROUNDS` onboards (`copy_blocks`, as a
        step runs them) of up to `LINK_PROBE_BLOCKS` blocks (and `LINK_PROBE_BYTES`), per block. It runs
        before any request, between buffers still zero, so it changes no KV."""
        assert self.host_cache is not None
        block_bytes = self.kv_cache[:, :, 0].numel() * self.dtype.itemsize
        count = min(LINK_PROBE_BLOCKS, self.num_blocks, self.host_cache.shape[2])
        count = max(1, min(count, LINK_PROBE_BYTES // block_bytes))
        pairs = [(i, i) for i in range(count)]
        fastest = math.inf
        for _ in range(LINK_PROBE_ROUNDS):
            started = time.perf_counter()
            self.copy_blocks([], pairs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            fastest = min(fastest, time.perf_counter() - started)
        # a positive time (0 would read as "unknown"), within what a load report may carry
        return min(max(1000.0 * fastest / count, 1e-6), MAX_BLOCK_MS)

    def _check_fits(self, cache_bytes: int) -> None:
        """Refuse a KV cache larger than the device's memory with a clear error: on CPU the
        allocation would succeed lazily and the process be killed later, when the cache fills."""
        if self.device.type == "cuda":
            limit, _ = torch.cuda.mem_get_info(self.device)
        else:
            limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if cache_bytes > limit:
            raise ValueError(
                f"a KV cache of {self.num_blocks} blocks needs {cache_bytes / 2**30:.1f} GiB, more than "
                f"the {limit / 2**30:.1f} GiB of {self.device}: lower --num-blocks"
            )

    def _build(
        self, model_path: str | None, config: ModelConfig | None, seed: int
    ) -> tuple[CausalLM, Tokenizer, str]:
        """The model, its tokenizer and its served name."""
        tokenizer: Tokenizer
        if model_path is None:
            tokenizer = ByteTokenizer()
            model = CausalLM(config or tiny_config(tokenizer.vocab_size))
            model.init_random(seed)
            return model.to(self.device, self.dtype).eval(), tokenizer, TINY_MODEL_NAME
        model = load_checkpoint(model_path, self.device, self.dtype)
        tok_file = tokenizer_path(model_path)
        # with the checkpoint's chat template and special tokens when it has them
        tokenizer = HFTokenizer.from_path(model_path) if tok_file else ByteTokenizer()
        return model, tokenizer, Path(model_path).resolve().name

    def step_time_s(self, chunks: Sequence[ScheduledChunk], kv_usage: float) -> float | None:
        return None  # the real duration counts

    def decode_pass_s(self, context_blocks: int) -> float:
        return 0.0  # a real step's outputs exist when it has ended

    @torch.inference_mode()
    def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
        if not chunks:
            return []
        hidden, step = self._forward(chunks)
        out: list[int | None] = [None] * len(chunks)
        if not step.sampled:
            return out
        logits = self._mask_padding(self.model.logits(hidden[step.sample_rows]))
        params = [chunks[i].sampling for i in step.sampled]
        # the position in the whole answer (a request may continue one): what a seed samples by
        positions = [chunks[i].output_len + chunks[i].sampling.output_offset for i in step.sampled]
        tokens = self._sampler.sample(logits, params, positions)  # the step's one device->host sync
        for i, token in zip(step.sampled, tokens, strict=True):
            out[i] = token
        return out

    @torch.inference_mode()
    def logits(self, chunks: Sequence[ScheduledChunk]) -> list[torch.Tensor]:
        """Logits (float32, [len(token_ids), vocab]) at every computed position of every chunk,
        writing their KV like `execute`; for tests and inspection."""
        if not chunks:
            return []
        hidden, step = self._forward(chunks)
        logits = self.model.logits(hidden)
        begins = [0, *step.ends[:-1]]
        return [logits[b:e] for b, e in zip(begins, step.ends, strict=True)]

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        # Checkpoints pad the vocabulary past the tokenizer's; those ids decode to nothing.
        if self.tokenizer.vocab_size < logits.shape[-1]:
            logits[:, self.tokenizer.vocab_size :] = float("-inf")
        return logits

    def _forward(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, StepInputs]:
        """Hidden states of the packed tokens, and the step's inputs."""
        self._validate(chunks)
        layout, step = self._layout(chunks)
        return self.model(step.token_ids, self.kv_cache, layout), step

    def _validate(self, chunks: Sequence[ScheduledChunk]) -> None:
        for chunk in chunks:
            end = chunk.start_pos + len(chunk.token_ids)
            if not chunk.token_ids or chunk.start_pos < 0:
                raise ValueError(f"{chunk.seq_id}: a chunk needs tokens and a start_pos >= 0")
            if end > self.max_model_len:
                raise ValueError(
                    f"{chunk.seq_id}: position {end - 1} past max_model_len {self.max_model_len}"
                )
            if len(chunk.block_table) * self.block_size < end:
                raise ValueError(f"{chunk.seq_id}: block table does not cover position {end - 1}")

    def _layout(self, chunks: Sequence[ScheduledChunk]) -> tuple[StepLayout, StepInputs]:
        """Token ids, positions, cache slots and attention spans of the step. Computed on the CPU as
        tensors (no per-token Python work beyond flattening the token ids) and sent to the device in
        one copy: each separate copy of pageable memory to a GPU is a stream synchronisation."""
        block = self.block_size
        token_ids = self._token_ids(chunks)
        lens = [len(chunk.token_ids) for chunk in chunks]
        starts = [chunk.start_pos for chunk in chunks]
        contexts = [s + n for s, n in zip(starts, lens, strict=True)]
        needed = [-(-c // block) for c in contexts]  # blocks covering each context
        tables = self._block_tables(chunks, needed)
        lens_t = torch.tensor(lens)
        seq_of_row = torch.repeat_interleave(torch.arange(len(chunks)), lens_t)
        first_row = torch.cumsum(lens_t, 0) - lens_t
        positions = torch.tensor(starts)[seq_of_row] + torch.arange(int(lens_t.sum())) - first_row[seq_of_row]
        slots = tables[seq_of_row, positions // block] * block + positions % block
        ends = torch.cumsum(lens_t, 0).tolist()
        sampled = [i for i, chunk in enumerate(chunks) if chunk.sample]

        pack = _Pack()
        inputs = pack.add(token_ids), pack.add(positions), pack.add(slots)
        sample_rows = pack.add(torch.tensor([ends[i] - 1 for i in sampled], dtype=torch.long))
        groups = self._pack_decode_groups(pack, lens, needed, contexts, tables, first_row)
        spans = [(i, pack.add(tables[i, : needed[i]])) for i, n in enumerate(lens) if n > 1]
        dev = pack.send(self.device)

        decodes = tuple(
            self._decode_group(dev[rows], dev[group_tables], dev[group_contexts], whole=size == len(chunks))
            for size, rows, group_tables, group_contexts in groups
        )
        prefills = tuple(
            PrefillSpan(
                ends[i] - lens[i],
                ends[i],
                starts[i],
                contexts[i],
                dev[table],
                self._prefill_mask(lens[i], contexts[i], starts[i]),
            )
            for i, table in spans
        )
        layout = StepLayout(dev[inputs[1]], dev[inputs[2]], decodes, prefills)
        return layout, StepInputs(dev[inputs[0]], ends, sampled, dev[sample_rows])

    def _token_ids(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """The step's token ids, packed; ValueError for one outside the model's vocabulary."""
        token_ids = torch.tensor([t for chunk in chunks for t in chunk.token_ids], dtype=torch.long)
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return token_ids

    def _block_tables(self, chunks: Sequence[ScheduledChunk], needed: list[int]) -> torch.Tensor:
        """Each chunk's block table to the blocks its context needs, padded with block 0 to the
        widest; ValueError for a block id outside the cache."""
        width = max(needed)
        tables = torch.tensor(
            [chunk.block_table[:w] + [0] * (width - w) for chunk, w in zip(chunks, needed, strict=True)],
            dtype=torch.long,
        )
        if int(tables.min()) < 0 or int(tables.max()) >= self.num_blocks:
            raise ValueError(f"a block id is out of range [0, {self.num_blocks})")
        return tables

    def _pack_decode_groups(
        self,
        pack: _Pack,
        lens: list[int],
        needed: list[int],
        contexts: list[int],
        tables: torch.Tensor,
        first_row: torch.Tensor,
    ) -> list[tuple[int, int, int, int]]:
        """The one-token chunks in groups attended together (`decode_groups`): the size and the pack
        indices of each group's rows, block tables and contexts."""
        groups: list[tuple[int, int, int, int]] = []
        for group in decode_groups(
            [i for i, n in enumerate(lens) if n == 1], needed, MAX_DECODE_GATHER_TOKENS // self.block_size
        ):
            group = sorted(group)  # in row order: one group of every row is then rows 0..T-1
            group_tables = tables[group, : max(needed[i] for i in group)]
            group_contexts = torch.tensor([contexts[i] for i in group])
            groups.append(
                (len(group), pack.add(first_row[group]), pack.add(group_tables), pack.add(group_contexts))
            )
        return groups

    def _decode_group(
        self, rows: torch.Tensor, tables: torch.Tensor, context: torch.Tensor, *, whole: bool
    ) -> DecodeGroup:
        # key j of a row is real when j < its context; the rest pads it to the group's width. Additive
        # and in the model's dtype, as SDPA would otherwise convert a bool mask in every layer.
        keys = torch.arange(tables.shape[1] * self.block_size, device=self.device)
        mask = torch.zeros((len(rows), keys.shape[0]), dtype=self.dtype, device=self.device)
        mask.masked_fill_(keys[None, :] >= context[:, None], float("-inf"))
        return DecodeGroup(rows, tables, mask[:, None, None], whole)  # broadcast over KV and query heads

    def _prefill_mask(self, new: int, context: int, start: int) -> torch.Tensor | None:
        """On CPU, where SDPA has no fused bottom-right causal kernel and `causal_lower_right`
        would build this mask in every layer (and SDPA turn it from bool to additive), it is built
        once per step, additive in the model's dtype."""
        if start == 0 or self.device.type != "cpu":
            return None
        allowed = torch.ones(new, context, dtype=torch.bool).tril(diagonal=context - new)
        return torch.zeros(new, context, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))


class StepInputs(NamedTuple):
    """The runner's side of one step: packed token ids and where each chunk's rows end, on the
    device the chunks that sample and the rows they sample from."""

    token_ids: torch.Tensor
    ends: list[int]
    sampled: list[int]
    sample_rows: torch.Tensor


class _Pack:
    """Integer tensors built on the CPU for one step, sent to the device as one copy (pinned and
    asynchronous on CUDA, so the host goes on queueing the step's kernels)."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []

    def add(self, part: torch.Tensor) -> int:
        self._parts.append(part)
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        flat = torch.cat([part.reshape(-1) for part in self._parts])
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        elif flat.device != device:
            flat = flat.to(device)
        pieces = flat.split([part.numel() for part in self._parts])
        return [piece.view(part.shape) for piece, part in zip(pieces, self._parts, strict=True)]


def decode_groups(decode: list[int], needed: list[int], max_gather_blocks: int) -> list[list[int]]:
    """Split one-token chunks (indices into `needed`, their context in blocks) into groups attended
    together: longest first, a group takes chunks at least half as wide as its widest (padding at
    most doubles the gathered keys) while its padded gather stays under `max_gather_blocks`."""
    groups: list[list[int]] = []
    width = 0
    for i in sorted(decode, key=lambda i: -needed[i]):
        if groups and 2 * needed[i] >= width and (len(groups[-1]) + 1) * width <= max_gather_blocks:
            groups[-1].append(i)
        else:
            groups.append([i])
            width = needed[i]
    return groups

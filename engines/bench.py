"""`kvgate bench engine`: time to first token with and without a cached prefix, prefill speed, and
decode speed at batch 1 and 8, measured through the real path (Engine: scheduler + block manager
with prefix caching + runner). `ttft_host_ms`: the cached prefix offloaded to the host tier first, so
that the request onboards it (copies back) instead of finding it on the device.

Torch: wall-clock time from adding the request to its first token (or over the decode steps). Mock:
the same procedure in the mocker's modelled time. Each figure is the median of `--repeats` runs on
fresh random tokens (so only the intended prefix is ever cached), after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from engines.engine import Engine, EngineConfig, EngineRequest
from engines.runner import ModelRunner, SamplingParams
from router.hashing import block_hashes

GOAL_TTFT_RATIO = 5.0
GOAL_DECODE_BATCH_RATIO = 4.0
DECODE_BATCH = 8
# The prompt of the TTFT runs by device type, and how many of its tokens are new in the cached run.
DEFAULT_PROMPT_TOKENS = {"cpu": 2048, "cuda": 16384}
NEW_TOKENS = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("torch", "mock"), default="torch", help="the engine measured")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        help=f"default: {DEFAULT_PROMPT_TOKENS['cpu']:,} on CPU (and mock), "
        f"{DEFAULT_PROMPT_TOKENS['cuda']:,} on CUDA, where a 2k-token prefill of a small model is bound "
        "by kernel launches, cached or not",
    )
    parser.add_argument(
        "--cached-tokens",
        type=int,
        help=f"cached prefix (whole blocks); default: all but the last {NEW_TOKENS} prompt tokens",
    )
    parser.add_argument("--decode-context", type=int, default=256, help="prompt tokens of decode runs")
    parser.add_argument("--decode-steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measure (the median is kept)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step (chunked prefill)"
    )
    parser.add_argument("--model-path", help="torch: a local Hugging Face checkpoint folder")
    parser.add_argument("--device", help="torch: cpu, cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, help="torch on CPU: intra-op threads")
    parser.add_argument("--speedup", type=float, default=1.0, help="mock: divides the modelled time")


class EngineBench:
    """Drives one engine through the bench's requests, timing them in the runner's time base."""

    def __init__(self, engine: Engine, vocab_size: int, seed: int = 0) -> None:
        self.engine = engine
        self.vocab = vocab_size
        self.rng = random.Random(seed)
        self._ids = 0
        # The mock runner models its step times; the torch runner's real time is what counts.
        self.modelled = engine.runner.models_step_time

    def tokens(self, n: int) -> list[int]:
        # below 256: bytes for the byte tokenizer, plain tokens for any checkpoint's
        return [self.rng.randrange(min(self.vocab, 256)) for _ in range(n)]

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """Seconds from adding `prompt` to its first token, and the prompt tokens served from cache."""
        rid = self._add(prompt, max_tokens=1)
        elapsed, outputs = self._until(lambda done: rid in done, {rid})
        return elapsed, outputs[rid]

    def ttft_pair(self, prompt_tokens: int, cached_tokens: int) -> tuple[float, float, int]:
        """TTFT of a fresh prompt, then of one whose first `cached_tokens` the device holds, and the
        tokens the block manager served from cache for the latter."""
        uncached, _ = self.ttft(self.tokens(prompt_tokens))
        prefix = self.tokens(cached_tokens)
        suffix = prompt_tokens - cached_tokens
        self.ttft(prefix + self.tokens(suffix))  # caches the prefix
        cached, hit = self.ttft(prefix + self.tokens(suffix))
        return uncached, cached, hit

    def ttft_host(self, prompt_tokens: int, cached_tokens: int) -> tuple[float, int]:
        """TTFT of a prompt whose first `cached_tokens` wait on the host tier, and the tokens served."""
        config = self.engine.config
        prefix = self.tokens(cached_tokens)
        suffix = prompt_tokens - cached_tokens
        self.ttft(prefix + self.tokens(suffix))  # caches the prefix on the device
        self.engine.offload(block_hashes(prefix, config.block_size, config.hash_seed))  # copies now, untimed
        return self.ttft(prefix + self.tokens(suffix))

    def decode_rate(self, batch: int, context: int, steps: int) -> float:
        """Output tokens per second of `batch` sequences decoding `steps` tokens together, timed from
        the step after all their prefills."""
        rids = {self._add(self.tokens(context), max_tokens=steps + 1) for _ in range(batch)}
        self._until(lambda first: rids <= first.keys(), rids, first_token=True)
        elapsed, _ = self._until(lambda done: rids <= done.keys(), rids)
        return batch * steps / elapsed

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        self._ids += 1
        rid = f"bench-{self._ids}"
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(EngineRequest(rid, prompt, sampling))
        return rid

    def _until(
        self, done: Callable[[dict[str, int]], bool], rids: set[str], first_token: bool = False
    ) -> tuple[float, dict[str, int]]:
        """Step until `done(seen)`; seen maps request id -> cached tokens, for requests that produced
        a token (first_token) or finished. Returns the elapsed time and `seen`."""
        seen: dict[str, int] = {}
        elapsed = 0.0
        for _ in range(1_000_000):
            if done(seen):
                return elapsed, seen
            started = time.perf_counter()
            result = self.engine.step()
            wall = time.perf_counter() - started
            elapsed += result.duration_s if self.modelled else wall
            for out in result.outputs:
                if out.request_id in rids and (out.finished or (first_token and out.new_token_ids)):
                    seen[out.request_id] = out.num_cached_tokens
            if not self.engine.has_work() and not done(seen):
                raise RuntimeError(f"the engine went idle before the bench's requests finished: {seen}")
        raise RuntimeError("the bench did not finish")


def _runner(
    args: argparse.Namespace, num_blocks: int, host_blocks: int
) -> tuple[ModelRunner, int, dict[str, object]]:
    if args.engine == "mock":
        from engines.mock import MockRunner

        runner = MockRunner(num_blocks, args.block_size, speedup=args.speedup)
        return runner, runner.tokenizer.vocab_size, {"model": runner.model_name, "device": "modelled"}
    from engines.torch import TorchRunner  # heavy import, only when asked for

    torch_runner = TorchRunner(
        num_blocks,
        args.block_size,
        args.model_path,
        args.device,
        threads=args.threads,
        host_blocks=host_blocks,
    )
    import torch

    info: dict[str, object] = {"model": torch_runner.model_name, "device": str(torch_runner.device)}
    if torch_runner.device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    return torch_runner, torch_runner.config.vocab_size, info


def _device_type(args: argparse.Namespace) -> str:
    if args.engine == "mock":
        return "cpu"
    if args.device:
        return args.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fill in the device's default prompt and the cached prefix left unset (all but the last
    NEW_TOKENS tokens, down to whole blocks)."""
    if args.prompt_tokens is None:
        args.prompt_tokens = DEFAULT_PROMPT_TOKENS.get(_device_type(args), DEFAULT_PROMPT_TOKENS["cpu"])
    if args.cached_tokens is None:
        args.cached_tokens = (args.prompt_tokens - NEW_TOKENS) // args.block_size * args.block_size


def check_sizes(args: argparse.Namespace) -> None:
    """ValueError, one line naming the flags, for sizes the bench cannot run."""
    if args.cached_tokens % args.block_size or not 0 < args.cached_tokens < args.prompt_tokens:
        raise ValueError("--cached-tokens must be whole blocks, fewer than --prompt-tokens")
    if min(args.repeats, args.decode_steps, args.decode_context) < 1:
        raise ValueError("--repeats, --decode-steps and --decode-context must be positive")


def measure(args: argparse.Namespace) -> dict[str, object]:
    resolve_sizes(args)
    check_sizes(args)
    block = args.block_size
    # room for every prompt of one repeat alive at once, so that nothing the bench relies on is evicted
    per_prompt = -(-args.prompt_tokens // block) + 1
    per_decode = -(-(args.decode_context + args.decode_steps + 1) // block)
    num_blocks = 3 * per_prompt + DECODE_BATCH * per_decode + 16
    host_blocks = per_prompt
    runner, vocab, info = _runner(args, num_blocks, host_blocks)
    config = EngineConfig(
        num_blocks=num_blocks,
        block_size=block,
        max_num_batched_tokens=args.max_num_batched_tokens,
        host_blocks=host_blocks,
        # the bench's requests run alone, where a load the step waits for takes what an asynchronous
        # one would (copy, then compute); and only a step's modelled time can count a mock copy
        onboarding="sync",
    )
    bench = EngineBench(Engine(config, runner), vocab)
    sizes = (args.prompt_tokens, args.cached_tokens)
    bench.ttft_pair(*sizes)  # warm-up: first calls pay allocation and kernel selection
    bench.decode_rate(DECODE_BATCH, args.decode_context, 2)
    pairs = [bench.ttft_pair(*sizes) for _ in range(args.repeats)]
    onboarded = [bench.ttft_host(*sizes) for _ in range(args.repeats)]
    b1, b8 = [], []
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits both alike
        b1.append(bench.decode_rate(1, args.decode_context, args.decode_steps))
        b8.append(bench.decode_rate(DECODE_BATCH, args.decode_context, args.decode_steps))
    uncached = statistics.median(p[0] for p in pairs)
    cached = statistics.median(p[1] for p in pairs)
    decode_b1, decode_b8 = statistics.median(b1), statistics.median(b8)
    return {
        "engine": args.engine,
        **info,
        "prompt_tokens": args.prompt_tokens,
        "cached_tokens": min(p[2] for p in pairs),  # what the block manager actually served
        "ttft_uncached_ms": uncached * 1000,
        "ttft_cached_ms": cached * 1000,
        "ttft_ratio": uncached / cached,
        "ttft_host_ms": statistics.median(t for t, _ in onboarded) * 1000,
        "host_cached_tokens": min(hit for _, hit in onboarded),
        "prefill_tok_s": args.prompt_tokens / uncached,
        "decode_context": args.decode_context,
        "decode_tok_s_b1": decode_b1,
        "decode_tok_s_b8": decode_b8,
        "decode_batch_ratio": decode_b8 / decode_b1,
        "repeats": args.repeats,
        "goal_ttft_ratio": GOAL_TTFT_RATIO,
        "goal_decode_batch_ratio": GOAL_DECODE_BATCH_RATIO,
    }


def run(args: argparse.Namespace) -> int:
    try:
        result = measure(args)
    except ValueError as exc:
        print(f"kvgate bench engine: {exc}")
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    where = f"{result['model']} on {result['device']}"
    print(f"engine {result['engine']} ({where}), median of {result['repeats']}")
    print(
        f"TTFT {result['prompt_tokens']} tokens: uncached {result['ttft_uncached_ms']:.1f} ms, "
        f"{result['cached_tokens']} cached {result['ttft_cached_ms']:.1f} ms, "
        f"ratio {result['ttft_ratio']:.1f} (goal >= {GOAL_TTFT_RATIO}); "
        f"onboarded from the host {result['ttft_host_ms']:.1f} ms"
    )
    print(f"prefill {result['prefill_tok_s']:.0f} tok/s")
    print(
        f"decode (context {result['decode_context']}): batch 1 {result['decode_tok_s_b1']:.0f} tok/s, "
        f"batch {DECODE_BATCH} {result['decode_tok_s_b8']:.0f} tok/s, "
        f"ratio {result['decode_batch_ratio']:.1f} (goal >= {GOAL_DECODE_BATCH_RATIO})"
    )
    return 0

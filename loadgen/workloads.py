"""Synthetic workloads: agent sessions with tool loops, multi-turn chat, and shared-prefix requests.

A workload hands the driver sessions; a session hands out one turn at a time, given the text of the
model's previous reply, so each turn's prompt is exactly the previous prompt plus the reply plus what
the client appends (as a real agent's is), and a worker's cached prefix stays valid.

Defaults of the agentic workload are measured on 179 Claude Code sessions of kv-cache-tester's traces
(cc_sessions_dev.jsonl, 5,782 turns; traces/README.md):
- turns per session: median 27, log-sigma 0.93, cut at 60 in the trace;
- tool/think time after a `tool_use` turn: median 10 s, log-sigma 1.13 (p90 64 s, p99 610 s);
- tokens appended after a tool call (the tool result): median 653, log-sigma 1.81 (p99 22,028);
- output tokens per turn: median 252, log-sigma 0.89;
- shared system prompt + tool definitions: median 28 blocks of 512 = 14,336 tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec

from loadgen.distributions import Distribution, parse_distribution
from loadgen.text import TextSource

TOOL_NAMES = ("read_file", "edit_file", "bash", "grep", "glob", "web_fetch", "todo_write", "task")


class Turn(msgspec.Struct):
    """One request of a session, and how long the client waits before sending it."""

    messages: list[dict[str, Any]]
    max_tokens: int
    tools: list[dict[str, Any]] | None = None
    tool_result: bool = False  # carries a tool result: sent with the tool-call marker header
    delay_s: float = 0.0  # wait after the previous turn of the session completed


class Session(Protocol):
    session_id: str
    label: str  # agent type, or the workload name

    def next_turn(self, reply: str | None) -> Turn | None:
        """The next turn given the previous reply's text (None before the first); None: done."""
        ...


class Workload(Protocol):
    name: str

    def sessions(self) -> Iterator[tuple[float, Session]]:
        """Sessions with their arrival offsets in seconds (ignored at fixed concurrency)."""
        ...


class AgenticConfig(msgspec.Struct):
    agent_types: int = 4
    turns: Distribution = parse_distribution("lognormal:27,0.93,min=1,max=60")
    tool_time_s: Distribution = parse_distribution("lognormal:10,1.13,max=600")
    tool_result_tokens: Distribution = parse_distribution("lognormal:653,1.81,max=22000")
    output_tokens: Distribution = parse_distribution("lognormal:252,0.89,min=1,max=4096")
    system_tokens: Distribution = parse_distribution("const:14336")
    task_tokens: Distribution = parse_distribution("lognormal:300,1.0,max=8000")
    tools_per_agent: int = 8
    chars_per_token: float = 1.0  # 1 for a byte tokenizer (kvgate's default model); ~3-4 for BPE
    max_context_tokens: int | None = None  # a session ends before its prompt would exceed this
    # tools as text in the prompt instead of `tools`/`tool_calls`/role "tool": a vLLM started without
    # --enable-auto-tool-choice rejects requests that carry `tools`
    plain_tools: bool = False


def poisson_offsets(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival offsets of a Poisson process (rate per second); all at 0 when rate is 0 (unbounded)."""
    t = 0.0
    while True:
        yield t
        if rate > 0:
            t += rng.expovariate(rate)


def _room(messages: list[dict[str, Any]], tools_chars: int, context: int | None, cpt: float) -> int | None:
    """Tokens left for the reply when the prompt (estimated from characters) and the reply must fit in
    `context` tokens, as a server's max_model_len counts them; None when unbounded. Below 1, a real
    agent would compact its context here; a bench ends the session."""
    if context is None:
        return None
    chars = tools_chars + sum(len(m.get("content") or "") + 64 for m in messages)  # 64: role, tool call
    return context - math.ceil(chars / cpt)


def _reply_tokens(dist: Distribution, rng: random.Random, room: int | None) -> int:
    wanted = dist.sample_int(rng, floor=1)
    return wanted if room is None else min(wanted, room)


class AgentType(msgspec.Struct):
    name: str
    system_prompt: str
    tools: list[dict[str, Any]]
    tools_chars: int


def _make_agent(index: int, config: AgenticConfig, text: TextSource, rng: random.Random) -> AgentType:
    budget = round(config.system_tokens.sample(rng) * config.chars_per_token)
    names = TOOL_NAMES[: config.tools_per_agent]
    # tool definitions take about 40% of the budget (~150 characters of JSON around each description)
    description = min(1000, max(16, int(0.4 * budget / max(1, len(names))) - 150))
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"agent {index} {name}: " + text.text(description, rng),
                "parameters": {
                    "type": "object",
                    "properties": {"arg": {"type": "string", "description": text.text(40, rng)}},
                    "required": ["arg"],
                },
            },
        }
        for name in names
    ]
    tools_chars = len(json.dumps(tools))
    system_chars = max(64, budget - tools_chars)
    system = f"You are agent {index}. " + text.text(system_chars, rng)
    return AgentType(f"agent{index}", system, tools, tools_chars)


class AgenticSession:
    """A tool loop: system prompt + task, then (reply, tool call, tool result) per turn."""

    def __init__(
        self, session_id: str, agent: AgentType, config: AgenticConfig, text: TextSource, rng: random.Random
    ) -> None:
        self.session_id = session_id
        self.label = agent.name
        self._agent = agent
        self._config = config
        self._text = text
        self._rng = rng
        self._turns_left = config.turns.sample_int(rng, floor=1)
        self._messages: list[dict[str, Any]] = []
        self._turn = 0

    def _chars(self, dist: Distribution) -> int:
        return max(1, round(dist.sample(self._rng) * self._config.chars_per_token))

    def _tool_round(self, reply: str) -> list[dict[str, Any]]:
        """The reply with a tool call, and the tool's result."""
        rng = self._rng
        call_id = f"call_{self.session_id}_{self._turn}"
        tool = rng.choice(self._agent.tools)["function"]["name"]
        arguments = json.dumps({"arg": self._text.text(24, rng)})
        result = self._text.text(self._chars(self._config.tool_result_tokens), rng)
        if self._config.plain_tools:  # as text: servers without a tool-call parser accept it
            call = json.dumps({"id": call_id, "name": tool, "arguments": arguments})
            return [
                {"role": "assistant", "content": f"{reply}\n<tool_call>{call}</tool_call>"},
                {"role": "user", "content": f"<tool_result id={call_id}>{result}</tool_result>"},
            ]
        function = {"name": tool, "arguments": arguments}
        return [
            {
                "role": "assistant",
                "content": reply,
                "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": result},
        ]

    def next_turn(self, reply: str | None) -> Turn | None:
        if self._turns_left <= 0:
            return None
        self._turns_left -= 1
        rng = self._rng
        if reply is None:
            task = f"[{self.session_id}] " + self._text.text(self._chars(self._config.task_tokens), rng)
            system = self._agent.system_prompt
            if self._config.plain_tools:
                system += "\n# Tools\n" + json.dumps(self._agent.tools)
            self._messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
            delay = 0.0
        else:
            self._messages.extend(self._tool_round(reply))
            delay = self._config.tool_time_s.sample(rng)
        config = self._config
        tools_chars = self._agent.tools_chars
        room = _room(self._messages, tools_chars, config.max_context_tokens, config.chars_per_token)
        if room is not None and room < 1:
            self._turns_left = 0
            return None
        self._turn += 1
        return Turn(
            messages=list(self._messages),
            max_tokens=_reply_tokens(config.output_tokens, rng, room),
            tools=None if self._config.plain_tools else self._agent.tools,
            tool_result=reply is not None,
            delay_s=delay,
        )


class AgenticWorkload:
    name = "agentic"

    def __init__(self, config: AgenticConfig, rate: float, seed: int = 0) -> None:
        self.config = config
        self.rate = rate
        self._rng = random.Random(seed)
        self._text = TextSource(seed)
        self.agents = [
            _make_agent(i, config, self._text, self._rng) for i in range(max(1, config.agent_types))
        ]

    def system_room(self) -> int | None:
        """Tokens the largest system prompt and tool definitions leave for a session (None: no
        context given)."""
        context, cpt = self.config.max_context_tokens, self.config.chars_per_token
        rooms = [_room([{"content": a.system_prompt}], a.tools_chars, context, cpt) for a in self.agents]
        return None if context is None else min(r for r in rooms if r is not None)

    def sessions(self) -> Iterator[tuple[float, Session]]:
        for index, offset in zip(itertools.count(), poisson_offsets(self.rate, self._rng)):
            agent = self._rng.choice(self.agents)
            session_rng = random.Random(self._rng.getrandbits(64))
            yield offset, AgenticSession(f"s{index:06d}", agent, self.config, self._text, session_rng)


class ChatConfig(msgspec.Struct):
    turns: Distribution = parse_distribution("lognormal:4,0.7,min=1,max=30")
    think_time_s: Distribution = parse_distribution("lognormal:15,1.0,max=300")
    user_tokens: Distribution = parse_distribution("lognormal:120,1.0,max=4000")
    output_tokens: Distribution = parse_distribution("lognormal:252,0.89,min=1,max=4096")
    system_tokens: Distribution = parse_distribution("const:400")
    chars_per_token: float = 1.0
    max_context_tokens: int | None = None


class ChatSession:
    """Multi-turn chat: a user message, the model's reply, the next user message after thinking."""

    def __init__(
        self, session_id: str, system: str, config: ChatConfig, text: TextSource, rng: random.Random
    ) -> None:
        self.session_id = session_id
        self.label = "chat"
        self._config = config
        self._text = text
        self._rng = rng
        self._turns_left = config.turns.sample_int(rng, floor=1)
        self._messages: list[dict[str, Any]] = [{"role": "system", "content": system}]

    def next_turn(self, reply: str | None) -> Turn | None:
        if self._turns_left <= 0:
            return None
        self._turns_left -= 1
        rng = self._rng
        if reply is not None:
            self._messages.append({"role": "assistant", "content": reply})
        chars = max(1, round(self._config.user_tokens.sample(rng) * self._config.chars_per_token))
        self._messages.append(
            {"role": "user", "content": f"[{self.session_id}] " + self._text.text(chars, rng)}
        )
        config = self._config
        room = _room(self._messages, 0, config.max_context_tokens, config.chars_per_token)
        if room is not None and room < 1:
            self._turns_left = 0
            return None
        return Turn(
            messages=list(self._messages),
            max_tokens=_reply_tokens(config.output_tokens, rng, room),
            delay_s=0.0 if reply is None else self._config.think_time_s.sample(rng),
        )


class ChatWorkload:
    name = "chat"

    def __init__(self, config: ChatConfig, rate: float, seed: int = 0) -> None:
        self.config = config
        self.rate = rate
        self._rng = random.Random(seed)
        self._text = TextSource(seed)
        chars = max(1, round(config.system_tokens.sample(self._rng) * config.chars_per_token))
        self._system = "You are a helpful assistant. " + self._text.text(chars, self._rng)

    def system_room(self) -> int | None:
        """Tokens the system prompt leaves for a session (None: no context given)."""
        config = self.config
        return _room([{"content": self._system}], 0, config.max_context_tokens, config.chars_per_token)

    def sessions(self) -> Iterator[tuple[float, Session]]:
        for index, offset in zip(itertools.count(), poisson_offsets(self.rate, self._rng)):
            session_rng = random.Random(self._rng.getrandbits(64))
            yield offset, ChatSession(f"c{index:06d}", self._system, self.config, self._text, session_rng)


class PrefixConfig(msgspec.Struct):
    prefixes: int = 8
    prefix_tokens: Distribution = parse_distribution("const:2048")
    suffix_tokens: Distribution = parse_distribution("lognormal:128,0.8,max=4000")
    output_tokens: Distribution = parse_distribution("lognormal:64,0.7,min=1,max=1024")
    chars_per_token: float = 1.0
    max_context_tokens: int | None = None  # a request's question and reply are cut to fit


class SingleTurn:
    """A session of one request (prefix workload, trace rows without a session)."""

    def __init__(self, session_id: str, label: str, turn: Turn) -> None:
        self.session_id = session_id
        self.label = label
        self._turn: Turn | None = turn

    def next_turn(self, reply: str | None) -> Turn | None:
        turn, self._turn = self._turn, None
        return turn


class PrefixWorkload:
    """Many single requests over few shared prefixes (documents, few-shot prompts)."""

    name = "prefix"

    def __init__(self, config: PrefixConfig, rate: float, seed: int = 0) -> None:
        self.config = config
        self.rate = rate
        self._rng = random.Random(seed)
        self._text = TextSource(seed)
        self._prefixes = [
            f"Document {i}.\n"
            + self._text.text(
                round(config.prefix_tokens.sample(self._rng) * config.chars_per_token), self._rng
            )
            for i in range(max(1, config.prefixes))
        ]

    def system_room(self) -> int | None:
        """Tokens the longest prefix leaves for a question and its reply (None: no context given)."""
        longest = max(self._prefixes, key=len)
        return _room([{"content": longest}, {"content": ""}], 0, self.config.max_context_tokens, self._cpt)

    @property
    def _cpt(self) -> float:
        return self.config.chars_per_token

    def sessions(self) -> Iterator[tuple[float, Session]]:
        cpt = self._cpt
        context = self.config.max_context_tokens
        for index, offset in zip(itertools.count(), poisson_offsets(self.rate, self._rng)):
            prefix_id = self._rng.randrange(len(self._prefixes))
            prefix = self._prefixes[prefix_id]
            chars = max(1, round(self.config.suffix_tokens.sample(self._rng) * cpt))
            room = _room([{"content": prefix}, {"content": ""}], 0, context, cpt)
            if room is not None:  # the question takes at most half of what the prefix leaves
                chars = max(1, min(chars, int(room // 2 * cpt)))
            messages = [
                {"role": "system", "content": prefix},
                {"role": "user", "content": f"[q{index}] " + self._text.text(chars, self._rng)},
            ]
            turn = Turn(
                messages=messages,
                max_tokens=_reply_tokens(
                    self.config.output_tokens, self._rng, _room(messages, 0, context, cpt)
                ),
            )
            yield offset, SingleTurn(f"p{index:07d}", f"prefix{prefix_id}", turn)

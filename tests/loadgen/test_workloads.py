import json
from itertools import islice, pairwise

from loadgen.distributions import parse_distribution
from loadgen.workloads import (
    AgenticConfig,
    AgenticWorkload,
    ChatConfig,
    ChatWorkload,
    PrefixConfig,
    PrefixWorkload,
    Turn,
)


def _small_agentic(**overrides: object) -> AgenticConfig:
    config = AgenticConfig(
        agent_types=3,
        turns=parse_distribution("const:5"),
        system_tokens=parse_distribution("const:3000"),
        tool_result_tokens=parse_distribution("const:200"),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _run_session(
    session, replies=("first reply", "second", "third", "fourth", "fifth", "sixth")
) -> list[Turn]:
    turns, reply = [], None
    for text in replies:
        turn = session.next_turn(reply)
        if turn is None:
            break
        turns.append(turn)
        reply = text
    return turns


def test_agentic_turns_extend_the_previous_prompt_with_reply_and_tool_result() -> None:
    workload = AgenticWorkload(_small_agentic(), rate=2.0, seed=3)
    _, session = next(iter(workload.sessions()))
    turns = _run_session(session)
    assert len(turns) == 5  # const:5 turns, then the session ends
    first = turns[0]
    assert [m["role"] for m in first.messages] == ["system", "user"] and not first.tool_result
    assert first.delay_s == 0 and first.tools
    for previous, turn in pairwise(turns):
        assert turn.messages[: len(previous.messages)] == previous.messages  # a strict extension
        assistant, tool = turn.messages[len(previous.messages) :]
        assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["id"] == tool["tool_call_id"]
        assert tool["role"] == "tool" and len(tool["content"]) == 200
        assert turn.tool_result and turn.delay_s > 0 and turn.tools == first.tools
    assert turns[1].messages[2]["content"] == "first reply"


def test_sessions_of_an_agent_type_share_system_prompt_and_tools_and_others_do_not() -> None:
    workload = AgenticWorkload(_small_agentic(), rate=0.0, seed=4)
    sessions = [s for _, s in islice(workload.sessions(), 40)]
    firsts = {}
    for session in sessions:
        turn = session.next_turn(None)
        system = turn.messages[0]["content"]
        assert abs(len(system) + len(json.dumps(turn.tools)) - 3000) < 100  # system_tokens covers both
        firsts.setdefault(session.label, set()).add((system, json.dumps(turn.tools)))
    assert len(firsts) == 3 and all(len(v) == 1 for v in firsts.values())
    assert len({next(iter(v)) for v in firsts.values()}) == 3
    users = [s.next_turn(None) for s in sessions[:5]]
    assert len({u.messages[1]["content"] for u in users}) == 5  # tasks are private


def test_seed_makes_the_workload_deterministic_and_poisson_rate_holds() -> None:
    def first_prompts(seed: int) -> list[str]:
        workload = AgenticWorkload(_small_agentic(), rate=10.0, seed=seed)
        return [s.next_turn(None).messages[1]["content"] for _, s in islice(workload.sessions(), 5)]

    assert first_prompts(1) == first_prompts(1) != first_prompts(2)
    offsets = [o for o, _ in islice(AgenticWorkload(_small_agentic(), 10.0).sessions(), 2001)]
    assert 180 < offsets[-1] < 220  # 2000 gaps at 10/s


def test_chat_appends_user_messages_and_prefix_shares_few_prefixes() -> None:
    chat = ChatWorkload(ChatConfig(turns=parse_distribution("const:3")), rate=1.0)
    _, session = next(iter(chat.sessions()))
    turns = _run_session(session)
    assert [m["role"] for m in turns[-1].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert not any(t.tool_result for t in turns)
    prefix = PrefixWorkload(PrefixConfig(prefixes=3, prefix_tokens=parse_distribution("const:500")), rate=0.0)
    sessions = [s for _, s in islice(prefix.sessions(), 60)]
    systems = {s.next_turn(None).messages[0]["content"] for s in sessions}
    assert len(systems) == 3
    assert all(s.next_turn("reply") is None for s in sessions)  # one request each


def test_sessions_end_before_their_prompt_exceeds_max_context() -> None:
    config = _small_agentic(turns=parse_distribution("const:60"), max_context_tokens=8000)
    _, session = next(iter(AgenticWorkload(config, rate=1.0).sessions()))
    turns = _run_session(session, replies=["r" * 50] * 60)
    assert 5 < len(turns) < 60
    for turn in turns:
        chars = len(json.dumps(turn.tools)) + sum(len(m.get("content") or "") for m in turn.messages)
        assert chars <= 8000
    chat = ChatWorkload(ChatConfig(turns=parse_distribution("const:30"), max_context_tokens=2000), rate=1.0)
    _, session = next(iter(chat.sessions()))
    assert 1 <= len(_run_session(session, replies=["r" * 300] * 30)) < 30


def test_plain_tools_put_definitions_calls_and_results_in_the_text() -> None:
    workload = AgenticWorkload(_small_agentic(plain_tools=True), rate=1.0, seed=3)
    _, session = next(iter(workload.sessions()))
    turns = _run_session(session)
    assert all(t.tools is None for t in turns)
    assert '"name": "read_file"' in turns[0].messages[0]["content"]  # definitions in the system prompt
    assert {m["role"] for t in turns for m in t.messages} == {"system", "user", "assistant"}
    for previous, turn in pairwise(turns):
        assert turn.messages[: len(previous.messages)] == previous.messages and turn.tool_result
        assistant, result = turn.messages[len(previous.messages) :]
        assert "<tool_call>" in assistant["content"] and result["content"].startswith("<tool_result")

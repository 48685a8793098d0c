"""What a policy is asked (`RouteRequest`) and what it answers (`Decision`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from router.sessions import Session

# the prefixes of the session ids the router gives requests that named none (Router.resolve_session)
INFERRED_SESSION_PREFIXES = ("inferred-", "anon-")


def is_inferred(session_id: str | None) -> bool:
    """True when the client named no session: the id, if any, is the router's own guess."""
    return session_id is None or session_id.startswith(INFERRED_SESSION_PREFIXES)


def is_one_shot(session_id: str | None, session: Session | None) -> bool:
    """True for a request that continues no session: the client named none and its prompt extends no
    prompt the router routed before (`session`: the router's entry for `session_id`, None while new).
    An inferred session that came back (a client that sends no session id) is a session like a named
    one."""
    return (session is None or session.turns == 0) and is_inferred(session_id)


class RouteRequest(msgspec.Struct):
    request_id: str
    model: str
    block_hashes: list[int]  # chained hashes of the prompt's full blocks (router.hashing)
    num_tokens: int  # prompt length in tokens, partial last block included
    session_id: str | None = None
    expected_output_tokens: int = 0
    tool_call_pending: bool = False  # the client said this turn carries a tool result
    # the session that forked this one (a sub-agent's parent, e.g. Dynamo's x-dynamo-parent-session-id);
    # without it, a new session whose first prompt extends another session's chain is that one's child
    parent_session_id: str | None = None


class Decision(msgspec.Struct):
    worker_id: str
    overlap_blocks: int  # prefix blocks the worker is expected to hold (device tier)
    estimated_cost: float  # the policy's own score; for session_kv, estimated TTFT in ms
    reason: str  # short, low-cardinality label, e.g. "overlap", "session", "least_loaded"

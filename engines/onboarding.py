"""How a step waits for the host blocks its admissions onboard: the engine's one setting for it, and
the command-line group that names it (`kvgate worker`, `kvgate sim`).

With a host tier (without one, no form changes anything):

- "async" (the default): a sequence waits for its copies while the others go on computing, as vLLM
  v1's host tier, its CPU offloading connector, loads them (`get_num_new_matched_tokens` answers
  load_async=True; the request waits in WAITING_FOR_REMOTE_KVS while the others step). Our engines
  model vLLM v1, so they default to it.
- "sync": the step that admits the sequence waits for its copies, every request in the step with it
  (LMCache's non-layerwise load; the default before).
- "layerwise": that step loads the KV layer by layer, each layer's copy beside the compute of the
  layer before (SGLang HiCache's compute-transfer overlap, LMCache's layerwise mode): the step lasts
  the longer of its compute and its copies, not their sum.

One setting rather than a flag per form, so that no config can be two of them.
"""

from __future__ import annotations

import argparse
from typing import Literal, get_args

Onboarding = Literal["sync", "async", "layerwise"]
ONBOARDING_FORMS: tuple[Onboarding, ...] = get_args(Onboarding)
DEFAULT_ONBOARDING: Onboarding = "async"


def add_onboarding_arguments(parser: argparse.ArgumentParser, engine: str) -> None:
    """`--onboard-sync` / `--onboard-async` / `--onboard-layerwise` into `args.onboarding`, at most one
    (argparse exits 2 on two); `engine` names whose engine they set, for the help text."""
    group = parser.add_mutually_exclusive_group()
    forms: dict[Onboarding, str] = {
        "sync": f"{engine} onboards host blocks synchronously: the step that admits a request whose "
        "prefix is on the host tier waits for its copies, every request in the step with it, the "
        "step-stalling form (LMCache's non-layerwise load; the former default)",
        "async": f"{engine} onboards them asynchronously: such a request waits for its copies while the "
        "others go on computing. The default, because vLLM v1's host tier (its CPU offloading "
        "connector) loads them so",
        "layerwise": f"{engine} copies such a request's KV layer by layer beside the step's compute, as "
        "SGLang HiCache and LMCache's layerwise mode: the step lasts the longer of the two, not their sum",
    }
    for form in ONBOARDING_FORMS:
        group.add_argument(
            f"--onboard-{form}",
            dest="onboarding",
            action="store_const",
            const=form,
            default=DEFAULT_ONBOARDING,
            help=forms[form],
        )

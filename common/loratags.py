"""A1111's extra-network prompt tags: `<lora:name:weight>` applies a LoRA.

Why: A1111 clients (and the AWS extension, which is A1111 underneath) pick
LoRAs inside the prompt; A1111 removes the tags before encoding the text.
sdqueue turns them into the job's `loras` the same way.
"""
from __future__ import annotations

import re

from common.jobspec import LoraRef

TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)


def extract_loras(prompt: str) -> tuple[str, list[LoraRef], list[str]]:
    """(prompt without the tags, LoRAs in order of appearance, problems with malformed weights)."""
    loras: list[LoraRef] = []
    problems: list[str] = []

    def take(match: re.Match) -> str:
        name, weight = match.group(2).strip(), (match.group(3) or "").strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            problems.append(f"<{match.group(1)}:{name}:{weight}>: weight is not a number; 1.0 was used")
            value = 1.0
        if name not in (lr.name for lr in loras):
            loras.append(LoraRef(name, value))
        return ""

    cleaned = TAG.sub(take, prompt)
    return (re.sub(r"\s{2,}", " ", cleaned).strip(" ,") if loras else prompt), loras, problems

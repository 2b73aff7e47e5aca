"""The demo's language-model task: routing a bank's customer messages to the queue that handles them.

`examples(n, seed)` draws seeded synthetic customer messages from templates, each labelled with
one of `QUEUES`; `conversation` renders one as the chat the adapter learns (a system prompt that
lists the queues, the message, and the queue's name as the answer); `write_jsonl` writes a
training file for `sitewarden lm train-adapter`. `requirement` is the check a caller adds to
requirement-checked sampling: the answer is exactly one queue name. The messages are synthetic
and carry no real customer data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

QUEUES = ("cards", "loans", "fraud", "mortgages", "savings")
SYSTEM = "You route customer messages at a bank. Reply with exactly one word, the queue: " + ", ".join(QUEUES) + "."

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cards": (
        "My {card} card was declined at {place} even though I have money in my account.",
        "I need a replacement {card} card, the chip stopped working.",
        "How do I raise the limit on my {card} card before my trip to {city}?",
        "The contactless payment on my {card} card does not work at {place}.",
        "Can I get a new PIN for my {card} card?",
    ),
    "loans": (
        "I would like to borrow {amount} to buy a car, what rate can you offer?",
        "Can I repay my personal loan of {amount} early without a fee?",
        "I missed a loan instalment last month, what happens now?",
        "How long does a decision on a {amount} personal loan take?",
        "I want to consolidate my debts into one loan of about {amount}.",
    ),
    "fraud": (
        "There is a payment of {amount} at {place} in {city} that I never made.",
        "Someone called pretending to be the bank and asked for my PIN.",
        "My card was stolen in {city} yesterday, please block it.",
        "I got a text asking me to confirm a transfer of {amount} that I did not start.",
        "I see three transactions from {place} that are not mine.",
    ),
    "mortgages": (
        "We are buying a flat in {city} for {amount}, how much can we borrow?",
        "My fixed rate mortgage ends next month, what are my options?",
        "Can I overpay my mortgage by {amount} this year?",
        "I want to move my mortgage to a new house in {city}.",
        "What deposit do I need for a first home in {city}?",
    ),
    "savings": (
        "What interest does the instant access savings account pay?",
        "I want to open a savings account for my daughter with {amount}.",
        "Can I move {amount} from my current account into my ISA?",
        "When is interest paid on my fixed term deposit?",
        "Is there a savings account with a better rate if I lock in {amount} for a year?",
    ),
}
_FILL = {
    "card": ("debit", "credit", "business", "gold", "student"),
    "place": ("a supermarket", "the petrol station", "an online shop", "a restaurant", "the airport"),
    "city": ("Leeds", "Lyon", "Porto", "Gdansk", "Turin", "Ghent"),
    "amount": ("£250", "€1,200", "£8,000", "€15,000", "£240,000", "€310,000"),
}


def message(queue: str, rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES[queue])
    return template.format(**{k: rng.choice(v) for k, v in _FILL.items()})


def examples(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (message, queue) pairs, queues in turn so that every one is represented."""
    rng = random.Random(seed)  # noqa: S311 - seeded synthetic data
    return [(message(QUEUES[i % len(QUEUES)], rng), QUEUES[i % len(QUEUES)]) for i in range(n)]


def conversation(text: str, queue: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    if queue is not None:
        messages.append({"role": "assistant", "content": queue})
    return messages


def write_jsonl(path: Path, n: int, seed: int) -> Path:
    lines = [json.dumps({"messages": conversation(text, queue)}) for text, queue in examples(n, seed)]
    path.write_text("\n".join(lines) + "\n")
    return path


def requirement() -> dict[str, Any]:
    """The caller's check: the answer is one queue name, nothing else."""
    return {"name": "one_queue", "type": "one_of", "values": list(QUEUES), "ignore_case": True}

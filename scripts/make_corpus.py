"""Regenerate ``corpus.txt``, the small English corpus the default tokenizer trains on.

The text is original: sentence templates written for this project, filled from word lists
with a fixed seed, grouped into paragraphs by topic. It only has to read like ordinary
prose with a varied vocabulary so that a sentencepiece model of about 512 pieces learns
useful subwords. Run ``python scripts/make_corpus.py`` to rewrite the file; the
output is byte-for-byte reproducible. Editing the corpus changes the tokenizer cache key,
so the default tokenizer retrains on next use. A maintainer's tool: it lives outside the package, which ships
only the corpus it wrote (``paged/fms/data/corpus.txt``).
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

SEED = 20240611
TARGET_BYTES = 90_000

# Each topic: word lists keyed by slot name, and templates using {slot} placeholders.
TOPICS: dict[str, dict[str, list[str]]] = {
    "serving": {
        "thing": [
            "the scheduler", "the request queue", "the batching loop", "the decode step",
            "the prefill pass", "the token sampler", "the router", "the inference server",
            "the attention kernel", "the model runner", "the admission policy",
        ],
        "quality": [
            "latency", "throughput", "memory pressure", "tail latency", "fairness",
            "utilisation", "time to first token", "cost per request",
        ],
        "verb": [
            "balances", "trades away", "protects", "measures", "improves", "hides",
            "reduces", "watches", "limits",
        ],
        "load": [
            "a sudden burst of traffic", "a long prompt", "hundreds of short chats",
            "a single enormous document", "a quiet night", "a holiday spike",
            "a batch of summaries", "a steady stream of questions",
        ],
        "T": [
            "When {load} arrives, {thing} {verb} {quality} before anything else.",
            "Engineers often discover that {thing} {verb} {quality} only after they measure it under {load}.",
            "A careful operator watches {quality} closely, because {thing} behaves differently under {load}.",
            "In practice {thing} {verb} {quality}, and nobody notices until {load} shows up.",
            "The simplest design lets {thing} handle {load} one request at a time, which wastes most of the hardware.",
            "Continuous batching lets new requests join the batch as soon as older ones finish.",
            "Every generated token depends on all the tokens before it, so decoding is sequential by nature.",
            "Serving a language model is mostly a question of moving weights and cached keys through memory fast enough.",
            "If {quality} matters more than {quality2}, the team tunes {thing} accordingly.",
            "Nobody wants to explain to a customer why {quality} doubled during {load}.",
            "A good dashboard shows {quality} next to {quality2}, so trade-offs are visible at a glance.",
        ],
    },
    "cache": {
        "item": [
            "each key and value vector", "each page of the cache", "a block of sixteen tokens",
            "the shared prompt prefix", "a finished sequence", "the free list",
            "the page table", "a partly filled page", "the reference count",
        ],
        "action": [
            "is allocated", "is released", "is copied on write", "is shared between requests",
            "is evicted", "is reused", "is poisoned with invalid numbers during tests",
            "is checked for leaks",
        ],
        "reason": [
            "memory stays tight", "the batch can grow", "two sequences start from the same prompt",
            "a request was cancelled", "the pool is nearly full", "fragmentation would otherwise creep in",
            "a beam search forks into several branches",
        ],
        "T": [
            "Because {reason}, {item} {action} as early as possible.",
            "A paged cache stores {item} in fixed-size blocks, much like virtual memory stores a program in pages.",
            "When {reason}, {item} {action}, and the table that maps logical positions to physical pages is updated.",
            "The allocator keeps a list of free pages, so a request for a few pages succeeds whenever enough of them are free.",
            "Only the last page of a sequence can be partly empty, which bounds the waste to less than one page per sequence.",
            "A reserved contiguous buffer wastes everything between the actual length and the maximum length.",
            "Tests fill the unused pages with invalid numbers, so any kernel that reads them produces an obvious error.",
            "It is tempting to assume {item} {action} at the right moment, but a stateful test usually finds the exception.",
            "The reference count of a shared page falls to zero only when the last sequence that uses it is finished.",
            "Copying a page on write costs a little bandwidth but saves far more memory than it spends.",
            "If {reason}, the scheduler may pause a request and return its pages to the pool.",
        ],
    },
    "computing": {
        "device": [
            "the processor", "the graphics card", "the compiler", "the operating system",
            "the memory controller", "the network card", "the disk", "the cache hierarchy",
            "the interpreter", "the linker",
        ],
        "adj": [
            "fast", "patient", "predictable", "stubborn", "clever", "fragile", "efficient",
            "mysterious", "reliable", "noisy",
        ],
        "task": [
            "sorting a list", "multiplying matrices", "reading a file", "compiling a kernel",
            "scheduling threads", "hashing a string", "parsing a configuration file",
            "copying buffers", "searching a tree",
        ],
        "T": [
            "{device_cap} seems {adj} when it is {task}, yet it hides a great deal of complexity.",
            "Early programmers spent hours {task} by hand, and they learned to respect every cycle.",
            "A profiler often shows that {device} spends more time waiting for data than computing with it.",
            "Modern hardware rewards code that touches memory in order and punishes code that jumps around.",
            "When {device} is busy {task}, the rest of the system must wait its turn.",
            "Small benchmarks can mislead, because a warm cache makes almost anything look {adj}.",
            "The first version of a program should be correct; the second version can try to be {adj}.",
            "Measuring twice and optimising once is still the best advice anyone has given about performance.",
            "A compiler that specialises code for one shape may have to start again for the next shape.",
            "Nobody expected {device} to be the bottleneck, but the numbers said otherwise.",
            "Good tests describe what {device} must do, not how it happens to do it today.",
        ],
    },
    "weather": {
        "sky": [
            "a grey sky", "a clear blue morning", "low clouds", "a thin mist", "a violet sunset",
            "heavy fog", "a sky full of small white clouds", "a bright winter noon",
        ],
        "event": [
            "a thunderstorm", "a light drizzle", "a sudden hailstorm", "a warm breeze",
            "the first frost", "a week of steady rain", "a dry wind from the south",
            "an early snowfall",
        ],
        "place": [
            "over the harbour", "across the valley", "along the coast", "above the old town",
            "in the mountains", "over the wheat fields", "near the river", "on the northern islands",
        ],
        "T": [
            "The forecast promised {sky}, but {event} rolled in {place} by the afternoon.",
            "Farmers read the weather {place} the way sailors read the tide.",
            "After {event}, the air smelled of wet stone and cut grass.",
            "People {place} still say that {sky} in the morning means {event} before evening.",
            "Meteorologists combine satellite images with thousands of ground stations to predict {event}.",
            "A barometer that falls quickly usually warns of {event}.",
            "Children ran outside to watch {event} {place}, while their parents closed the windows.",
            "Under {sky}, the town moved slowly and the cafes filled with quiet conversation.",
            "Nobody trusted the forecast after {event} surprised everyone {place} last spring.",
            "The wind turned, the temperature dropped, and {sky} gave way to {event}.",
        ],
    },
    "cooking": {
        "dish": [
            "a pot of lentil soup", "a loaf of fresh bread", "a tomato sauce", "a tray of roasted vegetables",
            "a lemon cake", "a simple omelette", "rice with herbs", "a bowl of noodles",
            "a dish of baked apples", "a spicy stew",
        ],
        "ingredient": [
            "garlic", "olive oil", "fresh basil", "a pinch of salt", "black pepper", "butter",
            "grated cheese", "brown sugar", "a squeeze of lemon", "chopped onions", "cumin",
        ],
        "method": [
            "simmer it gently", "stir it often", "let it rest", "bake it slowly", "taste it again",
            "cover the pan", "toast the spices first", "keep the heat low",
        ],
        "T": [
            "To make {dish}, start with {ingredient} and {method}.",
            "My grandmother insisted that {dish} needs {ingredient}, and she was rarely wrong.",
            "A good cook will {method}, because patience matters more than any expensive tool.",
            "If the flavour seems flat, add {ingredient} and {method}.",
            "Few things smell as comforting as {dish} on a cold evening.",
            "Recipes are suggestions; the cook decides how much {ingredient} is enough.",
            "The secret to {dish} is to {method} and never rush the final minutes.",
            "Whatever is left of {dish} often tastes better the next day, once the flavours have settled.",
            "Measure the flour carefully, but trust your eyes and your nose for everything else.",
            "Guests remember the warmth of the kitchen long after they forget the menu.",
        ],
    },
    "tools": {
        "tool": [
            "the printing press", "the mechanical clock", "the slide rule", "the loom",
            "the compass", "the abacus", "the steam engine", "the telescope", "the typewriter",
            "the punched card", "the telegraph", "the plough",
        ],
        "era": [
            "in the fifteenth century", "during the industrial revolution", "long before electricity",
            "in the age of sail", "in ancient markets", "at the start of the last century",
            "in medieval workshops",
        ],
        "effect": [
            "changed how people shared ideas", "made trade more reliable", "turned hours into a shared measure",
            "let navigators cross open water", "put calculation within reach of ordinary clerks",
            "made cloth cheaper than anyone had imagined", "shortened the distance between cities",
        ],
        "T": [
            "{tool_cap} appeared {era} and quietly {effect}.",
            "Historians argue about who invented {tool}, but they agree that it {effect}.",
            "Every tool encodes a theory of work, and {tool} was no exception.",
            "Craftsmen {era} repaired their own instruments, often improving them along the way.",
            "It is easy to forget that {tool} once seemed as strange as any modern machine.",
            "The people who first used {tool} could not have predicted that it {effect}.",
            "Museums still keep examples of {tool}, polished and silent behind glass.",
            "Like many inventions, {tool} spread slowly at first and then all at once.",
            "A tool becomes invisible once it works well enough that nobody thinks about it.",
            "Some workshops {era} kept careful notebooks, and those pages tell us how {tool} was really used.",
        ],
    },
    "language": {
        "unit": [
            "a word", "a sentence", "a subword piece", "a single character", "a paragraph",
            "a rare name", "a number", "a punctuation mark",
        ],
        "model": [
            "a tokenizer", "a language model", "the vocabulary", "the embedding table",
            "the output layer", "the sampler",
        ],
        "T": [
            "Before a model reads any text, {model} splits it into pieces such as {unit}.",
            "A small vocabulary forces {model} to build long words out of several short pieces.",
            "Frequent words usually become single tokens, while {unit} may be split into many parts.",
            "Each token is just an integer, and {model} turns that integer into a vector of numbers.",
            "The sampler picks the next token from a probability distribution over the whole vocabulary.",
            "Greedy decoding always takes the most likely token, which makes the output easy to reproduce.",
            "Special tokens mark the beginning and the end of a sequence, and padding fills the gaps in a batch.",
            "Translating {unit} from one language to another is harder than it looks.",
            "Writers choose {unit} with care, because rhythm matters as much as meaning.",
            "Reading aloud reveals clumsy phrasing that the eye happily skips over.",
        ],
    },
    "garden": {
        "plant": [
            "the tomato plant", "the apple tree", "a row of beans", "the rosemary", "the strawberry patch",
            "the sunflower bed", "the young lettuce", "the old pear tree", "the climbing rose",
        ],
        "season": [
            "in early spring", "through the long summer", "in the first days of autumn",
            "during a mild winter", "after the last frost",
        ],
        "care": [
            "needs plenty of water", "prefers a sunny corner", "must be pruned", "attracts bees",
            "grows faster than expected", "suffers in heavy clay", "rewards a little patience",
        ],
        "T": [
            "{plant_cap} {care} {season}.",
            "Every gardener learns that {plant} {care}, usually the hard way.",
            "{season_cap}, the garden smells of soil, rain, and {plant}.",
            "A neighbour once said that {plant} {care}, and the advice turned out to be true.",
            "Compost, sunlight, and time do more for a garden than any clever gadget.",
            "Birds arrive {season} to inspect {plant} and argue over the seeds.",
            "Keeping notes on what grew well each year turns guesses into knowledge.",
        ],
    },
}

# Short handwritten paragraphs that anchor the corpus with plain connected prose.
OPENING = [
    "This corpus exists so that a small tokenizer can be trained without downloading anything. "
    "It mixes notes about software with ordinary scenes from kitchens, gardens, workshops and "
    "rainy streets. None of it is meant to be remarkable; it only has to sound like English.",
    "A paged cache borrows an old idea from operating systems. Instead of reserving one long "
    "buffer for every conversation, memory is cut into pages of equal size, and each sequence "
    "keeps a small table that says which pages hold its keys and values. New tokens land in the "
    "last page until it fills, then another page is taken from the free list.",
    "The numbers in this text are deliberately ordinary: 3 apples, 12 pages, 256 tokens, 1024 "
    "bytes, 7 days, 42 requests per second, and a temperature of 18 degrees. Digits, commas, "
    "quotation marks, and the occasional question appear so the tokenizer sees them too. Why "
    "not? \"Small data,\" someone once said, \"is still data.\"",
    "Typists once practised on lines that used every capital from A, B, C and D through J, K, "
    "Q, V, W, X, Y and Z. Programmers practise on symbols instead: a hash # starts a comment, a "
    "dollar sign $ marks a price, 50% is a half, & joins two names, and * multiplies. Braces { } "
    "and brackets [ ] hold code, a backslash \\ escapes, a pipe | chains commands, a tilde ~ means "
    "home, an @ names a user, a caret ^ raises a power, and an underscore _ joins words like "
    "page_size. Compare a < b and c > d, or check that x = y + 1 - z / 2; then quote `code` "
    "between backticks. It's 9 o'clock (nearly), so stop here!",
]


def _fill(template: str, words: dict[str, list[str]], rng: random.Random) -> str:
    """Fill one template; ``{x_cap}`` capitalises and ``{x2}`` draws a second, different word."""
    out = template
    for slot, choices in words.items():
        if slot == "T":
            continue
        if "{" + slot + "_cap}" in out:
            w = rng.choice(choices)
            out = out.replace("{" + slot + "_cap}", w[0].upper() + w[1:])
        if "{" + slot + "}" in out:
            first = rng.choice(choices)
            out = out.replace("{" + slot + "}", first)
            if "{" + slot + "2}" in out:
                second = rng.choice([c for c in choices if c != first])
                out = out.replace("{" + slot + "2}", second)
    return out[0].upper() + out[1:]


def make_corpus(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    """Return the corpus text: opening paragraphs, then template paragraphs until ``target_bytes``."""
    rng = random.Random(seed)
    paragraphs = list(OPENING)
    size = sum(len(p) + 2 for p in OPENING)
    names = sorted(TOPICS)
    while size < target_bytes:
        words = TOPICS[rng.choice(names)]
        templates = rng.sample(words["T"], k=rng.randint(4, min(7, len(words["T"]))))
        para = " ".join(_fill(t, words, rng) for t in templates)
        paragraphs.append(para)
        size += len(para) + 2
    wrapped = [textwrap.fill(p, width=88, break_on_hyphens=False) for p in paragraphs]
    return "\n\n".join(wrapped) + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "paged" / "fms" / "data" / "corpus.txt"
    out.write_text(make_corpus(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")

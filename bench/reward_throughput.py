"""Reward throughput: grade one training step's worth of responses (default 8192 = 512 golds x 16).

    python bench/reward_throughput.py --benchmarks PATH_TO_BENCHMARK_JSONL_DIR [--workers N]

Responses are synthetic but shaped like real rollouts: a few hundred tokens of reasoning with inline
LaTeX, then the final answer as \\boxed{} or a DAPO "Answer:" line. Per group of 16, a random share is
correct; wrong answers come from a few distractors per problem, so groups repeat answers as real ones
do (the pool grades each distinct (gold, answer) pair once). Variants:

  realistic     as above
  distinct      every wrong answer unique (no repeats: the most grading work per response)
  adversarial   realistic with 1% of responses replaced by hostile endings (power towers, deep
                nesting, 10^6-character strings: see _adversarial); the pool's guard scores them
                0 without grading
  adversarial_unguarded
                the same responses with the guard off: every hostile answer the extractor keeps
                goes to a worker and costs up to timeout_s there

Baseline, measured in the same run: the same grader called serially in this process (no pool, no
de-duplication) on a sample; the pool's speed-up is printed against it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import re
import time
from pathlib import Path

WORDS = (
    "we note that the sum is symmetric so consider the case where each term is bounded and apply the "
    "inequality to both sides then simplify the expression using the identity which gives a quadratic "
    "in the unknown whose roots must be positive integers hence checking small values we find"
).split()
MATH = ["$x^2 + 3x - 10 = 0$", "$\\frac{a+b}{2} \\ge \\sqrt{ab}$", "$n(n+1)/2$", "$\\binom{10}{3} = 120$",
        "$\\sin^2\\theta + \\cos^2\\theta = 1$", "$(x-2)(x+5)$", "$2^{10} = 1024$", "$\\angle ABC = 60^\\circ$"]


def _reasoning(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(12, 24)):  # ~300-600 tokens
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 18)))
        parts.append(sentence.capitalize() + " " + rng.choice(MATH) + ".")
    return "\n".join(parts)


def _finish(rng: random.Random, answer: str) -> str:
    if rng.random() < 0.5:
        return f"\n\nTherefore the answer is $\\boxed{{{answer}}}$."
    return f"\n\nAnswer: {answer}"


def _perturb(gold: str, rng: random.Random, unique: int | None) -> str:
    m = re.fullmatch(r"-?\d+", gold)
    if m:
        return str(int(gold) + (unique if unique is not None else rng.choice([-2, -1, 1, 3])) + 1)
    if unique is not None:
        return f"{gold} + {unique + 1}"
    return rng.choice([f"2 \\cdot ({gold})", f"{gold} + 1", "\\frac{1}{2}", "0"])


def make_responses(golds: list[str], per_gold: int, variant: str, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, gold_list = [], []
    counter = 0
    for gold in golds:
        p_correct = rng.choice([0.0, 0.125, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0])
        distractors = [_perturb(gold, rng, None) for _ in range(3)]
        for _ in range(per_gold):
            if rng.random() < p_correct:
                answer = gold
            elif variant == "distinct":
                counter += 1
                answer = _perturb(gold, rng, counter)
            else:
                answer = rng.choice(distractors)
            responses.append(_reasoning(rng) + _finish(rng, answer))
            gold_list.append(gold)
    if variant.startswith("adversarial"):
        n_bad = max(1, len(responses) // 100)
        for k, i in enumerate(rng.sample(range(len(responses)), n_bad)):
            responses[i] = _reasoning(rng) + _adversarial(k)
    return responses, gold_list


def _adversarial(k: int) -> str:
    """The k-th hostile ending, cycling through the kinds the issue names: power towers, deep nesting,
    10^6-character strings (inside a box, on an Answer: line, and a long expression that fits the
    extractor's cap), each distinct so that none is de-duplicated away."""
    kind = k % 5
    if kind == 0:
        a, b, d = 7 + k % 90, 8 + k % 7, 7 + k % 3
        return f"\n\nAnswer: {a}^{{{b}^{{9^{{{d}}}}}}}"
    if kind == 1:
        depth = 24 + k % 8
        return "\n\n$\\boxed{" + "\\frac{1}{" * depth + str(k) + "}" * depth + "}$"
    if kind == 2:
        return "\n\n$\\boxed{" + str(k) + "1" * 10**6 + "}$"
    if kind == 3:
        return "\n\nAnswer: " + "x+" * 500_000 + str(k)
    return "\n\n$\\boxed{" + "+".join(f"x_{{{j}}}" for j in range(k, k + 1200)) + "}$"
    return responses, gold_list


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", required=True, type=Path, help="folder with the six benchmark .jsonl files")
    ap.add_argument("--golds", type=int, default=512)
    ap.add_argument("--per-gold", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="default: all CPUs this process may use")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--variants", default="realistic,distinct,adversarial")
    ap.add_argument("--baseline-sample", type=int, default=512)
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" (the pool enforces it)

    from megatron_nft.data.benchmarks import benchmark_names, load_benchmark
    from megatron_nft.reward import GradingPool, extract_answer, math_verify_grader

    all_golds: list[str] = []
    for name in benchmark_names():
        all_golds += [p.answer for p in load_benchmark(args.benchmarks / f"{name}.jsonl")]
    golds = random.Random(1).sample(sorted(set(all_golds)), args.golds)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"os.cpu_count()={os.cpu_count()} usable={cpus} | python {platform.python_version()}")

    # Baseline: serial, in-process, no de-duplication (math-verify without its signal timeouts).
    responses, gold_list = make_responses(golds, args.per_gold, "realistic")
    sample = random.Random(2).sample(range(len(responses)), min(args.baseline_sample, len(responses)))
    start = time.perf_counter()
    for i in sample:
        answer = extract_answer(responses[i])
        if answer is not None:
            math_verify_grader(gold_list[i], answer)
    serial_rate = len(sample) / (time.perf_counter() - start)
    print(f"baseline serial in-process ({len(sample)} realistic responses): {serial_rate:.1f} responses/s")

    realistic_s = None
    for variant in args.variants.split(","):
        # A fresh pool per variant: its workers' caches of parsed golds start empty, as in a training
        # step (every step brings new prompts); otherwise later variants would reuse earlier parses.
        start = time.perf_counter()
        with GradingPool(workers=args.workers, timeout_s=args.timeout, guard=variant != "adversarial_unguarded") as pool:
            started = time.perf_counter() - start
            responses, gold_list = make_responses(golds, args.per_gold, variant)
            chars = sum(map(len, responses)) / len(responses)
            scores = pool.score(responses, gold_list)
            s = pool.last_stats
            rate = len(responses) / s["seconds"]
            print(
                f"{variant:12s} {len(responses)} responses (mean {chars:.0f} chars), {s['graded']} distinct pairs, "
                f"{s['refused']} refused, {s['no_answer']} without answer, {s['timeouts']} timeouts, "
                f"{s['errors']} errors, reward mean {sum(scores) / len(scores):.3f}: "
                f"{s['seconds']:.2f} s, {rate:.0f} responses/s ({rate / serial_rate:.1f}x serial baseline; "
                f"pool start {started:.2f} s, {pool.workers} workers, not counted)"
            )
            if variant == "realistic":
                realistic_s = s["seconds"]
            elif variant.startswith("adversarial") and realistic_s is not None:
                # what the hostile 1% cost beyond the timeouts they used up (each holds one worker)
                timeout_cost = s["timeouts"] * args.timeout / pool.workers
                print(
                    f"{'':12s} vs realistic: +{s['seconds'] - realistic_s:.2f} s, of which timeouts "
                    f"{timeout_cost:.2f} s, beyond the timeouts {s['seconds'] - realistic_s - timeout_cost:+.2f} s"
                )


if __name__ == "__main__":
    main()

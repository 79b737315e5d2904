"""Answer grading: responses -> {0.0, 1.0} scores in a process pool with a hard per-answer timeout.

Pipeline per response: `extract_answer` (in this process; linear time) -> `guard.refusal` (this
process, linear: answers that would only stall sympy, such as power towers, deep nesting or very long
expressions, score 0 without a worker) -> the grader, run in a worker
process of a pebble ProcessPool with `timeout=timeout_s`. A worker that overruns is killed and its item
scores 0.0; pebble starts a replacement and the other items keep flowing. Identical (gold, answer)
pairs within a call are graded once (in RL, the K answers of a group often agree).

Scores are 1.0 (correct) or 0.0 (wrong, no extractable answer, refused by the guard, grader error,
or timeout). A truncated
response (finish_reason "length") is wrong whatever it contains: this module never sees the finish
reason, so the caller applies that rule with `apply_truncation`.

Graders are selected by name from a registry (`register_grader`); a grader is a module-level function
`(gold: str, answer: str) -> float` over *extracted* answer strings, so it pickles by reference into
the workers. "math_verify" (HF Math-Verify) is the default. Graders may be slow or hang; they are only
ever called inside the pool, which is what bounds them. Both built-in graders decide plain numbers on
their exact values first (reward/exact.py): floats cannot tell 1/2004! from 1/2006!.

math-verify 0.9.0 enforces its own timeouts with signal.alarm, which fails outside the main thread
and cannot interrupt a long C-level computation; we pass parsing_timeout=None / timeout_seconds=None
and rely on the pool's timeout instead, which kills the process whatever it is doing.

Process start: workers come from a "forkserver" context (spawn where there is none): never a fork of
the caller, which may hold torch.distributed (gloo/NCCL) state, CUDA contexts or threads. The fork
server preloads math_verify and this module, so each worker (including the replacement for a killed
one) starts in milliseconds. Like every non-fork start method, the fork server also imports the
caller's `__main__` script once (Python's own behaviour): keep entry points' heavy imports inside
their `main()` to keep it light. Nothing here imports torch.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from fractions import Fraction

import pebble

from megatron_nft.data.latex import drop_insignificant_spaces
from megatron_nft.reward.exact import compare_exact
from megatron_nft.reward.extract import ANSWER_FORMATS, extract_answer
from megatron_nft.reward.guard import refusal

logger = logging.getLogger(__name__)

Grader = Callable[[str, str], float]

_GRADERS: dict[str, Grader] = {}


def register_grader(name: str, fn: Grader) -> None:
    """Make `fn(gold_answer, answer) -> float` selectable as `grader=name`.

    `fn` must be a module-level function (workers receive it pickled by reference) and should parse
    its gold argument through a cache: one training step grades thousands of answers against a few
    hundred golds.
    """
    try:
        pickle.dumps(fn)
    except Exception as e:  # lambdas, closures, bound methods of unpicklable objects
        raise ValueError(f"grader {name!r} must be a picklable module-level function: {e}") from e
    _GRADERS[name] = fn


def get_grader(name: str) -> Grader:
    try:
        return _GRADERS[name]
    except KeyError:
        raise ValueError(f"grader={name!r}: allowed values are {', '.join(sorted(_GRADERS))}") from None


def grader_names() -> list[str]:
    return sorted(_GRADERS)


# ---------------------------------------------------------------------------------------------------
# math-verify grader (runs in workers; imports math_verify lazily so importing this module is cheap)


def _math_verify_parse(answer: str) -> list:
    from math_verify import parse

    # The answer is already extracted: wrapping it in \boxed{} makes math-verify's LaTeX extraction
    # take exactly this string (it falls back to plain-expression and raw-string matches). Spaces
    # that LaTeX ignores go first, on both sides alike: math-verify compares what it cannot parse as
    # raw strings (`m_{\max }` vs `m_{\max}`), and whether it parses can hang on a space
    # (`\lambda_{\text {red}}` parses, `\lambda_{\text{red}}` does not).
    return parse("\\boxed{" + drop_insignificant_spaces(answer) + "}", parsing_timeout=None)


def _same_symbols(gold: tuple, answer: list) -> list:
    """`answer` with each symbol replaced by the gold's symbol of the same name.

    math-verify makes every symbol real=True, or real=False when the string has a standalone `i`
    (`3 i`, `e^{i t}`), so two spellings of one expression can hold symbols that sympy never finds
    equal; a name means one variable on both sides.
    """
    by_name = {}
    for item in gold:
        for sym in getattr(item, "free_symbols", ()):
            by_name.setdefault(sym.name, sym)
    unified = []
    for item in answer:
        swap = {sym: by_name[sym.name] for sym in getattr(item, "free_symbols", ())
                if getattr(sym, "name", None) in by_name and by_name[sym.name] != sym}
        unified.append(item.xreplace(swap) if swap else item)
    return unified


@functools.lru_cache(maxsize=4096)
def _math_verify_parse_gold(gold: str) -> tuple:
    # Per worker process: each distinct gold is parsed once, then reused by every answer graded
    # against it (sympy objects are immutable, so sharing them is safe).
    return tuple(_math_verify_parse(gold))


# When one side is a decimal: math-verify's own rule, both rounded to 6 decimal places (verify's
# float_rounding=6), applied to exact values -- and never wider than a relative 1e-4. Rounding alone
# is absolute: it would call 0 right for minerva's gold 2.88e-19, and 1e-8 right for 2e-8.
MATH_VERIFY_DECIMALS = 6
MAX_RELATIVE_ERROR = Fraction(1, 10_000)


def _decimals_equal(a: Fraction, b: Fraction) -> bool:
    return (
        round(a, MATH_VERIFY_DECIMALS) == round(b, MATH_VERIFY_DECIMALS)
        and abs(a - b) <= MAX_RELATIVE_ERROR * max(abs(a), abs(b))
    )


def math_verify_grader(gold: str, answer: str) -> float:
    """1.0 when math-verify finds `answer` equivalent to `gold`. verify() is asymmetric: gold first.

    Plain numbers on both sides (reward/exact.py) are decided on their exact values first: sympy's
    evalf with chop, which verify uses, calls 1/2004! and 1/2006! equal (their difference is below
    its precision), and math-verify reads neither Python-style numbers such as `-1./3` nor
    scientific notation (`4.5e33` becomes 4.5·e·33, e being Euler's number).
    """
    exact = compare_exact(gold, answer, _decimals_equal)
    if exact is not None:
        return 1.0 if exact else 0.0
    from math_verify import verify

    parsed_gold = _math_verify_parse_gold(gold)
    if not parsed_gold:
        return 0.0
    parsed = _math_verify_parse(answer)
    if not parsed:
        return 0.0
    return 1.0 if verify(list(parsed_gold), _same_symbols(parsed_gold, parsed), timeout_seconds=None) else 0.0


register_grader("math_verify", math_verify_grader)


# ---------------------------------------------------------------------------------------------------
# worker side


def _worker_init() -> None:
    from megatron_nft.parent_death import die_with_parent

    die_with_parent()  # a SIGKILLed trainer leaves no worker behind (the fork server exits with it)
    # pebble's worker handles SIGTERM in Python, and a Python handler cannot run while the worker sits
    # in a long C call that does not poll for signals: pebble would then wait its 3 s term_timeout
    # before SIGKILL. A worker holds no state worth cleaning up: take the default action, die at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Disabled-timeout warnings, parse failures of garbage answers: noise at thousands per step.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    try:  # import before the first task so it does not count against that task's timeout
        import math_verify  # noqa: F401
    except ImportError:
        pass


def _grade_task(grader: Grader, gold: str, answer: str) -> float:
    return float(grader(gold, answer))


_PRELOAD = ("megatron_nft.reward.grading", "math_verify")


def _mp_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Keep whatever the process already asked the (process-wide) fork server to preload -- Python's
    # default is ["__main__"] -- and add ours. Takes effect only if the server is not yet running.
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", None) or ["__main__"])
    ctx.set_forkserver_preload(list(dict.fromkeys([*current, *_PRELOAD])))
    return ctx


def _default_workers() -> int:
    # The CPUs this process may run on (Slurm/cgroups restrict it), not the whole node.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _check_settings(grader: str, answer_format: str, timeout_s: float) -> Grader:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: allowed values are {', '.join(ANSWER_FORMATS)}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s={timeout_s!r}: must be a positive number of seconds")
    return get_grader(grader)


class GradingPool:
    """A pool of grading workers. Use as a context manager, or call close().

    grader: a registered grader name ("math_verify"); answer_format: see extract_answer;
    timeout_s: hard wall-clock limit per graded answer; workers: processes (None: the CPUs this
    process may use); guard: score answers that guard.refusal names 0 without grading them (False
    sends everything to the workers, bounded by the timeout alone: for measuring what the guard saves). After each score() call, `last_stats` holds counts for metrics:
    responses, no_answer, refused (by guard.refusal), graded (distinct pairs sent to workers),
    timeouts, errors, seconds.
    """

    def __init__(
        self,
        grader: str = "math_verify",
        answer_format: str = "auto",
        timeout_s: float = 5.0,
        workers: int | None = None,
        guard: bool = True,
    ):
        _check_settings(grader, answer_format, timeout_s)
        if workers is None:
            workers = _default_workers()
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"workers={workers!r}: must be a positive integer or None")
        self.grader = grader
        self.answer_format = answer_format
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self.guard = guard
        self.last_stats: dict = {}
        self._pid = os.getpid()
        self._pool: pebble.ProcessPool | None = pebble.ProcessPool(
            max_workers=workers, initializer=_worker_init, context=_mp_context()
        )
        self._pool.active  # noqa: B018 -- starts the workers now rather than on the first score()

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and os.getpid() == self._pid:
            _stop(pool)

    @property
    def closed(self) -> bool:
        return self._pool is None

    def _restart(self) -> None:
        old, self._pool = self._pool, pebble.ProcessPool(max_workers=self.workers, initializer=_worker_init,
                                                         context=_mp_context())
        _stop(old)

    def _grade(self, pairs: dict, grade_fn, timeout_s: float, scores: list[float]) -> tuple[int, list[BaseException]]:
        """Grades every distinct pair in the pool, writing scores; returns (timeouts, the failures).

        Each answer is bounded by its timeout once a worker runs it; the batch as a whole by a progress
        watchdog: when no answer at all finishes for `window` seconds, no worker is running (they cannot
        start, or all were killed between pebble's checks), and the pending answers become failures
        rather than a wait without end (seen on a loaded box: pebble left such futures pending)."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        futures = [
            self._pool.schedule(_grade_task, args=(grade_fn, gold, answer), timeout=timeout_s)
            for gold, answer in pairs
        ]
        pending = dict(zip(futures, pairs.values()))
        window = max(30.0, 2 * timeout_s + 10.0)
        timeouts, failures = 0, []
        try:
            while pending:
                done, _ = wait(list(pending), timeout=window, return_when=FIRST_COMPLETED)
                if not done:
                    stalled = BrokenProcessPool(f"no answer finished for {window:.0f} s: the pool has no running worker")
                    failures += [stalled] * len(pending)
                    break
                for future in done:
                    index = pending.pop(future)
                    try:
                        value = future.result()
                    except FutureTimeoutError:
                        timeouts += 1
                        continue
                    except Exception as e:  # ProcessExpired (worker crashed/OOM-killed), a broken pool, a grader bug
                        failures.append(e)
                        continue
                    for i in index:
                        scores[i] = value
        finally:
            for future in futures:  # on KeyboardInterrupt, a stall & co: do not leave work queued
                future.cancel()
        return timeouts, failures

    def score(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        *,
        grader: str | None = None,
        answer_format: str | None = None,
        timeout_s: float | None = None,
    ) -> list[float]:
        """Score responses[i] against the gold answer golds[i]: 1.0 or 0.0 each.

        grader / answer_format / timeout_s override this pool's settings for this call only.
        """
        grader = self.grader if grader is None else grader
        answer_format = self.answer_format if answer_format is None else answer_format
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        grade_fn = _check_settings(grader, answer_format, timeout_s)
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        if self._pool is None:
            raise RuntimeError("GradingPool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("GradingPool was created in another process (after a fork); create a new one")
        start = time.perf_counter()

        scores = [0.0] * len(responses)
        pairs: dict[tuple[str, str], list[int]] = {}
        no_answer = 0
        refused: dict[tuple[str, str], str] = {}
        for i, (response, gold) in enumerate(zip(responses, golds)):
            answer = extract_answer(response, answer_format) if response else None
            if answer is None:
                no_answer += 1
                continue
            key = (str(gold), answer)
            if self.guard and key not in pairs and key not in refused:
                reason = refusal(answer, key[0])
                if reason is not None:
                    refused[key] = reason
            if key not in refused:
                pairs.setdefault(key, []).append(i)

        timeouts, failures = self._grade(pairs, grade_fn, timeout_s, scores)
        restarts = 0
        if pairs and len(failures) == len(pairs) and all(map(_is_pool_failure, failures)):
            # Not one answer graded: the pool itself is broken (its workers cannot start, or were all
            # killed, by the OOM killer say), not the answers. Scoring the batch 0 would train on
            # all-wrong rewards: start a new pool and try once more, then give up loudly.
            logger.warning("grading: all %d answers failed (%s); restarting the worker pool", len(pairs), _describe(failures[0]))
            self._restart()
            restarts = 1
            timeouts, failures = self._grade(pairs, grade_fn, timeout_s, scores)
            if len(failures) == len(pairs) and all(map(_is_pool_failure, failures)):
                raise GradingPoolBroken(
                    f"grading: all {len(pairs)} answers failed twice, the worker pool restarted in between "
                    f"({_describe(failures[0])}){_start_hint(failures[0])}"
                )
        errors = len(failures)
        if errors:
            logger.warning("grading error (%d items scored 0): %s", errors, _describe(failures[0]))

        self.last_stats = {
            "responses": len(responses),
            "no_answer": no_answer,
            "refused": len(refused),
            "graded": len(pairs),
            "timeouts": timeouts,
            "errors": errors,
            "restarts": restarts,
            "seconds": time.perf_counter() - start,
        }
        if refused:
            logger.warning("%d answers scored 0 ungraded (e.g. %s)", len(refused), next(iter(refused.values())))
        if timeouts:
            logger.warning("%d of %d graded answers hit the %.3g s timeout and scored 0", timeouts, len(pairs), timeout_s)
        return scores


def _stop(pool: pebble.ProcessPool, timeout_s: float = 30.0) -> None:
    """Stops a pool; a broken one may never finish joining (its workers, if any, die with this
    process: parent_death)."""
    pool.stop()
    try:
        pool.join(timeout=timeout_s)
    except TimeoutError:
        logger.warning("grading pool did not stop within %.0f s; leaving it", timeout_s)


class GradingPoolBroken(RuntimeError):
    """The grading workers fail every answer, even after a restart of the pool."""


def _is_pool_failure(e: BaseException) -> bool:
    """A worker that died or a pool that broke, as opposed to a grader raising on an answer."""
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(e, (pebble.ProcessExpired, BrokenProcessPool, EOFError, BrokenPipeError))


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _start_hint(e: BaseException) -> str:
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        return (f"; the workers' start method re-imports the main program, and {main_file!r} is not a file "
                f"(a program read from stdin or -c): run it from a file")
    return ""


_POOLS: dict[int | None, GradingPool] = {}
_POOLS_LOCK = threading.Lock()


def _cached_pool(workers: int | None) -> GradingPool:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None or pool.closed or pool._pid != os.getpid():
            pool = _POOLS[workers] = GradingPool(workers=workers)
        return pool


@atexit.register
def _close_cached_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            if pool._pid == os.getpid():
                pool.close()
        _POOLS.clear()


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    grader: str = "math_verify",
    answer_format: str = "auto",
    timeout_s: float = 5.0,
    workers: int | None = None,
) -> list[float]:
    """Score each response against its gold answer (1.0 / 0.0), with a hard per-answer timeout.

    Reuses one cached GradingPool per `workers` value for the life of the process (closed at exit).
    Truncated responses are not detected here: pass the scores through apply_truncation.
    """
    _check_settings(grader, answer_format, timeout_s)
    return _cached_pool(workers).score(
        responses, golds, grader=grader, answer_format=answer_format, timeout_s=timeout_s
    )


def apply_truncation(scores: Sequence[float], truncated: Sequence[bool]) -> list[float]:
    """Scores with every truncated response (finish_reason "length") set to 0.0: an answer the model
    did not finish is wrong, whatever its text contains (the paper's rule)."""
    if len(scores) != len(truncated):
        raise ValueError(f"{len(scores)} scores but {len(truncated)} truncation flags")
    return [0.0 if t else float(s) for s, t in zip(scores, truncated)]

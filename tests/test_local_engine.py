"""LocalEngine against independent references: a teacher-forced full forward (no KV cache) of the same
transformers model, and a plain argmax loop without cache."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import random_qwen2
from megatron_nft.rollout import Completion, LocalEngine, RolloutEngine, SamplingParams

VOCAB = 200
# Different lengths so that left padding is exercised; one single-token prompt.
PROMPTS = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [120, 3, 44, 150, 2, 99], [42]]


def _model(seed: int):
    config, model = random_qwen2(vocab=VOCAB, hidden=64, layers=2, seed=seed)
    with torch.no_grad():
        # transformers' init gives near-uniform next-token distributions; sharpen them so that
        # temperature, top-p and greedy decoding make observable differences.
        model.lm_head.weight.mul_(15.0)
    return config, model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core box: a second intra-op thread only adds contention (measured
    # here under load: 3 ms vs 110 ms per forward). Restored for the rest of the session.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref():
    return _model(seed=0)


@pytest.fixture(scope="module")
def engine(ref):
    config, model = ref
    eng = LocalEngine(config, seed=123)
    eng.update_weights(model.named_parameters(), version=1)
    return eng


@torch.no_grad()
def teacher_forced(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of `tokens` after `prompt`, from one full forward without cache."""
    seq = torch.tensor([prompt + tokens])
    logits = model(seq, use_cache=False).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@torch.no_grad()
def argmax_loop(model, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def check_finish(c: Completion, params: SamplingParams) -> None:
    stops = set(params.stop_token_ids)
    assert len(c.token_ids) == len(c.logprobs) >= 1
    assert not stops.intersection(c.token_ids[:-1]), "tokens after a stop token"
    if c.finish_reason == "stop":
        assert c.token_ids[-1] in stops
    else:
        assert c.finish_reason == "length"
        assert len(c.token_ids) == params.max_new_tokens and c.token_ids[-1] not in stops


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_match_teacher_forced_forward(ref, engine, temperature, top_p, monkeypatch):
    from transformers import DynamicCache

    _, model = ref
    batch_sizes = []  # spy: the cache is expanded to the n samples, then compacted as rows finish
    reorder = DynamicCache.reorder_cache

    def spy(self, indices):
        batch_sizes.append(len(indices))
        return reorder(self, indices)

    monkeypatch.setattr(DynamicCache, "reorder_cache", spy)
    # Stop tokens make rows finish at different steps, so finished rows get masked and then dropped
    # from the batch (cache compaction) while the others keep decoding.
    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=12, n=3, seed=7, stop_token_ids=tuple(range(0, 200, 9))
    )
    out = engine.generate(PROMPTS, params)
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    reasons = {c.finish_reason for c in out}
    assert reasons == {"stop", "length"}, reasons  # both paths exercised at this seed
    assert batch_sizes[0] == 12 and len(batch_sizes) > 1, batch_sizes
    for c in out:
        check_finish(c, params)
        expected = teacher_forced(model, PROMPTS[c.prompt_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float32), expected, atol=1e-5, rtol=0)
        assert c.weight_version == 1


def test_greedy_equals_argmax_loop_without_cache(ref, engine):
    _, model = ref
    params = SamplingParams(top_p=1e-9, max_new_tokens=10)
    out = engine.generate(PROMPTS, params)
    for c in out:
        assert c.token_ids == argmax_loop(model, PROMPTS[c.prompt_index], 10)
        assert c.finish_reason == "length"


def test_batching_invariance(ref):
    config, model = ref
    greedy = SamplingParams(top_p=1e-9, max_new_tokens=8, temperature=0.8)
    alone = LocalEngine(config, max_batch_size=1)
    alone.update_weights(model.named_parameters(), version=0)
    batched = LocalEngine(config, max_batch_size=3)  # chunks of 3 rows: groups split across chunks
    batched.update_weights(model.named_parameters(), version=0)
    single = [alone.generate([p], greedy)[0] for p in PROMPTS]
    together = batched.generate(PROMPTS, SamplingParams(**{**greedy.__dict__, "n": 2}))
    for c in together:
        s = single[c.prompt_index]
        assert c.token_ids == s.token_ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(s.logprobs), atol=1e-5, rtol=0)


def test_stop_token_and_length(ref, engine):
    _, model = ref
    long_prompt, short_prompt = PROMPTS[1], PROMPTS[3]
    free = argmax_loop(model, long_prompt, 6)
    stop = free[2]
    cut = free.index(stop) + 1
    params = SamplingParams(top_p=1e-9, max_new_tokens=6, stop_token_ids=(stop,))
    other = argmax_loop(model, short_prompt, 6)
    out = engine.generate([long_prompt, short_prompt], params)
    assert out[0].finish_reason == "stop"
    assert out[0].token_ids == free[:cut] and out[0].token_ids[-1] == stop
    assert len(out[0].logprobs) == cut
    # The other row keeps going after the first one stopped (it may hit the stop token itself).
    if stop in other:
        assert out[1].finish_reason == "stop" and out[1].token_ids == other[: other.index(stop) + 1]
    else:
        assert out[1].finish_reason == "length" and out[1].token_ids == other
    # No stop tokens: exactly max_new_tokens.
    for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, n=2, seed=3)):
        assert c.finish_reason == "length" and len(c.token_ids) == 5 == len(c.logprobs)
    # A stop token as the first generated token.
    first = engine.generate([long_prompt], SamplingParams(top_p=1e-9, max_new_tokens=6, stop_token_ids=(free[0],)))[0]
    assert first.token_ids == [free[0]] and first.finish_reason == "stop"


def test_n_grouping_and_seeds(ref, engine):
    config, model = ref
    params = SamplingParams(max_new_tokens=6, n=4, seed=11)
    a = engine.generate(PROMPTS[:3], params)
    assert [c.prompt_index for c in a] == [0] * 4 + [1] * 4 + [2] * 4
    assert len({tuple(c.token_ids) for c in a[:4]}) > 1  # the n samples differ
    b = engine.generate(PROMPTS[:3], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    c = engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6, n=4, seed=12))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Without params.seed the engine's generator is used and advances between calls; two engines with
    # the same seed replay the same sequence of calls identically.
    twins = []
    for _ in range(2):
        eng = LocalEngine(config, seed=5)
        eng.update_weights(model.named_parameters(), version=0)
        no_seed = SamplingParams(max_new_tokens=6, n=2)
        twins.append([[x.token_ids for x in eng.generate(PROMPTS, no_seed)] for _ in range(2)])
    assert twins[0] == twins[1]
    assert twins[0][0] != twins[0][1]


def test_sampling_distribution(ref, engine):
    """One-token samples: temperature shapes the sampling distribution, top-p keeps to the nucleus."""
    _, model = ref
    prompt, temperature, n = PROMPTS[2], 0.7, 3000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0, -1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    out = engine.generate([prompt], SamplingParams(temperature=temperature, max_new_tokens=1, n=n, seed=1))
    sampled = torch.tensor([c.logprobs[0] for c in out], dtype=torch.float64)
    # E[log p(x)] under x ~ p is -H(p): a z-test on the mean of the reported log-probs.
    p = logp.double().exp()
    mean, var = (p * logp.double()).sum(), (p * logp.double() ** 2).sum() - (p * logp.double()).sum() ** 2
    z = (sampled.mean() - mean) / math.sqrt(var / n)
    assert abs(z) < 5, float(z)
    # top-p: every token inside the smallest prefix of the sorted distribution with mass >= top_p.
    top_p = 0.6
    probs, order = logp.exp().sort(descending=True)
    nucleus = set(order[: int((probs.cumsum(0) < top_p).sum()) + 1].tolist())
    assert 1 < len(nucleus) < VOCAB // 2
    nucleus_params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, n=500, seed=2)
    out = engine.generate([prompt], nucleus_params)
    seen = {c.token_ids[0] for c in out}
    assert seen <= nucleus and len(seen) > 1
    for c in out[:20]:  # reported log-prob is the untruncated one
        assert abs(c.logprobs[0] - float(logp[c.token_ids[0]])) < 1e-5


def test_update_weights(ref):
    config, model = ref
    _, other = _model(seed=1)
    eng = LocalEngine(config)
    assert isinstance(eng, RolloutEngine) and eng.weight_version == -1
    with pytest.raises(RuntimeError, match="update_weights"):
        eng.generate(PROMPTS, SamplingParams())
    eng.update_weights(((n, p.detach().clone()) for n, p in model.named_parameters()), version=3)  # a generator
    params = SamplingParams(max_new_tokens=6, seed=4)
    before = eng.generate(PROMPTS, params)
    assert eng.weight_version == 3 and {c.weight_version for c in before} == {3}
    eng.update_weights(other.named_parameters(), version=4)
    after = eng.generate(PROMPTS, params)
    assert {c.weight_version for c in after} == {4}
    assert [c.logprobs for c in before] != [c.logprobs for c in after]
    for c in after:
        expected = teacher_forced(other, PROMPTS[c.prompt_index], c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float32), expected, atol=1e-5, rtol=0)

    named = [(n, p.detach()) for n, p in model.named_parameters()]
    k = "model.layers.1.self_attn.k_proj.bias"
    bad_streams = {
        "missing": ([x for x in named if x[0] != k], k),
        "unknown": (named + [("model.layers.9.mlp.up_proj.weight", named[0][1])], "model.layers.9.mlp.up_proj.weight"),
        "shape": ([(n, t[:-1] if n == k else t) for n, t in named], k),
        "twice": (named + [named[3]], named[3][0]),
    }
    for what, (stream, name) in bad_streams.items():
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            eng.update_weights(iter(stream), version=5)
        assert eng.weight_version == 4, what
        with pytest.raises(RuntimeError, match="part-way"):  # weights are a mix now
            eng.generate(PROMPTS, params)
    eng.update_weights(iter(named), version=6)
    assert eng.generate(PROMPTS[:1], params)[0].weight_version == 6
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate(PROMPTS, params)


def test_tied_embeddings():
    config, model = random_qwen2(vocab=VOCAB, hidden=64, layers=1, tied=True, seed=2)
    eng = LocalEngine(config)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    eng.update_weights(model.named_parameters(), version=0)
    c = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, seed=0))[0]
    torch.testing.assert_close(
        torch.tensor(c.logprobs, dtype=torch.float32),
        teacher_forced(model, PROMPTS[0], c.token_ids, 1.0),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        eng.update_weights(list(model.named_parameters()) + [("lm_head.weight", model.lm_head.weight)], version=1)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_sglang_names():
    p = SamplingParams(temperature=0.6, top_p=0.7, max_new_tokens=9, stop_token_ids=[3, 4], n=2, seed=1)
    assert p.stop_token_ids == (3, 4) and hash(p)
    assert p.to_sglang() == {
        "temperature": 0.6, "top_p": 0.7, "max_new_tokens": 9, "stop_token_ids": [3, 4], "n": 2, "sampling_seed": 1,
    }


def test_bad_prompts(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has token id 200"):
        engine.generate([[1, 200]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * 100], SamplingParams(max_new_tokens=64))
    assert engine.generate([], SamplingParams()) == []

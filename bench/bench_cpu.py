"""SmolLM2-135M-Instruct on the CPU: meganeura in each weight form, transformers float32 and
llama.cpp (llama-cpp-python, optional) at F16 / Q8_0 / Q4_1, alternated in rounds.

    .venv/bin/python bench/bench_cpu.py [--rounds 3] [--threads 2] [--engines a,b,...] [--baseline DIR]

`--baseline DIR` also runs each meganeura engine from another checkout (e.g. main's: DIR is its
root, put first on PYTHONPATH), in the same rounds, as `meganeura-<form>@base`: before/after
ratios from one run.

Each engine runs in a fresh process per round (load time and peak RSS are its own): load,
prefill of a 128-token prompt, 128 greedy tokens, the demo question, then the mean KL
divergence of its next-token distributions from meganeura float32's (which matches
transformers float32 to 1e-4, tests/test_real_smollm2.py) over a ~1,000-token text.

llama.cpp's F16 and Q8_0 files do not exist for this model offline: they are written here (the
`gguf` package) from the shipped Q4_1 file's dequantized values, so every engine and format
starts from the same weights (F16 holds them to f16 rounding, Q8_0 requantizes them to 8 bits,
Q4_1 is the shipped file itself). Build llama-cpp-python with AMX off (its AMX path crashes on
this CPU): CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install
--no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import hf_timing  # bench/, beside this script

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_TOKENS = NEW_TOKENS = 128
ENGINES = ["meganeura-float32", "meganeura-bfloat16", "meganeura-bf16", "meganeura-f16", "meganeura-int8",
           "meganeura-int4",
           "transformers-float32", "llama.cpp-F16", "llama.cpp-Q8_0", "llama.cpp-Q4_1"]
# llama.cpp's peer of each form. bfloat16: the whole model in bf16; bf16, f16: 16-bit weights,
# float32 activations (f16 loads the F16 file written here, as llama.cpp does: its own precision)
FORMAT = {"bfloat16": "F16", "bf16": "F16", "f16": "F16", "int8": "Q8_0", "int4": "Q4_1"}


def shipped_gguf() -> Path:
    from meganeura.weights import resolve_model
    return resolve_model("smollm2-135m-instruct")


def write_texts(work: Path) -> None:
    """A 128-token prompt and a 1,000-token text from docs/design.md, as token ids (no chat
    template), tokenized once (our tokenizer equals transformers') so every engine reads the same ids."""
    from meganeura.weights import load_checkpoint
    doc = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    ids = load_checkpoint(shipped_gguf(), progress=False).tokenizer.encode(doc, add_special_tokens=False).ids
    (work / "ids.json").write_text(json.dumps([ids[:PROMPT_TOKENS], ids[:1000]]))


def texts(work: Path) -> tuple[list[int], list[int]]:
    prompt, long_text = json.loads((work / "ids.json").read_text())
    return prompt, long_text


def write_gguf(kind: str, out: Path) -> None:
    """The shipped file's metadata and tensors, each quantized tensor's dequantized values
    stored as `kind` (F16 or Q8_0); float32 tensors (norms) stay float32."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(shipped_gguf())
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    target = gguf.GGMLQuantizationType[kind]
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
            continue
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        if target == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            writer.add_tensor(t.name, quantize(values, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def peak_rss_gb() -> float:
    """This process's peak RSS since it started. Not getrusage's ru_maxrss: on Linux a child
    inherits its parent's at fork, so every engine would report at least the driver's."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30  # bytes on macOS


# ---- one engine, in its own process ------------------------------------------------------------

def run_meganeura(form: str, threads: int, gguf_dir: Path, label: str) -> dict:
    import torch
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    import meganeura
    dtype = "bfloat16" if form == "bfloat16" else "float32"
    quantize = {"f16": "auto", "bf16": "bf16", "int8": "int8", "int4": "int4"}.get(form, "none")
    model = str(gguf_dir / "SmolLM2-135M-Instruct.F16.gguf") if form == "f16" else "smollm2-135m-instruct"
    pipe = meganeura.load(model, device="cpu", dtype=dtype, quantize=quantize, progress=False)
    load = time.perf_counter() - t0
    prompt, long_text = texts(gguf_dir)
    runner, cache = pipe.runner, pipe.runner.cache

    def prefill_and_decode(ids, new):
        slot = cache.take(len(ids) + new)
        try:
            t = time.perf_counter()
            logits = runner.to_host(runner.prefill(ids, slot))
            prefill = time.perf_counter() - t
            token = int(logits[-1].argmax())
            t = time.perf_counter()
            for i in range(new - 1):
                token = int(runner.to_host(runner.decode([token], [len(ids) + i], [slot]))[0].argmax())
            return prefill, time.perf_counter() - t
        finally:
            cache.release(slot)

    prefill_and_decode(prompt, 4)  # warm-up: plans, packed weights
    prefill, decode = prefill_and_decode(prompt, NEW_TOKENS)
    answer = pipe.generate(QUESTION, max_new_tokens=16).text
    rss = peak_rss_gb()
    slot = cache.take(len(long_text))
    try:
        logits = runner.to_host(runner.prefill(long_text, slot, all_logits=True))
    finally:
        cache.release(slot)
    np.save(gguf_dir / f"logits-{label}.npy", logits.astype(np.float32))
    return dict(load_s=load, prefill_tok_s=len(prompt) / prefill, decode_tok_s=(NEW_TOKENS - 1) / decode,
                peak_rss_gb=rss, answer=answer, form=f"{runner.weight_form} ({runner.weight_form_reason})")


def run_transformers(threads: int, gguf_dir: Path) -> dict:
    import torch
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = shipped_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    prompt, long_text = texts(gguf_dir)
    _, prefill, decode = hf_timing.prefill_and_decode(model, torch.tensor([prompt]), NEW_TOKENS)
    with torch.no_grad():
        q = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**q, max_new_tokens=16, do_sample=False)
        answer = tok.decode(out[0, q["input_ids"].shape[1]:], skip_special_tokens=True)
        rss = peak_rss_gb()
        logits = model(torch.tensor([long_text])).logits[0].numpy()
    np.save(gguf_dir / "logits-transformers-float32.npy", logits)
    return dict(load_s=load, prefill_tok_s=len(prompt) / prefill, decode_tok_s=decode, peak_rss_gb=rss, answer=answer)


def run_llama_cpp(kind: str, threads: int, gguf_dir: Path, extra_bufts: bool) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    if not extra_bufts:
        # A build with GGML_NATIVE still compiles the AMX "extra buffer type", which crashes
        # in its mul_mat on this CPU even with GGML_AMX_* off: load without extra buffer types
        # (this also turns off llama.cpp's weight repacking)
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts
    path = shipped_gguf() if kind == "Q4_1" else gguf_dir / f"SmolLM2-135M-Instruct.{kind}.gguf"
    t0 = time.perf_counter()
    llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=1024,
                logits_all=True, verbose=False)
    load = time.perf_counter() - t0
    prompt, long_text = texts(gguf_dir)

    def prefill_and_decode(new):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new - 1):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        return prefill, time.perf_counter() - t

    prefill_and_decode(4)
    prefill, decode = prefill_and_decode(NEW_TOKENS)
    llm.reset()
    answer = llm.create_chat_completion(QUESTION, temperature=0.0, top_k=1, max_tokens=16)["choices"][0]["message"]["content"]
    rss = peak_rss_gb()
    llm.reset()
    llm.eval(long_text)
    np.save(gguf_dir / f"logits-llama.cpp-{kind}.npy", np.array(llm.scores[:len(long_text)], dtype=np.float32))
    return dict(load_s=load, prefill_tok_s=len(prompt) / prefill, decode_tok_s=(NEW_TOKENS - 1) / decode,
                peak_rss_gb=rss, answer=answer)


def run_one(engine: str, threads: int, gguf_dir: Path, extra_bufts: bool) -> dict:
    family, variant = engine.removesuffix("@base").split("-", 1)
    if family == "meganeura":
        return run_meganeura(variant, threads, gguf_dir, engine)
    if family == "transformers":
        return run_transformers(threads, gguf_dir)
    return run_llama_cpp(variant, threads, gguf_dir, extra_bufts)


# ---- the rounds ---------------------------------------------------------------------------------

def kl_from(reference: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    p, q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--llama-extra-bufts", action="store_true",
                        help="let llama.cpp use its extra buffer types (AMX, repacked weights): for a build whose "
                             "AMX path works on this CPU (GGML_NATIVE=OFF with AVX-512 flags)")
    parser.add_argument("--work", help="a folder for the written GGUFs and logits (kept: reused by later runs)")
    parser.add_argument("--baseline", help="another checkout's root: its meganeura runs beside this one's")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one engine, JSON out
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.threads, Path(args.dir), args.llama_extra_bufts)))
        return

    engines = args.engines.split(",")
    if args.baseline:
        engines += [f"{e}@base" for e in engines if e.startswith("meganeura-")]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
        engines = [e for e in engines if not e.startswith("llama.cpp")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    write_texts(work)
    for kind in ("F16", "Q8_0"):
        path = work / f"SmolLM2-135M-Instruct.{kind}.gguf"
        wanted = f"llama.cpp-{kind}" in engines or (kind == "F16" and "meganeura-f16" in engines)
        if wanted and not path.exists():
            write_gguf(kind, path)
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in engines:  # alternated: every round runs each engine once, in turn
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if engine.endswith("@base"):
                env["PYTHONPATH"] = os.pathsep.join([str(Path(args.baseline).resolve()), env.get("PYTHONPATH", "")])
            done = subprocess.run([sys.executable, __file__, "--one", engine, "--dir", str(work),
                                   "--threads", str(args.threads)] + ["--llama-extra-bufts"] * args.llama_extra_bufts,
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{engine} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {engine}: {results[engine][-1]}", file=sys.stderr, flush=True)

    reference = np.load(work / "logits-meganeura-float32.npy") if (work / "logits-meganeura-float32.npy").exists() else None
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads, "
          f"torch {torch.__version__}; {args.rounds} rounds, engines alternated; medians (range)")
    print(f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} greedy tokens; KL: mean over a 1,000-token text from "
          "meganeura float32's next-token distribution\n")
    print("| engine | decode tok/s | prefill 128 tok/s | load s | peak RSS GB | KL vs float32 | demo answer |")
    print("|---|---|---|---|---|---|---|")

    def cell(runs, key, fmt):
        values = [x[key] for x in runs]
        med = statistics.median(values)
        return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else f"{med:{fmt}}"

    medians = {}
    for engine, runs in results.items():
        if not runs:
            continue
        medians[engine] = statistics.median(x["decode_tok_s"] for x in runs), \
            statistics.median(x["prefill_tok_s"] for x in runs)
        name = engine.replace("-", " ", 1)
        logits_file = work / f"logits-{engine}.npy"
        kl = f"{kl_from(reference, np.load(logits_file)):.6f}" if reference is not None and logits_file.exists() else ""
        answer = runs[-1]["answer"].strip().replace("\n", " ")[:40]
        paris = "Paris" if "Paris" in answer else f"wrong: {answer!r}"
        print(f"| {name} | {cell(runs, 'decode_tok_s', '.1f')} | {cell(runs, 'prefill_tok_s', '.0f')} | "
              f"{cell(runs, 'load_s', '.2f')} | {cell(runs, 'peak_rss_gb', '.2f')} | {kl} | {paris} |")
    print()
    for form, kind in FORMAT.items():
        ours, theirs = medians.get(f"meganeura-{form}"), medians.get(f"llama.cpp-{kind}")
        if ours and theirs:
            print(f"meganeura {form} / llama.cpp {kind}: decode {ours[0] / theirs[0]:.2f}x, "
                  f"prefill {ours[1] / theirs[1]:.2f}x")
    for engine in engines:
        ours, base = medians.get(engine), medians.get(f"{engine}@base")
        if ours and base:
            print(f"{engine} / its baseline: decode {ours[0] / base[0]:.2f}x, prefill {ours[1] / base[1]:.2f}x")
    for engine, runs in results.items():
        if runs and "form" in runs[-1]:
            print(f"{engine}: weights {runs[-1]['form']}")


if __name__ == "__main__":
    main()

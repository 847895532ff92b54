"""SmolVLM2 from the ground up: weights, image preprocessing, graphs, and a greedy answer.

    python examples/smolvlm2.py --image cat.jpg "What is in this picture?"
    python examples/smolvlm2.py --model path/to/folder --image cat.jpg "Describe it."

`meganeura.load(...)` does all of this for you; this file shows the parts.
"""

import argparse
import json

import numpy as np

from meganeura import CompileOptions, Graph, build_inference_session
from meganeura.engine.kv_cache import CacheLayout
from meganeura.models.smolvlm2 import SmolVLM2Config, build_text_graph, build_vision_graph, vision_inputs
from meganeura.processing.image import ImageProcessorConfig, load_image, preprocess_images
from meganeura.processing.prompt import expand_image_tokens, render_chat
from meganeura.session import Store, make_backend
from meganeura.weights import load_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
parser.add_argument("--image", required=True)
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("question")
args = parser.parse_args()

# 1. Weights: a memory-mapped checkpoint (names exactly as in the Hugging Face files).
ckpt = load_checkpoint(args.model)
config = SmolVLM2Config.from_hf(ckpt.config)
options = CompileOptions(backend="torch")
store = Store(make_backend(options))  # weights and KV cache, shared by every graph below


def compile_graph(build):
    g = Graph()
    g.set_outputs([build(g)])
    session = build_inference_session(g, options, store)
    for name in session.missing_parameters():
        session.set_parameter(name, ckpt.tensors[name])
    return session


# 2. Image: split into 512x512 tiles plus a global view, exactly as transformers does.
image_config = ImageProcessorConfig.from_dict(json.loads((ckpt.folder / "preprocessor_config.json").read_text()))
batch = preprocess_images([[load_image(args.image)]], image_config)
pixel_values = batch["pixel_values"][0]  # [tiles, 3, 512, 512]
tiles = pixel_values.shape[0]

# 3. Vision graph: pixels -> patches -> encoder -> pixel shuffle -> connector, all in one plan.
vision = compile_graph(lambda g: build_vision_graph(g, config, images=tiles))
for name, value in vision_inputs(config, pixel_values).items():
    vision.set_input(name, value)
vision.run()
features = vision.output()  # [tiles * 64, 960], stays on the backend

# 4. Prompt: the chat template, then each <image> expanded into its tile markers and tokens.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
text = render_chat(ckpt.chat_template, messages, add_generation_prompt=True)
text = expand_image_tokens(text, batch["image_grids"][0], config.num_vision_tokens)
ids = np.array(ckpt.tokenizer.encode(text, add_special_tokens=False).ids)
n = len(ids)
max_seq = n + args.max_new_tokens

# 5. Prefill: image features replace the <image> embeddings in the graph; the KV cache fills.
# One sequence, so the cache is one page of max_seq tokens (meganeura.engine pages it for many).
cache = CacheLayout.contiguous(config.text.num_hidden_layers, config.text.kv_dim, slots=1, max_seq=max_seq)
image_rows = np.flatnonzero(ids == config.image_token_id)
prefill = compile_graph(lambda g: build_text_graph(g, config, rows=n, cache=cache, logit_rows=1,
                                                   image_tokens=len(image_rows)))
for name, value in {"token_ids": ids, "positions": np.arange(n), "slots": np.zeros(n), "logit_rows": [n - 1],
                    "image_rows": image_rows, "block_table": cache.contiguous_table()}.items():
    prefill.set_input(name, np.asarray(value, dtype=np.uint32))
prefill.set_input("image_features", features)
prefill.run()
token = int(np.argmax(prefill.read_output()[0]))

# 6. Decode: one row per step, reading and extending the same cache.
decode = compile_graph(lambda g: build_text_graph(g, config, rows=1, cache=cache, logit_rows=1))
decode.set_input("block_table", cache.contiguous_table().astype(np.uint32))
end = ckpt.tokenizer.token_to_id("<end_of_utterance>")
answer = []
for position in range(n, max_seq):
    if token == end:
        break
    answer.append(token)
    for name, value in {"token_ids": [token], "positions": [position], "slots": [0], "logit_rows": [0]}.items():
        decode.set_input(name, np.asarray(value, dtype=np.uint32))
    decode.run()
    token = int(np.argmax(decode.read_output()[0]))
print(ckpt.tokenizer.decode(answer, skip_special_tokens=True))

"""Ask a GGUF file written by `minicustom export-gguf` a question through llama.cpp (llama-cpp-python), the
way llama-cli does: the file's own chat template, greedy unless --temperature is given.

    python examples/llama_cpp_chat.py runs/city-q8_0.gguf "Which city is mentioned? The train to Lisbon leaves at noon." \
        --system "Answer with the name of the city only."
    python examples/llama_cpp_chat.py base-f16.gguf --lora runs/city-lora.gguf "..."   # a LoRA-only export

llama-cpp-python builds llama.cpp from source (`pip install llama-cpp-python`; it is in minicustom's dev extra).
"""

import argparse
import time

from llama_cpp import Llama


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file")
    p.add_argument("question")
    p.add_argument("--lora", help="a LoRA GGUF (export-gguf --lora-only) to apply to the model")
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    t0 = time.perf_counter()
    llm = Llama(model_path=args.model, lora_path=args.lora, n_ctx=2048, verbose=False)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}]
    reply = llm.create_chat_completion(messages=messages, temperature=args.temperature, max_tokens=args.max_tokens)
    print(reply["choices"][0]["message"]["content"])
    usage = reply["usage"]
    print(f"[llama.cpp: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens, "
          f"{time.perf_counter() - t0:.1f} s with loading]", flush=True)


if __name__ == "__main__":
    main()

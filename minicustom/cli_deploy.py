"""The deploy commands: `export-gguf` (a model, an adapter merged in, or the adapter alone, as GGUF for
llama.cpp / Ollama / LM Studio) and `serve` (an OpenAI-compatible HTTP server, serve.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from .argtypes import COUNT, checked
from .cli_common import add_model_args, check_out, load, model_path
from .config import ModelConfig
from .files import atomic_write, read_json
from .gguf_export import OUTTYPES, export_gguf, export_lora_gguf, modelfile
from .methods import adapter_configs, merge_adapter
from .methods.qlora import merge_4bit
from .methods.registry import method_for
from .quant.linear4bit import Linear4bit, dequantize_model
from .serve import Engine, make_server


def merged(model, adapter, requantize: bool = False):
    """The model with its adapter folded into the weights (a 4-bit base: into the dequantized weights,
    unless requantize); ValueError for a method with nothing to fold (prefix, prompt, bottleneck...)."""
    for config in adapter_configs(model).values():  # the registry says which methods fold into weights
        if (method := method_for(config.peft_type)) is not None and not method.mergeable:
            raise ValueError(f"--adapter {adapter}: a {method.name} adapter has nothing to fold into the base "
                             "weights; load it with --adapter where it is used instead")
    if any(isinstance(m, Linear4bit) for m in model.modules()):  # a QLoRA adapter on a 4-bit base
        report = merge_4bit(model, requantize=requantize)
        if requantize:
            print(f"re-quantized {report['layers']} merged layers: relative error {report['rel_error']:.4f}, "
                  f"max abs {report['max_abs_error']:.3g}", file=sys.stderr)
        return model
    return merge_adapter(model)


def _check_target(path: Path, overwrite: bool, what: str):
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{what} {path} already exists; nothing was written: pass --overwrite to replace it")


def cmd_export_gguf(args):
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: name the file *.gguf")
    check_out(out, model=model_path(args), adapter=args.adapter)
    _check_target(out, args.overwrite, "--out")
    if args.lora_only:
        if not args.adapter:
            raise ValueError("--lora-only exports an adapter: give --adapter DIR")
        if args.ollama:
            raise ValueError("--ollama needs a whole model; export the merged model (without --lora-only)")
        config_file = model_path(args) / "config.json"
        config = ModelConfig.from_dict(read_json(config_file), source=str(config_file))
        report = export_lora_gguf(args.adapter, config, out)
        print(f"LoRA adapter: {report['tensors']} tensors, adapter.lora.alpha {report['alpha']:g}", file=sys.stderr)
        print(out)
        return
    recipe = out.parent / "Modelfile"
    if args.ollama:
        _check_target(recipe, args.overwrite, "the Modelfile")
    model, tokenizer = load(args)
    if args.adapter:
        model = merged(model, args.adapter)
    model = dequantize_model(model).float()  # what a 4-bit base still holds
    text, note = modelfile(tokenizer, f"./{out.name}", args.system) if args.ollama else ("", "")
    types = export_gguf(model, tokenizer, out, args.outtype, name=args.name or model_path(args).name)
    counts = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    print(f"{out}: {len(types)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}), "
          f"{out.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    if args.ollama:
        atomic_write(recipe, lambda tmp: tmp.write_text(text))
        print(f"{recipe}: run `ollama create NAME -f {recipe}`" + (f" ({note})" if note else ""), file=sys.stderr)
    print(out)


def add_export_gguf(sub):
    p = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp, Ollama or LM Studio (the adapter "
                       "merged in, or --lora-only)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="matrix storage: f32, f16, bf16, q8_0 or q4_0 (norms and biases stay f32)")
    p.add_argument("--lora-only", action="store_true",
                   help="write only the LoRA adapter, as llama.cpp's LoRA GGUF (llama-cli --lora FILE)")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile beside --out")
    p.add_argument("--system", help="--ollama: the Modelfile's SYSTEM prompt")
    p.add_argument("--name", help="general.name in the file (default: the model folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and Modelfile)")
    p.set_defaults(func=cmd_export_gguf)


def cmd_serve(args):
    model, tokenizer = load(args)
    name = args.name or model_path(args).name
    engine = Engine(model, tokenizer, name, queue_size=args.queue, max_tokens=args.max_tokens)
    server = make_server(engine, args.host, args.port, verbose=True)
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def add_serve(sub):
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, "
                       "/v1/models")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=checked(int, lambda v: 0 <= v <= 65535, "from 0 to 65535"), default=8000,
                   help="0: any free port (the one taken is printed)")
    p.add_argument("--name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--queue", type=COUNT, default=16, help="requests waiting at most; more get 503")
    p.add_argument("--max-tokens", type=COUNT, default=512, help="the most tokens one request may generate")
    p.set_defaults(func=cmd_serve)

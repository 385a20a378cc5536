"""The `ernie-paddle` command line: generate, logits, export, parity, memory, bench, convert, make-checkpoint.

Its arguments and outputs are a public contract (users' scripts rely on them). Bad input is printed as one
`error: ...` line on stderr with exit status 2, never as a Python traceback, and is found before any model is
loaded; Ctrl-C and SIGTERM end a command with one line and status 130 / 143, leaving nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Sequence

from ernie_paddle.cli import commands as cli_commands
from ernie_paddle.cli.args import (allow_pickle_arg, block_size, dtype_arg, folder, generate_args, input_file,
                                   log_line, logits_args, model_arg, non_negative_int, output_file,
                                   paddle_model_args, positive_int, progress_printer, prompt_cache_arg, size,
                                   strict_config_arg, token_ids)
from ernie_paddle.corpus import DEFAULT_CORPUS
from ernie_paddle.errors import CheckpointError, ErnieError, InputError
from ernie_paddle.export.pipeline import FLAVORS
from ernie_paddle.textfile import read_text
from ernie_paddle.checkpoint.layout import PADDLE, PT
from ernie_paddle.precisions import (BITS, DEFAULT_BLOCK_SIZE, DEFAULT_SCALE_RULE, EXPORT_PRECISIONS, KV_CACHES,
                                    PLAN_PRECISIONS, SCALE_RULES)
from ernie_paddle.checkpoint.safetensors_io import MAX_SHARD_BYTES
from ernie_paddle.cli import serve as serve_cli

# what --layout offers: the released -Paddle and -PT layouts (layout.LAYOUTS adds pt-fused, which is only read)
WRITABLE_LAYOUTS = (PADDLE, PT)


# ---- commands ------------------------------------------------------------------------------------------------------
def _load_model(args):
    """The Paddle model of --model on --device (checked before the weights are read)."""
    from ernie_paddle.paddle.env import set_device
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    if args.device:
        set_device(args.device)
    return Ernie4_5_MoeForCausalLM.from_pretrained(args.model, dtype=args.dtype, strict_config=args.strict_config,
                                                   allow_pickle=args.allow_pickle)


def cmd_generate(args) -> int:
    return cli_commands.generate(_load_model, args)


def cmd_logits(args) -> int:
    return cli_commands.logits(_load_model, args)


def _gptq(args):
    """`export --gptq`: the calibrated quantiser, refused where it has nothing to quantise."""
    from ernie_paddle.config import ErnieConfig
    from ernie_paddle.export.gptq import streamed_gptq

    if args.precision not in BITS or args.flavor != "ort":
        raise InputError(f"--gptq quantises the ort flavour's int8/int4/int2 weights; got --flavor {args.flavor} "
                         f"--precision {args.precision}")
    return streamed_gptq(args.model, ErnieConfig.from_file(args.model, strict=args.strict_config),
                         args.calibration_text, args.calibration_windows, args.block_scales)


def cmd_export(args) -> int:
    from ernie_paddle.export.pipeline import export
    from ernie_paddle.export.quantize import RoundToNearest

    t0 = time.time()
    quantizer, hessians = _gptq(args) if args.gptq else (RoundToNearest(args.block_scales), None)
    try:
        m = export(args.model, args.out, flavor=args.flavor, precision=args.precision, verify=not args.no_verify,
                   block_size=args.block_size, accuracy_level=args.accuracy_level, strict_config=args.strict_config,
                   log=log_line, kv_cache=args.kv_cache, quantizer=quantizer,
                   attention_precision=args.attention_precision)
    finally:
        if hessians is not None:
            hessians.close()
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    print(f"wrote {args.out} ({m['flavor']} flavour, {m['precision']}, {m['kv_cache']} KV cache) in "
          f"{time.time() - t0:.1f}s:", file=sys.stderr)
    for f, n in sizes.items():
        print(f"  {f:<28} {n / 2**20:10.2f} MiB", file=sys.stderr)
    v = m["verification"]
    if "skipped" in v:
        print(f"verification skipped: {v['skipped']}", file=sys.stderr)
    else:
        print(f"verification: max |logit diff| {v['max_abs_logit_diff']:.2e}, top-1 agreement "
              f"{v['top1_agreement']:.3f}, greedy identical {v['greedy_identical_prompts']}/{v['prompts']}",
              file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from ernie_paddle.atomic import check_new_dir
    from ernie_paddle.checkpoint.folder import convert

    check_new_dir(args.out, CheckpointError, "directory")  # before reading any weights
    files = convert(args.model, args.out, layout=args.layout, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                    strict_config=args.strict_config, progress=progress_printer("convert"),
                    allow_pickle=args.allow_pickle)
    print(f"wrote {args.out} ({args.layout} layout, {args.dtype}): {', '.join(files)}", file=sys.stderr)
    return 0


def cmd_make_checkpoint(args) -> int:
    from ernie_paddle.atomic import check_new_dir
    from ernie_paddle.checkpoint.folder import make_checkpoint
    from ernie_paddle.config import preset

    check_new_dir(args.out, CheckpointError, "directory")
    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers is not None else {}
    cfg = preset(args.preset, **overrides)
    files = make_checkpoint(cfg, args.out, layout=args.layout, dtype=args.dtype, seed=args.seed,
                            max_shard_bytes=args.max_shard_size, progress=progress_printer("make-checkpoint"))
    print(f"wrote {args.out} (preset {args.preset}, {args.layout} layout, {args.dtype}, seed {args.seed}): "
          f"{', '.join(files)}", file=sys.stderr)
    return 0


def cmd_parity(args) -> int:
    from ernie_paddle.parity import run as parity
    from ernie_paddle.parity.report import format_table, plot

    cfg = cli_commands.folder_config(args)
    prompts = parity_prompts(args.prompts, args.model, cfg.vocab_size)
    report = parity.run(args.model, args.onnx or [], args.hf, prompts, args.greedy_tokens,
                        log=log_line, gguf_files=args.gguf or [])
    print(format_table(report))
    if args.json:
        from ernie_paddle.atomic import write_json

        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    return 0


PARITY_TEXT_PROMPTS = ("ROMEO:\nBut, soft! what light through yonder window breaks?",
                       "First Citizen:\nBefore we proceed any further, hear me speak.", "To be, or not to be:")


def parity_prompts(path: str | None, model_dir: str, vocab_size: int) -> list[list[int]]:
    """`parity --prompts FILE`: one prompt per line, text (needs the tokenizer) or comma-separated ids.

    Without a file: three fixed text prompts when the model has a tokenizer, else three seeded random id prompts.
    """
    lines = None
    if path:
        lines = [ln for ln in read_text(path, f"--prompts {path}").split("\n") if ln.strip()]
        if not lines:
            raise InputError(f"--prompts {path}: no prompts in the file")
    tok = None
    if lines is None or not all(map(_is_ids, lines)):
        tok = _parity_tokenizer(model_dir, required=lines is not None)
    if lines is None:
        if tok is None:
            import numpy as np

            rng = np.random.default_rng(0)
            return [rng.integers(3, vocab_size, n).tolist() for n in (8, 16, 32)]
        lines = list(PARITY_TEXT_PROMPTS)
    prompts = [token_ids(ln) if _is_ids(ln) else tok.encode(ln) for ln in lines]
    for i, ids in enumerate(prompts):
        what = f"--prompts {path or '(default)'}: prompt {i + 1}"
        if not ids:
            raise InputError(f"{what}: no tokens")
        cli_commands.check_ids(ids, vocab_size, what)
    return prompts


def _parity_tokenizer(model_dir: str, required: bool):
    """The model's tokenizer; None when it has none and no prompt needs it."""
    from ernie_paddle.errors import TokenizerError
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    try:
        return ErnieTokenizer(model_dir)
    except TokenizerError:
        if required:
            raise
        return None


def _is_ids(line: str) -> bool:
    return all(x.strip().isdigit() for x in line.split(",")) and bool(line.strip())


def cmd_memory(args) -> int:
    from ernie_paddle.config import ErnieConfig, preset
    from ernie_paddle.memory import report

    if (args.model is None) == (args.preset is None):
        raise ErnieError("give exactly one of --model DIR or --preset NAME")
    cfg = ErnieConfig.from_file(args.model) if args.model else preset(args.preset)
    print(report(cfg, args.precision, args.context, args.batch, args.device_memory, args.block_size, args.kv_cache,
                 args.prefix_cache_memory))
    return 0


# ---- the parser ----------------------------------------------------------------------------------------------------
def _export_args(e: argparse.ArgumentParser) -> None:
    model_arg(e, checked=False)  # export checks --out first, then the model folder (export.pipeline)
    e.add_argument("--out", required=True, help="new output folder")
    e.add_argument("--flavor", default="ort", choices=FLAVORS,
                   help="ort: ONNX Runtime fused ops (default); portable: standard ONNX ops via paddle2onnx")
    e.add_argument("--precision", default="fp32", choices=EXPORT_PRECISIONS)
    e.add_argument("--block-size", type=block_size, default=DEFAULT_BLOCK_SIZE,
                   help="int8/int4/int2 quantisation block size (a power of two >= 16)")
    e.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits/QMoE accuracy_level (4: int8 activations, faster)")
    e.add_argument("--kv-cache", default="auto", choices=KV_CACHES,
                   help="int8: GroupQueryAttention's quantised cache, a quarter of the bytes (ort flavour); auto "
                        "(default): int8 for int8/int4/int2 weights, else the activations' float")
    e.add_argument("--no-verify", action="store_true", help="skip the parity check against the Paddle model")
    e.add_argument("--attention-precision", default=None, choices=list(BITS),
                   help="the self-attention projections' own precision in an int8/int4/int2 export (default: "
                        "--precision's): int8 attention brings the routers' inputs, and so the expert choices, "
                        "much closer to the fp32 model's for a few percent more bytes a token")
    e.add_argument("--block-scales", default=DEFAULT_SCALE_RULE, choices=SCALE_RULES,
                   help="how int8/int4/int2 block scales are chosen: mse (the scale of least squared error in the "
                        "block, default) or absmax (the block's largest magnitude, llama.cpp Q4_0's rule: a faster "
                        "export, more rounding error, the same bytes)")
    e.add_argument("--gptq", action="store_true",
                   help="calibrated quantisation (GPTQ) instead of round-to-nearest: each layer's input Hessians from "
                        "the Paddle model on --calibration-text, one layer at a time (fits where the fp32 model "
                        "does not); the tied LM head stays round-to-nearest")
    e.add_argument("--calibration-text", default=DEFAULT_CORPUS, type=input_file,
                   help="UTF-8 text for --gptq (default: the shipped Tiny Shakespeare)")
    e.add_argument("--calibration-windows", type=positive_int, default=32,
                   help="128-token windows of it that --gptq runs (default 32)")
    strict_config_arg(e)


def _parity_args(pr: argparse.ArgumentParser) -> None:
    model_arg(pr, help="checkpoint folder (the reference); default: the shipped Shakespeare model")
    pr.add_argument("--onnx", action="append", type=folder, help="an exported folder to compare (repeatable)")
    pr.add_argument("--hf", action="store_true", help="also compare transformers (needs torch + transformers)")
    pr.add_argument("--gguf", action="append", type=input_file,
                    help="a GGUF file of the same weights to compare through llama.cpp (repeatable; needs "
                         "llama-cpp-python); F32 files, with llama.cpp's KV cache in F32, compare in fp32 throughout")
    pr.add_argument("--prompts", default=None, type=input_file,
                    help="UTF-8 file: one prompt per line (text, or ids like 1,2,3)")
    pr.add_argument("--greedy-tokens", type=non_negative_int, default=32)
    pr.add_argument("--json", default=None, type=output_file, help="write the report as JSON")
    pr.add_argument("--plot", default=None, type=output_file, help="write a PNG of per-layer drift (needs matplotlib)")
    strict_config_arg(pr)


def _memory_args(mem: argparse.ArgumentParser) -> None:
    from ernie_paddle.config import PRESETS

    mem.add_argument("--model", default=None, type=folder, help="checkpoint folder (its config.json)")
    mem.add_argument("--preset", default=None, choices=list(PRESETS))
    mem.add_argument("--precision", required=True, choices=PLAN_PRECISIONS)
    mem.add_argument("--context", type=positive_int, required=True, help="tokens per sequence (prompt + generated)")
    mem.add_argument("--batch", type=positive_int, default=1)
    mem.add_argument("--block-size", type=block_size, default=DEFAULT_BLOCK_SIZE,
                     help="int8/int4/int2 quantisation block size (the rule of export)")
    mem.add_argument("--kv-cache", default="auto", choices=KV_CACHES,
                     help="the export's KV cache (auto: int8 for int8/int4/int2, as export chooses)")
    mem.add_argument("--device-memory", type=size, default=None,
                     help="e.g. 24GB (24e9 bytes, as GPUs are sold) or 24GiB (default: list the GPUs it fits)")
    serve_cli.prefix_cache_memory_arg(mem, "the server's prefix cache (serve --prefix-cache-memory), counted in the "
                                           "total")


def _checkpoint_out_args(c: argparse.ArgumentParser, dtype_default: str) -> None:
    c.add_argument("--out", required=True, help="new output folder")
    c.add_argument("--layout", required=True, choices=WRITABLE_LAYOUTS)
    dtype_arg(c, dtype_default)
    c.add_argument("--max-shard-size", type=size, default=MAX_SHARD_BYTES)


def _convert_args(c: argparse.ArgumentParser) -> None:
    model_arg(c, required=True, help="checkpoint folder to convert")
    _checkpoint_out_args(c, "bfloat16")
    strict_config_arg(c)
    allow_pickle_arg(c)


def _make_checkpoint_args(m: argparse.ArgumentParser) -> None:
    from ernie_paddle.config import PRESETS

    m.add_argument("--preset", required=True, choices=list(PRESETS))
    _checkpoint_out_args(m, "bfloat16")
    m.add_argument("--seed", type=non_negative_int, default=0)
    m.add_argument("--num-layers", type=positive_int, default=None, help="override the preset's layer count")


def _generate_args(g: argparse.ArgumentParser) -> None:
    paddle_model_args(g)
    generate_args(g)
    prompt_cache_arg(g)


def _logits_args(lg: argparse.ArgumentParser) -> None:
    paddle_model_args(lg)
    logits_args(lg)


COMMANDS = [  # name, help, arguments, function
    ("generate", "generate tokens from a prompt (text or token ids)", _generate_args, cmd_generate),
    ("logits", "write float32 [T, vocab] logits of one forward pass (no cache)", _logits_args, cmd_logits),
    ("export", "export a checkpoint to a verified ONNX model folder", _export_args, cmd_export),
    ("parity", "parity report: Paddle against ONNX folders, transformers and llama.cpp", _parity_args, cmd_parity),
    ("memory", "plan the memory of a model at a precision and context length", _memory_args, cmd_memory),
    ("serve", "an OpenAI-compatible HTTP server on the Paddle model (needs the serve extra)",
     serve_cli.paddle_server_args, lambda a: serve_cli.serve(_load_model, a)),
    ("convert", "convert a checkpoint between the -Paddle and -PT layouts", _convert_args, cmd_convert),
    ("make-checkpoint", "write a random checkpoint of a preset in the real format", _make_checkpoint_args,
     cmd_make_checkpoint),
]
PROGRAMS = [  # name, help, module: programs of `ernie_paddle.tools` with arguments of their own
    ("bench", "benchmark engines on the same weights (ernie-paddle bench --help)", "ernie_paddle.tools.bench"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-paddle", description="ERNIE-4.5 in PaddlePaddle: generation, logits, "
                                "ONNX export, parity reports, memory planning, benchmarks, checkpoint conversion "
                                "and random checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, func in COMMANDS:
        sp = sub.add_parser(name, help=help_text)
        add_args(sp)
        sp.set_defaults(func=func)
    for name, help_text, module in PROGRAMS:  # every argument, --help too, is the program's own
        sp = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        sp.add_argument("program_args", nargs="*")
        sp.set_defaults(func=lambda a, m=module: _run_program(m, a.program_args))
    return p


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command (see `cli_commands.run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_commands.run(argv, parser or build_parser())


def _run_program(module: str, argv: list[str]) -> int:
    """Run a program of `ernie_paddle.tools` by name: the library never imports its programs (no import cycle)."""
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())

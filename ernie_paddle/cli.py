"""The `ernie-paddle` command line: generate, logits, convert, make-checkpoint, export.

Its arguments and outputs are a public contract (users' scripts rely on them). Errors in the input are
printed as one `error: ...` line on stderr with exit status 2, never as a Python traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from typing import Callable, Sequence

from .errors import ConfigDefaultWarning, ErnieError
from .interrupts import run_command
from .sysinfo import peak_rss


def _ids(text: str) -> list[int]:
    """Comma-separated ids, or `@FILE`: ids separated by commas or whitespace in a file (long prompts)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise argparse.ArgumentTypeError(f"cannot read token ids from {text[1:]}: {e}") from None
    try:
        ids = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text[:80]!r}") from None
    return ids


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 500MB, got {text!r}")
    return int(float(num) * units[unit])


def progress_printer(label: str) -> Callable[[int, int, str], None]:
    """Progress on stderr: about every 5% and at the end, with elapsed time."""
    t0, last = time.time(), [-1]

    def report(done: int, total: int, name: str) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 5 != last[0] or done == total:
            last[0] = pct // 5
            print(f"{label}: {done}/{total} tensors ({pct}%), {time.time() - t0:.1f}s  {name}", file=sys.stderr,
                  flush=True)

    return report


def default_model_dir() -> str:
    """The small trained ERNIE-architecture model that ships inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "ernie-4.5-shakespeare")


def _load_model(args):
    from .modeling import Ernie4_5_MoeForCausalLM

    if args.device:
        import paddle

        paddle.set_device(args.device)
    return Ernie4_5_MoeForCausalLM.from_pretrained(args.model, dtype=args.dtype, strict_config=args.strict_config,
                                                   allow_pickle=args.allow_pickle)


def run_generate(model, args) -> int:
    """Generate from --input-ids (prints new ids) or --prompt text (streams text); shared by both CLIs.

    With --json one object is printed at the end: "token_ids" holds the new tokens only (and "text" the
    decoded continuation when the prompt was text).
    """
    from .generation import GenerationConfig, stream

    tok, stops = None, list(args.stop_ids or ())
    if getattr(args, "prompt_file", None) is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ErnieError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from None
    if args.prompt is not None:
        from .tokenizer import ErnieTokenizer, IncrementalDecoder

        tok = ErnieTokenizer(model.folder if hasattr(model, "folder") else args.model)
        text = args.prompt
        if args.chat:
            prompt_ids = tok.apply_chat_template([{"role": "user", "content": text}])
        else:
            prompt_ids = tok.encode(text)
        if not prompt_ids:
            raise ErnieError("--prompt is empty: give some text to continue")
        stops += tok.stop_ids()
        decoder = IncrementalDecoder(tok, prompt_ids)
        # embedding rows past the tokenizer's vocabulary are padding: never sample them (as FastDeploy does)
        usable = tok.vocab_size if tok.vocab_size < model.config.vocab_size else None
    else:
        if args.chat:
            raise ErnieError("--chat needs --prompt (the chat template is text)")
        prompt_ids = args.input_ids
        usable = None
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (128 if tok else 32)
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=args.do_sample, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           repetition_penalty=args.repetition_penalty, stop_token_ids=tuple(stops),
                           vocab_limit=usable, prefill_chunk=args.prefill_chunk)
    t0, new, first = time.time(), [], None
    if tok and not args.json and getattr(args, "prompt_file", None) is None:  # echo a short prompt, not a file
        print(text if not args.chat else "", end="", flush=True)
    for t in stream(model, prompt_ids, gen):
        first = first or time.time() - t0
        new.append(t)
        if args.json:
            continue
        if tok:
            print(decoder.push(t), end="", flush=True)
        else:
            print(t, end=" ", flush=True)
    dt = time.time() - t0
    if args.json:
        out = {"token_ids": new, "prompt_tokens": len(prompt_ids), "generated_tokens": len(new),
               "seconds": round(dt, 4), "first_token_seconds": round(first or 0.0, 4),
               "decode_tokens_per_s": round((len(new) - 1) / (dt - first), 3) if len(new) > 1 else None,
               "peak_rss_gib": round(peak_rss() / 2**30, 3)}
        if tok:
            out["text"] = tok.decode(new, skip_special_tokens=True)
        print(json.dumps(out))
    else:
        print(flush=True)
        print(f"[prompt {len(prompt_ids)} tokens, generated {len(new)} tokens, "
              f"{len(new) / max(dt, 1e-9):.2f} tokens/s, first token after {first or 0:.2f}s, "
              f"peak RSS {peak_rss() / 2**30:.2f} GiB]", file=sys.stderr)
    return 0


def run_logits(model, args) -> int:
    """Write float32 [T, vocab] logits of one forward pass; shared by ernie-paddle and ernie-onnx."""
    import numpy as np

    from .atomic import atomic_path

    if not args.input_ids:
        raise ErnieError("--input-ids is empty: give at least one token id")
    logits = model.logits(np.asarray(args.input_ids, dtype=np.int64)).astype(np.float32)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, logits)
    print(f"wrote {args.out}: float32 {list(logits.shape)}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    return run_generate(_load_model(args), args)


def cmd_logits(args) -> int:
    return run_logits(_load_model(args), args)


def cmd_export(args) -> int:
    from .export.pipeline import export

    t0 = time.time()
    m = export(args.model, args.out, flavor=args.flavor, precision=args.precision, verify=not args.no_verify,
               block_size=args.block_size, accuracy_level=args.accuracy_level, strict_config=args.strict_config,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    print(f"wrote {args.out} ({m['flavor']} flavour, {m['precision']}) in {time.time() - t0:.1f}s:", file=sys.stderr)
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
    from .checkpoint import convert

    files = convert(args.model, args.out, layout=args.layout, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                    strict_config=args.strict_config, progress=progress_printer("convert"),
                    allow_pickle=args.allow_pickle)
    print(f"wrote {args.out} ({args.layout} layout, {args.dtype}): {', '.join(files)}", file=sys.stderr)
    return 0


def cmd_make_checkpoint(args) -> int:
    from .checkpoint import make_checkpoint
    from .config import preset

    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
    cfg = preset(args.preset, **overrides)
    files = make_checkpoint(cfg, args.out, layout=args.layout, dtype=args.dtype, seed=args.seed,
                            max_shard_bytes=args.max_shard_size, progress=progress_printer("make-checkpoint"))
    print(f"wrote {args.out} (preset {args.preset}, {args.layout} layout, {args.dtype}, seed {args.seed}): "
          f"{', '.join(files)}", file=sys.stderr)
    return 0


def generate_args(g: argparse.ArgumentParser) -> None:
    """The generate arguments: one contract for ernie-paddle and ernie-onnx."""
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-ids", type=_ids, help="prompt token ids, e.g. 1,2,3, or @FILE (prints the new ids)")
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer; streams text)")
    src.add_argument("--prompt-file", help="read the prompt text from this UTF-8 file (long contexts)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the ERNIE chat template")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 32 for --input-ids, 128 for --prompt")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop-ids", type=_ids, default=None, help="extra token ids that end generation")
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per prefill pass (bounds attention memory at long contexts; default 512)")
    g.add_argument("--json", action="store_true", help='print one JSON object; "token_ids" holds the new tokens')


def logits_args(lg: argparse.ArgumentParser) -> None:
    lg.add_argument("--input-ids", type=_ids, required=True)
    lg.add_argument("--out", required=True, help="output .npy file")


def _parity_prompts(args, vocab_size: int) -> list[list[int]]:
    """--prompts FILE: one prompt per line, text (needs the tokenizer) or comma-separated ids; default: fixed ones."""
    import numpy as np

    lines = None
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        if not lines:
            raise ErnieError(f"{args.prompts}: no prompts in the file")
    tok = None
    if lines is None or any(not _is_ids(ln) for ln in lines):
        from .tokenizer import ErnieTokenizer, TokenizerError

        try:
            tok = ErnieTokenizer(args.model)
        except TokenizerError:
            if lines is not None:
                raise
    if lines is None:
        if tok is None:
            rng = np.random.default_rng(0)
            return [rng.integers(3, vocab_size, n).tolist() for n in (8, 16, 32)]
        lines = ["ROMEO:\nBut, soft! what light through yonder window breaks?",
                 "First Citizen:\nBefore we proceed any further, hear me speak.", "To be, or not to be:"]
    return [_ids(ln) if _is_ids(ln) else tok.encode(ln) for ln in lines]


def _is_ids(line: str) -> bool:
    return all(x.strip().isdigit() for x in line.split(",")) and bool(line.strip())


def cmd_parity(args) -> int:
    from . import parity
    from .config import ErnieConfig

    cfg = ErnieConfig.from_file(args.model, strict=args.strict_config)
    prompts = _parity_prompts(args, cfg.vocab_size)
    report = parity.run(args.model, args.onnx or [], args.hf, prompts, args.greedy_tokens,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    print(parity.format_table(report))
    if args.json:
        from .atomic import write_json

        write_json(args.json, report)
    if args.plot:
        parity.plot(report, args.plot)
    return 0


def cmd_memory(args) -> int:
    from .config import ErnieConfig, preset
    from .memory import parse_size, report

    if (args.model is None) == (args.preset is None):
        raise ErnieError("give exactly one of --model DIR or --preset NAME")
    cfg = ErnieConfig.from_file(args.model) if args.model else preset(args.preset)
    device = parse_size(args.device_memory) if args.device_memory else None
    print(report(cfg, args.precision, args.context, args.batch, device, args.block_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-paddle", description="ERNIE-4.5 in PaddlePaddle: generation, logits, "
                                "checkpoint conversion and random checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, dtype_default="float32"):
        sp.add_argument("--model", default=default_model_dir(),
                        help="checkpoint directory (-Paddle or -PT layout); default: the shipped Shakespeare model")
        sp.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (CPU computes in float32 only)")
        sp.add_argument("--device", default=None, help="Paddle device, e.g. cpu or gpu:0 (default: Paddle's)")
        sp.add_argument("--strict-config", action="store_true",
                        help="treat a missing config field that needs a default as an error")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled .pdparams weights (only files you trust: unpickling can run code)")

    g = sub.add_parser("generate", help="generate tokens from a prompt of token ids")
    model_args(g)
    generate_args(g)
    g.set_defaults(func=cmd_generate)

    lg = sub.add_parser("logits", help="write float32 [T, vocab] logits of one forward pass (no cache)")
    model_args(lg)
    logits_args(lg)
    lg.set_defaults(func=cmd_logits)

    e = sub.add_parser("export", help="export a checkpoint to a verified ONNX model folder")
    e.add_argument("--model", default=default_model_dir(),
                   help="checkpoint directory (-Paddle or -PT layout); default: the shipped Shakespeare model")
    e.add_argument("--out", required=True, help="new output folder")
    e.add_argument("--flavor", default="ort", choices=["ort", "portable"],
                   help="ort: ONNX Runtime fused ops (default); portable: standard ONNX ops via paddle2onnx")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4", "int2"])
    e.add_argument("--block-size", type=int, default=32, help="int8/int4 quantisation block size")
    e.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits/QMoE accuracy_level (4: int8 activations, faster)")
    e.add_argument("--no-verify", action="store_true", help="skip the parity check against the Paddle model")
    e.add_argument("--strict-config", action="store_true")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("parity", help="parity report: Paddle against ONNX folders and transformers")
    pr.add_argument("--model", default=default_model_dir(), help="checkpoint directory (the reference)")
    pr.add_argument("--onnx", action="append", help="an exported folder to compare (repeatable)")
    pr.add_argument("--hf", action="store_true", help="also compare transformers (needs torch + transformers)")
    pr.add_argument("--prompts", default=None, help="file: one prompt per line (text, or ids like 1,2,3)")
    pr.add_argument("--greedy-tokens", type=int, default=32)
    pr.add_argument("--json", default=None, help="write the report as JSON")
    pr.add_argument("--plot", default=None, help="write a PNG of per-layer drift (needs matplotlib)")
    pr.add_argument("--strict-config", action="store_true")
    pr.set_defaults(func=cmd_parity)

    mem = sub.add_parser("memory", help="plan the memory of a model at a precision and context length")
    mem.add_argument("--model", default=None, help="checkpoint directory (its config.json)")
    mem.add_argument("--preset", default=None, choices=["tiny", "small", "0.3b", "21b-a3b"])
    mem.add_argument("--precision", required=True, choices=["fp32", "bf16", "fp16", "int8", "int4", "int2"])
    mem.add_argument("--context", type=int, required=True, help="tokens per sequence (prompt + generated)")
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--block-size", type=int, default=32, help="int8/int4/int2 quantisation block size (as export)")
    mem.add_argument("--device-memory", default=None, help="e.g. 24GB (default: list the common GPUs it fits)")
    mem.set_defaults(func=cmd_memory)

    sub.add_parser("bench", help="benchmark engines on the same weights (ernie-paddle bench --help)")

    c = sub.add_parser("convert", help="convert a checkpoint between the -Paddle and -PT layouts")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--layout", required=True, choices=["paddle", "pt"])
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    c.add_argument("--max-shard-size", type=_size, default=_size("5GB"))
    c.add_argument("--strict-config", action="store_true")
    c.add_argument("--allow-pickle", action="store_true", help="read pickled .pdparams weights (trusted files only)")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("make-checkpoint", help="write a random checkpoint of a preset in the real format")
    m.add_argument("--preset", required=True, choices=["tiny", "small", "0.3b", "21b-a3b"])
    m.add_argument("--layout", required=True, choices=["paddle", "pt"])
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    m.add_argument("--max-shard-size", type=_size, default=_size("5GB"))
    m.set_defaults(func=cmd_make_checkpoint)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Config-default warnings as one plain line; others as Python prints them."""
    if issubclass(category, ConfigDefaultWarning):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; Ctrl-C, SIGTERM and a closed stdout end it with one line and status 130, 143 or 141."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: _dispatch(argv, parser), parser.prog if parser else "ernie-paddle")


def _dispatch(argv: list[str], parser: argparse.ArgumentParser | None) -> int:
    if parser is None and argv[:1] == ["bench"]:  # the benchmark program parses its own arguments
        return _run_program("ernie_paddle.tools.bench", argv[1:])
    args = (parser or build_parser()).parse_args(argv)
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", ConfigDefaultWarning)
    try:
        return args.func(args)
    except ErnieError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader of stdout has gone: run_command ends quietly
    except (OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = _python_showwarning


def _run_program(module: str, argv: list[str]) -> int:
    """Run a program of `ernie_paddle.tools` by name: the library never imports its programs (no import cycle)."""
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())

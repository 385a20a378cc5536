"""Train the small ERNIE-4.5-architecture MoE model shipped with ernie-paddle, on Tiny Shakespeare.

Everything of the full architecture at a small width: GQA, interleaved RoPE, a dense first layer, routed
experts with ERNIE's auxiliary-loss-free balancing (the `e_score_correction_bias`, used for selection only,
nudged after each step towards even expert load), and shared experts. Its own SentencePiece tokenizer is
trained on the training split. Deterministic from `--seed` (one thread). Writes a `-Paddle` checkpoint
folder with `config.json`, `tokenizer.model`, `tokenizer_config.json` and `training_report.json`.

    python -m ernie_paddle.tools.train_shipped --out model-dir   # --data FILE: another corpus
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

from ernie_paddle.atomic import atomic_dir, check_new_dir, write_json
from ernie_paddle.checkpoint.layout import Role, canonical_maps
from ernie_paddle.config import ErnieConfig, preset
from ernie_paddle.corpus import DEFAULT_CORPUS, read_corpus, split_corpus
from ernie_paddle.files import SPM_MODEL, TOKENIZER_CONFIG
from ernie_paddle.interrupts import run_command

# The shipped model's shape: the "tiny" preset at a width that learns Shakespeare (vocab_size: the tokenizer's).
SHAPE = dict(hidden_size=256, intermediate_size=768, head_dim=64, max_position_embeddings=2048,
             moe_intermediate_size=128)


def init_weights(model, cfg: ErnieConfig, rng: np.random.Generator) -> None:
    """N(0, 0.02) weights, output projections scaled by 1/sqrt(2L), norms 1, correction bias 0."""
    import paddle

    roles = {name: m.role for name, m in canonical_maps(cfg).items()}
    for name, p in model.named_parameters():
        shape, role = tuple(p.shape), roles[name]
        if role.is_norm:
            a = np.ones(shape, np.float32)
        elif role is Role.ROUTER_BIAS:
            a = np.zeros(shape, np.float32)
        else:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if role.residual_output else 0.02
            a = (rng.standard_normal(shape) * std).astype(np.float32)
        p.set_value(paddle.to_tensor(a))


def batches(ids: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = np.stack([ids[s:s + seq + 1] for s in starts])
        yield x[:, :-1], x[:, 1:]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_CORPUS,
                   help="UTF-8 training text (default: the shipped Tiny Shakespeare)")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-free balancing step (ERNIE/DeepSeek u)")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def _optimizer(model, args: argparse.Namespace):
    """AdamW with warm-up and cosine decay over every parameter but the correction biases (not trained by
    gradient: `_balance` moves them). Returns (optimizer, schedule, biases)."""
    import paddle

    from ernie_paddle.paddle.modeling import SparseMoeBlock

    biases = [layer.mlp.e_score_correction_bias for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    for b in biases:
        b.stop_gradient = True
    trainable = [q for q in model.parameters() if all(q is not b for b in biases)]  # the biases are not trained
    warmup = max(1, args.steps // 20)
    sched = paddle.optimizer.lr.LambdaDecay(args.lr, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=trainable, beta1=0.9, beta2=0.95, weight_decay=0.1,
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    return opt, sched, biases


def _balance(biases, router_experts, num_experts: int, rate: float) -> None:
    """Aux-free balancing: raise the bias of under-loaded experts, lower the overloaded ones'."""
    import paddle

    with paddle.no_grad():
        for b, experts in zip(biases, router_experts):
            load = paddle.bincount(experts.reshape([-1]), minlength=num_experts).astype("float32")
            b.set_value(b + rate * paddle.sign(load.mean() - load))


def _train(model, cfg: ErnieConfig, train_ids: np.ndarray, args: argparse.Namespace, rng: np.random.Generator,
           t0: float) -> tuple[list[dict], list]:
    """The training loop; returns the loss log and the correction biases."""
    import paddle
    import paddle.nn.functional as F

    opt, sched, biases = _optimizer(model, args)
    model.train()
    data = batches(train_ids, args.seq, args.batch, rng)
    log = []
    for step in range(1, args.steps + 1):
        x, y = next(data)
        out = model(x, output_router=True)
        loss = F.cross_entropy(out.logits.reshape([-1, cfg.vocab_size]), paddle.to_tensor(y.reshape(-1, 1)))
        loss.backward()
        opt.step()
        opt.clear_grad()
        sched.step()
        _balance(biases, out.router_experts, cfg.moe_num_experts, args.bias_update_rate)
        if step % args.log_every == 0 or step == 1:
            log.append({"step": step, "loss": round(float(loss), 4), "seconds": round(time.time() - t0, 1)})
            print(f"step {step}/{args.steps} loss {float(loss):.4f} lr {sched.get_lr():.2e} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return log, biases


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # deterministic reductions; set before Paddle is imported
    args = _parse(argv)
    check_new_dir(args.out)  # before an hour of training, not after
    _train_and_save(args)
    return 0


def _train_and_save(args: argparse.Namespace) -> None:
    """Tokenizer, training, evaluation and the checkpoint folder at `args.out` (all or nothing)."""
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM  # first: its package sets up Paddle's process
    from ernie_paddle.paddle.training import evaluate, train_tokenizer
    from ernie_paddle.paddle.weights import save_pretrained

    import paddle
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    t0 = time.time()
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_text, heldout_text = split_corpus(read_corpus(args.data))
    # the tokenizer's work folder and the unfinished checkpoint go away on any failure or interrupt
    parent = os.path.dirname(os.path.abspath(args.out))
    with atomic_dir(args.out) as ckpt, tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=parent) as work:
        train_tokenizer(train_text, work, args.vocab_size)
        tok = ErnieTokenizer(work)
        train_ids = np.array(tok.encode(train_text), np.int64)
        heldout_ids = np.array(tok.encode(heldout_text), np.int64)
        print(f"tokenizer: {tok.vocab_size} pieces; train {len(train_ids)} tokens, held-out {len(heldout_ids)}",
              file=sys.stderr, flush=True)

        cfg = preset("tiny", vocab_size=tok.vocab_size, **SHAPE)
        model = Ernie4_5_MoeForCausalLM(cfg)
        init_weights(model, cfg, rng)
        log, biases = _train(model, cfg, train_ids, args, rng, t0)
        train_seconds = time.time() - t0
        model.eval()
        ppl, loads = evaluate(model, heldout_ids, args.seq)
        balance = [round(max(l) / (1.0 / cfg.moe_num_experts), 3) for l in loads]
        print(f"held-out perplexity {ppl:.2f}; max expert load / mean per MoE layer {balance}", file=sys.stderr)
        save_pretrained(model, ckpt, layout="paddle", dtype="float32")
        for f in (SPM_MODEL, TOKENIZER_CONFIG):
            os.replace(os.path.join(work, f), os.path.join(ckpt, f))
        report = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                  "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids)),
                  "tokens_seen": args.steps * args.batch * args.seq, "train_seconds": round(train_seconds, 1),
                  "threads": os.environ.get("OMP_NUM_THREADS"), "heldout_perplexity": round(ppl, 3),
                  "expert_load_share": loads, "max_over_mean_load": balance,
                  "correction_bias": [b.numpy().round(4).tolist() for b in biases], "loss_log": log,
                  "parameters": int(sum(int(np.prod(q.shape)) for q in model.parameters())),
                  "paddle": paddle.__version__}
        write_json(os.path.join(ckpt, "training_report.json"), report)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "train_shipped"))

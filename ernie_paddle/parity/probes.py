"""The parity report's candidates: other implementations of the model, run on the same prompts as the reference.

Each probe has a `name`, `trace(ids) -> Trace` (logits, and where the implementation exposes them the hidden states
and router choices) and `greedy(ids, n)` (its greedy continuation). Probes are opened as context managers
(`open_onnx`, `open_hf`, `open_llama`) that release what they made when done: the fp32 -PT copy transformers reads,
the model. Nothing is ever written into the user's folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np

from ernie_paddle import graph_contract as contract
from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.parity.report import Trace


def _greedy_config(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_ids=[])  # always n tokens: continuations compare in full


# ---- ONNX Runtime --------------------------------------------------------------------------------------------------
def _probe_graph(folder: str, manifest: dict, cfg, work: str) -> tuple[str, list[str | None], list[str]]:
    """Write into `work` a copy of the folder's graph with the residual stream and router scores (the contract's
    probe values, where the graph names them) as extra outputs (without its weights: OnnxCausalLM reads them from
    the folder). Returns (graph path, hidden-state names, router-score names)."""
    import onnx

    from ernie_paddle.files import ONNX_MODEL

    model_file = manifest.get(contract.MODEL_FILE, ONNX_MODEL)
    model = onnx.load(os.path.join(folder, model_file), load_external_data=False)
    named: set[str] = set()
    if contract.flavor_of(manifest, folder).names_probes:  # the portable graph's values are paddle2onnx's
        named = {x for node in model.graph.node for x in node.output}
    hidden = [name if name in named else None for name in map(contract.hidden_state, range(cfg.num_hidden_layers + 1))]
    router = [name for name in map(contract.router_scores, range(cfg.num_hidden_layers)) if name in named]
    for name in [x for x in hidden if x] + router:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = os.path.join(work, model_file)
    onnx.save(model, path)
    return path, hidden, router


class OnnxProbe:
    """An exported folder with its per-layer residual stream and router choices exposed as extra outputs."""

    def __init__(self, folder: str, cfg):
        from ernie_paddle.ort.runtime import OnnxCausalLM, load_manifest

        self.cfg = cfg
        manifest = load_manifest(folder)
        kind = f"{manifest[contract.FLAVOR]} {manifest[contract.PRECISION]}"
        self.name = f"onnx:{os.path.basename(os.path.normpath(folder))} ({kind})"
        work = tempfile.mkdtemp(prefix="ernie-parity-onnx-")
        try:
            path, self.hidden_names, self.router_names = _probe_graph(folder, manifest, cfg, work)
            # one session serves both the traces and generation: the weights are loaded once
            self.runtime = OnnxCausalLM(folder, model_file=path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.session = self.runtime.session

    def trace(self, ids: list[int]) -> Trace:
        from ernie_paddle.ort.runtime import prompt_feeds

        cfg = self.cfg
        feeds = prompt_feeds(ids, cfg, self.runtime.kv_dtype)
        if self.runtime.has_position_ids:
            feeds[contract.POSITION_IDS] = np.arange(len(ids), dtype=np.int64)[None]
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.runtime.run(None, feeds)))
        hidden = [outs[n].reshape(len(ids), -1).astype(np.float32) if n else None for n in self.hidden_names]
        # MoE: log-probs of the chosen, -inf elsewhere; QMoE: probs + bias. Either way the top k are the choice.
        experts = [np.argsort(-outs[n].astype(np.float32), axis=-1, kind="stable")[:, :cfg.moe_k]
                   for n in self.router_names]
        return Trace(outs[contract.LOGITS][0].astype(np.float32), hidden, experts)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return generate(self.runtime, ids, _greedy_config(n))


@contextlib.contextmanager
def open_onnx(folder: str, cfg) -> Iterator[OnnxProbe]:
    probe = OnnxProbe(folder, cfg)
    try:
        yield probe
    finally:
        del probe.runtime, probe.session


# ---- transformers --------------------------------------------------------------------------------------------------
def load_hf_model(pt_dir: str):
    """transformers' implementation from a -PT folder, as the oracle: fp32, eager attention and eager experts."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(pt_dir, experts_implementation="eager", **kwargs)
    except (TypeError, ValueError):  # transformers releases before the experts_implementation switch
        model = AutoModelForCausalLM.from_pretrained(pt_dir, **kwargs)
    return model.eval()


class HFProbe:
    """transformers' implementation (eager attention and experts, fp32), from a -PT checkpoint folder."""

    def __init__(self, pt_dir: str):
        import torch
        import transformers

        self.model = load_hf_model(pt_dir)
        self.torch = torch
        self.name = "transformers " + transformers.__version__
        self._router: list = []
        for _, module in self.model.named_modules():
            if type(module).__name__.endswith("TopKRouter"):
                module.register_forward_hook(lambda m, i, o: self._router.append(o[2]))

    def trace(self, ids: list[int]) -> Trace:
        self._router.clear()
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), output_hidden_states=True)
        hidden = [h[0].float().numpy() for h in out.hidden_states]
        return Trace(out.logits[0].float().numpy(), hidden, [r.numpy() for r in self._router])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        with self.torch.no_grad():
            for _ in range(n):
                seq.append(int(self.model(self.torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(ids):]


@contextlib.contextmanager
def pt_copy(model_dir: str) -> Iterator[str]:
    """The checkpoint as a -PT folder for transformers: a -PT folder as it is, a -Paddle one converted to a fp32
    -PT copy in the temp folder, removed on exit."""
    from ernie_paddle.checkpoint.layout import PADDLE, detect_layout
    from ernie_paddle.checkpoint.safetensors_io import CheckpointReader

    reader = CheckpointReader(model_dir)
    try:
        layout = detect_layout(reader.names(), model_dir)
    finally:
        reader.close()
    if layout != PADDLE:
        yield model_dir
        return
    from ernie_paddle.checkpoint.folder import convert

    work = tempfile.mkdtemp(prefix="ernie-parity-pt-")
    try:
        out = os.path.join(work, "pt")
        convert(model_dir, out, layout="pt", dtype="float32")
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def open_hf(model_dir: str) -> Iterator[HFProbe]:
    with pt_copy(model_dir) as pt_dir:
        yield HFProbe(pt_dir)


# ---- llama.cpp -----------------------------------------------------------------------------------------------------
GGML_TYPE_F32 = 0  # ggml's type id: the KV cache in fp32, so that only the weights' type differs from Paddle's


class LlamaProbe:
    """llama.cpp (through llama-cpp-python) on a GGUF file of the same weights: logits only (llama.cpp exposes no
    hidden states or router choices). The KV cache is F32, so an F32 file computes in fp32 throughout."""

    def __init__(self, path: str, cfg, n_ctx: int):
        import llama_cpp

        from ernie_paddle.export.gguf import FILE_TYPE, QUANTIZER_FILE_TYPE

        self.cfg = cfg
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                       type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise InputError(f"{path}: llama.cpp cannot load it ({e})") from None
        self._check_shape(path)
        names = {v: k for k, v in {**FILE_TYPE, **QUANTIZER_FILE_TYPE}.items()}
        kind = names.get(int(self.llm.metadata.get("general.file_type", -1)), "?")
        self.name = f"llama.cpp:{os.path.basename(path)} ({kind})"

    def _check_shape(self, path: str) -> None:
        """The file must hold this model's shape: a GGUF of another model would give meaningless figures."""
        from ernie_paddle.export.gguf import ARCH

        meta, cfg = self.llm.metadata, self.cfg
        arch = meta.get("general.architecture")
        got = {"architecture": arch, "layers": meta.get(f"{arch}.block_count"),
               "hidden size": meta.get(f"{arch}.embedding_length"), "vocabulary": str(self.llm.n_vocab())}
        want = {"architecture": ARCH, "layers": str(cfg.num_hidden_layers),
                "hidden size": str(cfg.hidden_size), "vocabulary": str(cfg.vocab_size)}
        wrong = [f"{k} {got[k]} (the model has {v})" for k, v in want.items() if str(got[k]) != v]
        if wrong:
            raise InputError(f"{path}: not a GGUF of this model: " + ", ".join(wrong))

    def _eval(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])

    def trace(self, ids: list[int]) -> Trace:
        self._eval(ids)
        return Trace(np.array(self.llm.scores[:len(ids)], dtype=np.float32))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self._eval(ids)
        out: list[int] = []
        for i in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if i < n - 1:
                self.llm.eval([out[-1]])
        return out


@contextlib.contextmanager
def open_llama(path: str, cfg, n_ctx: int) -> Iterator[LlamaProbe]:
    probe = LlamaProbe(path, cfg, n_ctx)
    try:
        yield probe
    finally:
        probe.llm.close()
